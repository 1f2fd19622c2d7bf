//! [`EngineError`]: why an engine cannot serve a request. The kinds let the caller tell an engine that is
//! simply not installed here (quietly skipped by `auto`) from one that exists but must not be used (stale or
//! corrupt: always reported) or one that failed while running.
//!
//! Which kind each failure is (ONNX Runtime and TensorRT loaders follow it):
//!
//! | kind | when |
//! |---|---|
//! | [`Unavailable`](EngineError::Unavailable) | no library (ONNX Runtime, TensorRT), built without the TensorRT shim, no GPU / a CPU request, no export or no engine built yet, a libtorch method that acts only on CUDA |
//! | [`Stale`](EngineError::Stale) | built for something else: other weights (fingerprint), TensorRT version, GPU compute capability, window size or `max_prompt_size` profile, an older manifest layout |
//! | [`Corrupt`](EngineError::Corrupt) | present but unreadable: a manifest, plan or sidecar that does not parse, a file that is missing, truncated or fails its sha256 |
//! | [`Runtime`](EngineError::Runtime) | loaded, then failed while running (execution error, wrong output shape, out of memory) |

use std::fmt;

/// Why an engine (ONNX Runtime, TensorRT) cannot run, or stopped running.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    /// Not installed or not possible here: no library, no GPU, no export or engine built yet.
    #[error("{0}")]
    Unavailable(String),
    /// Built for something else: other weights, another TensorRT version, GPU, precision or profile.
    #[error("{0}")]
    Stale(String),
    /// Present but unreadable: a truncated or damaged file, a manifest that does not parse.
    #[error("{0}")]
    Corrupt(String),
    /// Loaded, but failed while running (execution error, wrong output shape, out of memory).
    #[error("{0}")]
    Runtime(String),
}

/// The kind of an [`EngineError`], without its message: what records, metrics and fallback policies use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EngineErrorKind {
    Unavailable,
    Stale,
    Corrupt,
    Runtime,
}

impl EngineErrorKind {
    /// `unavailable`, `stale`, `corrupt` or `runtime`.
    pub fn name(self) -> &'static str {
        match self {
            EngineErrorKind::Unavailable => "unavailable",
            EngineErrorKind::Stale => "stale",
            EngineErrorKind::Corrupt => "corrupt",
            EngineErrorKind::Runtime => "runtime",
        }
    }
}

impl fmt::Display for EngineErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl EngineError {
    /// The kind, for records and metrics.
    pub fn kind(&self) -> EngineErrorKind {
        match self {
            EngineError::Unavailable(_) => EngineErrorKind::Unavailable,
            EngineError::Stale(_) => EngineErrorKind::Stale,
            EngineError::Corrupt(_) => EngineErrorKind::Corrupt,
            EngineError::Runtime(_) => EngineErrorKind::Runtime,
        }
    }

    /// The message without the kind.
    pub fn message(&self) -> &str {
        match self {
            EngineError::Unavailable(m)
            | EngineError::Stale(m)
            | EngineError::Corrupt(m)
            | EngineError::Runtime(m) => m,
        }
    }

    /// True when the engine is simply not set up here (as opposed to present but wrong, or failing).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, EngineError::Unavailable(_))
    }

    /// An [`EngineError::Unavailable`] from any error, keeping its whole chain of causes in the message.
    pub fn unavailable(e: impl fmt::Display) -> Self {
        EngineError::Unavailable(format!("{e:#}"))
    }

    /// An [`EngineError::Stale`] from any error.
    pub fn stale(e: impl fmt::Display) -> Self {
        EngineError::Stale(format!("{e:#}"))
    }

    /// An [`EngineError::Corrupt`] from any error.
    pub fn corrupt(e: impl fmt::Display) -> Self {
        EngineError::Corrupt(format!("{e:#}"))
    }

    /// An [`EngineError::Runtime`] from any error.
    pub fn runtime(e: impl fmt::Display) -> Self {
        EngineError::Runtime(format!("{e:#}"))
    }

    /// The same kind with `context` put before the message (`context: message`).
    pub fn context(self, context: impl fmt::Display) -> Self {
        let message = format!("{context}: {}", self.message());
        match self.kind() {
            EngineErrorKind::Unavailable => EngineError::Unavailable(message),
            EngineErrorKind::Stale => EngineError::Stale(message),
            EngineErrorKind::Corrupt => EngineError::Corrupt(message),
            EngineErrorKind::Runtime => EngineError::Runtime(message),
        }
    }
}

impl From<tch::TchError> for EngineError {
    /// A libtorch error inside an engine call (moving, converting or joining tensors) happens while running.
    fn from(e: tch::TchError) -> Self {
        EngineError::Runtime(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_and_context() {
        let e = EngineError::stale("built from weights a, loaded b");
        assert_eq!(e.kind(), EngineErrorKind::Stale);
        assert_eq!(e.kind().to_string(), "stale");
        assert!(!e.is_unavailable());
        let e = e.context("ort");
        assert_eq!(e.kind(), EngineErrorKind::Stale);
        assert_eq!(e.to_string(), "ort: built from weights a, loaded b");
        assert!(EngineError::unavailable("no GPU").is_unavailable());
        let chain = anyhow::anyhow!("inner").context("outer");
        assert_eq!(EngineError::corrupt(chain).message(), "outer: inner");
        assert_eq!(
            serde_json::to_string(&EngineErrorKind::Runtime).unwrap(),
            "\"runtime\""
        );
    }
}
