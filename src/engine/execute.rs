//! Running one stage, in phases: find it cached under its actual inputs
//! (key hit); take a GPU slot, a job slot and the per-fingerprint lock
//! (acquire); check its inputs from the store and run it in a worker or in
//! the engine, failing it if it changed an input (dispatch, with `feed`);
//! ingest its outputs and only then write its record (commit).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use tokio::sync::{Semaphore, SemaphorePermit};
use tokio_util::sync::CancellationToken;

use crate::cache::{
    remove_all, ArtifactId, Cache, CacheError, FailureNote, Fingerprint, Provenance, StageKey,
    StageLock, StageRecord,
};
use crate::manifest::{Input, Pipeline, Stage};
use crate::ops::{CancelFlag, OpDecl, Placement};
use crate::protocol::{Metrics, StageSpec, NOT_BITWISE_METRIC};
use crate::tracking;

use super::feed::{changed_inputs, check_store_inputs, guard_inputs};
use super::gpus::{GpuSlot, GpuSlots};
use super::lockfile::{LockedStage, Lockfile};
use super::options::Executor;
use super::plan::{hash_path_inputs, lacking_outputs, stage_key};
use super::progress::{StageProgress, Ui};
use super::threads::{CorePool, Cores};
use super::{worker, Error, RunOptions, StageStatus};

/// Shared state of the stage tasks.
pub(super) struct Shared {
    pub pipeline: Arc<Pipeline>,
    pub cache: Arc<Cache>,
    pub ui: Ui,
    pub cancel: CancellationToken,
    pub jobs: Semaphore,
    pub gpus: GpuSlots,
    pub options: RunOptions,
    /// The cores the CPU tensor stages share.
    pub cores: CorePool,
    pub lockfile: Option<Lockfile>,
    /// Lockfile entries of the stages that finished, ran or cached.
    pub finished: Mutex<Vec<(String, LockedStage)>>,
    /// The Slurm run, under the slurm executor.
    pub cluster: Option<super::slurm::Cluster>,
}

impl Shared {
    /// The cache's record of `fp` if it is a hit for `stage`: its outputs
    /// are stored and it has every output the stage declares.
    pub fn hit(&self, stage: &Stage, fp: &Fingerprint) -> Result<Option<StageRecord>, CacheError> {
        Ok(self
            .cache
            .hit(fp)?
            .filter(|record| lacking_outputs(&stage.outputs, record).is_empty()))
    }
}

/// A stage that finished, ran or cached.
pub(super) struct Finished {
    pub status: StageStatus,
    pub outputs: BTreeMap<String, ArtifactId>,
    pub key: StageKey,
    pub detail: String,
    /// Why the outputs are not bitwise reproducible, if the run said so.
    pub not_bitwise: Option<String>,
}

/// The reason a stage's record gives for outputs that are not bitwise
/// reproducible ([`NOT_BITWISE_METRIC`]), if any.
pub(super) fn not_bitwise(metrics: &Metrics) -> Option<String> {
    metrics
        .get(NOT_BITWISE_METRIC)
        .and_then(|v| v.as_str())
        .map(str::to_string)
}

/// One stage as the scheduler starts it.
pub(super) struct StageTask {
    /// Index into `pipeline.stages`.
    pub index: usize,
    pub op: &'static OpDecl,
    /// Ids of its stage-reference inputs: its upstream's actual outputs.
    pub upstream_ids: BTreeMap<String, ArtifactId>,
    /// The plan said `run` (so a cache hit now is an early cutoff).
    pub planned_run: bool,
}

/// Runs (or finds cached) one stage. Any failure once the run is cancelled
/// counts as the cancellation.
pub(super) async fn execute(shared: &Shared, task: StageTask) -> Result<Finished, Error> {
    let stage = &shared.pipeline.stages[task.index];
    let finished = execute_phases(shared, task).await.and_then(|finished| {
        // A record from elsewhere (a remote's, an older engine's) that
        // lacks an output the stage declares would leave its downstream
        // nothing to read.
        let lacking: Vec<&String> = stage
            .outputs
            .iter()
            .filter(|name| !finished.outputs.contains_key(*name))
            .collect();
        if !lacking.is_empty() {
            let record = shared.cache.record_path(&finished.key.fingerprint())?;
            return Err(anyhow::anyhow!(
                "its record has no output(s) {lacking:?} the stage declares: remove {} so that the stage runs again",
                record.display()
            )
            .into());
        }
        Ok(finished)
    });
    finished.map_err(|err| {
        if matches!(err, Error::Cancelled) || shared.cancel.is_cancelled() {
            Error::Cancelled
        } else {
            Error::StageFailed(err.into_anyhow())
        }
    })
}

