//! `pm.train` and `pm.pretrain`: preference models (a transformer with a
//! scalar reward head) trained with the soft-label Bradley-Terry loss
//! `-(p*logsig(rA - rB) + (1-p)*logsig(rB - rA))` (docs/DESIGN.md §1, step 4).
//!
//! `pm.pretrain` (PMP) trains on generic ranked comparisons; `pm.train` on
//! the comparisons of a pipeline (human HH records, AI-feedback records with
//! soft labels, or both, weighted by `mix`). Both evaluate on held-out pairs
//! and write the figures to `eval`. The tensor code is in the worker
//! (`alignflow-worker`, `ops/pm.rs`).
use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::chat_format::{ChatTemplateChoice, CHAT_TEMPLATE_INPUT, CHAT_TRAINING_CONVENTION};
use crate::op::require;
use crate::training::{LoraParams, TrainParams};
use crate::{OpDecl, OpParams, Outputs, ParamError, ParamsDecl, Placement, Port};

/// The inputs of `pm.train` that hold training comparisons (the keys `mix`
/// may name).
pub const PM_TRAIN_SETS: [&str; 2] = ["comparisons", "extra"];

/// What `pm.train` and `pm.pretrain` share (flattened into both).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct PmParams {
    /// Peak learning rate.
    #[serde(default = "default_lr")]
    pub lr: f64,
    /// Dropout (the checkpoint's own rates, and LoRA's) in the training
    /// forwards. Off by default, as TRL's RewardTrainer disables it: the
    /// reward is then the same function at training and at scoring time.
    #[serde(default)]
    pub dropout: bool,
    /// Longest sequence (prompt + response + EOS) in tokens: the prompt's
    /// beginning is dropped first, then the response's end (the EOS stays).
    #[serde(default = "crate::defaults::max_len")]
    pub max_len: i64,
    /// Append the EOS token to every response, so the reward is read on the
    /// same token type at the end of every sequence.
    #[serde(default = "crate::defaults::yes")]
    pub append_eos: bool,
    /// Chat template: `auto` renders each example as a conversation with
    /// the `chat_template` input's template, else the model's own, else
    /// plain text; `none` always uses plain text.
    #[serde(default, skip_serializing_if = "ChatTemplateChoice::is_auto")]
    pub chat_template: ChatTemplateChoice,
    /// Variables for the chat template beside the conversation, as
    /// transformers' `apply_chat_template` keyword arguments (Qwen3's
    /// `enable_thinking: false`, Llama 3.2's `date_string`).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub chat_template_kwargs: std::collections::BTreeMap<String, serde_json::Value>,
    /// Without an `eval` input: the fraction of the training records (of
    /// every set, chosen by the stage seed) held out for evaluation; 0
    /// evaluates nothing.
    #[serde(default = "default_eval_fraction")]
    pub eval_fraction: f64,
    /// LoRA adapters (plus the reward head) instead of full fine-tuning.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<LoraParams>,
    #[serde(flatten)]
    pub train: TrainParams,
}

/// Params of `pm.train`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct PmTrainParams {
    /// Loss weight per training input (`comparisons`, `extra`); unnamed
    /// inputs weigh 1.0, a weight of 0 drops the set. The loss of a batch is
    /// the weighted mean of its pairs' losses.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub mix: BTreeMap<String, f64>,
    #[serde(flatten)]
    pub pm: PmParams,
}

/// Params of `pm.pretrain`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct PmPretrainParams {
    #[serde(flatten)]
    pub pm: PmParams,
}

fn default_lr() -> f64 {
    1e-5
}
fn default_eval_fraction() -> f64 {
    0.1
}

fn check_common(max_len: i64, eval_fraction: f64) -> Result<(), ParamError> {
    require(
        max_len >= 2,
        "max_len",
        format!("`max_len` must be at least 2, got {max_len}"),
    )?;
    require(
        (0.0..1.0).contains(&eval_fraction),
        "eval_fraction",
        format!("`eval_fraction` must be in [0, 1), got {eval_fraction}"),
    )
}

impl OpParams for PmTrainParams {
    fn check(&self) -> Result<(), ParamError> {
        check_common(self.pm.max_len, self.pm.eval_fraction)?;
        self.pm.train.check()?;
        crate::training::check_lora(&self.pm.lora, "lora")?;
        for (name, w) in &self.mix {
            if !PM_TRAIN_SETS.contains(&name.as_str()) {
                return Err(ParamError {
                    field: format!("mix.{name}"),
                    message: format!(
                        "`mix` names the training inputs ({}), not `{name}`",
                        PM_TRAIN_SETS.join(", ")
                    ),
                    suggestion: crate::nearest(name, PM_TRAIN_SETS),
                });
            }
            require(
                w.is_finite() && *w >= 0.0,
                &format!("mix.{name}"),
                format!("a `mix` weight must be finite and non-negative, got {w}"),
            )?;
        }
        Ok(())
    }
}

