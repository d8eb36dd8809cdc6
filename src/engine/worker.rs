//! Starting `alignflow-worker` processes: one per tensor stage, with the
//! stage spec on stdin and events read from stdout as they come.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::Context;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStderr, ChildStdout, Command};
use tokio_util::sync::CancellationToken;

use crate::ops::Reporter;
use crate::protocol::{Metrics, StageSpec, WorkerEvent};

use super::progress::StageProgress;
use super::Error;

/// The worker executable: `$ALIGNFLOW_WORKER`, else `alignflow-worker`
/// beside the running engine binary.
pub fn worker_path() -> PathBuf {
    if let Some(p) = std::env::var_os("ALIGNFLOW_WORKER") {
        return PathBuf::from(p);
    }
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join("alignflow-worker")))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("alignflow-worker"))
}

/// Why the worker `exe` did not start; when it does not exist, where
/// [`worker_path`] looked and how to point it at one.
fn cannot_start(exe: &Path, error: std::io::Error) -> anyhow::Error {
    if error.kind() != std::io::ErrorKind::NotFound {
        return anyhow::anyhow!("starting the worker {}: {error}", exe.display());
    }
    let looked = match std::env::var_os("ALIGNFLOW_WORKER") {
        Some(set) => format!("ALIGNFLOW_WORKER is set to {}", Path::new(&set).display()),
        None => {
            let beside = std::env::current_exe()
                .ok()
                .and_then(|e| e.parent().map(|d| d.join("alignflow-worker")))
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "beside the engine".into());
            format!("looked for {beside} (beside the engine), then `alignflow-worker` on PATH")
        }
    };
    anyhow::anyhow!(
        "the tensor worker was not found ({looked}); build it (`cargo build --release -p alignflow-worker`) or set ALIGNFLOW_WORKER to its path"
    )
}

/// How the worker was pinned to a device.
pub struct Placement {
    /// `CUDA_VISIBLE_DEVICES` for the worker (empty hides every GPU);
    /// `None` keeps the one the cluster scheduler set for the job.
    pub cuda_visible_devices: Option<String>,
}

/// Runs one stage in a worker process until it reports `done` or fails.
/// Cancelling kills the worker.
pub async fn run_stage(
    spec: &StageSpec,
    placement: &Placement,
    progress: &StageProgress<'_>,
    cancel: &CancellationToken,
) -> Result<Metrics, Error> {
    let exe = worker_path();
    let mut child = start(&exe, spec, placement).await?;
    // Off the list before it is reaped: its pid may then be another's.
    let running = child
        .id()
        .map(alignflow_ops::checkpoint_request::Listener::worker);
    let stdout = child.stdout.take().expect("piped");
    let stderr = child.stderr.take().expect("piped");
    let read = tokio::select! {
        read = read_events(stdout, stderr, progress) => Some(read),
        _ = cancel.cancelled() => None,
    };
    drop(running);
    let Some(read) = read else {
        let _ = child.kill().await;
        return Err(Error::Cancelled);
    };
    let (outcome, tail) = read?;
    let status = child.wait().await.map_err(anyhow::Error::from)?;
    match outcome {
        Some(Ok(metrics)) if status.success() => Ok(metrics),
        Some(Err(message)) => Err(anyhow::anyhow!("{message}").into()),
        _ => {
            use std::os::unix::process::ExitStatusExt;
            let how = match (status.code(), status.signal()) {
                (_, Some(sig)) => format!("killed by signal {sig}"),
                (Some(code), _) => format!("exit status {code}"),
                _ => "unknown status".into(),
            };
            Err(anyhow::anyhow!(
                "the worker died ({how}) without a result; its last stderr lines:\n{}",
                tail.join("\n")
            )
            .into())
        }
    }
}

