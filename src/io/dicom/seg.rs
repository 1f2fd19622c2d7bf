//! DICOM Segmentation (SOP Class 1.2.840.10008.5.1.4.1.1.66.4) writer: a BINARY segmentation with bit-packed
//! frames, one segment per class present, a frame per (segment, slice) that holds any voxel of it (empty frames
//! are omitted), each frame referencing its source slice (Derivation Image / Source Image sequences), the source
//! series referenced (Referenced Series Sequence), the same Frame of Reference, the patient and study attributes
//! copied, and new UIDs (`2.25.` + a random UUID).

use std::path::Path;

use dicom_core::value::DataSetSequence;
use dicom_core::{dicom_value, DataElement, PrimitiveValue, Tag, VR};
use dicom_dictionary_std::{tags, uids};
use dicom_object::meta::FileMetaTableBuilder;
use dicom_object::InMemDicomObject;
use ndarray::Array3;

use super::codes::{CodedConcept, SegmentCodes};
use super::{DicomError, SeriesInfo};
use crate::prompts::LabelTable;

/// Label value meaning "not computed" in vista3d label maps (outside point windows): not a class, written as
/// background.
const NOT_COMPUTED: f32 = 255.0;

/// This implementation's class UID in the file meta group (a fixed `2.25.` UID).
const IMPLEMENTATION_CLASS_UID: &str = "2.25.231876502372716367620402342381813526537";

/// Which kind of DICOM Segmentation to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SegmentationKind {
    /// Segmentation Storage (1.2.840.10008.5.1.4.1.1.66.4), SegmentationType BINARY: one bit-packed frame per
    /// (segment, slice) holding the segment. What every SEG viewer reads; the default.
    #[default]
    Binary,
    /// Label Map Segmentation Storage (1.2.840.10008.5.1.4.1.1.66.7, DICOM 2024), SegmentationType LABELMAP: one
    /// 8- or 16-bit frame per slice holding any segment, pixel values = segment numbers. Read back by highdicom
    /// here; dicom3tools' dciodvfy (Debian 2022 build) does not know this SOP class yet, so it is an option.
    Labelmap,
}

/// Settings of a written SEG.
#[derive(Debug, Clone)]
pub struct SegOptions {
    /// BINARY (default) or LABELMAP.
    pub kind: SegmentationKind,
    /// SeriesNumber of the new series.
    pub series_number: i64,
    /// SeriesDescription of the new series.
    pub series_description: String,
    /// SegmentAlgorithmName of every segment.
    pub algorithm_name: String,
}

impl Default for SegOptions {
    fn default() -> Self {
        Self {
            kind: SegmentationKind::Binary,
            series_number: 3000,
            series_description: "vista3d segmentation (research use only)".into(),
            algorithm_name: "VISTA3D".into(),
        }
    }
}

/// A new UID: `2.25.` followed by a random (v4) UUID as a decimal integer.
pub(crate) fn new_uid() -> String {
    format!("2.25.{}", uuid::Uuid::new_v4().as_u128())
}

fn el(tag: Tag, vr: VR, value: impl Into<PrimitiveValue>) -> DataElement<InMemDicomObject> {
    DataElement::new(tag, vr, value.into())
}

fn seq(tag: Tag, items: Vec<InMemDicomObject>) -> DataElement<InMemDicomObject> {
    DataElement::new(tag, VR::SQ, DataSetSequence::from(items))
}

fn obj(elements: Vec<DataElement<InMemDicomObject>>) -> InMemDicomObject {
    InMemDicomObject::from_element_iter(elements)
}

fn code_item(c: &CodedConcept) -> InMemDicomObject {
    obj(vec![
        el(tags::CODE_VALUE, VR::SH, c.code.as_str()),
        el(tags::CODING_SCHEME_DESIGNATOR, VR::SH, c.scheme.as_str()),
        el(tags::CODE_MEANING, VR::LO, c.meaning.as_str()),
    ])
}

fn dcm_code(code: &str, meaning: &str) -> InMemDicomObject {
    code_item(&CodedConcept {
        scheme: "DCM".into(),
        code: code.into(),
        meaning: meaning.into(),
    })
}