impl PmTrainParams {
    /// The loss weight of training input `set`.
    pub fn weight(&self, set: &str) -> f64 {
        self.mix.get(set).copied().unwrap_or(1.0)
    }
}

const PM_OUTPUTS: &[Port] = &[
    Port::output(
        "model",
        "the preference model folder (`*ForSequenceClassification`, one label; LoRA merged)",
    ),
    Port::volatile(
        "metrics",
        "metrics.jsonl: step, loss, lr, grad_norm, tokens_per_s; then one line of held-out figures",
    ),
    Port::output(
        "eval",
        "eval.json: held-out pairs, accuracy, mean margin, loss, expected calibration error, bins",
    ),
];

/// How both ops score and train.
const PM_CONVENTIONS: &[&str] = &[
    "reward: the reward head on the last token of prompt + response: the appended EOS with `append_eos`; with a chat template, the response's turn-end token (the last stop id it holds: Qwen's `<|im_end|>`, not the newline its template writes after it), where a sampled answer ends",
    "truncation: the responses' ends past the budget first, then one prompt cut for both sides of a pair, from its start after its BOS, to the room the longer response leaves (as TRL cuts a pair); the end token always stays",
    "loss per pair: -(p log sigmoid(rA - rB) + (1 - p) log sigmoid(rB - rA)), p the probability that A is preferred (1 or 0 for hard labels)",
    "batch loss: the mean over pairs (in pm.train weighted by `mix`, 1 by default)",
    "dropout: off (as TRL's RewardTrainer), `dropout: true` turns the checkpoint's own on",
    CHAT_TRAINING_CONVENTION,
];

/// The `pm.train` op.
pub const TRAIN_OP: OpDecl = OpDecl {
    name: "pm.train",
    version: 5,
    summary: "preference model on (soft-labelled) comparisons with the Bradley-Terry loss, held-out accuracy and calibration",
    inputs: &[
        Port::input(
            "model",
            "a base LM folder or a preference model (pm.pretrain, pm.train)",
        ),
        Port::input(
            "comparisons",
            "JSONL comparisons: {prompt, chosen, rejected, label} or {prompt, response_a, response_b, p_a}",
        ),
        Port::optional(
            "extra",
            "a second comparison set in either shape (e.g. AI harmlessness beside human helpfulness)",
        ),
        Port::optional(
            "eval",
            "held-out comparisons (otherwise `eval_fraction` of the training records)",
        ),
        Port::optional("chat_template", CHAT_TEMPLATE_INPUT),
    ],
    outputs: Outputs::Declared(PM_OUTPUTS),
    params: ParamsDecl::of::<PmTrainParams>(),
    placement: Placement::Worker,
    conventions: PM_CONVENTIONS,
};

/// The `pm.pretrain` op.
pub const PRETRAIN_OP: OpDecl = OpDecl {
    name: "pm.pretrain",
    version: 5,
    summary: "preference-model pre-training (PMP) on generic ranked comparisons; its model feeds pm.train",
    inputs: &[
        Port::input("model", "the base LM folder"),
        Port::input(
            "data",
            "JSONL: HH comparisons {prompt, chosen, rejected, label} or rankings {prompt, responses: [best, ..., worst]}",
        ),
        Port::optional("chat_template", CHAT_TEMPLATE_INPUT),
    ],
    outputs: Outputs::Declared(PM_OUTPUTS),
    params: ParamsDecl::of::<PmPretrainParams>(),
    placement: Placement::Worker,
    conventions: PM_CONVENTIONS,
};

impl OpParams for PmPretrainParams {
    fn check(&self) -> Result<(), ParamError> {
        check_common(self.pm.max_len, self.pm.eval_fraction)?;
        self.pm.train.check()?;
        crate::training::check_lora(&self.pm.lora, "lora")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn defaults_fill_in_and_mix_is_checked() {
        let v = TRAIN_OP.normalize_params(&json!({})).unwrap();
        assert_eq!(v["lr"], json!(1e-5));
        assert_eq!(v["max_len"], json!(256));
        assert_eq!(v["eval_fraction"], json!(0.1));
        assert_eq!(v["batch_size"], json!(8));
        assert!(v.get("mix").is_none());
        let err = TRAIN_OP
            .normalize_params(&json!({"mix": {"comparison": 1.0}}))
            .unwrap_err();
        assert_eq!(err.field, "mix.comparison");
        assert_eq!(err.suggestion.as_deref(), Some("comparisons"));
        let err = TRAIN_OP
            .normalize_params(&json!({"mix": {"extra": -1.0}}))
            .unwrap_err();
        assert_eq!(err.field, "mix.extra");
        let err = PRETRAIN_OP
            .normalize_params(&json!({"eval_fraction": 1.0}))
            .unwrap_err();
        assert_eq!(err.field, "eval_fraction");
        let err = TRAIN_OP.normalize_params(&json!({"mx": {}})).unwrap_err();
        assert_eq!(err.suggestion.as_deref(), Some("mix"));
    }
}
