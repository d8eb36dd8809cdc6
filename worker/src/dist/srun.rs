//! Ranks 1..N of a data-parallel stage as the tasks of one `srun` step, in
//! the Slurm job that runs the stage (how the Slurm executor runs it:
//! `alignflow stage exec` tells its worker so, [`ENV_RANK_LAUNCHER`]).
//!
//! The engine submitted the job with one task per rank (`--ntasks=N`, and
//! on GPUs `--gpus-per-task`), and rank 0 is the job's own worker, in the
//! batch step on the job's first node. It starts `srun --ntasks=N`: Slurm lays the step's tasks out as it
//! laid out the job's, so task K runs where the job's K-th task was placed
//! and becomes rank K (`SLURM_PROCID`). Task 0's place is the one rank 0
//! already runs in: that task exits at once ([`holds_rank_0_place`]). A
//! step of N-1 tasks would not do: Slurm starts it on the first node too,
//! beside rank 0, and leaves the last task's place empty.
//!
//! The tasks read one spec file in the stage's checkpoint folder (on the
//! shared filesystem, as the cache is) and write their outputs to scratch
//! folders beside it. Rank 0 hosts the store on its node's hostname
//! (`ALIGNFLOW_DIST_HOST` overrides it); every rank binds its Gloo
//! sockets to its own node's hostname, or to the interfaces torch's
//! `GLOO_SOCKET_IFNAME` names, where a hostname resolves to an address the
//! other nodes cannot reach (Debian's 127.0.1.1). On GPUs each task takes the GPUs
//! Slurm gave it, and rank 0, which sees all of its node's, the first
//! ones, which Slurm gave task 0 ([`slurm_gpu_run`]).
//!
//! [`slurm_gpu_run`]: alignflow_ops::role_devices::slurm_gpu_run
//!
//! One rank's death ends the step (`--kill-on-bad-exit=1`) and srun names
//! it (`srun: error: n2: task 1: Killed`), which rank 0 reports; rank 0's
//! own failure, or its death (`PR_SET_PDEATHSIG`), sends srun SIGTERM, on
//! which srun kills the step. `--wait=0`: a site's `WaitTime` must not end
//! the step because task 0 exited.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;

use alignflow_ops::protocol::{StageSpec, WorkerEvent, ENV_RANK_LAUNCHER};

use super::launch::{die_with_parent, scratch_dir, ENV_RANK, ENV_STORE, ENV_WORLD};
use super::Store;

/// Set for the tasks of rank 0's srun step: the rank is `SLURM_PROCID`.
const ENV_SRUN_TASK: &str = "ALIGNFLOW_DIST_SRUN";
/// The address rank 0 hosts the store on and the other ranks reach it at,
/// where the node's hostname is not it (another interface).
const ENV_HOST: &str = "ALIGNFLOW_DIST_HOST";

/// How long srun has to end the step once sent SIGTERM.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Whether this worker is rank 0 of a stage run by a Slurm job, which
/// starts the other ranks with srun.
pub fn launches_ranks() -> bool {
    std::env::var(ENV_RANK_LAUNCHER).is_ok_and(|v| v == "srun")
}

/// Whether this process is a task of rank 0's srun step.
pub fn is_task() -> bool {
    std::env::var_os(ENV_SRUN_TASK).is_some()
}

/// Whether this process is task 0 of rank 0's srun step: its place is rank
/// 0's, which already runs; it has nothing to do.
pub fn holds_rank_0_place() -> bool {
    is_task() && std::env::var("SLURM_PROCID").is_ok_and(|id| id == "0")
}

/// This task's rank: its `SLURM_PROCID`.
pub fn task_rank() -> anyhow::Result<usize> {
    let id = std::env::var("SLURM_PROCID")
        .with_context(|| format!("{ENV_SRUN_TASK} is set but SLURM_PROCID is not"))?;
    id.parse().with_context(|| format!("SLURM_PROCID={id}"))
}

/// This task's place among its node's tasks (`SLURM_LOCALID`; 0 for rank
/// 0, outside the step: the first task of its node is the one it replaces).
pub fn local_id() -> usize {
    std::env::var("SLURM_LOCALID")
        .ok()
        .and_then(|id| id.parse().ok())
        .unwrap_or(0)
}

/// This machine's hostname: the address a rank on another node reaches it
/// at on a cluster whose hostnames resolve (as Slurm's do).
pub fn node_host() -> anyhow::Result<String> {
    let mut buf = [0u8; 256];
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    anyhow::ensure!(rc == 0, "gethostname: {}", std::io::Error::last_os_error());
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    Ok(String::from_utf8_lossy(&buf[..end]).into_owned())
}

