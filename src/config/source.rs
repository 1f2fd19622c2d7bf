//! Where a configuration value came from, and the typed errors of configuration loading.

use std::fmt;
use std::path::PathBuf;

/// One layer of a configuration: the built-in defaults, a file, a `--set`, an item of a batch list, or a
/// command-line flag.
#[derive(Debug, Clone, PartialEq)]
pub enum Origin {
    /// A file compiled into the binary (`configs/inference.json`).
    Builtin(&'static str),
    /// A `--config` file.
    File(PathBuf),
    /// A `--set key=value`.
    Set(String),
    /// Item `index` of a batch list file.
    ListItem { list: PathBuf, index: usize },
    /// A command-line flag (`--output-dir`, `--precision`, ...).
    Flag(&'static str),
    /// A request received by the server.
    Request,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Builtin(name) => write!(f, "built-in {name}"),
            Origin::File(p) => write!(f, "config file {}", p.display()),
            Origin::Set(s) => write!(f, "--set {s}"),
            Origin::ListItem { list, index } => write!(f, "item {index} of {}", list.display()),
            Origin::Flag(name) => write!(f, "{name}"),
            Origin::Request => f.write_str("the request"),
        }
    }
}

/// Why a configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A file that cannot be read.
    #[error("cannot read {origin}: {source}")]
    Io {
        origin: Origin,
        #[source]
        source: std::io::Error,
    },
    /// Text that is not JSON, or not a JSON object.
    #[error("{origin} is not a JSON object: {detail}")]
    NotJson { origin: Origin, detail: String },
    /// A key that no setting has.
    #[error("unknown key '{key}' in {origin}{}", suggestion_text(.suggestion))]
    UnknownKey {
        key: String,
        origin: Origin,
        suggestion: Option<String>,
    },
    /// A value of the wrong type or out of range.
    #[error("{origin}: {detail}")]
    Invalid { origin: Origin, detail: String },
    /// A malformed `--set`.
    #[error("--set '{0}' must be key=value, e.g. --set overlap=0.5")]
    BadSet(String),
}

fn suggestion_text(s: &Option<String>) -> String {
    match s {
        Some(k) => format!(" (did you mean '{k}'?)"),
        None => String::new(),
    }
}