/// Decimal string of a number (at most 16 characters, as DS requires).
fn ds(v: f64) -> String {
    let mut s = format!("{v}");
    if s.len() > 16 {
        for p in (0..=12).rev() {
            s = format!("{v:.p$}");
            if s.len() <= 16 {
                break;
            }
        }
    }
    s
}

fn ds_multi(v: &[f64]) -> PrimitiveValue {
    PrimitiveValue::Strs(v.iter().map(|x| ds(*x)).collect())
}

/// Writes `labels` (class ids on the grid of the series read by [`super::read_series`], indexed `[x, y, z]` as
/// its volume) as a DICOM SEG at `path`, atomically. Class names come from `classes`, codes from
/// `configs/segment_codes.json`. Value 0 is background and 255 ("not computed") is written as background;
/// other values must be non-negative integers. A label map without any class is refused (a SEG needs a segment).
pub fn write_seg(
    path: &Path,
    labels: &Array3<f32>,
    series: &SeriesInfo,
    classes: &LabelTable,
    options: &SegOptions,
) -> Result<(), DicomError> {
    let err = |reason: String| DicomError::Seg {
        path: path.display().to_string(),
        reason,
    };
    let (rows, cols, n) = (series.rows, series.columns, series.slices.len());
    if labels.shape() != [cols, rows, n] {
        return Err(err(format!(
            "the label map's shape {:?} is not the series' grid [{cols}, {rows}, {n}] (columns, rows, slices)",
            labels.shape()
        )));
    }
    // Classes present, per slice.
    let mut present: std::collections::BTreeMap<i64, Vec<bool>> = Default::default();
    for ((_, _, k), &v) in labels.indexed_iter() {
        if v == 0.0 || v == NOT_COMPUTED {
            continue;
        }
        if !(v.is_finite() && v > 0.0 && v.fract() == 0.0 && v < 65536.0) {
            return Err(err(format!(
                "label value {v} is not a class id (a non-negative integer)"
            )));
        }
        present.entry(v as i64).or_insert_with(|| vec![false; n])[k] = true;
    }
    if present.is_empty() {
        return Err(err(
            "the label map holds no class (only background): a DICOM SEG needs at least one segment"
                .into(),
        ));
    }
    let table = SegmentCodes::table();

    let study_uid = series.study_instance_uid.clone().unwrap_or_else(|| {
        log::warn!(
            "the source series has no StudyInstanceUID: the SEG gets a new one (a PACS files it in a study of its own)"
        );
        new_uid()
    });
    let frame_of_reference = series.frame_of_reference_uid.clone().unwrap_or_else(|| {
        log::warn!("the source series has no FrameOfReferenceUID: the SEG gets a new one");
        new_uid()
    });
    let sop_instance_uid = new_uid();
    let series_uid = new_uid();
    let dimension_uid = new_uid();
    let now = chrono::Local::now();
    let date = now.format("%Y%m%d").to_string();
    let time = now.format("%H%M%S%.6f").to_string();

    let (sop_class, segmentation_type, bits_allocated) = match options.kind {
        SegmentationKind::Binary => (uids::SEGMENTATION_STORAGE, "BINARY", 1u16),
        SegmentationKind::Labelmap if present.len() > 255 => {
            (uids::LABEL_MAP_SEGMENTATION_STORAGE, "LABELMAP", 16)
        }
        SegmentationKind::Labelmap => (uids::LABEL_MAP_SEGMENTATION_STORAGE, "LABELMAP", 8),
    };
    let mut ds_obj = InMemDicomObject::new_empty();
    // Patient and study modules: copied, with the type 2 attributes present even when empty.
    for e in &series.copied {
        ds_obj.put(e.clone());
    }
    for (tag, vr) in [
        (tags::PATIENT_NAME, VR::PN),
        (tags::PATIENT_ID, VR::LO),
        (tags::PATIENT_BIRTH_DATE, VR::DA),
        (tags::PATIENT_SEX, VR::CS),
        (tags::STUDY_DATE, VR::DA),
        (tags::STUDY_TIME, VR::TM),
        (tags::REFERRING_PHYSICIAN_NAME, VR::PN),
        (tags::STUDY_ID, VR::SH),
        (tags::ACCESSION_NUMBER, VR::SH),
    ] {
        if ds_obj.get(tag).is_none() {
            ds_obj.put(DataElement::new(tag, vr, PrimitiveValue::Empty));
        }
    }
    let software = env!("CARGO_PKG_VERSION");
    for e in [
        el(tags::SPECIFIC_CHARACTER_SET, VR::CS, "ISO_IR 192"),
        el(tags::SOP_CLASS_UID, VR::UI, sop_class),
        el(tags::SOP_INSTANCE_UID, VR::UI, sop_instance_uid.as_str()),
        el(tags::STUDY_INSTANCE_UID, VR::UI, study_uid.as_str()),
        el(tags::SERIES_INSTANCE_UID, VR::UI, series_uid.as_str()),
        el(tags::INSTANCE_CREATION_DATE, VR::DA, date.as_str()),
        el(tags::INSTANCE_CREATION_TIME, VR::TM, time.as_str()),
        el(tags::SERIES_DATE, VR::DA, date.as_str()),
        el(tags::SERIES_TIME, VR::TM, time.as_str()),
        el(tags::CONTENT_DATE, VR::DA, date.as_str()),
        el(tags::CONTENT_TIME, VR::TM, time.as_str()),
        el(tags::MODALITY, VR::CS, "SEG"),
        el(
            tags::SERIES_NUMBER,
            VR::IS,
            options.series_number.to_string(),
        ),
        el(tags::INSTANCE_NUMBER, VR::IS, "1"),
        el(
            tags::SERIES_DESCRIPTION,
            VR::LO,
            options.series_description.as_str(),
        ),
        el(tags::MANUFACTURER, VR::LO, "vista3d"),
        el(tags::MANUFACTURER_MODEL_NAME, VR::LO, "vista3d"),
        el(tags::DEVICE_SERIAL_NUMBER, VR::LO, "1"),
        el(tags::SOFTWARE_VERSIONS, VR::LO, software),
        el(
            tags::FRAME_OF_REFERENCE_UID,
            VR::UI,
            frame_of_reference.as_str(),
        ),
        el(
            tags::POSITION_REFERENCE_INDICATOR,
            VR::LO,
            series
                .position_reference_indicator
                .clone()
                .unwrap_or_default(),
        ),
        el(
            tags::IMAGE_TYPE,
            VR::CS,
            dicom_value!(Strs, ["DERIVED", "PRIMARY"]),
        ),
        el(tags::CONTENT_LABEL, VR::CS, "VISTA3D"),
        el(
            tags::CONTENT_DESCRIPTION,
            VR::LO,
            "vista3d segmentation, research use only",
        ),
        DataElement::new(tags::CONTENT_CREATOR_NAME, VR::PN, PrimitiveValue::Empty),
        el(tags::SAMPLES_PER_PIXEL, VR::US, 1u16),
        el(tags::PHOTOMETRIC_INTERPRETATION, VR::CS, "MONOCHROME2"),
        el(tags::ROWS, VR::US, rows as u16),
        el(tags::COLUMNS, VR::US, cols as u16),
        el(tags::BITS_ALLOCATED, VR::US, bits_allocated),
        el(tags::BITS_STORED, VR::US, bits_allocated),
        el(tags::HIGH_BIT, VR::US, bits_allocated - 1),
        el(tags::PIXEL_REPRESENTATION, VR::US, 0u16),
        el(tags::LOSSY_IMAGE_COMPRESSION, VR::CS, "00"),
        el(tags::SEGMENTATION_TYPE, VR::CS, segmentation_type),
    ] {
        ds_obj.put(e);
    }
    if rows > u16::MAX as usize || cols > u16::MAX as usize {
        return Err(err(format!(
            "{rows} x {cols} slices do not fit a DICOM image"
        )));
    }

    // Segments.
    let mut segment_items = Vec::new();
    for (number, &id) in present.keys().enumerate() {
        let name = classes
            .name(id)
            .map(str::to_string)
            .unwrap_or_else(|| format!("class {id}"));
        let codes = table
            .get(&id)
            .cloned()
            .unwrap_or_else(|| SegmentCodes::generic(&name));
        let mut type_item = code_item(&codes.property_type);
        if let Some(m) = &codes.modifier {
            type_item.put(seq(
                tags::SEGMENTED_PROPERTY_TYPE_MODIFIER_CODE_SEQUENCE,
                vec![code_item(m)],
            ));
        }
        let mut item = obj(vec![
            el(tags::SEGMENT_NUMBER, VR::US, (number + 1) as u16),
            el(tags::SEGMENT_LABEL, VR::LO, truncate(&name, 64)),
            el(
                tags::SEGMENT_DESCRIPTION,
                VR::ST,
                format!("vista3d class {id}: {name}"),
            ),
            el(tags::SEGMENT_ALGORITHM_TYPE, VR::CS, "AUTOMATIC"),
            el(
                tags::SEGMENT_ALGORITHM_NAME,
                VR::LO,
                options.algorithm_name.as_str(),
            ),
            seq(
                tags::SEGMENTED_PROPERTY_CATEGORY_CODE_SEQUENCE,
                vec![code_item(&codes.category)],
            ),
            seq(tags::SEGMENTED_PROPERTY_TYPE_CODE_SEQUENCE, vec![type_item]),
        ]);
        if let Some(r) = &codes.region {
            let mut region = code_item(r);
            if let Some(m) = &codes.region_modifier {
                region.put(seq(
                    tags::ANATOMIC_REGION_MODIFIER_SEQUENCE,
                    vec![code_item(m)],
                ));
            }
            item.put(seq(tags::ANATOMIC_REGION_SEQUENCE, vec![region]));
        }
        segment_items.push(item);
    }
    if segment_items.len() > u16::MAX as usize {
        return Err(err("more than 65535 segments".into()));
    }
    ds_obj.put(seq(tags::SEGMENT_SEQUENCE, segment_items));

    // Dimensions: segment number (BINARY only), then image position.
    ds_obj.put(seq(
        tags::DIMENSION_ORGANIZATION_SEQUENCE,
        vec![obj(vec![el(
            tags::DIMENSION_ORGANIZATION_UID,
            VR::UI,
            dimension_uid.as_str(),
        )])],
    ));
    let segment_dimension = obj(vec![
        el(
            tags::DIMENSION_ORGANIZATION_UID,
            VR::UI,
            dimension_uid.as_str(),
        ),
        el(
            tags::DIMENSION_INDEX_POINTER,
            VR::AT,
            tags::REFERENCED_SEGMENT_NUMBER,
        ),
        el(
            tags::FUNCTIONAL_GROUP_POINTER,
            VR::AT,
            tags::SEGMENT_IDENTIFICATION_SEQUENCE,
        ),
        el(
            tags::DIMENSION_DESCRIPTION_LABEL,
            VR::LO,
            "ReferencedSegmentNumber",
        ),
    ]);
    let position_dimension = obj(vec![
        el(
            tags::DIMENSION_ORGANIZATION_UID,
            VR::UI,
            dimension_uid.as_str(),
        ),
        el(
            tags::DIMENSION_INDEX_POINTER,
            VR::AT,
            tags::IMAGE_POSITION_PATIENT,
        ),
        el(
            tags::FUNCTIONAL_GROUP_POINTER,
            VR::AT,
            tags::PLANE_POSITION_SEQUENCE,
        ),
        el(
            tags::DIMENSION_DESCRIPTION_LABEL,
            VR::LO,
            "ImagePositionPatient",
        ),
    ]);
    let dimensions = match options.kind {
        SegmentationKind::Binary => vec![segment_dimension, position_dimension],
        SegmentationKind::Labelmap => vec![position_dimension],
    };
    ds_obj.put(seq(tags::DIMENSION_INDEX_SEQUENCE, dimensions));

    // Shared functional groups: pixel measures and orientation.
    let thickness = series
        .slice_thickness
        .filter(|t| *t > 0.0)
        .unwrap_or(series.slice_spacing);
    ds_obj.put(seq(
        tags::SHARED_FUNCTIONAL_GROUPS_SEQUENCE,
        vec![obj(vec![
            seq(
                tags::PIXEL_MEASURES_SEQUENCE,
                vec![obj(vec![
                    el(tags::PIXEL_SPACING, VR::DS, ds_multi(&series.pixel_spacing)),
                    el(tags::SLICE_THICKNESS, VR::DS, ds(thickness)),
                    el(
                        tags::SPACING_BETWEEN_SLICES,
                        VR::DS,
                        ds(series.slice_spacing),
                    ),
                ])],
            ),
            seq(
                tags::PLANE_ORIENTATION_SEQUENCE,
                vec![obj(vec![el(
                    tags::IMAGE_ORIENTATION_PATIENT,
                    VR::DS,
                    ds_multi(&series.image_orientation),
                )])],
            ),
        ])],
    ));

    // Frames, empty ones omitted. BINARY: segment-major, slices in volume order, bits packed LSB first across
    // frames. LABELMAP: one frame per slice holding any segment, segment numbers as 8- or 16-bit pixels.
    let frame_pixels = rows * cols;
    let mut per_frame = Vec::new();
    let pixel_data = match options.kind {
        SegmentationKind::Binary => {
            let n_frames: usize = present
                .values()
                .map(|s| s.iter().filter(|&&b| b).count())
                .sum();
            let mut bits = vec![0u8; (n_frames * frame_pixels).div_ceil(8).next_multiple_of(2)];
            let mut frame = 0usize;
            for (number, (&id, slices)) in present.iter().enumerate() {
                let value = id as f32;
                for (k, _) in slices.iter().enumerate().filter(|(_, &b)| b) {
                    let base = frame * frame_pixels;
                    for r in 0..rows {
                        let y = rows - 1 - r;
                        for c in 0..cols {
                            if labels[[c, y, k]] == value {
                                let bit = base + r * cols + c;
                                bits[bit / 8] |= 1 << (bit % 8);
                            }
                        }
                    }
                    let segment = (number + 1) as u16;
                    per_frame.push(frame_item(
                        &series.slices[k],
                        &[segment as u32, (k + 1) as u32],
                        Some(segment),
                    ));
                    frame += 1;
                }
            }
            DataElement::new(tags::PIXEL_DATA, VR::OB, PrimitiveValue::from(bits))
        }
        SegmentationKind::Labelmap => {
            let number_of: std::collections::BTreeMap<i64, u16> = present
                .keys()
                .enumerate()
                .map(|(i, &id)| (id, (i + 1) as u16))
                .collect();
            let wide = number_of.len() > 255;
            let mut bytes = Vec::new();
            for k in 0..n {
                if !present.values().any(|s| s[k]) {
                    continue;
                }
                for r in 0..rows {
                    let y = rows - 1 - r;
                    for c in 0..cols {
                        let v = labels[[c, y, k]];
                        let number = if v == 0.0 || v == NOT_COMPUTED {
                            0
                        } else {
                            number_of[&(v as i64)]
                        };
                        if wide {
                            bytes.extend_from_slice(&number.to_le_bytes());
                        } else {
                            bytes.push(number as u8);
                        }
                    }
                }
                per_frame.push(frame_item(&series.slices[k], &[(k + 1) as u32], None));
            }
            if bytes.len() % 2 == 1 {
                bytes.push(0);
            }
            DataElement::new(
                tags::PIXEL_DATA,
                if wide { VR::OW } else { VR::OB },
                PrimitiveValue::from(bytes),
            )
        }
    };
    let n_frames = per_frame.len();
    ds_obj.put(el(tags::NUMBER_OF_FRAMES, VR::IS, n_frames.to_string()));
    ds_obj.put(seq(tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE, per_frame));

    // Common Instance Reference: the source series and its instances.
    let referenced: Vec<InMemDicomObject> = series
        .slices
        .iter()
        .map(|s| {
            obj(vec![
                el(
                    tags::REFERENCED_SOP_CLASS_UID,
                    VR::UI,
                    s.sop_class_uid.as_str(),
                ),
                el(
                    tags::REFERENCED_SOP_INSTANCE_UID,
                    VR::UI,
                    s.sop_instance_uid.as_str(),
                ),
            ])
        })
        .collect();
    ds_obj.put(seq(
        tags::REFERENCED_SERIES_SEQUENCE,
        vec![obj(vec![
            el(
                tags::SERIES_INSTANCE_UID,
                VR::UI,
                series.series_instance_uid.as_str(),
            ),
            seq(tags::REFERENCED_INSTANCE_SEQUENCE, referenced),
        ])],
    ));
    ds_obj.put(pixel_data);

    let file = ds_obj
        .with_meta(
            FileMetaTableBuilder::new()
                .transfer_syntax(uids::EXPLICIT_VR_LITTLE_ENDIAN)
                .implementation_class_uid(IMPLEMENTATION_CLASS_UID)
                .implementation_version_name(format!("VISTA3D_{software}")),
        )
        .map_err(|e| err(format!("cannot build the file meta group: {e}")))?;
    crate::fsutil::write_atomic_with(path, |w| {
        file.write_all(&mut *w)
            .map_err(|e| anyhow::anyhow!("cannot encode the DICOM data set: {e}"))
    })
    .map_err(|e| err(format!("{e:#}")))
}

