//! Model configuration from a Hugging Face `config.json`: the GPT-2 family
//! and the Llama family (Llama, Qwen2, Qwen3, SmolLM2/3, Mistral, OLMo 2
//! configs).

use std::path::Path;

use anyhow::Context;
use serde::Deserialize;
use serde_json::Value;

use super::rope::{Rope, ThetaDefaults};

/// The supported architectures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// Learned positions, LayerNorm, GELU (tanh), fused QKV `Conv1D` weights, tied embeddings.
    Gpt2,
    /// RoPE, RMSNorm, SwiGLU, grouped-query attention (Qwen3: with q/k RMSNorm).
    Llama,
}

/// Where a Llama-family block puts its RMSNorms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormPlacement {
    /// Before attention (`input_layernorm`) and before the MLP
    /// (`post_attention_layernorm`): Llama, Mistral, Qwen, SmolLM3.
    Pre,
    /// On the outputs of attention (`post_attention_layernorm`) and of the
    /// MLP (`post_feedforward_layernorm`), before the residual add: OLMo 2.
    Post,
    /// Both: `input_layernorm`, `post_attention_layernorm`,
    /// `pre_feedforward_layernorm`, `post_feedforward_layernorm` (Gemma 2/3).
    Sandwich,
}

/// The MLP's gate activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// SwiGLU (`silu`).
    Silu,
    /// GeGLU with the tanh approximation (`gelu_pytorch_tanh`): Gemma.
    GeluTanh,
}

/// What the Gemma family changes in the Llama-family block.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GemmaVariant {
    /// Embeddings times `sqrt(hidden_size)`.
    pub embed_scale: Option<f64>,
    /// Attention scores times this instead of `head_dim^-0.5`
    /// (`query_pre_attn_scalar^-0.5`).
    pub attn_scale: Option<f64>,
    /// `cap * tanh(scores / cap)` on attention scores (Gemma 2).
    pub attn_softcap: Option<f64>,
    /// `cap * tanh(logits / cap)` on the LM head's logits (Gemma 2).
    pub final_softcap: Option<f64>,
    /// RMSNorms scale by `1 + weight` (weights initialised to 0).
    pub norm_unit_offset: bool,
}

/// RMSNorm of queries and keys before RoPE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QkNorm {
    None,
    /// Over each head (`[head_dim]` weights): Qwen3.
    PerHead,
    /// Over the whole projection (`[heads * head_dim]` weights): OLMo 2.
    Whole,
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
    /// Width of one attention head; Qwen3's differs from `hidden / heads`.
    pub head_dim: i64,
    pub intermediate_size: i64,
    pub max_positions: i64,
    pub norm_eps: f64,
    /// Rotary embedding (the Llama family; `None` for GPT-2).
    pub rope: Option<Rope>,
    /// The rotary embedding of sliding-window layers when it differs
    /// (Gemma 3's local base frequency).
    pub local_rope: Option<Rope>,
    pub activation: Activation,
    pub gemma: GemmaVariant,
    /// Phi-3's fused `qkv_proj` and `gate_up_proj`.
    pub fused_projections: bool,
    pub tie_word_embeddings: bool,
    /// Bias on the q/k/v projections (Qwen2 has one).
    pub qkv_bias: bool,
    /// Bias on the output projection (Llama's and Qwen3's `attention_bias`).
    pub o_bias: bool,
    /// RMSNorm of q and k before RoPE (`q_norm`, `k_norm`).
    pub qk_norm: QkNorm,
    /// Where each block's norms sit.
    pub norm_placement: NormPlacement,
    /// Per layer: its sliding attention window in keys, `None` for full
    /// attention (Mistral's `sliding_window`, `layer_types`).
    pub layer_windows: Vec<Option<i64>>,
    /// Per layer: whether RoPE rotates its queries and keys (SmolLM3's
    /// `no_rope_layers` leaves it out of some).
    pub layer_rope: Vec<bool>,
    /// Dropout on residuals, embeddings and attention (GPT-2); used in training only.
    pub dropout: f64,
    pub bos_token_id: Option<i64>,
    pub eos_token_id: Option<i64>,
    /// Every id generation stops on: `config.json`'s `eos_token_id` (a
    /// number or a list) and, when the folder has one,
    /// `generation_config.json`'s (Llama 3 lists `<|eot_id|>` there).
    pub stop_token_ids: Vec<i64>,
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
    hidden_act: Option<String>,
    // Gemma spellings.
    hidden_activation: Option<String>,
    query_pre_attn_scalar: Option<f64>,
    final_logit_softcapping: Option<f64>,
    use_bidirectional_attention: Option<bool>,
    head_dim: Option<i64>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    // Sliding-window attention: Mistral (every layer), Qwen2/Qwen3
    // (`use_sliding_window` from `max_window_layers` on), `layer_types`.
    // (`sliding_window` and the score cap are read from the JSON itself:
    // an absent key takes the family's default, an explicit null none.)
    use_sliding_window: Option<bool>,
    max_window_layers: Option<i64>,
    layer_types: Option<Vec<String>>,
    // SmolLM3: 1 where a layer uses RoPE, 0 where it does not.
    no_rope_layers: Option<Vec<i64>>,
    tie_word_embeddings: Option<bool>,
    bos_token_id: Option<Value>,
    eos_token_id: Option<Value>,
    pad_token_id: Option<Value>,
}

