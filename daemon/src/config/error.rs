//! Why a configuration could not be loaded, and where the value at fault came from.

use std::fmt;
use std::path::PathBuf;

/// Where a value came from: a line of the file, an environment variable, or neither
/// (a default, or a key the file does not have).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// `FILE line N`.
    Line { path: PathBuf, line: usize },
    /// `environment variable EXO_…`.
    Env(&'static str),
    /// `FILE`.
    File(PathBuf),
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Line { path, line } => write!(f, "{} line {line}", path.display()),
            Location::Env(var) => write!(f, "environment variable {var}"),
            Location::File(path) => write!(f, "{}", path.display()),
        }
    }
}

impl Location {
    /// "line N" for a line of the file, the whole location otherwise.
    pub fn short(&self) -> String {
        match self {
            Location::Line { line, .. } => format!("line {line}"),
            other => other.to_string(),
        }
    }
}

/// Why a configuration could not be loaded. Each is one line that names the file (and
/// line), the key or the environment variable at fault. Key values are never printed.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {} not found", path.display())]
    NotFound { path: PathBuf },
    #[error("cannot read config file {}: {error}", path.display())]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{} line {line}, column {column}: TOML syntax error: {message}", path.display())]
    Syntax {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{at}: unknown key '{key}' (known: {known}){hint}")]
    UnknownKey {
        at: Location,
        /// Dotted: `engine.thread`.
        key: String,
        /// The keys known where it stands, comma-separated.
        known: String,
        /// Empty, or where a key of that name belongs.
        hint: String,
    },
    #[error("{at}: wrong type for '{key}': {message}")]
    WrongType {
        at: Location,
        key: String,
        message: String,
    },
    #[error("{}: missing required key '{key}' (set it in the file, or with {var})", path.display())]
    Missing {
        path: PathBuf,
        key: &'static str,
        var: &'static str,
    },
    #[error("environment variable {var}: {message}")]
    Env { var: &'static str, message: String },
    #[error("{at}: invalid value for '{key}': {message}")]
    Invalid {
        at: Location,
        key: &'static str,
        message: String,
    },
    /// `section` is "api" or "cluster".
    #[error(
        "'{section}.key' ({key_at}) and '{section}.key_file' ({key_file_at}) are both set: \
         set only one"
    )]
    KeyConflict {
        section: &'static str,
        key_at: Location,
        key_file_at: Location,
    },
    /// `key` is "api.key_file" or "cluster.key_file".
    #[error("{key} {}: {message}", path.display())]
    KeyFile {
        key: &'static str,
        path: PathBuf,
        message: String,
    },
    /// A rule across keys (the peer list, the cluster keys).
    #[error("{at}: {message}")]
    Cluster { at: Location, message: String },
}
