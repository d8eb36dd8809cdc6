//! The scheduler: runs a plan on tokio, independent stages at once up to
//! `--jobs`, one stage per GPU, cancelling cleanly on Ctrl-C or fail-fast.
//!
//! Each stage re-derives its fingerprint from its upstream's actual outputs
//! (early cutoff), takes the per-fingerprint lock, runs in a staging folder,
//! ingests its outputs and only then commits its record: a crash at any
//! point leaves no record pointing at missing or partial outputs.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use serde::Serialize;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::cache::{ArtifactId, Cache, StageKey, StageRecord};
use crate::graph::Dag;
use crate::manifest::{Input, Pipeline};
use crate::ops::{CancelFlag, Cancelled, Placement};
use crate::protocol::{Metrics, StageSpec};

use super::lockfile::{lockfile_path, LockedInput, LockedStage, Lockfile};
use super::plan::{hash_path_inputs, locked_diff, plan, stage_key, Action, PlanContext};
use super::progress::Ui;
use super::worker;

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
    /// Rehash every path input, ignoring the hash cache.
    pub rehash: bool,
    /// Intra-op CPU threads for worker stages.
    pub threads: Option<usize>,
    /// No progress bars or stage lines.
    pub quiet: bool,
    /// Stages that may share one GPU (1: each GPU stage has its device alone).
    pub gpu_slots: usize,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            targets: Vec::new(),
            jobs: 1,
            fail_fast: false,
            locked: false,
            rehash: false,
            threads: None,
            quiet: false,
            gpu_slots: 1,
        }
    }
}

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
    pub interrupted: bool,
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

/// Outcome of one stage task.
enum Outcome {
    Done {
        status: StageStatus,
        outputs: BTreeMap<String, ArtifactId>,
        key: StageKey,
        detail: String,
    },
    Failed {
        cancelled: bool,
        message: String,
    },
}

/// Shared state of the stage tasks.
struct Shared {
    pipeline: Arc<Pipeline>,
    cache: Arc<Cache>,
    ui: Ui,
    cancel: CancellationToken,
    jobs: Semaphore,
    gpus: GpuSlots,
    options: RunOptions,
    lockfile: Option<Lockfile>,
    /// Lockfile entries of the stages that finished, ran or cached.
    finished: Mutex<Vec<(String, LockedStage)>>,
}

/// Runs the pipeline (blocking: builds its own tokio runtime).
pub fn run(
    pipeline: Arc<Pipeline>,
    dag: Arc<Dag>,
    cache: Arc<Cache>,
    options: RunOptions,
) -> anyhow::Result<RunSummary> {
    let lock_path = lockfile_path(&pipeline.file);
    let lockfile = Lockfile::load(&lock_path)?;
    let selected = dag.select(&pipeline, &options.targets)?;
    let the_plan = plan(
        &PlanContext {
            pipeline: &pipeline,
            dag: &dag,
            cache: &cache,
            lockfile: lockfile.as_ref(),
            rehash: options.rehash,
            locked: options.locked,
        },
        &selected,
    )?;
    if options.locked {
        let lock = lockfile.as_ref().with_context(|| {
            format!(
                "--locked: there is no lockfile {} (run once without --locked to create it)",
                lock_path.display()
            )
        })?;
        let diffs = locked_diff(&pipeline, &the_plan, lock, options.targets.is_empty());
        if !diffs.is_empty() {
            anyhow::bail!(
                "--locked: the plan differs from {}:\n  {}\n(run without --locked to update the lockfile)",
                lock_path.display(),
                diffs.join("\n  ")
            );
        }
    }
    cache.flush_hash_cache()?;

    let ui = Ui::new(
        cache.logs_dir().ok().as_deref(),
        &pipeline.name,
        options.quiet,
    );
    let runs = the_plan.to_run();
    ui.say(&format!(
        "pipeline {}: {} stage(s), {} to run, {} cached",
        pipeline.name,
        the_plan.stages.len(),
        runs,
        the_plan.stages.len() - runs
    ));
    for p in &the_plan.stages {
        ui.log(&format!(
            "plan {} {:?}: {}",
            pipeline.stages[p.index].id, p.action, p.reason
        ));
    }

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        // Workers die with the thread that spawned them (PDEATHSIG): no
        // runtime thread may retire while a run is in progress.
        .thread_keep_alive(Duration::from_secs(7 * 24 * 3600))
        .enable_all()
        .build()
        .context("starting the scheduler")?;
    let shared = Arc::new(Shared {
        pipeline: pipeline.clone(),
        cache: cache.clone(),
        ui,
        cancel: CancellationToken::new(),
        jobs: Semaphore::new(options.jobs.max(1)),
        gpus: GpuSlots::detect(options.gpu_slots),
        options: options.clone(),
        lockfile: lockfile.clone(),
        finished: Mutex::new(Vec::new()),
    });
    let summary = runtime.block_on(schedule(shared.clone(), dag, the_plan))?;

    if summary.success() {
        let mut lock = lockfile.unwrap_or_else(|| Lockfile::new(&pipeline.name));
        lock.pipeline = pipeline.name.clone();
        lock.engine_version = crate::ENGINE_VERSION.to_string();
        if options.targets.is_empty() {
            lock.stages.retain(|id, _| pipeline.stage(id).is_some());
        }
        for (id, entry) in shared
            .finished
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            lock.stages.insert(id, entry);
        }
        lock.save(&lock_path)?;
    }
    Ok(summary)
}

