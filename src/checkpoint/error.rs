//! Typed errors of reading, writing and loading checkpoints.
//!
//! Every [`CheckpointError`] names the file; its message says what the file is and what is wrong, so the
//! CLI prints it as is. [`WeightsError`] is the part that does not depend on a file (a state dict that
//! does not fit the network), used by [`crate::model::load_weights`] and wrapped with the path by
//! [`crate::load_model`].

use std::io;
use std::path::{Path, PathBuf};

/// Why a checkpoint could not be read, written or loaded.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// The file cannot be opened or read (missing, permissions, I/O error).
    #[error("{}: cannot read the file", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The file is not a checkpoint this reader understands: a directory, an empty or foreign file, the
    /// legacy (pre-1.6) torch format, a TorchScript archive, or a pickle without a dict of tensors.
    #[error("{}: {what}", path.display())]
    NotACheckpoint { path: PathBuf, what: String },
    /// The file is a checkpoint, but truncated or corrupt (zip structure, CRC-32, sizes, header).
    #[error("{}: {detail}", path.display())]
    Corrupt { path: PathBuf, detail: String },
    /// The pickle (`data.pkl`) holds something the restricted unpickler refuses: a global outside its
    /// whitelist (e.g. a pickled Python object), an unknown opcode or a malformed stream.
    #[error("{}: {detail}", path.display())]
    UnsupportedPickle { path: PathBuf, detail: String },
    /// A `vista3d train` resumable state (`last.safetensors`) that holds no network weights.
    #[error(
        "{}: a `vista3d train` training state without network weights ('model.' tensors); use {use_instead} instead",
        path.display()
    )]
    TrainingStateWithoutWeights { path: PathBuf, use_instead: String },
    /// The checkpoint was read, but its weights do not fit the network.
    #[error("{}: {problem}", path.display())]
    Weights {
        path: PathBuf,
        problem: WeightsError,
    },
    /// A checkpoint could not be written (invalid tensors or an I/O error); nothing was left behind.
    #[error("{}: cannot write {what}: {detail}", path.display())]
    Write {
        path: PathBuf,
        what: &'static str,
        detail: String,
    },
}

impl CheckpointError {
    /// The file the error is about.
    pub fn path(&self) -> &Path {
        match self {
            CheckpointError::Io { path, .. }
            | CheckpointError::NotACheckpoint { path, .. }
            | CheckpointError::Corrupt { path, .. }
            | CheckpointError::UnsupportedPickle { path, .. }
            | CheckpointError::TrainingStateWithoutWeights { path, .. }
            | CheckpointError::Weights { path, .. }
            | CheckpointError::Write { path, .. } => path,
        }
    }
}

/// A `(name, checkpoint shape, model shape)` triple of a tensor present in both with different shapes.
pub type ShapeMismatch = (String, Vec<usize>, Vec<i64>);

/// Why a set of tensors does not fit the VISTA3D network.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WeightsError {
    /// The tensors are not VISTA3D's (no `image_encoder.encoder.conv_init.weight`, or a wrong shape).
    #[error("not a VISTA3D checkpoint: {detail}")]
    NotVista3d { detail: String },
    /// The checkpoint's width (`encoder_embed_dim`) is not the one asked for.
    #[error("the checkpoint's encoder_embed_dim is {found}, but {expected} was asked for")]
    WrongWidth { found: i64, expected: i64 },
    /// The checkpoint's shapes describe a network this implementation cannot build.
    #[error("unsupported checkpoint width: {detail}")]
    UnsupportedNetwork { detail: String },
    /// Strict loading found missing, unexpected or wrongly shaped tensors (all of them are listed).
    #[error(
        "the checkpoint does not match the model (strict loading):\n{}",
        describe_mismatch(missing, unexpected, mismatched)
    )]
    Mismatch {
        /// Model tensors absent from the checkpoint.
        missing: Vec<String>,
        /// Checkpoint tensors the model does not have.
        unexpected: Vec<String>,
        /// Tensors present in both with different shapes.
        mismatched: Vec<ShapeMismatch>,
    },
}

impl WeightsError {
    /// This problem, found in the checkpoint `path`.
    pub fn in_file(self, path: &Path) -> CheckpointError {
        CheckpointError::Weights {
            path: path.to_path_buf(),
            problem: self,
        }
    }
}