/// The per-frame functional groups of a frame on `source`: derivation (source image, spatial locations
/// preserved), dimension index values, plane position and, for BINARY, the segment.
fn frame_item(source: &super::SliceRef, index: &[u32], segment: Option<u16>) -> InMemDicomObject {
    let mut item = obj(vec![
        seq(
            tags::DERIVATION_IMAGE_SEQUENCE,
            vec![obj(vec![
                seq(
                    tags::SOURCE_IMAGE_SEQUENCE,
                    vec![obj(vec![
                        el(
                            tags::REFERENCED_SOP_CLASS_UID,
                            VR::UI,
                            source.sop_class_uid.as_str(),
                        ),
                        el(
                            tags::REFERENCED_SOP_INSTANCE_UID,
                            VR::UI,
                            source.sop_instance_uid.as_str(),
                        ),
                        el(tags::SPATIAL_LOCATIONS_PRESERVED, VR::CS, "YES"),
                        seq(
                            tags::PURPOSE_OF_REFERENCE_CODE_SEQUENCE,
                            vec![dcm_code(
                                "121322",
                                "Source image for image processing operation",
                            )],
                        ),
                    ])],
                ),
                seq(
                    tags::DERIVATION_CODE_SEQUENCE,
                    vec![dcm_code("113076", "Segmentation")],
                ),
            ])],
        ),
        seq(
            tags::FRAME_CONTENT_SEQUENCE,
            vec![obj(vec![el(
                tags::DIMENSION_INDEX_VALUES,
                VR::UL,
                PrimitiveValue::U32(index.iter().copied().collect()),
            )])],
        ),
        seq(
            tags::PLANE_POSITION_SEQUENCE,
            vec![obj(vec![el(
                tags::IMAGE_POSITION_PATIENT,
                VR::DS,
                ds_multi(&source.position),
            )])],
        ),
    ]);
    if let Some(number) = segment {
        item.put(seq(
            tags::SEGMENT_IDENTIFICATION_SEQUENCE,
            vec![obj(vec![el(
                tags::REFERENCED_SEGMENT_NUMBER,
                VR::US,
                number,
            )])],
        ));
    }
    item
}

fn truncate(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal_strings_fit_16_characters() {
        assert_eq!(ds(0.9765625), "0.9765625");
        assert_eq!(ds(-249.51171875), "-249.51171875");
        let third = 1.0 / 3.0 - 0.5;
        let long = ds(third);
        assert!(long.len() <= 16, "{long}");
        assert!((long.parse::<f64>().unwrap() - third).abs() < 1e-12);
        assert!(ds(1.0e-20).len() <= 16);
    }

    #[test]
    fn new_uids_are_valid_dicom_uids() {
        let u = new_uid();
        assert!(u.starts_with("2.25.") && u.len() <= 64);
        assert!(u[5..].chars().all(|c| c.is_ascii_digit()) && !u[5..].starts_with('0'));
        assert_ne!(u, new_uid());
    }
}