async fn schedule(
    shared: Arc<Shared>,
    dag: Arc<Dag>,
    the_plan: super::Plan,
) -> anyhow::Result<RunSummary> {
    let pipeline = shared.pipeline.clone();
    let planned: BTreeMap<usize, &super::PlannedStage> =
        the_plan.stages.iter().map(|p| (p.index, p)).collect();
    let selected: BTreeSet<usize> = planned.keys().copied().collect();
    let mut outputs: BTreeMap<usize, BTreeMap<String, ArtifactId>> = BTreeMap::new();
    let mut results: BTreeMap<usize, StageResult> = BTreeMap::new();
    let mut started: BTreeSet<usize> = BTreeSet::new();
    let mut tasks: JoinSet<(usize, Duration, Outcome)> = JoinSet::new();
    let mut interrupted = false;

    loop {
        // Start every stage whose upstream is done; skip those whose upstream failed.
        for &i in dag.order() {
            if !selected.contains(&i) || started.contains(&i) {
                continue;
            }
            let ups = dag.upstream(i);
            if let Some((j, _)) = ups.iter().find(|(j, _)| {
                results
                    .get(j)
                    .is_some_and(|r| !matches!(r.status, StageStatus::Ran | StageStatus::Cached))
            }) {
                started.insert(i);
                let status = if shared.cancel.is_cancelled() {
                    StageStatus::Cancelled
                } else {
                    StageStatus::Skipped
                };
                results.insert(
                    i,
                    StageResult {
                        stage: pipeline.stages[i].id.clone(),
                        status,
                        seconds: 0.0,
                        detail: format!("upstream {} did not finish", pipeline.stages[*j].id),
                    },
                );
                continue;
            }
            if !ups.iter().all(|(j, _)| outputs.contains_key(j)) {
                continue;
            }
            started.insert(i);
            if shared.cancel.is_cancelled() {
                results.insert(
                    i,
                    StageResult {
                        stage: pipeline.stages[i].id.clone(),
                        status: StageStatus::Cancelled,
                        seconds: 0.0,
                        detail: "not started".into(),
                    },
                );
                continue;
            }
            let mut upstream_ids = BTreeMap::new();
            for (name, input) in &pipeline.stages[i].inputs {
                if let Input::Stage {
                    stage: from,
                    output,
                    ..
                } = input
                {
                    let j = pipeline
                        .stages
                        .iter()
                        .position(|s| &s.id == from)
                        .expect("graph checked");
                    upstream_ids.insert(name.clone(), outputs[&j][output].clone());
                }
            }
            let planned_run = planned[&i].action == Action::Run;
            let shared = shared.clone();
            tasks.spawn(async move {
                let start = Instant::now();
                let outcome = execute(&shared, i, upstream_ids, planned_run).await;
                (i, start.elapsed(), outcome)
            });
        }
        if tasks.is_empty() {
            break;
        }
        let joined = tokio::select! {
            joined = tasks.join_next() => joined,
            _ = tokio::signal::ctrl_c(), if !interrupted => {
                interrupted = true;
                shared.ui.say("interrupted: stopping running stages (Ctrl-C again to abort at once)");
                shared.cancel.cancel();
                tokio::spawn(async {
                    if tokio::signal::ctrl_c().await.is_ok() {
                        std::process::exit(130);
                    }
                });
                continue;
            }
        };
        let Some(joined) = joined else { break };
        let (i, elapsed, outcome) = joined.context("a stage task panicked")?;
        let id = pipeline.stages[i].id.clone();
        let seconds = elapsed.as_secs_f64();
        match outcome {
            Outcome::Done {
                status,
                outputs: outs,
                key,
                detail,
            } => {
                let entry = lock_entry(&key, &outs, &upstream_sources(&pipeline, i));
                shared
                    .finished
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((id.clone(), entry));
                outputs.insert(i, outs);
                if status == StageStatus::Ran {
                    shared.ui.say(&format!("done    {id} ({seconds:.2}s)"));
                }
                results.insert(
                    i,
                    StageResult {
                        stage: id,
                        status,
                        seconds,
                        detail,
                    },
                );
            }
            Outcome::Failed { cancelled, message } => {
                let status = if cancelled {
                    StageStatus::Cancelled
                } else {
                    StageStatus::Failed
                };
                if !cancelled {
                    shared.ui.shout(&format!("FAILED  {id}: {message}"));
                    if shared.options.fail_fast {
                        shared.cancel.cancel();
                    }
                }
                results.insert(
                    i,
                    StageResult {
                        stage: id,
                        status,
                        seconds,
                        detail: message,
                    },
                );
            }
        }
    }
    let results = dag
        .order()
        .iter()
        .filter_map(|i| results.remove(i))
        .collect();
    Ok(RunSummary {
        pipeline: pipeline.name.clone(),
        results,
        interrupted,
        log: shared.ui.log_path().map(|p| p.to_path_buf()),
    })
}

