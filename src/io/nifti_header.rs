//! The NIfTI-1 / NIfTI-2 header: every field, parsing and serialising in either byte order, and nibabel's rules
//! for turning it into a data shape, a scaling and an affine.
//!
//! nibabel runs `check_fix` on every header it loads; the fixes that change what `img.affine` and
//! `img.dataobj` are (invalid xform codes count as 0, pixdim[1..4] zero -> 1 and negative -> absolute value,
//! qfac other than +-1 -> 1) are applied here when an affine is computed, not to the stored fields, which stay
//! exactly as read.

use anyhow::{bail, ensure, Result};

use crate::volume::{Affine, IDENTITY};

/// Which NIfTI format a header is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NiftiVersion {
    /// NIfTI-1: 348-byte header, magic `n+1`, 32-bit fields.
    Nifti1,
    /// NIfTI-2: 540-byte header, magic `n+2`, 64-bit dims and doubles.
    Nifti2,
}

impl NiftiVersion {
    /// 1 or 2.
    pub fn number(self) -> u8 {
        match self {
            NiftiVersion::Nifti1 => 1,
            NiftiVersion::Nifti2 => 2,
        }
    }

    /// `sizeof_hdr`: 348 or 540.
    pub fn header_size(self) -> usize {
        match self {
            NiftiVersion::Nifti1 => 348,
            NiftiVersion::Nifti2 => 540,
        }
    }

    /// The smallest `vox_offset` of a single file: the header plus the 4-byte extension flag (352 or 544).
    pub fn min_vox_offset(self) -> usize {
        self.header_size() + 4
    }
}

/// Byte order of a file's header and voxel data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endianness {
    /// Least significant byte first.
    Little,
    /// Most significant byte first.
    Big,
}

/// One header extension (`esize`, `ecode`, content) as stored after the header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NiftiExtension {
    /// Extension code (`ecode`), e.g. 6 for a comment, 4 for AFNI.
    pub code: i32,
    /// The content (`esize - 8` bytes, padding included).
    pub content: Vec<u8>,
}

/// Every field of a NIfTI-1 or NIfTI-2 header, in the widest type either version uses (NIfTI-1 `float`s are
/// stored exactly as `f64`, `short`s as `i32`/`i64`), plus the version, the byte order and the bytes between the
/// header and the voxel data. `sizeof_hdr` and `magic` are implied by `version`.
///
/// Writing a header back in its own version reproduces every field bit for bit.
#[derive(Debug, Clone, PartialEq)]
pub struct NiftiHeader {
    /// Format version (decides `sizeof_hdr` and `magic`).
    pub version: NiftiVersion,
    /// Byte order the header was read in.
    pub endianness: Endianness,
    /// Analyze 7.5 `data_type` (NIfTI-1 only, unused).
    pub data_type: [u8; 10],
    /// Analyze 7.5 `db_name` (NIfTI-1 only, unused).
    pub db_name: [u8; 18],
    /// Analyze 7.5 `extents` (NIfTI-1 only, unused).
    pub extents: i32,
    /// Analyze 7.5 `session_error` (NIfTI-1 only, unused).
    pub session_error: i16,
    /// Analyze 7.5 `regular` (NIfTI-1 only, unused).
    pub regular: u8,
    /// MRI slice ordering (frequency, phase and slice dimensions packed in 2-bit fields).
    pub dim_info: u8,
    /// `dim[0]` is the number of dimensions, `dim[1..=dim[0]]` the size along each.
    pub dim: [i64; 8],
    /// First intent parameter.
    pub intent_p1: f64,
    /// Second intent parameter.
    pub intent_p2: f64,
    /// Third intent parameter.
    pub intent_p3: f64,
    /// NIFTI_INTENT_* code.
    pub intent_code: i32,
    /// NIFTI_TYPE_* code of the voxel data.
    pub datatype: i16,
    /// Bits per voxel (nibabel ignores it and uses `datatype`).
    pub bitpix: i16,
    /// First slice index.
    pub slice_start: i64,
    /// `pixdim[0]` is qfac, `pixdim[1..=3]` the voxel size, `pixdim[4]` the time step.
    pub pixdim: [f64; 8],
    /// Byte offset of the voxel data in the file (a `float` in NIfTI-1, an `int64` in NIfTI-2).
    pub vox_offset: f64,
    /// Data scaling slope (0 or non-finite: no scaling).
    pub scl_slope: f64,
    /// Data scaling offset.
    pub scl_inter: f64,
    /// Last slice index.
    pub slice_end: i64,
    /// Slice timing order.
    pub slice_code: i32,
    /// Units of `pixdim[1..=4]` (NIFTI_UNITS_* for space | time).
    pub xyzt_units: i32,
    /// Display range maximum.
    pub cal_max: f64,
    /// Display range minimum.
    pub cal_min: f64,
    /// Time to acquire one slice.
    pub slice_duration: f64,
    /// Time axis shift.
    pub toffset: f64,
    /// Analyze 7.5 `glmax` (NIfTI-1 only, unused).
    pub glmax: i32,
    /// Analyze 7.5 `glmin` (NIfTI-1 only; FreeSurfer stores long vector lengths here).
    pub glmin: i32,
    /// Free text description (NUL padded).
    pub descrip: [u8; 80],
    /// Auxiliary file name (NUL padded).
    pub aux_file: [u8; 24],
    /// NIFTI_XFORM_* code of the quaternion transform (qform).
    pub qform_code: i32,
    /// NIFTI_XFORM_* code of the affine transform (sform).
    pub sform_code: i32,
    /// Quaternion b parameter.
    pub quatern_b: f64,
    /// Quaternion c parameter.
    pub quatern_c: f64,
    /// Quaternion d parameter.
    pub quatern_d: f64,
    /// Quaternion x shift.
    pub qoffset_x: f64,
    /// Quaternion y shift.
    pub qoffset_y: f64,
    /// Quaternion z shift.
    pub qoffset_z: f64,
    /// First row of the sform affine.
    pub srow_x: [f64; 4],
    /// Second row of the sform affine.
    pub srow_y: [f64; 4],
    /// Third row of the sform affine.
    pub srow_z: [f64; 4],
    /// Name or meaning of the data (NUL padded).
    pub intent_name: [u8; 16],
    /// The 4 bytes after `magic` in NIfTI-2 (`\r\n\x1a\n` in a valid file; zero in NIfTI-1).
    pub eol_check: [u8; 4],
    /// Trailing unused bytes of a NIfTI-2 header (zero in NIfTI-1).
    pub unused_str: [u8; 15],
    /// The 4-byte extension flag after the header (`extender`; first byte non-zero when extensions follow).
    pub extender: [u8; 4],
    /// Every byte between the extension flag and `vox_offset`, verbatim (the extensions, if any, and padding).
    pub extension_bytes: Vec<u8>,
}

