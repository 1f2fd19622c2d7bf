//! NIfTI-1 / NIfTI-2 reading and writing, matching nibabel (what MONAI's `LoadImage` uses) exactly.
//!
//! This is the project's own implementation, not the `nifti` crate: that crate's qform affine is off by up
//! to 5e-4 when the quaternion's `a` is near 0 and panics on negative pixdim / invalid qfac, it cannot write a
//! chosen datatype with the reference geometry untouched, and it depends on ndarray 0.17 (tch uses 0.16).
//!
//! Reading ([`read_nifti`]) gives what `np.asanyarray(img.dataobj).astype(np.float32)` and `img.affine` give in
//! nibabel 5.4:
//! - `.nii` or `.nii.gz` (gzip is recognised by its magic bytes, not by the name; multi-member gzip is fine and
//!   the gzip CRC is checked), NIfTI-1 (`n+1`) and NIfTI-2 (`n+2`) in either byte order (told by
//!   `sizeof_hdr`), data at `vox_offset`, extensions kept verbatim. `ni1`/`ni2` pair headers are rejected.
//! - uint8, int8, int16, uint16, int32, uint32, int64, uint64, float32, float64 voxels. Unscaled data is cast to
//!   `f32` directly (round to nearest, as numpy's `astype`); when `scl_slope` is finite and non-zero and
//!   (slope, inter) != (1, 0), values are computed as nibabel's `apply_read_scaling` does, in `f64`
//!   (`x * slope` only when slope != 1, `+ inter` only when inter != 0) and then rounded to `f32`.
//!   (nibabel switches to `longdouble` when `int_max * slope` overflows `f64`, which needs a NIfTI-2 slope
//!   above ~1e289; we stay in `f64` there.)
//! - The affine: sform if its code is > 0, else qform if its code is > 0, else nibabel's pixdim-based base
//!   affine, with nibabel's `check_fix` repairs (invalid codes -> 0, qfac not +-1 -> 1, zero voxel sizes -> 1,
//!   negative ones -> absolute value). The quaternion math is nibabel's, in `f64` with `1 - b^2 - c^2 - d^2`
//!   evaluated without cancellation (nibabel uses `longdouble`); the affines agree to about 1 ulp.
//! - 3-D data; 1-D/2-D data becomes a volume with trailing sizes 1; 4-D to 7-D data is accepted when every
//!   extra dimension is 1, and is an error otherwise.
//! - The volume is indexed `[x, y, z]` in C order (the file stores x fastest); the conversion and transpose
//!   run in one parallel, cache-blocked pass.
//! - Bad input is an error naming the file and the problem, never a panic; no allocation is larger than what
//!   the file can hold (for gzip, 1032 times its size: deflate's maximum ratio).
//!
//! Writing ([`write_nifti`]) keeps the reference header's version and every field except those describing the
//! data (see [`write_nifti`]); the file is always little-endian.

use std::fs::File;
use std::io::{self, BufReader, Read, Write};
use std::path::Path;
use std::str::FromStr;

use anyhow::{anyhow, bail, ensure, Context, Result};
use flate2::read::MultiGzDecoder;
use flate2::write::GzEncoder;
use flate2::Compression;
use ndarray::Array3;
use rayon::prelude::*;

pub use super::nifti_header::{Endianness, NiftiExtension, NiftiHeader, NiftiVersion};
use crate::volume::Volume;

/// A NIfTI image: the header as stored in the file and the voxels as a [`Volume`] (`f32`, `[x, y, z]`, with
/// the affine nibabel's `img.affine` gives).
#[derive(Debug, Clone)]
pub struct NiftiImage {
    /// Every header field exactly as read (not repaired), extensions included.
    pub header: NiftiHeader,
    /// Voxel values after scaling, as `f32`, and the voxel-to-world affine.
    pub volume: Volume,
}

