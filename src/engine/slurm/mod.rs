//! The slurm executor: each stage that is not cached becomes one Slurm job
//! running `alignflow stage exec SPEC.json` (see `engine/node.rs`), while
//! the engine keeps the DAG and early cutoff here.
//!
//! The committed record is the result, not the scheduler's state: a stage
//! is done when its record appears. The job's state only says what to do
//! while it does not: wait (pending, running), resubmit (a job lost from
//! `squeue`, `TIMEOUT`, `PREEMPTED`, `NODE_FAIL`, cancelled by someone
//! else: bounded by `max_attempts`, resuming from the stage's checkpoints),
//! or fail with the tail of the job's output (`FAILED`, `OUT_OF_MEMORY`, a
//! job that ended without a record).

mod journal;
mod poll;
mod submit;

use std::collections::BTreeMap;
use std::io::{BufRead, Seek};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use std::os::unix::process::CommandExt as _;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::cache::{Fingerprint, StageKey, StageRecord};
use crate::manifest::{Resources, Stage};
use crate::ops::{OpDecl, Reporter};
use crate::protocol::WorkerEvent;

use super::execute::Shared;
use super::node::JobSpec;
use super::profile::SlurmSettings;
use super::progress::StageProgress;
use super::Error;

pub use journal::{list_runs, read_jobs, run_dir, JobEntry, RunInfo};
pub use poll::parse_squeue;

use journal::{JobLine, Journal};
use poll::Poller;
use submit::{
    live_jobs_of, output_within, sbatch, transient_failure, write_job_script, Submission,
};

/// A cluster run: its id (every job's name), its folders, its poller.
pub(in crate::engine) struct Cluster {
    pub run_id: String,
    /// `cache/tmp/slurm-RUN/`: job specs, scripts, events and job logs.
    staging: PathBuf,
    journal: Journal,
    poller: Poller,
    settings: SlurmSettings,
    manifest: PathBuf,
    sets: Vec<(String, String)>,
    /// `--attach`: the last job of each fingerprint that had not ended.
    adopted: Mutex<BTreeMap<String, JobEntry>>,
    /// `runs/RUN/engine.lock`, held while this engine runs the run.
    _engine: std::fs::File,
}

/// A fresh run id: `af-<pipeline>-<UTC time>-<random>`, usable as a job
/// name and a folder name.
pub fn new_run_id(pipeline: &str) -> String {
    let clean: String = pipeline
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(32)
        .collect();
    let stamp = humantime::format_rfc3339_seconds(SystemTime::now())
        .to_string()
        .replace(['-', ':'], "")
        .trim_end_matches('Z')
        .to_string();
    format!("af-{clean}-{stamp}-{:04x}", rand::random::<u16>())
}

impl Cluster {
    /// Opens the run `info.run_id` in the cache at `cache_root`: writes
    /// `run.json` for a new run, adopts the unfinished jobs of an attached
    /// one (`attach` = `Some(take_over)`), and starts polling. Call inside
    /// the runtime.
    pub fn open(
        cache_root: &Path,
        info: &RunInfo,
        attach: Option<bool>,
        stop: CancellationToken,
    ) -> anyhow::Result<Cluster> {
        let dir = run_dir(cache_root, &info.run_id);
        if attach.is_none() {
            info.save(&dir)?;
        }
        let engine = hold_engine_lock(&dir, &info.run_id, attach == Some(true))?;
        let mut settings = info.settings.clone();
        if settings.alignflow.is_none() {
            // Found now, not at each submission: once the binary is
            // replaced (a reinstall mid-run), this process's own path
            // reads `alignflow (deleted)`, which no job could run.
            let exe = std::env::current_exe().context("locating the alignflow binary")?;
            settings.alignflow = Some(exe);
        }
        let mut adopted = BTreeMap::new();
        if attach.is_some() {
            for job in read_jobs(&dir)? {
                if job.ended.is_none() {
                    adopted.insert(job.fingerprint.clone(), job);
                }
            }
        }
        let staging = cache_root
            .join("tmp")
            .join(format!("slurm-{}", info.run_id));
        std::fs::create_dir_all(&staging)
            .with_context(|| format!("creating {}", staging.display()))?;
        Ok(Cluster {
            run_id: info.run_id.clone(),
            staging,
            journal: Journal::open(&dir)?,
            poller: Poller::start(
                info.run_id.clone(),
                info.settings.poll(),
                info.settings.command_timeout(),
                stop,
            ),
            settings,
            manifest: info.manifest.clone(),
            sets: info.sets.clone(),
            adopted: Mutex::new(adopted),
            _engine: engine,
        })
    }