/// Where each stage-reference input of stage `i` came from.
fn upstream_sources(pipeline: &Pipeline, i: usize) -> BTreeMap<String, LockedInput> {
    let mut out = BTreeMap::new();
    for (name, input) in &pipeline.stages[i].inputs {
        let (path, stage, output) = match input {
            Input::Stage { stage, output, .. } => (None, Some(stage.clone()), Some(output.clone())),
            Input::Path { written, .. } => (Some(written.clone()), None, None),
        };
        // The id is filled in by `record_lock_entry` from the stage key.
        out.insert(
            name.clone(),
            LockedInput {
                path,
                stage,
                output,
                id: placeholder_id(),
            },
        );
    }
    out
}

fn placeholder_id() -> ArtifactId {
    ArtifactId {
        kind: crate::cache::ArtifactKind::File,
        hash: "0".repeat(64),
    }
}

/// The lockfile entry of a finished stage.
fn lock_entry(
    key: &StageKey,
    outputs: &BTreeMap<String, ArtifactId>,
    sources: &BTreeMap<String, LockedInput>,
) -> LockedStage {
    let inputs = sources
        .iter()
        .filter_map(|(name, src)| {
            key.inputs.get(name).map(|id| {
                (
                    name.clone(),
                    LockedInput {
                        id: id.clone(),
                        ..src.clone()
                    },
                )
            })
        })
        .collect();
    LockedStage {
        op: key.op.clone(),
        op_version: key.op_version,
        fingerprint: key.fingerprint(),
        seed: key.seed,
        params: key.params.clone(),
        inputs,
        outputs: outputs.clone(),
    }
}

/// Runs (or finds cached) one stage.
async fn execute(
    shared: &Shared,
    i: usize,
    upstream_ids: BTreeMap<String, ArtifactId>,
    planned_run: bool,
) -> Outcome {
    match execute_inner(shared, i, upstream_ids, planned_run).await {
        Ok(outcome) => outcome,
        Err(err) => {
            let cancelled =
                err.downcast_ref::<Cancelled>().is_some() || shared.cancel.is_cancelled();
            Outcome::Failed {
                cancelled,
                message: if cancelled {
                    "cancelled".into()
                } else {
                    format!("{err:#}")
                },
            }
        }
    }
}

