//! Opening a checkpoint file: format detection, the memory-mapped file, and the training-state view.

use std::collections::HashMap;
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use super::error::ReadError;
use super::{
    safetensors_io, torch_zip, CheckpointError, CheckpointFormat, RawTensor, StateDict,
    StoredBytes, StoredTensor, TensorSource, TensorView, TRAINING_MODEL_PREFIX, TRAINING_STATE_KEY,
};

const LEGACY_MESSAGE: &str = "legacy (pre-1.6, non-zip) torch.save format is not supported; \
                              re-save it with torch >= 1.6";

/// The bytes of a checkpoint file.
pub(crate) enum FileBytes {
    /// The file, memory-mapped read-only.
    Mapped(Mmap),
    /// The file read into memory (where it cannot be mapped, and in unit tests).
    InMemory(Vec<u8>),
}

impl FileBytes {
    /// Maps `file` of `len` bytes (or reads it, where mapping is not supported).
    fn open(file: &File, len: u64) -> Result<Self, ReadError> {
        // SAFETY: the mapping is read-only. As for every memory-mapped reader (torch.load(mmap=True),
        // the safetensors crate's examples, candle), the file must not be truncated or rewritten in place
        // while it is mapped: another process doing so would make reads fault. This program replaces
        // checkpoints only by renaming a new file over the old one, which leaves an existing mapping intact.
        match unsafe { Mmap::map(file) } {
            Ok(map) if map.len() as u64 == len => Ok(FileBytes::Mapped(map)),
            Ok(_) => Err(ReadError::Corrupt(
                "the file changed size while it was opened".into(),
            )),
            Err(e) => {
                log::debug!("cannot memory-map the file ({e}); reading it instead");
                let mut bytes = Vec::new();
                std::io::Read::read_to_end(&mut &*file, &mut bytes)?;
                Ok(FileBytes::InMemory(bytes))
            }
        }
    }

    pub(crate) fn bytes(&self) -> &[u8] {
        match self {
            FileBytes::Mapped(map) => map,
            FileBytes::InMemory(bytes) => bytes,
        }
    }

    /// Lets the kernel drop the pages of `range` from this process (a no-op for bytes in memory). The
    /// bytes stay readable: the next access reads them from the file again.
    pub(crate) fn release(&self, range: Range<usize>) {
        let FileBytes::Mapped(map) = self else {
            return;
        };
        if range.is_empty() || range.end > map.len() {
            return;
        }
        // SAFETY: MADV_DONTNEED on a read-only shared file mapping only unmaps the pages from this
        // process; the contents are unchanged (they are the file's) and are faulted in again on access.
        // The caveat that makes this advice "unchecked" (private, written pages lose their changes) does not
        // apply to a mapping that is never written.
        let advised = unsafe {
            map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, range.start, range.len())
        };
        if let Err(e) = advised {
            log::debug!("madvise(DONTNEED) failed: {e}");
        }
    }
}

/// A checkpoint opened for loading into a network.
///
/// The file is memory-mapped: tensors stored contiguously in it (every tensor of a safetensors file, and
/// of a `torch.save` archive those in stored records, little-endian, not strided views) are borrowed from
/// the mapping, so loading copies each tensor once, into the network, and the pages are released as soon
/// as they are copied. Other tensors (deflated records, strided or big-endian ones) are in memory.
pub struct Checkpoint {
    path: PathBuf,
    format: CheckpointFormat,
    file: FileBytes,
    tensors: Vec<StoredTensor>,
}

impl Checkpoint {
    /// Opens a checkpoint: a `torch.save` state dict (zip format, possibly wrapped under `"model"` or
    /// `"state_dict"` as MONAI's `CheckpointSaver` writes), a safetensors file, or a `vista3d train`
    /// training state (its network part, without the `model.` prefix). The format is detected from the
    /// content.
    pub fn open(path: &Path) -> Result<Self, CheckpointError> {
        let checkpoint = Self::open_every_tensor(path)?;
        if checkpoint.format != CheckpointFormat::TrainingState {
            return Ok(checkpoint);
        }
        let Checkpoint {
            path,
            format,
            file,
            tensors,
        } = checkpoint;
        let tensors: Vec<StoredTensor> = tensors
            .into_iter()
            .filter_map(|mut t| {
                let bare = t.name.strip_prefix(TRAINING_MODEL_PREFIX)?.to_string();
                t.name = bare;
                Some(t)
            })
            .collect();
        if tensors.is_empty() {
            return Err(CheckpointError::TrainingStateWithoutWeights {
                use_instead: models_beside(&path),
                path,
            });
        }
        log::info!(
            "{}: a `vista3d train` training state; using its network weights ('{TRAINING_MODEL_PREFIX}' \
             tensors), not the optimizer state",
            path.display()
        );
        Ok(Checkpoint {
            path,
            format,
            file,
            tensors,
        })
    }

