//! The scheduler: runs a plan on tokio, independent stages at once up to
//! `--jobs`, cancelling cleanly on Ctrl-C or fail-fast.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::signal::unix::SignalKind;
use tokio::task::JoinSet;

use crate::cache::ArtifactId;
use crate::graph::Dag;

use super::execute::{execute, Finished, Shared, StageTask};
use super::lockfile::lock_entry;
use super::plan::{Action, Plan, PlannedStage};
use super::{Error, RunSummary, StageResult, StageStatus};

/// What a stage task returns: its index, how long it took, how it ended.
type TaskEnd = (usize, Duration, Result<Finished, Error>);

/// Runs the planned stages, each once its upstream is done, until every
/// one has finished, failed, been skipped or been cancelled.
pub(super) async fn schedule(
    shared: Arc<Shared>,
    dag: Arc<Dag>,
    the_plan: Plan,
) -> Result<RunSummary, Error> {
    let mut scheduler = Scheduler {
        planned: the_plan.stages.iter().map(|p| (p.index, p)).collect(),
        shared: shared.clone(),
        dag: &dag,
        outputs: BTreeMap::new(),
        results: BTreeMap::new(),
        started: BTreeSet::new(),
        tasks: JoinSet::new(),
    };
    // SIGTERM (timeout, systemd, Docker, Kubernetes, Slurm) stops the run
    // like Ctrl-C: running stages are cancelled, finished work is kept and
    // the summary printed.
    // Both listeners live for the whole loop: one made afresh in each turn
    // would miss a signal that arrives between two turns (as a stage ends).
    let mut sigterm =
        tokio::signal::unix::signal(SignalKind::terminate()).context("listening for SIGTERM")?;
    let mut sigint =
        tokio::signal::unix::signal(SignalKind::interrupt()).context("listening for SIGINT")?;
    let mut stop: Option<Stop> = None;
    loop {
        scheduler.start_ready_stages();
        if scheduler.tasks.is_empty() {
            break;
        }
        let joined = tokio::select! {
            joined = scheduler.tasks.join_next() => joined,
            _ = sigint.recv(), if stop.is_none() => {
                stop = Some(begin_stop(&shared, Stop::Interrupt));
                continue;
            }
            _ = sigterm.recv(), if stop.is_none() => {
                stop = Some(begin_stop(&shared, Stop::Terminate));
                continue;
            }
        };
        let Some(joined) = joined else { break };
        let (i, elapsed, end) = joined.context("a stage task panicked")?;
        scheduler.record(i, elapsed, end);
    }
    let results = dag
        .order()
        .iter()
        .filter_map(|i| scheduler.results.remove(i))
        .collect();
    Ok(RunSummary {
        pipeline: shared.pipeline.name.clone(),
        results,
        interrupted: stop.is_some(),
        terminated: stop == Some(Stop::Terminate),
        log: shared.ui.log_path().map(|p| p.to_path_buf()),
    })
}

/// What stopped a run before its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// Ctrl-C (SIGINT): exit status 130.
    Interrupt,
    /// SIGTERM: exit status 143.
    Terminate,
}

/// Cancels every running stage (an exec command's whole process group, a
/// worker process) and arms the second signal, of either kind, to exit at
/// once.
fn begin_stop(shared: &Shared, stop: Stop) -> Stop {
    shared.ui.say(match stop {
        Stop::Interrupt => "interrupted: stopping running stages (Ctrl-C again to abort at once)",
        Stop::Terminate => "terminated (SIGTERM): stopping running stages (again to abort at once)",
    });
    // Listening from here on, not from when the task first runs.
    let sigterm = tokio::signal::unix::signal(SignalKind::terminate());
    let sigint = tokio::signal::unix::signal(SignalKind::interrupt());
    shared.cancel.cancel();
    let run_id = shared.cluster.as_ref().map(|c| c.run_id.clone());
    tokio::spawn(async move {
        let again = match (sigterm, sigint) {
            (Ok(mut sigterm), Ok(mut sigint)) => tokio::select! {
                _ = sigint.recv() => 130,
                _ = sigterm.recv() => 143,
            },
            _ => tokio::signal::ctrl_c().await.map(|_| 130).unwrap_or(130),
        };
        // At once, but not leaving the run's jobs queued and running.
        if let Some(run_id) = run_id {
            eprintln!("scancel --name {run_id}");
            super::slurm::cancel_run_now(&run_id);
        }
        std::process::exit(again);
    });
    stop
}

