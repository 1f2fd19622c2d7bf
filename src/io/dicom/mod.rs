//! DICOM in, DICOM SEG out: a CT series (a folder searched recursively, a `.zip` of one, or a single file) read
//! into a [`Volume`] with the geometry dcm2niix gives, and a label map written back as a DICOM Segmentation
//! object that references the source slices. All parsing and pixel decoding is dicom-rs (`dicom-object`,
//! `dicom-pixeldata`); nothing here reads DICOM bytes by hand.
//!
//! # Call sequence
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! use std::path::Path;
//! use vista3d::io::dicom::{is_dicom_input, read_series, write_seg, DicomOptions, SegOptions};
//! use vista3d::io::{write_nifti, OutputDtype};
//! use vista3d::prompts::LabelTable;
//!
//! let input = Path::new("study/CT_series");              // a folder, a .zip, or one .dcm file
//! assert!(is_dicom_input(input));
//! let dicom = read_series(input, &DicomOptions::default())?; // refuses gaps, tilt, MR, ... (DicomError)
//! let volume = &dicom.volume;                              // f32 HU, [x, y, z], RAS affine (dcm2niix's)
//! # let labels = volume.data.clone();
//! // ... segment `volume` into `labels` (same shape and grid) ...
//! write_nifti(Path::new("out/seg.nii.gz"), &labels, &dicom.header, OutputDtype::Uint8)?;
//! write_seg(Path::new("out/seg.dcm"), &labels, &dicom.series, &LabelTable::bundle(), &SegOptions::default())?;
//! # Ok(()) }
//! ```
//!
//! # Geometry (what dcm2niix and ITK do)
//!
//! Slices are sorted by `ImagePositionPatient` projected on the slice normal (`row x column` of
//! `ImageOrientationPatient`), never by `InstanceNumber`; the slice step is `(last - first) / (n - 1)` of the
//! positions (never `SliceThickness`; a single slice uses `SpacingBetweenSlices`, else `SliceThickness`). The
//! LPS voxel-to-patient matrix becomes RAS by negating its first two rows, and rows are flipped as dcm2niix
//! flips them (NIfTI's `j` runs from the last DICOM row to the first), so the [`Volume`] and its affine equal
//! what nibabel reads from dcm2niix's NIfTI of the same series. Voxels are `stored * RescaleSlope +
//! RescaleIntercept` per slice, with signed/unsigned data and `BitsStored` honoured (values sign-extended or
//! masked to the stored bits). MONOCHROME1 is read as stored, without inversion (CT is MONOCHROME2).
//!
//! # Transfer syntaxes
//!
//! Decoded in the default build: implicit and explicit VR little endian, deflated explicit VR little endian, RLE
//! lossless, JPEG baseline / extended / lossless (processes 1, 2-4, 14 and 14 SV1; `jpeg-decoder`), JPEG 2000
//! lossless and lossy (Parts 1 and 2; `openjp2`, the pure-Rust port of OpenJPEG). JPEG-LS needs
//! CharLS, a C++ library built with CMake, so it is behind the `jpegls` cargo feature (checked here: it builds
//! and decodes losslessly with CMake installed); without it a JPEG-LS file is refused with a message saying so.
//! Not read: JPEG XL, video syntaxes, and the retired Explicit VR Big Endian (refused by name).
//!
//! # Refusals
//!
//! Missing or duplicate slices (a gap more than `slice_spacing_tolerance` off the median step), mixed
//! orientations or sizes, gantry tilt (positions drifting off the slice normal: tilted series are refused, not
//! resampled), a modality other than CT unless listed in `allow_modalities`, multi-frame or colour images,
//! unreadable, truncated or corrupt files, and inputs with no image series: each is a [`DicomError`] naming
//! the file and the problem.

mod codes;
mod seg;
mod series;
mod source;

use std::path::Path;

pub use codes::{CodedConcept, SegmentCodes};
pub use seg::{write_seg, SegOptions, SegmentationKind};
pub use series::{read_series, scan_series, SeriesInfo, SeriesSummary, SliceRef};

use crate::io::NiftiHeader;
use crate::volume::Volume;

