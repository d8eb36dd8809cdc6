//! Experiment trackers: a training stage's `metrics.jsonl` streamed, while
//! the stage runs, to TensorBoard event files and to an MLflow server
//! (`tracking:` in the manifest, `run --tensorboard DIR`), and cached
//! stages' logs exported to TensorBoard later (`alignflow export-tb`).
//!
//! The engine does this, not the worker: it follows the log the worker
//! appends to and, once the stage is committed, takes the rest from the
//! published `metrics` output, so a tracker sees exactly the values of
//! `metrics.jsonl`. Trackers are observers: their settings enter no
//! fingerprint, and a tracker that fails (a server down, a folder not
//! writable) costs a warning, never the stage.

mod export;
mod follow;
mod mlflow;
mod points;
mod tensorboard;

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::cache::{Fingerprint, StageKey};
pub use crate::manifest::Tracking;
pub use export::{export_tensorboard, Exported};
use follow::Follower;
use mlflow::{MlflowRun, RunStart, Server};
use tensorboard::TbRun;

/// How often a running stage's log is looked at.
const POLL: Duration = Duration::from_millis(500);

/// The stage a tracker follows.
pub struct TrackedStage<'a> {
    pub pipeline: &'a str,
    pub stage: &'a str,
    pub key: &'a StageKey,
    pub fingerprint: &'a Fingerprint,
    /// The `metrics.jsonl` the worker appends to.
    pub live_log: PathBuf,
}

/// How the followed stage ended.
pub enum Outcome {
    /// Committed: its published `metrics` output, and every output's path.
    Committed {
        metrics: PathBuf,
        outputs: Vec<(String, PathBuf)>,
    },
    Failed,
}

/// The trackers of a running stage, following its log on a task of their
/// own.
pub struct LiveTracker {
    stage: String,
    /// The MLflow server followed, as shown.
    mlflow: Option<String>,
    stop: CancellationToken,
    task: JoinHandle<Sinks>,
}

/// Starts following `stage` for every tracker `settings` name; `None` when
/// they name none.
pub fn start(settings: &Tracking, stage: TrackedStage<'_>) -> Option<LiveTracker> {
    if settings.is_empty() {
        return None;
    }
    let tensorboard = settings.tensorboard.as_ref().and_then(|root| {
        TbRun::create(root, stage.stage)
            .map_err(|e| warn(stage.stage, "TensorBoard", &e))
            .ok()
    });
    let stop = CancellationToken::new();
    let mut sinks = Sinks {
        stage: stage.stage.to_string(),
        follower: Follower::new(stage.live_log.clone(), SystemTime::now()),
        tensorboard,
        mlflow: None,
        broken: None,
    };
    let server = settings.mlflow.as_deref().and_then(|uri| {
        Server::parse(uri)
            .map_err(|e| warn(stage.stage, "MLflow", &e))
            .ok()
    });
    // A server that stopped answering in this command is not asked again.
    let server = server.filter(|s| !given_up(&s.shown()));
    let mlflow_shown = server.as_ref().map(Server::shown);
    let mlflow = server.map(|server| {
        let mut params = mlflow::flatten_params(&stage.key.params);
        params.extend([
            ("alignflow.fingerprint".into(), stage.fingerprint.0.clone()),
            ("alignflow.op".into(), stage.key.op.clone()),
            (
                "alignflow.op_version".into(),
                stage.key.op_version.to_string(),
            ),
            ("alignflow.seed".into(), stage.key.seed.to_string()),
        ]);
        let tags = vec![
            ("alignflow.pipeline".to_string(), stage.pipeline.to_string()),
            ("alignflow.stage".to_string(), stage.stage.to_string()),
        ];
        (server, stage.pipeline.to_string(), params, tags)
    });
    let stage_name = stage.stage.to_string();
    let task = {
        let stop = stop.clone();
        tokio::spawn(async move {
            // Started here, not before the stage: a slow server delays
            // nothing but its own run.
            if let Some((server, experiment, params, tags)) = mlflow {
                let start = RunStart {
                    experiment: &experiment,
                    run_name: &sinks.stage,
                    params,
                    tags,
                };
                // A stage that ends first waits for it within
                // [`FINISH_DEADLINE`].
                match MlflowRun::start(&server, start).await {
                    Ok(run) => sinks.mlflow = Some(run),
                    Err(e) => {
                        let timed_out = e.chain().any(|c| {
                            c.downcast_ref::<reqwest::Error>()
                                .is_some_and(reqwest::Error::is_timeout)
                        });
                        if timed_out {
                            give_up(&server.shown());
                        }
                        warn(&sinks.stage, &format!("MLflow at {}", server.shown()), &e)
                    }
                }
            }
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(POLL) => {
                        let lines = sinks.follower.poll();
                        sinks.take(lines).await;
                    }
                }
            }
            sinks
        })
    };
    Some(LiveTracker {
        stage: stage_name,
        mlflow: mlflow_shown,
        stop,
        task,
    })
}

