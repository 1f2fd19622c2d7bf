//! Series: headers grouped by SeriesInstanceUID, one series chosen, its geometry checked and turned into the
//! affine dcm2niix writes, and its pixels decoded into a [`Volume`].

use std::collections::BTreeMap;
use std::path::Path;

use dicom_core::Tag;
use dicom_dictionary_std::tags;
use dicom_encoding::TransferSyntaxIndex;
use dicom_object::mem::InMemElement;
use dicom_object::DefaultDicomObject;
use dicom_pixeldata::PixelDecoder;
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;
use ndarray::Array3;
use rayon::prelude::*;
use sha2::{Digest, Sha256};

use super::source::{self, Location};
use super::{DicomError, DicomOptions, DicomVolume};
use crate::io::NiftiHeader;
use crate::volume::{Affine, Volume};

/// Explicit VR Big Endian: retired; dicom-pixeldata would hand its pixels over unswapped, so it is refused.
const EXPLICIT_VR_BIG_ENDIAN: &str = "1.2.840.10008.1.2.2";
/// Orientation cosines of two slices differing by more than this are "mixed orientations".
const ORIENTATION_TOLERANCE: f64 = 1e-3;
/// Two slices closer than this along the normal (mm) are at the same position.
const DUPLICATE_DISTANCE_MM: f64 = 1e-3;
/// Positions drifting off the normal by more than this fraction of the in-plane pixel spacing are a tilt.
const SHEAR_TOLERANCE_PIXELS: f64 = 0.01;

/// Attributes of the Patient, General Study and Patient Study modules copied into a SEG.
pub(crate) const COPIED_TAGS: [Tag; 18] = [
    tags::PATIENT_NAME,
    tags::PATIENT_ID,
    tags::ISSUER_OF_PATIENT_ID,
    tags::PATIENT_BIRTH_DATE,
    tags::PATIENT_SEX,
    tags::PATIENT_AGE,
    tags::PATIENT_SIZE,
    tags::PATIENT_WEIGHT,
    tags::PATIENT_IDENTITY_REMOVED,
    tags::DEIDENTIFICATION_METHOD,
    tags::STUDY_DATE,
    tags::STUDY_TIME,
    tags::REFERRING_PHYSICIAN_NAME,
    tags::STUDY_ID,
    tags::ACCESSION_NUMBER,
    tags::STUDY_DESCRIPTION,
    tags::CLINICAL_TRIAL_SPONSOR_NAME,
    tags::CLINICAL_TRIAL_PROTOCOL_ID,
];

/// One source slice of a series, in volume order.
#[derive(Debug, Clone, PartialEq)]
pub struct SliceRef {
    /// SOPClassUID (from the data set, else the file meta group).
    pub sop_class_uid: String,
    /// SOPInstanceUID (from the data set, else the file meta group).
    pub sop_instance_uid: String,
    /// ImagePositionPatient (LPS, mm).
    pub position: [f64; 3],
    /// Where the slice was read from (a path, or `archive.zip!member`).
    pub source: String,
}

/// What a series is, for listings and logs.
#[derive(Debug, Clone, PartialEq)]
pub struct SeriesSummary {
    /// SeriesInstanceUID (a `2.25.` UID derived from the instance UIDs when the files have none).
    pub series_instance_uid: String,
    /// Modality (`CT`, `MR`, ...; empty when absent).
    pub modality: String,
    /// Number of image files.
    pub slices: usize,
    /// SeriesDescription.
    pub description: Option<String>,
    /// The first file of the series (in path order).
    pub first_file: String,
}

impl std::fmt::Display for SeriesSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ({}, {} slice{}{})",
            self.series_instance_uid,
            if self.modality.is_empty() {
                "no modality"
            } else {
                &self.modality
            },
            self.slices,
            if self.slices == 1 { "" } else { "s" },
            self.description
                .as_deref()
                .map(|d| format!(", \"{d}\""))
                .unwrap_or_default()
        )
    }
}