async fn execute_phases(shared: &Shared, task: StageTask) -> Result<Finished, Error> {
    let StageTask {
        index: i,
        op,
        upstream_ids,
        planned_run,
    } = task;
    let stage = &shared.pipeline.stages[i];
    let key = actual_key(shared, i, op, upstream_ids).await?;
    let fp = key.fingerprint();
    if let Some(record) = shared.hit(stage, &fp)? {
        let detail = if planned_run {
            "early cutoff: upstream outputs unchanged"
        } else {
            "up to date"
        };
        return Ok(cached(record, key, detail));
    }

    let record = match &shared.options.executor {
        Executor::Slurm(_) => {
            // The team cache first: a pulled stage submits no job.
            if let Some((record, name)) = pull_from_remote(shared, stage, &fp).await {
                return Ok(cached(record, key, &format!("pulled from remote `{name}`")));
            }
            match super::slurm::run_remote(shared, i, op, &key, &fp).await? {
                super::slurm::Remote::Ran(record) => record,
                super::slurm::Remote::ByAnotherRun(record) => {
                    return Ok(cached(record, key, "finished by another run"));
                }
            }
        }
        Executor::Local => {
            let held = acquire(shared, stage, op, &fp).await?;
            // Whoever waited for the lock finds the stage cached.
            if let Some(record) = shared.hit(stage, &fp)? {
                return Ok(cached(record, key, "finished by another run"));
            }
            if let Some((record, name)) = pull_from_remote(shared, stage, &fp).await {
                return Ok(cached(record, key, &format!("pulled from remote `{name}`")));
            }
            let device = held.gpu.as_ref().map_or(Device::Cpu, Device::Slot);
            run_here(shared, i, op, &key, &fp, device).await?
        }
    };
    write_back(shared, stage, &record).await;

    let mut detail = summarize_metrics(&record.metrics);
    if shared.options.locked {
        if let Some(locked) = shared
            .lockfile
            .as_ref()
            .and_then(|l| l.stages.get(&stage.id))
        {
            let why = locked
                .not_bitwise
                .clone()
                .or_else(|| not_bitwise(&record.metrics));
            check_reproduced(op, &locked.outputs, &record.outputs, why.as_deref())?;
            detail = format!("reproduced locked outputs; {detail}");
        }
    }
    Ok(Finished {
        status: StageStatus::Ran,
        not_bitwise: not_bitwise(&record.metrics),
        outputs: record.outputs,
        key,
        detail,
    })
}

/// The stage's record and outputs from the remote, if it holds a trusted
/// record of `fp` with every output the stage declares: (record, remote
/// name). A pull that fails (a corrupt object is refused) is a miss: the
/// stage runs.
async fn pull_from_remote(
    shared: &Shared,
    stage: &Stage,
    fp: &Fingerprint,
) -> Option<(StageRecord, String)> {
    let remote = shared.options.remote.clone()?;
    let (cache, fp) = (shared.cache.clone(), fp.clone());
    let name = remote.name().to_string();
    match blocking(move || Ok(remote.pull_one(&cache, &fp)?)).await {
        Ok(found) => found
            .filter(|record| lacking_outputs(&stage.outputs, record).is_empty())
            .map(|record| (record, name)),
        Err(e) => {
            shared.ui.say(&format!(
                "warning: stage `{}`: not pulled from remote `{name}`, it runs: {e:#}",
                stage.id
            ));
            None
        }
    }
}

/// Pushes a record the run just committed when the remote is configured
/// `write_back: true`; a failed push is a warning, the stage succeeded.
async fn write_back(shared: &Shared, stage: &Stage, record: &StageRecord) {
    let Some(remote) = shared.options.remote.clone().filter(|r| r.writes_back()) else {
        return;
    };
    let (cache, rec) = (shared.cache.clone(), record.clone());
    let name = remote.name().to_string();
    match blocking(move || Ok(remote.push_quietly(&cache, &rec)?)).await {
        Ok(_) => shared
            .ui
            .log(&format!("pushed {} to remote `{name}`", stage.id)),
        Err(e) => shared.ui.say(&format!(
            "warning: stage `{}`: not pushed to remote `{name}`: {e:#}",
            stage.id
        )),
    }
}