    /// `scancel --name RUN`: every job of the run, in one call. `false`
    /// (after a warning naming the command to run) when it failed.
    pub async fn cancel_all(&self) -> bool {
        scancel(&["--name", &self.run_id], self.settings.command_timeout()).await
    }

    /// `scancel JOB`: one job, which the engine stops following while it
    /// may still be queued or running (often it has ended: then quietly).
    async fn cancel_job(&self, job_id: &str) {
        scancel(&[job_id], self.settings.command_timeout()).await;
    }
}

/// Takes `RUN/engine.lock` for this process (released when it exits, even
/// killed), and writes who holds it. One engine per run: `--attach` adopts
/// the jobs of a run whose engine died, never of one that runs (both would
/// submit, retry and cancel the same jobs). `take_over` (`--take-over`)
/// replaces a lock that outlived its engine with a fresh one, unless its
/// holder is a live process of this host.
fn hold_engine_lock(dir: &Path, run_id: &str, take_over: bool) -> anyhow::Result<std::fs::File> {
    use std::io::Read;
    let path = dir.join("engine.lock");
    let mut file = open_lock_file(&path)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut owner = String::new();
            let _ = file.read_to_string(&mut owner);
            let owner = owner.trim();
            if !take_over {
                anyhow::bail!(
                    "run {run_id} has a live engine ({owner}): `--attach` adopts the jobs of a run whose engine died; `alignflow jobs {run_id}` lists this one's (an engine known dead whose lock outlived it, its login node lost with the cache on NFSv3: `alignflow run --attach {run_id} --take-over`)"
                );
            }
            if let Some(pid) = live_local_holder(owner) {
                anyhow::bail!(
                    "run {run_id}: its engine, pid {pid} on this host, is alive; `--take-over` is for an engine known dead"
                );
            }
            tracing::warn!(
                "taking run {run_id} over from its engine ({owner}), whose lock stands; were that engine alive, both would submit and cancel its jobs"
            );
            return fresh_engine_lock(&path);
        }
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(e).with_context(|| format!("locking {}", path.display()))
        }
    }
    write_owner(&mut file)?;
    Ok(file)
}

fn open_lock_file(path: &Path) -> anyhow::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))
}

/// Who holds the lock, as this engine writes it: `pid P on HOST`.
fn write_owner(file: &mut std::fs::File) -> anyhow::Result<()> {
    use std::io::{Seek, Write};
    let owner = format!("pid {} on {}", std::process::id(), this_host());
    file.set_len(0)?;
    file.rewind()?;
    file.write_all(owner.as_bytes())?;
    Ok(())
}

fn this_host() -> String {
    crate::cache::Provenance::here(String::new(), None).host
}

/// The holder's pid when `owner` names a process of this host that lives.
fn live_local_holder(owner: &str) -> Option<u32> {
    let (pid, host) = owner.strip_prefix("pid ")?.split_once(" on ")?;
    let pid: u32 = pid.parse().ok()?;
    let alive = unsafe { libc::kill(pid as libc::pid_t, 0) } == 0
        || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
    (host == this_host() && alive).then_some(pid)
}

/// A new lock file, locked and written, renamed over `path`: the stale
/// lock stays on the old file, which no one opens again.
fn fresh_engine_lock(path: &Path) -> anyhow::Result<std::fs::File> {
    let fresh = path.with_extension(format!("lock.{}", std::process::id()));
    let mut file = open_lock_file(&fresh)?;
    file.try_lock()
        .with_context(|| format!("locking {}", fresh.display()))?;
    write_owner(&mut file)?;
    std::fs::rename(&fresh, path)
        .with_context(|| format!("renaming {} over {}", fresh.display(), path.display()))?;
    Ok(file)
}

