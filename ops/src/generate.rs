//! `generate`: sample `n` responses per prompt with a model.
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::chat_format::{ChatTemplateChoice, CHAT_PROMPT_CONVENTION, CHAT_TEMPLATE_INPUT};
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
    /// Chat template: `auto` formats each prompt as a user turn with the
    /// `chat_template` input's template, else the policy's own, else the
    /// plain `template`; `none` always uses `template`.
    #[serde(default, skip_serializing_if = "ChatTemplateChoice::is_auto")]
    pub chat_template: ChatTemplateChoice,
}

/// The `generate` op.
pub const OP: OpDecl = OpDecl {
    name: "generate",
    version: 2,
    summary: "sample n responses per prompt (temperature, top-k, top-p, stop strings; KV cache)",
    inputs: &[
        Port::input("model", "the model folder"),
        Port::input("prompts", "JSONL records with a prompt field"),
        Port::optional("chat_template", CHAT_TEMPLATE_INPUT),
    ],
    outputs: Outputs::Declared(&[Port::output(
        "responses",
        "JSONL: {prompt, prompt_text, prompt_index, sample_index, response, response_ids, logprob, token_logprobs, finish}, n per prompt; with a chat template also `messages`, the conversation with the response as its last turn",
    )]),
    params: ParamsDecl::of::<GenerateParams>(),
    placement: Placement::Worker,
    conventions: &[CHAT_PROMPT_CONVENTION],
};

impl OpParams for GenerateParams {}
