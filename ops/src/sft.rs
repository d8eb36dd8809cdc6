//! `sft`: supervised fine-tuning on prompt/response records, the loss on
//! response tokens only; full or LoRA.
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::chat_format::{ChatTemplateChoice, CHAT_TEMPLATE_INPUT, CHAT_TRAINING_CONVENTION};
use crate::training::{is_true, LoraParams, TrainParams};
use crate::{OpDecl, OpParams, Outputs, ParamError, ParamsDecl, Placement, Port};

/// Params of `sft`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct SftParams {
    /// Field holding the prompt.
    #[serde(default = "crate::defaults::prompt_field")]
    pub prompt_field: String,
    /// Field holding the target response (`chosen` for comparisons).
    #[serde(default = "default_response_field")]
    pub response_field: String,
    /// Prompt template; `{prompt}` is replaced by the prompt field.
    #[serde(default = "crate::defaults::prompt_template")]
    pub template: String,
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
    /// Append the EOS token to each response, so the model learns to stop.
    #[serde(default = "crate::defaults::yes")]
    pub append_eos: bool,
    /// Longest example in tokens; longer ones keep the prompt's end and the response's start.
    #[serde(default = "crate::defaults::max_len")]
    pub max_len: i64,
    /// Peak learning rate.
    #[serde(default = "default_lr")]
    pub lr: f64,
    /// Dropout (the checkpoint's own rates, and LoRA's) in the training
    /// forwards. On by default, as TRL's SFTTrainer trains with the model's
    /// dropout; `false` trains dropout-free (what a loss computed with the
    /// model in eval mode reproduces).
    #[serde(default = "crate::defaults::yes", skip_serializing_if = "is_true")]
    pub dropout: bool,
    /// LoRA adapters instead of full fine-tuning.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<LoraParams>,
    #[serde(flatten)]
    pub train: TrainParams,
}

fn default_response_field() -> String {
    "response".into()
}
fn default_lr() -> f64 {
    1e-5
}

/// The `sft` op.
pub const OP: OpDecl = OpDecl {
    name: "sft",
    version: 4,
    summary:
        "supervised fine-tuning on prompt/response records (loss on response tokens), full or LoRA",
    inputs: &[
        Port::input("model", "the model folder to fine-tune"),
        Port::input("data", "JSONL records with a prompt and a response field"),
        Port::optional("chat_template", CHAT_TEMPLATE_INPUT),
    ],
    outputs: Outputs::Declared(&[
        Port::output("model", "the fine-tuned model folder (LoRA merged)"),
        Port::volatile(
            "metrics",
            "metrics.jsonl: step, loss, lr, grad_norm, tokens_per_s",
        ),
    ]),
    params: ParamsDecl::of::<SftParams>(),
    placement: Placement::Worker,
    conventions: &[
        "loss: next-token cross-entropy of each response token (the appended EOS included) given all tokens before it; prompt tokens are never predicted",
        "batch loss: the mean over every response token of the batch (a token mean, as transformers' causal-LM loss with prompt labels -100)",
        "dropout: on (the checkpoint's own rates), `dropout: false` turns it off",
        CHAT_TRAINING_CONVENTION,
        "`messages` records (a conversation ending with the assistant): when the chat template marks the assistant's text with `{% generation %}`, the whole conversation is rendered once and the loss covers every assistant turn, exactly the tokens transformers' `return_assistant_tokens_mask=True` marks (TRL's `assistant_only_loss`); longer than `max_len`, it keeps its start; metric `conversations_on_every_assistant_turn` counts them. Without markers only the last turn is the response, split as above",
    ],
};

impl OpParams for SftParams {
    fn check(&self) -> Result<(), ParamError> {
        self.train.check()?;
        crate::training::check_lora(&self.lora, "lora")
    }
}