/// Runs stage `i` in this process or its worker and commits its record;
/// the caller holds the fingerprint's lock. Its inputs from the store are
/// checked first, so corruption does not spread.
pub(super) async fn run_here(
    shared: &Shared,
    i: usize,
    op: &'static OpDecl,
    key: &StageKey,
    fp: &Fingerprint,
    device: Device<'_>,
) -> Result<StageRecord, Error> {
    let stage = &shared.pipeline.stages[i];
    {
        let (cache, pipeline, key) = (shared.cache.clone(), shared.pipeline.clone(), key.clone());
        blocking(move || check_store_inputs(&cache, &pipeline.stages[i], &key)).await?;
    }
    let tracker = start_tracking(shared, stage, op, key, fp)?;
    let ran = async {
        let staged = dispatch(shared, stage, op, key, fp, device).await?;
        commit(shared, stage, key, fp, staged, device).await
    };
    let record = match ran.await {
        Ok(record) => record,
        Err(err) => {
            if let Some(tracker) = tracker {
                tracker.finish(tracking::Outcome::Failed).await;
            }
            // Stopped (Ctrl-C; in a Slurm job its time limit, scancel or
            // preemption, whose SIGTERM reaches the worker too and may end
            // it before the token is seen): no failure of the stage's own
            // to note, and `stage exec` ends as stopped, not failed.
            if matches!(err, Error::Cancelled) || shared.cancel.is_cancelled() {
                return Err(Error::Cancelled);
            }
            note_failure(shared, stage, fp, &err);
            return Err(err);
        }
    };
    if let Some(tracker) = tracker {
        let path = |id| shared.cache.artifact_path(id);
        tracker
            .finish(tracking::Outcome::Committed {
                metrics: path(&record.outputs["metrics"]),
                outputs: record
                    .outputs
                    .iter()
                    .map(|(n, id)| (n.clone(), path(id)))
                    .collect(),
            })
            .await;
    }
    if let Err(e) = shared.cache.clear_failure(fp) {
        tracing::warn!("stage `{}`: {e}", stage.id);
    }
    // Still under the stage lock, so no other run is writing them.
    if let Err(e) = shared.cache.retire_checkpoints(fp, stage.keep_checkpoints) {
        tracing::warn!("stage `{}`: checkpoints left in place: {e}", stage.id);
    }
    Ok(record)
}

/// Starts the trackers of a training stage (a worker stage with a `metrics`
/// output) when the run or the manifest names any.
fn start_tracking(
    shared: &Shared,
    stage: &Stage,
    op: &'static OpDecl,
    key: &StageKey,
    fp: &Fingerprint,
) -> Result<Option<tracking::LiveTracker>, Error> {
    let settings = shared.options.tracking.over(&shared.pipeline.tracking);
    if settings.is_empty() || !op.runs_in_worker() || !stage.outputs.iter().any(|o| o == "metrics")
    {
        return Ok(None);
    }
    Ok(tracking::start(
        &settings,
        tracking::TrackedStage {
            pipeline: &shared.pipeline.name,
            stage: &stage.id,
            key,
            fingerprint: fp,
            live_log: shared.cache.checkpoint_dir(fp)?.join("metrics.jsonl"),
        },
    ))
}

/// Where a stage's tensor work runs.
#[derive(Clone, Copy)]
pub(super) enum Device<'a> {
    /// The CPU (data ops run in the engine whatever their device).
    Cpu,
    /// A GPU slot this engine handed out: the worker sees that GPU alone.
    Slot(&'a GpuSlot<'a>),
    /// GPUs a cluster scheduler gave the job: the worker keeps the
    /// `CUDA_VISIBLE_DEVICES` the scheduler set.
    Allocated,
}

impl Device<'_> {
    fn on_gpu(self) -> bool {
        !matches!(self, Device::Cpu)
    }
}

/// Leaves a note that this fingerprint failed, for `plan` and `show`; a
/// cancelled run did not fail.
fn note_failure(shared: &Shared, stage: &Stage, fp: &Fingerprint, err: &Error) {
    if matches!(err, Error::Cancelled) || shared.cancel.is_cancelled() {
        return;
    }
    let note = FailureNote {
        pipeline: shared.pipeline.name.clone(),
        stage: stage.id.clone(),
        at: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
        error: format!("{err:#}"),
        log: shared.ui.log_path().map(PathBuf::from),
    };
    if let Err(e) = shared.cache.note_failure(fp, &note) {
        tracing::warn!("stage `{}`: {e}", stage.id);
    }
}