/// One indented line per non-empty list (the first 12 names of each, then a count).
pub(crate) fn describe_mismatch(
    missing: &[String],
    unexpected: &[String],
    mismatched: &[ShapeMismatch],
) -> String {
    fn list(names: &[String]) -> String {
        const SHOWN: usize = 12;
        let mut s = names
            .iter()
            .take(SHOWN)
            .cloned()
            .collect::<Vec<_>>()
            .join(", ");
        if names.len() > SHOWN {
            s.push_str(&format!(", ... ({} more)", names.len() - SHOWN));
        }
        s
    }
    let mut lines = Vec::new();
    if !missing.is_empty() {
        lines.push(format!(
            "  missing from the checkpoint ({}): {}",
            missing.len(),
            list(missing)
        ));
    }
    if !unexpected.is_empty() {
        lines.push(format!(
            "  not in the model ({}): {}",
            unexpected.len(),
            list(unexpected)
        ));
    }
    if !mismatched.is_empty() {
        let shown: Vec<String> = mismatched
            .iter()
            .map(|(n, ck, m)| format!("{n}: checkpoint {ck:?} vs model {m:?}"))
            .collect();
        lines.push(format!(
            "  wrong shape ({}): {}",
            mismatched.len(),
            list(&shown)
        ));
    }
    lines.join("\n")
}

/// A problem found while reading, before the file's path is attached (internal to the readers).
#[derive(Debug)]
pub(crate) enum ReadError {
    Io(io::Error),
    NotACheckpoint(String),
    Corrupt(String),
    UnsupportedPickle(String),
}

impl ReadError {
    /// Attaches the file's path.
    pub(crate) fn in_file(self, path: &Path) -> CheckpointError {
        let path = path.to_path_buf();
        match self {
            ReadError::Io(source) => CheckpointError::Io { path, source },
            ReadError::NotACheckpoint(what) => CheckpointError::NotACheckpoint { path, what },
            ReadError::Corrupt(detail) => CheckpointError::Corrupt { path, detail },
            ReadError::UnsupportedPickle(detail) => {
                CheckpointError::UnsupportedPickle { path, detail }
            }
        }
    }

    /// Prefixes the message with `context` (e.g. which tensor was being read).
    pub(crate) fn context(self, context: impl std::fmt::Display) -> ReadError {
        match self {
            ReadError::Io(e) => ReadError::Io(io::Error::new(e.kind(), format!("{context}: {e}"))),
            ReadError::NotACheckpoint(s) => ReadError::NotACheckpoint(format!("{context}: {s}")),
            ReadError::Corrupt(s) => ReadError::Corrupt(format!("{context}: {s}")),
            ReadError::UnsupportedPickle(s) => {
                ReadError::UnsupportedPickle(format!("{context}: {s}"))
            }
        }
    }
}

impl From<io::Error> for ReadError {
    fn from(e: io::Error) -> Self {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            ReadError::Corrupt(format!("truncated file ({e})"))
        } else {
            ReadError::Io(e)
        }
    }
}

/// `Err(ReadError::Corrupt(format!(...)))`.
macro_rules! corrupt {
    ($($arg:tt)*) => {
        $crate::checkpoint::error::ReadError::Corrupt(format!($($arg)*))
    };
}

/// Returns `Err(corrupt!(...))` unless the condition holds.
macro_rules! ensure_intact {
    ($cond:expr, $($arg:tt)*) => {
        if !$cond {
            return Err(corrupt!($($arg)*));
        }
    };
}

pub(crate) use {corrupt, ensure_intact};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_file_and_the_problem() {
        let p = Path::new("/data/model.pt");
        let e = ReadError::Corrupt("CRC-32 mismatch".into())
            .context("entry 'archive/data/0'")
            .in_file(p);
        assert_eq!(
            e.to_string(),
            "/data/model.pt: entry 'archive/data/0': CRC-32 mismatch"
        );
        assert_eq!(e.path(), p);
        let e = WeightsError::WrongWidth {
            found: 16,
            expected: 48,
        }
        .in_file(p);
        assert_eq!(
            e.to_string(),
            "/data/model.pt: the checkpoint's encoder_embed_dim is 16, but 48 was asked for"
        );
        let names: Vec<String> = (0..14).map(|i| format!("t{i}")).collect();
        let e = WeightsError::Mismatch {
            missing: names,
            unexpected: vec![],
            mismatched: vec![("w".into(), vec![2], vec![3])],
        };
        let text = e.to_string();
        assert!(
            text.contains("missing from the checkpoint (14): t0, "),
            "{text}"
        );
        assert!(text.contains("t11, ... (2 more)"), "{text}");
        assert!(
            text.contains("wrong shape (1): w: checkpoint [2] vs model [3]"),
            "{text}"
        );
        assert!(!text.contains("not in the model"), "{text}");
        let io = ReadError::from(io::Error::from(io::ErrorKind::UnexpectedEof)).in_file(p);
        assert!(matches!(io, CheckpointError::Corrupt { .. }), "{io:?}");
        let io = ReadError::from(io::Error::from(io::ErrorKind::PermissionDenied)).in_file(p);
        assert!(matches!(io, CheckpointError::Io { .. }), "{io:?}");
    }
}
