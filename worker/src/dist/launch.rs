//! Starting the ranks of a data-parallel stage and answering for them.
//!
//! The engine starts one worker per stage, as for any stage; with
//! `data_parallel: N` that worker becomes rank 0: it hosts the rendezvous
//! store on a free port of 127.0.0.1 (the OS picks it: no race between
//! stages), starts ranks 1..N as copies of itself with their rank, the
//! world size and the store's address in the environment, and joins the
//! Gloo group with them. So the engine's protocol, its cache and its
//! cancellation (killing rank 0) are those of a one-process stage, and
//! only rank 0's events reach the engine.
//!
//! A rank that dies makes the others' next collective fail (its sockets
//! close), or time out ([`timeout`]) if it hangs; rank 0 then names the
//! rank and how it ended in the stage's error, and kills the survivors.
//! Ranks 1..N die with rank 0 (`PR_SET_PDEATHSIG`), so none outlives a
//! cancelled or crashed stage.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;

use alignflow_ops::protocol::{Metrics, StageSpec, WorkerEvent};

use super::{install, Group, Store};

/// The environment a rank other than 0 is started with.
const ENV_RANK: &str = "ALIGNFLOW_DIST_RANK";
const ENV_WORLD: &str = "ALIGNFLOW_DIST_WORLD";
const ENV_STORE: &str = "ALIGNFLOW_DIST_STORE";
/// Seconds a collective (or the rendezvous) may wait for a peer.
const ENV_TIMEOUT: &str = "ALIGNFLOW_DIST_TIMEOUT_S";
const DEFAULT_TIMEOUT_S: u64 = 300;

/// The address every rank binds and meets on: ranks are local processes.
const HOST: &str = "127.0.0.1";

/// How long rank 0 waits for the others to exit once the stage is over.
const EXIT_GRACE: Duration = Duration::from_secs(30);

/// The bound on every collective and on the rendezvous:
/// `ALIGNFLOW_DIST_TIMEOUT_S`, default 300 s.
pub fn timeout() -> Duration {
    let secs = std::env::var(ENV_TIMEOUT)
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(DEFAULT_TIMEOUT_S);
    Duration::from_secs(secs.max(1))
}

/// The ranks a stage asks for: its params' `data_parallel` (default 1).
pub fn requested_world(params: &serde_json::Value) -> usize {
    params
        .get("data_parallel")
        .and_then(serde_json::Value::as_u64)
        .map_or(1, |n| n.max(1) as usize)
}

/// This process's rank, from the environment rank 0 started it with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankEnv {
    pub rank: usize,
    pub world: usize,
    pub store_host: String,
    pub store_port: u16,
}

impl RankEnv {
    /// The rank's environment, if this process is a rank other than 0.
    pub fn from_env() -> anyhow::Result<Option<RankEnv>> {
        let Ok(rank) = std::env::var(ENV_RANK) else {
            return Ok(None);
        };
        let var = |name: &str| {
            std::env::var(name).with_context(|| format!("{ENV_RANK} is set but {name} is not"))
        };
        let world = var(ENV_WORLD)?;
        let store = var(ENV_STORE)?;
        let (host, port) = store
            .rsplit_once(':')
            .with_context(|| format!("{ENV_STORE}={store}: expected HOST:PORT"))?;
        Ok(Some(RankEnv {
            rank: rank.parse().with_context(|| format!("{ENV_RANK}={rank}"))?,
            world: world
                .parse()
                .with_context(|| format!("{ENV_WORLD}={world}"))?,
            store_host: host.to_string(),
            store_port: port
                .parse()
                .with_context(|| format!("{ENV_STORE}={store}"))?,
        }))
    }
}

