//! `dpo.reference` and `dpo`: Direct Preference Optimization (Rafailov et
//! al. 2023) and its IPO variant (Azar et al. 2023) on the comparisons
//! `pm.train` reads, soft labels included.
//!
//! The frozen reference's log-probs are a stage of their own
//! (`dpo.reference`, output `reference_logps`) that `dpo` consumes: the
//! engine caches them per stage, so a sweep over `beta`, `loss` or the
//! learning rate reruns only `dpo`. The tensor code is in the worker
//! (`alignflow-worker`, `ops/dpo.rs`).
//!
//! For a pair with responses A ("chosen") and B ("rejected") after one prompt,
//! `d = (logpi(A) - logref(A)) - (logpi(B) - logref(B))`, each term the sum
//! of the response tokens' log-probs (prompt tokens masked; with `loss:
//! ipo` their mean per response token, as TRL's IPO), and `p` the
//! probability that A is preferred (1 for a hard label). With
//! `label_smoothing` eps the label used is `q = (1 - eps)*p + eps*(1 - p)`:
//! the label is flipped with probability eps, so a hard label becomes
//! `1 - eps` (conservative DPO) and `p = 0.5` stays 0.5.
//! - `loss: sigmoid`: `-(q*logsig(beta*d) + (1 - q)*logsig(-beta*d))`.
//! - `loss: ipo`: `(d - (2q - 1)/(2*beta))^2`. For a hard label it is IPO's
//!   `(d - 1/(2*beta))^2`. For a soft label it is, up to the constant
//!   `q*(1 - q)/beta^2`, the expected hard-label loss when the label is drawn
//!   with probability q (`E[(d - (2I - 1)/(2*beta))^2]`, `I ~ Bernoulli(q)`;
//!   a label of 0 is the hard loss of the swapped pair, `(-d - 1/(2*beta))^2`),
//!   so it has the same gradients; p = 0.5 pulls d to 0. The sigmoid form is
//!   the same expectation of the hard-label sigmoid loss, exactly.
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::chat_format::{ChatTemplateChoice, CHAT_TEMPLATE_INPUT, CHAT_TRAINING_CONVENTION};
use crate::op::require;
use crate::training::{LoraParams, TrainParams};
use crate::{OpDecl, OpParams, Outputs, ParamError, ParamsDecl, Placement, Port};

/// Params of `dpo.reference`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DpoReferenceParams {
    /// The dtype the stage's models are held in (`auto`: bfloat16 on
    /// CUDA, float32 on the CPU).
    #[serde(default, skip_serializing_if = "crate::memory::Dtype::is_auto")]
    pub dtype: crate::memory::Dtype,
    /// Longest sequence (prompt + response + EOS) in tokens; longer ones
    /// keep the prompt's end (at least half the budget when the prompt is
    /// long) and the response's start, as in `sft`. `dpo` reuses this value.
    #[serde(default = "crate::defaults::max_len")]
    pub max_len: i64,
    /// Append the EOS token to every response, so the log-probs include
    /// stopping. `dpo` reuses this choice.
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
    /// Pairs per forward pass (a memory knob).
    #[serde(default = "crate::defaults::batch_size")]
    pub batch_size: usize,
}

/// The DPO loss family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum DpoLoss {
    /// DPO: `-(q*logsig(beta*d) + (1-q)*logsig(-beta*d))`.
    Sigmoid,
    /// IPO: `(d - (2q-1)/(2*beta))^2`, `d` of mean log-probs per
    /// response token (TRL's IPO).
    Ipo,
}

