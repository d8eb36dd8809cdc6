//! Model configuration from a Hugging Face `config.json`: the GPT-2 family
//! and the Llama family (Llama, Qwen2, SmolLM, Mistral configs).

use std::path::Path;

use anyhow::Context;
use serde::Deserialize;
use serde_json::Value;

/// The supported architectures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// Learned positions, LayerNorm, GELU (tanh), fused QKV `Conv1D` weights, tied embeddings.
    Gpt2,
    /// RoPE, RMSNorm, SwiGLU, grouped-query attention.
    Llama,
}

/// Everything the model code needs, normalised across families.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub arch: Arch,
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub num_layers: i64,
    pub num_heads: i64,
    pub num_kv_heads: i64,
    pub intermediate_size: i64,
    pub max_positions: i64,
    pub norm_eps: f64,
    pub rope_theta: f64,
    pub tie_word_embeddings: bool,
    /// Bias on the q/k/v projections (Qwen2 has one).
    pub qkv_bias: bool,
    /// Dropout on residuals, embeddings and attention (GPT-2); used in training only.
    pub dropout: f64,
    pub bos_token_id: Option<i64>,
    pub eos_token_id: Option<i64>,
    pub pad_token_id: Option<i64>,
    /// The config as read, written back on save so other tools see their keys.
    pub raw: Value,
}

/// The keys we read; every family spells some of them differently.
#[derive(Debug, Deserialize)]
struct RawConfig {
    model_type: Option<String>,
    vocab_size: i64,
    // GPT-2 spellings.
    n_embd: Option<i64>,
    n_layer: Option<i64>,
    n_head: Option<i64>,
    n_inner: Option<i64>,
    n_positions: Option<i64>,
    layer_norm_epsilon: Option<f64>,
    resid_pdrop: Option<f64>,
    activation_function: Option<String>,
    // Llama spellings.
    hidden_size: Option<i64>,
    num_hidden_layers: Option<i64>,
    num_attention_heads: Option<i64>,
    num_key_value_heads: Option<i64>,
    intermediate_size: Option<i64>,
    max_position_embeddings: Option<i64>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<Value>,
    /// transformers >= 5 writes `rope_theta` (and the rope type) here.
    rope_parameters: Option<Value>,
    hidden_act: Option<String>,
    head_dim: Option<i64>,
    attention_bias: Option<bool>,
    tie_word_embeddings: Option<bool>,
    bos_token_id: Option<Value>,
    eos_token_id: Option<Value>,
    pad_token_id: Option<Value>,
}

/// A token id, or the first of a list (some configs list several EOS ids).
fn token_id(v: &Option<Value>) -> Option<i64> {
    match v {
        Some(Value::Number(n)) => n.as_i64(),
        Some(Value::Array(a)) => a.first().and_then(Value::as_i64),
        _ => None,
    }
}