/// The address rank 0 hosts the store on: `ALIGNFLOW_DIST_HOST`, else its
/// node's hostname.
pub fn store_host() -> anyhow::Result<String> {
    match std::env::var(ENV_HOST) {
        Ok(host) if !host.is_empty() => Ok(host),
        _ => node_host(),
    }
}

/// Where a log line says a rank runs: Slurm's node name, and the host.
pub fn place() -> String {
    let host = node_host().unwrap_or_else(|_| "?".into());
    match std::env::var("SLURMD_NODENAME") {
        Ok(node) => format!("node {node} ({host})"),
        Err(_) => format!("host {host}"),
    }
}

/// Intra-op threads per rank: each task has its own CPUs, the stage's
/// `resources.cpus` (`--cpus-per-task`), else Slurm's one.
pub fn threads_per_rank(stage_threads: Option<usize>) -> usize {
    stage_threads
        .or_else(|| {
            std::env::var("SLURM_CPUS_PER_TASK")
                .ok()
                .and_then(|c| c.parse().ok())
        })
        .unwrap_or(1)
        .max(1)
}

/// The spec file every task reads.
fn spec_file(checkpoint_dir: &Path) -> PathBuf {
    checkpoint_dir.join("data-parallel-ranks.json")
}

/// Ranks 1..N as the tasks of one srun step.
pub struct SrunRanks {
    world: usize,
    srun: Child,
    checkpoint_dir: PathBuf,
    /// Each rank's `failed` message, if it sent one.
    failed: Arc<Mutex<BTreeMap<usize, String>>>,
    /// srun's own lines (`srun: error: n2: task 1: Killed`).
    said: Arc<Mutex<Vec<String>>>,
    readers: Vec<JoinHandle<()>>,
}