/// The metadata of a series read by [`read_series`], as the SEG writer needs it.
#[derive(Debug, Clone)]
pub struct SeriesInfo {
    /// SeriesInstanceUID of the source.
    pub series_instance_uid: String,
    /// True when the files had no SeriesInstanceUID and [`Self::series_instance_uid`] was derived from their
    /// SOP instance UIDs (`2.25.` + 128 bits of their SHA-256).
    pub series_uid_synthesized: bool,
    /// StudyInstanceUID (None when absent or empty).
    pub study_instance_uid: Option<String>,
    /// FrameOfReferenceUID (None when absent or empty).
    pub frame_of_reference_uid: Option<String>,
    /// PositionReferenceIndicator.
    pub position_reference_indicator: Option<String>,
    /// Modality of the source.
    pub modality: String,
    /// SeriesDescription of the source.
    pub series_description: Option<String>,
    /// SeriesNumber of the source.
    pub series_number: Option<i64>,
    /// Rows of each slice.
    pub rows: usize,
    /// Columns of each slice.
    pub columns: usize,
    /// PixelSpacing: between rows, between columns (mm).
    pub pixel_spacing: [f64; 2],
    /// ImageOrientationPatient: row cosines then column cosines (LPS).
    pub image_orientation: [f64; 6],
    /// SliceThickness of the first slice, if given.
    pub slice_thickness: Option<f64>,
    /// Distance between consecutive slices along the normal (mm), from the positions.
    pub slice_spacing: f64,
    /// The slices in volume order: `slices[z]` is the slice at index `z` of the volume.
    pub slices: Vec<SliceRef>,
    /// Transfer syntax UIDs met in the series.
    pub transfer_syntaxes: Vec<String>,
    /// The other series of the input, not read.
    pub other_series: Vec<SeriesSummary>,
    /// Patient and study attributes of the first slice, copied into a SEG.
    pub(crate) copied: Vec<InMemElement>,
}

/// What is read from each file before choosing a series.
struct Header {
    loc: Location,
    obj: DefaultDicomObject,
    sop_class_uid: String,
    sop_instance_uid: String,
    series_uid: Option<String>,
    modality: String,
    is_image: bool,
}

/// Trimmed string of an attribute; None when absent, empty or not a string.
pub(crate) fn text(obj: &DefaultDicomObject, tag: Tag) -> Option<String> {
    let e = obj.element_opt(tag).ok().flatten()?;
    let s = e.to_str().ok()?;
    let t = s.trim_matches(|c: char| c == '\0' || c.is_whitespace());
    (!t.is_empty()).then(|| t.to_string())
}

fn floats(obj: &DefaultDicomObject, tag: Tag) -> Option<Vec<f64>> {
    let e = obj.element_opt(tag).ok().flatten()?;
    e.to_multi_float64().ok()
}

fn float(obj: &DefaultDicomObject, tag: Tag) -> Option<f64> {
    floats(obj, tag).and_then(|v| v.first().copied())
}

fn int(obj: &DefaultDicomObject, tag: Tag) -> Option<i64> {
    let e = obj.element_opt(tag).ok().flatten()?;
    e.to_int::<i64>().ok()
}

fn read_header(loc: Location) -> Result<Header, DicomError> {
    let obj = source::open(&loc, false)?;
    let meta = obj.meta();
    let sop_class_uid = text(&obj, tags::SOP_CLASS_UID).unwrap_or_else(|| {
        meta.media_storage_sop_class_uid()
            .trim_end_matches('\0')
            .trim()
            .to_string()
    });
    let sop_instance_uid = text(&obj, tags::SOP_INSTANCE_UID).unwrap_or_else(|| {
        meta.media_storage_sop_instance_uid()
            .trim_end_matches('\0')
            .trim()
            .to_string()
    });
    let series_uid = text(&obj, tags::SERIES_INSTANCE_UID);
    let modality = text(&obj, tags::MODALITY)
        .unwrap_or_default()
        .to_uppercase();
    let is_image = obj.element_opt(tags::ROWS).ok().flatten().is_some()
        && obj.element_opt(tags::COLUMNS).ok().flatten().is_some();
    Ok(Header {
        loc,
        obj,
        sop_class_uid,
        sop_instance_uid,
        series_uid,
        modality,
        is_image,
    })
}

