//! One stage on a cluster node: `alignflow stage exec SPEC.json`, the one
//! command of a Slurm job script.
//!
//! The engine on the login node wrote the job spec (the stage, its key and
//! fingerprint, the cache) into the run's folder in the cache's staging
//! area. Here the stage runs as `alignflow run` would run it: the
//! fingerprint's lock (or nothing to do when the record exists), the inputs
//! from the store checked, the worker or the engine op, outputs ingested
//! and the record committed, create-if-absent, on the node, so the login
//! node never rehashes outputs over the network. Progress and metrics are
//! appended to `events.jsonl`, which the engine tails; the stage's output
//! goes to the job's log.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use serde::{Deserialize, Serialize};
use tokio::signal::unix::SignalKind;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::cache::{Cache, Fingerprint, StageKey, StageRecord};
use crate::manifest::{self, LoadOptions};
use crate::protocol::WorkerEvent;

use super::execute::{run_here, Device, Shared};
use super::gpus::GpuSlots;
use super::plan::{lacking_outputs, stage_key};
use super::progress::Ui;
use super::threads::CorePool;
use super::{Error, RunOptions};

/// What a job is told: which stage of which manifest, under which key.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobSpec {
    /// The cache, at the same path on every node.
    pub cache_dir: PathBuf,
    /// The manifest, at the same path on every node.
    pub manifest: PathBuf,
    /// `--set` overrides the run was started with.
    pub sets: Vec<(String, String)>,
    /// The stage id (a matrix instance's full id).
    pub stage: String,
    /// The key the engine computed from the upstream's actual outputs.
    pub key: StageKey,
    pub fingerprint: Fingerprint,
    /// CPU threads for a tensor stage (the job's CPUs).
    pub threads: Option<usize>,
    /// GPUs the job asked for: the worker keeps Slurm's
    /// `CUDA_VISIBLE_DEVICES`.
    pub gpus: u32,
    /// The job's tasks: over 1, one per data-parallel rank, started by
    /// rank 0's worker as an srun step.
    #[serde(default = "one_task")]
    pub tasks: usize,
    /// Where the node appends the stage's events.
    pub events: PathBuf,
    /// The outputs the stage declares: a record lacking one (an `exec`
    /// stage that declares another since) is no hit, and the job runs.
    #[serde(default)]
    pub outputs: Vec<String>,
}

fn one_task() -> usize {
    1
}

impl JobSpec {
    pub fn read(path: &Path) -> anyhow::Result<JobSpec> {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_slice(&bytes)
            .with_context(|| format!("{}: not a job spec", path.display()))
    }
}

/// How `stage exec` ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeOutcome {
    /// The record is committed (by this job or an earlier one).
    Committed,
    /// SIGTERM (the time limit, `scancel`, preemption): stopped; a
    /// resubmission resumes from the stage's checkpoints.
    Stopped,
}

/// Runs the stage of the job spec at `path` on this node (blocking: builds
/// its own runtime). A failure is also appended to `events.jsonl`.
pub fn stage_exec(path: &Path) -> Result<NodeOutcome, Error> {
    let job = JobSpec::read(path)?;
    // A job of several tasks has one per data-parallel rank: the worker
    // (rank 0) starts the others with srun on them. Set before any thread
    // exists, for every process this one starts.
    if job.tasks > 1 {
        std::env::set_var(crate::protocol::ENV_RANK_LAUNCHER, "srun");
    }
    if crate::ops::find(&job.key.op).is_some_and(|op| op.runs_in_worker()) {
        super::worker::learn_libtorch_version();
    }
    let ui =
        Ui::for_node(&job.events).with_context(|| format!("opening {}", job.events.display()))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_keep_alive(std::time::Duration::from_secs(7 * 24 * 3600))
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let events = job.events.clone();
    let result = runtime.block_on(run_job(job, ui));
    if let Err(err) = &result {
        if !matches!(err, Error::Cancelled) {
            let line = WorkerEvent::Failed {
                message: format!("{err:#}"),
            }
            .to_line();
            let _ = append_line(&events, &line);
        }
    }
    match result {
        Err(Error::Cancelled) => Ok(NodeOutcome::Stopped),
        other => other,
    }
}

fn append_line(path: &Path, line: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().append(true).open(path)?;
    f.write_all(format!("{line}\n").as_bytes())
}