    /// Opens a checkpoint with every tensor as stored (a training state's optimizer state included).
    pub(crate) fn open_every_tensor(path: &Path) -> Result<Self, CheckpointError> {
        let (format, file, tensors) = open_file(path).map_err(|e| e.in_file(path))?;
        Ok(Checkpoint {
            path: path.to_path_buf(),
            format,
            file,
            tensors,
        })
    }

    /// The file this checkpoint was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file's format.
    pub fn format(&self) -> CheckpointFormat {
        self.format
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// Whether there are no tensors.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// The tensors in memory (copied out of the file where they are still in it).
    pub fn into_state_dict(self) -> StateDict {
        StateDict {
            format: self.format,
            tensors: into_raw_tensors(&self.file, self.tensors),
        }
    }
}

impl TensorSource for Checkpoint {
    fn tensor_views(&self) -> Vec<TensorView<'_>> {
        let file = self.file.bytes();
        self.tensors
            .iter()
            .map(|t| TensorView {
                name: &t.name,
                dtype: t.dtype,
                shape: &t.shape,
                data: match &t.bytes {
                    StoredBytes::InFile(range) => &file[range.clone()],
                    StoredBytes::Owned(data) => data,
                },
            })
            .collect()
    }

    fn release(&self, view: &TensorView<'_>) {
        // Only views into the file (an owned tensor's bytes are a separate allocation, never inside it).
        let file = self.file.bytes();
        let (base, at) = (file.as_ptr() as usize, view.data.as_ptr() as usize);
        if at >= base && at + view.data.len() <= base + file.len() {
            self.file.release(at - base..at - base + view.data.len());
        }
    }
}

/// Copies the tensors still in `file` into memory (releasing their pages).
pub(crate) fn into_raw_tensors(
    file: &FileBytes,
    tensors: Vec<StoredTensor>,
) -> Vec<(String, RawTensor)> {
    tensors
        .into_iter()
        .map(|t| {
            let data = match t.bytes {
                StoredBytes::Owned(data) => data,
                StoredBytes::InFile(range) => {
                    let data = file.bytes()[range.clone()].to_vec();
                    file.release(range);
                    data
                }
            };
            let raw = RawTensor {
                dtype: t.dtype,
                shape: t.shape,
                data,
            };
            (t.name, raw)
        })
        .collect()
}

/// Detects the format of `path` and reads its tensors.
fn open_file(path: &Path) -> Result<(CheckpointFormat, FileBytes, Vec<StoredTensor>), ReadError> {
    let file = File::open(path)?;
    let meta = file.metadata()?;
    if meta.is_dir() {
        return Err(ReadError::NotACheckpoint(
            "is a directory, not a checkpoint file".into(),
        ));
    }
    let len = meta.len();
    if len == 0 {
        return Err(ReadError::NotACheckpoint(
            "empty file (0 bytes), not a checkpoint".into(),
        ));
    }
    let bytes = FileBytes::open(&file, len)?;
    drop(file);
    let (format, tensors) = read_tensors(&bytes)?;
    Ok((format, bytes, tensors))
}

/// Reads the tensors of a whole checkpoint file.
pub(crate) fn read_tensors(
    file: &FileBytes,
) -> Result<(CheckpointFormat, Vec<StoredTensor>), ReadError> {
    let bytes = file.bytes();
    let head = &bytes[..bytes.len().min(16)];
    if head.starts_with(b"PK\x03\x04") || head.starts_with(b"PK\x05\x06") {
        let tensors = torch_zip::read(file)?;
        return Ok((CheckpointFormat::TorchZip, tensors));
    }
    if safetensors_io::looks_like_safetensors(head) {
        let (tensors, metadata) = safetensors_io::read(bytes)?;
        let format = if is_training_state(&metadata) {
            CheckpointFormat::TrainingState
        } else {
            CheckpointFormat::Safetensors
        };
        return Ok((format, tensors));
    }
    // Legacy torch.save starts with a protocol-2 pickle of its magic number.
    if head.first() == Some(&0x80) && head.get(1).is_some_and(|&p| p <= 5) {
        return Err(ReadError::NotACheckpoint(LEGACY_MESSAGE.into()));
    }
    let shown: Vec<String> = head.iter().take(8).map(|b| format!("{b:02x}")).collect();
    Err(ReadError::NotACheckpoint(format!(
        "not a PyTorch checkpoint or safetensors file (starts with bytes {})",
        shown.join(" ")
    )))
}

/// Whether safetensors metadata is that of a `vista3d train` training state.
fn is_training_state(metadata: &HashMap<String, String>) -> bool {
    metadata.contains_key(TRAINING_STATE_KEY)
}

/// What to use instead of a training state without network weights: the `.pt` models in its folder
/// (`vista3d train` writes the best one there), or a description of that file.
fn models_beside(path: &Path) -> String {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    let mut models: Vec<String> = std::fs::read_dir(dir.unwrap_or(Path::new(".")))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "pt") && p.is_file())
        .map(|p| p.display().to_string())
        .collect();
    models.sort();
    if models.is_empty() {
        "the best model `vista3d train` writes in the same ckpt_dir (its key_metric_filename, \
         model.pt by default)"
            .to_string()
    } else {
        models.join(" or ")
    }
}
