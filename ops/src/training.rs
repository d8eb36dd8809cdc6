//! Params shared by every training op (flattened into each op's params, so
//! a manifest writes `lr`, `batch_size`, ... directly under `params:`), and
//! the LoRA block.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The learning-rate decay after warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Decay {
    Cosine,
    Linear,
    Constant,
}

/// Optimisation knobs common to the training ops.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct TrainParams {
    /// Examples per optimizer step (per micro-batch with `grad_accum`).
    #[serde(default = "crate::defaults::batch_size")]
    pub batch_size: usize,
    /// Micro-batches accumulated per optimizer step.
    #[serde(default = "crate::defaults::one")]
    pub grad_accum: usize,
    /// Passes over the data.
    #[serde(default = "crate::defaults::one")]
    pub epochs: usize,
    /// Stop after this many optimizer steps (overrides `epochs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_steps: Option<u64>,
    /// Linear warm-up steps.
    #[serde(default)]
    pub warmup_steps: u64,
    /// Decay after warm-up.
    #[serde(default = "default_decay")]
    pub schedule: Decay,
    /// Final learning rate as a fraction of `lr` (cosine).
    #[serde(default)]
    pub min_lr_ratio: f64,
    /// AdamW's decoupled weight decay (matrices only, not biases or norms).
    #[serde(default)]
    pub weight_decay: f64,
    /// AdamW betas.
    #[serde(default = "default_betas")]
    pub betas: (f64, f64),
    /// AdamW epsilon.
    #[serde(default = "default_eps")]
    pub eps: f64,
    /// Clip the global gradient norm to this (none: no clipping).
    #[serde(default = "default_grad_clip", skip_serializing_if = "Option::is_none")]
    pub grad_clip: Option<f64>,
    /// Save a resumable checkpoint every this many steps (0: only the final model).
    #[serde(default = "default_checkpoint_every")]
    pub checkpoint_every: u64,
    /// Write a metrics line every this many steps.
    #[serde(default = "default_log_every")]
    pub log_every: u64,
    /// bf16 autocast on CUDA (ignored on CPU, where training is float32).
    #[serde(default = "crate::defaults::yes")]
    pub bf16: bool,
}

fn default_decay() -> Decay {
    Decay::Cosine
}
fn default_betas() -> (f64, f64) {
    (0.9, 0.999)
}
fn default_eps() -> f64 {
    1e-8
}
fn default_grad_clip() -> Option<f64> {
    Some(1.0)
}
fn default_checkpoint_every() -> u64 {
    100
}
fn default_log_every() -> u64 {
    1
}

/// LoRA adapters: only they train; `sft` merges them into the exported model.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LoraParams {
    /// Adapter rank.
    #[serde(default = "default_rank")]
    pub rank: i64,
    /// Scaling numerator: the update is `alpha / rank * B A`.
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    /// Dropout on the adapter's input.
    #[serde(default)]
    pub dropout: f64,
    /// Module names to adapt (`q_proj`, `v_proj` for Llama; `c_attn` for GPT-2).
    pub targets: Vec<String>,
}

fn default_rank() -> i64 {
    8
}
fn default_alpha() -> f64 {
    16.0
}