/// `2.25.` + the first 128 bits of the SHA-256 of the sorted instance UIDs, as a decimal integer.
fn synthesized_uid(instance_uids: &[&str]) -> String {
    let mut sorted: Vec<&str> = instance_uids.to_vec();
    sorted.sort_unstable();
    let mut h = Sha256::new();
    for u in sorted {
        h.update(u.as_bytes());
        h.update([0u8]);
    }
    let digest = h.finalize();
    let mut b = [0u8; 16];
    b.copy_from_slice(&digest[..16]);
    format!("2.25.{}", u128::from_be_bytes(b))
}

/// The files of `path` grouped into series (BTreeMap by UID), image files only, plus the non-image files.
fn group(path: &Path) -> Result<(BTreeMap<String, Vec<Header>>, usize), DicomError> {
    let listing = source::list(path)?;
    if !listing.skipped.is_empty() {
        log::debug!(
            "{}: {} non-DICOM file(s) skipped: {}",
            path.display(),
            listing.skipped.len(),
            listing.skipped.join(", ")
        );
    }
    let headers: Vec<Header> = listing
        .files
        .into_par_iter()
        .map(read_header)
        .collect::<Result<_, _>>()?;
    let mut non_image = 0;
    let mut groups: BTreeMap<Option<String>, Vec<Header>> = BTreeMap::new();
    for h in headers {
        if h.is_image {
            groups.entry(h.series_uid.clone()).or_default().push(h);
        } else {
            non_image += 1;
        }
    }
    let mut out = BTreeMap::new();
    for (uid, hs) in groups {
        let uid = match uid {
            Some(u) => u,
            None => {
                let uids: Vec<&str> = hs.iter().map(|h| h.sop_instance_uid.as_str()).collect();
                synthesized_uid(&uids)
            }
        };
        out.entry(uid).or_insert_with(Vec::new).extend(hs);
    }
    Ok((out, non_image))
}

fn summary(uid: &str, hs: &[Header]) -> SeriesSummary {
    SeriesSummary {
        series_instance_uid: uid.to_string(),
        modality: hs[0].modality.clone(),
        slices: hs.len(),
        description: text(&hs[0].obj, tags::SERIES_DESCRIPTION),
        first_file: hs[0].loc.to_string(),
    }
}

/// The image series of a folder, zip or file, without reading pixels (for batch listings): largest first.
pub fn scan_series(path: &Path) -> Result<Vec<SeriesSummary>, DicomError> {
    let (groups, _) = group(path)?;
    let mut out: Vec<SeriesSummary> = groups.iter().map(|(u, hs)| summary(u, hs)).collect();
    out.sort_by(|a, b| {
        b.slices
            .cmp(&a.slices)
            .then(a.series_instance_uid.cmp(&b.series_instance_uid))
    });
    Ok(out)
}

