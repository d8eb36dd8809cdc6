//! The Llama family (Llama, Qwen2, Qwen3, SmolLM2/3, Mistral, OLMo 2): RoPE,
//! RMSNorm, SwiGLU, grouped-query attention, under transformers'
//! `LlamaModel` names. The variants: Qwen3 and OLMo 2 add `q_norm` and
//! `k_norm` (per head, or over the whole projection), OLMo 2 normalises
//! each sublayer's output instead of its input, Mistral and Qwen may slide
//! a window over the keys, SmolLM3 leaves RoPE out of some layers.

use tch::{nn, Kind, Tensor};

use super::attention::{attend, KvCache, Mask, Queries};
use super::config::{ModelConfig, NormPlacement, QkNorm};
use super::linear::{Layout, Linear, LoraConfig, Norm};

#[derive(Debug)]
struct Layer {
    /// Norm of the attention's input (`input_layernorm`; `Pre` placement).
    attn_in_norm: Option<Norm>,
    /// Norm of the attention's output (`post_attention_layernorm`; `Post`).
    attn_out_norm: Option<Norm>,
    /// Norm of the MLP's input (`post_attention_layernorm`; `Pre`).
    mlp_in_norm: Option<Norm>,
    /// Norm of the MLP's output (`post_feedforward_layernorm`; `Post`).
    mlp_out_norm: Option<Norm>,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    /// RMSNorm of queries and keys before RoPE.
    q_norm: Option<Norm>,
    k_norm: Option<Norm>,
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
    /// The sliding window over keys, `None` for full attention.
    window: Option<i64>,
    /// Whether RoPE rotates this layer's queries and keys.
    rope: bool,
    /// `q_norm`/`k_norm` span the whole projection (OLMo 2), not each head.
    whole_qk_norm: bool,
}

/// `norm` applied to `x` when there is one.
fn maybe(norm: &Option<Norm>, x: Tensor) -> Tensor {
    match norm {
        Some(n) => n.forward(&x),
        None => x,
    }
}

/// `model.*` of a Llama-family checkpoint.
#[derive(Debug)]
pub struct Llama {
    pub embed_tokens: Tensor,
    layers: Vec<Layer>,
    norm: Norm,
    heads: i64,
    kv_heads: i64,
    head_dim: i64,
    /// `[head_dim / 2]`, float32.
    inv_freq: Tensor,
    /// YaRN's factor on cos and sin (1 for the other scalings).
    rope_factor: f64,
}

impl Llama {
    pub fn new(p: nn::Path, cfg: &ModelConfig, lora: Option<&LoraConfig>) -> Llama {
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let embed_tokens = (&p / "embed_tokens").var(
            "weight",
            &[cfg.vocab_size, h],
            nn::Init::Randn {
                mean: 0.0,
                stdev: 0.02,
            },
        );
        let layers = (0..cfg.num_layers)
            .map(|i| {
                let l = &p / "layers" / i;
                let a = &l / "self_attn";
                let m = &l / "mlp";
                let lin = |path: nn::Path, i_: i64, o: i64, bias: bool| {
                    Linear::new(path, i_, o, bias, Layout::OutIn, lora)
                };
                let norm = |name: &str| Norm::rms_norm(&l / name, h, cfg.norm_eps);
                let pre = cfg.norm_placement == NormPlacement::Pre;
                let (q_dim, k_dim) = match cfg.qk_norm {
                    QkNorm::None => (None, None),
                    QkNorm::PerHead => (Some(hd), Some(hd)),
                    QkNorm::Whole => (Some(cfg.num_heads * hd), Some(cfg.num_kv_heads * hd)),
                };
                Layer {
                    attn_in_norm: pre.then(|| norm("input_layernorm")),
                    attn_out_norm: (!pre).then(|| norm("post_attention_layernorm")),
                    mlp_in_norm: pre.then(|| norm("post_attention_layernorm")),
                    mlp_out_norm: (!pre).then(|| norm("post_feedforward_layernorm")),
                    q_proj: lin(&a / "q_proj", h, cfg.num_heads * hd, cfg.qkv_bias),
                    k_proj: lin(&a / "k_proj", h, cfg.num_kv_heads * hd, cfg.qkv_bias),
                    v_proj: lin(&a / "v_proj", h, cfg.num_kv_heads * hd, cfg.qkv_bias),
                    o_proj: lin(&a / "o_proj", cfg.num_heads * hd, h, cfg.o_bias),
                    q_norm: q_dim.map(|d| Norm::rms_norm(&a / "q_norm", d, cfg.norm_eps)),
                    k_norm: k_dim.map(|d| Norm::rms_norm(&a / "k_norm", d, cfg.norm_eps)),
                    gate_proj: lin(&m / "gate_proj", h, cfg.intermediate_size, false),
                    up_proj: lin(&m / "up_proj", h, cfg.intermediate_size, false),
                    down_proj: lin(&m / "down_proj", cfg.intermediate_size, h, false),
                    window: cfg.layer_windows[i as usize],
                    rope: cfg.layer_rope[i as usize],
                    whole_qk_norm: cfg.qk_norm == QkNorm::Whole,
                }
            })
            .collect();
        let norm = Norm::rms_norm(&p / "norm", h, cfg.norm_eps);
        let rope = cfg.rope.as_ref().expect("Llama-family configs carry RoPE");
        Llama {
            embed_tokens,
            layers,
            norm,
            heads: cfg.num_heads,
            kv_heads: cfg.num_kv_heads,
            head_dim: hd,
            inv_freq: rope.inv_freq(hd, p.device()),
            rope_factor: rope.attention_factor(),
        }
    }