/// `scancel ARGS`, in a process group of its own: a second Ctrl-C at the
/// terminal reaches the engine's group, and must not kill the scancel that
/// the first one started. `false` when it failed, after a warning unless
/// the job had ended already (which is what was wanted).
async fn scancel(args: &[&str], limit: Duration) -> bool {
    let mut command = tokio::process::Command::new("scancel");
    command.args(args).process_group(0);
    let failure = match output_within(&mut command, limit).await {
        Ok(o) if o.status.success() => return true,
        Ok(o) => String::from_utf8_lossy(&o.stderr).trim().to_string(),
        Err(e) => format!("{e:#}"),
    };
    if says_job_ended(&failure) {
        tracing::debug!("`scancel {}`: {failure}", args.join(" "));
    } else {
        tracing::warn!(
            "`scancel {}` failed ({failure}): run it once the controller answers",
            args.join(" ")
        );
    }
    false
}

/// Whether scancel's complaint is that the job has ended (or ended so long
/// ago that the controller forgot it).
fn says_job_ended(failure: &str) -> bool {
    ["already completing or completed", "Invalid job id"]
        .iter()
        .any(|said| failure.contains(said))
}

/// `scancel --name RUN`, blocking and bounded (10 s): for the second
/// signal, which exits at once, and would otherwise leave the run's jobs
/// queued and running.
pub(in crate::engine) fn cancel_run_now(run_id: &str) {
    let child = std::process::Command::new("scancel")
        .args(["--name", run_id])
        .process_group(0)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn();
    let Ok(mut child) = child else {
        eprintln!("could not run `scancel --name {run_id}`: run it yourself");
        return;
    };
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return,
            Ok(Some(_)) | Err(_) => break,
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
    eprintln!("`scancel --name {run_id}` did not succeed: run it yourself");
}

/// A job of a stage being watched.
struct Watched {
    job_id: String,
    attempt: u32,
    log: PathBuf,
    submitted: Instant,
}

/// How watching a job ended.
enum Ended {
    /// Boxed: a record is large, the other variants small.
    Committed(Box<StageRecord>),
    /// Submit again (why).
    Retry(String),
    /// Fail the stage (why, with the job's output tail).
    Failed(String),
}

/// How a stage's record came on a cluster.
pub(super) enum Remote {
    /// This run's job committed it.
    Ran(StageRecord),
    /// Another run's job did, while this run waited without one.
    ByAnotherRun(StageRecord),
}