fn cached(record: StageRecord, key: StageKey, detail: &str) -> Finished {
    Finished {
        status: StageStatus::Cached,
        not_bitwise: not_bitwise(&record.metrics),
        outputs: record.outputs,
        key,
        detail: detail.into(),
    }
}

/// The key of stage `i` from its upstream's actual output ids. Inputs are
/// hashed before the stage runs, never after.
async fn actual_key(
    shared: &Shared,
    i: usize,
    op: &'static OpDecl,
    upstream_ids: BTreeMap<String, ArtifactId>,
) -> Result<StageKey, Error> {
    let (cache, pipeline, rehash) = (
        shared.cache.clone(),
        shared.pipeline.clone(),
        shared.options.rehash,
    );
    let mut ids = blocking(move || hash_path_inputs(&cache, &pipeline.stages[i], rehash)).await?;
    ids.extend(upstream_ids);
    let pipeline = &shared.pipeline;
    Ok(stage_key(pipeline, &pipeline.stages[i], op.version, ids))
}

/// Fails when a path input's content is no longer the one `key` hashed.
fn unchanged_since_hashed(cache: &Cache, stage: &Stage, key: &StageKey) -> anyhow::Result<()> {
    let now = hash_path_inputs(cache, stage, false)?;
    let changed: Vec<&String> = now
        .iter()
        .filter(|(name, id)| key.inputs.get(*name) != Some(*id))
        .map(|(name, _)| name)
        .collect();
    anyhow::ensure!(
        changed.is_empty(),
        "input(s) {changed:?} changed after the run hashed them, before the stage started: nothing ran; run again to use the new content"
    );
    Ok(())
}

/// What a running stage holds, released when it is dropped.
struct Held<'a> {
    _lock: StageLock,
    _job: SemaphorePermit<'a>,
    _cores: Option<Cores<'a>>,
    gpu: Option<GpuSlot<'a>>,
}

/// Takes a device slot, or on the CPU the cores its threads need, then a
/// job slot, so a stage waiting for its GPU or cores does not hold a slot
/// other stages could use; then the fingerprint's lock, so one process
/// runs a fingerprint at a time.
async fn acquire<'a>(
    shared: &'a Shared,
    stage: &Stage,
    op: &'static OpDecl,
    fp: &Fingerprint,
) -> Result<Held<'a>, Error> {
    let gpu = if op.runs_in_worker() {
        let placed = alignflow_ops::role_devices::gpus_named(stage.params.get("placement"));
        let ranks = crate::ops::training::data_parallel_ranks(&stage.params);
        // The manifest may have taken the ranks from `resources.gpus`.
        let from_resources = ranks > 1 && stage.resources.gpus == Some(ranks as u32);
        shared
            .gpus
            .acquire(&stage.device, placed, ranks, &shared.cancel)
            .await
            .map_err(|e| match e {
                Error::Cancelled => e,
                other if from_resources => {
                    anyhow::anyhow!("{other} (`resources.gpus: {ranks}` sets data_parallel where the stage names none)").into()
                }
                other => other,
            })?
    } else {
        None
    };
    let cores = if op.runs_in_worker() && gpu.is_none() {
        let threads = shared.cores.threads(false);
        Some(shared.cores.acquire(threads, &shared.cancel).await?)
    } else {
        None
    };
    let job = tokio::select! {
        permit = shared.jobs.acquire() => permit.expect("semaphore open"),
        _ = shared.cancel.cancelled() => return Err(Error::Cancelled),
    };
    let lock = match shared.cache.try_lock_stage(fp)? {
        Some(lock) => lock,
        None => {
            shared
                .ui
                .say(&format!("waiting {} (another run holds it)", stage.id));
            let (cache, fp) = (shared.cache.clone(), fp.clone());
            blocking(move || Ok(cache.lock_stage(&fp)?)).await?
        }
    };
    Ok(Held {
        _lock: lock,
        _job: job,
        _cores: cores,
        gpu,
    })
}

/// A stage's run in its staging folder.
struct Staged {
    staging: PathBuf,
    out_dir: PathBuf,
    metrics: Metrics,
    started_at: SystemTime,
    duration: Duration,
}