/// Little helper reading fixed-offset fields in one byte order.
struct Fields<'a> {
    b: &'a [u8],
    big: bool,
}

macro_rules! getter {
    ($name:ident, $t:ty, $n:expr) => {
        fn $name(&self, off: usize) -> $t {
            let mut a = [0u8; $n];
            a.copy_from_slice(&self.b[off..off + $n]);
            if self.big {
                <$t>::from_be_bytes(a)
            } else {
                <$t>::from_le_bytes(a)
            }
        }
    };
}

impl Fields<'_> {
    getter!(i16, i16, 2);
    getter!(i32, i32, 4);
    getter!(i64, i64, 8);
    getter!(f32, f32, 4);
    getter!(f64, f64, 8);

    fn bytes<const N: usize>(&self, off: usize) -> [u8; N] {
        let mut a = [0u8; N];
        a.copy_from_slice(&self.b[off..off + N]);
        a
    }
}

/// Little helper writing fixed-offset fields in one byte order.
struct FieldsMut {
    b: Vec<u8>,
    big: bool,
}

macro_rules! setter {
    ($name:ident, $t:ty) => {
        fn $name(&mut self, off: usize, v: $t) {
            let a = if self.big {
                v.to_be_bytes()
            } else {
                v.to_le_bytes()
            };
            self.b[off..off + a.len()].copy_from_slice(&a);
        }
    };
}

impl FieldsMut {
    setter!(i16, i16);
    setter!(i32, i32);
    setter!(i64, i64);
    setter!(f32, f32);
    setter!(f64, f64);

    fn bytes(&mut self, off: usize, v: &[u8]) {
        self.b[off..off + v.len()].copy_from_slice(v);
    }
}

/// Identifies the format from the first 4 bytes (`sizeof_hdr`: 348 or 540, in either byte order).
pub(crate) fn sniff(first4: [u8; 4]) -> Result<(NiftiVersion, Endianness)> {
    let le = i32::from_le_bytes(first4);
    let be = i32::from_be_bytes(first4);
    Ok(match (le, be) {
        (348, _) => (NiftiVersion::Nifti1, Endianness::Little),
        (_, 348) => (NiftiVersion::Nifti1, Endianness::Big),
        (540, _) => (NiftiVersion::Nifti2, Endianness::Little),
        (_, 540) => (NiftiVersion::Nifti2, Endianness::Big),
        _ => bail!(
            "not a NIfTI file: sizeof_hdr is {le} (little-endian) / {be} (big-endian), expected 348 (NIfTI-1) or 540 \
             (NIfTI-2)"
        ),
    })
}

/// nibabel's `quaternion_threshold`: |w^2| below it counts as w = 0 (float32 / float64 precision).
fn quaternion_threshold(version: NiftiVersion) -> f64 {
    match version {
        NiftiVersion::Nifti1 => f32::EPSILON as f64 * 3.0,
        NiftiVersion::Nifti2 => f64::EPSILON * 3.0,
    }
}

/// nibabel's xform code recoder knows 0..=5; `check_fix` sets any other code to 0.
fn valid_xform_code(code: i32) -> i32 {
    if (0..=5).contains(&code) {
        code
    } else {
        0
    }
}