/// Reads a DICOM series (a folder searched recursively, a `.zip`, or one file) into a volume with dcm2niix's
/// geometry; see the module documentation for the rules and refusals.
pub fn read_series(path: &Path, options: &DicomOptions) -> Result<DicomVolume, DicomError> {
    let (mut groups, non_image) = group(path)?;
    let display = path.display().to_string();
    if groups.is_empty() {
        return Err(DicomError::NoSeries {
            path: display,
            detail: if non_image > 0 {
                format!("{non_image} DICOM file(s) without images (no Rows/Columns)")
            } else {
                "no DICOM files".into()
            },
        });
    }
    let allowed = |m: &str| {
        m == "CT"
            || options
                .allow_modalities
                .iter()
                .any(|a| a.eq_ignore_ascii_case(m))
    };
    let chosen_uid = match &options.series_uid {
        Some(uid) => {
            if !groups.contains_key(uid) {
                let available: Vec<String> = groups
                    .iter()
                    .map(|(u, hs)| summary(u, hs).to_string())
                    .collect();
                return Err(DicomError::SeriesNotFound {
                    path: display,
                    uid: uid.clone(),
                    available: available.join("; "),
                });
            }
            uid.clone()
        }
        None => {
            let best = groups
                .iter()
                .filter(|(_, hs)| allowed(&hs[0].modality))
                .max_by(|(ua, a), (ub, b)| a.len().cmp(&b.len()).then(ub.cmp(ua)))
                .map(|(u, _)| u.clone());
            match best {
                Some(u) => u,
                None => {
                    let (_, hs) =
                        groups
                            .iter()
                            .max_by_key(|(_, hs)| hs.len())
                            .ok_or_else(|| DicomError::NoSeries {
                                path: display.clone(),
                                detail: "no image series".into(),
                            })?;
                    return Err(DicomError::Modality {
                        path: hs[0].loc.to_string(),
                        modality: if hs[0].modality.is_empty() {
                            "(none)".into()
                        } else {
                            hs[0].modality.clone()
                        },
                    });
                }
            }
        }
    };
    let headers = groups.remove(&chosen_uid).unwrap_or_default();
    let other_series: Vec<SeriesSummary> = groups.iter().map(|(u, hs)| summary(u, hs)).collect();
    let chosen = summary(&chosen_uid, &headers);
    if other_series.is_empty() {
        log::info!("{display}: reading series {chosen}");
    } else {
        let others: Vec<String> = other_series.iter().map(|s| s.to_string()).collect();
        log::info!(
            "{display}: {} series; reading {chosen}; not read: {}",
            other_series.len() + 1,
            others.join("; ")
        );
    }
    for h in &headers {
        if !allowed(&h.modality) {
            return Err(DicomError::Modality {
                path: h.loc.to_string(),
                modality: if h.modality.is_empty() {
                    "(none)".into()
                } else {
                    h.modality.clone()
                },
            });
        }
    }
    let series_uid_synthesized = headers[0].series_uid.is_none();
    if series_uid_synthesized {
        log::warn!(
            "{display}: the files have no SeriesInstanceUID; series named {chosen_uid} (derived from their SOP instance UIDs)"
        );
    }
    build(
        headers,
        chosen_uid,
        series_uid_synthesized,
        other_series,
        options,
    )
}

/// Geometry of one slice, checked.
struct Slice {
    header: Header,
    position: [f64; 3],
    along: f64,
}

fn cross(a: [f64; 3], b: [f64; 3]) -> [f64; 3] {
    [
        a[1] * b[2] - a[2] * b[1],
        a[2] * b[0] - a[0] * b[2],
        a[0] * b[1] - a[1] * b[0],
    ]
}

fn dot(a: [f64; 3], b: [f64; 3]) -> f64 {
    a[0] * b[0] + a[1] * b[1] + a[2] * b[2]
}

fn required(h: &Header, tag: Tag, name: &'static str, n: usize) -> Result<Vec<f64>, DicomError> {
    let v = floats(&h.obj, tag).ok_or_else(|| DicomError::MissingAttribute {
        path: h.loc.to_string(),
        attribute: name,
        reason: "absent or not numeric".into(),
    })?;
    if v.len() < n || v.iter().take(n).any(|x| !x.is_finite()) {
        return Err(DicomError::MissingAttribute {
            path: h.loc.to_string(),
            attribute: name,
            reason: format!("expected {n} finite numbers, found {v:?}"),
        });
    }
    Ok(v[..n].to_vec())
}