/// Runs stage `i` as a Slurm job (or adopts its job from `--attach`) and
/// waits for its record.
pub(super) async fn run_remote(
    shared: &Shared,
    i: usize,
    op: &'static OpDecl,
    key: &StageKey,
    fp: &Fingerprint,
) -> Result<Remote, Error> {
    let cluster = shared.cluster.as_ref().expect("a slurm run has a cluster");
    let settings = &cluster.settings;
    let stage = &shared.pipeline.stages[i];
    let _slot = tokio::select! {
        permit = shared.jobs.acquire() => permit.expect("semaphore open"),
        _ = shared.cancel.cancelled() => return Err(Error::Cancelled),
    };
    let dir = cluster.staging.join(fp.to_string());
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let events = dir.join("events.jsonl");
    let spec_path = dir.join("spec.json");
    let threads = stage.resources.cpus.map(|c| c as usize);
    let placed = alignflow_ops::role_devices::gpus_named(stage.params.get("placement"));
    let ranks = crate::ops::training::data_parallel_ranks(&stage.params);
    let gpus = stage
        .resources
        .gpus_for(&stage.device, op.runs_in_worker(), placed, ranks);
    // Ranks on GPUs, or with models placed on GPUs: each task (rank) holds
    // its share of the GPUs (`--gpus-per-task`).
    let ranks_on_gpus = gpus > 0 && (stage.device != "cpu" || placed > 0) && op.runs_in_worker();
    let needed = alignflow_ops::role_devices::gpus_per_rank(placed, stage.device != "cpu") * ranks;
    if ranks_on_gpus && ranks > 1 && (gpus as usize) < needed {
        let what = match placed {
            0 => "runs one rank per GPU".to_string(),
            n => format!("runs each rank on the {n} GPU(s) `params.placement` names"),
        };
        return Err(anyhow::anyhow!(
            "stage `{}`: `resources.gpus: {gpus}` but `params.data_parallel: {ranks}` {what}: ask for {needed} GPUs (or leave `gpus` out)",
            stage.id
        )
        .into());
    }
    // One task per rank, as `srun python train.py` has, on GPUs or not:
    // rank 0's worker starts the others as an srun step.
    let tasks = ranks.max(1);
    let job = JobSpec {
        cache_dir: shared.cache.root().to_path_buf(),
        manifest: cluster.manifest.clone(),
        sets: cluster.sets.clone(),
        stage: stage.id.clone(),
        key: key.clone(),
        fingerprint: fp.clone(),
        threads,
        gpus,
        tasks,
        events: events.clone(),
        outputs: stage.outputs.clone(),
    };
    crate::cache::atomic_write(
        &spec_path,
        &serde_json::to_vec_pretty(&job).map_err(anyhow::Error::from)?,
    )
    .with_context(|| format!("writing {}", spec_path.display()))?;
    let script = write_job_script(&dir, &spec_path, settings, &stage.id, fp)?;
    let job_files = StageJob {
        i,
        fp,
        script,
        dir: dir.clone(),
        resources: Resources {
            gpus: Some(gpus),
            ..stage.resources.clone()
        },
        tasks,
    };
    let progress = shared.ui.stage(&stage.id);
    let _waiting = cluster.poller.waiting();

    let adopted = cluster
        .adopted
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&fp.to_string());
    // An adopted job's events from its submission on: it may have failed
    // while no engine followed it, and left squeue since.
    let mut tail = EventTail::new(events, adopted.as_ref().map(|job| job.events_from));
    let mut watched = match adopted {
        Some(job) => {
            shared.ui.say(&format!(
                "adopt   {} (job {}, attempt {})",
                stage.id, job.job_id, job.attempt
            ));
            Watched {
                job_id: job.job_id,
                attempt: job.attempt,
                log: job.log,
                submitted: Instant::now(),
            }
        }
        None => {
            if let Some(record) = after_another_runs_job(shared, stage, fp).await? {
                progress.finish();
                return Ok(Remote::ByAnotherRun(record));
            }
            submit(shared, cluster, &job_files, 1, None).await?
        }
    };
    let result = loop {
        let ended = watch(shared, cluster, stage, &watched, fp, &progress, &mut tail).await;
        match ended {
            // Ctrl-C cancels the run's jobs (`run`); an error of this
            // node's (an NFS hiccup reading the cache) leaves a job that may
            // yet commit its record running.
            Err(e) => break Err(e),
            Ok(Ended::Committed(record)) => break Ok(*record),
            Ok(Ended::Failed(why)) => {
                // Ended, or held in the queue (SPECIAL_EXIT, a bad request).
                cluster.cancel_job(&watched.job_id).await;
                break Err(anyhow::anyhow!("{why}").into());
            }
            Ok(Ended::Retry(why)) => {
                // A lost job may still run where squeue does not show it: it
                // goes before another takes its place. (An ended one: a no-op.)
                cluster.cancel_job(&watched.job_id).await;
                // It may have committed while it was being killed.
                if let Some(record) = shared.hit(stage, fp)? {
                    break Ok(record);
                }
                if watched.attempt >= settings.max_attempts {
                    break Err(anyhow::anyhow!(
                        "{why}; gave up after {} attempt(s) (max_attempts){}",
                        watched.attempt,
                        output_tail(&watched.log)
                    )
                    .into());
                }
                shared.ui.say(&format!(
                    "retry   {}: {why}; resubmitting (attempt {}), resuming from its checkpoints",
                    stage.id,
                    watched.attempt + 1
                ));
                // An earlier attempt's failure says nothing of the next
                // (its last lines read first, so none comes after).
                tail.read(&progress);
                tail.failure = None;
                let previous = Some(watched.job_id.as_str());
                watched =
                    submit(shared, cluster, &job_files, watched.attempt + 1, previous).await?;
            }
        }
    };
    progress.finish();
    result.map(Remote::Ran)
}

