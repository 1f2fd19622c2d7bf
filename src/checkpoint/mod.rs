//! Reading and writing PyTorch / MONAI checkpoints in pure Rust (no Python, no libtorch).
//!
//! Two formats are supported, detected from the file contents rather than the extension:
//! - PyTorch's zip+pickle format written by `torch.save` (torch >= 1.6), e.g. a MONAI bundle's
//!   `model.pt`, read through the `zip` crate (stored or deflated records, CRC-32 checked by the crate,
//!   zip64). Pickles are read by a restricted unpickler that runs no code and only accepts tensors,
//!   storages and plain containers.
//! - safetensors. The resumable training state `vista3d train` writes (`last.safetensors`: the network
//!   under `model.`, the optimizer under `optimizer.`) is a checkpoint too: reading it gives its network
//!   part.
//!
//! Files are memory-mapped. [`read_checkpoint`] gives owned [`RawTensor`]s (contiguous, row-major,
//! little-endian bytes); [`Checkpoint::open`] is what [`crate::load_model`] uses: tensors stored as they are
//! stay in the mapped file until they are copied into the network. Errors are [`CheckpointError`]s naming
//! the file.
//!
//! ```no_run
//! # fn main() -> Result<(), vista3d::checkpoint::CheckpointError> {
//! let sd = vista3d::checkpoint::read_checkpoint(std::path::Path::new("model.pt"))?;
//! for (name, t) in sd.iter() {
//!     println!("{name}: {} {:?}", t.dtype, t.shape);
//! }
//! # Ok(())
//! # }
//! ```

mod error;
mod open;
mod pickle;
mod safetensors_io;
mod torch_zip;
mod zip_writer;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::ops::Range;
use std::path::Path;

pub(crate) use error::describe_mismatch;
pub use error::{CheckpointError, ShapeMismatch, WeightsError};
pub use open::Checkpoint;

/// Metadata key that marks a `vista3d train` resumable state (`last.safetensors`); its value is the
/// training state as JSON.
pub const TRAINING_STATE_KEY: &str = "vista3d.training_state";
/// Prefix of the network tensors inside a training state (the optimizer's are under `optimizer.`).
pub const TRAINING_MODEL_PREFIX: &str = "model.";

/// Element type of a tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// 32-bit float (`torch.float32`).
    F32,
    /// 64-bit float (`torch.float64`).
    F64,
    /// IEEE half precision (`torch.float16`).
    F16,
    /// bfloat16 (`torch.bfloat16`).
    BF16,
    /// 64-bit signed integer (`torch.int64`).
    I64,
    /// 32-bit signed integer (`torch.int32`).
    I32,
    /// 16-bit signed integer (`torch.int16`).
    I16,
    /// 8-bit signed integer (`torch.int8`).
    I8,
    /// 8-bit unsigned integer (`torch.uint8`).
    U8,
    /// Boolean stored as one byte, 0 or 1 (`torch.bool`).
    Bool,
}

impl DType {
    /// Every supported dtype.
    pub const ALL: [DType; 10] = [
        DType::F32,
        DType::F64,
        DType::F16,
        DType::BF16,
        DType::I64,
        DType::I32,
        DType::I16,
        DType::I8,
        DType::U8,
        DType::Bool,
    ];

    /// Size of one element in bytes.
    pub fn size_bytes(self) -> usize {
        match self {
            DType::F64 | DType::I64 => 8,
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 | DType::I16 => 2,
            DType::I8 | DType::U8 | DType::Bool => 1,
        }
    }

