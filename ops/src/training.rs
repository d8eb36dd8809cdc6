//! Params shared by every training op (flattened into each op's params, so
//! a manifest writes `lr`, `batch_size`, ... directly under `params:`), and
//! the LoRA block.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::op::{require, ParamError, AT_LEAST_ONE};

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
    /// Micro-batches accumulated per optimizer step. Each counts by its
    /// labelled tokens (pairs for pm.* and dpo): the step's loss and
    /// gradient are those of one pass over them all, as with transformers'
    /// and TRL's accumulation. An epoch's last step takes the micro-batches
    /// left, so each epoch is one pass.
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
    /// Save a resumable checkpoint every this many steps (0: only the final
    /// model), and at the next step when SIGUSR1 asks for one (a Slurm job
    /// nearing its time limit).
    #[serde(default = "default_checkpoint_every")]
    pub checkpoint_every: u64,
    /// Write a metrics line every this many steps.
    #[serde(default = "default_log_every")]
    pub log_every: u64,
    /// bf16 autocast on CUDA (ignored on CPU, where training is float32).
    #[serde(default = "crate::defaults::yes")]
    pub bf16: bool,
    /// Recompute each transformer block's activations in backward instead
    /// of keeping them (less memory, about a third more compute). Default:
    /// on for CUDA training of models over 300M parameters, off otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gradient_checkpointing: Option<bool>,
    /// Data-parallel ranks (default: the stage's `resources.gpus` on
    /// `device: cuda`, else 1): this many worker processes train together, each
    /// on its share of every batch (`batch_size` stays the whole batch, so
    /// it must be at least this), their gradients averaged with torch's
    /// c10d collectives after each backward (Gloo on the CPU; NCCL on
    /// GPUs, one GPU per rank, which the engine reserves); rank 0 writes
    /// the outputs. The math is the one-process step's (with dropout on,
    /// each rank draws its own masks); the bits are not (the sums run in
    /// another order), so the value is part of the stage's fingerprint: on
    /// the CPU outputs are reproducible run to run for a fixed value, NCCL's
    /// are not bit for bit. A collective waits at most
    /// `ALIGNFLOW_DIST_TIMEOUT_S` (300) for a peer. Under the Slurm executor
    /// the stage's job has one task per rank (`--ntasks`, and
    /// `--gpus-per-task` on GPUs), started with `srun` on the nodes Slurm
    /// chose.
    #[serde(default = "crate::defaults::one", skip_serializing_if = "is_one")]
    pub data_parallel: usize,
}

impl TrainParams {
    /// Rules every training op applies: a data-parallel rank count of at
    /// least one, and no more ranks than examples in a batch.
    pub fn check(&self) -> Result<(), ParamError> {
        check_data_parallel(
            self.data_parallel,
            self.batch_size,
            "each rank takes a share of every batch",
        )
    }
}

/// `data_parallel: ranks` beside `batch_size`: at least one rank, and at
/// least one item of every batch per rank (`share`: what a rank takes).
pub fn check_data_parallel(ranks: usize, batch_size: usize, share: &str) -> Result<(), ParamError> {
    require(
        ranks >= 1,
        "data_parallel",
        "`data_parallel` must be at least 1 (one process)",
    )?;
    require(
        batch_size >= ranks,
        "data_parallel",
        format!(
            "`data_parallel: {ranks}` needs `batch_size` of at least {ranks} ({share}), got {batch_size}"
        ),
    )
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

/// The data-parallel ranks a stage's params ask for: `data_parallel`, 1
/// when absent (every op but the training ones). One reading for the
/// worker, which starts that many ranks, and for the Slurm executor, which
/// asks for that many tasks.
pub fn data_parallel_ranks(params: &serde_json::Value) -> usize {
    params
        .get("data_parallel")
        .and_then(serde_json::Value::as_u64)
        .map_or(1, |n| n.max(1) as usize)
}

/// For `skip_serializing_if`: `data_parallel: 1` (one process) is left out
/// of the normalised params, so stages written before it keep their
/// fingerprints.
pub(crate) fn is_one(n: &usize) -> bool {
    *n == 1
}

/// For `skip_serializing_if`: a flag at its default is left out of the
/// normalised params, so stages written before the flag keep their
/// fingerprints.
pub(crate) fn is_true(b: &bool) -> bool {
    *b
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
    /// Which linear modules get adapters: a list of module names (the last
    /// path component: `q_proj`, `c_attn`), or `all-linear` (every linear
    /// layer but the LM head). Default, as PEFT's per-architecture table:
    /// GPT-2 `[c_attn]`; Llama, Mistral, Qwen2 `[q_proj, v_proj]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub targets: Option<LoraTargets>,
}

impl LoraParams {
    /// A rank of at least 1 (rank 0 divides by zero: a NaN loss at step
    /// 1), a positive alpha, a dropout in [0, 1). `field`: `lora`.
    pub fn check(&self, field: &str) -> Result<(), ParamError> {
        require(self.rank >= 1, &format!("{field}.rank"), AT_LEAST_ONE)?;
        require(
            self.alpha.is_finite() && self.alpha > 0.0,
            &format!("{field}.alpha"),
            "must be a positive number",
        )?;
        require(
            (0.0..1.0).contains(&self.dropout),
            &format!("{field}.dropout"),
            "must be in [0, 1)",
        )
    }
}

/// [`LoraParams::check`] of an optional `lora`.
pub fn check_lora(lora: &Option<LoraParams>, field: &str) -> Result<(), ParamError> {
    lora.as_ref().map_or(Ok(()), |l| l.check(field))
}

/// The modules `lora.targets` names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum LoraTargets {
    /// A named set of modules.
    Named(NamedTargets),
    /// Module names (the last path component).
    Modules(Vec<String>),
}