impl NiftiHeader {
    /// Parses a header (`bytes` holds at least `sizeof_hdr` bytes). The extension flag and bytes are left
    /// empty; the reader fills them in. Validates the magic string (and NIfTI-2's EOL check as nibabel does).
    pub(crate) fn parse(bytes: &[u8]) -> Result<NiftiHeader> {
        ensure!(bytes.len() >= 4, "truncated header ({} bytes)", bytes.len());
        let (version, endianness) = sniff([bytes[0], bytes[1], bytes[2], bytes[3]])?;
        ensure!(
            bytes.len() >= version.header_size(),
            "truncated header: {} bytes, a NIfTI-{} header has {}",
            bytes.len(),
            version.number(),
            version.header_size()
        );
        let f = Fields {
            b: bytes,
            big: endianness == Endianness::Big,
        };
        let h = match version {
            NiftiVersion::Nifti1 => {
                let magic: [u8; 4] = f.bytes(344);
                check_magic(&magic, version)?;
                NiftiHeader {
                    version,
                    endianness,
                    data_type: f.bytes(4),
                    db_name: f.bytes(14),
                    extents: f.i32(32),
                    session_error: f.i16(36),
                    regular: bytes[38],
                    dim_info: bytes[39],
                    dim: std::array::from_fn(|i| f.i16(40 + 2 * i) as i64),
                    intent_p1: f.f32(56) as f64,
                    intent_p2: f.f32(60) as f64,
                    intent_p3: f.f32(64) as f64,
                    intent_code: f.i16(68) as i32,
                    datatype: f.i16(70),
                    bitpix: f.i16(72),
                    slice_start: f.i16(74) as i64,
                    pixdim: std::array::from_fn(|i| f.f32(76 + 4 * i) as f64),
                    vox_offset: f.f32(108) as f64,
                    scl_slope: f.f32(112) as f64,
                    scl_inter: f.f32(116) as f64,
                    slice_end: f.i16(120) as i64,
                    slice_code: bytes[122] as i32,
                    xyzt_units: bytes[123] as i32,
                    cal_max: f.f32(124) as f64,
                    cal_min: f.f32(128) as f64,
                    slice_duration: f.f32(132) as f64,
                    toffset: f.f32(136) as f64,
                    glmax: f.i32(140),
                    glmin: f.i32(144),
                    descrip: f.bytes(148),
                    aux_file: f.bytes(228),
                    qform_code: f.i16(252) as i32,
                    sform_code: f.i16(254) as i32,
                    quatern_b: f.f32(256) as f64,
                    quatern_c: f.f32(260) as f64,
                    quatern_d: f.f32(264) as f64,
                    qoffset_x: f.f32(268) as f64,
                    qoffset_y: f.f32(272) as f64,
                    qoffset_z: f.f32(276) as f64,
                    srow_x: std::array::from_fn(|i| f.f32(280 + 4 * i) as f64),
                    srow_y: std::array::from_fn(|i| f.f32(296 + 4 * i) as f64),
                    srow_z: std::array::from_fn(|i| f.f32(312 + 4 * i) as f64),
                    intent_name: f.bytes(328),
                    eol_check: [0; 4],
                    unused_str: [0; 15],
                    extender: [0; 4],
                    extension_bytes: Vec::new(),
                }
            }
            NiftiVersion::Nifti2 => {
                let magic: [u8; 4] = f.bytes(4);
                check_magic(&magic, version)?;
                let eol_check: [u8; 4] = f.bytes(8);
                // nibabel: all zero is fixed silently, anything but \r\n\x1a\n otherwise is an error (level 40).
                ensure!(
                    eol_check == [13, 10, 26, 10] || eol_check == [0; 4],
                    "NIfTI-2 EOL check bytes are {eol_check:?}, expected [13, 10, 26, 10]: the file was probably \
                     damaged by a text-mode transfer"
                );
                NiftiHeader {
                    version,
                    endianness,
                    data_type: [0; 10],
                    db_name: [0; 18],
                    extents: 0,
                    session_error: 0,
                    regular: 0,
                    dim_info: bytes[524],
                    dim: std::array::from_fn(|i| f.i64(16 + 8 * i)),
                    intent_p1: f.f64(80),
                    intent_p2: f.f64(88),
                    intent_p3: f.f64(96),
                    intent_code: f.i32(504),
                    datatype: f.i16(12),
                    bitpix: f.i16(14),
                    slice_start: f.i64(224),
                    pixdim: std::array::from_fn(|i| f.f64(104 + 8 * i)),
                    vox_offset: f.i64(168) as f64,
                    scl_slope: f.f64(176),
                    scl_inter: f.f64(184),
                    slice_end: f.i64(232),
                    slice_code: f.i32(496),
                    xyzt_units: f.i32(500),
                    cal_max: f.f64(192),
                    cal_min: f.f64(200),
                    slice_duration: f.f64(208),
                    toffset: f.f64(216),
                    glmax: 0,
                    glmin: 0,
                    descrip: f.bytes(240),
                    aux_file: f.bytes(320),
                    qform_code: f.i32(344),
                    sform_code: f.i32(348),
                    quatern_b: f.f64(352),
                    quatern_c: f.f64(360),
                    quatern_d: f.f64(368),
                    qoffset_x: f.f64(376),
                    qoffset_y: f.f64(384),
                    qoffset_z: f.f64(392),
                    srow_x: std::array::from_fn(|i| f.f64(400 + 8 * i)),
                    srow_y: std::array::from_fn(|i| f.f64(432 + 8 * i)),
                    srow_z: std::array::from_fn(|i| f.f64(464 + 8 * i)),
                    intent_name: f.bytes(508),
                    eol_check,
                    unused_str: f.bytes(525),
                    extender: [0; 4],
                    extension_bytes: Vec::new(),
                }
            }
        };
        Ok(h)
    }