/// Runs the stage in a worker or in the engine, writing into a fresh
/// staging folder (removed again if the stage fails). A stage that changed
/// one of its inputs fails, whatever it returned.
async fn dispatch(
    shared: &Shared,
    stage: &Stage,
    op: &'static OpDecl,
    key: &StageKey,
    fp: &Fingerprint,
    device: Device<'_>,
) -> Result<Staged, Error> {
    let on = match (device, op.placement) {
        (Device::Slot(g), _) => format!(" on cuda:{}", g.visible()),
        (Device::Allocated, Placement::Worker) => " on cuda".into(),
        (_, Placement::Worker) => " on cpu".into(),
        (_, Placement::Engine(_)) => String::new(),
    };
    shared
        .ui
        .say(&format!("run     {} ({}){on}", stage.id, stage.op));

    let cache = &shared.cache;
    let staging = cache.staging_dir(fp)?;
    let out_dir = staging.join("out");
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let mut spec = stage_spec(shared, stage, op, key, fp, out_dir.clone(), device)?;
    let guard =
        match tokio::task::block_in_place(|| guard_inputs(stage, op, key, &mut spec, &staging)) {
            Ok(guard) => guard,
            Err(err) => {
                let _ = remove_all(&staging);
                return Err(err.into());
            }
        };
    // The key hashed the path inputs before the stage waited for its
    // slots, its lock or (on a cluster) its job's start; the guard watches
    // them only from now on. One that changed meanwhile would have the
    // stage read other bytes than its fingerprint names.
    if let Err(err) = tokio::task::block_in_place(|| unchanged_since_hashed(cache, stage, key)) {
        let _ = remove_all(&staging);
        return Err(err.into());
    }
    let started_at = SystemTime::now();
    let start = Instant::now();
    let progress = shared.ui.stage(&stage.id);
    let heartbeat = cache
        .staging_heartbeat()
        .map(|every| tokio::spawn(keep_young(staging.clone(), every)));
    let result = match op.placement {
        Placement::Worker => {
            let placement = worker::Placement {
                cuda_visible_devices: match device {
                    Device::Slot(g) => Some(g.visible()),
                    Device::Cpu => Some(String::new()),
                    Device::Allocated => None,
                },
            };
            worker::run_stage(&spec, &placement, &progress, &shared.cancel).await
        }
        Placement::Engine(run) => run_in_engine(run, &spec, &progress, &shared.cancel).await,
    };
    progress.finish();
    if let Some(beat) = heartbeat {
        beat.abort();
    }
    let changes = tokio::task::block_in_place(|| guard.changes());
    if !changes.is_empty() {
        let _ = remove_all(&staging);
        let err =
            tokio::task::block_in_place(|| changed_inputs(&shared.cache, stage, key, &changes));
        return Err(match result {
            Err(Error::Cancelled) => Error::Cancelled,
            Err(stage_err) => {
                anyhow::anyhow!("{err:#}\n(the stage itself also failed: {stage_err})").into()
            }
            Ok(_) => err.into(),
        });
    }
    let metrics = match result {
        Ok(m) => m,
        Err(err) => {
            let _ = remove_all(&staging);
            return Err(err);
        }
    };
    Ok(Staged {
        staging,
        out_dir,
        metrics,
        started_at,
        duration: start.elapsed(),
    })
}

/// Marks `staging` young (its change time, which a shared cache's gc
/// reads, by a chmod to its own mode) every `every`, until aborted.
async fn keep_young(staging: PathBuf, every: std::time::Duration) {
    let mut ticks = tokio::time::interval(every);
    ticks.tick().await; // the first tick is now: the folder was just made
    loop {
        ticks.tick().await;
        if let Err(e) = crate::cache::mark_young(&staging) {
            tracing::debug!("{}: not marked young ({e})", staging.display());
        }
    }
}