async fn execute_inner(
    shared: &Shared,
    i: usize,
    upstream_ids: BTreeMap<String, ArtifactId>,
    planned_run: bool,
) -> anyhow::Result<Outcome> {
    let pipeline = &shared.pipeline;
    let stage = &pipeline.stages[i];
    let op = crate::ops::find(&stage.op).with_context(|| format!("unknown op `{}`", stage.op))?;
    let cache = shared.cache.clone();

    // Inputs are hashed before the stage runs, never after.
    let mut ids = {
        let (cache, pipeline, rehash) = (cache.clone(), pipeline.clone(), shared.options.rehash);
        tokio::task::spawn_blocking(move || hash_path_inputs(&cache, &pipeline.stages[i], rehash))
            .await??
    };
    ids.extend(upstream_ids);
    let key = stage_key(pipeline, stage, op.version, ids.clone());
    let fp = key.fingerprint();
    if let Some(record) = cache.hit(&fp)? {
        let detail = if planned_run {
            "early cutoff: upstream outputs unchanged"
        } else {
            "up to date"
        };
        return Ok(Outcome::Done {
            status: StageStatus::Cached,
            outputs: record.outputs,
            key,
            detail: detail.into(),
        });
    }

    // Device slot first, then a job slot, so a stage waiting for its GPU
    // does not hold a slot CPU stages could use.
    let gpu = if op.runs_in_worker() {
        shared.gpus.acquire(&stage.device, &shared.cancel).await?
    } else {
        None
    };
    let _job = tokio::select! {
        permit = shared.jobs.acquire() => permit.expect("semaphore open"),
        _ = shared.cancel.cancelled() => return Err(Cancelled.into()),
    };

    // One process runs a fingerprint at a time; whoever waited finds it cached.
    let _lock = match cache.try_lock_stage(&fp)? {
        Some(lock) => lock,
        None => {
            shared
                .ui
                .say(&format!("waiting {} (another run holds it)", stage.id));
            let c = cache.clone();
            let f = fp.clone();
            tokio::task::spawn_blocking(move || c.lock_stage(&f)).await??
        }
    };
    if let Some(record) = cache.hit(&fp)? {
        return Ok(Outcome::Done {
            status: StageStatus::Cached,
            outputs: record.outputs,
            key,
            detail: "finished by another run".into(),
        });
    }
    let on = match (&gpu, op.placement) {
        (Some(g), _) => format!(" on cuda:{}", g.index),
        (None, Placement::Worker) => " on cpu".into(),
        (None, Placement::Engine(_)) => String::new(),
    };
    shared
        .ui
        .say(&format!("run     {} ({}){on}", stage.id, stage.op));

    let staging = cache.staging_dir(&fp)?;
    let out_dir = staging.join("out");
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let mut input_paths = BTreeMap::new();
    for (name, input) in &stage.inputs {
        let path = match input {
            Input::Path { path, .. } => path.clone(),
            Input::Stage { .. } => cache.artifact_path(&ids[name]),
        };
        input_paths.insert(name.clone(), path);
    }
    let spec = StageSpec {
        pipeline: pipeline.name.clone(),
        stage: stage.id.clone(),
        op: stage.op.clone(),
        op_version: op.version,
        params: stage.params.clone(),
        inputs: input_paths,
        outputs: stage.outputs.clone(),
        out_dir: out_dir.clone(),
        work_dir: pipeline.dir.clone(),
        checkpoint_dir: cache.checkpoint_dir(&fp)?,
        device: match (&gpu, op.placement) {
            (Some(_), _) => "cuda".into(),
            (None, Placement::Worker) => "cpu".into(),
            (None, Placement::Engine(_)) => stage.device.clone(),
        },
        seed: key.seed,
        threads: shared.options.threads,
    };
    let started_at = SystemTime::now();
    let start = Instant::now();
    let progress = shared.ui.stage(&stage.id);
    let result = match op.placement {
        Placement::Worker => {
            let placement = worker::Placement {
                cuda_visible_devices: gpu
                    .as_ref()
                    .map(|g| g.index.to_string())
                    .unwrap_or_default(),
            };
            worker::run_stage(&spec, &placement, &progress, &shared.cancel).await
        }
        Placement::Engine(run) => run_in_engine(run, &spec, &progress, &shared.cancel).await,
    };
    progress.finish();
    let metrics = match result {
        Ok(m) => m,
        Err(err) => {
            let _ = std::fs::remove_dir_all(&staging);
            return Err(err);
        }
    };
    let duration = start.elapsed();

    // Ingest the outputs, then commit the record: the record is the commit point.
    let record = {
        let (cache, stage_id, pipeline_name) =
            (cache.clone(), stage.id.clone(), pipeline.name.clone());
        let (names, key, fp) = (stage.outputs.clone(), key.clone(), fp.clone());
        tokio::task::spawn_blocking(move || -> anyhow::Result<StageRecord> {
            let mut outputs = BTreeMap::new();
            let missing: Vec<&String> =
                names.iter().filter(|n| !out_dir.join(n).exists()).collect();
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
            };
            cache.write_record(&record)?;
            let _ = std::fs::remove_dir_all(&staging);
            Ok(record)
        })
        .await??
    };

    let mut detail = summarize_metrics(&record.metrics);
    if shared.options.locked {
        if let Some(locked) = shared
            .lockfile
            .as_ref()
            .and_then(|l| l.stages.get(&stage.id))
        {
            let differing: Vec<String> = locked
                .outputs
                .iter()
                // Volatile outputs (timing logs) may differ between identical runs.
                .filter(|(name, _)| {
                    !op.declared_outputs()
                        .iter()
                        .any(|p| p.name == name.as_str() && p.volatile)
                })
                .filter(|(name, id)| record.outputs.get(*name) != Some(id))
                .map(|(name, id)| {
                    let got = record
                        .outputs
                        .get(name)
                        .map(|g| g.short().to_string())
                        .unwrap_or_else(|| "none".into());
                    format!("output {name}: locked {} but produced {got}", id.short())
                })
                .collect();
            if !differing.is_empty() {
                anyhow::bail!(
                    "not reproducible: {} (the outputs are cached; the lockfile is unchanged)",
                    differing.join("; ")
                );
            }
            detail = format!("reproduced locked outputs; {detail}");
        }
    }
    Ok(Outcome::Done {
        status: StageStatus::Ran,
        outputs: record.outputs,
        key,
        detail,
    })
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