fn build(
    headers: Vec<Header>,
    series_uid: String,
    series_uid_synthesized: bool,
    other_series: Vec<SeriesSummary>,
    options: &DicomOptions,
) -> Result<DicomVolume, DicomError> {
    // Per-file checks: single frame, one sample, geometry attributes present and consistent.
    let first = &headers[0];
    let iop0 = required(
        first,
        tags::IMAGE_ORIENTATION_PATIENT,
        "ImageOrientationPatient",
        6,
    )?;
    let ps0 = required(first, tags::PIXEL_SPACING, "PixelSpacing", 2)?;
    let size = |h: &Header| -> Result<(i64, i64), DicomError> {
        let r = int(&h.obj, tags::ROWS);
        let c = int(&h.obj, tags::COLUMNS);
        match (r, c) {
            (Some(r), Some(c)) if r > 0 && c > 0 => Ok((r, c)),
            _ => Err(DicomError::MissingAttribute {
                path: h.loc.to_string(),
                attribute: "Rows/Columns",
                reason: format!("{r:?} x {c:?}"),
            }),
        }
    };
    let (rows0, cols0) = size(first)?;
    let describe = |r: i64, c: i64, ps: &[f64]| {
        format!(
            "{r} rows x {c} columns, PixelSpacing {:.6}\\{:.6}",
            ps[0], ps[1]
        )
    };
    let first_loc = first.loc.to_string();
    let mut slices = Vec::with_capacity(headers.len());
    for h in headers {
        if let Some(frames) = int(&h.obj, tags::NUMBER_OF_FRAMES) {
            if frames > 1 {
                return Err(DicomError::Unsupported {
                    path: h.loc.to_string(),
                    what: format!("a multi-frame (enhanced) image of {frames} frames; only single-frame slices are read (convert it to classic single-frame CT first)"),
                });
            }
        }
        if let Some(spp) = int(&h.obj, tags::SAMPLES_PER_PIXEL) {
            if spp != 1 {
                return Err(DicomError::Unsupported {
                    path: h.loc.to_string(),
                    what: format!(
                        "{spp} samples per pixel (colour); only grey-scale images are read"
                    ),
                });
            }
        }
        let iop = required(
            &h,
            tags::IMAGE_ORIENTATION_PATIENT,
            "ImageOrientationPatient",
            6,
        )?;
        if iop
            .iter()
            .zip(&iop0)
            .any(|(a, b)| (a - b).abs() > ORIENTATION_TOLERANCE)
        {
            return Err(DicomError::MixedOrientation {
                first: first_loc.clone(),
                other: h.loc.to_string(),
                a: format!("{iop0:?}"),
                b: format!("{iop:?}"),
            });
        }
        let ps = required(&h, tags::PIXEL_SPACING, "PixelSpacing", 2)?;
        let (r, c) = size(&h)?;
        let ps_differs = ps
            .iter()
            .zip(&ps0)
            .any(|(a, b)| (a - b).abs() > 1e-4 * b.abs().max(1e-6));
        if r != rows0 || c != cols0 || ps_differs {
            return Err(DicomError::MixedSize {
                first: first_loc.clone(),
                other: h.loc.to_string(),
                a: describe(rows0, cols0, &ps0),
                b: describe(r, c, &ps),
            });
        }
        let ipp = required(&h, tags::IMAGE_POSITION_PATIENT, "ImagePositionPatient", 3)?;
        slices.push(Slice {
            position: [ipp[0], ipp[1], ipp[2]],
            along: 0.0,
            header: h,
        });
    }
    let row_dir = [iop0[0], iop0[1], iop0[2]];
    let col_dir = [iop0[3], iop0[4], iop0[5]];
    let normal = cross(row_dir, col_dir);
    let norm = dot(normal, normal).sqrt();
    if !(0.5..=1.5).contains(&norm) {
        return Err(DicomError::MissingAttribute {
            path: slices[0].header.loc.to_string(),
            attribute: "ImageOrientationPatient",
            reason: format!("{iop0:?} are not two unit vectors at a right angle"),
        });
    }
    let normal = normal.map(|x| x / norm);
    for s in &mut slices {
        s.along = dot(s.position, normal);
    }
    slices.sort_by(|a, b| a.along.total_cmp(&b.along));
    let n = slices.len();

    // Duplicates, gaps and tilt.
    for w in slices.windows(2) {
        if w[1].along - w[0].along < DUPLICATE_DISTANCE_MM {
            let same = w[0].header.sop_instance_uid == w[1].header.sop_instance_uid;
            return Err(DicomError::DuplicatePosition {
                first: w[0].header.loc.to_string(),
                other: w[1].header.loc.to_string(),
                position: w[1].position,
                along: w[1].along,
                note: if same {
                    format!(
                        " (the same instance {} twice)",
                        w[0].header.sop_instance_uid
                    )
                } else {
                    String::new()
                },
            });
        }
    }
    let mut steps: Vec<f64> = slices.windows(2).map(|w| w[1].along - w[0].along).collect();
    let slice_spacing;
    if n > 1 {
        let mut sorted = steps.clone();
        sorted.sort_by(f64::total_cmp);
        let median = sorted[sorted.len() / 2];
        let tol = options.slice_spacing_tolerance;
        for (i, step) in steps.drain(..).enumerate() {
            if (step - median).abs() > tol * median {
                let ratio = step / median;
                let problem = if ratio > 1.5 && (ratio - ratio.round()).abs() <= tol * ratio.round()
                {
                    let missing = ratio.round() as i64 - 1;
                    format!(
                        "{missing} missing slice{}",
                        if missing == 1 { "" } else { "s" }
                    )
                } else {
                    "irregular slice spacing".to_string()
                };
                return Err(DicomError::Gap {
                    problem,
                    before: slices[i].header.loc.to_string(),
                    after: slices[i + 1].header.loc.to_string(),
                    gap: step,
                    step: median,
                    tolerance: tol * 100.0,
                });
            }
        }
        let p0 = slices[0].position;
        let min_pixel = ps0[0].min(ps0[1]);
        let mut shear: f64 = 0.0;
        for s in &slices {
            let d: [f64; 3] = std::array::from_fn(|i| s.position[i] - p0[i]);
            let along = dot(d, normal);
            let off: [f64; 3] = std::array::from_fn(|i| d[i] - along * normal[i]);
            shear = shear.max(dot(off, off).sqrt());
        }
        if shear > SHEAR_TOLERANCE_PIXELS * min_pixel {
            let tilt = float(&slices[0].header.obj, tags::GANTRY_DETECTOR_TILT)
                .filter(|t| *t != 0.0)
                .map(|t| format!(" of {t} degrees (GantryDetectorTilt)"))
                .unwrap_or_default();
            return Err(DicomError::GantryTilt {
                path: slices[0].header.loc.to_string(),
                tilt,
                shear,
            });
        }
        slice_spacing = (slices[n - 1].along - slices[0].along) / (n - 1) as f64;
    } else {
        let h = &slices[0].header.obj;
        slice_spacing = float(h, tags::SPACING_BETWEEN_SLICES)
            .filter(|v| v.is_finite() && *v > 0.0)
            .or_else(|| float(h, tags::SLICE_THICKNESS).filter(|v| v.is_finite() && *v > 0.0))
            .unwrap_or(1.0);
    }

    // The affine: LPS voxel (column i, row j, slice k) -> patient, then RAS, then dcm2niix's row flip.
    let (rows, cols) = (rows0 as usize, cols0 as usize);
    let slice_vec: [f64; 3] = if n > 1 {
        std::array::from_fn(|i| {
            (slices[n - 1].position[i] - slices[0].position[i]) / (n - 1) as f64
        })
    } else {
        normal.map(|x| x * slice_spacing)
    };
    let origin = slices[0].position;
    let mut affine: Affine = [[0.0; 4]; 4];
    for r in 0..3 {
        let sign = if r < 2 { -1.0 } else { 1.0 };
        let col_j = col_dir[r] * ps0[0];
        affine[r][0] = sign * row_dir[r] * ps0[1];
        affine[r][1] = -sign * col_j;
        affine[r][2] = sign * slice_vec[r];
        affine[r][3] = sign * (origin[r] + (rows as f64 - 1.0) * col_j);
    }
    affine[3][3] = 1.0;

    // Pixels.
    let planes: Vec<Vec<f32>> = slices
        .par_iter()
        .map(|s| decode_slice(&s.header.loc, rows, cols))
        .collect::<Result<_, _>>()?;
    let mut data = Array3::<f32>::zeros((cols, rows, n));
    for (k, plane) in planes.iter().enumerate() {
        for r in 0..rows {
            let y = rows - 1 - r;
            let line = &plane[r * cols..(r + 1) * cols];
            for (x, v) in line.iter().enumerate() {
                data[[x, y, k]] = *v;
            }
        }
    }

    let h0 = &slices[0].header.obj;
    let mut transfer_syntaxes: Vec<String> = slices
        .iter()
        .map(|s| {
            s.header
                .obj
                .meta()
                .transfer_syntax()
                .trim_end_matches('\0')
                .to_string()
        })
        .collect();
    transfer_syntaxes.sort();
    transfer_syntaxes.dedup();
    let copied = COPIED_TAGS
        .iter()
        .filter_map(|t| h0.element_opt(*t).ok().flatten().cloned())
        .collect();
    let info = SeriesInfo {
        series_instance_uid: series_uid,
        series_uid_synthesized,
        study_instance_uid: text(h0, tags::STUDY_INSTANCE_UID),
        frame_of_reference_uid: text(h0, tags::FRAME_OF_REFERENCE_UID),
        position_reference_indicator: text(h0, tags::POSITION_REFERENCE_INDICATOR),
        modality: slices[0].header.modality.clone(),
        series_description: text(h0, tags::SERIES_DESCRIPTION),
        series_number: int(h0, tags::SERIES_NUMBER),
        rows,
        columns: cols,
        pixel_spacing: [ps0[0], ps0[1]],
        image_orientation: std::array::from_fn(|i| iop0[i]),
        slice_thickness: float(h0, tags::SLICE_THICKNESS),
        slice_spacing,
        slices: slices
            .iter()
            .map(|s| SliceRef {
                sop_class_uid: s.header.sop_class_uid.clone(),
                sop_instance_uid: s.header.sop_instance_uid.clone(),
                position: s.position,
                source: s.header.loc.to_string(),
            })
            .collect(),
        transfer_syntaxes,
        other_series,
        copied,
    };
    let header = NiftiHeader::scanner_from_affine(&affine, [cols, rows, n]);
    Ok(DicomVolume {
        volume: Volume { data, affine },
        header,
        series: info,
    })
}