    /// cos and sin of the rotary embedding at `positions`, as transformers
    /// computes them (float32, then cast to the activations' kind).
    ///
    /// # Shapes
    /// `positions`: `[b, t]` -> two `[b, 1, t, head_dim]`.
    fn rope(&self, positions: &Tensor, kind: Kind) -> (Tensor, Tensor) {
        let freqs = positions.to_kind(Kind::Float).unsqueeze(-1) * self.inv_freq.view([1, 1, -1]);
        let emb = Tensor::cat(&[&freqs, &freqs], -1).unsqueeze(1);
        let (cos, sin) = (emb.cos(), emb.sin());
        // transformers multiplies by the factor in float32 before the cast.
        let (cos, sin) = if self.rope_factor == 1.0 {
            (cos, sin)
        } else {
            (cos * self.rope_factor, sin * self.rope_factor)
        };
        (cos.to_kind(kind), sin.to_kind(kind))
    }

    /// With `keep`, the last layer computes and the result holds only the
    /// kept positions (see [`Queries`]).
    ///
    /// # Shapes
    /// `ids`, `positions`: `[b, t]`; `mask`: `[b, 1, t, past + t]` -> `[b, t, hidden]`
    /// (`[b, q, hidden]` with `keep`).
    pub fn forward(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        mask: &Mask,
        mut cache: Option<&mut KvCache>,
        keep: Option<&Queries>,
        train: bool,
    ) -> Tensor {
        let (b, t) = ids.size2().expect("ids are [batch, time]");
        let mut x = Tensor::embedding(&self.embed_tokens, ids, -1, false, false);
        let (cos, sin) = self.rope(positions, x.kind());
        let rotate = |v: &Tensor| {
            let half = self.head_dim / 2;
            let rotated = Tensor::cat(&[-v.narrow(-1, half, half), v.narrow(-1, 0, half)], -1);
            v * &cos + rotated * &sin
        };
        let last = self.layers.len() - 1;
        let kv_len = cache.as_deref().map_or(0, KvCache::len) + t;
        let device = ids.device();
        for (i, layer) in self.layers.iter().enumerate() {
            let a = maybe(&layer.attn_in_norm, x.shallow_clone());
            let heads = |proj: &Linear, n: i64, norm: &Option<Norm>| {
                let y = proj.forward(&a, train);
                let y = match layer.whole_qk_norm {
                    true => maybe(norm, y).view([b, t, n, self.head_dim]),
                    false => maybe(norm, y.view([b, t, n, self.head_dim])),
                };
                y.transpose(1, 2)
            };
            let q = heads(&layer.q_proj, self.heads, &layer.q_norm);
            let k = heads(&layer.k_proj, self.kv_heads, &layer.k_norm);
            let v = layer
                .v_proj
                .forward(&a, train)
                .view([b, t, self.kv_heads, self.head_dim])
                .transpose(1, 2);
            let (q, k) = match layer.rope {
                true => (rotate(&q), rotate(&k)),
                false => (q, k),
            };
            let (k, v) = match cache.as_deref_mut() {
                Some(c) => c.append(i, k, v),
                None => (k, v),
            };
            // The last layer's queries (and everything after attention)
            // only at the kept positions.
            let (q, mask, q_len) = match keep.filter(|_| i == last) {
                Some(kept) => {
                    x = kept.take(&x, 1);
                    let mask = match layer.window {
                        Some(w) => kept.windowed_mask(kv_len, w),
                        None => kept.mask.shallow_clone(),
                    };
                    (kept.take(&q, 2), mask, kept.per_row())
                }
                None => match layer.window {
                    Some(w) => (q, mask.windowed(t, kv_len, w, device), t),
                    None => (q, mask.shallow_clone(), t),
                },
            };
            let y = attend(&q, &k, &v, &mask, 0.0, train)
                .transpose(1, 2)
                .reshape([b, q_len, -1]);
            x = x + maybe(&layer.attn_out_norm, layer.o_proj.forward(&y, train));
            let m = maybe(&layer.mlp_in_norm, x.shallow_clone());
            let m = layer.gate_proj.forward(&m, train).silu() * layer.up_proj.forward(&m, train);
            x = x + maybe(&layer.mlp_out_norm, layer.down_proj.forward(&m, train));
        }
        self.norm.forward(&x)
    }

    pub fn linears(&self) -> impl Iterator<Item = &Linear> {
        self.layers.iter().flat_map(|l| {
            [
                &l.q_proj,
                &l.k_proj,
                &l.v_proj,
                &l.o_proj,
                &l.gate_proj,
                &l.up_proj,
                &l.down_proj,
            ]
        })
    }

    pub fn linears_mut(&mut self) -> impl Iterator<Item = &mut Linear> {
        self.layers.iter_mut().flat_map(|l| {
            [
                &mut l.q_proj,
                &mut l.k_proj,
                &mut l.v_proj,
                &mut l.o_proj,
                &mut l.gate_proj,
                &mut l.up_proj,
                &mut l.down_proj,
            ]
        })
    }
}
