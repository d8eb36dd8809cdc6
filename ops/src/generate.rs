//! `generate`: sample `n` responses per prompt with a model.
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{OpDecl, OpParams, Outputs, ParamsDecl, Placement, Port};

/// Params of `generate`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GenerateParams {
    /// Responses per prompt.
    #[serde(default = "crate::defaults::one")]
    pub n: usize,
    /// Most new tokens per response.
    #[serde(default = "crate::defaults::max_new_tokens")]
    pub max_new_tokens: i64,
    /// Fewest new tokens (EOS is blocked before).
    #[serde(default)]
    pub min_new_tokens: i64,
    /// Sampling temperature; 0 is greedy.
    #[serde(default = "crate::defaults::temperature")]
    pub temperature: f64,
    /// Keep the k most likely tokens (0: off).
    #[serde(default)]
    pub top_k: i64,
    /// Nucleus sampling mass (1: off).
    #[serde(default = "crate::defaults::top_p")]
    pub top_p: f64,
    /// Stop a response when its text contains one of these (the stop string is cut off).
    #[serde(default)]
    pub stop: Vec<String>,
    /// Prompts per batch.
    #[serde(default = "crate::defaults::batch_size")]
    pub batch_size: usize,
    /// Field holding the prompt.
    #[serde(default = "crate::defaults::prompt_field")]
    pub prompt_field: String,
    /// Prompt template; `{prompt}` is replaced by the prompt field.
    #[serde(default = "crate::defaults::prompt_template")]
    pub template: String,
}

/// The `generate` op.
pub const OP: OpDecl = OpDecl {
    name: "generate",
    version: 1,
    summary: "sample n responses per prompt (temperature, top-k, top-p, stop strings; KV cache)",
    inputs: &[
        Port::input("model", "the model folder"),
        Port::input("prompts", "JSONL records with a prompt field"),
    ],
    outputs: Outputs::Declared(&[Port::output(
        "responses",
        "JSONL: {prompt, prompt_text, prompt_index, sample_index, response, response_ids, logprob, token_logprobs, finish}, n per prompt",
    )]),
    params: ParamsDecl::of::<GenerateParams>(),
    placement: Placement::Worker,
    conventions: &[],
};

impl OpParams for GenerateParams {}