/// Sets up this process's part in a data-parallel stage, before the op
/// runs: a rank started by rank 0 joins its group; the worker the engine
/// started for a stage with `data_parallel` over 1 hosts the store, starts
/// the other ranks and joins them ([`Ranks`], to be finished with the op's
/// result). Also sets each rank's intra-op threads to its share of the stage's.
pub fn start(spec: &StageSpec) -> anyhow::Result<Option<Ranks>> {
    let timeout = timeout();
    if let Some(env) = RankEnv::from_env()? {
        super::test_fault_point_of(env.rank, 0);
        let store = Store::connect(&env.store_host, env.store_port, env.world, timeout)?;
        let group = Group::join(store, env.rank, env.world, HOST, timeout)?;
        tracing::info!(
            rank = env.rank,
            world = env.world,
            "joined the data-parallel group"
        );
        install(group);
        return Ok(None);
    }
    let world = requested_world(&spec.params);
    if world <= 1 {
        return Ok(None);
    }
    // One GPU per rank (NCCL) needs the engine to reserve N GPUs and a
    // NCCL group: not built yet, and nothing here was run on GPUs.
    anyhow::ensure!(
        crate::model::device(&spec.device)? == tch::Device::Cpu,
        "stage `{}`: data_parallel: {world} runs on the CPU only (Gloo); this stage's device `{}` is a GPU, where data parallelism (NCCL) is not supported yet: set `device: cpu` or drop data_parallel",
        spec.stage,
        spec.device
    );
    let threads = threads_per_rank(spec.threads, world);
    tch::set_num_threads(threads as i32);
    let store = Store::host(HOST, 0, world, timeout)
        .with_context(|| format!("stage `{}`: hosting the rendezvous", spec.stage))?;
    tracing::info!(world, store = %store.addr(), threads, "starting data-parallel ranks");
    let mut ranks = Ranks {
        stage: spec.stage.clone(),
        world,
        others: Vec::new(),
    };
    for rank in 1..world {
        let other = ranks.spawn(spec, rank, &store, threads);
        match other {
            Ok(other) => ranks.others.push(other),
            Err(e) => return Err(ranks.fail(e)),
        }
    }
    match ranks.join_watching(store, timeout) {
        Ok(group) => {
            install(group);
            Ok(Some(ranks))
        }
        Err(e) => Err(ranks.fail(e)),
    }
}

/// Intra-op threads per rank: the stage's threads (else the machine's
/// cores) shared among the ranks, so N ranks do not oversubscribe them.
fn threads_per_rank(stage_threads: Option<usize>, world: usize) -> usize {
    let total = stage_threads.unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
    });
    (total / world).max(1)
}

/// A rank other than 0, as rank 0 started it.
struct Other {
    rank: usize,
    child: Child,
    /// The message of the rank's `failed` event, if it sent one.
    failed: Arc<Mutex<Option<String>>>,
    /// Where its copy of the op writes what only rank 0 keeps.
    scratch: PathBuf,
}

/// The other ranks of a data-parallel stage, held by rank 0.
pub struct Ranks {
    stage: String,
    world: usize,
    others: Vec<Other>,
}

