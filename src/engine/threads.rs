//! CPU threads for tensor stages. libtorch takes every core by default, so
//! with `--jobs` running several tensor stages at once each one spun on
//! all cores and they slowed each other down several-fold (PPO 120-166 s
//! against 12-14 s with one thread each, on two cores).
//!
//! The cores are a pool, as Snakemake's `--cores` is: a CPU tensor stage
//! holds as many cores as it runs threads, so stages only run side by side
//! while their threads fit. A stage's thread count never depends on what
//! else happens to be running: float reductions depend on the thread
//! count, and one fingerprint must give the same bytes whether its stage
//! ran alone (`--target`) or beside others.
//!
//! Engines started side by side on the same cores share them too: each core
//! is also a lock file in a folder of the temp dir named by the user and the
//! set of CPUs the engine may run on (node-local on a cluster, as the cores
//! are; two Slurm jobs with disjoint CPU sets do not wait for each other),
//! and a stage holds its cores' files while it runs.

use std::fs::{File, OpenOptions, TryLockError};
use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::{Semaphore, SemaphorePermit};
use tokio_util::sync::CancellationToken;

use super::Error;

/// How often a stage waiting for another engine's cores looks again.
const MACHINE_POLL: Duration = Duration::from_millis(100);

/// The machine's cores, shared out among the CPU tensor stages.
pub(super) struct CorePool {
    /// `--threads` / `ALIGNFLOW_THREADS`: the same count for every stage.
    requested: Option<usize>,
    cores: usize,
    /// GPU slots of the machine: the cores are divided among them.
    gpu_slots: usize,
    free: Semaphore,
    /// The machine's core locks; `None` where their folder cannot be made.
    machine: Option<MachineCores>,
}

/// The cores a running stage holds, in this engine and on the machine.
pub(super) struct Cores<'a> {
    _permit: SemaphorePermit<'a>,
    _locks: Vec<File>,
}