/// What every submission of one stage's job shares.
struct StageJob<'a> {
    /// Index into `pipeline.stages`.
    i: usize,
    fp: &'a Fingerprint,
    script: PathBuf,
    /// The stage's folder in the run's staging area.
    dir: PathBuf,
    /// Its resources, GPUs settled.
    resources: Resources,
    /// Its Slurm tasks: one per `data_parallel` rank
    /// (`submit::rank_flags`).
    tasks: usize,
}

/// Submits the stage's job (attempt `attempt`) and journals it.
async fn submit(
    shared: &Shared,
    cluster: &Cluster,
    job: &StageJob<'_>,
    attempt: u32,
    previous: Option<&str>,
) -> Result<Watched, Error> {
    let (stage, fp) = (&shared.pipeline.stages[job.i], job.fp);
    // Measured before the job can start writing.
    let events_from = std::fs::metadata(job.dir.join("events.jsonl")).map_or(0, |m| m.len());
    let Submission { job_id, log } = sbatch_patiently(shared, cluster, job, previous)
        .await
        .map_err(|e| match e {
            Error::Cancelled => Error::Cancelled,
            e => anyhow::Error::from(e)
                .context(format!("stage `{}`: submitting its job", stage.id))
                .into(),
        })?;
    cluster.poller.submitted();
    cluster.journal.append(&JobLine::Submitted {
        stage: stage.id.clone(),
        fingerprint: fp.to_string(),
        job_id: job_id.clone(),
        attempt,
        log: log.clone(),
        events_from,
        at: now(),
    })?;
    shared.ui.say(&format!(
        "submit  {} ({}) as job {job_id}{}",
        stage.id,
        stage.op,
        if attempt > 1 {
            format!(", attempt {attempt}")
        } else {
            String::new()
        }
    ));
    Ok(Watched {
        job_id,
        attempt,
        log,
        submitted: Instant::now(),
    })
}

/// Waits between sbatch tries that failed in reaching the controller.
const SBATCH_RETRY_WAITS: [Duration; 2] = [Duration::from_secs(10), Duration::from_secs(30)];

/// `sbatch`, tried again after a failure in reaching the controller (a
/// busy one times out): three tries in all. Such a failure may come after
/// the controller queued the job, so the stage's job (by its comment)
/// queued meanwhile is taken instead of a second one, which would run
/// untracked. `previous` is the stage's job this one replaces.
async fn sbatch_patiently(
    shared: &Shared,
    cluster: &Cluster,
    job: &StageJob<'_>,
    previous: Option<&str>,
) -> Result<Submission, Error> {
    let stage = &shared.pipeline.stages[job.i];
    let mut waits = SBATCH_RETRY_WAITS.iter();
    loop {
        let failure = match sbatch(
            &cluster.run_id,
            job.fp,
            &job.script,
            &job.dir,
            &job.resources,
            job.tasks,
            &cluster.settings,
        )
        .await
        {
            Ok(submission) => return Ok(submission),
            Err(e) => e,
        };
        let message = format!("{failure:#}");
        if !transient_failure(&message) {
            return Err(failure.into());
        }
        match live_jobs_of(&cluster.run_id, job.fp, cluster.settings.command_timeout()).await {
            Ok(ids) => {
                if let Some(job_id) = ids.into_iter().find(|id| Some(id.as_str()) != previous) {
                    shared.ui.say(&format!(
                        "warning: stage `{}`: sbatch failed ({}), but the controller queued its job {job_id}: following that one",
                        stage.id,
                        message.lines().last().unwrap_or_default()
                    ));
                    let log = job.dir.join(format!("slurm-{job_id}.out"));
                    return Ok(Submission { job_id, log });
                }
            }
            Err(e) => tracing::debug!("looking for a job sbatch may have queued: {e:#}"),
        }
        let Some(wait) = waits.next() else {
            return Err(failure.into());
        };
        shared.ui.say(&format!(
            "warning: stage `{}`: sbatch failed ({}); trying again in {}s",
            stage.id,
            message.lines().last().unwrap_or_default(),
            wait.as_secs()
        ));
        tokio::select! {
            _ = tokio::time::sleep(*wait) => {}
            _ = shared.cancel.cancelled() => return Err(Error::Cancelled),
        }
    }
}

fn now() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

