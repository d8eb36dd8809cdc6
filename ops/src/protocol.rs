//! The contract between the engine and a stage runner.
//!
//! The engine hands a [`StageSpec`] (as JSON) to whoever runs the stage: an
//! in-process data op or the `alignflow-worker` process. A worker reports
//! back on stdout with one [`WorkerEvent`] per line, and logs on stderr.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Everything needed to run one stage, with every path absolute.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StageSpec {
    /// Pipeline name (for logs).
    pub pipeline: String,
    /// Stage id, including any matrix subscript (`ppo[kl_coef=0.05]`).
    pub stage: String,
    /// Registered op name.
    pub op: String,
    /// The op's implementation version the engine planned with.
    pub op_version: u32,
    /// Params, validated and normalised by the op (defaults filled in).
    pub params: serde_json::Value,
    /// Input name to the path of its artifact (file or folder, read-only).
    pub inputs: BTreeMap<String, PathBuf>,
    /// Output names the stage must create, each as `out_dir/<name>`.
    pub outputs: Vec<String>,
    /// A fresh, empty folder for the outputs.
    pub out_dir: PathBuf,
    /// The manifest's folder (working directory of `exec`).
    pub work_dir: PathBuf,
    /// A folder that survives an interrupted run of the same fingerprint,
    /// for checkpoints to resume from.
    pub checkpoint_dir: PathBuf,
    /// `cpu`, `cuda`, `cuda:N` or `auto`.
    pub device: String,
    /// Seed derived from the pipeline seed and the stage id.
    pub seed: u64,
    /// Intra-op CPU threads; `None` leaves the library default.
    pub threads: Option<usize>,
}

/// Set to `srun` by `alignflow stage exec` (a Slurm job's one command) for
/// the worker it starts: the job has one task per data-parallel rank, and
/// the worker, rank 0, starts the other ranks with `srun` on them rather
/// than as local processes.
pub const ENV_RANK_LAUNCHER: &str = "ALIGNFLOW_DIST_LAUNCHER";

/// Summary metrics of a finished stage (kept in its cache record).
pub type Metrics = BTreeMap<String, serde_json::Value>;

/// The summary metric (a string: why) of a stage whose outputs are not
/// bitwise reproducible from run to run, as NCCL's reductions are not: the
/// engine keeps it in the lockfile, and `run --locked` gives it as the
/// reason when such a stage's rerun produced other bytes.
pub const NOT_BITWISE_METRIC: &str = "not_bitwise";

/// One line a worker writes on stdout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum WorkerEvent {
    /// Progress of the current phase: `pos` of `len` (unknown length: none).
    Progress {
        pos: u64,
        len: Option<u64>,
        msg: String,
    },
    /// A training-curve point (step, loss, lr, ...).
    Metric { values: BTreeMap<String, f64> },
    /// The stage finished; its summary metrics.
    Done { metrics: Metrics },
    /// The stage failed.
    Failed { message: String },
    /// Answer to `alignflow-worker doctor`.
    Doctor {
        info: BTreeMap<String, serde_json::Value>,
    },
}

impl WorkerEvent {
    /// Parses one stdout line; `None` for lines that are not events.
    pub fn parse(line: &str) -> Option<WorkerEvent> {
        serde_json::from_str(line.trim()).ok()
    }

    /// The event as one JSON line (no trailing newline).
    pub fn to_line(&self) -> String {
        serde_json::to_string(self).expect("worker events always serialise")
    }
}
