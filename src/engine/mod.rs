//! Planning and running pipelines: the plan (run or cached, and why), the
//! tokio scheduler, stage execution in-process or in a worker, progress,
//! the run log and the lockfile.

mod error;
mod execute;
mod feed;
mod gpus;
mod history;
mod input_guard;
mod lockfile;
mod options;
mod plan;
mod private_inputs;
mod progress;
mod run;
mod schedule;
mod share;
mod summary;
mod threads;
mod worker;

pub use error::Error;
pub use lockfile::{lockfile_path, LockedInput, LockedStage, Lockfile, LockfileError};
pub use options::RunOptions;
pub use plan::{
    explain, locked_diff, missing_path_inputs, plan, stage_key, stage_seed, Action, Plan,
    PlanContext, PlanRow, PlannedStage, REMOTE_REASON,
};
pub use run::run;
pub use share::{fingerprints_to_pull, records_to_push};
pub use summary::{RunSummary, StageResult, StageStatus};
pub use worker::{doctor, worker_path};
