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
use mlflow::{MlflowRun, RunStart};
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
    };
    let mlflow = settings.mlflow.clone().map(|uri| {
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
        (uri, stage.pipeline.to_string(), params, tags)
    });
    let task = {
        let stop = stop.clone();
        tokio::spawn(async move {
            // Started here, not before the stage: a slow server delays
            // nothing but its own run.
            if let Some((uri, experiment, params, tags)) = mlflow {
                let start = RunStart {
                    experiment: &experiment,
                    run_name: &sinks.stage,
                    params,
                    tags,
                };
                match MlflowRun::start(&uri, start).await {
                    Ok(run) => sinks.mlflow = Some(run),
                    Err(e) => warn(&sinks.stage, &format!("MLflow at {uri}"), &e),
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
    Some(LiveTracker { stop, task })
}

impl LiveTracker {
    /// Hands the trackers the log's last lines and ends their runs.
    pub async fn finish(self, outcome: Outcome) {
        self.stop.cancel();
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
    }
}

/// The trackers that still work, and the log they follow.
struct Sinks {
    stage: String,
    follower: Follower,
    tensorboard: Option<TbRun>,
    mlflow: Option<MlflowRun>,
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
                self.mlflow = None;
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
