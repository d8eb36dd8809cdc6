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

use tokio::sync::{Semaphore, SemaphorePermit};
use tokio_util::sync::CancellationToken;

use super::Error;

/// The machine's cores, shared out among the CPU tensor stages.
pub(super) struct CorePool {
    /// `--threads` / `ALIGNFLOW_THREADS`: the same count for every stage.
    requested: Option<usize>,
    cores: usize,
    /// GPU slots of the machine: the cores are divided among them.
    gpu_slots: usize,
    free: Semaphore,
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
        }
    }

    /// Threads of a tensor stage: `--threads` when given; else every core
    /// on the CPU, or a GPU slot's even share of them (its threads only
    /// feed the device, and GPU stages must not wait for CPU ones).
    pub fn threads(&self, on_gpu: bool) -> usize {
        threads_per_stage(self.requested, self.cores, on_gpu.then_some(self.gpu_slots))
    }

    /// Waits until `threads` cores are free (all of them when it asks for
    /// more) and holds them until the permit drops.
    pub async fn acquire(
        &self,
        threads: usize,
        cancel: &CancellationToken,
    ) -> Result<SemaphorePermit<'_>, Error> {
        let wanted = threads.clamp(1, self.cores) as u32;
        tokio::select! {
            permit = self.free.acquire_many(wanted) => Ok(permit.expect("pool open")),
            _ = cancel.cancelled() => Err(Error::Cancelled),
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

    #[tokio::test]
    async fn stages_run_side_by_side_only_while_their_threads_fit() {
        let pool = CorePool::with_cores(Some(2), 4, 1);
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
        let pool = CorePool::with_cores(None, 2, 1);
        let cancel = CancellationToken::new();
        let _held = pool.acquire(2, &cancel).await.unwrap();
        cancel.cancel();
        assert!(matches!(pool.acquire(1, &cancel).await, Err(Error::Cancelled)));
    }
}
