//! Watching a run's jobs: ONE `squeue` call per tick for all of them (the
//! run id is their job name), published to every waiting stage. Quiet ticks
//! back off up to 8 times the interval, a submission resets it; `sacct` is
//! never needed (`squeue -t all` shows ended jobs for `MinJobAge`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::process::Command;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

use super::submit::output_within;

/// A job's state as `squeue` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobState {
    /// `PENDING`, `RUNNING`, `COMPLETED`, `TIMEOUT`, ...
    pub state: String,
    /// Slurm's reason (`Resources`, `TimeLimit`, `None`).
    pub reason: String,
}

/// One `squeue` answer.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// When the call was made.
    pub taken: Instant,
    /// Job id to state; meaningful only when `error` is `None`.
    pub jobs: HashMap<String, JobState>,
    /// Why the call failed (the controller unreachable): nothing is lost then.
    pub error: Option<String>,
}

/// The poller of one run.
pub struct Poller {
    rx: watch::Receiver<Arc<Snapshot>>,
    wake: Arc<Notify>,
    /// Stages waiting on a job: no calls while none does.
    waiting: Arc<AtomicUsize>,
}

/// A stage waiting on jobs; the poller polls while any is alive.
pub struct Waiting {
    waiting: Arc<AtomicUsize>,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.waiting.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Poller {
    /// Starts polling `squeue` for jobs named `run_id` every `interval`
    /// (a call killed after `limit`), until `stop` is cancelled.
    pub fn start(
        run_id: String,
        interval: Duration,
        limit: Duration,
        stop: CancellationToken,
    ) -> Poller {
        let (tx, rx) = watch::channel(Arc::new(Snapshot {
            taken: Instant::now(),
            jobs: HashMap::new(),
            error: Some("not polled yet".into()),
        }));
        let wake = Arc::new(Notify::new());
        let waiting = Arc::new(AtomicUsize::new(0));
        tokio::spawn(poll_loop(
            run_id,
            interval,
            limit,
            tx,
            wake.clone(),
            waiting.clone(),
            stop,
        ));
        Poller { rx, wake, waiting }
    }

    /// Registers a waiting stage.
    pub fn waiting(&self) -> Waiting {
        self.waiting.fetch_add(1, Ordering::SeqCst);
        self.wake.notify_one();
        Waiting {
            waiting: self.waiting.clone(),
        }
    }

    /// A job was submitted: the next tick comes at the base interval.
    pub fn submitted(&self) {
        self.wake.notify_one();
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.rx.clone()
    }
}

async fn poll_loop(
    run_id: String,
    base: Duration,
    limit: Duration,
    tx: watch::Sender<Arc<Snapshot>>,
    wake: Arc<Notify>,
    waiting: Arc<AtomicUsize>,
    stop: CancellationToken,
) {
    let mut interval = base;
    let mut last: Option<HashMap<String, JobState>> = None;
    let mut last_call: Option<Instant> = None;
    loop {
        if waiting.load(Ordering::SeqCst) == 0 {
            tokio::select! {
                _ = wake.notified() => continue,
                _ = stop.cancelled() => return,
            }
        }
        if let Some(at) = last_call {
            tokio::select! {
                _ = tokio::time::sleep_until((at + base).into()) => {}
                _ = stop.cancelled() => return,
            }
        }
        let snapshot = squeue(&run_id, limit).await;
        last_call = Some(snapshot.taken);
        let changed = snapshot.error.is_some() || last.as_ref() != Some(&snapshot.jobs);
        if snapshot.error.is_none() {
            last = Some(snapshot.jobs.clone());
        }
        interval = backed_off(interval, base, changed && snapshot.error.is_none());
        if let Some(e) = &snapshot.error {
            tracing::warn!("squeue failed (retrying in {interval:?}): {e}");
        }
        let called = snapshot.taken;
        tx.send_replace(Arc::new(snapshot));
        // Never two calls less than `base` apart; a submission cuts a
        // backed-off wait short.
        let mut next = called + interval;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(next.into()) => break,
                _ = wake.notified() => {
                    interval = base;
                    next = next.min(called + base);
                }
                _ = stop.cancelled() => return,
            }
        }
    }
}

/// `squeue -h -t all --name RUN -o %i|%T|%r`: every job of the run, ended
/// ones included.
async fn squeue(run_id: &str, limit: Duration) -> Snapshot {
    let taken = Instant::now();
    let mut command = Command::new("squeue");
    command
        .args(["--noheader", "--states=all", "--name", run_id])
        .args(["--format", "%i|%T|%r"]);
    let output = output_within(&mut command, limit).await;
    let (jobs, error) = match output {
        Ok(out) if out.status.success() => {
            (parse_squeue(&String::from_utf8_lossy(&out.stdout)), None)
        }
        Ok(out) => (
            HashMap::new(),
            Some(format!(
                "squeue: {} {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )),
        ),
        Err(e) => (HashMap::new(), Some(format!("running squeue: {e:#}"))),
    };
    Snapshot { taken, jobs, error }
}

/// Lines of `%i|%T|%r`. A job array's element `123_4` keeps its full id.
pub fn parse_squeue(text: &str) -> HashMap<String, JobState> {
    text.lines()
        .filter_map(|line| {
            let mut parts = line.trim().splitn(3, '|');
            let id = parts.next()?.trim();
            let state = parts.next()?.trim();
            let reason = parts.next().unwrap_or("").trim();
            (!id.is_empty()).then(|| {
                (
                    id.to_string(),
                    JobState {
                        state: state.to_string(),
                        reason: reason.to_string(),
                    },
                )
            })
        })
        .collect()
}

/// The longest wait between two calls that backing off makes (unless the
/// interval itself is longer): an ended job stays in squeue for Slurm's
/// `MinJobAge` (300 s by default) only, and one that left unseen would be
/// taken for lost and resubmitted.
const BACKOFF_CAP: Duration = Duration::from_secs(120);

/// The next wait: `base` after a change; while nothing changes (or the
/// controller does not answer), 1.5 times longer each call, up to 8 times
/// `base` and [`BACKOFF_CAP`].
fn backed_off(interval: Duration, base: Duration, changed: bool) -> Duration {
    if changed {
        base
    } else {
        interval
            .mul_f64(1.5)
            .min(base * 8)
            .min(BACKOFF_CAP.max(base))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backing_off_stays_within_an_ended_jobs_time_in_squeue() {
        let base = Duration::from_secs(30);
        let mut wait = base;
        for _ in 0..20 {
            wait = backed_off(wait, base, false);
        }
        assert_eq!(wait, BACKOFF_CAP, "not 8 x 30 s = 240 s");
        assert_eq!(backed_off(wait, base, true), base);
        let short = Duration::from_secs(2);
        assert_eq!(backed_off(short * 8, short, false), short * 8);
        let long = Duration::from_secs(600);
        assert_eq!(
            backed_off(long, long, false),
            long,
            "a longer interval is the user's"
        );
    }

    #[test]
    fn squeue_lines_parse() {
        let jobs = parse_squeue("12|RUNNING|None\n13|PENDING|Resources\n\n14|TIMEOUT|TimeLimit\n");
        assert_eq!(jobs.len(), 3);
        assert_eq!(jobs["13"].reason, "Resources");
        assert_eq!(jobs["14"].state, "TIMEOUT");
    }
}
