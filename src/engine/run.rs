//! `alignflow run`: plan, hold the plan to the lockfile under `--locked`,
//! schedule the stages, then update the lockfile after a successful run.
//!
//! Each stage re-derives its fingerprint from its upstream's actual outputs
//! (early cutoff), takes the per-fingerprint lock, runs in a staging folder,
//! ingests its outputs and only then commits its record: a crash at any
//! point leaves no record pointing at missing or partial outputs.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::cache::Cache;
use crate::graph::Dag;
use crate::manifest::Pipeline;

use super::execute::Shared;
use super::gpus::GpuSlots;
use super::lockfile::{keep_volatile_ids, lockfile_path, Lockfile};
use super::options::Executor;
use super::plan::{locked_diff, plan, Plan, PlanContext};
use super::profile::SlurmSettings;
use super::progress::Ui;
use super::schedule::schedule;
use super::slurm::{new_run_id, Cluster, RunInfo};
use super::threads::CorePool;
use super::{Error, RunOptions, RunSummary};

/// Runs the pipeline (blocking: builds its own tokio runtime).
pub fn run(
    pipeline: Arc<Pipeline>,
    dag: Arc<Dag>,
    cache: Arc<Cache>,
    options: RunOptions,
) -> Result<RunSummary, Error> {
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
            remote: options.remote.as_deref(),
            remote_must_answer: false,
        },
        &selected,
    )?;
    if options.locked {
        hold_to_lockfile(
            &pipeline,
            &the_plan,
            lockfile.as_ref(),
            &lock_path,
            &options,
        )?;
    }
    if let Err(e) = cache.flush_hash_cache() {
        tracing::warn!("the hash cache was not saved (the next run hashes again): {e}");
    }

    let ui = Ui::new(
        cache.logs_dir().ok().as_deref(),
        &pipeline.name,
        options.quiet,
    );
    announce(&ui, &pipeline, &the_plan);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        // Workers die with the thread that spawned them (PDEATHSIG): no
        // runtime thread may retire while a run is in progress.
        .thread_keep_alive(Duration::from_secs(7 * 24 * 3600))
        .enable_all()
        .build()
        .context("starting the scheduler")?;
    let gpus = GpuSlots::detect(options.gpu_slots);
    let cores = CorePool::new(options.threads, gpus.total());
    let cancel = CancellationToken::new();
    let stop_polling = CancellationToken::new();
    let (cluster, jobs) = match &options.executor {
        Executor::Local => (None, options.jobs),
        Executor::Slurm(settings) => {
            let _in_runtime = runtime.enter();
            let cluster = open_cluster(&pipeline, &cache, &options, settings, &stop_polling)?;
            ui.say(&format!(
                "run {} on Slurm: `alignflow jobs {0}` lists its jobs; `alignflow run --attach {0}` adopts them if this engine dies",
                cluster.run_id
            ));
            (Some(cluster), settings.max_jobs)
        }
    };
    let shared = Arc::new(Shared {
        pipeline: pipeline.clone(),
        cache: cache.clone(),
        ui,
        cancel: cancel.clone(),
        jobs: Semaphore::new(jobs.max(1)),
        gpus,
        cores,
        options: options.clone(),
        lockfile: lockfile.clone(),
        finished: Mutex::new(Vec::new()),
        cluster,
    });
    let summary = runtime.block_on(async {
        let summary = schedule(shared.clone(), dag, the_plan).await;
        if let Some(cluster) = &shared.cluster {
            // Ctrl-C, SIGTERM, --fail-fast, or the scheduler's own failure:
            // the run's jobs go too.
            if cancel.is_cancelled() || summary.is_err() {
                shared.ui.say(&format!("scancel --name {}", cluster.run_id));
                cluster.cancel_all().await;
            }
        }
        stop_polling.cancel();
        summary
    })?;
    // The hashes the run learnt (its outputs, the inputs it checked) spare
    // the next run from reading them again. Only a cache: a run that
    // cannot save them has still done its work, and the lockfile follows.
    if let Err(e) = cache.flush_hash_cache() {
        tracing::warn!("the hash cache was not saved (the next run hashes again): {e}");
    }

    if summary.success() {
        if options.writes_lockfile() {
            update_lockfile(&pipeline, &shared, &lock_path)?;
        } else {
            shared.ui.say(&format!(
                "lockfile {} left unchanged: --target/--set runs do not update it (add --update-lock to record them)",
                lock_path.display()
            ));
        }
    }
    Ok(summary)
}

