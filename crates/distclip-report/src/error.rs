//! What can go wrong reading a run directory or writing its report.

use std::path::PathBuf;

/// An error of [`crate::write_report`] or [`crate::load_run`]; every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// The run directory is not there (or is not a folder).
    #[error("run directory {path} does not exist or is not a folder")]
    NoRunDir {
        /// The path given.
        path: PathBuf,
    },
    /// `metrics.jsonl` is missing or holds no step line.
    #[error("no steps in {path}: did the run commit any step?")]
    NoSteps {
        /// The metrics file.
        path: PathBuf,
    },
    /// A line of a JSON-lines file is not what the coordinator writes.
    #[error("{path}:{line}: {message}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        message: String,
    },
    /// `config.toml` or `state.json` cannot be parsed.
    #[error("{path}: {message}")]
    BadFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// Reading or writing a file failed.
    #[error("cannot {action} {path}: {source}")]
    Io {
        /// `read`, `create`, `write` or `remove`.
        action: &'static str,
        /// The file or folder.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Drawing or encoding a plot failed.
    #[error("cannot draw {path}: {message}")]
    Plot {
        /// The PNG being drawn.
        path: PathBuf,
        /// The cause.
        message: String,
    },
}