    /// Serialises the header (`sizeof_hdr` bytes, without the extension flag) in its own version and byte order.
    /// NIfTI-1 fields are narrowed to their on-disk types (`f64` -> `f32`, `i64` -> `i16`); fields that do not
    /// fit give an error rather than a silently different file.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let size = self.version.header_size();
        let mut f = FieldsMut {
            b: vec![0u8; size],
            big: self.endianness == Endianness::Big,
        };
        f.i32(0, size as i32);
        match self.version {
            NiftiVersion::Nifti1 => {
                let short = |name: &str, v: i64| -> Result<i16> {
                    i16::try_from(v)
                        .map_err(|_| anyhow::anyhow!("{name} = {v} does not fit a NIfTI-1 header"))
                };
                let byte = |name: &str, v: i32| -> Result<u8> {
                    u8::try_from(v)
                        .map_err(|_| anyhow::anyhow!("{name} = {v} does not fit a NIfTI-1 header"))
                };
                f.bytes(4, &self.data_type);
                f.bytes(14, &self.db_name);
                f.i32(32, self.extents);
                f.i16(36, self.session_error);
                f.b[38] = self.regular;
                f.b[39] = self.dim_info;
                for (i, &d) in self.dim.iter().enumerate() {
                    f.i16(40 + 2 * i, short("dim", d)?);
                }
                f.f32(56, self.intent_p1 as f32);
                f.f32(60, self.intent_p2 as f32);
                f.f32(64, self.intent_p3 as f32);
                f.i16(68, short("intent_code", self.intent_code as i64)?);
                f.i16(70, self.datatype);
                f.i16(72, self.bitpix);
                f.i16(74, short("slice_start", self.slice_start)?);
                for (i, &p) in self.pixdim.iter().enumerate() {
                    f.f32(76 + 4 * i, p as f32);
                }
                f.f32(108, self.vox_offset as f32);
                f.f32(112, self.scl_slope as f32);
                f.f32(116, self.scl_inter as f32);
                f.i16(120, short("slice_end", self.slice_end)?);
                f.b[122] = byte("slice_code", self.slice_code)?;
                f.b[123] = byte("xyzt_units", self.xyzt_units)?;
                f.f32(124, self.cal_max as f32);
                f.f32(128, self.cal_min as f32);
                f.f32(132, self.slice_duration as f32);
                f.f32(136, self.toffset as f32);
                f.i32(140, self.glmax);
                f.i32(144, self.glmin);
                f.bytes(148, &self.descrip);
                f.bytes(228, &self.aux_file);
                f.i16(252, short("qform_code", self.qform_code as i64)?);
                f.i16(254, short("sform_code", self.sform_code as i64)?);
                f.f32(256, self.quatern_b as f32);
                f.f32(260, self.quatern_c as f32);
                f.f32(264, self.quatern_d as f32);
                f.f32(268, self.qoffset_x as f32);
                f.f32(272, self.qoffset_y as f32);
                f.f32(276, self.qoffset_z as f32);
                for i in 0..4 {
                    f.f32(280 + 4 * i, self.srow_x[i] as f32);
                    f.f32(296 + 4 * i, self.srow_y[i] as f32);
                    f.f32(312 + 4 * i, self.srow_z[i] as f32);
                }
                f.bytes(328, &self.intent_name);
                f.bytes(344, b"n+1\0");
            }
            NiftiVersion::Nifti2 => {
                f.bytes(4, b"n+2\0");
                f.bytes(8, &self.eol_check);
                f.i16(12, self.datatype);
                f.i16(14, self.bitpix);
                for (i, &d) in self.dim.iter().enumerate() {
                    f.i64(16 + 8 * i, d);
                }
                f.f64(80, self.intent_p1);
                f.f64(88, self.intent_p2);
                f.f64(96, self.intent_p3);
                for (i, &p) in self.pixdim.iter().enumerate() {
                    f.f64(104 + 8 * i, p);
                }
                f.i64(168, self.vox_offset as i64);
                f.f64(176, self.scl_slope);
                f.f64(184, self.scl_inter);
                f.f64(192, self.cal_max);
                f.f64(200, self.cal_min);
                f.f64(208, self.slice_duration);
                f.f64(216, self.toffset);
                f.i64(224, self.slice_start);
                f.i64(232, self.slice_end);
                f.bytes(240, &self.descrip);
                f.bytes(320, &self.aux_file);
                f.i32(344, self.qform_code);
                f.i32(348, self.sform_code);
                f.f64(352, self.quatern_b);
                f.f64(360, self.quatern_c);
                f.f64(368, self.quatern_d);
                f.f64(376, self.qoffset_x);
                f.f64(384, self.qoffset_y);
                f.f64(392, self.qoffset_z);
                for i in 0..4 {
                    f.f64(400 + 8 * i, self.srow_x[i]);
                    f.f64(432 + 8 * i, self.srow_y[i]);
                    f.f64(464 + 8 * i, self.srow_z[i]);
                }
                f.i32(496, self.slice_code);
                f.i32(500, self.xyzt_units);
                f.i32(504, self.intent_code);
                f.bytes(508, &self.intent_name);
                f.b[524] = self.dim_info;
                f.bytes(525, &self.unused_str);
            }
        }
        Ok(f.b)
    }

    /// The data shape as nibabel's `get_data_shape` gives it (`dim[1..=dim[0]]`, with nibabel's two FreeSurfer
    /// conventions for NIfTI-1), checked: 1 to 7 dimensions, every size at least 1.
    pub fn shape(&self) -> Result<Vec<usize>> {
        let ndim = self.dim[0];
        ensure!(
            (1..=7).contains(&ndim),
            "invalid number of dimensions dim[0] = {ndim} (must be 1 to 7)"
        );
        let mut dims: Vec<i64> = self.dim[1..=ndim as usize].to_vec();
        if self.version == NiftiVersion::Nifti1 && dims.len() >= 3 {
            // nibabel's FreeSurfer hacks: long vectors store their length in glmin; ico7 surfaces are 27307x1x6.
            if dims[..3] == [-1, 1, 1] {
                ensure!(
                    self.glmin > 0,
                    "dim[1] = -1 (FreeSurfer long vector) but glmin = {}",
                    self.glmin
                );
                dims[0] = self.glmin as i64;
            } else if dims[..3] == [27307, 1, 6] {
                dims[..3].copy_from_slice(&[163842, 1, 1]);
            }
        }
        dims.iter()
            .enumerate()
            .map(|(i, &d)| {
                ensure!(
                    d >= 1,
                    "dim[{}] = {d}: every dimension must be at least 1",
                    i + 1
                );
                usize::try_from(d).map_err(|_| anyhow::anyhow!("dim[{}] = {d} is too large", i + 1))
            })
            .collect()
    }

    /// nibabel's `get_slope_inter`: `None` when `scl_slope` is 0 or not finite (no scaling); an error when the
    /// slope is valid but the intercept is not finite (nibabel refuses to load such a file).
    pub fn slope_inter(&self) -> Result<Option<(f64, f64)>> {
        let (slope, inter) = (self.scl_slope, self.scl_inter);
        if slope == 0.0 || !slope.is_finite() {
            return Ok(None);
        }
        ensure!(
            inter.is_finite(),
            "valid scl_slope {slope} but invalid scl_inter {inter}"
        );
        Ok(Some((slope, inter)))
    }

    /// `pixdim` after nibabel's `check_fix`: qfac other than +-1 becomes 1; voxel sizes of 0 become 1 and
    /// negative ones their absolute value.
    pub fn fixed_pixdim(&self) -> [f64; 8] {
        let mut p = self.pixdim;
        if p[0] != 1.0 && p[0] != -1.0 {
            p[0] = 1.0;
        }
        for v in &mut p[1..4] {
            if *v == 0.0 {
                *v = 1.0;
            } else if *v < 0.0 {
                *v = -*v;
            }
        }
        p
    }

    /// The sform code nibabel acts on (codes outside 0..=5 count as 0).
    pub fn effective_sform_code(&self) -> i32 {
        valid_xform_code(self.sform_code)
    }

    /// The qform code nibabel acts on (codes outside 0..=5 count as 0).
    pub fn effective_qform_code(&self) -> i32 {
        valid_xform_code(self.qform_code)
    }

    /// The sform affine (`srow_x`, `srow_y`, `srow_z`), whatever its code.
    pub fn sform(&self) -> Affine {
        [self.srow_x, self.srow_y, self.srow_z, [0.0, 0.0, 0.0, 1.0]]
    }

    /// The qform affine as nibabel's `get_qform` computes it, whatever its code: the unit quaternion
    /// (b, c, d, with a = sqrt(1 - b^2 - c^2 - d^2) taken as 0 when |a^2| is below nibabel's
    /// `quaternion_threshold`) times the voxel sizes, the last one multiplied by qfac, plus the offsets.
    /// Errors when a^2 is negative beyond the threshold (nibabel raises too).
    pub fn qform(&self) -> Result<Affine> {
        let (b, c, d) = (self.quatern_b, self.quatern_c, self.quatern_d);
        let w2 = one_minus_sum_of_squares(b, c, d);
        let a = if w2.abs() < quaternion_threshold(self.version) {
            0.0
        } else if w2 < 0.0 {
            bail!("invalid qform quaternion (b, c, d) = ({b}, {c}, {d}): b^2 + c^2 + d^2 > 1 (w^2 = {w2:e})");
        } else {
            w2.sqrt()
        };
        let r = quat2mat(a, b, c, d);
        let p = self.fixed_pixdim();
        let vox = [p[1], p[2], p[3] * p[0]];
        let mut out = IDENTITY;
        for i in 0..3 {
            for j in 0..3 {
                out[i][j] = r[i][j] * vox[j];
            }
        }
        out[0][3] = self.qoffset_x;
        out[1][3] = self.qoffset_y;
        out[2][3] = self.qoffset_z;
        Ok(out)
    }

    /// nibabel's fallback `get_base_affine`: voxel sizes on the diagonal (x negated), origin at the image centre.
    pub fn base_affine(&self) -> Affine {
        let p = self.fixed_pixdim();
        let ndim = self.dim[0].clamp(0, 7) as usize;
        let mut shape = [1.0f64; 3];
        let mut zooms = [1.0f64; 3];
        for i in 0..ndim.min(3) {
            shape[i] = self.dim[i + 1] as f64;
            zooms[i] = p[i + 1];
        }
        zooms[0] = -zooms[0];
        let mut out = IDENTITY;
        for i in 0..3 {
            out[i][i] = zooms[i];
            out[i][3] = -((shape[i] - 1.0) / 2.0) * zooms[i];
        }
        out
    }

    /// The affine nibabel's `img.affine` holds: the sform when its code is > 0, else the qform when its code is
    /// > 0, else the fallback [`NiftiHeader::base_affine`].
    pub fn affine(&self) -> Result<Affine> {
        if self.effective_sform_code() != 0 {
            Ok(self.sform())
        } else if self.effective_qform_code() != 0 {
            self.qform()
        } else {
            Ok(self.base_affine())
        }
    }

    /// Parses [`NiftiHeader::extension_bytes`] into extensions (only when the extension flag is set), stopping at
    /// the first malformed entry as nibabel would fail there.
    pub fn extensions(&self) -> Result<Vec<NiftiExtension>> {
        let mut out = Vec::new();
        if self.extender[0] == 0 {
            return Ok(out);
        }
        let f = Fields {
            b: &self.extension_bytes,
            big: self.endianness == Endianness::Big,
        };
        let mut pos = 0usize;
        while self.extension_bytes.len() - pos >= 16 {
            let esize = f.i32(pos);
            let code = f.i32(pos + 4);
            ensure!(
                esize >= 8 && (esize as usize) <= self.extension_bytes.len() - pos,
                "header extension at byte {} has invalid size {esize}",
                pos + self.version.min_vox_offset()
            );
            out.push(NiftiExtension {
                code,
                content: self.extension_bytes[pos + 8..pos + esize as usize].to_vec(),
            });
            pos += esize as usize;
        }
        Ok(out)
    }

    /// A minimal NIfTI-1 little-endian header for `shape` with `affine` as sform (code 2, "aligned"), voxel
    /// sizes from the affine's column norms, qform code 0 and millimetre units: for writing volumes that have
    /// no NIfTI reference (datatype and dims are set by the writer).
    pub fn from_affine(affine: &Affine) -> NiftiHeader {
        let spacing = crate::volume::spacing(affine);
        let mut pixdim = [1.0; 8];
        pixdim[1..4].copy_from_slice(&spacing);
        NiftiHeader {
            version: NiftiVersion::Nifti1,
            endianness: Endianness::Little,
            data_type: [0; 10],
            db_name: [0; 18],
            extents: 0,
            session_error: 0,
            regular: 0,
            dim_info: 0,
            dim: [3, 1, 1, 1, 1, 1, 1, 1],
            intent_p1: 0.0,
            intent_p2: 0.0,
            intent_p3: 0.0,
            intent_code: 0,
            datatype: 16,
            bitpix: 32,
            slice_start: 0,
            pixdim,
            vox_offset: 352.0,
            scl_slope: 1.0,
            scl_inter: 0.0,
            slice_end: 0,
            slice_code: 0,
            xyzt_units: 2,
            cal_max: 0.0,
            cal_min: 0.0,
            slice_duration: 0.0,
            toffset: 0.0,
            glmax: 0,
            glmin: 0,
            descrip: [0; 80],
            aux_file: [0; 24],
            qform_code: 0,
            sform_code: 2,
            quatern_b: 0.0,
            quatern_c: 0.0,
            quatern_d: 0.0,
            qoffset_x: affine[0][3],
            qoffset_y: affine[1][3],
            qoffset_z: affine[2][3],
            srow_x: affine[0],
            srow_y: affine[1],
            srow_z: affine[2],
            intent_name: [0; 16],
            eol_check: [0; 4],
            unused_str: [0; 15],
            extender: [0; 4],
            extension_bytes: Vec::new(),
        }
    }

    /// A NIfTI-1 header for a volume of `dims` converted from DICOM, as dcm2niix writes it: `affine` as sform
    /// and as qform (both code 1, scanner anatomical), the quaternion, `qfac` and voxel sizes derived from the
    /// affine (NIfTI's `nifti_mat44_to_quatern`, after orthonormalising the rotation), millimetre and second
    /// units. Readers (nibabel, ours) use the sform, which is `affine` exactly.
    pub fn scanner_from_affine(affine: &Affine, dims: [usize; 3]) -> NiftiHeader {
        let mut h = NiftiHeader::from_affine(affine);
        h.dim = [
            3,
            dims[0] as i64,
            dims[1] as i64,
            dims[2] as i64,
            1,
            1,
            1,
            1,
        ];
        h.sform_code = 1;
        h.qform_code = 1;
        h.xyzt_units = 10;
        let (quatern, qfac) = quaternion_of(affine);
        h.pixdim[0] = qfac;
        h.quatern_b = quatern[0];
        h.quatern_c = quatern[1];
        h.quatern_d = quatern[2];
        h
    }
}