impl Ranks {
    /// Starts `rank`: this executable, `run -` with the spec on stdin; its
    /// outputs go to a scratch folder (rank 0 alone writes the stage's),
    /// its stderr (logs) to ours, its stdout events to a reader that keeps
    /// a failure's message.
    fn spawn(
        &self,
        spec: &StageSpec,
        rank: usize,
        store: &Store,
        threads: usize,
    ) -> anyhow::Result<Other> {
        let scratch = spec
            .checkpoint_dir
            .join(format!("data-parallel-rank-{rank}"));
        let _ = std::fs::remove_dir_all(&scratch);
        std::fs::create_dir_all(&scratch)
            .with_context(|| format!("creating {}", scratch.display()))?;
        let mut own = spec.clone();
        own.out_dir = scratch.clone();
        own.threads = Some(threads);
        let exe = std::env::current_exe().context("locating the worker executable")?;
        let mut command = Command::new(&exe);
        command
            .args(["run", "-"])
            .env(ENV_RANK, rank.to_string())
            .env(ENV_WORLD, self.world.to_string())
            .env(ENV_STORE, store.addr())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        // Dies with rank 0, whatever ends it.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = command
            .spawn()
            .with_context(|| format!("starting data-parallel rank {rank}: {}", exe.display()))?;
        let text = serde_json::to_string(&own).context("writing the rank's stage spec")?;
        let mut stdin = child.stdin.take().expect("piped stdin");
        stdin
            .write_all(text.as_bytes())
            .with_context(|| format!("sending rank {rank} its stage spec"))?;
        drop(stdin);
        let failed = Arc::new(Mutex::new(None));
        let stdout = child.stdout.take().expect("piped stdout");
        let keep = failed.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(WorkerEvent::Failed { message }) = WorkerEvent::parse(&line) {
                    *keep.lock().unwrap_or_else(|e| e.into_inner()) = Some(message);
                }
            }
        });
        Ok(Other {
            rank,
            child,
            failed,
            scratch,
        })
    }

    /// Joins the group as rank 0 while watching the other ranks: the join
    /// waits (up to `timeout`) for every rank to arrive, and one that died
    /// on the way never will, so the join runs on its own thread and a dead
    /// rank fails the stage at once. (The abandoned thread ends with the
    /// process, which reports the failure and exits.)
    fn join_watching(&mut self, store: Store, timeout: Duration) -> anyhow::Result<Group> {
        let world = self.world;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(Group::join(store, 0, world, HOST, timeout));
        });
        loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(joined) => return Ok(joined?),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Err(e) => anyhow::bail!("joining the group: {e}"),
            }
            for other in &mut self.others {
                if let Ok(Some(status)) = other.child.try_wait() {
                    anyhow::bail!(
                        "rank 0 of {world}: rank {} ended before joining the group ({status})",
                        other.rank
                    );
                }
            }
        }
    }

    /// The stage's result once rank 0's op returned `result`: on success,
    /// the other ranks must exit cleanly too (within a grace period); on
    /// failure, the error names each rank that failed and how, the
    /// survivors are killed. Scratch folders are removed either way.
    pub fn finish(mut self, result: anyhow::Result<Metrics>) -> anyhow::Result<Metrics> {
        match result {
            Ok(metrics) => {
                let ended = self.wait_all(EXIT_GRACE);
                let bad: Vec<String> = self
                    .others
                    .iter()
                    .zip(&ended)
                    .filter(|(_, how)| !how.as_ref().is_some_and(ExitStatus::success))
                    .map(|(other, how)| self.describe(other, how.as_ref()))
                    .collect();
                self.clean();
                if bad.is_empty() {
                    Ok(metrics)
                } else {
                    anyhow::bail!(
                        "stage `{}`: rank 0 finished but {}",
                        self.stage,
                        bad.join("; ")
                    )
                }
            }
            Err(e) => Err(self.fail(e)),
        }
    }

    /// `e` (rank 0's error), preceded by what became of the other ranks:
    /// those that failed or died first are named; the rest are killed.
    fn fail(&mut self, e: anyhow::Error) -> anyhow::Error {
        // A rank that died made this one fail: give its exit a moment to
        // be observed; ranks blocked in a collective with this one would
        // only time out, so they are not waited for long.
        let ended = self.wait_all(Duration::from_secs(5));
        let mut causes = Vec::new();
        for (other, how) in self.others.iter().zip(&ended) {
            let failed = other
                .failed
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_some();
            if how.as_ref().is_some_and(|s| !s.success()) || failed {
                causes.push(self.describe(other, how.as_ref()));
            }
        }
        self.clean();
        let cause = match causes.is_empty() {
            true => String::new(),
            false => format!("{}; ", causes.join("; ")),
        };
        e.context(format!(
            "stage `{}`: data-parallel training on {} ranks failed: {cause}rank 0 then failed",
            self.stage, self.world
        ))
    }

    /// Waits up to `grace` for every other rank to exit: each with its exit
    /// status, or `None` if it was still running (it is then killed).
    fn wait_all(&mut self, grace: Duration) -> Vec<Option<ExitStatus>> {
        let deadline = Instant::now() + grace;
        let mut statuses: Vec<Option<ExitStatus>> = vec![None; self.others.len()];
        loop {
            for (other, status) in self.others.iter_mut().zip(statuses.iter_mut()) {
                if status.is_none() {
                    *status = other.child.try_wait().ok().flatten();
                }
            }
            if statuses.iter().all(Option::is_some) || Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        for (other, status) in self.others.iter_mut().zip(&statuses) {
            if status.is_none() {
                let _ = other.child.kill();
                let _ = other.child.wait();
            }
        }
        statuses
    }

    /// How rank `other` ended, for an error message.
    fn describe(&self, other: &Other, how: Option<&ExitStatus>) -> String {
        let failed = other
            .failed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let ended = match how {
            None => "did not exit and was killed".to_string(),
            Some(s) => match (s.code(), s.signal()) {
                (_, Some(sig)) => format!("was killed by signal {sig}"),
                (Some(code), _) => format!("exited with status {code}"),
                _ => "ended".to_string(),
            },
        };
        match failed {
            Some(message) => format!("rank {} of {} {ended}: {message}", other.rank, self.world),
            None => format!("rank {} of {} {ended}", other.rank, self.world),
        }
    }

    /// Removes the other ranks' scratch folders.
    fn clean(&self) {
        for other in &self.others {
            let _ = std::fs::remove_dir_all(&other.scratch);
        }
    }
}

impl Drop for Ranks {
    fn drop(&mut self) {
        for other in &mut self.others {
            if other.child.try_wait().ok().flatten().is_none() {
                let _ = other.child.kill();
                let _ = other.child.wait();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_world_comes_from_data_parallel_and_threads_are_shared() {
        assert_eq!(requested_world(&serde_json::json!({"lr": 1e-4})), 1);
        assert_eq!(requested_world(&serde_json::json!({"data_parallel": 2})), 2);
        assert_eq!(threads_per_rank(Some(8), 2), 4);
        assert_eq!(threads_per_rank(Some(1), 2), 1);
    }
}