/// Params of `dpo`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct DpoParams {
    /// The KL strength: implicit rewards are `beta * (logpi - logref)`;
    /// for IPO the target margin of a hard label is `1 / (2*beta)`.
    #[serde(default = "default_beta")]
    pub beta: f64,
    /// `sigmoid` (DPO) or `ipo`.
    #[serde(default = "default_loss")]
    pub loss: DpoLoss,
    /// eps in [0, 0.5): each label p becomes `(1 - eps)*p + eps*(1 - p)`
    /// (a hard label becomes `1 - eps`; soft labels shrink toward 0.5).
    #[serde(default)]
    pub label_smoothing: f64,
    /// Peak learning rate.
    #[serde(default = "default_lr")]
    pub lr: f64,
    /// Dropout (the model's and LoRA's) in the policy's training forwards.
    /// Off by default (as TRL's `disable_dropout`): the reference log-probs
    /// are dropout-free, and dropout would make the log-ratio noisy and
    /// nonzero at step 0.
    #[serde(default)]
    pub dropout: bool,
    /// Without an `eval` input: the fraction of the comparison records
    /// (chosen by the stage seed) held out for evaluation; 0 evaluates nothing.
    #[serde(default = "default_eval_fraction")]
    pub eval_fraction: f64,
    /// LoRA adapters instead of full fine-tuning (merged on export). The
    /// reference is still the `reference_logps` input.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<LoraParams>,
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
    #[serde(flatten)]
    pub train: TrainParams,
}

fn default_beta() -> f64 {
    0.1
}
fn default_loss() -> DpoLoss {
    DpoLoss::Sigmoid
}
fn default_lr() -> f64 {
    1e-6
}
fn default_eval_fraction() -> f64 {
    0.1
}

impl OpParams for DpoReferenceParams {
    fn check(&self) -> Result<(), ParamError> {
        require(
            self.max_len >= 2,
            "max_len",
            format!("`max_len` must be at least 2, got {}", self.max_len),
        )?;
        require(
            self.batch_size > 0,
            "batch_size",
            "`batch_size` must be at least 1",
        )
    }
}

impl OpParams for DpoParams {
    fn check(&self) -> Result<(), ParamError> {
        self.train.check()?;
        crate::training::check_lora(&self.lora, "lora")?;
        require(
            self.beta.is_finite() && self.beta > 0.0,
            "beta",
            format!("`beta` must be positive, got {}", self.beta),
        )?;
        require(
            (0.0..0.5).contains(&self.label_smoothing),
            "label_smoothing",
            format!(
                "`label_smoothing` must be in [0, 0.5), got {}",
                self.label_smoothing
            ),
        )?;
        require(
            (0.0..1.0).contains(&self.eval_fraction),
            "eval_fraction",
            format!(
                "`eval_fraction` must be in [0, 1), got {}",
                self.eval_fraction
            ),
        )
    }
}

impl DpoParams {
    /// The label a pair trains on: `p` flipped with probability
    /// `label_smoothing`.
    pub fn smoothed(&self, p: f64) -> f64 {
        (1.0 - self.label_smoothing) * p + self.label_smoothing * (1.0 - p)
    }
}

const COMPARISONS_DOC: &str =
    "JSONL comparisons: {prompt, chosen, rejected, label} (dataset.import), {prompt, response_a, response_b, p_a} (ai_feedback) or {prompt, responses: [best, ..., worst]}";

/// How a pair longer than `max_len` is cut, for both ops.
const PAIR_TRUNCATION_CONVENTION: &str = "truncation (as TRL cuts a pair): each response keeps at least half of `max_len` (its end goes first), then one prompt cut for both sides, from its start after its BOS, to the room the longer response leaves";

/// The `dpo.reference` op.
pub const REFERENCE_OP: OpDecl = OpDecl {
    name: "dpo.reference",
    version: 4,
    summary: "the frozen reference's response log-probs of every comparison pair, cached for dpo",
    inputs: &[
        Port::input(
            "model",
            "the reference LM folder (usually the SFT model dpo starts from)",
        ),
        Port::input("comparisons", COMPARISONS_DOC),
        Port::optional("eval", "held-out comparisons, in any of the same shapes"),
        Port::optional("chat_template", CHAT_TEMPLATE_INPUT),
    ],
    outputs: Outputs::Declared(&[Port::output(
        "reference_logps",
        "folder: settings.json (max_len, eos, pair counts) and logps.jsonl, one line per pair: {set, record, pair, chosen, rejected, chosen_tokens, rejected_tokens, digest}",
    )]),
    params: ParamsDecl::of::<DpoReferenceParams>(),
    placement: Placement::Worker,
    conventions: &[
        "log-probs: the frozen reference's, summed over each response's tokens plus its EOS, dropout-free",
        PAIR_TRUNCATION_CONVENTION,
        CHAT_TRAINING_CONVENTION,
    ],
};