/// Errors of reading a DICOM series or writing a DICOM SEG. Each names the file (a zip member as
/// `archive.zip!member`) and the problem.
#[derive(Debug, thiserror::Error)]
pub enum DicomError {
    /// The input or one of its files cannot be opened or read.
    #[error("cannot read {path}: {reason}")]
    Io { path: String, reason: String },
    /// A file that should be DICOM is not (no `DICM` marker).
    #[error("{path} is not a DICOM file: {reason}")]
    NotDicom { path: String, reason: String },
    /// A DICOM file that cannot be parsed or decoded (corrupt or truncated).
    #[error("{path} is corrupt or truncated: {reason}")]
    Corrupt { path: String, reason: String },
    /// The zip archive cannot be read.
    #[error("cannot read the zip archive {path}: {reason}")]
    Zip { path: String, reason: String },
    /// No image series in the input.
    #[error("no DICOM image series in {path}: {detail}")]
    NoSeries { path: String, detail: String },
    /// `series_uid` names no series of the input.
    #[error("no series with SeriesInstanceUID {uid} in {path}; series found: {available}")]
    SeriesNotFound {
        path: String,
        uid: String,
        available: String,
    },
    /// The series is not CT and its modality is not allowed.
    #[error("{path}: modality {modality} is not CT; vista3d segments CT (allow it explicitly with --allow-modality {modality} if you know what you are doing)")]
    Modality { path: String, modality: String },
    /// A required attribute is missing or unreadable.
    #[error("{path}: {attribute} is missing or invalid ({reason})")]
    MissingAttribute {
        path: String,
        attribute: &'static str,
        reason: String,
    },
    /// Slices of one series differ in orientation.
    #[error("mixed orientations in one series: {first} has ImageOrientationPatient {a}, {other} has {b}")]
    MixedOrientation {
        first: String,
        other: String,
        a: String,
        b: String,
    },
    /// Slices of one series differ in size or pixel spacing.
    #[error("mixed slice sizes in one series: {first} is {a}, {other} is {b}")]
    MixedSize {
        first: String,
        other: String,
        a: String,
        b: String,
    },
    /// Two slices at the same position.
    #[error("duplicate slice position {position:?} (mm along the normal: {along:.4}): {first} and {other}{note}")]
    DuplicatePosition {
        first: String,
        other: String,
        position: [f64; 3],
        along: f64,
        note: String,
    },
    /// Missing slices or irregular slice spacing.
    #[error("{problem} between {before} and {after}: they are {gap:.4} mm apart, the series' step is {step:.4} mm (tolerance {tolerance:.0}%)")]
    Gap {
        problem: String,
        before: String,
        after: String,
        gap: f64,
        step: f64,
        tolerance: f64,
    },
    /// Gantry tilt: slice positions drift off the slice normal (the grid is sheared).
    #[error("{path}: gantry tilt{tilt}: slice positions drift {shear:.3} mm off the slice normal over the series; vista3d does not resample tilted series (refused; resample it first, e.g. dcm2niix corrects tilt)")]
    GantryTilt {
        path: String,
        tilt: String,
        shear: f64,
    },
    /// Something dicom-rs or this reader does not handle (multi-frame, colour, a transfer syntax).
    #[error("{path}: {what}")]
    Unsupported { path: String, what: String },
    /// The label map does not fit the series, or holds no segment.
    #[error("cannot write the DICOM SEG {path}: {reason}")]
    Seg { path: String, reason: String },
}

/// How a series is chosen and checked.
#[derive(Debug, Clone)]
pub struct DicomOptions {
    /// Read this SeriesInstanceUID; otherwise the CT series with the most slices.
    pub series_uid: Option<String>,
    /// Modalities accepted besides CT (e.g. `["MR"]`), case-insensitive.
    pub allow_modalities: Vec<String>,
    /// Largest relative deviation of a slice step from the series' median step (0.05: 5%); beyond it the
    /// series is refused as having missing slices or irregular spacing.
    pub slice_spacing_tolerance: f64,
}

impl Default for DicomOptions {
    fn default() -> Self {
        Self {
            series_uid: None,
            allow_modalities: Vec::new(),
            slice_spacing_tolerance: 0.05,
        }
    }
}

/// A series read from DICOM: the volume, a NIfTI header with its geometry for writing outputs, and what the
/// SEG writer needs to reference it.
#[derive(Debug, Clone)]
pub struct DicomVolume {
    /// Voxels (`f32`, rescaled) indexed `[x, y, z]` with the RAS affine dcm2niix's NIfTI has.
    pub volume: Volume,
    /// NIfTI-1 header with that affine as sform and qform (code 1, scanner), millimetres: pass it to
    /// [`crate::io::write_nifti`] as the reference of label maps on this grid.
    pub header: NiftiHeader,
    /// Series metadata, slices in volume order (`z` index).
    pub series: SeriesInfo,
}

/// Whether `path` is a DICOM input: a folder, a `.zip`, or a file with the DICOM `DICM` marker.
pub fn is_dicom_input(path: &Path) -> bool {
    source::is_dicom_input(path)
}