/// Decodes one slice into `rows * cols` rescaled values, row-major (DICOM order).
fn decode_slice(loc: &Location, rows: usize, cols: usize) -> Result<Vec<f32>, DicomError> {
    let obj = source::open(loc, true)?;
    let ts_uid = obj
        .meta()
        .transfer_syntax()
        .trim_end_matches('\0')
        .to_string();
    if ts_uid == EXPLICIT_VR_BIG_ENDIAN {
        return Err(DicomError::Unsupported {
            path: loc.to_string(),
            what: format!(
                "transfer syntax Explicit VR Big Endian ({ts_uid}, retired in 2004) is not read; convert the file to little endian first (e.g. gdcmconv or dcmconv)"
            ),
        });
    }
    match TransferSyntaxRegistry.get(&ts_uid) {
        None => {
            return Err(DicomError::Unsupported {
                path: loc.to_string(),
                what: format!("unknown transfer syntax {ts_uid}"),
            })
        }
        Some(ts) if !ts.can_decode_all() => {
            return Err(DicomError::Unsupported {
                path: loc.to_string(),
                what: format!(
                    "transfer syntax {} ({ts_uid}) cannot be decoded by this build{}",
                    ts.name(),
                    if ts.name().contains("JPEG-LS") {
                        " (JPEG-LS needs CharLS: build vista3d with `--features jpegls`, which needs CMake)"
                    } else {
                        ""
                    }
                ),
            })
        }
        Some(_) => {}
    }
    if obj.element_opt(tags::PIXEL_DATA).ok().flatten().is_none() {
        return Err(DicomError::Corrupt {
            path: loc.to_string(),
            reason: "no PixelData (the file ends before its pixels)".into(),
        });
    }
    let photometric = text(&obj, tags::PHOTOMETRIC_INTERPRETATION).unwrap_or_default();
    if !photometric.is_empty() && !photometric.starts_with("MONOCHROME") {
        return Err(DicomError::Unsupported {
            path: loc.to_string(),
            what: format!(
                "PhotometricInterpretation {photometric}; only MONOCHROME1/2 images are read"
            ),
        });
    }
    let decoded = obj.decode_pixel_data().map_err(|e| DicomError::Corrupt {
        path: loc.to_string(),
        reason: format!("cannot decode the pixel data ({}): {e}", ts_uid),
    })?;
    let bits_allocated = decoded.bits_allocated() as usize;
    let bits_stored = (decoded.bits_stored() as usize).clamp(1, bits_allocated.max(1));
    let signed = decoded.pixel_representation() == dicom_pixeldata::PixelRepresentation::Signed;
    let n = rows * cols;
    let bytes = decoded.data();
    let width = bits_allocated / 8;
    if !matches!(bits_allocated, 8 | 16 | 32) {
        return Err(DicomError::Unsupported {
            path: loc.to_string(),
            what: format!("BitsAllocated {bits_allocated}; 8, 16 or 32 are read"),
        });
    }
    if bytes.len() < n * width {
        return Err(DicomError::Corrupt {
            path: loc.to_string(),
            reason: format!(
                "pixel data holds {} bytes, {rows} x {cols} pixels of {width} bytes need {}",
                bytes.len(),
                n * width
            ),
        });
    }
    let slope = float(&obj, tags::RESCALE_SLOPE)
        .filter(|v| v.is_finite() && *v != 0.0)
        .unwrap_or(1.0);
    let intercept = float(&obj, tags::RESCALE_INTERCEPT)
        .filter(|v| v.is_finite())
        .unwrap_or(0.0);
    let shift = 64 - bits_stored as u32;
    let mask: u64 = if bits_stored >= 64 {
        u64::MAX
    } else {
        (1u64 << bits_stored) - 1
    };
    let value = |raw: u64| -> f64 {
        if signed {
            (((raw << shift) as i64) >> shift) as f64
        } else {
            (raw & mask) as f64
        }
    };
    let out = (0..n)
        .map(|i| {
            let b = &bytes[i * width..(i + 1) * width];
            let raw = match width {
                1 => b[0] as u64,
                2 => u16::from_le_bytes([b[0], b[1]]) as u64,
                _ => u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as u64,
            };
            (value(raw) * slope + intercept) as f32
        })
        .collect();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthesized_uids_are_valid_and_order_free() {
        let a = synthesized_uid(&["1.2.3", "1.2.4"]);
        let b = synthesized_uid(&["1.2.4", "1.2.3"]);
        assert_eq!(a, b);
        assert!(a.starts_with("2.25.") && a.len() <= 64);
        assert!(a[5..].chars().all(|c| c.is_ascii_digit()));
        assert_ne!(a, synthesized_uid(&["1.2.3"]));
    }
}