/// Every id of a number or a list of numbers.
fn token_ids(v: &Value) -> Vec<i64> {
    match v {
        Value::Number(n) => n.as_i64().into_iter().collect(),
        Value::Array(a) => a.iter().filter_map(Value::as_i64).collect(),
        _ => Vec::new(),
    }
}

/// A token id, or the first of a list (some configs list several EOS ids).
fn token_id(v: &Option<Value>) -> Option<i64> {
    match v {
        Some(Value::Number(n)) => n.as_i64(),
        Some(Value::Array(a)) => a.first().and_then(Value::as_i64),
        _ => None,
    }
}

/// What transformers 5's config class of a family assumes for a key its
/// `config.json` leaves out (Hub configs written before transformers 5
/// often do: Gemma 2 and 3 without `layer_types`, SmolLM3 without
/// `no_rope_layers`).
struct FamilyDefaults {
    rms_norm_eps: f64,
    tie_word_embeddings: bool,
    max_positions: i64,
    theta: ThetaDefaults,
    /// `sliding_window` when the key is absent (an explicit null stays none).
    sliding_window: Option<i64>,
}

fn family_defaults(model_type: &str) -> FamilyDefaults {
    let base = FamilyDefaults {
        rms_norm_eps: 1e-6,
        tie_word_embeddings: false,
        max_positions: 2048,
        theta: ThetaDefaults {
            global: 10000.0,
            local: None,
        },
        sliding_window: None,
    };
    match model_type {
        "mistral" => FamilyDefaults {
            max_positions: 131_072,
            sliding_window: Some(4096),
            ..base
        },
        "qwen2" | "qwen3" => FamilyDefaults {
            max_positions: 32_768,
            sliding_window: Some(4096),
            ..base
        },
        "smollm3" => FamilyDefaults {
            tie_word_embeddings: true,
            max_positions: 32_768,
            theta: ThetaDefaults {
                global: 2e6,
                local: None,
            },
            ..base
        },
        "olmo2" => FamilyDefaults {
            rms_norm_eps: 1e-5,
            ..base
        },
        "phi3" => FamilyDefaults {
            rms_norm_eps: 1e-5,
            max_positions: 4096,
            ..base
        },
        "gemma" => FamilyDefaults {
            tie_word_embeddings: true,
            max_positions: 8192,
            ..base
        },
        "gemma2" => FamilyDefaults {
            tie_word_embeddings: true,
            max_positions: 8192,
            sliding_window: Some(4096),
            ..base
        },
        "gemma3_text" => FamilyDefaults {
            tie_word_embeddings: true,
            max_positions: 131_072,
            theta: ThetaDefaults {
                global: 1e6,
                local: Some(10000.0),
            },
            sliding_window: Some(4096),
            ..base
        },
        _ => base,
    }
}