/// Voxel type of a written file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputDtype {
    /// 32-bit float (NIFTI_TYPE_FLOAT32, code 16).
    Float32,
    /// Unsigned 8-bit integer (NIFTI_TYPE_UINT8, code 2): values must be integers in 0..=255.
    Uint8,
    /// Signed 16-bit integer (NIFTI_TYPE_INT16, code 4): values must be integers in -32768..=32767.
    Int16,
}

impl OutputDtype {
    /// The NIfTI datatype code.
    pub fn code(self) -> i16 {
        match self {
            OutputDtype::Float32 => 16,
            OutputDtype::Uint8 => 2,
            OutputDtype::Int16 => 4,
        }
    }

    /// Bytes per voxel.
    pub fn size(self) -> usize {
        match self {
            OutputDtype::Float32 => 4,
            OutputDtype::Uint8 => 1,
            OutputDtype::Int16 => 2,
        }
    }

    /// The numpy name: "float32", "uint8" or "int16".
    pub fn name(self) -> &'static str {
        match self {
            OutputDtype::Float32 => "float32",
            OutputDtype::Uint8 => "uint8",
            OutputDtype::Int16 => "int16",
        }
    }
}

impl serde::Serialize for OutputDtype {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl std::fmt::Display for OutputDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for OutputDtype {
    type Err = anyhow::Error;

