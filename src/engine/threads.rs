//! CPU threads for tensor stages. libtorch takes every core by default, so
//! with `--jobs` running several tensor stages at once each one spun on
//! all cores and they slowed each other down several-fold (PPO 120-166 s
//! against 12-14 s with one thread each, on two cores). The cores are
//! divided among the tensor stages that want to run at once instead;
//! `--threads N` still gives each stage exactly N.

use std::sync::atomic::{AtomicUsize, Ordering};

/// The engine's share-out of CPU threads among its tensor stages.
pub(super) struct ThreadShare {
    /// `--threads` / `ALIGNFLOW_THREADS`: the same count for every stage.
    requested: Option<usize>,
    cores: usize,
    /// `--jobs`: no more stages than this run at once.
    jobs: usize,
    /// Tensor stages started and not yet finished, running or waiting for
    /// a slot: those that will run beside a stage starting now.
    contending: AtomicUsize,
}

/// A tensor stage's claim on the cores, given up when dropped.
pub(super) struct Claim<'a>(&'a AtomicUsize);

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl ThreadShare {
    pub fn new(requested: Option<usize>, jobs: usize) -> ThreadShare {
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        ThreadShare {
            requested,
            cores,
            jobs,
            contending: AtomicUsize::new(0),
        }
    }

    /// Registers a tensor stage before it waits for its slots, so a stage
    /// that starts first already leaves room for those starting with it.
    pub fn claim(&self) -> Claim<'_> {
        self.contending.fetch_add(1, Ordering::SeqCst);
        Claim(&self.contending)
    }

    /// Threads for a tensor stage starting now (it holds a claim).
    pub fn threads(&self) -> usize {
        threads_per_stage(
            self.requested,
            self.cores,
            self.jobs,
            self.contending.load(Ordering::SeqCst),
        )
    }
}

/// `requested` when given, else the `cores` divided among the tensor stages
/// that run at once: the `contending` ones, at most `jobs`; never below 1.
pub(super) fn threads_per_stage(
    requested: Option<usize>,
    cores: usize,
    jobs: usize,
    contending: usize,
) -> usize {
    if let Some(n) = requested {
        return n.max(1);
    }
    let at_once = contending.min(jobs).max(1);
    (cores / at_once).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cores_are_divided_among_the_stages_that_run_at_once() {
        // Alone: every core.
        assert_eq!(threads_per_stage(None, 8, 4, 1), 8);
        // Two at once: half each; an odd core goes unused, not oversubscribed.
        assert_eq!(threads_per_stage(None, 8, 4, 2), 4);
        assert_eq!(threads_per_stage(None, 8, 4, 3), 2);
        // More stages waiting than --jobs lets run: divided by --jobs.
        assert_eq!(threads_per_stage(None, 8, 2, 6), 4);
        // More stages than cores: one thread each, never zero.
        assert_eq!(threads_per_stage(None, 2, 8, 5), 1);
        assert_eq!(threads_per_stage(None, 1, 1, 0), 1);
    }

    #[test]
    fn threads_flag_wins() {
        assert_eq!(threads_per_stage(Some(3), 8, 4, 4), 3);
        assert_eq!(threads_per_stage(Some(0), 8, 4, 4), 1);
    }

    #[test]
    fn a_claim_counts_until_dropped() {
        let share = ThreadShare {
            requested: None,
            cores: 8,
            jobs: 8,
            contending: AtomicUsize::new(0),
        };
        let a = share.claim();
        assert_eq!(share.threads(), 8);
        let b = share.claim();
        assert_eq!(share.threads(), 4);
        drop(a);
        assert_eq!(share.threads(), 8);
        drop(b);
    }
}