/// The scheduler's state between two finished stages.
struct Scheduler<'a> {
    shared: Arc<Shared>,
    dag: &'a Dag,
    /// The selected stages, by index.
    planned: BTreeMap<usize, &'a PlannedStage>,
    /// Outputs of the stages that finished, ran or cached.
    outputs: BTreeMap<usize, BTreeMap<String, ArtifactId>>,
    results: BTreeMap<usize, StageResult>,
    started: BTreeSet<usize>,
    tasks: JoinSet<TaskEnd>,
}

impl Scheduler<'_> {
    /// Starts every stage whose upstream is done; skips those whose upstream
    /// failed, and those not started before a cancellation.
    fn start_ready_stages(&mut self) {
        let dag = self.dag;
        for &i in dag.order() {
            if !self.planned.contains_key(&i) || self.started.contains(&i) {
                continue;
            }
            let ups = dag.upstream(i);
            if let Some((j, _)) = ups.iter().find(|(j, _)| {
                self.results
                    .get(j)
                    .is_some_and(|r| !matches!(r.status, StageStatus::Ran | StageStatus::Cached))
            }) {
                let status = if self.shared.cancel.is_cancelled() {
                    StageStatus::Cancelled
                } else {
                    StageStatus::Skipped
                };
                let upstream = &self.shared.pipeline.stages[*j].id;
                self.not_run(i, status, format!("upstream {upstream} did not finish"));
                continue;
            }
            if !ups.iter().all(|(j, _)| self.outputs.contains_key(j)) {
                continue;
            }
            if self.shared.cancel.is_cancelled() {
                self.not_run(i, StageStatus::Cancelled, "not started".into());
                continue;
            }
            self.started.insert(i);
            self.spawn(i);
        }
    }

    fn not_run(&mut self, i: usize, status: StageStatus, detail: String) {
        self.started.insert(i);
        self.results.insert(
            i,
            StageResult {
                stage: self.shared.pipeline.stages[i].id.clone(),
                status,
                seconds: 0.0,
                detail,
            },
        );
    }

    /// Starts stage `i` on its upstream's actual outputs.
    fn spawn(&mut self, i: usize) {
        let upstream_ids: BTreeMap<String, ArtifactId> = self
            .dag
            .stage_inputs(&self.shared.pipeline, i)
            .map(|input| {
                let id = self.outputs[&input.from][input.output].clone();
                (input.name.to_string(), id)
            })
            .collect();
        let planned = self.planned[&i];
        let task = StageTask {
            index: i,
            op: planned.op,
            upstream_ids,
            planned_run: planned.action == Action::Run,
        };
        let shared = self.shared.clone();
        self.tasks.spawn(async move {
            let start = Instant::now();
            let end = execute(&shared, task).await;
            (i, start.elapsed(), end)
        });
    }

    /// Records how stage `i` ended; a failure stops everything under
    /// `--fail-fast`.
    fn record(&mut self, i: usize, elapsed: Duration, end: Result<Finished, Error>) {
        let shared = &self.shared;
        let stage = &shared.pipeline.stages[i];
        let id = stage.id.clone();
        let seconds = elapsed.as_secs_f64();
        let (status, detail) = match end {
            Ok(Finished {
                status,
                outputs,
                key,
                detail,
                not_bitwise,
            }) => {
                let entry = lock_entry(stage, &key, &outputs, not_bitwise);
                shared
                    .finished
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((id.clone(), entry));
                self.outputs.insert(i, outputs);
                if status == StageStatus::Ran {
                    shared.ui.say(&format!("done    {id} ({seconds:.2}s)"));
                }
                (status, detail)
            }
            Err(Error::Cancelled) => (StageStatus::Cancelled, Error::Cancelled.to_string()),
            Err(failure) => {
                let message = failure.to_string();
                // In full, as it happens (the table keeps its first line).
                shared.ui.shout(&format!("FAILED  {id}: {message}"));
                if shared.options.fail_fast {
                    shared.cancel.cancel();
                }
                (StageStatus::Failed, message)
            }
        };
        self.results.insert(
            i,
            StageResult {
                stage: id,
                status,
                seconds,
                detail,
            },
        );
    }
}