/// Follows one job tick by tick until its stage's record appears or the
/// job ends without one.
async fn watch(
    shared: &Shared,
    cluster: &Cluster,
    stage: &Stage,
    job: &Watched,
    fp: &Fingerprint,
    progress: &StageProgress<'_>,
    tail: &mut EventTail,
) -> Result<Ended, Error> {
    let mut rx = cluster.poller.subscribe();
    let lost_after = Duration::from_secs_f64(cluster.settings.lost_after.max(0.0));
    let mut missing_since: Option<Instant> = None;
    let mut said_reason: Option<String> = None;
    loop {
        tokio::select! {
            changed = rx.changed() => {
                if changed.is_err() {
                    return Err(anyhow::anyhow!("the job poller stopped").into());
                }
            }
            _ = shared.cancel.cancelled() => return Err(Error::Cancelled),
        }
        tail.read(progress);
        if let Some(record) = shared.hit(stage, fp)? {
            return Ok(Ended::Committed(Box::new(record)));
        }
        let snapshot = rx.borrow_and_update().clone();
        if snapshot.error.is_some() || snapshot.taken < job.submitted {
            continue;
        }
        let Some(state) = snapshot.jobs.get(&job.job_id) else {
            let since = *missing_since.get_or_insert(snapshot.taken);
            if snapshot.taken.duration_since(since) >= lost_after {
                // Out of squeue's sight (ended longer ago than MinJobAge, or a
                // controller that lost its state): a failure its node
                // reported is the verdict; another attempt would fail alike.
                tail.read(progress);
                // Journaled as ended: `run --attach` must not adopt it.
                let (state, reason) = match &tail.failure {
                    Some(_) => ("FAILED", "left squeue after its node reported a failure"),
                    None => ("LOST", "not in squeue, and no record"),
                };
                cluster.journal.append(&JobLine::Ended {
                    job_id: job.job_id.clone(),
                    state: state.into(),
                    reason: reason.into(),
                    at: now(),
                })?;
                if let Some(message) = &tail.failure {
                    return Ok(Ended::Failed(format!(
                        "job {} failed: {message} (it has left squeue){}",
                        job.job_id,
                        output_tail(&job.log)
                    )));
                }
                return Ok(Ended::Retry(format!(
                    "job {} is lost (not in squeue for {:.0} s, and no record)",
                    job.job_id,
                    lost_after.as_secs_f64()
                )));
            }
            continue;
        };
        missing_since = None;
        let state_name = state.state.as_str();
        let ended = |verdict: Ended| -> Result<Ended, Error> {
            cluster.journal.append(&JobLine::Ended {
                job_id: job.job_id.clone(),
                state: state.state.clone(),
                reason: state.reason.clone(),
                at: now(),
            })?;
            Ok(verdict)
        };
        let what = format!("job {} {} ({})", job.job_id, state_name, state.reason);
        if state_name == "PENDING" {
            if let Some(hint) = never_starts(&state.reason) {
                return ended(Ended::Failed(format!(
                    "{what}: Slurm will not start it as submitted: {hint}"
                )));
            }
        }
        // Why a job waits (a hold, a drained node, a limit) is worth a line,
        // once per reason.
        if matches!(state_name, "PENDING" | "REQUEUE_HOLD" | "SUSPENDED")
            && !matches!(
                state.reason.as_str(),
                "None" | "Priority" | "Resources" | ""
            )
            && said_reason.as_deref() != Some(state.reason.as_str())
        {
            shared.ui.say(&format!("waiting {}: {what}", stage.id));
            said_reason = Some(state.reason.clone());
        }
        match state_name {
            "PENDING" | "RUNNING" | "CONFIGURING" | "COMPLETING" | "SUSPENDED" | "REQUEUED"
            | "REQUEUE_HOLD" | "REQUEUE_FED" | "RESIZING" | "SIGNALING" | "STAGE_OUT"
            | "STOPPED" | "RESV_DEL_HOLD" => continue,
            "TIMEOUT" | "PREEMPTED" | "NODE_FAIL" | "BOOT_FAIL" | "CANCELLED" => {
                return ended(Ended::Retry(what))
            }
            // The same deadline would pass again.
            "DEADLINE" => {
                return ended(Ended::Failed(format!(
                    "{what}: its --deadline passed before it could end{}",
                    output_tail(&job.log)
                )))
            }
            _ => {
                // The record may have landed after this tick's check.
                tail.read(progress);
                if let Some(record) = shared.hit(stage, fp)? {
                    return ended(Ended::Committed(Box::new(record)));
                }
                if state_name == "COMPLETED" {
                    if let Some(record) = completed_record(shared, stage, fp, lost_after).await? {
                        return ended(Ended::Committed(Box::new(record)));
                    }
                }
                let said = tail
                    .failure
                    .as_deref()
                    .map(|m| format!(": {m}"))
                    .unwrap_or_default();
                let why = match state_name {
                    "OUT_OF_MEMORY" => format!("{what}: out of memory (raise `resources.mem`)"),
                    "COMPLETED" => format!("{what} without committing a record{said}"),
                    _ => format!("{what}{said}"),
                };
                return ended(Ended::Failed(format!("{why}{}", output_tail(&job.log))));
            }
        }
    }
}