/// A key of `raw` when present: `Some(None)` for an explicit null.
fn present(raw: &Value, key: &str) -> Option<Option<f64>> {
    raw.get(key).map(Value::as_f64)
}

/// The Llama-family configs: Llama, Mistral, Qwen2 (qkv bias) and Qwen3
/// (q/k norm, explicit `head_dim`). Keys that would change the math and
/// are not implemented are refused by name.
fn llama_family(c: &RawConfig, model_type: &str, raw: Value) -> anyhow::Result<ModelConfig> {
    let gemma = model_type.starts_with("gemma");
    let defaults = family_defaults(model_type);
    // Gemma 2/3 name it `hidden_activation`; Gemma and the rest `hidden_act`.
    let act = c.hidden_activation.as_ref().or(c.hidden_act.as_ref());
    let activation = match act.map(String::as_str) {
        None if gemma => Activation::GeluTanh,
        None | Some("silu") => Activation::Silu,
        Some("gelu_pytorch_tanh") if gemma => Activation::GeluTanh,
        // The first Gemma releases say `gelu` and mean its tanh
        // approximation; GemmaConfig rewrites it so.
        Some("gelu") if model_type == "gemma" => Activation::GeluTanh,
        Some(other) => anyhow::bail!(
            "activation `{other}` is not supported (silu; gelu_pytorch_tanh for Gemma)"
        ),
    };
    anyhow::ensure!(
        c.use_bidirectional_attention != Some(true),
        "use_bidirectional_attention: true is not supported (causal attention only)"
    );
    anyhow::ensure!(
        c.mlp_bias != Some(true),
        "mlp_bias: true is not supported (MLP projections without bias only)"
    );
    let hidden = c.hidden_size.context("hidden_size")?;
    let heads = c.num_attention_heads.context("num_attention_heads")?;
    // Qwen3Config's default is 128; the others derive it.
    let head_dim = match (c.head_dim, model_type) {
        (Some(hd), _) => hd,
        (None, "qwen3") => 128,
        (None, t) if t.starts_with("gemma") => 256,
        (None, _) => {
            anyhow::ensure!(
                hidden % heads == 0,
                "hidden_size {hidden} is not a multiple of num_attention_heads {heads}"
            );
            hidden / heads
        }
    };
    anyhow::ensure!(
        head_dim % 2 == 0,
        "head_dim {head_dim} is odd (RoPE rotates pairs)"
    );
    let kv = c.num_key_value_heads.unwrap_or(heads);
    anyhow::ensure!(
        heads % kv == 0,
        "num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}"
    );
    let max_positions = c.max_position_embeddings.unwrap_or(defaults.max_positions);
    let num_layers = c.num_hidden_layers.context("num_hidden_layers")?;
    let (rope, local_rope) = Rope::per_layer_type(&raw, max_positions, defaults.theta)?;
    rope.check_dim(head_dim)?;
    let layer_rope = layer_rope(c, &raw, model_type, num_layers)?;
    let sliding_window = match present(&raw, "sliding_window") {
        Some(window) => window.map(|w| w as i64),
        None => defaults.sliding_window,
    };
    let layer_windows =
        layer_windows(c, &raw, model_type, num_layers, sliding_window, &layer_rope)?;
    // Gemma 2 caps scores at 50 and logits at 30 unless told otherwise
    // (an explicit null turns a cap off).
    let softcap = |key: &str, default: f64| match present(&raw, key) {
        Some(cap) => cap,
        None => Some(default),
    };
    let (attn_softcap, final_softcap) = match model_type {
        "gemma2" => (
            softcap("attn_logit_softcapping", 50.0),
            softcap("final_logit_softcapping", 30.0),
        ),
        // GemmaForCausalLM caps nothing, whatever the config carries.
        "gemma" => (None, None),
        _ if gemma => (None, c.final_logit_softcapping),
        _ => (None, None),
    };
    // Gemma 2 and 3 scale scores by `query_pre_attn_scalar` (256 by
    // default), Gemma by `head_dim` (a `query_pre_attn_scalar` in its
    // config is not read by transformers either).
    let attn_scalar = match model_type {
        "gemma2" | "gemma3_text" => Some(c.query_pre_attn_scalar.unwrap_or(256.0)),
        _ => None,
    };
    // Qwen2 has q/k/v biases and no others, whatever the config says;
    // Llama and Qwen3 put `attention_bias` on all four projections.
    let (qkv_bias, o_bias) = match model_type {
        "qwen2" => (true, false),
        "mistral" => (false, false),
        _ => (
            c.attention_bias.unwrap_or(false),
            c.attention_bias.unwrap_or(false),
        ),
    };
    Ok(ModelConfig {
        arch: Arch::Llama,
        vocab_size: c.vocab_size,
        hidden_size: hidden,
        num_layers,
        num_heads: heads,
        num_kv_heads: kv,
        head_dim,
        intermediate_size: c.intermediate_size.context("intermediate_size")?,
        max_positions,
        norm_eps: c.rms_norm_eps.unwrap_or(defaults.rms_norm_eps),
        rope: Some(rope),
        local_rope,
        activation,
        fused_projections: model_type == "phi3",
        gemma: GemmaVariant {
            embed_scale: gemma.then(|| (hidden as f64).sqrt()),
            attn_scale: attn_scalar.map(|s| s.powf(-0.5)),
            attn_softcap,
            final_softcap,
            norm_unit_offset: gemma,
        },
        tie_word_embeddings: c
            .tie_word_embeddings
            .unwrap_or(defaults.tie_word_embeddings),
        qkv_bias,
        o_bias,
        qk_norm: match model_type {
            "qwen3" | "gemma3_text" => QkNorm::PerHead,
            "olmo2" => QkNorm::Whole,
            _ => QkNorm::None,
        },
        norm_placement: match model_type {
            "olmo2" => NormPlacement::Post,
            "gemma2" | "gemma3_text" => NormPlacement::Sandwich,
            _ => NormPlacement::Pre,
        },
        layer_windows,
        layer_rope,
        dropout: 0.0,
        bos_token_id: token_id(&c.bos_token_id),
        eos_token_id: token_id(&c.eos_token_id),
        stop_token_ids: c.eos_token_id.as_ref().map(token_ids).unwrap_or_default(),
        pad_token_id: token_id(&c.pad_token_id),
        raw,
    })
}