impl ModelConfig {
    /// Reads `dir/config.json`.
    pub fn load(dir: &Path) -> anyhow::Result<ModelConfig> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let raw: Value =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        Self::from_json(raw).with_context(|| format!("in {}", path.display()))
    }

    /// Builds the config from a parsed `config.json`.
    pub fn from_json(raw: Value) -> anyhow::Result<ModelConfig> {
        let c: RawConfig = serde_json::from_value(raw.clone())?;
        let model_type = c.model_type.clone().unwrap_or_default();
        let cfg = match model_type.as_str() {
            "gpt2" => {
                let hidden = c.n_embd.context("n_embd")?;
                if let Some(act) = &c.activation_function {
                    anyhow::ensure!(
                        act == "gelu_new" || act == "gelu_pytorch_tanh",
                        "GPT-2 activation `{act}` is not supported"
                    );
                }
                ModelConfig {
                    arch: Arch::Gpt2,
                    vocab_size: c.vocab_size,
                    hidden_size: hidden,
                    num_layers: c.n_layer.context("n_layer")?,
                    num_heads: c.n_head.context("n_head")?,
                    num_kv_heads: c.n_head.context("n_head")?,
                    intermediate_size: c.n_inner.unwrap_or(4 * hidden),
                    max_positions: c.n_positions.unwrap_or(1024),
                    norm_eps: c.layer_norm_epsilon.unwrap_or(1e-5),
                    rope_theta: 0.0,
                    tie_word_embeddings: c.tie_word_embeddings.unwrap_or(true),
                    qkv_bias: true,
                    dropout: c.resid_pdrop.unwrap_or(0.0),
                    bos_token_id: token_id(&c.bos_token_id),
                    eos_token_id: token_id(&c.eos_token_id),
                    pad_token_id: token_id(&c.pad_token_id),
                    raw,
                }
            }
            "llama" | "mistral" | "qwen2" => {
                if let Some(scaling) = c.rope_scaling.as_ref().filter(|s| !s.is_null()) {
                    let default =
                        scaling.get("rope_type").and_then(Value::as_str) == Some("default");
                    anyhow::ensure!(default, "rope_scaling {scaling} is not supported yet");
                }
                let rope = c.rope_parameters.as_ref().filter(|p| !p.is_null());
                if let Some(kind) = rope
                    .and_then(|p| p.get("rope_type"))
                    .and_then(Value::as_str)
                {
                    anyhow::ensure!(kind == "default", "rope_type `{kind}` is not supported yet");
                }
                let rope_theta = rope
                    .and_then(|p| p.get("rope_theta"))
                    .and_then(Value::as_f64)
                    .or(c.rope_theta);
                if let Some(act) = &c.hidden_act {
                    anyhow::ensure!(
                        act == "silu",
                        "activation `{act}` is not supported (SwiGLU needs silu)"
                    );
                }
                let hidden = c.hidden_size.context("hidden_size")?;
                let heads = c.num_attention_heads.context("num_attention_heads")?;
                if let Some(hd) = c.head_dim {
                    anyhow::ensure!(
                        hd * heads == hidden,
                        "head_dim {hd} * heads {heads} != hidden_size {hidden} is not supported"
                    );
                }
                let kv = c.num_key_value_heads.unwrap_or(heads);
                anyhow::ensure!(
                    heads % kv == 0,
                    "num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}"
                );
                ModelConfig {
                    arch: Arch::Llama,
                    vocab_size: c.vocab_size,
                    hidden_size: hidden,
                    num_layers: c.num_hidden_layers.context("num_hidden_layers")?,
                    num_heads: heads,
                    num_kv_heads: kv,
                    intermediate_size: c.intermediate_size.context("intermediate_size")?,
                    max_positions: c.max_position_embeddings.unwrap_or(2048),
                    norm_eps: c.rms_norm_eps.unwrap_or(1e-6),
                    rope_theta: rope_theta.unwrap_or(10000.0),
                    tie_word_embeddings: c.tie_word_embeddings.unwrap_or(false),
                    qkv_bias: c.attention_bias.unwrap_or(model_type == "qwen2"),
                    dropout: 0.0,
                    bos_token_id: token_id(&c.bos_token_id),
                    eos_token_id: token_id(&c.eos_token_id),
                    pad_token_id: token_id(&c.pad_token_id),
                    raw,
                }
            }
            other => {
                anyhow::bail!("model_type `{other}` is not supported (gpt2, llama, mistral, qwen2)")
            }
        };
        anyhow::ensure!(
            cfg.hidden_size % cfg.num_heads == 0,
            "hidden size is not a multiple of the head count"
        );
        Ok(cfg)
    }

    pub fn head_dim(&self) -> i64 {
        self.hidden_size / self.num_heads
    }

    /// The prefix of the backbone's parameter names (`transformer.` / `model.`).
    pub fn backbone_prefix(&self) -> &'static str {
        match self.arch {
            Arch::Gpt2 => "transformer",
            Arch::Llama => "model",
        }
    }

    /// The token used to pad batches: `pad_token_id`, else EOS, else 0.
    pub fn pad_id(&self) -> i64 {
        self.pad_token_id.or(self.eos_token_id).unwrap_or(0)
    }

    /// A GPT-2 `config.json` for a fresh model (pretraining from scratch).
    pub fn gpt2_json(
        vocab: i64,
        positions: i64,
        width: i64,
        layers: i64,
        heads: i64,
        eos: i64,
        dropout: f64,
    ) -> Value {
        serde_json::json!({
            "model_type": "gpt2",
            "architectures": ["GPT2LMHeadModel"],
            "vocab_size": vocab,
            "n_positions": positions,
            "n_ctx": positions,
            "n_embd": width,
            "n_layer": layers,
            "n_head": heads,
            "n_inner": null,
            "activation_function": "gelu_new",
            "resid_pdrop": dropout,
            "embd_pdrop": dropout,
            "attn_pdrop": dropout,
            "layer_norm_epsilon": 1e-5,
            "initializer_range": 0.02,
            "bos_token_id": eos,
            "eos_token_id": eos,
            "pad_token_id": eos,
            "tie_word_embeddings": true,
            "torch_dtype": "float32"
        })
    }

    /// A Llama `config.json` for a fresh model.
    #[allow(clippy::too_many_arguments)]
    pub fn llama_json(
        vocab: i64,
        positions: i64,
        width: i64,
        layers: i64,
        heads: i64,
        kv_heads: i64,
        intermediate: i64,
        eos: i64,
        tied: bool,
    ) -> Value {
        serde_json::json!({
            "model_type": "llama",
            "architectures": ["LlamaForCausalLM"],
            "vocab_size": vocab,
            "hidden_size": width,
            "intermediate_size": intermediate,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "max_position_embeddings": positions,
            "rms_norm_eps": 1e-6,
            "rope_theta": 10000.0,
            "hidden_act": "silu",
            "attention_bias": false,
            "tie_word_embeddings": tied,
            "bos_token_id": eos,
            "eos_token_id": eos,
            "pad_token_id": eos,
            "torch_dtype": "float32"
        })
    }
}
