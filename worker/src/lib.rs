//! The libtorch side of alignflow: transformer models, sampling, training
//! utilities and the tensor ops the `alignflow-worker` binary runs.

pub mod allocator;
pub mod cuda_memory;
pub mod dist;
pub mod model;
pub mod ops;
pub mod rl;
mod shim;
pub mod train;

#[cfg(test)]
mod testing;