/// Runs an engine op on a blocking thread; cancellation sets its flag.
async fn run_in_engine(
    run: crate::ops::RunFn,
    spec: &StageSpec,
    progress: &super::progress::StageProgress<'_>,
    cancel: &CancellationToken,
) -> anyhow::Result<Metrics> {
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
        return Err(Cancelled.into());
    }
    result
}

/// One slot per GPU: two GPU stages never share a device.
struct GpuSlots {
    /// Free slots left on each GPU.
    free: Mutex<Vec<usize>>,
    notify: tokio::sync::Notify,
}

/// A held GPU slot.
struct GpuSlot<'a> {
    slots: &'a GpuSlots,
    index: usize,
}

impl Drop for GpuSlot<'_> {
    fn drop(&mut self) {
        self.slots.free.lock().unwrap_or_else(|e| e.into_inner())[self.index] += 1;
        self.slots.notify.notify_waiters();
    }
}

impl GpuSlots {
    /// GPUs the NVIDIA driver lists, narrowed by `CUDA_VISIBLE_DEVICES`.
    fn detect(per_gpu: usize) -> GpuSlots {
        let listed = std::fs::read_dir("/proc/driver/nvidia/gpus")
            .map(|d| d.count())
            .unwrap_or(0);
        let count = match std::env::var("CUDA_VISIBLE_DEVICES") {
            Ok(v) if v.trim().is_empty() => 0,
            Ok(v) => v.split(',').count().min(listed),
            Err(_) => listed,
        };
        GpuSlots {
            free: Mutex::new(vec![per_gpu.max(1); count]),
            notify: Default::default(),
        }
    }

    /// A GPU for a stage asking for `device`; `None` means run on the CPU.
    async fn acquire(
        &self,
        device: &str,
        cancel: &CancellationToken,
    ) -> anyhow::Result<Option<GpuSlot<'_>>> {
        let count = self.free.lock().unwrap_or_else(|e| e.into_inner()).len();
        let wanted: Option<usize> = match device {
            "cpu" => return Ok(None),
            "auto" if count == 0 => return Ok(None),
            "auto" | "cuda" => None,
            other => Some(
                other
                    .strip_prefix("cuda:")
                    .and_then(|n| n.parse().ok())
                    .with_context(|| format!("bad device `{other}`"))?,
            ),
        };
        if count == 0 || wanted.is_some_and(|w| w >= count) {
            anyhow::bail!("device `{device}` requested but {count} GPU(s) are visible");
        }
        loop {
            let notified = self.notify.notified();
            {
                let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
                let pick = match wanted {
                    Some(w) => (free[w] > 0).then_some(w),
                    // The GPU with the most free slots.
                    None => (0..free.len())
                        .filter(|&i| free[i] > 0)
                        .max_by_key(|&i| (free[i], std::cmp::Reverse(i))),
                };
                if let Some(index) = pick {
                    free[index] -= 1;
                    return Ok(Some(GpuSlot { slots: self, index }));
                }
            }
            tokio::select! {
                _ = notified => {}
                _ = cancel.cancelled() => return Err(Cancelled.into()),
            }
        }
    }
}