impl SrunRanks {
    /// Starts ranks 1..`world` as `srun --ntasks=world`, in a job of
    /// `world` tasks, after writing their spec file.
    pub fn start(
        spec: &StageSpec,
        world: usize,
        store: &Store,
        threads: usize,
    ) -> anyhow::Result<SrunRanks> {
        let job = std::env::var("SLURM_JOB_ID").map_err(|_| {
            anyhow::anyhow!(
                "{ENV_RANK_LAUNCHER}=srun, but this is not a Slurm job (no SLURM_JOB_ID)"
            )
        })?;
        let tasks = match std::env::var("SLURM_NTASKS") {
            Ok(n) => format!("{n} (SLURM_NTASKS)"),
            Err(_) => "no --ntasks".into(),
        };
        anyhow::ensure!(
            tasks == format!("{world} (SLURM_NTASKS)"),
            "data_parallel: {world} needs a Slurm job of {world} tasks, one per rank, but job {job} has {tasks}: was --ntasks changed by the profile's sbatch_flags, or the job submitted by an older engine?"
        );
        let mut shared = spec.clone();
        shared.threads = Some(threads);
        std::fs::create_dir_all(&spec.checkpoint_dir)
            .with_context(|| format!("creating {}", spec.checkpoint_dir.display()))?;
        let path = spec_file(&spec.checkpoint_dir);
        let text = serde_json::to_vec(&shared).context("writing the ranks' stage spec")?;
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;

        let exe = std::env::current_exe().context("locating the worker executable")?;
        let mut command = Command::new("srun");
        command.args([
            format!("--ntasks={world}"),
            "--kill-on-bad-exit=1".into(),
            "--wait=0".into(),
            "--label".into(),
            // The tasks learn their part from this environment: a job
            // submitted with `--export=NONE` (a profile's sbatch_flags)
            // hands srun SLURM_EXPORT_ENV=NONE, which would strip it.
            "--export=ALL".into(),
        ]);
        // srun does not take the job's --cpus-per-task from the
        // environment (since Slurm 22.05): each rank's CPUs are said again.
        if let Ok(cpus) = std::env::var("SLURM_CPUS_PER_TASK") {
            command.arg(format!("--cpus-per-task={cpus}"));
        }
        // Each task its own GPUs (a job of `--gpus-per-task`), said again
        // for the same reason; the task takes them ([`super::launch`]'s
        // `task_spec`).
        if let Ok(gpus) = std::env::var("SLURM_GPUS_PER_TASK") {
            command.arg(format!("--gpus-per-task={gpus}"));
        }
        command
            .arg(&exe)
            .arg("run")
            .arg(&path)
            .env(ENV_SRUN_TASK, "1")
            .env(ENV_WORLD, world.to_string())
            .env(ENV_STORE, store.addr())
            // Rank 0's settings, not the tasks': each binds its own host
            // and none launches ranks of its own.
            .env_remove(ENV_HOST)
            .env_remove(ENV_RANK_LAUNCHER)
            .env_remove(ENV_RANK)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // srun ends the step on SIGTERM: the ranks die with rank 0.
        die_with_parent(&mut command, libc::SIGTERM);
        tracing::info!(
            "starting ranks 1 to {} with srun in job {job}, from {}",
            world - 1,
            place()
        );
        let mut srun = match command.spawn() {
            Ok(srun) => srun,
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                return Err(e).context("starting srun (is Slurm's client on the node's PATH?)");
            }
        };
        let failed = Arc::new(Mutex::new(BTreeMap::new()));
        let said = Arc::new(Mutex::new(Vec::new()));
        let stdout = srun.stdout.take().expect("piped stdout");
        let stderr = srun.stderr.take().expect("piped stderr");
        let keep = failed.clone();
        let events = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let Some((rank, rest)) = labelled(&line) else {
                    eprintln!("{line}");
                    continue;
                };
                match WorkerEvent::parse(rest) {
                    Some(WorkerEvent::Failed { message }) => {
                        keep.lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .insert(rank, message);
                    }
                    Some(_) => {}
                    None => eprintln!("{line}"),
                }
            }
        });
        let keep = said.clone();
        let logs = std::thread::spawn(move || {
            // The ranks' logs, labelled with their task, go on to the job's
            // output; srun's own lines are kept for the stage's error.
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("{line}");
                if line.starts_with("srun: ") {
                    keep.lock().unwrap_or_else(|e| e.into_inner()).push(line);
                }
            }
        });
        Ok(SrunRanks {
            world,
            srun,
            checkpoint_dir: spec.checkpoint_dir.clone(),
            failed,
            said,
            readers: vec![events, logs],
        })
    }

    /// How the step ended before the group formed, if it did.
    pub fn ended_early(&mut self) -> Option<String> {
        let status = self.srun.try_wait().ok().flatten()?;
        Some(format!(
            "the srun step of ranks 1 to {} ended before they joined the group ({status})",
            self.world - 1
        ))
    }

    /// Whether the step has ended other than cleanly: a task failed or
    /// died, and srun (`--kill-on-bad-exit`) ended the rest.
    pub fn ended_badly(&mut self) -> bool {
        self.srun
            .try_wait()
            .ok()
            .flatten()
            .is_some_and(|status| !status.success())
    }

    /// Waits up to `grace` for the step to end (else stops it) and
    /// describes the ranks that failed, as srun and their `failed` events
    /// tell. A task srun terminated because another failed is not a cause,
    /// nor are the tasks a stop kills: srun's words are read before it. A
    /// step that ended badly without naming a rank is described as such,
    /// and so, after rank 0 succeeded, is one that did not end.
    pub fn settle(&mut self, grace: Duration, rank_0_ok: bool) -> Vec<String> {
        let status = self.wait(grace);
        if status.is_some() {
            self.drain_readers();
        }
        let tasks = self.task_reports();
        let failed = self
            .failed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if status.is_none() {
            self.stop();
        }
        let mut ranks: BTreeSet<usize> = failed.keys().copied().collect();
        ranks.extend(
            tasks
                .iter()
                .filter(|(_, (_, what))| !stopped_by_srun(what))
                .map(|(rank, _)| *rank),
        );
        let mut failures: Vec<String> = ranks
            .into_iter()
            .map(|rank| {
                let mut text = format!("rank {rank} of {}", self.world);
                if let Some((node, what)) = tasks.get(&rank) {
                    text.push_str(&format!(" on {node}: {what}"));
                }
                if let Some(message) = failed.get(&rank) {
                    text.push_str(&format!(": {message}"));
                }
                text
            })
            .collect();
        let ended_well = status.as_ref().is_some_and(ExitStatus::success);
        if failures.is_empty() && !ended_well && (rank_0_ok || status.is_some()) {
            failures.push(format!(
                "the srun step of ranks 1 to {} {}{}",
                self.world - 1,
                describe_status(status.as_ref()),
                self.srun_lines()
            ));
        }
        failures
    }

    /// srun's exit status, once it exited within `grace`.
    fn wait(&mut self, grace: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + grace;
        loop {
            if let Ok(Some(status)) = self.srun.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Ends the step: SIGTERM to srun (which kills every task), SIGKILL if
    /// it is still there after [`STOP_GRACE`]; the job's end would reap
    /// what is left.
    fn stop(&mut self) {
        if self.srun.try_wait().ok().flatten().is_some() {
            return;
        }
        unsafe {
            libc::kill(self.srun.id() as libc::pid_t, libc::SIGTERM);
        }
        if self.wait(STOP_GRACE).is_none() {
            let _ = self.srun.kill();
            let _ = self.srun.wait();
        }
    }

    /// Waits (briefly) for the readers to see the end of srun's output, so
    /// its last lines are in.
    fn drain_readers(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(2);
        while self.readers.iter().any(|r| !r.is_finished()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// What srun said of each task that did not end well: rank to (node,
    /// what), in srun's words.
    fn task_reports(&self) -> BTreeMap<usize, (String, String)> {
        let said = self.said.lock().unwrap_or_else(|e| e.into_inner());
        let mut reports = BTreeMap::new();
        for line in said.iter() {
            if let Some((node, tasks, what)) = task_error(line) {
                for rank in tasks {
                    reports
                        .entry(rank)
                        .or_insert_with(|| (node.clone(), what.clone()));
                }
            }
        }
        reports
    }

    /// srun's last lines, for an error that has nothing better to say.
    fn srun_lines(&self) -> String {
        let said = self.said.lock().unwrap_or_else(|e| e.into_inner());
        let from = said.len().saturating_sub(5);
        match said[from..].is_empty() {
            true => String::new(),
            false => format!("; srun said: {}", said[from..].join(" / ")),
        }
    }

    /// Removes the spec file and the ranks' scratch folders.
    pub fn clean(&self) {
        let _ = std::fs::remove_file(spec_file(&self.checkpoint_dir));
        for rank in 1..self.world {
            let _ = std::fs::remove_dir_all(scratch_dir(&self.checkpoint_dir, rank));
        }
    }
}

impl Drop for SrunRanks {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A line of srun's `--label`led output: the task and the rest.
fn labelled(line: &str) -> Option<(usize, &str)> {
    let (task, rest) = line.split_once(": ")?;
    Some((task.trim().parse().ok()?, rest))
}

/// srun's report of tasks that did not end well, `srun: error: NODE:
/// task 1: Killed` or `tasks 1-3,5: Exited with exit code 1`: the node,
/// the tasks, what happened.
fn task_error(line: &str) -> Option<(String, Vec<usize>, String)> {
    let rest = line.strip_prefix("srun: error: ")?;
    let (node, rest) = rest.split_once(": ")?;
    let (tasks, what) = rest.split_once(": ")?;
    let list = tasks
        .strip_prefix("tasks ")
        .or_else(|| tasks.strip_prefix("task "))?;
    let mut ranks = Vec::new();
    for part in list.split(',') {
        match part.split_once('-') {
            Some((a, b)) => ranks.extend(a.trim().parse::<usize>().ok()?..=b.trim().parse().ok()?),
            None => ranks.push(part.trim().parse().ok()?),
        }
    }
    Some((node.to_string(), ranks, what.trim().to_string()))
}

/// Whether srun's word for a task is that srun itself ended it, after
/// another task's failure or rank 0's SIGTERM.
fn stopped_by_srun(what: &str) -> bool {
    what == "Terminated"
}

fn describe_status(status: Option<&ExitStatus>) -> String {
    match status {
        None => "did not end and was stopped".into(),
        Some(s) => match (s.code(), s.signal()) {
            (_, Some(sig)) => format!("was killed by signal {sig}"),
            (Some(code), _) => format!("exited with status {code}"),
            _ => "ended".into(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn srun_names_the_tasks_that_ended_badly() {
        assert_eq!(
            task_error("srun: error: n2: task 1: Killed"),
            Some(("n2".into(), vec![1], "Killed".into()))
        );
        assert_eq!(
            task_error("srun: error: n3: tasks 1-3,5: Exited with exit code 1"),
            Some((
                "n3".into(),
                vec![1, 2, 3, 5],
                "Exited with exit code 1".into()
            ))
        );
        assert_eq!(task_error("srun: Force Terminated StepId=1.2"), None);
        assert_eq!(
            labelled(" 1: {\"event\":\"done\"}"),
            Some((1, "{\"event\":\"done\"}"))
        );
        assert_eq!(labelled("srun: error: n2: task 1: Killed"), None);
    }
}
