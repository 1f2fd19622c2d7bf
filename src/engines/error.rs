//! [`EngineError`]: why an engine cannot serve a request. The kinds let the caller tell an engine that is
//! simply not installed here (quietly skipped by `auto`) from one that exists but must not be used (stale or
//! corrupt: always reported) or one that failed while running.

/// Why an engine (ONNX Runtime, TensorRT) cannot run, or stopped running.
#[derive(Debug, thiserror::Error)]
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

impl EngineError {
    /// A short name of the kind, for records and metrics: `unavailable`, `stale`, `corrupt`, `runtime`.
    pub fn kind(&self) -> &'static str {
        match self {
            EngineError::Unavailable(_) => "unavailable",
            EngineError::Stale(_) => "stale",
            EngineError::Corrupt(_) => "corrupt",
            EngineError::Runtime(_) => "runtime",
        }
    }

    /// True when the engine is simply not set up here (as opposed to present but wrong, or failing).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, EngineError::Unavailable(_))
    }

    /// An [`EngineError::Unavailable`] from any error, keeping its whole chain of causes in the message.
    pub fn unavailable(e: impl std::fmt::Display) -> Self {
        EngineError::Unavailable(format!("{e:#}"))
    }

    /// An [`EngineError::Stale`] from any error.
    pub fn stale(e: impl std::fmt::Display) -> Self {
        EngineError::Stale(format!("{e:#}"))
    }

    /// An [`EngineError::Corrupt`] from any error.
    pub fn corrupt(e: impl std::fmt::Display) -> Self {
        EngineError::Corrupt(format!("{e:#}"))
    }

    /// An [`EngineError::Runtime`] from any error.
    pub fn runtime(e: impl std::fmt::Display) -> Self {
        EngineError::Runtime(format!("{e:#}"))
    }
}