    /// PyTorch's name without the `torch.` prefix, e.g. `"float32"`.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::F64 => "float64",
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
            DType::I64 => "int64",
            DType::I32 => "int32",
            DType::I16 => "int16",
            DType::I8 => "int8",
            DType::U8 => "uint8",
            DType::Bool => "bool",
        }
    }

    /// Inverse of [`DType::name`] (also accepts a `torch.` prefix).
    pub fn from_name(name: &str) -> Option<DType> {
        let name = name.strip_prefix("torch.").unwrap_or(name);
        DType::ALL.into_iter().find(|d| d.name() == name)
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A dense tensor: contiguous, row-major, little-endian element bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct RawTensor {
    /// Element type.
    pub dtype: DType,
    /// Dimensions; empty for a 0-dim scalar.
    pub shape: Vec<usize>,
    /// `numel() * dtype.size_bytes()` bytes.
    pub data: Vec<u8>,
}

impl RawTensor {
    /// Builds a tensor, checking that `data` has exactly the size `dtype` and `shape` imply.
    pub fn new(dtype: DType, shape: Vec<usize>, data: Vec<u8>) -> Result<Self, SizeMismatch> {
        let t = RawTensor { dtype, shape, data };
        t.validate()?;
        Ok(t)
    }

    /// Number of elements (1 for a scalar, 0 if any dimension is 0; saturates on overflow).
    pub fn numel(&self) -> usize {
        self.shape
            .iter()
            .fold(1usize, |acc, &d| acc.saturating_mul(d))
    }

    /// Checks that `data.len()` matches the dtype and shape.
    pub fn validate(&self) -> Result<(), SizeMismatch> {
        let expected = self
            .shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .and_then(|n| n.checked_mul(self.dtype.size_bytes()));
        if expected == Some(self.data.len()) {
            return Ok(());
        }
        Err(SizeMismatch {
            dtype: self.dtype,
            shape: self.shape.clone(),
            needed: expected,
            actual: self.data.len(),
        })
    }

    /// Converts the elements to `f32` (integers and bools by value; float64 is rounded).
    pub fn to_f32_vec(&self) -> Result<Vec<f32>, SizeMismatch> {
        self.validate()?;
        let d = &self.data;
        macro_rules! conv {
            ($n:literal, $f:expr) => {
                d.chunks_exact($n)
                    .map(|c| {
                        let mut a = [0u8; $n];
                        a.copy_from_slice(c);
                        $f(a)
                    })
                    .collect()
            };
        }
        Ok(match self.dtype {
            DType::F32 => conv!(4, f32::from_le_bytes),
            DType::F64 => conv!(8, |a| f64::from_le_bytes(a) as f32),
            DType::F16 => conv!(2, |a| half::f16::from_le_bytes(a).to_f32()),
            DType::BF16 => conv!(2, |a| half::bf16::from_le_bytes(a).to_f32()),
            DType::I64 => conv!(8, |a| i64::from_le_bytes(a) as f32),
            DType::I32 => conv!(4, |a| i32::from_le_bytes(a) as f32),
            DType::I16 => conv!(2, |a| f32::from(i16::from_le_bytes(a))),
            DType::I8 => d.iter().map(|&b| f32::from(b as i8)).collect(),
            DType::U8 => d.iter().map(|&b| f32::from(b)).collect(),
            DType::Bool => d.iter().map(|&b| if b != 0 { 1.0 } else { 0.0 }).collect(),
        })
    }

    /// Builds a float32 tensor.
    ///
    /// # Panics
    /// If `values.len()` differs from the element count of `shape` (a programming error).
    pub fn from_f32(shape: Vec<usize>, values: &[f32]) -> Self {
        let numel: usize = shape.iter().product();
        assert_eq!(
            numel,
            values.len(),
            "RawTensor::from_f32: shape {shape:?} needs {numel} values, got {}",
            values.len()
        );
        RawTensor {
            dtype: DType::F32,
            shape,
            data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }
}

/// A tensor whose data size does not match its dtype and shape.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{dtype} tensor of shape {shape:?} needs {} bytes but has {actual}",
    needed.map_or_else(|| "too many".to_string(), |n| n.to_string())
)]
pub struct SizeMismatch {
    pub dtype: DType,
    pub shape: Vec<usize>,
    /// Bytes the dtype and shape need (`None`: more than the address space).
    pub needed: Option<usize>,
    /// Bytes the tensor has.
    pub actual: usize,
}

impl fmt::Debug for RawTensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RawTensor")
            .field("dtype", &self.dtype)
            .field("shape", &self.shape)
            .field("bytes", &self.data.len())
            .finish()
    }
}

/// The on-disk format a checkpoint was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CheckpointFormat {
    /// PyTorch's zip+pickle format (`torch.save`, torch >= 1.6).
    TorchZip,
    /// safetensors.
    Safetensors,
    /// The resumable state `vista3d train` writes (`last.safetensors`): safetensors holding the network
    /// under `model.`, the optimizer state and the training state as metadata.
    TrainingState,
}

impl fmt::Display for CheckpointFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CheckpointFormat::TorchZip => "PyTorch zip+pickle (torch.save)",
            CheckpointFormat::Safetensors => "safetensors",
            CheckpointFormat::TrainingState => {
                "vista3d training state (safetensors; its network weights, not the optimizer state)"
            }
        })
    }
}

/// One tensor borrowed from a [`StateDict`] or an opened [`Checkpoint`].
#[derive(Debug, Clone, Copy)]
pub struct TensorView<'a> {
    pub name: &'a str,
    pub dtype: DType,
    pub shape: &'a [usize],
    /// `numel * dtype.size_bytes()` contiguous, row-major, little-endian bytes.
    pub data: &'a [u8],
}