/// The `dpo` op.
pub const OP: OpDecl = OpDecl {
    name: "dpo",
    version: 4,
    summary: "direct preference optimization (DPO or IPO, soft labels) against cached reference log-probs, full or LoRA",
    inputs: &[
        Port::input("policy", "the LM folder to train (usually the reference model)"),
        Port::input("comparisons", COMPARISONS_DOC),
        Port::input(
            "reference_logps",
            "dpo.reference's output for the same comparisons (and eval)",
        ),
        Port::optional(
            "eval",
            "held-out comparisons, also given to dpo.reference (otherwise `eval_fraction` of the records)",
        ),
        Port::optional("chat_template", CHAT_TEMPLATE_INPUT),
    ],
    outputs: Outputs::Declared(&[
        Port::output("model", "the trained policy folder (LoRA merged)"),
        Port::volatile(
            "metrics",
            "metrics.jsonl: step, loss, lr, grad_norm, tokens_per_s, reward_accuracy, margin, chosen_reward, rejected_reward; then one line of held-out figures",
        ),
        Port::output(
            "eval",
            "eval.json: held-out pairs, implicit reward accuracy, mean margin, chosen and rejected rewards, loss",
        ),
    ]),
    params: ParamsDecl::of::<DpoParams>(),
    placement: Placement::Worker,
    conventions: &[
        "log-probs: summed over each response's tokens plus its EOS, for the policy and (from `reference_logps`) the reference",
        "d = (policy - reference log-prob of A) - (the same of B); q = the label after smoothing, (1 - eps) p + eps (1 - p)",
        "sigmoid: -(q log sigmoid(beta d) + (1 - q) log sigmoid(-beta d)); ipo: (d - (2q - 1) / (2 beta))^2 with each log-prob the mean over its response's tokens (as TRL's IPO), implicit rewards too",
        "batch loss: the mean over pairs",
        "dropout: off (as TRL), `dropout: true` turns the policy's on",
        PAIR_TRUNCATION_CONVENTION,
        CHAT_TRAINING_CONVENTION,
    ],
};

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn defaults_fill_in_and_params_are_checked() {
        let v = OP.normalize_params(&json!({})).unwrap();
        assert_eq!(v["beta"], json!(0.1));
        assert_eq!(v["loss"], json!("sigmoid"));
        assert_eq!(v["label_smoothing"], json!(0.0));
        assert_eq!(v["batch_size"], json!(8));
        let v = OP.normalize_params(&json!({"loss": "ipo"})).unwrap();
        assert_eq!(v["loss"], json!("ipo"));
        for (params, field) in [
            (json!({"beta": 0.0}), "beta"),
            (json!({"label_smoothing": 0.5}), "label_smoothing"),
            (json!({"eval_fraction": 1.0}), "eval_fraction"),
        ] {
            assert_eq!(OP.normalize_params(&params).unwrap_err().field, field);
        }
        assert!(OP.normalize_params(&json!({"loss": "hinge"})).is_err());
        let err = OP.normalize_params(&json!({"bta": 0.2})).unwrap_err();
        assert_eq!(err.suggestion.as_deref(), Some("beta"));
        let v = REFERENCE_OP.normalize_params(&json!({})).unwrap();
        assert_eq!(
            v,
            json!({"max_len": 256, "append_eos": true, "batch_size": 8})
        );
        let err = REFERENCE_OP
            .normalize_params(&json!({"max_len": 1}))
            .unwrap_err();
        assert_eq!(err.field, "max_len");
    }

    #[test]
    fn label_smoothing_flips_labels() {
        let p: DpoParams = serde_json::from_value(json!({"label_smoothing": 0.1})).unwrap();
        assert!((p.smoothed(1.0) - 0.9).abs() < 1e-12);
        assert!((p.smoothed(0.0) - 0.1).abs() < 1e-12);
        assert!((p.smoothed(0.5) - 0.5).abs() < 1e-12);
        assert!((p.smoothed(0.7) - (0.9 * 0.7 + 0.1 * 0.3)).abs() < 1e-12);
    }
}
