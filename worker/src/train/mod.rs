//! Training infrastructure shared by the training ops (LM pretraining, SFT,
//! reward models, PPO): AdamW with state we own, learning-rate schedules,
//! gradient clipping and accumulation, resumable loop state with seeded
//! shuffling, atomic checkpoints, and a small [`Trainer`] tying them
//! together. Every piece works on a `VarStore` or on named trainable tensors
//! and knows nothing of the models.

// The re-exports are the API for the training ops; until those land, the
// binary uses none of them.
#![allow(unused_imports)]

mod accumulate;
mod checkpoint;
mod clip;
mod loop_state;
mod optim;
mod schedule;
mod trainer;

pub use accumulate::{accumulate, scale_gradients, Accumulated, MicroBatch};
pub use checkpoint::{
    latest, load_checkpoint, load_checkpoint_parts, CheckpointError, CheckpointPart,
    CheckpointPartMut, CheckpointState, Checkpoints,
};
pub use clip::clip_grad_norm;
pub use loop_state::{epoch_permutation, seed_torch_for_step, step_seed, TrainState};
pub use optim::{trainable_named, AdamW, AdamWConfig, AdamWImpl, OptimError};
pub use schedule::{Decay, Schedule, ScheduleConfig};
pub use trainer::{per_second, StepMetrics, Trainer, TrainerConfig};

/// Runs `f` under bf16 autocast when `on`, else plainly. tch's
/// `autocast(false, f)` still toggles libtorch's (deprecated) global
/// autocast state, which prints a warning per call on CUDA builds.
pub fn autocast_if<T>(on: bool, f: impl FnOnce() -> T) -> T {
    if on {
        tch::autocast(true, f)
    } else {
        f()
    }
}