impl TensorView<'_> {
    /// Number of elements (1 for a scalar).
    pub fn numel(&self) -> usize {
        self.shape
            .iter()
            .fold(1usize, |acc, &d| acc.saturating_mul(d))
    }
}

/// Named tensors that can be loaded into a network: a [`StateDict`] in memory or an opened
/// [`Checkpoint`] (whose tensors stay in the memory-mapped file until they are copied).
pub trait TensorSource {
    /// Every tensor, in file order.
    fn tensor_views(&self) -> Vec<TensorView<'_>>;

    /// Says that `view`'s bytes were copied and are not needed soon: a memory-mapped source lets the
    /// kernel drop those pages from this process (they are read again from the file if used again).
    fn release(&self, _view: &TensorView<'_>) {}
}

/// Named tensors read from a checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct StateDict {
    /// Format of the file the tensors came from.
    pub format: CheckpointFormat,
    /// Tensors in file order (state-dict order for torch, offset order for safetensors).
    pub tensors: Vec<(String, RawTensor)>,
}

impl StateDict {
    /// The tensor with this name.
    pub fn get(&self, name: &str) -> Option<&RawTensor> {
        self.tensors.iter().find(|(n, _)| n == name).map(|(_, t)| t)
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// Whether there are no tensors.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// Tensor names in file order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.iter().map(|(n, _)| n.as_str())
    }

    /// `(name, tensor)` pairs in file order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &RawTensor)> {
        self.tensors.iter().map(|(n, t)| (n.as_str(), t))
    }

    /// Total size of the tensor data in bytes.
    pub fn total_bytes(&self) -> usize {
        self.tensors.iter().map(|(_, t)| t.data.len()).sum()
    }

    /// Consumes the state dict into a name -> tensor map.
    pub fn into_map(self) -> HashMap<String, RawTensor> {
        self.tensors.into_iter().collect()
    }
}

impl TensorSource for StateDict {
    fn tensor_views(&self) -> Vec<TensorView<'_>> {
        self.tensors
            .iter()
            .map(|(name, t)| TensorView {
                name,
                dtype: t.dtype,
                shape: &t.shape,
                data: &t.data,
            })
            .collect()
    }
}

/// A tensor as a reader found it: its bytes either still in the checkpoint file (a byte range of the
/// mapped file) or in memory (decompressed, gathered from a strided view, or byte-swapped).
pub(crate) struct StoredTensor {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub bytes: StoredBytes,
}

/// Where a [`StoredTensor`]'s contiguous little-endian bytes are.
pub(crate) enum StoredBytes {
    /// This byte range of the file.
    InFile(Range<usize>),
    /// Owned bytes.
    Owned(Vec<u8>),
}

/// Reads a checkpoint's network weights into memory: a `torch.save` state dict (zip format), a
/// safetensors file, or the network part of a `vista3d train` training state (`last.safetensors`).
///
/// The format is detected from the content. For torch files the state dict may also be wrapped
/// in a dict under `"model"` or `"state_dict"` (as MONAI's `CheckpointSaver` writes); non-tensor
/// entries are skipped with a warning. Errors name the file and the problem.
pub fn read_checkpoint(path: &Path) -> Result<StateDict, CheckpointError> {
    Ok(Checkpoint::open(path)?.into_state_dict())
}

/// Reads every tensor of a checkpoint file as stored: unlike [`read_checkpoint`], a training state keeps
/// its optimizer tensors and the `model.` prefix of its network tensors (what resuming needs).
pub fn read_all_tensors(path: &Path) -> Result<StateDict, CheckpointError> {
    Ok(Checkpoint::open_every_tensor(path)?.into_state_dict())
}

/// The tensors of a safetensors file held in memory (`bytes`; `path` names it in errors), in file order (e.g. a
/// training checkpoint that rank 0 read and sent to the other ranks).
pub fn safetensors_from_bytes(
    bytes: &[u8],
    path: &Path,
) -> Result<Vec<(String, RawTensor)>, CheckpointError> {
    let (stored, _) = safetensors_io::read(bytes).map_err(|e| e.in_file(path))?;
    stored
        .into_iter()
        .map(|t| {
            let data = match t.bytes {
                StoredBytes::InFile(range) => bytes[range].to_vec(),
                StoredBytes::Owned(v) => v,
            };
            let tensor = RawTensor::new(t.dtype, t.shape.clone(), data).map_err(|e| {
                CheckpointError::Corrupt {
                    path: path.to_path_buf(),
                    detail: format!("tensor '{}': {e}", t.name),
                }
            })?;
            Ok((t.name, tensor))
        })
        .collect()
}

