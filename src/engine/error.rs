//! The engine's error. What a caller must tell apart (a failed stage, a
//! cancellation, a `--locked` refusal, an unreadable lockfile) has its own
//! variant; anything else is an `anyhow` error with its context.

use std::path::PathBuf;

use crate::cache::CacheError;
use crate::graph::GraphError;

use super::lockfile::LockfileError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A stage's op failed, or its outputs could not be stored or reproduced.
    /// Shown with its whole context chain: it is a stage's detail line.
    #[error("{0:#}")]
    StageFailed(anyhow::Error),
    /// Ctrl-C, or `--fail-fast` after another stage failed.
    #[error("cancelled")]
    Cancelled,
    /// `run --locked` without a lockfile to hold the run to.
    #[error(
        "--locked: there is no lockfile {} (run once without --locked to create it)",
        .path.display()
    )]
    NoLockfile { path: PathBuf },
    /// `run --locked` where the plan differs from the lockfile.
    #[error(
        "--locked: the plan differs from {}:\n  {}\n({})",
        .path.display(),
        .diffs.join("\n  "),
        .hint
    )]
    LockedPlanDiffers {
        path: PathBuf,
        diffs: Vec<String>,
        /// How to update the lockfile, for the run refused.
        hint: &'static str,
    },
    #[error(transparent)]
    Lockfile(#[from] LockfileError),
    /// Boxed: a graph error is large, and every `Result` here carries one.
    #[error(transparent)]
    Graph(Box<GraphError>),
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

impl From<GraphError> for Error {
    fn from(e: GraphError) -> Error {
        Error::Graph(Box::new(e))
    }
}

impl Error {
    /// The error as `anyhow` would have carried it, for a stage's message.
    pub(super) fn into_anyhow(self) -> anyhow::Error {
        match self {
            Error::Other(e) => e,
            Error::Cache(e) => e.into(),
            e => anyhow::Error::new(e),
        }
    }
}
