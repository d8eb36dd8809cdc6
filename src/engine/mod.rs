//! Planning and running pipelines: the plan (run or cached, and why), the
//! tokio scheduler, stage execution in-process or in a worker (the local
//! executor) or as Slurm jobs (the slurm executor, with `stage exec` on the
//! node), progress, the run log and the lockfile.

mod error;
mod execute;
mod feed;
mod gpus;
mod history;
mod input_guard;
mod lockfile;
mod node;
mod options;
mod plan;
mod private_inputs;
mod profile;
mod progress;
mod run;
mod schedule;
mod share;
mod slurm;
mod summary;
mod threads;
mod worker;

pub use error::Error;
pub use lockfile::{lockfile_path, LockedInput, LockedStage, Lockfile, LockfileError};
pub use node::{stage_exec, JobSpec, NodeOutcome};
pub use options::{Attach, Executor, RunOptions};
pub use plan::{
    explain, locked_diff, missing_path_inputs, plan, plan_from_cache, stage_key, stage_seed,
    Action, Plan, PlanContext, PlanRow, PlannedStage, REMOTE_REASON,
};
pub use profile::{profile_candidates, ExecutorKind, Profile, ProfileError, SlurmSettings};
pub use run::run;
pub use share::{fingerprints_to_pull, records_to_push};
pub use slurm::{list_runs, new_run_id, parse_squeue, read_jobs, run_dir, JobEntry, RunInfo};
pub use summary::{RunSummary, StageResult, StageStatus};
pub use worker::{doctor, worker_path};