/// The CPUs this process may run on (its affinity mask), as text.
fn allowed_cpus() -> String {
    // SAFETY: a zeroed cpu_set_t is a valid empty set, and the call writes
    // at most its size into it.
    let set = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return String::from("unknown");
        }
        set
    };
    (0..libc::CPU_SETSIZE as usize)
        // SAFETY: `cpu` is below CPU_SETSIZE.
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
        .map(|cpu| cpu.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// One lock file per core, shared by the engines of one user on one CPU set.
struct MachineCores {
    dir: PathBuf,
}

impl MachineCores {
    fn open() -> Option<MachineCores> {
        // SAFETY: getuid cannot fail and has no side effects.
        let uid = unsafe { libc::getuid() };
        let cpus = blake3::hash(allowed_cpus().as_bytes()).to_hex();
        let dir = std::env::temp_dir().join(format!("alignflow-cores-{uid}-{}", &cpus[..12]));
        match std::fs::create_dir_all(&dir) {
            Ok(()) => Some(MachineCores { dir }),
            Err(e) => {
                tracing::debug!("no machine-wide core locks in {}: {e}", dir.display());
                None
            }
        }
    }

    /// `n` of the `cores` locks if that many are free now (all or none).
    fn try_take(&self, n: usize, cores: usize) -> std::io::Result<Option<Vec<File>>> {
        let mut held = Vec::with_capacity(n);
        for i in 0..cores {
            if held.len() == n {
                break;
            }
            let file = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(self.dir.join(format!("core-{i}.lock")))?;
            match file.try_lock() {
                Ok(()) => held.push(file),
                Err(TryLockError::WouldBlock) => {}
                Err(TryLockError::Error(e)) => return Err(e),
            }
        }
        // Short: the partial claim drops, so no engine sits on half a claim.
        Ok((held.len() == n).then_some(held))
    }
}

impl CorePool {
    pub fn new(requested: Option<usize>, gpu_slots: usize) -> CorePool {
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        CorePool::with_cores(requested, cores, gpu_slots)
    }

    fn with_cores(requested: Option<usize>, cores: usize, gpu_slots: usize) -> CorePool {
        CorePool {
            requested,
            cores,
            gpu_slots,
            free: Semaphore::new(cores),
            machine: MachineCores::open(),
        }
    }

    /// Threads of a tensor stage: `--threads` when given; else every core
    /// on the CPU, or a GPU slot's even share of them (its threads only
    /// feed the device, and GPU stages must not wait for CPU ones).
    pub fn threads(&self, on_gpu: bool) -> usize {
        threads_per_stage(self.requested, self.cores, on_gpu.then_some(self.gpu_slots))
    }

    /// Waits until `threads` cores are free (all of them when it asks for
    /// more), in this engine and then on the machine, and holds them until
    /// the claim drops.
    pub async fn acquire(
        &self,
        threads: usize,
        cancel: &CancellationToken,
    ) -> Result<Cores<'_>, Error> {
        let wanted = threads.clamp(1, self.cores);
        let permit = tokio::select! {
            permit = self.free.acquire_many(wanted as u32) => permit.expect("pool open"),
            _ = cancel.cancelled() => return Err(Error::Cancelled),
        };
        let Some(machine) = &self.machine else {
            return Ok(Cores {
                _permit: permit,
                _locks: Vec::new(),
            });
        };
        loop {
            match machine.try_take(wanted, self.cores) {
                Ok(Some(locks)) => {
                    return Ok(Cores {
                        _permit: permit,
                        _locks: locks,
                    })
                }
                Ok(None) => {}
                Err(e) => {
                    // Never let a broken lock folder stop a run.
                    tracing::debug!("machine-wide core locks skipped: {e}");
                    return Ok(Cores {
                        _permit: permit,
                        _locks: Vec::new(),
                    });
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(MACHINE_POLL) => {}
                _ = cancel.cancelled() => return Err(Error::Cancelled),
            }
        }
    }
}

/// `requested` when given; else all `cores` for a CPU stage, or the cores
/// divided among the `gpu_slots` for a GPU stage; never below 1.
fn threads_per_stage(requested: Option<usize>, cores: usize, gpu_slots: Option<usize>) -> usize {
    if let Some(n) = requested {
        return n.max(1);
    }
    match gpu_slots {
        None => cores.max(1),
        Some(slots) => (cores / slots.max(1)).max(1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_stages_take_every_core_and_gpu_stages_a_slots_share() {
        assert_eq!(threads_per_stage(None, 8, None), 8);
        assert_eq!(threads_per_stage(None, 16, Some(4)), 4);
        // More slots than cores: one thread each, never zero.
        assert_eq!(threads_per_stage(None, 2, Some(8)), 1);
        assert_eq!(threads_per_stage(None, 0, None), 1);
    }

    #[test]
    fn threads_flag_wins() {
        assert_eq!(threads_per_stage(Some(3), 8, None), 3);
        assert_eq!(threads_per_stage(Some(3), 8, Some(2)), 3);
        assert_eq!(threads_per_stage(Some(0), 8, None), 1);
    }

    /// A pool of `cores` whose machine-wide locks live in `dir`.
    fn pool_in(dir: &std::path::Path, requested: Option<usize>, cores: usize) -> CorePool {
        CorePool {
            machine: Some(MachineCores {
                dir: dir.to_path_buf(),
            }),
            ..CorePool::with_cores(requested, cores, 1)
        }
    }

    #[tokio::test]
    async fn two_engines_on_one_machine_share_its_cores() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (pool_in(dir.path(), None, 2), pool_in(dir.path(), None, 2));
        let cancel = CancellationToken::new();
        let held = a.acquire(2, &cancel).await.unwrap();
        // Engine B's stage waits while A's holds every core...
        let waiting = tokio::time::timeout(Duration::from_millis(400), b.acquire(1, &cancel));
        assert!(waiting.await.is_err(), "B ran beside A on busy cores");
        // ...and starts once they are free.
        drop(held);
        let got = tokio::time::timeout(Duration::from_secs(5), b.acquire(2, &cancel)).await;
        assert!(got.is_ok_and(|c| c.is_ok()));
    }

    #[tokio::test]
    async fn stages_run_side_by_side_only_while_their_threads_fit() {
        let dir = tempfile::tempdir().unwrap();
        let pool = pool_in(dir.path(), Some(2), 4);
        let cancel = CancellationToken::new();
        let threads = pool.threads(false);
        let a = pool.acquire(threads, &cancel).await.unwrap();
        let b = pool.acquire(threads, &cancel).await.unwrap();
        // A third two-thread stage waits for one of them.
        assert!(pool.free.try_acquire_many(2).is_err());
        drop(a);
        let c = pool.acquire(threads, &cancel).await.unwrap();
        drop((b, c));
        // Asking for more threads than cores holds them all, not forever.
        let all = pool.acquire(64, &cancel).await.unwrap();
        assert_eq!(pool.free.available_permits(), 0);
        drop(all);
        assert_eq!(pool.free.available_permits(), 4);
    }

    #[tokio::test]
    async fn a_waiting_stage_is_cancelled() {
        let dir = tempfile::tempdir().unwrap();
        let pool = pool_in(dir.path(), None, 2);
        let cancel = CancellationToken::new();
        let _held = pool.acquire(2, &cancel).await.unwrap();
        cancel.cancel();
        assert!(matches!(
            pool.acquire(1, &cancel).await,
            Err(Error::Cancelled)
        ));
    }
}