/// The `model_type`s [`Arch::Llama`] covers.
pub const LLAMA_FAMILY: [&str; 10] = [
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "smollm3",
    "olmo2",
    "gemma",
    "gemma2",
    "gemma3_text",
    "phi3",
];

/// Per layer: whether RoPE rotates it. SmolLM3 leaves it out where
/// `no_rope_layers` says 0, by default every `no_rope_layer_interval`-th
/// layer (4); every other family rotates every layer.
fn layer_rope(
    c: &RawConfig,
    raw: &Value,
    model_type: &str,
    num_layers: i64,
) -> anyhow::Result<Vec<bool>> {
    let n = num_layers as usize;
    if model_type != "smollm3" {
        return Ok(vec![true; n]);
    }
    match &c.no_rope_layers {
        Some(flags) => {
            anyhow::ensure!(
                flags.len() == n,
                "no_rope_layers has {} entries for {num_layers} layers",
                flags.len()
            );
            Ok(flags.iter().map(|&f| f != 0).collect())
        }
        None => {
            let every = raw
                .get("no_rope_layer_interval")
                .and_then(Value::as_i64)
                .unwrap_or(4);
            anyhow::ensure!(every > 0, "no_rope_layer_interval {every} is not positive");
            Ok((0..num_layers).map(|i| (i + 1) % every != 0).collect())
        }
    }
}

