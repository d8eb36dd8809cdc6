//! Test support shared by the crate's unit tests.

use std::sync::{Mutex, MutexGuard};

static TORCH_RNG: Mutex<()> = Mutex::new(());

/// Holds torch's process-global random generator for one test. Tests run
/// on parallel threads of one process, and a test that seeds the generator
/// (or draws from it: random init, `randn`, shuffles) and expects its
/// draws to repeat fails at random when another test reseeds or draws in
/// between. Every unit test that touches the generator takes this first.
/// (A stage worker runs one stage per process: no such race there.)
pub(crate) fn torch_rng() -> MutexGuard<'static, ()> {
    // A failed test poisons the lock; the generator is fine.
    TORCH_RNG
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