async fn run_job(job: JobSpec, ui: Ui) -> Result<NodeOutcome, Error> {
    let cache = Arc::new(Cache::open(&job.cache_dir)?);
    let fp = &job.fingerprint;
    let covers = |record: &StageRecord| lacking_outputs(&job.outputs, record).is_empty();
    if let Some(record) = cache.hit(fp)?.filter(covers) {
        ui.say(&format!("stage {}: already committed", job.stage));
        ui.event(&WorkerEvent::Done {
            metrics: record.metrics,
        });
        return Ok(NodeOutcome::Committed);
    }
    let pipeline = manifest::load(
        &job.manifest,
        &LoadOptions {
            sets: job.sets.clone(),
        },
    )
    .map_err(anyhow::Error::from)?;
    let i = pipeline
        .stages
        .iter()
        .position(|s| s.id == job.stage)
        .with_context(|| {
            format!(
                "stage `{}` is no longer in {} (the manifest changed after the job was submitted)",
                job.stage,
                job.manifest.display()
            )
        })?;
    let stage = &pipeline.stages[i];
    let op = crate::ops::find(&stage.op)
        .with_context(|| format!("stage `{}`: unknown op `{}`", stage.id, stage.op))?;
    let key = stage_key(&pipeline, stage, op.version, job.key.inputs.clone());
    if key.fingerprint() != *fp {
        return Err(anyhow::anyhow!(
            "stage `{}`: {} changed after the job was submitted (fingerprint {} here, {} submitted); run it again",
            stage.id,
            job.manifest.display(),
            key.fingerprint().short(),
            fp.short()
        )
        .into());
    }

    let cancel = CancellationToken::new();
    watch_signals(&cancel)?;
    let options = RunOptions {
        threads: job.threads,
        ..RunOptions::default()
    };
    let shared = Shared {
        pipeline: Arc::new(pipeline),
        cache: cache.clone(),
        ui,
        cancel: cancel.clone(),
        jobs: Semaphore::new(1),
        gpus: GpuSlots::none(),
        cores: CorePool::new(job.threads, 0),
        options,
        lockfile: None,
        finished: Mutex::new(Vec::new()),
        cluster: None,
    };
    // The per-fingerprint lock spares duplicate work; the create-if-absent
    // commit is what keeps the record whole if two nodes race anyway.
    let lock = {
        let (cache, fp) = (cache.clone(), fp.clone());
        tokio::select! {
            lock = tokio::task::spawn_blocking(move || cache.lock_stage(&fp)) => {
                lock.map_err(anyhow::Error::from)??
            }
            _ = cancel.cancelled() => return Err(Error::Cancelled),
        }
    };
    if let Some(record) = shared.hit(&shared.pipeline.stages[i], fp)? {
        shared.ui.event(&WorkerEvent::Done {
            metrics: record.metrics,
        });
        return Ok(NodeOutcome::Committed);
    }
    let device = if job.gpus > 0 {
        Device::Allocated
    } else {
        Device::Cpu
    };
    let record = run_here(&shared, i, op, &key, fp, device).await;
    drop(lock);
    let record = record?;
    shared.ui.event(&WorkerEvent::Done {
        metrics: record.metrics,
    });
    Ok(NodeOutcome::Committed)
}

/// SIGTERM and SIGINT (the time limit, `scancel`, preemption) stop the
/// stage; SIGUSR1 (`--signal` before the time limit) asks the worker for a
/// checkpoint at its next step: the stage keeps going, and a resubmission
/// resumes from that checkpoint.
fn watch_signals(cancel: &CancellationToken) -> Result<(), Error> {
    let mut term = tokio::signal::unix::signal(SignalKind::terminate()).context("SIGTERM")?;
    let mut int = tokio::signal::unix::signal(SignalKind::interrupt()).context("SIGINT")?;
    let mut usr1 = tokio::signal::unix::signal(SignalKind::user_defined1()).context("SIGUSR1")?;
    let cancel = cancel.clone();
    let note = |what: &str| eprintln!("alignflow stage exec: {what}");
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = term.recv() => { note("SIGTERM: stopping the stage"); cancel.cancel(); }
                _ = int.recv() => { note("SIGINT: stopping the stage"); cancel.cancel(); }
                _ = usr1.recv() => {
                    note("the job nears its time limit (SIGUSR1): the worker checkpoints at its next step, and a resubmission resumes from there");
                    alignflow_ops::checkpoint_request::ask();
                }
            }
        }
    });
    Ok(())
}
