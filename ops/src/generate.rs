//! `generate`: sample `n` responses per prompt with a model.
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::chat_format::{PromptParams, CHAT_PROMPT_CONVENTION, CHAT_TEMPLATE_INPUT};
use crate::decoding::DecodingParams;
use crate::op::{require, AT_LEAST_ONE};
use crate::{OpDecl, OpParams, Outputs, ParamError, ParamsDecl, Placement, Port};

/// Params of `generate`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
// Unknown names are refused by `op::parse` (serde cannot deny them
// beside `flatten`); the schema still lists the struct as closed.
#[schemars(deny_unknown_fields)]
pub struct GenerateParams {
    /// The dtype the stage's models are held in (`auto`: bfloat16 on
    /// CUDA, float32 on the CPU).
    #[serde(default, skip_serializing_if = "crate::memory::Dtype::is_auto")]
    pub dtype: crate::memory::Dtype,
    /// Responses per prompt.
    #[serde(default = "crate::defaults::one")]
    pub n: usize,
    /// Most new tokens, temperature, top-k and top-p.
    #[serde(flatten)]
    pub decoding: DecodingParams,
    /// Fewest new tokens (EOS is blocked before).
    #[serde(default)]
    pub min_new_tokens: i64,
    /// Stop a response when its text contains one of these: `response`
    /// ends before it, while `response_ids`, `token_logprobs` and `logprob`
    /// keep every sampled token, those that spell it included (as vLLM's
    /// token ids do: a stop string may end inside a token).
    #[serde(default)]
    pub stop: Vec<String>,
    /// Rows (prompt samples) decoding at once: a finished row's place goes
    /// to the next waiting one (continuous batching).
    #[serde(default = "crate::defaults::batch_size")]
    pub batch_size: usize,
    /// The prompt field, its template and the chat template.
    #[serde(flatten)]
    pub prompt: PromptParams,
}

/// The `generate` op.
pub const OP: OpDecl = OpDecl {
    name: "generate",
    version: 3,
    summary: "sample n responses per prompt (temperature, top-k, top-p, stop strings; KV cache)",
    inputs: &[
        Port::input("model", "the model folder"),
        Port::input("prompts", "JSONL records with a prompt field"),
        Port::optional("chat_template", CHAT_TEMPLATE_INPUT),
    ],
    outputs: Outputs::Declared(&[Port::output(
        "responses",
        "JSONL: {prompt, prompt_text, prompt_index, sample_index, response, response_ids, logprob, token_logprobs, finish}, n per prompt (`response` cut before a stop string, the token fields every sampled token); with a chat template also `messages`, the conversation with the response as its last turn",
    )]),
    params: ParamsDecl::of::<GenerateParams>(),
    placement: Placement::Worker,
    conventions: &[CHAT_PROMPT_CONVENTION],
};

impl OpParams for GenerateParams {
    fn check(&self) -> Result<(), ParamError> {
        self.decoding.check()?;
        crate::op::check_stop(&self.stop)?;
        require(self.n > 0, "n", AT_LEAST_ONE)?;
        require(self.batch_size > 0, "batch_size", AT_LEAST_ONE)
    }
}