/// The quaternion (b, c, d) and qfac of an affine's rotation: columns normalised, Gram-Schmidt
/// orthonormalised, the third negated when the determinant is negative (qfac -1), then `nifti_mat44_to_quatern`.
fn quaternion_of(affine: &Affine) -> ([f64; 3], f64) {
    let col = |c: usize| -> [f64; 3] { [affine[0][c], affine[1][c], affine[2][c]] };
    let norm = |v: [f64; 3]| (v[0] * v[0] + v[1] * v[1] + v[2] * v[2]).sqrt();
    let unit = |v: [f64; 3]| {
        let n = norm(v);
        if n > 0.0 {
            v.map(|x| x / n)
        } else {
            v
        }
    };
    let dot = |a: [f64; 3], b: [f64; 3]| a[0] * b[0] + a[1] * b[1] + a[2] * b[2];
    let x = unit(col(0));
    let y0 = col(1);
    let y = unit(std::array::from_fn(|i| y0[i] - dot(x, y0) * x[i]));
    let z = [
        x[1] * y[2] - x[2] * y[1],
        x[2] * y[0] - x[0] * y[2],
        x[0] * y[1] - x[1] * y[0],
    ];
    // The stored rotation is R * diag(1, 1, qfac) with R proper: R's third column is always x cross y.
    let qfac = if dot(z, col(2)) < 0.0 { -1.0 } else { 1.0 };
    let r = [[x[0], y[0], z[0]], [x[1], y[1], z[1]], [x[2], y[2], z[2]]];
    let (r11, r12, r13) = (r[0][0], r[0][1], r[0][2]);
    let (r21, r22, r23) = (r[1][0], r[1][1], r[1][2]);
    let (r31, r32, r33) = (r[2][0], r[2][1], r[2][2]);
    let trace = r11 + r22 + r33 + 1.0;
    if trace > 0.5 {
        let a = 0.5 * trace.sqrt();
        (
            [
                0.25 * (r32 - r23) / a,
                0.25 * (r13 - r31) / a,
                0.25 * (r21 - r12) / a,
            ],
            qfac,
        )
    } else {
        let (a, b, c, d);
        let xd = 1.0 + r11 - (r22 + r33);
        let yd = 1.0 + r22 - (r11 + r33);
        let zd = 1.0 + r33 - (r11 + r22);
        if xd > 1.0 {
            b = 0.5 * xd.sqrt();
            c = 0.25 * (r12 + r21) / b;
            d = 0.25 * (r13 + r31) / b;
            a = 0.25 * (r32 - r23) / b;
        } else if yd > 1.0 {
            c = 0.5 * yd.sqrt();
            b = 0.25 * (r12 + r21) / c;
            d = 0.25 * (r23 + r32) / c;
            a = 0.25 * (r13 - r31) / c;
        } else {
            d = 0.5 * zd.sqrt();
            b = 0.25 * (r13 + r31) / d;
            c = 0.25 * (r23 + r32) / d;
            a = 0.25 * (r21 - r12) / d;
        }
        // q and -q are the same rotation; NIfTI stores the one with a >= 0.
        let sign = if a < 0.0 { -1.0 } else { 1.0 };
        ([sign * b, sign * c, sign * d], qfac)
    }
}