    /// Parses "float32", "uint8", "int16", also with a numpy prefix ("np.uint8", "numpy.uint8"), case-insensitive.
    fn from_str(s: &str) -> Result<Self> {
        let t = s.trim().to_ascii_lowercase();
        let t = t
            .strip_prefix("numpy.")
            .or_else(|| t.strip_prefix("np."))
            .unwrap_or(&t);
        match t {
            "float32" => Ok(OutputDtype::Float32),
            "uint8" => Ok(OutputDtype::Uint8),
            "int16" => Ok(OutputDtype::Int16),
            _ => bail!("unknown output dtype {s:?}: expected float32, uint8 or int16 (optionally as np.<name>)"),
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Reading

/// Deflate cannot expand data by more than about 1032:1; a gzip file claiming more voxel bytes is corrupt.
const MAX_DEFLATE_RATIO: u64 = 1032;

/// Reads a `.nii` / `.nii.gz` file (NIfTI-1 or NIfTI-2) as nibabel + MONAI's `LoadImage` would: see the module
/// documentation for the exact rules. Errors name the file and the problem.
pub fn read_nifti(path: &Path) -> Result<NiftiImage> {
    read_impl(path).map_err(|e| anyhow!("cannot read NIfTI file {}: {e:#}", path.display()))
}

/// Supported voxel types (NIFTI_TYPE_* codes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum InType {
    U8,
    I8,
    I16,
    U16,
    I32,
    U32,
    I64,
    U64,
    F32,
    F64,
}

impl InType {
    fn from_code(code: i16) -> Result<InType> {
        Ok(match code {
            2 => InType::U8,
            256 => InType::I8,
            4 => InType::I16,
            512 => InType::U16,
            8 => InType::I32,
            768 => InType::U32,
            1024 => InType::I64,
            1280 => InType::U64,
            16 => InType::F32,
            64 => InType::F64,
            1 => bail!("unsupported datatype 1 (binary, 1 bit per voxel)"),
            32 | 1792 | 2048 => {
                bail!("unsupported datatype {code} (complex): VISTA3D needs real-valued CT images")
            }
            128 | 2304 => bail!(
                "unsupported datatype {code} (RGB/RGBA colour): VISTA3D needs a scalar CT image"
            ),
            1536 => bail!("unsupported datatype 1536 (float128)"),
            _ => bail!("unknown datatype code {code}"),
        })
    }

    fn size(self) -> usize {
        match self {
            InType::U8 | InType::I8 => 1,
            InType::I16 | InType::U16 => 2,
            InType::I32 | InType::U32 | InType::F32 => 4,
            InType::I64 | InType::U64 | InType::F64 => 8,
        }
    }
}

fn read_impl(path: &Path) -> Result<NiftiImage> {
    let file = File::open(path).context("cannot open the file")?;
    let file_len = file.metadata().context("cannot stat the file")?.len();
    ensure!(file_len > 0, "the file is empty");
    let mut file = BufReader::with_capacity(1 << 20, file);
    let is_gzip = {
        let head = std::io::BufRead::fill_buf(&mut file).context("cannot read the file")?;
        head.len() >= 2 && head[0] == 0x1f && head[1] == 0x8b
    };
    let (mut reader, max_bytes): (Box<dyn Read>, u64) = if is_gzip {
        (
            Box::new(MultiGzDecoder::new(file)),
            file_len
                .saturating_mul(MAX_DEFLATE_RATIO)
                .saturating_add(1 << 16),
        )
    } else {
        (Box::new(file), file_len)
    };
    let what = if is_gzip { "decompressed data" } else { "file" };
    let io_err = |e: io::Error, part: &str| -> anyhow::Error {
        if is_gzip && e.kind() != io::ErrorKind::UnexpectedEof {
            anyhow!("corrupt gzip stream while reading the {part}: {e}")
        } else {
            anyhow!("error while reading the {part}: {e}")
        }
    };

    // Header: sniff the version from sizeof_hdr, then read the rest.
    let mut hdr_bytes = vec![0u8; 540];
    let got = read_full(&mut reader, &mut hdr_bytes[..4]).map_err(|e| io_err(e, "header"))?;
    ensure!(
        got == 4,
        "truncated: the {what} has only {got} bytes, too short for a NIfTI header"
    );
    let (version, _) =
        super::nifti_header::sniff([hdr_bytes[0], hdr_bytes[1], hdr_bytes[2], hdr_bytes[3]])?;
    let hsize = version.header_size();
    hdr_bytes.truncate(hsize);
    let got = 4 + read_full(&mut reader, &mut hdr_bytes[4..]).map_err(|e| io_err(e, "header"))?;
    ensure!(
        got == hsize,
        "truncated header: the {what} has only {got} bytes, a NIfTI-{} header has {hsize}",
        version.number()
    );
    let mut header = NiftiHeader::parse(&hdr_bytes)?;

    // What the data is and where.
    let dtype = InType::from_code(header.datatype)?;
    let shape = header.shape()?;
    let dims = spatial_dims(&shape)?;
    let scaling = header.slope_inter()?;
    let vox_offset = header.vox_offset;
    ensure!(
        vox_offset.is_finite() && vox_offset >= 0.0,
        "invalid vox_offset {vox_offset}"
    );
    let offset = vox_offset.trunc() as u64; // nibabel: int(vox_offset)
    ensure!(
        offset >= version.min_vox_offset() as u64,
        "vox_offset {vox_offset} points inside the header (a single-file NIfTI-{} needs at least {})",
        version.number(),
        version.min_vox_offset()
    );
    let nvox = dims
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64));
    let nbytes = nvox.and_then(|n| n.checked_mul(dtype.size() as u64));
    let end = nbytes.and_then(|n| n.checked_add(offset));
    let nbytes = match (nbytes, end) {
        (Some(n), Some(e)) if e <= max_bytes => n,
        _ => {
            let shape_s = format!("{shape:?}");
            if is_gzip {
                bail!(
                    "header dims {shape_s} x {} bytes at offset {offset} exceed what a {file_len}-byte gzip file can \
                     hold: corrupt header",
                    dtype.size()
                )
            } else {
                bail!(
                    "truncated file: the header says {shape_s} voxels of {} bytes at offset {offset}, which needs \
                     {} bytes, but the file has only {file_len}",
                    dtype.size(),
                    end.map_or_else(|| "more than 2^64".to_string(), |e| e.to_string())
                )
            }
        }
    };

    // Extension flag and extensions (everything up to vox_offset), kept verbatim.
    let mut ext = vec![0u8; (offset - hsize as u64) as usize];
    let got = read_full(&mut reader, &mut ext).map_err(|e| io_err(e, "header extensions"))?;
    ensure!(
        got == ext.len(),
        "truncated: the {what} ends at byte {} before vox_offset {offset}",
        hsize + got
    );
    header.extender.copy_from_slice(&ext[..4]);
    header.extension_bytes = ext.split_off(4);

