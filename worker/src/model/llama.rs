//! The Llama family (Llama, Qwen2, Qwen3, SmolLM, Mistral): RoPE, RMSNorm,
//! SwiGLU, grouped-query attention, under transformers' `LlamaModel` names
//! (Qwen3 adds `q_norm` and `k_norm` to each attention block).

use tch::{nn, Kind, Tensor};

use super::attention::{attend, KvCache, Mask, Queries};
use super::config::ModelConfig;
use super::linear::{Layout, Linear, LoraConfig, Norm};
use super::recompute;

#[derive(Debug)]
struct Layer {
    input_layernorm: Norm,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    /// Qwen3's per-head RMSNorm of queries and keys, before RoPE.
    q_norm: Option<Norm>,
    k_norm: Option<Norm>,
    post_attention_layernorm: Norm,
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
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
                Layer {
                    input_layernorm: Norm::rms_norm(&l / "input_layernorm", h, cfg.norm_eps),
                    q_proj: lin(&a / "q_proj", h, cfg.num_heads * hd, cfg.qkv_bias),
                    k_proj: lin(&a / "k_proj", h, cfg.num_kv_heads * hd, cfg.qkv_bias),
                    v_proj: lin(&a / "v_proj", h, cfg.num_kv_heads * hd, cfg.qkv_bias),
                    o_proj: lin(&a / "o_proj", cfg.num_heads * hd, h, cfg.o_bias),
                    q_norm: cfg
                        .qk_norm
                        .then(|| Norm::rms_norm(&a / "q_norm", hd, cfg.norm_eps)),
                    k_norm: cfg
                        .qk_norm
                        .then(|| Norm::rms_norm(&a / "k_norm", hd, cfg.norm_eps)),
                    post_attention_layernorm: Norm::rms_norm(
                        &l / "post_attention_layernorm",
                        h,
                        cfg.norm_eps,
                    ),
                    gate_proj: lin(&m / "gate_proj", h, cfg.intermediate_size, false),
                    up_proj: lin(&m / "up_proj", h, cfg.intermediate_size, false),
                    down_proj: lin(&m / "down_proj", cfg.intermediate_size, h, false),
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
    /// With `recompute` (each layer's trainable tensors), layers run under
    /// activation checkpointing when autograd records (not with a cache,
    /// nor the last layer with `keep`).
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        mask: &Mask,
        mut cache: Option<&mut KvCache>,
        keep: Option<&Queries>,
        train: bool,
        recompute: Option<&[Vec<Tensor>]>,
    ) -> Tensor {
        let mut x = Tensor::embedding(&self.embed_tokens, ids, -1, false, false);
        let (cos, sin) = self.rope(positions, x.kind());
        let last = self.layers.len() - 1;
        for (i, layer) in self.layers.iter().enumerate() {
            let kept = keep.filter(|_| i == last);
            x = match recompute.filter(|_| cache.is_none() && kept.is_none()) {
                Some(params) => {
                    let (cos, sin, mask) = (
                        cos.shallow_clone(),
                        sin.shallow_clone(),
                        mask.shallow_clone(),
                    );
                    // SAFETY: the closure borrows only `self`'s layer (the
                    // model outlives its training steps) and owns the rest.
                    unsafe {
                        recompute::checkpoint(&x, &params[i], move |x| {
                            self.layer(layer, x, (&cos, &sin), &mask, None, None, train)
                        })
                    }
                }
                None => self.layer(
                    layer,
                    &x,
                    (&cos, &sin),
                    mask,
                    cache.as_deref_mut().map(|c| (c, i)),
                    kept,
                    train,
                ),
            };
        }
        self.norm.forward(&x)
    }

    /// One decoder layer. With `keep`, the result holds only the kept
    /// positions (see [`Queries`]).
    ///
    /// # Shapes
    /// `x`: `[b, t, hidden]`; `rope`: cos and sin `[b, 1, t, head_dim]` ->
    /// `[b, t, hidden]` (`[b, q, hidden]` with `keep`).
    #[allow(clippy::too_many_arguments)]
    fn layer(
        &self,
        layer: &Layer,
        x: &Tensor,
        (cos, sin): (&Tensor, &Tensor),
        mask: &Mask,
        cache: Option<(&mut KvCache, usize)>,
        keep: Option<&Queries>,
        train: bool,
    ) -> Tensor {
        let (b, t, _) = x.size3().expect("hidden states are [batch, time, hidden]");
        let rotate = |v: &Tensor| {
            let half = self.head_dim / 2;
            let rotated = Tensor::cat(&[-v.narrow(-1, half, half), v.narrow(-1, 0, half)], -1);
            v * cos + rotated * sin
        };
        let a = layer.input_layernorm.forward(x);
        let heads = |proj: &Linear, n: i64, norm: &Option<Norm>| {
            let x = proj.forward(&a, train).view([b, t, n, self.head_dim]);
            match norm {
                Some(norm) => norm.forward(&x),
                None => x,
            }
            .transpose(1, 2)
        };
        let q = heads(&layer.q_proj, self.heads, &layer.q_norm);
        let k = heads(&layer.k_proj, self.kv_heads, &layer.k_norm);
        let v = layer
            .v_proj
            .forward(&a, train)
            .view([b, t, self.kv_heads, self.head_dim])
            .transpose(1, 2);
        let (q, k) = (rotate(&q), rotate(&k));
        let (k, v) = match cache {
            Some((c, i)) => c.append(i, k, v),
            None => (k, v),
        };
        // The last layer's queries (and everything after attention)
        // only at the kept positions.
        let (x, q, mask, q_len) = match keep {
            Some(kept) => (
                kept.take(x, 1),
                kept.take(&q, 2),
                &kept.mask,
                kept.per_row(),
            ),
            None => (x.shallow_clone(), q, mask, t),
        };
        let y = attend(&q, &k, &v, mask, 0.0, train)
            .transpose(1, 2)
            .reshape([b, q_len, -1]);
        let x = x + layer.o_proj.forward(&y, train);
        let m = layer.post_attention_layernorm.forward(&x);
        let m = layer.gate_proj.forward(&m, train).silu() * layer.up_proj.forward(&m, train);
        x + layer.down_proj.forward(&m, train)
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