fn check_magic(magic: &[u8; 4], version: NiftiVersion) -> Result<()> {
    let n = version.number();
    let single = [b'n', b'+', b'0' + n, 0];
    let pair = [b'n', b'i', b'0' + n, 0];
    if *magic == single {
        return Ok(());
    }
    if *magic == pair {
        bail!(
            "this is the header of a NIfTI-{n} pair (magic 'ni{n}', data in a separate .img file), which is not \
             supported: convert it to a single .nii/.nii.gz file"
        );
    }
    bail!(
        "wrong magic {:?} for a NIfTI-{n} header (expected 'n+{n}')",
        String::from_utf8_lossy(magic).trim_end_matches('\0')
    )
}

/// `1 - (b^2 + c^2 + d^2)` without the cancellation error of plain `f64` when the result is near 0 (a
/// quaternion with `a` close to 0): exact products (FMA) and a compensated sum, about as accurate as nibabel's
/// `longdouble` evaluation. Non-finite inputs give the plain result.
fn one_minus_sum_of_squares(b: f64, c: f64, d: f64) -> f64 {
    let plain = 1.0 - (b * b + c * c + d * d);
    if !plain.is_finite() {
        return plain;
    }
    let (mut hi, mut lo) = (0.0f64, 0.0f64);
    for x in [b, c, d] {
        let p = x * x;
        let p_err = x.mul_add(x, -p);
        let s = hi + p;
        let bb = s - hi;
        let s_err = (hi - (s - bb)) + (p - bb);
        hi = s;
        lo += s_err + p_err;
    }
    (1.0 - hi) - lo
}

