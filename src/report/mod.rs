//! `alignflow report`: one self-contained HTML page (inline SVG and CSS, no
//! scripts, nothing fetched) that shows a pipeline as of its cache: the DAG
//! coloured by status, a table of stages, the training curves of every
//! `metrics.jsonl` output, the tables of every `report.json` output, and
//! the win rate per round of a loop's evaluations.
//!
//! [`collect`] gathers the data (no rendering); [`render`] turns it into
//! HTML (no I/O). The page is also well-formed XML, so tests and tools can
//! parse it with an XML parser.

mod collect;
mod dag;
mod escape;
mod examples;
mod html;
mod plots;
mod rounds;

use std::path::{Path, PathBuf};

pub use collect::{
    collect, read_metrics, CacheState, EdgeInfo, Evaluation, LastRun, MetricsLog, ReportData,
    Series, StageInfo, Status,
};
pub use examples::Examples;
pub use html::render;

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("{}: {message}", .path.display())]
    Read { path: PathBuf, message: String },
    #[error("{}: {message}", .path.display())]
    Cache { path: PathBuf, message: String },
    #[error("plot of `{series}`: {message}")]
    Plot { series: String, message: String },
    #[error("writing the report {}: {source}", .path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// `CACHE/reports/NAME.html`: reports live beside the cache they describe.
pub fn default_path(cache_dir: &Path, pipeline: &str) -> PathBuf {
    cache_dir.join("reports").join(format!("{pipeline}.html"))
}

/// Writes the page atomically (a reader never sees half a report).
pub fn write(path: &Path, html: &str) -> Result<(), ReportError> {
    let err = |source| ReportError::Write {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    crate::cache::atomic_write(path, html.as_bytes()).map_err(err)
}