/// The Slurm run: a new one (its `run.json` written), or `--attach`'s.
fn open_cluster(
    pipeline: &Pipeline,
    cache: &Cache,
    options: &RunOptions,
    settings: &SlurmSettings,
    stop: &CancellationToken,
) -> Result<Cluster, Error> {
    let info = RunInfo {
        run_id: options
            .attach
            .as_ref()
            .map(|a| a.run_id.clone())
            .unwrap_or_else(|| new_run_id(&pipeline.name)),
        manifest: std::path::absolute(&pipeline.file).context("the manifest's path")?,
        sets: options.sets.clone(),
        targets: options.targets.clone(),
        settings: settings.clone(),
        started_at: humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
    };
    Ok(Cluster::open(
        cache.root(),
        &info,
        options.attach.as_ref().map(|a| a.take_over),
        stop.clone(),
    )?)
}

/// `--locked`: refuses a plan that differs from the lockfile.
fn hold_to_lockfile(
    pipeline: &Pipeline,
    the_plan: &Plan,
    lockfile: Option<&Lockfile>,
    lock_path: &Path,
    options: &RunOptions,
) -> Result<(), Error> {
    let lock = lockfile.ok_or_else(|| Error::NoLockfile {
        path: lock_path.to_path_buf(),
    })?;
    let diffs = locked_diff(pipeline, the_plan, lock, options.targets.is_empty());
    if !diffs.is_empty() {
        // A `--set` or `--target` run does not write the lockfile even
        // without --locked.
        let hint = if options.writes_lockfile() {
            "run without --locked to update the lockfile"
        } else {
            "a --set or --target run leaves the lockfile as it is: run without --locked and with --update-lock to record this one, or edit the manifest"
        };
        return Err(Error::LockedPlanDiffers {
            path: lock_path.to_path_buf(),
            diffs,
            hint,
        });
    }
    Ok(())
}

/// The plan's one-line summary on screen, and each stage's plan in the log.
fn announce(ui: &Ui, pipeline: &Pipeline, the_plan: &Plan) {
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
}

/// Records what the finished stages ran with; a full run also forgets
/// stages no longer in the manifest. The lockfile is read again under a
/// lock of the cache's: another run of the manifest may have written it
/// since this one started (a `--target` run beside a full one, a
/// teammate's), and its entries stay.
fn update_lockfile(pipeline: &Pipeline, shared: &Shared, lock_path: &Path) -> Result<(), Error> {
    let absolute = std::path::absolute(lock_path).context("the lockfile's path")?;
    let name = format!(
        "lockfile-{}",
        &blake3::hash(absolute.as_os_str().as_encoded_bytes()).to_hex()[..16]
    );
    let _turn = shared.cache.hold_named_lock(&name)?;
    let lockfile = Lockfile::load(lock_path)?;
    let mut lock = lockfile.unwrap_or_else(|| Lockfile::new(&pipeline.name));
    lock.pipeline = pipeline.name.clone();
    lock.engine_version = crate::ENGINE_VERSION.to_string();
    if shared.options.targets.is_empty() {
        lock.stages.retain(|id, _| pipeline.stage(id).is_some());
    }
    for (id, entry) in shared
        .finished
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .drain(..)
    {
        let mut entry = entry;
        keep_volatile_ids(&mut entry, lock.stages.get(&id));
        lock.stages.insert(id, entry);
    }
    lock.save(lock_path)?;
    Ok(())
}