/// What the op is told about its stage.
fn stage_spec(
    shared: &Shared,
    stage: &Stage,
    op: &'static OpDecl,
    key: &StageKey,
    fp: &Fingerprint,
    out_dir: PathBuf,
    device: Device<'_>,
) -> Result<StageSpec, Error> {
    let (pipeline, cache) = (&shared.pipeline, &shared.cache);
    let mut input_paths = BTreeMap::new();
    for (name, input) in &stage.inputs {
        let path = match input {
            Input::Path { path, .. } => path.clone(),
            Input::Stage { .. } => cache.artifact_path(&key.inputs[name]),
        };
        input_paths.insert(name.clone(), path);
    }
    Ok(StageSpec {
        pipeline: pipeline.name.clone(),
        stage: stage.id.clone(),
        op: stage.op.clone(),
        op_version: op.version,
        params: stage.params.clone(),
        inputs: input_paths,
        outputs: stage.outputs.clone(),
        out_dir,
        work_dir: pipeline.dir.clone(),
        checkpoint_dir: cache.checkpoint_dir(fp)?,
        device: match (device, op.placement) {
            (_, Placement::Engine(_)) => stage.device.clone(),
            (Device::Cpu, Placement::Worker) => "cpu".into(),
            // A stage on the CPU with models placed on GPUs.
            (_, Placement::Worker) if stage.device == "cpu" => "cpu".into(),
            (_, Placement::Worker) => "cuda".into(),
        },
        seed: key.seed,
        threads: match op.placement {
            Placement::Worker => Some(shared.cores.threads(device.on_gpu())),
            Placement::Engine(_) => shared.options.threads,
        },
    })
}

/// Ingests the outputs, then writes the record: the record is the commit
/// point, so a crash before it leaves no record of partial outputs.
async fn commit(
    shared: &Shared,
    stage: &Stage,
    key: &StageKey,
    fp: &Fingerprint,
    staged: Staged,
    device: Device<'_>,
) -> Result<StageRecord, Error> {
    let device = match device {
        Device::Slot(g) => format!("cuda:{}", g.visible()),
        Device::Allocated => "cuda".into(),
        Device::Cpu => "cpu".into(),
    };
    let in_worker = crate::ops::find(&stage.op).is_some_and(|op| op.runs_in_worker());
    let provenance = Provenance::here(device, in_worker.then(worker::libtorch_version).flatten());
    let (cache, stage_id, pipeline_name) = (
        shared.cache.clone(),
        stage.id.clone(),
        shared.pipeline.name.clone(),
    );
    let (names, key, fp) = (stage.outputs.clone(), key.clone(), fp.clone());
    blocking(move || {
        let Staged {
            staging,
            out_dir,
            metrics,
            started_at,
            duration,
        } = staged;
        // The output folder must still be the one the engine made: a
        // command that replaced it (or its parent) with a symbolic link
        // would have ingest walk, seal and remove whatever the link points
        // at, outside the cache or inside its store.
        for dir in [&staging, &out_dir] {
            let real = std::fs::symlink_metadata(dir).is_ok_and(|m| m.is_dir());
            if !real {
                let _ = remove_all(&staging);
                anyhow::bail!(
                    "{} is no longer the folder the engine made for the stage's outputs (the stage replaced it, with a symbolic link?): nothing was stored",
                    dir.display()
                );
            }
        }
        let mut outputs = BTreeMap::new();
        let missing: Vec<&String> = names.iter().filter(|n| !out_dir.join(n).exists()).collect();
        anyhow::ensure!(
            missing.is_empty(),
            "the op did not create output(s) {missing:?} in {}",
            out_dir.display()
        );
        for name in &names {
            outputs.insert(name.clone(), cache.ingest(&out_dir.join(name))?);
        }
        let record = StageRecord {
            fingerprint: fp,
            key,
            pipeline: pipeline_name,
            stage: stage_id,
            outputs,
            metrics,
            duration_s: duration.as_secs_f64(),
            engine_version: crate::ENGINE_VERSION.to_string(),
            started_at: humantime::format_rfc3339_millis(started_at).to_string(),
            finished_at: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            provenance: Some(provenance),
        };
        // Create-if-absent: when another node committed the same
        // fingerprint first, its record stands and ours is dropped (our
        // outputs, the same ids or not, become garbage for `gc`).
        if !cache.commit_record(&record)? {
            tracing::info!(
                "stage `{}`: another run committed {} first; keeping its record",
                record.stage,
                record.fingerprint.short()
            );
            let _ = remove_all(&staging);
            return Ok(cache.record(&record.fingerprint)?.unwrap_or(record));
        }
        let _ = remove_all(&staging);
        Ok(record)
    })
    .await
}