/// Each layer's sliding window: Mistral's and Phi-3's `sliding_window` on
/// every layer; else `layer_types` (transformers 5 spells every family's
/// choice out there); else as each config class derives `layer_types`:
/// Gemma 2 alternates (sliding first), Gemma 3 slides on all but every
/// `sliding_window_pattern`-th layer (6), SmolLM3 slides on its layers
/// without RoPE when `use_sliding_window`, Qwen from `max_window_layers` on.
fn layer_windows(
    c: &RawConfig,
    raw: &Value,
    model_type: &str,
    num_layers: i64,
    sliding_window: Option<i64>,
    layer_rope: &[bool],
) -> anyhow::Result<Vec<Option<i64>>> {
    let n = num_layers as usize;
    let window = || sliding_window.context("sliding_attention layers need `sliding_window`");
    // Their models slide the window on every layer whenever it is set.
    if model_type == "mistral" || model_type == "phi3" {
        return Ok(vec![sliding_window; n]);
    }
    if let Some(types) = &c.layer_types {
        anyhow::ensure!(
            types.len() == n,
            "layer_types has {} entries for {num_layers} layers",
            types.len()
        );
        return types
            .iter()
            .map(|t| match t.as_str() {
                "full_attention" => Ok(None),
                "sliding_attention" => window().map(Some),
                other => anyhow::bail!(
                    "layer_types `{other}` is not supported (full_attention, sliding_attention)"
                ),
            })
            .collect();
    }
    let sliding: Vec<bool> = match model_type {
        "gemma2" => (0..n).map(|i| (i + 1) % 2 != 0).collect(),
        "gemma3_text" => {
            let every = raw
                .get("sliding_window_pattern")
                .and_then(Value::as_i64)
                .unwrap_or(6);
            anyhow::ensure!(every > 0, "sliding_window_pattern {every} is not positive");
            (0..num_layers).map(|i| (i + 1) % every != 0).collect()
        }
        "smollm3" => {
            let on = c.use_sliding_window == Some(true) && sliding_window.is_some();
            layer_rope.iter().map(|&rope| on && !rope).collect()
        }
        _ if c.use_sliding_window == Some(true) => {
            let from = c.max_window_layers.unwrap_or(28);
            (0..num_layers).map(|i| i >= from).collect()
        }
        _ => vec![false; n],
    };
    sliding
        .into_iter()
        .map(|slides| if slides { window().map(Some) } else { Ok(None) })
        .collect()
}

