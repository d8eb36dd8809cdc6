//! How a run ended, stage by stage: the table `alignflow run` prints at
//! its end, and whether the run succeeded.

use std::path::PathBuf;

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StageStatus {
    Ran,
    Cached,
    Failed,
    /// Not run because an upstream stage failed.
    Skipped,
    Cancelled,
}

impl StageStatus {
    fn label(self) -> &'static str {
        match self {
            StageStatus::Ran => "ran",
            StageStatus::Cached => "cached",
            StageStatus::Failed => "FAILED",
            StageStatus::Skipped => "skipped",
            StageStatus::Cancelled => "cancelled",
        }
    }
}

/// The end state of one stage.
#[derive(Debug, Clone, Serialize)]
pub struct StageResult {
    pub stage: String,
    pub status: StageStatus,
    pub seconds: f64,
    pub detail: String,
}

/// The end state of a run.
#[derive(Debug, Clone, Serialize)]
pub struct RunSummary {
    pub pipeline: String,
    pub results: Vec<StageResult>,
    /// Stopped by Ctrl-C or SIGTERM.
    pub interrupted: bool,
    /// Stopped by SIGTERM (exit status 143 rather than 130).
    pub terminated: bool,
    pub log: Option<PathBuf>,
}

impl RunSummary {
    pub fn success(&self) -> bool {
        !self.interrupted
            && self
                .results
                .iter()
                .all(|r| matches!(r.status, StageStatus::Ran | StageStatus::Cached))
    }

    /// The summary table printed at the end of a run.
    pub fn table(&self) -> String {
        let width = self
            .results
            .iter()
            .map(|r| r.stage.len())
            .max()
            .unwrap_or(5)
            .max(5);
        let mut out = format!(
            "{:<width$}  {:<9}  {:>9}  detail\n",
            "stage", "status", "time"
        );
        for r in &self.results {
            let detail = r.detail.lines().next().unwrap_or("");
            out.push_str(&format!(
                "{:<width$}  {:<9}  {:>8.2}s  {detail}\n",
                r.stage,
                r.status.label(),
                r.seconds
            ));
        }
        out
    }
}