/// Waits, with no job of its own, while another run's job holds the
/// fingerprint's lock (a teammate's run on the same cache, or a run whose
/// engine died): a job submitted now would sit in its allocation, GPUs
/// included, until that one ends, to find the stage committed. The lock is
/// only tested, each second, off the runtime (it waits for a running gc).
/// Then that job's record, if it committed one (NFS may show it late).
async fn after_another_runs_job(
    shared: &Shared,
    stage: &Stage,
    fp: &Fingerprint,
) -> Result<Option<StageRecord>, Error> {
    let mut waited = false;
    loop {
        let (cache, fp_) = (shared.cache.clone(), fp.clone());
        let free =
            tokio::task::spawn_blocking(move || cache.try_lock_stage(&fp_).map(|l| l.is_some()))
                .await
                .map_err(anyhow::Error::from)??;
        if free {
            break;
        }
        if !waited {
            shared.ui.say(&format!(
                "waiting {} (another run's job holds it; none submitted meanwhile)",
                stage.id
            ));
            waited = true;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = shared.cancel.cancelled() => return Err(Error::Cancelled),
        }
    }
    if !waited {
        return Ok(None);
    }
    let grace = Duration::from_secs_f64(
        shared
            .cluster
            .as_ref()
            .map_or(0.0, |c| c.settings.lost_after.max(0.0)),
    );
    completed_record(shared, stage, fp, grace).await
}

/// The record of a COMPLETED job: `stage exec` exits 0 only once it has
/// committed it, but a network filesystem may hide it from this node for a
/// while (NFS caches a name's absence and a folder's attributes for up to
/// a minute). Looks again each second for `grace`, listing the folders of
/// the record and its outputs first, which makes NFS look at them afresh.
async fn completed_record(
    shared: &Shared,
    stage: &Stage,
    fp: &Fingerprint,
    grace: Duration,
) -> Result<Option<StageRecord>, Error> {
    let start = Instant::now();
    loop {
        let mut folders: Vec<PathBuf> = shared.cache.record_path(fp).into_iter().collect();
        if let Ok(Some(record)) = shared.cache.record(fp) {
            folders.extend(
                record
                    .outputs
                    .values()
                    .map(|id| shared.cache.artifact_path(id)),
            );
        }
        for folder in folders.iter().filter_map(|p| p.parent()) {
            let _ = std::fs::read_dir(folder).map(Iterator::count);
        }
        if let Some(record) = shared.hit(stage, fp)? {
            return Ok(Some(record));
        }
        if start.elapsed() >= grace {
            return Ok(None);
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = shared.cancel.cancelled() => return Err(Error::Cancelled),
        }
    }
}