/// Starts the worker and sends it the stage spec.
async fn start(exe: &Path, spec: &StageSpec, placement: &Placement) -> anyhow::Result<Child> {
    let mut command = Command::new(exe);
    // The worker dies with the engine (even on SIGKILL), so an orphan can
    // never keep writing the checkpoints a rerun resumes from. The spawning
    // thread is a runtime worker, alive as long as the run.
    unsafe {
        command.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            alignflow_ops::checkpoint_request::block_before_exec()
        });
    }
    if let Some(devices) = &placement.cuda_visible_devices {
        command.env("CUDA_VISIBLE_DEVICES", devices);
    }
    let mut child = command
        .args(["run", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|error| cannot_start(exe, error))?;
    let spec_json = serde_json::to_vec(spec)?;
    let mut stdin = child.stdin.take().expect("piped");
    stdin
        .write_all(&spec_json)
        .await
        .context("sending the stage spec to the worker")?;
    drop(stdin);
    Ok(child)
}

/// What the worker reported (`None`: neither done nor failed), and the last
/// lines of its stderr.
type Reported = (Option<Result<Metrics, String>>, Vec<String>);

/// Reads the worker's events and output until it closes both streams.
async fn read_events(
    stdout: ChildStdout,
    stderr: ChildStderr,
    progress: &StageProgress<'_>,
) -> anyhow::Result<Reported> {
    let mut stdout = BufReader::new(stdout).lines();
    let mut stderr = BufReader::new(stderr).lines();
    let mut tail: VecDeque<String> = VecDeque::new();
    let mut outcome: Option<Result<Metrics, String>> = None;
    let (mut out_open, mut err_open) = (true, true);
    while out_open || err_open {
        tokio::select! {
            line = stdout.next_line(), if out_open => match line? {
                None => out_open = false,
                Some(line) => match WorkerEvent::parse(&line) {
                    Some(WorkerEvent::Progress { pos, len, msg }) => progress.progress(pos, len, &msg),
                    Some(WorkerEvent::Metric { values }) => progress.metric(&values),
                    Some(WorkerEvent::Done { metrics }) => outcome = Some(Ok(metrics)),
                    Some(WorkerEvent::Failed { message }) => outcome = Some(Err(message)),
                    Some(WorkerEvent::Doctor { .. }) => {}
                    None => progress.output_line(&line),
                },
            },
            line = stderr.next_line(), if err_open => match line? {
                None => err_open = false,
                Some(line) => {
                    progress.output_line(&line);
                    tail.push_back(line);
                    if tail.len() > 20 {
                        tail.pop_front();
                    }
                }
            },
        }
    }
    Ok((outcome, tail.into_iter().collect()))
}

/// The libtorch version of the worker, once [`learn_libtorch_version`] asked
/// it (a node does, once per job: records carry it as provenance).
static LIBTORCH_VERSION: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Asks the worker for its libtorch version and keeps it for
/// [`libtorch_version`]. Costs a worker start (a second or so): a cluster
/// job does it, a local run does not.
pub fn learn_libtorch_version() {
    match doctor() {
        Ok(info) => {
            if let Some(v) = info.get("libtorch").and_then(|v| v.as_str()) {
                let _ = LIBTORCH_VERSION.set(v.to_string());
            }
        }
        Err(e) => tracing::warn!("libtorch version unknown: {e:#}"),
    }
}

/// The worker's libtorch version, if [`learn_libtorch_version`] learnt it.
pub fn libtorch_version() -> Option<String> {
    LIBTORCH_VERSION.get().cloned()
}

/// `alignflow-worker doctor`: libtorch, CUDA and thread facts.
pub fn doctor() -> anyhow::Result<BTreeMap<String, serde_json::Value>> {
    let exe = worker_path();
    let output = std::process::Command::new(&exe)
        .arg("doctor")
        .stderr(Stdio::inherit())
        .output()
        .map_err(|error| cannot_start(&exe, error))?;
    let text = String::from_utf8_lossy(&output.stdout);
    for line in text.lines() {
        if let Some(WorkerEvent::Doctor { info }) = WorkerEvent::parse(line) {
            return Ok(info);
        }
    }
    anyhow::bail!(
        "the worker {} answered no doctor event ({})",
        exe.display(),
        output.status
    )
}
