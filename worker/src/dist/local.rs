//! Ranks 1..N of a data-parallel stage as child processes of rank 0 on its
//! own machine (how the local executor runs a stage): copies of this
//! executable, `run -` with the spec on stdin and the rank, the world size
//! and the store's address in the environment. They meet on 127.0.0.1 and
//! die with rank 0 (`PR_SET_PDEATHSIG`), whatever ends it.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;

use alignflow_ops::protocol::{StageSpec, WorkerEvent};

use super::launch::{
    die_with_parent, fresh_scratch, rank_spec, Backend, ENV_RANK, ENV_STORE, ENV_WORLD,
};
use super::Store;

/// The address every local rank binds and meets on.
pub const HOST: &str = "127.0.0.1";

/// A rank other than 0, as rank 0 started it.
struct Other {
    rank: usize,
    child: Child,
    /// The message of the rank's `failed` event, if it sent one.
    failed: Arc<Mutex<Option<String>>>,
    /// Where its copy of the op writes what only rank 0 keeps.
    scratch: PathBuf,
}

/// Ranks 1..N as rank 0's children.
pub struct LocalRanks {
    world: usize,
    backend: Backend,
    others: Vec<Other>,
}

impl LocalRanks {
    /// None started yet.
    pub fn new(world: usize, backend: Backend) -> LocalRanks {
        LocalRanks {
            world,
            backend,
            others: Vec::new(),
        }
    }

    /// Starts ranks 1..N; those started before one failed to are held
    /// (and killed on drop).
    pub fn spawn_all(
        &mut self,
        spec: &StageSpec,
        store: &Store,
        threads: usize,
    ) -> anyhow::Result<()> {
        (1..self.world).try_for_each(|rank| self.spawn(spec, rank, store, threads))
    }

    /// Starts `rank`: this executable, `run -` with the spec on stdin; its
    /// outputs go to a scratch folder (rank 0 alone writes the stage's),
    /// its stderr (logs) to ours, its stdout events to a reader that keeps
    /// a failure's message.
    fn spawn(
        &mut self,
        spec: &StageSpec,
        rank: usize,
        store: &Store,
        threads: usize,
    ) -> anyhow::Result<()> {
        let scratch = fresh_scratch(&spec.checkpoint_dir, rank)?;
        // On GPUs, the rank's own run of the stage's GPUs.
        let mut own = rank_spec(spec, rank, self.backend);
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
        die_with_parent(&mut command, libc::SIGKILL);
        let mut child = command
            .spawn()
            .with_context(|| format!("starting data-parallel rank {rank}: {}", exe.display()))?;
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
        let mut stdin = child.stdin.take().expect("piped stdin");
        // Held from here on, so a failed send still kills the child on drop.
        self.others.push(Other {
            rank,
            child,
            failed,
            scratch,
        });
        let text = serde_json::to_string(&own).context("writing the rank's stage spec")?;
        stdin
            .write_all(text.as_bytes())
            .with_context(|| format!("sending rank {rank} its stage spec"))?;
        Ok(())
    }

    /// How a rank ended before the group formed, if one did.
    pub fn ended_early(&mut self) -> Option<String> {
        self.others.iter_mut().find_map(|other| {
            let status = other.child.try_wait().ok().flatten()?;
            Some(format!(
                "rank {} ended before joining the group ({status})",
                other.rank
            ))
        })
    }

    /// Whether a rank has exited other than cleanly (it stays waitable:
    /// its status is kept for [`LocalRanks::settle`]).
    pub fn ended_badly(&mut self) -> bool {
        self.others.iter_mut().any(|other| {
            other
                .child
                .try_wait()
                .ok()
                .flatten()
                .is_some_and(|status| !status.success())
        })
    }

    /// Waits up to `grace` for every rank to exit (the rest are killed) and
    /// describes those that failed: after rank 0 succeeded, any that did not
    /// exit cleanly; after rank 0 failed, those that failed or died (a rank
    /// killed here was waiting for rank 0, not the cause).
    pub fn settle(&mut self, grace: Duration, rank_0_ok: bool) -> Vec<String> {
        let ended = self.wait_all(grace);
        let mut failures = Vec::new();
        for (other, how) in self.others.iter().zip(&ended) {
            let failed = other
                .failed
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_some();
            let bad = match rank_0_ok {
                true => !how.as_ref().is_some_and(ExitStatus::success),
                false => how.as_ref().is_some_and(|s| !s.success()) || failed,
            };
            if bad {
                failures.push(self.describe(other, how.as_ref()));
            }
        }
        failures
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

    /// Removes the ranks' scratch folders.
    pub fn clean(&self) {
        for other in &self.others {
            let _ = std::fs::remove_dir_all(&other.scratch);
        }
    }
}

impl Drop for LocalRanks {
    fn drop(&mut self) {
        for other in &mut self.others {
            if other.child.try_wait().ok().flatten().is_none() {
                let _ = other.child.kill();
                let _ = other.child.wait();
            }
        }
    }
}