    // Voxel data.
    let nbytes = usize::try_from(nbytes)
        .map_err(|_| anyhow!("voxel data of {nbytes} bytes is too large"))?;
    let mut raw = Vec::with_capacity(nbytes);
    (&mut reader)
        .take(nbytes as u64)
        .read_to_end(&mut raw)
        .map_err(|e| io_err(e, "voxel data"))?;
    ensure!(
        raw.len() == nbytes,
        "truncated voxel data: the header says {shape:?} voxels of {} bytes ({nbytes} bytes from offset {offset}) but \
         the {what} has only {} bytes after the offset",
        dtype.size(),
        raw.len()
    );
    if is_gzip {
        // Reach the end of the stream so that a truncated or corrupt gzip file (bad CRC / length) is an error.
        io::copy(&mut reader, &mut io::sink()).map_err(|e| io_err(e, "end of the gzip stream"))?;
    }
    drop(reader);

    let big = header.endianness == Endianness::Big;
    let data = decode_to_c_order(&raw, dims, dtype, big, scaling);
    drop(raw);
    let affine = header.affine()?;
    let data =
        Array3::from_shape_vec(dims, data).map_err(|e| anyhow!("internal shape error: {e}"))?;
    Ok(NiftiImage {
        header,
        volume: Volume { data, affine },
    })
}

/// Reads until `buf` is full or the stream ends; returns the number of bytes read.
fn read_full(r: &mut dyn Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// The `[x, y, z]` size of a nibabel shape: fewer than 3 dims are padded with 1; extra dims must all be 1.
fn spatial_dims(shape: &[usize]) -> Result<[usize; 3]> {
    let mut dims = [1usize; 3];
    for (d, &s) in dims.iter_mut().zip(shape) {
        *d = s;
    }
    if shape.len() > 3 {
        let extra = &shape[3..];
        if extra.iter().any(|&s| s != 1) {
            let volumes = extra
                .iter()
                .try_fold(1usize, |a, &s| a.checked_mul(s))
                .unwrap_or(usize::MAX);
            if shape.len() == 4 {
                bail!(
                    "the image is 4-D with {volumes} volumes; VISTA3D segments 3-D images (shape {shape:?}: extract \
                     one volume first)"
                );
            }
            bail!(
                "the image is {}-D with {volumes} volumes; VISTA3D segments 3-D images (shape {shape:?})",
                shape.len()
            );
        }
    }
    Ok(dims)
}

/// A voxel type as stored in a file.
trait Raw: Copy {
    const SIZE: usize;
    fn read(b: &[u8], big: bool) -> Self;
    fn to_f32(self) -> f32;
    fn to_f64(self) -> f64;
}

macro_rules! raw_impl {
    ($t:ty) => {
        impl Raw for $t {
            const SIZE: usize = std::mem::size_of::<$t>();
            #[inline(always)]
            fn read(b: &[u8], big: bool) -> Self {
                let mut a = [0u8; std::mem::size_of::<$t>()];
                a.copy_from_slice(b);
                if big {
                    <$t>::from_be_bytes(a)
                } else {
                    <$t>::from_le_bytes(a)
                }
            }
            #[inline(always)]
            fn to_f32(self) -> f32 {
                self as f32
            }
            #[inline(always)]
            fn to_f64(self) -> f64 {
                self as f64
            }
        }
    };
}

raw_impl!(u8);
raw_impl!(i8);
raw_impl!(i16);
raw_impl!(u16);
raw_impl!(i32);
raw_impl!(u32);
raw_impl!(i64);
raw_impl!(u64);
raw_impl!(f32);
raw_impl!(f64);

/// Converts file-order (x fastest) raw voxels to `f32` in C order `[x, y, z]`, applying the scaling.
fn decode_to_c_order(
    raw: &[u8],
    dims: [usize; 3],
    dtype: InType,
    big: bool,
    scaling: Option<(f64, f64)>,
) -> Vec<f32> {
    // nibabel: (slope, inter) == (1, 0) returns the raw array (then cast to float32 directly).
    let scaling = scaling.filter(|&(s, i)| !(s == 1.0 && i == 0.0));
    match dtype {
        InType::U8 => decode_typed::<u8>(raw, dims, big, scaling),
        InType::I8 => decode_typed::<i8>(raw, dims, big, scaling),
        InType::I16 => decode_typed::<i16>(raw, dims, big, scaling),
        InType::U16 => decode_typed::<u16>(raw, dims, big, scaling),
        InType::I32 => decode_typed::<i32>(raw, dims, big, scaling),
        InType::U32 => decode_typed::<u32>(raw, dims, big, scaling),
        InType::I64 => decode_typed::<i64>(raw, dims, big, scaling),
        InType::U64 => decode_typed::<u64>(raw, dims, big, scaling),
        InType::F32 => decode_typed::<f32>(raw, dims, big, scaling),
        InType::F64 => decode_typed::<f64>(raw, dims, big, scaling),
    }
}

fn decode_typed<T: Raw>(
    raw: &[u8],
    dims: [usize; 3],
    big: bool,
    scaling: Option<(f64, f64)>,
) -> Vec<f32> {
    match (big, scaling) {
        (false, None) => fortran_bytes_to_c::<T, _>(raw, dims, |b| T::read(b, false).to_f32()),
        (true, None) => fortran_bytes_to_c::<T, _>(raw, dims, |b| T::read(b, true).to_f32()),
        (big, Some((slope, inter))) => {
            // nibabel's apply_read_scaling in float64: multiply only when slope != 1, add only when inter != 0.
            let scale = move |v: f64| -> f32 {
                let mut v = v;
                if slope != 1.0 {
                    v *= slope;
                }
                if inter != 0.0 {
                    v += inter;
                }
                v as f32
            };
            if big {
                fortran_bytes_to_c::<T, _>(raw, dims, move |b| scale(T::read(b, true).to_f64()))
            } else {
                fortran_bytes_to_c::<T, _>(raw, dims, move |b| scale(T::read(b, false).to_f64()))
            }
        }
    }
}

/// Transposes between the file's x-fastest order and C order `[x, y, z]` go through small tiles held in cache:
/// one side is read in long contiguous runs, the tile is transposed in L1, and the other side is written in
/// contiguous runs. (Writing straight through would touch one cache line per voxel on rows whose stride is a
/// multiple of 4 KiB for 512 x 512 slices, all in the same cache set.) The work is split into slabs, one or a few
/// per thread, each a contiguous part of the output.
const TILE_LONG: usize = 256;
/// Short side of a transpose tile (the length of each run written to the strided side).
const TILE_SHORT: usize = 16;

/// Width of the slabs a transpose of `n` rows is split into: about one per thread, at least 64 (long runs per
/// task are worth more than more tasks).
fn slab_width(n: usize) -> usize {
    n.div_ceil(rayon::current_num_threads().max(1))
        .max(64)
        .min(n.max(1))
}

/// Transposes x-fastest raw voxels (`T::SIZE` bytes each) into a C-order `[x, y, z]` `f32` array, converting each
/// voxel with `f`. Parallel over slabs of x; within a slab, for each y, a tile of up to `TILE_LONG` x by
/// `TILE_SHORT` z is read from `TILE_SHORT` file rows and written as `TILE_SHORT`-long runs of output rows.
fn fortran_bytes_to_c<T: Raw, F: Fn(&[u8]) -> f32 + Sync>(
    raw: &[u8],
    dims: [usize; 3],
    f: F,
) -> Vec<f32> {
    let [nx, ny, nz] = dims;
    let n = nx * ny * nz;
    let mut out = vec![0f32; n];
    if n == 0 {
        return out;
    }
    let s = T::SIZE;
    let yz = ny * nz;
    let width = slab_width(nx);
    out.par_chunks_mut(width * yz)
        .enumerate()
        .for_each(|(ci, slab)| {
            let x0 = ci * width;
            let bx = slab.len() / yz;
            let mut tile = vec![0f32; TILE_LONG * TILE_SHORT];
            for y in 0..ny {
                for tx in (0..bx).step_by(TILE_LONG) {
                    let wx = (bx - tx).min(TILE_LONG);
                    for z0 in (0..nz).step_by(TILE_SHORT) {
                        let wz = (nz - z0).min(TILE_SHORT);
                        for dz in 0..wz {
                            let start = (((z0 + dz) * ny + y) * nx + x0 + tx) * s;
                            let row = &raw[start..start + wx * s];
                            for (k, b) in row.chunks_exact(s).enumerate() {
                                tile[k * TILE_SHORT + dz] = f(b);
                            }
                        }
                        for k in 0..wx {
                            let o = (tx + k) * yz + y * nz + z0;
                            slab[o..o + wz]
                                .copy_from_slice(&tile[k * TILE_SHORT..k * TILE_SHORT + wz]);
                        }
                    }
                }
            }
        });
    out
}

// ---------------------------------------------------------------------------------------------------------------
// Writing

/// Writes `data` (indexed `[x, y, z]`) as a NIfTI file with the geometry of `reference`, atomically.
///
/// The header is `reference`'s, in the same version (NIfTI-1 or NIfTI-2) but always little-endian, with every
/// field kept (sform and qform with their codes, quaternion, offsets, pixdim including qfac, xyzt_units,
/// descrip, intent, ...) except: `dim` = `[3, X, Y, Z, 1, 1, 1, 1]`, `pixdim[4..8]` = 1, `datatype`/`bitpix`
/// from `dtype`, `scl_slope` = 1, `scl_inter` = 0, `cal_min` = `cal_max` = 0, `vox_offset` = 352 (NIfTI-1) or
/// 544 (NIfTI-2) and no extensions. A NIfTI-2 reference with a zero EOL check gets a valid one. Voxels are
/// written x fastest. A path ending in `.gz` is gzip-compressed (level 1, as nibabel writes).
///
/// `Uint8` / `Int16` values must be integers within the type's range (label ids); anything else (fractions,
/// NaN, out of range) is an error, never a silent wrap. The file is written to a temporary file in the
/// destination directory (created if missing) and renamed into place at the end; on any error nothing is left
/// behind (neither the temporary file nor directories this call created).
pub fn write_nifti(
    path: &Path,
    data: &Array3<f32>,
    reference: &NiftiHeader,
    dtype: OutputDtype,
) -> Result<()> {
    write_impl(path, data, reference, dtype)
        .map_err(|e| anyhow!("cannot write NIfTI file {}: {e:#}", path.display()))
}

fn write_impl(
    path: &Path,
    data: &Array3<f32>,
    reference: &NiftiHeader,
    dtype: OutputDtype,
) -> Result<()> {
    let shape = data.shape();
    let dims = [shape[0], shape[1], shape[2]];
    ensure!(
        dims.iter().all(|&d| d >= 1),
        "cannot write an empty volume of shape {dims:?}"
    );
    let name = path
        .file_name()
        .ok_or_else(|| anyhow!("the path has no file name"))?;

    let mut header = reference.clone();
    header.endianness = Endianness::Little;
    if header.version == NiftiVersion::Nifti1 {
        ensure!(
            dims.iter().all(|&d| d <= i16::MAX as usize),
            "shape {dims:?} does not fit a NIfTI-1 header (at most 32767 per dimension)"
        );
    }
    header.dim = [
        3,
        dims[0] as i64,
        dims[1] as i64,
        dims[2] as i64,
        1,
        1,
        1,
        1,
    ];
    for p in &mut header.pixdim[4..] {
        *p = 1.0;
    }
    header.datatype = dtype.code();
    header.bitpix = (dtype.size() * 8) as i16;
    header.scl_slope = 1.0;
    header.scl_inter = 0.0;
    header.cal_min = 0.0;
    header.cal_max = 0.0;
    header.vox_offset = header.version.min_vox_offset() as f64;
    if header.version == NiftiVersion::Nifti2 {
        header.eol_check = [13, 10, 26, 10];
    }
    header.extender = [0; 4];
    header.extension_bytes.clear();
    let mut head = header.to_bytes()?;
    head.extend_from_slice(&[0u8; 4]);

    // Encode (and validate) everything before touching the file system.
    let standard = data.as_standard_layout();
    let values = standard
        .as_slice()
        .ok_or_else(|| anyhow!("internal error: non-contiguous array"))?;
    let body = match dtype {
        OutputDtype::Float32 => c_to_fortran_bytes::<4, _>(values, dims, |v| Ok(v.to_le_bytes())),
        // `as` saturates and maps NaN to 0, so the round trip is exact only for integers in range (-0.0 -> 0).
        OutputDtype::Uint8 => c_to_fortran_bytes::<1, _>(values, dims, |v| {
            let u = v as u8;
            if u as f32 == v {
                Ok([u])
            } else {
                Err(v)
            }
        }),
        OutputDtype::Int16 => c_to_fortran_bytes::<2, _>(values, dims, |v| {
            let i = v as i16;
            if i as f32 == v {
                Ok(i.to_le_bytes())
            } else {
                Err(v)
            }
        }),
    }
    .map_err(|(i, v)| {
        let (x, y, z) = (i / (dims[1] * dims[2]), (i / dims[2]) % dims[1], i % dims[2]);
        let range = if dtype == OutputDtype::Uint8 { "0..=255" } else { "-32768..=32767" };
        anyhow!("voxel [{x}, {y}, {z}] is {v}, which {dtype} cannot hold: values must be integers in {range}")
    })?;
    let gzip = name.to_string_lossy().to_ascii_lowercase().ends_with(".gz");

    crate::fsutil::write_atomic_with(path, |w| {
        if gzip {
            let mut enc = GzEncoder::new(w, Compression::new(1));
            enc.write_all(&head)?;
            enc.write_all(&body)?;
            enc.finish()?;
        } else {
            w.write_all(&head)?;
            w.write_all(&body)?;
        }
        Ok(())
    })
}

/// Transposes C-order `[x, y, z]` values into x-fastest bytes, `S` bytes per voxel from `enc`; returns the C-order
/// index and value of an invalid voxel. Parallel over slabs of z; within a slab, for each y, a tile of up to
/// `TILE_LONG` z by 64 x is read from 64 array rows and written as runs of file rows.
fn c_to_fortran_bytes<const S: usize, F>(
    data: &[f32],
    dims: [usize; 3],
    enc: F,
) -> Result<Vec<u8>, (usize, f32)>
where
    F: Fn(f32) -> Result<[u8; S], f32> + Sync,
{
    const TX: usize = 64;
    let [nx, ny, nz] = dims;
    let xy = nx * ny;
    let mut out = vec![0u8; xy * nz * S];
    if out.is_empty() {
        return Ok(out);
    }
    let width = slab_width(nz);
    out.par_chunks_mut(width * xy * S)
        .enumerate()
        .try_for_each(|(ci, slab)| {
            let z0 = ci * width;
            let bz = slab.len() / (xy * S);
            let mut tile = [[0u8; S]; TILE_LONG * TX];
            for y in 0..ny {
                for tz in (0..bz).step_by(TILE_LONG) {
                    let wz = (bz - tz).min(TILE_LONG);
                    for x0 in (0..nx).step_by(TX) {
                        let wx = (nx - x0).min(TX);
                        for dx in 0..wx {
                            let start = ((x0 + dx) * ny + y) * nz + z0 + tz;
                            for (k, &v) in data[start..start + wz].iter().enumerate() {
                                tile[k * TX + dx] = enc(v).map_err(|v| (start + k, v))?;
                            }
                        }
                        for k in 0..wz {
                            let o = (((tz + k) * ny + y) * nx + x0) * S;
                            let dst = &mut slab[o..o + wx * S];
                            for (d, t) in dst.chunks_exact_mut(S).zip(&tile[k * TX..k * TX + wx]) {
                                d.copy_from_slice(t);
                            }
                        }
                    }
                }
            }
            Ok(())
        })?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtype_names_parse() {
        for (s, d) in [
            ("float32", OutputDtype::Float32),
            ("np.uint8", OutputDtype::Uint8),
            ("numpy.int16", OutputDtype::Int16),
            (" UINT8 ", OutputDtype::Uint8),
        ] {
            assert_eq!(s.parse::<OutputDtype>().unwrap(), d);
        }
        assert!("int32".parse::<OutputDtype>().is_err());
        assert_eq!(OutputDtype::Int16.to_string(), "int16");
    }

    #[test]
    fn transposes_are_inverse() {
        // Sizes beyond one slab and one tile on every axis, none a multiple of the tile sizes.
        for dims in [[37, 5, 70], [601, 3, 599], [1, 1, 1], [2, 300, 1]] {
            let n = dims.iter().product::<usize>();
            let c: Vec<f32> = (0..n).map(|i| i as f32).collect();
            let bytes = c_to_fortran_bytes::<4, _>(&c, dims, |v| Ok(v.to_le_bytes())).unwrap();
            // File order: x fastest.
            let at = |x: usize, y: usize, z: usize| {
                let i = ((z * dims[1] + y) * dims[0] + x) * 4;
                f32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]])
            };
            for (x, y, z) in [
                (0, 0, 0),
                (dims[0] - 1, dims[1] - 1, dims[2] - 1),
                (dims[0] / 2, dims[1] / 3, dims[2] / 5),
            ] {
                assert_eq!(at(x, y, z), c[(x * dims[1] + y) * dims[2] + z], "{dims:?}");
            }
            let back = fortran_bytes_to_c::<f32, _>(&bytes, dims, |b| f32::read(b, false));
            assert!(back == c, "{dims:?}");
            let u8s = c_to_fortran_bytes::<1, _>(&c, dims, |v| Ok([v as u8])).unwrap();
            let back = fortran_bytes_to_c::<u8, _>(&u8s, dims, |b| u8::read(b, false).to_f32());
            assert!(
                back.iter().zip(&c).all(|(&b, &v)| b == (v as u8) as f32),
                "{dims:?}"
            );
        }
        let dims = [37, 5, 70];
        let c: Vec<f32> = (0..37 * 5 * 70).map(|i| i as f32).collect();
        let bad =
            c_to_fortran_bytes::<1, _>(
                &c,
                dims,
                |v| if v < 100.0 { Ok([v as u8]) } else { Err(v) },
            );
        let (i, v) = bad.unwrap_err();
        assert!(v >= 100.0 && c[i] == v);
    }

    #[test]
    fn scaling_follows_nibabel() {
        // int16 big-endian 3 with slope 0.5 and inter -1 -> 0.5; -0.0 stays -0.0 when inter is 0.
        let raw = [0u8, 3];
        let v = decode_to_c_order(&raw, [1, 1, 1], InType::I16, true, Some((0.5, -1.0)));
        assert_eq!(v, vec![0.5]);
        let raw = (-0.0f32).to_le_bytes();
        let v = decode_to_c_order(&raw, [1, 1, 1], InType::F32, false, Some((2.0, 0.0)));
        assert!(v[0] == 0.0 && v[0].is_sign_negative());
        let raw = 16_777_217i32.to_le_bytes();
        assert_eq!(
            decode_to_c_order(&raw, [1, 1, 1], InType::I32, false, None),
            vec![16_777_216.0]
        );
    }

    #[test]
    fn extra_dims_must_be_one() {
        assert_eq!(spatial_dims(&[4, 5]).unwrap(), [4, 5, 1]);
        assert_eq!(spatial_dims(&[4, 5, 6, 1, 1]).unwrap(), [4, 5, 6]);
        let e = spatial_dims(&[4, 5, 6, 10]).unwrap_err().to_string();
        assert!(
            e.contains("4-D with 10 volumes; VISTA3D segments 3-D images"),
            "{e}"
        );
        assert!(spatial_dims(&[4, 5, 6, 1, 3]).is_err());
    }
}
