//! `baseline_scores`: the offline stage of contrastive rewards (Shen et al.
//! 2024, "Improving Reinforcement Learning from Human Feedback Using
//! Contrastive Rewards"): `samples` responses of the starting (SFT) policy
//! to each prompt, scored by the preference model. `ppo` with its optional
//! `baseline` input then trains on the PM score minus the prompt's mean
//! baseline score.
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::chat_format::{PromptParams, CHAT_PROMPT_CONVENTION, CHAT_TEMPLATE_INPUT};
use crate::{OpDecl, OpParams, Outputs, ParamsDecl, Placement, Port};

/// Params of `baseline_scores`. `template` and `prompt_field` must match the
/// `ppo` stage's: its prompts are looked up by their templated text.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
// Unknown names are refused by `op::parse` (serde cannot deny them
// beside `flatten`); the schema still lists the struct as closed.
#[schemars(deny_unknown_fields)]
pub struct BaselineScoresParams {
    /// The dtype the stage's models are held in (`auto`: bfloat16 on
    /// CUDA, float32 on the CPU).
    #[serde(default, skip_serializing_if = "crate::memory::Dtype::is_auto")]
    pub dtype: crate::memory::Dtype,
    /// Baseline responses per prompt (k).
    #[serde(default = "default_samples")]
    pub samples: usize,
    /// Longest sampled response in tokens.
    #[serde(default = "default_max_new_tokens")]
    pub max_new_tokens: i64,
    /// Sampling temperature.
    #[serde(default = "crate::defaults::one_f64")]
    pub temperature: f64,
    /// The prompt field, its template and the chat template.
    #[serde(flatten)]
    pub prompt: PromptParams,
    /// Responses decoding at once (continuous batching), and scored per
    /// pass.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
}

/// One line of the `scores` output: a prompt as the `ppo` op templates it,
/// its baseline responses' raw PM scores and their mean.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BaselineRecord {
    pub prompt: String,
    pub mean: f64,
    pub scores: Vec<f64>,
}

fn default_samples() -> usize {
    4
}
fn default_max_new_tokens() -> i64 {
    32
}
fn default_batch_size() -> usize {
    16
}

/// The `baseline_scores` op.
pub const OP: OpDecl = OpDecl {
    name: "baseline_scores",
    version: 3,
    summary: "contrastive-reward baselines: k policy samples per prompt scored by a preference model (for ppo's `baseline`)",
    inputs: &[
        Port::input("policy", "the starting policy folder (the SFT model)"),
        Port::input("reward_model", "a preference model folder (pm.train)"),
        Port::input("prompts", "JSONL records with a prompt field"),
        Port::optional("chat_template", CHAT_TEMPLATE_INPUT),
    ],
    outputs: Outputs::Declared(&[Port::output(
        "scores",
        "JSONL: {prompt, mean, scores}, one line per distinct templated prompt",
    )]),
    params: ParamsDecl::of::<BaselineScoresParams>(),
    placement: Placement::Worker,
    conventions: &[CHAT_PROMPT_CONVENTION],
};

impl OpParams for BaselineScoresParams {}