/// Checks names are unique and data sizes match shapes.
fn validate_for_write(tensors: &[(String, RawTensor)]) -> Result<(), String> {
    let mut seen = HashSet::new();
    for (name, t) in tensors {
        if !seen.insert(name.as_str()) {
            return Err(format!("duplicate tensor name '{name}'"));
        }
        t.validate().map_err(|e| format!("tensor '{name}': {e}"))?;
    }
    Ok(())
}

/// Writes a safetensors file (via a temporary file in the same directory, renamed at the end).
///
/// Tensors are laid out like `safetensors.torch.save_file` does; `metadata` becomes the
/// `__metadata__` header entry.
pub fn write_safetensors(
    path: &Path,
    tensors: &[(String, RawTensor)],
    metadata: Option<HashMap<String, String>>,
) -> Result<(), CheckpointError> {
    validate_for_write(tensors)
        .and_then(|()| {
            crate::fsutil::write_atomic_with(path, |w| safetensors_io::write(w, tensors, metadata))
                .map_err(|e| format!("{e:#}"))
        })
        .map_err(|detail| CheckpointError::Write {
            path: path.to_path_buf(),
            what: "safetensors file",
            detail,
        })
}

/// Writes `tensors` as `torch.save(OrderedDict(tensors))` would, loadable with
/// `torch.load(path, weights_only=True)`.
///
/// The archive layout matches torch 2.x (stored zip entries under `archive/`, 64-byte aligned
/// records, protocol-2 `data.pkl`). Written via a temporary file renamed at the end.
pub fn write_torch_state_dict(
    path: &Path,
    tensors: &[(String, RawTensor)],
) -> Result<(), CheckpointError> {
    validate_for_write(tensors)
        .and_then(|()| {
            crate::fsutil::write_atomic_with(path, |w| {
                torch_zip::write(w, tensors, &torch_zip::WriteOptions::default()).map(|_| ())
            })
            .map_err(|e| format!("{e:#}"))
        })
        .map_err(|detail| CheckpointError::Write {
            path: path.to_path_buf(),
            what: "torch checkpoint",
            detail,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtype_names_round_trip() {
        for d in DType::ALL {
            assert_eq!(DType::from_name(d.name()), Some(d));
            assert_eq!(DType::from_name(&format!("torch.{d}")), Some(d));
        }
        assert_eq!(DType::from_name("complex64"), None);
    }

    #[test]
    fn to_f32_converts_every_dtype() {
        let cases: Vec<(DType, Vec<u8>, Vec<f32>)> = vec![
            (DType::F64, (-1.5f64).to_le_bytes().to_vec(), vec![-1.5]),
            (
                DType::F16,
                half::f16::from_f32(0.25).to_le_bytes().to_vec(),
                vec![0.25],
            ),
            (
                DType::BF16,
                half::bf16::from_f32(-2.0).to_le_bytes().to_vec(),
                vec![-2.0],
            ),
            (DType::I64, (-7i64).to_le_bytes().to_vec(), vec![-7.0]),
            (DType::I32, 9i32.to_le_bytes().to_vec(), vec![9.0]),
            (DType::I16, (-3i16).to_le_bytes().to_vec(), vec![-3.0]),
            (DType::I8, vec![0xff], vec![-1.0]),
            (DType::U8, vec![0xff], vec![255.0]),
            (DType::Bool, vec![1, 0], vec![1.0, 0.0]),
        ];
        for (dtype, data, want) in cases {
            let n = want.len();
            let t = RawTensor::new(dtype, vec![n], data).unwrap();
            assert_eq!(t.to_f32_vec().unwrap(), want, "{dtype}");
        }
        let bad = RawTensor {
            dtype: DType::F32,
            shape: vec![2],
            data: vec![0; 7],
        };
        assert!(bad.to_f32_vec().is_err());
        let t = RawTensor::from_f32(vec![], &[3.0]);
        assert_eq!(t.numel(), 1);
        assert_eq!(t.to_f32_vec().unwrap(), [3.0]);
    }

    #[test]
    fn failed_write_leaves_no_file() {
        use std::fs;
        use std::io::Write;
        let dir = std::env::temp_dir().join(format!("vista3d-ckpt-unit-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let target = dir.join("out.pt");
        let err = crate::fsutil::write_atomic_with(&target, |w| {
            w.write_all(b"partial")?;
            anyhow::bail!("simulated failure")
        });
        assert!(err.is_err());
        assert!(!target.exists());
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 0);
        fs::remove_dir_all(&dir).unwrap();
    }
}
