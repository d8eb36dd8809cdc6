//! How `alignflow run` runs: the options the CLI fills in.

use super::profile::SlurmSettings;

/// Where the stages run (`--executor`, or a profile's `executor:`).
#[derive(Debug, Clone, Default)]
pub enum Executor {
    /// Worker processes on this machine.
    #[default]
    Local,
    /// One Slurm job per stage, watched from here.
    Slurm(SlurmSettings),
}

/// How to run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Run only these stages and their ancestors (empty: all).
    pub targets: Vec<String>,
    /// Stages running at once.
    pub jobs: usize,
    /// Stop everything at the first failure.
    pub fail_fast: bool,
    /// Refuse to run when the plan differs from the lockfile.
    pub locked: bool,
    /// Write the lockfile even after an ad-hoc (`--target`, `--set`) run.
    pub update_lock: bool,
    /// `--set` changed pipeline params: the run is not the manifest's own.
    pub params_overridden: bool,
    /// Rehash every path input, ignoring the hash cache.
    pub rehash: bool,
    /// Intra-op CPU threads for each worker stage (default: every core on
    /// the CPU, a GPU slot's share of them on a GPU).
    pub threads: Option<usize>,
    /// No progress bars or stage lines.
    pub quiet: bool,
    /// Stages that may share one GPU (1: each GPU stage has its device alone).
    pub gpu_slots: usize,
    /// A remote cache read through (and written back to when configured).
    pub remote: Option<std::sync::Arc<crate::remote::Remote>>,
    pub executor: Executor,
    /// `run --attach RUN`: the run whose submitted jobs are adopted instead
    /// of submitted again.
    pub attach: Option<Attach>,
    /// `--set` overrides as given (a cluster node loads the manifest with
    /// them).
    pub sets: Vec<(String, String)>,
    /// Trackers named on the command line (`--tensorboard`), over the
    /// manifest's `tracking:`.
    pub tracking: crate::manifest::Tracking,
}

/// `run --attach RUN [--take-over]`.
#[derive(Debug, Clone)]
pub struct Attach {
    pub run_id: String,
    /// `--take-over`: adopt the run even though its engine's lock stands
    /// (the engine is known dead, its lock kept by a lost NFS client).
    pub take_over: bool,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            targets: Vec::new(),
            jobs: 1,
            fail_fast: false,
            locked: false,
            update_lock: false,
            params_overridden: false,
            rehash: false,
            threads: None,
            quiet: false,
            gpu_slots: 1,
            remote: None,
            executor: Executor::Local,
            attach: None,
            sets: Vec::new(),
            tracking: Default::default(),
        }
    }
}

impl RunOptions {
    /// Only a full, plain run of the manifest (or `--update-lock`) records
    /// the lockfile: an ad-hoc run's params or partial stage set would leave
    /// the committed lockfile inconsistent with the manifest, and a later
    /// `run --locked` would fail.
    pub fn writes_lockfile(&self) -> bool {
        self.update_lock || (self.targets.is_empty() && !self.params_overridden)
    }
}