/// Under `--locked`: the outputs must be the ones the lockfile recorded.
/// A stage whose outputs are known not to be bitwise reproducible
/// (`not_bitwise`: why) still fails on other bytes, and says why they are.
fn check_reproduced(
    op: &'static OpDecl,
    locked: &BTreeMap<String, ArtifactId>,
    produced: &BTreeMap<String, ArtifactId>,
    not_bitwise: Option<&str>,
) -> Result<(), Error> {
    let differing: Vec<String> = locked
        .iter()
        // Volatile outputs (timing logs) may differ between identical runs.
        .filter(|(name, _)| {
            !op.declared_outputs()
                .iter()
                .any(|p| p.name == name.as_str() && p.volatile)
        })
        .filter(|(name, id)| produced.get(*name) != Some(id))
        .map(|(name, id)| {
            let got = produced
                .get(name)
                .map(|g| g.short().to_string())
                .unwrap_or_else(|| "none".into());
            format!("output {name}: locked {} but produced {got}", id.short())
        })
        .collect();
    if differing.is_empty() {
        return Ok(());
    }
    let differing = differing.join("; ");
    Err(match not_bitwise {
        None => anyhow::anyhow!(
            "not reproducible: {differing} (the outputs are cached; the lockfile is unchanged)"
        ),
        Some(why) => anyhow::anyhow!(
            "not reproducible bit for bit, as the lockfile marks this stage: {why}. {differing} (the outputs are cached; the lockfile is unchanged: run without --locked to record them)"
        ),
    }
    .into())
}

/// A short `k=v` line of a stage's summary metrics.
fn summarize_metrics(metrics: &Metrics) -> String {
    metrics
        .iter()
        .filter(|(_, v)| v.is_number() || v.is_boolean())
        .take(4)
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `f` on the blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> Result<T, Error> {
    let result = tokio::task::spawn_blocking(f)
        .await
        .map_err(anyhow::Error::from)?;
    Ok(result?)
}

/// Runs an engine op on a blocking thread; cancellation sets its flag.
async fn run_in_engine(
    run: crate::ops::RunFn,
    spec: &StageSpec,
    progress: &StageProgress<'_>,
    cancel: &CancellationToken,
) -> Result<Metrics, Error> {
    let flag = CancelFlag::default();
    let watcher = {
        let (flag, cancel) = (flag.clone(), cancel.clone());
        tokio::spawn(async move {
            cancel.cancelled().await;
            flag.cancel();
        })
    };
    // The reporter borrows the UI, so run on this task's thread through
    // block_in_place rather than a 'static spawn_blocking closure.
    let result = tokio::task::block_in_place(|| {
        let ctx = crate::ops::StageContext {
            spec,
            reporter: progress,
            cancel: &flag,
        };
        run(&ctx)
    });
    watcher.abort();
    if flag.is_cancelled() {
        return Err(Error::Cancelled);
    }
    Ok(result?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::ArtifactKind;

    fn outputs(model: char) -> BTreeMap<String, ArtifactId> {
        let id = ArtifactId {
            kind: ArtifactKind::Tree,
            hash: model.to_string().repeat(64),
        };
        [("model".to_string(), id)].into_iter().collect()
    }

    #[test]
    fn locked_outputs_that_differ_fail_and_a_marked_stage_says_why() {
        let sft = crate::ops::find("sft").unwrap();
        assert!(check_reproduced(sft, &outputs('a'), &outputs('a'), None).is_ok());
        let plain = check_reproduced(sft, &outputs('a'), &outputs('b'), None)
            .unwrap_err()
            .to_string();
        assert!(
            plain.starts_with("not reproducible: output model: locked"),
            "{plain}"
        );
        let why =
            "NCCL all-reduces over 2 GPUs, whose sums are not bitwise reproducible from run to run";
        let marked = check_reproduced(sft, &outputs('a'), &outputs('b'), Some(why))
            .unwrap_err()
            .to_string();
        assert!(
            marked.contains(&format!("not reproducible bit for bit, as the lockfile marks this stage: {why}. output model: locked")),
            "{marked}"
        );
        assert!(
            marked.contains("run without --locked to record them"),
            "{marked}"
        );
        // The same bytes pass, marked or not.
        assert!(check_reproduced(sft, &outputs('a'), &outputs('a'), Some(why)).is_ok());
    }

    #[test]
    fn the_not_bitwise_reason_is_read_from_the_records_metrics() {
        let mut metrics = Metrics::new();
        metrics.insert("steps".into(), 3.into());
        assert_eq!(not_bitwise(&metrics), None);
        metrics.insert(NOT_BITWISE_METRIC.into(), "NCCL".into());
        assert_eq!(not_bitwise(&metrics).as_deref(), Some("NCCL"));
    }
}