/// The MLflow servers this command gave up on (one that did not answer in
/// time): each later stage would wait for it again.
static GIVEN_UP: std::sync::Mutex<std::collections::BTreeSet<String>> =
    std::sync::Mutex::new(std::collections::BTreeSet::new());

fn given_up(shown: &str) -> bool {
    GIVEN_UP.lock().expect("given-up servers").contains(shown)
}

fn give_up(shown: &str) {
    if GIVEN_UP
        .lock()
        .expect("given-up servers")
        .insert(shown.to_string())
    {
        tracing::warn!("MLflow at {shown} does not answer in time: no later stage of this run is tracked there");
    }
}

/// How long a stage's end waits for its trackers (the last metrics, the
/// run's end): a slow or hung server holds up neither the stages that
/// depend on it nor a Ctrl-C longer. A stage that failed or was stopped
/// waits less.
const FINISH_DEADLINE: Duration = Duration::from_secs(10);
const FAILED_FINISH_DEADLINE: Duration = Duration::from_secs(2);

impl LiveTracker {
    /// Hands the trackers the log's last lines and ends their runs, within
    /// [`FINISH_DEADLINE`].
    pub async fn finish(self, outcome: Outcome) {
        self.stop.cancel();
        let abort = self.task.abort_handle();
        let stage = self.stage.clone();
        let mlflow = self.mlflow.clone();
        let deadline = match outcome {
            Outcome::Committed { .. } => FINISH_DEADLINE,
            Outcome::Failed => FAILED_FINISH_DEADLINE,
        };
        if tokio::time::timeout(deadline, self.finish_now(outcome))
            .await
            .is_err()
        {
            abort.abort();
            if let Some(shown) = &mlflow {
                give_up(shown);
            }
            warn(
                &stage,
                "a tracker",
                &anyhow::anyhow!(
                    "no answer within {} s: its last metrics and the run's end are not recorded",
                    deadline.as_secs()
                ),
            );
        }
    }

    async fn finish_now(self, outcome: Outcome) {
        let Ok(mut sinks) = self.task.await else {
            return;
        };
        let (lines, tags, finished) = match &outcome {
            Outcome::Committed { metrics, outputs } => {
                let lines = sinks.follower.rest_of(metrics).unwrap_or_else(|e| {
                    warn(&sinks.stage, "the trackers", &anyhow::anyhow!("{e}"));
                    Vec::new()
                });
                let tags = outputs
                    .iter()
                    .map(|(name, path)| (format!("alignflow.output.{name}"), path_text(path)))
                    .collect();
                (lines, tags, true)
            }
            Outcome::Failed => (sinks.follower.poll(), Vec::new(), false),
        };
        sinks.take(lines).await;
        if let Some(run) = sinks.mlflow.take() {
            if let Err(e) = run.end(finished, &tags).await {
                warn(&sinks.stage, "MLflow", &e);
            }
        }
        if let Some(run) = sinks.broken.take() {
            let _ = run.end(false, &tags).await;
        }
    }
}

/// The trackers that still work, and the log they follow.
struct Sinks {
    stage: String,
    follower: Follower,
    tensorboard: Option<TbRun>,
    mlflow: Option<MlflowRun>,
    /// A run whose metrics stopped going through.
    broken: Option<MlflowRun>,
}

impl Sinks {
    /// Hands the trackers these lines; one that fails is dropped for the
    /// rest of the stage.
    async fn take(&mut self, lines: Vec<(usize, String)>) {
        let points: Vec<points::Point> = lines
            .iter()
            .filter_map(|(i, line)| points::parse(line, *i))
            .collect();
        if points.is_empty() {
            return;
        }
        if let Some(tb) = &mut self.tensorboard {
            if let Err(e) = tb.write(&points) {
                warn(&self.stage, "TensorBoard", &e);
                self.tensorboard = None;
            }
        }
        if let Some(run) = &self.mlflow {
            if let Err(e) = run.log(&points).await {
                warn(&self.stage, "MLflow", &e);
                // Ended as FAILED at the stage's end (not left RUNNING).
                self.broken = self.mlflow.take();
            }
        }
    }
}

fn warn(stage: &str, tracker: &str, error: &anyhow::Error) {
    tracing::warn!("stage `{stage}`: {tracker} is not tracking this stage: {error:#}");
}

fn path_text(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}
