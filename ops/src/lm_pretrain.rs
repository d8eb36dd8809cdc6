//! `lm.pretrain`: a small causal LM trained from scratch on a text corpus,
//! so every pipeline can run offline from nothing.
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::training::TrainParams;
use crate::{OpDecl, OpParams, Outputs, ParamError, ParamsDecl, Placement, Port};

/// The architecture of a fresh model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Family {
    /// GPT-2: learned positions, LayerNorm, GELU, tied embeddings.
    Gpt2,
    /// Llama: RoPE, RMSNorm, SwiGLU, grouped-query attention.
    Llama,
}

/// Params of `lm.pretrain`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct PretrainParams {
    /// Architecture family.
    #[serde(default = "default_family")]
    pub arch: Family,
    /// Hidden size.
    #[serde(default = "default_width")]
    pub width: i64,
    /// Transformer blocks.
    #[serde(default = "default_layers")]
    pub layers: i64,
    /// Attention heads.
    #[serde(default = "default_heads")]
    pub heads: i64,
    /// Key/value heads (Llama; default: `heads`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_heads: Option<i64>,
    /// Maximum positions (context length).
    #[serde(default = "default_positions")]
    pub positions: i64,
    /// Training sequence length (tokens per example).
    #[serde(default = "default_seq_len")]
    pub seq_len: i64,
    /// Dropout (GPT-2).
    #[serde(default)]
    pub dropout: f64,
    /// JSONL string fields to read (text files are read line by line).
    #[serde(default = "default_fields")]
    pub fields: Vec<String>,
    /// Peak learning rate.
    #[serde(default = "default_lr")]
    pub lr: f64,
    #[serde(flatten)]
    pub train: TrainParams,
}

fn default_family() -> Family {
    Family::Gpt2
}
fn default_width() -> i64 {
    256
}
fn default_layers() -> i64 {
    4
}
fn default_heads() -> i64 {
    4
}
fn default_positions() -> i64 {
    256
}
fn default_seq_len() -> i64 {
    128
}
fn default_fields() -> Vec<String> {
    ["prompt", "chosen", "rejected", "response", "text"]
        .map(String::from)
        .to_vec()
}
fn default_lr() -> f64 {
    3e-4
}

/// The `lm.pretrain` op.
pub const OP: OpDecl = OpDecl {
    name: "lm.pretrain",
    version: 2,
    summary: "train a small causal LM from scratch on a corpus (GPT-2 or Llama architecture)",
    inputs: &[
        Port::input("data", "corpus: a JSONL or text file, or a folder of them"),
        Port::input("tokenizer", "a tokenizer folder (from tokenizer.train)"),
    ],
    outputs: Outputs::Declared(&[
        Port::output(
            "model",
            "Hugging Face model folder: config.json, model.safetensors, tokenizer",
        ),
        Port::volatile(
            "metrics",
            "metrics.jsonl: step, loss, lr, grad_norm, tokens_per_s",
        ),
    ]),
    params: ParamsDecl::of::<PretrainParams>(),
    placement: Placement::Worker,
    conventions: &[
        "loss: next-token cross-entropy of every token of a block of `seq_len` tokens (texts joined by EOS) but the first",
        "batch loss: the mean over every predicted token of the batch",
        "dropout: the new model's `dropout` rate (0 by default), written to its config.json",
    ],
};

impl OpParams for PretrainParams {
    fn check(&self) -> Result<(), ParamError> {
        self.train.check()
    }
}