/// nibabel's `quat2mat` (rotation matrix of a possibly non-unit quaternion w, x, y, z).
fn quat2mat(w: f64, x: f64, y: f64, z: f64) -> [[f64; 3]; 3] {
    let nq = w * w + x * x + y * y + z * z;
    if nq < f64::EPSILON {
        return [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]];
    }
    let s = 2.0 / nq;
    let (xs, ys, zs) = (x * s, y * s, z * s);
    let (wx, wy, wz) = (w * xs, w * ys, w * zs);
    let (xx, xy, xz) = (x * xs, x * ys, x * zs);
    let (yy, yz, zz) = (y * ys, y * zs, z * zs);
    [
        [1.0 - (yy + zz), xy - wz, xz + wy],
        [xy + wz, 1.0 - (xx + zz), yz - wx],
        [xz - wy, yz + wx, 1.0 - (xx + yy)],
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> NiftiHeader {
        let mut h = NiftiHeader::from_affine(&IDENTITY);
        h.dim = [3, 4, 5, 6, 1, 1, 1, 1];
        h
    }

    #[test]
    fn header_round_trips_in_both_versions_and_byte_orders() {
        let mut h = header();
        h.descrip[..5].copy_from_slice(b"hello");
        h.pixdim = [-1.0, 0.5, 0.75, 2.5, 1.0, 1.0, 1.0, 1.0];
        h.quatern_b = 0.25;
        h.srow_x = [0.1, 0.2, 0.3, 0.4];
        for version in [NiftiVersion::Nifti1, NiftiVersion::Nifti2] {
            for endianness in [Endianness::Little, Endianness::Big] {
                let mut h = h.clone();
                h.version = version;
                h.endianness = endianness;
                if version == NiftiVersion::Nifti2 {
                    h.eol_check = [13, 10, 26, 10];
                    h.srow_x = [0.1f64, 0.2, 0.3, 0.4];
                } else {
                    h.srow_x = [0.1f32 as f64, 0.2f32 as f64, 0.3f32 as f64, 0.4f32 as f64];
                }
                let bytes = h.to_bytes().unwrap();
                assert_eq!(bytes.len(), version.header_size());
                assert_eq!(NiftiHeader::parse(&bytes).unwrap(), h);
            }
        }
    }

    #[test]
    fn wrong_magic_and_pairs_are_rejected() {
        let mut bytes = header().to_bytes().unwrap();
        bytes[344..348].copy_from_slice(b"ni1\0");
        let e = NiftiHeader::parse(&bytes).unwrap_err().to_string();
        assert!(e.contains("pair"), "{e}");
        bytes[344..348].copy_from_slice(b"abcd");
        assert!(NiftiHeader::parse(&bytes)
            .unwrap_err()
            .to_string()
            .contains("magic"));
        assert!(NiftiHeader::parse(&bytes[..100]).is_err());
        assert!(sniff([1, 2, 3, 4]).is_err());
    }

    #[test]
    fn qform_matches_hand_computed_rotations() {
        let mut h = header();
        h.qform_code = 1;
        h.sform_code = 0;
        h.pixdim[1..4].copy_from_slice(&[2.0, 3.0, 4.0]);
        // 180 degrees about x: b = 1, a = 0.
        h.quatern_b = 1.0;
        let a = h.affine().unwrap();
        assert_eq!(a[0][..3], [2.0, 0.0, 0.0]);
        assert_eq!(a[1][..3], [0.0, -3.0, 0.0]);
        assert_eq!(a[2][..3], [0.0, 0.0, -4.0]);
        // 90 degrees about z with qfac -1: (a, d) = (cos 45, sin 45).
        h.quatern_b = 0.0;
        h.quatern_d = std::f64::consts::FRAC_1_SQRT_2;
        h.pixdim[0] = -1.0;
        let a = h.qform().unwrap();
        let expect = [[0.0, -3.0, 0.0], [2.0, 0.0, 0.0], [0.0, 0.0, -4.0]];
        for i in 0..3 {
            for j in 0..3 {
                assert!((a[i][j] - expect[i][j]).abs() < 1e-12, "{a:?}");
            }
        }
        // Invalid qfac counts as 1, negative / zero voxel sizes as their absolute value / 1.
        h.pixdim[0] = 0.0;
        h.pixdim[1] = -2.0;
        h.pixdim[3] = 0.0;
        let a = h.qform().unwrap();
        assert!(
            (a[1][0] - 2.0).abs() < 1e-12 && (a[2][2] - 1.0).abs() < 1e-12,
            "{a:?}"
        );
        // Non-unit quaternions beyond the threshold are errors, not panics; NaN gives NaN.
        h.quatern_b = 1.0;
        assert!(h.qform().is_err());
        h.quatern_b = f64::NAN;
        assert!(h.qform().unwrap()[0][0].is_nan());
    }

    #[test]
    fn near_zero_w2_is_computed_without_cancellation() {
        // b = 1 - 2^-30: 1 - b^2 = 2^-29 - 2^-60 exactly, but b * b rounds to 1 - 2^-29 in f64.
        let b = 1.0 - 2f64.powi(-30);
        assert_eq!(1.0 - b * b, 2f64.powi(-29));
        assert_eq!(
            one_minus_sum_of_squares(b, 0.0, 0.0),
            2f64.powi(-29) - 2f64.powi(-60)
        );
        assert_eq!(
            one_minus_sum_of_squares(0.0, b, 0.0),
            2f64.powi(-29) - 2f64.powi(-60)
        );
        assert_eq!(one_minus_sum_of_squares(0.0, 0.0, 0.0), 1.0);
        assert_eq!(one_minus_sum_of_squares(0.5, 0.5, 0.5), 0.25);
        assert_eq!(
            one_minus_sum_of_squares(f64::INFINITY, 0.0, 0.0),
            f64::NEG_INFINITY
        );
        assert!(one_minus_sum_of_squares(f64::NAN, 0.0, 0.0).is_nan());
    }

    #[test]
    fn scanner_headers_carry_the_affine_in_sform_and_qform() {
        let s = std::f64::consts::FRAC_1_SQRT_2;
        let cases: [Affine; 4] = [
            // dcm2niix's axial LAS (det < 0 -> qfac -1).
            [
                [-0.9765625, 0.0, 0.0, 249.5],
                [0.0, 0.9765625, 0.0, -61.5],
                [0.0, 0.0, 2.0, -804.5],
                [0.0, 0.0, 0.0, 1.0],
            ],
            // Sagittal: i -> A, j -> S, k -> L (a rotation with trace < 0.5).
            [
                [0.0, 0.0, -1.5, 10.0],
                [0.8, 0.0, 0.0, -20.0],
                [0.0, 0.8, 0.0, 30.0],
                [0.0, 0.0, 0.0, 1.0],
            ],
            // Oblique, proper rotation.
            [
                [s, -s, 0.0, 1.0],
                [s, s, 0.0, 2.0],
                [0.0, 0.0, 3.0, 3.0],
                [0.0, 0.0, 0.0, 1.0],
            ],
            // A 180-degree rotation about x (a = 0).
            [
                [1.0, 0.0, 0.0, 0.0],
                [0.0, -1.0, 0.0, 0.0],
                [0.0, 0.0, -1.0, 0.0],
                [0.0, 0.0, 0.0, 1.0],
            ],
        ];
        for a in cases {
            let h = NiftiHeader::scanner_from_affine(&a, [4, 5, 6]);
            assert_eq!((h.sform_code, h.qform_code), (1, 1));
            assert_eq!(h.shape().unwrap(), vec![4, 5, 6]);
            assert_eq!(h.affine().unwrap(), a, "sform wins and is exact");
            let q = h.qform().unwrap();
            for r in 0..3 {
                for c in 0..4 {
                    assert!((q[r][c] - a[r][c]).abs() < 1e-6, "{a:?}: qform {q:?}");
                }
            }
            let parsed = NiftiHeader::parse(&h.to_bytes().unwrap()).unwrap();
            assert_eq!(parsed.qform_code, 1);
        }
    }

    #[test]
    fn base_affine_centres_the_image() {
        let mut h = header();
        h.sform_code = 0;
        h.pixdim[1..4].copy_from_slice(&[3.0, 2.0, 1.0]);
        h.dim = [3, 3, 5, 7, 1, 1, 1, 1];
        let a = h.affine().unwrap();
        assert_eq!(a[0], [-3.0, 0.0, 0.0, 3.0]);
        assert_eq!(a[1], [0.0, 2.0, 0.0, -4.0]);
        assert_eq!(a[2], [0.0, 0.0, 1.0, -3.0]);
        // Invalid sform codes count as 0.
        h.sform_code = 9;
        assert_eq!(h.affine().unwrap()[0][0], -3.0);
        h.sform_code = 5;
        assert_eq!(h.affine().unwrap(), h.sform());
    }

    #[test]
    fn shapes_and_scaling_follow_nibabel() {
        let mut h = header();
        assert_eq!(h.shape().unwrap(), vec![4, 5, 6]);
        h.dim[0] = 0;
        assert!(h.shape().is_err());
        h.dim[0] = 8;
        assert!(h.shape().is_err());
        h.dim = [3, 4, 0, 6, 1, 1, 1, 1];
        assert!(h.shape().is_err());
        h.dim = [3, 27307, 1, 6, 1, 1, 1, 1];
        assert_eq!(h.shape().unwrap(), vec![163842, 1, 1]);
        h.scl_slope = 0.0;
        assert_eq!(h.slope_inter().unwrap(), None);
        h.scl_slope = f64::NAN;
        assert_eq!(h.slope_inter().unwrap(), None);
        h.scl_slope = 2.0;
        h.scl_inter = f64::INFINITY;
        assert!(h.slope_inter().is_err());
        h.scl_inter = -1.0;
        assert_eq!(h.slope_inter().unwrap(), Some((2.0, -1.0)));
    }
}