/// What to change when a pending job's reason (squeue's `%r`) says Slurm
/// will never start it as submitted: a per-job limit it exceeds, or an
/// account, QOS or dependency that cannot be. With `EnforcePartLimits=NO`
/// (Slurm's default) such a job is accepted and pends for ever. Holds,
/// drained nodes, reservations and features missing for now
/// (`BadConstraints` can be transient) can end: those are waited for (and
/// said).
fn never_starts(reason: &str) -> Option<&'static str> {
    Some(match reason {
        "PartitionTimeLimit" | "QOSMaxWallDurationPerJobLimit"
        | "AssocMaxWallDurationPerJobLimit" => {
            "its time limit exceeds what the partition or QOS allows a job: lower `resources.time`, or pick another `slurm.partition`"
        }
        // Not PartitionNodeLimit: squeue also says it while the nodes a job
        // needs are down or drained, which ends.
        "QOSMaxNodePerJobLimit" | "AssocMaxNodesPerJob"
        | "QOSMaxCpuPerJobLimit" | "AssocMaxCpuPerJobLimit" | "QOSMaxGRESPerJob"
        | "QOSMaxMemoryPerJob" | "QOSMinGRES" | "QOSMinCpuNotSatisfied" => {
            "it asks for more (or less) than the partition or QOS allows one job: change `resources` (cpus, mem, gpus) or `params.data_parallel`"
        }
        "InvalidAccount" => "its account is not valid here: check `slurm.account`",
        "InvalidQOS" => "its QOS is not valid here: check `--qos` in `slurm.sbatch_flags`",
        "DependencyNeverSatisfied" => "a dependency in `slurm.sbatch_flags` can never be satisfied",
        _ => return None,
    })
}

/// The last lines of a job's output, for a failure message.
fn output_tail(log: &Path) -> String {
    const LINES: usize = 20;
    match std::fs::read_to_string(log) {
        Ok(text) => {
            let lines: Vec<&str> = text.lines().collect();
            let from = lines.len().saturating_sub(LINES);
            format!(
                "\nlast lines of the job's output {}:\n{}",
                log.display(),
                lines[from..].join("\n")
            )
        }
        Err(e) => format!("\n(the job's output {} is unreadable: {e})", log.display()),
    }
}

/// Reads the new complete lines of a node's `events.jsonl`.
struct EventTail {
    path: PathBuf,
    offset: u64,
    /// The node's failure message, if it reported one.
    failure: Option<String>,
}

impl EventTail {
    /// Follows `path` from `from`, else from its end: events of an earlier
    /// attempt are kept there, and progress restarts anyway.
    fn new(path: PathBuf, from: Option<u64>) -> EventTail {
        let offset = from.unwrap_or_else(|| std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0));
        EventTail {
            path,
            offset,
            failure: None,
        }
    }

    fn read(&mut self, progress: &StageProgress<'_>) {
        let Ok(mut file) = std::fs::File::open(&self.path) else {
            return;
        };
        if file.seek(std::io::SeekFrom::Start(self.offset)).is_err() {
            return;
        }
        let mut reader = std::io::BufReader::new(file);
        let mut line = String::new();
        while let Ok(n) = reader.read_line(&mut line) {
            // A line still being written waits for the next tick.
            if n == 0 || !line.ends_with('\n') {
                break;
            }
            self.offset += n as u64;
            match WorkerEvent::parse(&line) {
                Some(WorkerEvent::Progress { pos, len, msg }) => progress.progress(pos, len, &msg),
                Some(WorkerEvent::Metric { values }) => progress.metric(&values),
                Some(WorkerEvent::Failed { message }) => self.failure = Some(message),
                _ => {}
            }
            line.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// scancel's words for an ended job and (in versions that complain of
    /// one) an unknown one: no failure worth a warning; a controller that
    /// does not answer is. tests/slurm.rs checks the test cluster's scancel
    /// says nothing else of those.
    #[test]
    fn scancel_failures_that_mean_the_job_ended_are_told_apart() {
        assert!(says_job_ended(
            "scancel: error: Kill job error on job id 12: Job/step already completing or completed"
        ));
        assert!(says_job_ended(
            "scancel: error: Kill job error on job id 999999: Invalid job id specified"
        ));
        assert!(!says_job_ended(
            "scancel: error: Kill job error on job id 12: Socket timed out on send/recv operation"
        ));
    }

    #[test]
    fn only_reasons_that_cannot_pass_are_never_starting() {
        assert!(never_starts("PartitionTimeLimit").is_some());
        assert!(never_starts("InvalidAccount").is_some());
        for waits in [
            "Priority",
            "Resources",
            "PartitionNodeLimit",
            "BadConstraints",
            "ReqNodeNotAvail",
            "JobHeldUser",
        ] {
            assert!(never_starts(waits).is_none(), "{waits}");
        }
    }
}
