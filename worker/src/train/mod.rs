//! Training infrastructure shared by the training ops (LM pretraining, SFT,
//! reward models, PPO): AdamW with state we own, learning-rate schedules,
//! gradient clipping and accumulation, resumable loop state with seeded
//! shuffling, and atomic checkpoints. Every piece works on a `VarStore` or on
//! named trainable tensors and knows nothing of the models.

mod optim;

pub use optim::{trainable_named, AdamW, AdamWConfig, AdamWImpl, OptimError};
