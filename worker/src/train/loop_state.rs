//! What a resumable training loop needs besides weights and optimizer state:
//! the loop counters ([`TrainState`]), a per-epoch seeded shuffle of example
//! indices computed in Rust, and a torch seed per optimizer step.
//!
//! Nothing here depends on libtorch's RNG state (which tch cannot save):
//! the data order is a pure function of `(seed, epoch)` and torch is
//! reseeded from `(seed, step)` before every optimizer step, so dropout and
//! sampling after a resume are those of an uninterrupted run.

use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// The counters of a training loop, saved as JSON in each checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimizer steps taken.
    pub step: u64,
    /// The current epoch (0-based).
    pub epoch: u64,
    /// Position in this epoch's shuffled order: examples before it are used.
    pub cursor: u64,
    /// Training tokens consumed so far (for metrics and token budgets).
    pub tokens_seen: u64,
}

impl TrainState {
    /// The indices of the next `batch_size` examples out of `len`, in the
    /// shuffled order of the current epoch, advancing `cursor` (and `epoch`
    /// when one ends: a batch never straddles two epochs, so the last batch
    /// of an epoch may be short). Empty only when `len` is 0.
    pub fn next_batch(&mut self, len: usize, batch_size: usize, seed: u64) -> Vec<usize> {
        if len == 0 || batch_size == 0 {
            return Vec::new();
        }
        if self.cursor as usize >= len {
            self.epoch += 1;
            self.cursor = 0;
        }
        // Recomputed per batch to keep the state plain data; O(len) is noise
        // beside a training step. Cache `epoch_permutation` for huge sets.
        let order = epoch_permutation(len, seed, self.epoch);
        let start = self.cursor as usize;
        let end = (start + batch_size).min(len);
        self.cursor = end as u64;
        order[start..end].to_vec()
    }
}

/// A permutation of `0..len` for `epoch`, a pure function of `(seed, epoch)`:
/// ChaCha8 seeded with `seed`, stream `epoch`, driving a Fisher–Yates
/// shuffle written out here (not `rand`'s `shuffle`, whose algorithm may
/// change between releases and would silently change data orders).
pub fn epoch_permutation(len: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(epoch);
    let mut order: Vec<usize> = (0..len).collect();
    for i in (1..len).rev() {
        let j = uniform_below(&mut rng, i as u64 + 1) as usize;
        order.swap(i, j);
    }
    order
}

/// A uniform draw from `0..n` (n > 0) without modulo bias (rejection).
fn uniform_below(rng: &mut ChaCha8Rng, n: u64) -> u64 {
    let zone = u64::MAX - u64::MAX % n;
    loop {
        let x = rng.next_u64();
        if x < zone {
            return x % n;
        }
    }
}

/// The torch seed for optimizer step `step` of a run seeded `base_seed`:
/// SplitMix64 of the pair, so nearby steps and seeds give unrelated streams.
/// Non-negative, as `tch::manual_seed` takes an `i64`.
pub fn step_seed(base_seed: u64, step: u64) -> i64 {
    let mut z = base_seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 1) as i64
}

/// The seed of data-parallel rank `rank`'s random draws (dropout): rank
/// 0's is `base_seed`, as one process's; each other rank's is its own, so
/// the ranks' masks are as independent as one process's rows'.
pub fn rank_seed(base_seed: u64, rank: usize) -> u64 {
    match rank {
        0 => base_seed,
        r => step_seed(base_seed ^ 0x5241_4E4B, r as u64) as u64,
    }
}

/// Seeds torch (CPU and all CUDA devices) for optimizer step `step`; call it
/// before the forward passes of every step.
pub fn seed_torch_for_step(base_seed: u64, step: u64) {
    tch::manual_seed(step_seed(base_seed, step));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_rank_draws_from_its_own_seed() {
        assert_eq!(rank_seed(7, 0), 7);
        let seeds: std::collections::BTreeSet<u64> = (0..8).map(|r| rank_seed(7, r)).collect();
        assert_eq!(seeds.len(), 8);
        assert_eq!(rank_seed(7, 3), rank_seed(7, 3));
    }

    #[test]
    fn permutations_are_deterministic_and_differ_per_epoch() {
        let a = epoch_permutation(100, 7, 0);
        assert_eq!(a, epoch_permutation(100, 7, 0));
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..100).collect::<Vec<_>>());
        assert_ne!(a, epoch_permutation(100, 7, 1));
        assert_ne!(a, epoch_permutation(100, 8, 0));
        assert_ne!(a, (0..100).collect::<Vec<_>>());
        // Pinned: a change here changes every run's data order.
        assert_eq!(epoch_permutation(8, 42, 0), PINNED);
    }
    const PINNED: [usize; 8] = [5, 3, 2, 6, 7, 4, 0, 1];

    #[test]
    fn batches_cover_each_epoch_once_and_resume() {
        let mut s = TrainState::default();
        let mut seen = Vec::new();
        while s.epoch == 0 {
            let b = s.next_batch(10, 4, 3);
            if s.epoch == 0 {
                seen.extend(b);
            }
        }
        assert_eq!(seen, epoch_permutation(10, 3, 0));
        // Batch sizes were 4, 4, 2; then epoch 1 starts.
        let json = serde_json::to_string(&s).unwrap();
        let mut resumed: TrainState = serde_json::from_str(&json).unwrap();
        assert_eq!(resumed.next_batch(10, 4, 3), s.next_batch(10, 4, 3));
        assert_eq!(s, resumed);
        assert_eq!((s.epoch, s.cursor), (1, 8));
    }

    // No test draws from torch after seeding: tests share one process and
    // torch's global generator, so such a test would race with others.
    #[test]
    fn step_seeds_are_pinned_and_spread() {
        assert_ne!(step_seed(1, 0), step_seed(1, 1));
        assert_ne!(step_seed(1, 0), step_seed(2, 0));
        assert!(step_seed(u64::MAX, u64::MAX) >= 0);
        assert_eq!(step_seed(5, 17), 6488194038378096657);
    }
}
