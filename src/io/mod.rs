//! Image input/output: what turns files into [`crate::volume::Volume`]s and label maps back into files.
//!
//! [`dicom`] reads a DICOM CT series into a volume (dcm2niix's geometry) and writes DICOM SEG objects.
//!
//! [`nifti`] reads and writes NIfTI-1 / NIfTI-2 (`.nii`, `.nii.gz`) the way the MONAI bundle's `LoadImage` sees
//! them through nibabel. It is our own reader/writer rather than the `nifti` crate, whose gaps matter here
//! (see `shared/reference/BUILD.md`): its qform affine is off by up to 5e-4 when the quaternion's `a` is near 0
//! and panics on negative pixdim or an invalid qfac, its integer reads apply scaling and truncate, its writer
//! takes the datatype from the array and cannot be told to keep the input geometry exactly, and it uses
//! ndarray 0.17 while the rest of the project (tch) is on 0.16.

pub mod dicom;
pub mod nifti;
mod nifti_header;

pub use nifti::{read_nifti, write_nifti, NiftiImage, OutputDtype};
pub use nifti_header::{Endianness, NiftiExtension, NiftiHeader, NiftiVersion};

use std::path::Path;

/// An input image: its voxels with their geometry, the NIfTI header outputs are written with (so a label map
/// keeps the input's geometry exactly), and for a DICOM series what a DICOM SEG must reference.
#[derive(Debug, Clone)]
pub struct InputImage {
    pub volume: crate::volume::Volume,
    pub header: NiftiHeader,
    /// The source series (DICOM inputs only).
    pub dicom: Option<Box<dicom::SeriesInfo>>,
}

/// True for a path that names a NIfTI file (`.nii`, `.nii.gz`, any case).
pub fn is_nifti_path(path: &Path) -> bool {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    name.ends_with(".nii") || name.ends_with(".nii.gz")
}

/// Reads an input image: a NIfTI file, or a DICOM series (a folder searched recursively, a `.zip`, or one DICOM
/// file) chosen and checked by `dicom`. Errors name the file and the problem.
pub fn read_image(path: &Path, dicom: &dicom::DicomOptions) -> anyhow::Result<InputImage> {
    if !is_nifti_path(path) && dicom::is_dicom_input(path) {
        let d = dicom::read_series(path, dicom)?;
        return Ok(InputImage {
            volume: d.volume,
            header: d.header,
            dicom: Some(Box::new(d.series)),
        });
    }
    let img = read_nifti(path)?;
    Ok(InputImage {
        volume: img.volume,
        header: img.header,
        dicom: None,
    })
}
