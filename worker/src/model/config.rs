//! Model configuration from a Hugging Face `config.json`: the GPT-2 family
//! and the Llama family (Llama, Qwen2, Qwen3, SmolLM2/3, Mistral, OLMo 2
//! configs).

use std::path::Path;

use anyhow::Context;
use serde::Deserialize;
use serde_json::Value;

use super::rope::Rope;

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
    attn_logit_softcapping: Option<f64>,
    final_logit_softcapping: Option<f64>,
    use_bidirectional_attention: Option<bool>,
    head_dim: Option<i64>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    // Sliding-window attention: Mistral (every layer), Qwen2/Qwen3
    // (`use_sliding_window` from `max_window_layers` on), `layer_types`.
    use_sliding_window: Option<bool>,
    sliding_window: Option<i64>,
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

/// The Llama-family configs: Llama, Mistral, Qwen2 (qkv bias) and Qwen3
/// (q/k norm, explicit `head_dim`). Keys that would change the math and
/// are not implemented are refused by name.
fn llama_family(c: &RawConfig, model_type: &str, raw: Value) -> anyhow::Result<ModelConfig> {
    let gemma = model_type.starts_with("gemma");
    // Gemma 2/3 name it `hidden_activation`; Gemma and the rest `hidden_act`.
    let act = c.hidden_activation.as_ref().or(c.hidden_act.as_ref());
    let activation = match act.map(String::as_str) {
        None if gemma => Activation::GeluTanh,
        None | Some("silu") => Activation::Silu,
        Some("gelu_pytorch_tanh") if gemma => Activation::GeluTanh,
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
    let max_positions = c.max_position_embeddings.unwrap_or(2048);
    let num_layers = c.num_hidden_layers.context("num_hidden_layers")?;
    let layer_windows = layer_windows(c, model_type, num_layers)?;
    let (rope, local_rope) = Rope::per_layer_type(&raw, max_positions)?;
    rope.check_dim(head_dim)?;
    let layer_rope = match &c.no_rope_layers {
        Some(flags) if model_type == "smollm3" => {
            anyhow::ensure!(
                flags.len() == num_layers as usize,
                "no_rope_layers has {} entries for {num_layers} layers",
                flags.len()
            );
            flags.iter().map(|&f| f != 0).collect()
        }
        _ => vec![true; num_layers as usize],
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
        norm_eps: c.rms_norm_eps.unwrap_or(1e-6),
        rope: Some(rope),
        local_rope,
        activation,
        fused_projections: model_type == "phi3",
        gemma: GemmaVariant {
            embed_scale: gemma.then(|| (hidden as f64).sqrt()),
            attn_scale: c
                .query_pre_attn_scalar
                .filter(|_| gemma)
                .map(|s| s.powf(-0.5)),
            attn_softcap: c.attn_logit_softcapping.filter(|_| model_type == "gemma2"),
            final_softcap: c.final_logit_softcapping.filter(|_| gemma),
            norm_unit_offset: gemma,
        },
        tie_word_embeddings: c.tie_word_embeddings.unwrap_or(gemma),
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

/// Each layer's sliding window: Mistral's and Phi-3's `sliding_window` on every layer;
/// else `layer_types` (transformers 5 spells every family's choice out
/// there), else Qwen's `use_sliding_window` from `max_window_layers` on.
fn layer_windows(
    c: &RawConfig,
    model_type: &str,
    num_layers: i64,
) -> anyhow::Result<Vec<Option<i64>>> {
    let n = num_layers as usize;
    let window = || {
        c.sliding_window
            .context("sliding_attention layers need `sliding_window`")
    };
    // Their models slide the window on every layer whenever it is set.
    if model_type == "mistral" || model_type == "phi3" {
        return Ok(vec![c.sliding_window; n]);
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
    if c.use_sliding_window == Some(true) {
        let from = c.max_window_layers.unwrap_or(28);
        let w = window()?;
        return Ok((0..num_layers).map(|i| (i >= from).then_some(w)).collect());
    }
    Ok(vec![None; n])
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