/// Named sets of LoRA targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum NamedTargets {
    /// Every linear layer of the transformer blocks (not the LM head).
    #[serde(rename = "all-linear")]
    AllLinear,
}

fn default_rank() -> i64 {
    8
}
fn default_alpha() -> f64 {
    16.0
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use crate::{find, REGISTRY};

    /// `lora.targets`: a list, `all-linear`, or nothing (the family's
    /// default, chosen by the worker); a list normalises to itself, so
    /// stages written before the default existed keep their fingerprints.
    #[test]
    fn lora_targets_take_a_list_all_linear_or_nothing() {
        let sft = find("sft").unwrap();
        let v = sft
            .normalize_params(&json!({"lora": {"targets": ["q_proj", "v_proj"]}}))
            .unwrap();
        assert_eq!(v["lora"]["targets"], json!(["q_proj", "v_proj"]));
        let v = sft
            .normalize_params(&json!({"lora": {"targets": "all-linear"}}))
            .unwrap();
        assert_eq!(v["lora"]["targets"], json!("all-linear"));
        let v = sft.normalize_params(&json!({"lora": {}})).unwrap();
        assert!(v["lora"].get("targets").is_none(), "{v}");
        let err = sft
            .normalize_params(&json!({"lora": {"targets": "every-linear"}}))
            .unwrap_err();
        assert_eq!(err.field, "lora.targets", "{err:?}");
    }

    /// Dropout defaults follow TRL: the model's own for SFT, off for reward
    /// modelling, DPO and PPO. Defaults that are today's behaviour stay out
    /// of the normalised params (unchanged fingerprints); the PM's new
    /// default is a change, so it is written (and the op version bumped).
    #[test]
    fn dropout_defaults_follow_trl() {
        let normalized = |op: &str| find(op).unwrap().normalize_params(&json!({})).unwrap();
        assert!(normalized("sft").get("dropout").is_none());
        assert_eq!(normalized("dpo")["dropout"], json!(false));
        assert_eq!(normalized("pm.train")["dropout"], json!(false));
        assert_eq!(normalized("pm.pretrain")["dropout"], json!(false));
        // Version 2 brought the dropout default, 3 the chat templates, 4
        // the BOS kept when a prompt is cut, 5 the reward read at a chat
        // turn's end and one prompt cut per pair.
        assert_eq!(find("pm.train").unwrap().version, 5);
        let v = find("sft")
            .unwrap()
            .normalize_params(&json!({"dropout": false}))
            .unwrap();
        assert_eq!(v["dropout"], json!(false));
        // PPO's default is off and left out of its params (unchanged
        // fingerprints); turned on, it is written.
        assert!(normalized("ppo").get("dropout").is_none());
        let v = find("ppo")
            .unwrap()
            .normalize_params(&json!({"dropout": true}))
            .unwrap();
        assert_eq!(v["dropout"], json!(true));
    }

    /// Every training op states its conventions, dropout included, in
    /// `alignflow ops NAME`.
    #[test]
    fn training_ops_state_their_conventions() {
        for name in [
            "sft",
            "lm.pretrain",
            "pm.pretrain",
            "pm.train",
            "dpo",
            "ppo",
        ] {
            let op = REGISTRY.iter().find(|o| o.name == name).unwrap();
            assert!(
                op.conventions.iter().any(|c| c.starts_with("dropout:")),
                "{name} says nothing about dropout"
            );
            let text = crate::describe(name).unwrap();
            assert!(text.contains("conventions:\n"), "{text}");
            for line in op.conventions {
                assert!(text.contains(line), "{name}: {line}");
            }
        }
    }
}