impl ModelConfig {
    /// Reads `dir/config.json`.
    pub fn load(dir: &Path) -> anyhow::Result<ModelConfig> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let raw: Value =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        let mut cfg = Self::from_json(raw).with_context(|| format!("in {}", path.display()))?;
        let generation = dir.join("generation_config.json");
        if let Ok(text) = std::fs::read_to_string(&generation) {
            let g: Value = serde_json::from_str(&text)
                .with_context(|| format!("parsing {}", generation.display()))?;
            for id in token_ids(&g["eos_token_id"]) {
                if !cfg.stop_token_ids.contains(&id) {
                    cfg.stop_token_ids.push(id);
                }
            }
        }
        Ok(cfg)
    }

    /// Builds the config from a parsed `config.json`.
    pub fn from_json(raw: Value) -> anyhow::Result<ModelConfig> {
        let c: RawConfig = serde_json::from_value(raw.clone())?;
        let model_type = c.model_type.clone().unwrap_or_default();
        let cfg = match model_type.as_str() {
            "gpt2" => {
                let hidden = c.n_embd.context("n_embd")?;
                anyhow::ensure!(
                    hidden % c.n_head.context("n_head")? == 0,
                    "n_embd is not a multiple of n_head"
                );
                if let Some(act) = &c.activation_function {
                    anyhow::ensure!(
                        act == "gelu_new" || act == "gelu_pytorch_tanh",
                        "GPT-2 activation `{act}` is not supported"
                    );
                }
                // Scores are scaled by 1/sqrt(head_dim), alone.
                anyhow::ensure!(
                    raw.get("scale_attn_weights").and_then(Value::as_bool) != Some(false),
                    "scale_attn_weights: false is not supported (attention scores are scaled by 1/sqrt(head_dim))"
                );
                anyhow::ensure!(
                    raw.get("scale_attn_by_inverse_layer_idx")
                        .and_then(Value::as_bool)
                        != Some(true),
                    "scale_attn_by_inverse_layer_idx: true is not supported"
                );
                ModelConfig {
                    arch: Arch::Gpt2,
                    vocab_size: c.vocab_size,
                    hidden_size: hidden,
                    num_layers: c.n_layer.context("n_layer")?,
                    num_heads: c.n_head.context("n_head")?,
                    num_kv_heads: c.n_head.context("n_head")?,
                    head_dim: hidden / c.n_head.context("n_head")?,
                    intermediate_size: c.n_inner.unwrap_or(4 * hidden),
                    max_positions: c.n_positions.unwrap_or(1024),
                    norm_eps: c.layer_norm_epsilon.unwrap_or(1e-5),
                    rope: None,
                    local_rope: None,
                    activation: Activation::GeluTanh,
                    gemma: GemmaVariant::default(),
                    fused_projections: false,
                    tie_word_embeddings: c.tie_word_embeddings.unwrap_or(true),
                    qkv_bias: true,
                    o_bias: true,
                    qk_norm: QkNorm::None,
                    norm_placement: NormPlacement::Pre,
                    layer_windows: vec![None; c.n_layer.context("n_layer")? as usize],
                    layer_rope: Vec::new(),
                    dropout: c.resid_pdrop.unwrap_or(0.0),
                    bos_token_id: token_id(&c.bos_token_id),
                    eos_token_id: token_id(&c.eos_token_id),
                    stop_token_ids: c.eos_token_id.as_ref().map(token_ids).unwrap_or_default(),
                    pad_token_id: token_id(&c.pad_token_id),
                    raw,
                }
            }
            t if LLAMA_FAMILY.contains(&t) => llama_family(&c, &model_type, raw)?,
            other => {
                anyhow::bail!(
                    "model_type `{other}` is not supported (gpt2, {})",
                    LLAMA_FAMILY.join(", ")
                )
            }
        };
        Ok(cfg)
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn stop_ids_come_from_the_config_and_the_generation_config() {
        let dir = tempfile::tempdir().unwrap();
        let mut raw = ModelConfig::gpt2_json(96, 32, 16, 1, 2, 0, 0.0);
        raw["eos_token_id"] = json!([0, 3]);
        std::fs::write(dir.path().join("config.json"), raw.to_string()).unwrap();
        assert_eq!(
            ModelConfig::load(dir.path()).unwrap().stop_token_ids,
            vec![0, 3]
        );
        // Llama 3's generation_config.json lists <|eot_id|> beside the EOS.
        std::fs::write(
            dir.path().join("generation_config.json"),
            json!({"eos_token_id": [3, 9]}).to_string(),
        )
        .unwrap();
        let cfg = ModelConfig::load(dir.path()).unwrap();
        assert_eq!(cfg.stop_token_ids, vec![0, 3, 9]);
        assert_eq!(cfg.eos_token_id, Some(0));
    }

    fn qwen3(extra: Value) -> anyhow::Result<ModelConfig> {
        let mut raw = json!({
            "model_type": "qwen3", "vocab_size": 96, "hidden_size": 32, "head_dim": 16,
            "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "use_sliding_window": false, "sliding_window": null,
            "layer_types": ["full_attention", "full_attention"],
        });
        for (k, v) in extra.as_object().unwrap() {
            raw[k] = v.clone();
        }
        ModelConfig::from_json(raw)
    }

    #[test]
    fn qwen3_has_its_own_head_dim_and_qk_norm() {
        let cfg = qwen3(json!({})).unwrap();
        assert_eq!((cfg.head_dim, cfg.num_heads, cfg.hidden_size), (16, 4, 32));
        assert!(cfg.qk_norm == QkNorm::PerHead && !cfg.qkv_bias && !cfg.o_bias);
        let biased = qwen3(json!({"attention_bias": true})).unwrap();
        assert!(biased.qkv_bias && biased.o_bias);
    }

    #[test]
    fn sliding_windows_per_layer() {
        let qwen = qwen3(json!({"use_sliding_window": true, "sliding_window": 8, "max_window_layers": 1, "layer_types": null}))
            .unwrap();
        assert_eq!(qwen.layer_windows, [None, Some(8)]);
        let typed = qwen3(
            json!({"layer_types": ["sliding_attention", "full_attention"], "sliding_window": 4}),
        )
        .unwrap();
        assert_eq!(typed.layer_windows, [Some(4), None]);
        let mut mistral = qwen3(json!({})).unwrap().raw;
        mistral["model_type"] = json!("mistral");
        mistral["sliding_window"] = json!(16);
        let mistral = ModelConfig::from_json(mistral).unwrap();
        assert_eq!(mistral.layer_windows, [Some(16), Some(16)]);
        assert_eq!(qwen3(json!({})).unwrap().layer_windows, [None, None]);
    }

    /// A config of `model_type` with only the keys no family defaults,
    /// plus `extra`.
    fn bare(model_type: &str, layers: i64, extra: Value) -> ModelConfig {
        let mut raw = json!({
            "model_type": model_type, "vocab_size": 96, "hidden_size": 32,
            "intermediate_size": 64, "num_hidden_layers": layers, "num_attention_heads": 4,
            "head_dim": 8,
        });
        for (k, v) in extra.as_object().unwrap() {
            raw[k] = v.clone();
        }
        ModelConfig::from_json(raw).unwrap()
    }

    /// What transformers' classes do with keys of other variants: Gemma 1
    /// reads neither Gemma 2's caps nor its score scalar; Phi-3 reads its
    /// early `su` / `yarn` RoPE names as LongRoPE; GPT-2's score scalings
    /// other than 1/sqrt(head_dim) are refused by name.
    #[test]
    fn keys_of_other_variants_are_read_as_transformers_reads_them() {
        let gemma = bare(
            "gemma",
            2,
            json!({"final_logit_softcapping": 1.0, "query_pre_attn_scalar": 1.0}),
        );
        assert_eq!(
            (gemma.gemma.final_softcap, gemma.gemma.attn_scale),
            (None, None)
        );
        for name in ["su", "yarn"] {
            let factors: Vec<f64> = vec![1.0; 4];
            let phi3 = bare(
                "phi3",
                2,
                json!({
                    "max_position_embeddings": 128, "original_max_position_embeddings": 32,
                    "rope_scaling": {"type": name, "short_factor": factors, "long_factor": factors}
                }),
            );
            let scaling = &phi3.rope.as_ref().unwrap().scaling;
            assert!(
                matches!(scaling, crate::model::rope::Scaling::LongRope { .. }),
                "{name}: {scaling:?}"
            );
        }
        for (key, value) in [
            ("scale_attn_weights", false),
            ("scale_attn_by_inverse_layer_idx", true),
        ] {
            let mut raw = ModelConfig::gpt2_json(64, 16, 16, 1, 2, 0, 0.0);
            raw[key] = value.into();
            let err = format!("{:#}", ModelConfig::from_json(raw).unwrap_err());
            assert!(err.contains(key), "{err}");
        }
    }

    /// transformers 5's config classes' defaults (checked against
    /// `Phi3Config()`, `Gemma3TextConfig()`... of transformers 5.23).
    #[test]
    fn absent_keys_take_their_familys_defaults() {
        let phi3 = bare("phi3", 2, json!({}));
        assert_eq!(
            (phi3.norm_eps, phi3.max_positions, phi3.tie_word_embeddings),
            (1e-5, 4096, false)
        );
        assert_eq!(phi3.layer_windows, [None, None]);
        assert_eq!(bare("olmo2", 2, json!({})).norm_eps, 1e-5);
        let llama = bare("llama", 2, json!({}));
        assert_eq!((llama.norm_eps, llama.max_positions), (1e-6, 2048));
        assert_eq!(llama.rope.as_ref().unwrap().theta, 1e4);
        // Mistral slides 4096 keys unless the key is null (v0.2 on).
        assert_eq!(bare("mistral", 2, json!({})).layer_windows, [Some(4096); 2]);
        let unwindowed = bare("mistral", 2, json!({"sliding_window": null}));
        assert_eq!(unwindowed.layer_windows, [None, None]);
        let qwen = bare(
            "qwen2",
            2,
            json!({"use_sliding_window": true, "max_window_layers": 1}),
        );
        assert_eq!(qwen.layer_windows, [None, Some(4096)]);
        assert_eq!(qwen.max_positions, 32_768);
        // SmolLM3: no RoPE on every 4th layer, which slides when asked to.
        let smol = bare("smollm3", 4, json!({}));
        assert_eq!(smol.layer_rope, [true, true, true, false]);
        assert_eq!(smol.rope.as_ref().unwrap().theta, 2e6);
        assert!(smol.tie_word_embeddings);
        assert_eq!(smol.layer_windows, [None; 4]);
        let sliding = bare(
            "smollm3",
            4,
            json!({"use_sliding_window": true, "sliding_window": 8}),
        );
        assert_eq!(sliding.layer_windows, [None, None, None, Some(8)]);
        // Gemma 2: alternating windows, scores capped at 50, logits at 30.
        let g2 = bare("gemma2", 3, json!({}));
        assert_eq!(g2.layer_windows, [Some(4096), None, Some(4096)]);
        assert_eq!(
            (g2.gemma.attn_softcap, g2.gemma.final_softcap),
            (Some(50.0), Some(30.0))
        );
        assert_eq!(g2.gemma.attn_scale, Some(1.0 / 16.0));
        assert!(g2.tie_word_embeddings);
        let uncapped = bare(
            "gemma2",
            2,
            json!({"attn_logit_softcapping": null, "final_logit_softcapping": null}),
        );
        assert_eq!(
            (uncapped.gemma.attn_softcap, uncapped.gemma.final_softcap),
            (None, None)
        );
        // Gemma 3: five sliding layers in six, bases 1e4 (local) and 1e6.
        let g3 = bare("gemma3_text", 7, json!({"sliding_window": 512}));
        let w = Some(512);
        assert_eq!(g3.layer_windows, [w, w, w, w, w, None, w]);
        assert_eq!(g3.rope.as_ref().unwrap().theta, 1e6);
        assert_eq!(g3.local_rope.as_ref().unwrap().theta, 1e4);
        let hub = bare(
            "gemma3_text",
            4,
            json!({"sliding_window_pattern": 2, "rope_theta": 5e5, "rope_local_base_freq": 2e4}),
        );
        assert_eq!(hub.layer_windows, [Some(4096), None, Some(4096), None]);
        assert_eq!(hub.rope.as_ref().unwrap().theta, 5e5);
        assert_eq!(hub.local_rope.as_ref().unwrap().theta, 2e4);
        // The first Gemma releases' `gelu` is the tanh form.
        let gelu = bare("gemma", 2, json!({"hidden_act": "gelu"}));
        assert!(matches!(gelu.activation, Activation::GeluTanh));
    }

    #[test]
    fn keys_that_change_the_math_are_refused_by_name() {
        for (extra, needle) in [
            (
                json!({"layer_types": ["full_attention", "chunked_attention"]}),
                "layer_types `chunked_attention`",
            ),
            (
                json!({"layer_types": ["full_attention", "sliding_attention"]}),
                "need `sliding_window`",
            ),
            (json!({"mlp_bias": true}), "mlp_bias"),
            (json!({"hidden_act": "gelu"}), "activation `gelu`"),
            (
                json!({"use_bidirectional_attention": true}),
                "use_bidirectional_attention",
            ),
            (
                json!({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}),
                "rope_type `dynamic`",
            ),
        ] {
            let err = format!("{:#}", qwen3(extra).unwrap_err());
            assert!(err.contains(needle), "{err}");
        }
    }
}
