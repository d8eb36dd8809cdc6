//! The Llama family (Llama, Qwen2, Qwen3, SmolLM2/3, Mistral, OLMo 2): RoPE,
//! RMSNorm, SwiGLU, grouped-query attention, under transformers'
//! `LlamaModel` names. The variants: Qwen3 and OLMo 2 add `q_norm` and
//! `k_norm` (per head, or over the whole projection), OLMo 2 normalises
//! each sublayer's output instead of its input, Mistral and Qwen may slide
//! a window over the keys, SmolLM3 leaves RoPE out of some layers, and
//! Gemma 1/2/3 scale embeddings, use GeGLU and `1 + weight` norms (2 and 3
//! norm both sides of each sublayer; 2 soft-caps attention scores; 3 has
//! its own RoPE base for sliding layers).

use tch::{nn, Kind, Tensor};

use super::attention::{attend, KvCache, Mask, Queries, Scores};
use super::config::{Activation, GemmaVariant, ModelConfig, NormPlacement, QkNorm};
use super::linear::{Layout, Linear, LoraConfig, Norm};
use super::recompute;

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
    qkv: Qkv,
    o_proj: Linear,
    /// RMSNorm of queries and keys before RoPE.
    q_norm: Option<Norm>,
    k_norm: Option<Norm>,
    gate_up: GateUp,
    down_proj: Linear,
    /// The sliding window over keys, `None` for full attention.
    window: Option<i64>,
    /// Whether the local RoPE (not the global one) rotates this layer.
    local_rope: bool,
    /// Whether RoPE rotates this layer's queries and keys.
    rope: bool,
    /// `q_norm`/`k_norm` span the whole projection (OLMo 2), not each head.
    whole_qk_norm: bool,
}

/// The query, key and value projections: three (`q_proj`, `k_proj`,
/// `v_proj`) or one fused (Phi-3's `qkv_proj`, queries then keys then values).
#[derive(Debug)]
enum Qkv {
    Separate { q: Linear, k: Linear, v: Linear },
    Fused(Linear),
}

/// The MLP's input projections: `gate_proj` and `up_proj`, or Phi-3's
/// `gate_up_proj` (gate half first).
#[derive(Debug)]
enum GateUp {
    Separate { gate: Linear, up: Linear },
    Fused(Linear),
}

impl Qkv {
    /// Queries, keys and values of `a`, each `[b, t, width]`.
    fn forward(&self, a: &Tensor, q_width: i64, kv_width: i64, train: bool) -> [Tensor; 3] {
        match self {
            Qkv::Separate { q, k, v } => [
                q.forward(a, train),
                k.forward(a, train),
                v.forward(a, train),
            ],
            Qkv::Fused(qkv) => {
                let y = qkv.forward(a, train);
                [
                    y.narrow(-1, 0, q_width),
                    y.narrow(-1, q_width, kv_width),
                    y.narrow(-1, q_width + kv_width, kv_width),
                ]
            }
        }
    }

    fn linears(&self) -> Vec<&Linear> {
        match self {
            Qkv::Separate { q, k, v } => vec![q, k, v],
            Qkv::Fused(qkv) => vec![qkv],
        }
    }
}

impl GateUp {
    /// The gate's and the up projection's outputs.
    fn forward(&self, m: &Tensor, train: bool) -> (Tensor, Tensor) {
        match self {
            GateUp::Separate { gate, up } => (gate.forward(m, train), up.forward(m, train)),
            GateUp::Fused(gate_up) => {
                let y = gate_up.forward(m, train);
                let half = y.size().last().expect("non-scalar") / 2;
                (y.narrow(-1, 0, half), y.narrow(-1, half, half))
            }
        }
    }

    fn linears(&self) -> Vec<&Linear> {
        match self {
            GateUp::Separate { gate, up } => vec![gate, up],
            GateUp::Fused(gate_up) => vec![gate_up],
        }
    }
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
    /// The global rotary embedding, and the sliding layers' own if any.
    rope: RotaryTable,
    local_rope: Option<RotaryTable>,
    activation: Activation,
    gemma: GemmaVariant,
}

/// What one rotary embedding computes cos and sin from.
#[derive(Debug)]
struct RotaryTable {
    /// `[head_dim / 2]`, float32.
    inv_freq: Tensor,
    /// YaRN's and LongRoPE's factor on cos and sin (1 for the others).
    factor: f64,
    /// LongRoPE's frequencies for a forward pass reaching past the
    /// original context, and its length.
    long: Option<(Tensor, i64)>,
}

impl RotaryTable {
    /// cos and sin of the rotary embedding at `positions`, as transformers
    /// computes them (float32, then cast to the activations' kind).
    ///
    /// # Shapes
    /// `positions`: `[b, t]` -> two `[b, 1, t, head_dim]`.
    fn cos_sin(&self, positions: &Tensor, kind: Kind) -> (Tensor, Tensor) {
        let at = positions.to_kind(Kind::Float).unsqueeze(-1);
        let short = || &at * self.inv_freq.view([1, 1, -1]);
        // As transformers' `longrope_frequency_update`, a pass whose last
        // position passes the original context uses the long factors; but
        // row by row, as transformers would on that row alone: a row's
        // tokens never depend on what else shares its batch.
        let freqs = match &self.long {
            Some((long, original)) if positions.max().int64_value(&[]) + 1 > *original => {
                let past = (positions.amax([1], true) + 1).gt(*original).unsqueeze(-1);
                short().where_self(&past.logical_not(), &(&at * long.view([1, 1, -1])))
            }
            _ => short(),
        };
        let emb = Tensor::cat(&[&freqs, &freqs], -1).unsqueeze(1);
        let (cos, sin) = (emb.cos(), emb.sin());
        // transformers multiplies by the factor in float32 before the cast.
        let (cos, sin) = if self.factor == 1.0 {
            (cos, sin)
        } else {
            (cos * self.factor, sin * self.factor)
        };
        (cos.to_kind(kind), sin.to_kind(kind))
    }
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
                let rms = |path: nn::Path, dim: i64| match cfg.gemma.norm_unit_offset {
                    true => Norm::gemma_rms_norm(path, dim, cfg.norm_eps),
                    false => Norm::rms_norm(path, dim, cfg.norm_eps),
                };
                let norm = |name: &str| rms(&l / name, h);
                let (q_dim, k_dim) = match cfg.qk_norm {
                    QkNorm::None => (None, None),
                    QkNorm::PerHead => (Some(hd), Some(hd)),
                    QkNorm::Whole => (Some(cfg.num_heads * hd), Some(cfg.num_kv_heads * hd)),
                };
                let [attn_in, attn_out, mlp_in, mlp_out] = match cfg.norm_placement {
                    NormPlacement::Pre => [
                        Some("input_layernorm"),
                        None,
                        Some("post_attention_layernorm"),
                        None,
                    ],
                    NormPlacement::Post => [
                        None,
                        Some("post_attention_layernorm"),
                        None,
                        Some("post_feedforward_layernorm"),
                    ],
                    NormPlacement::Sandwich => [
                        Some("input_layernorm"),
                        Some("post_attention_layernorm"),
                        Some("pre_feedforward_layernorm"),
                        Some("post_feedforward_layernorm"),
                    ],
                };
                let window = cfg.layer_windows[i as usize];
                Layer {
                    attn_in_norm: attn_in.map(norm),
                    attn_out_norm: attn_out.map(norm),
                    mlp_in_norm: mlp_in.map(norm),
                    mlp_out_norm: mlp_out.map(norm),
                    qkv: match cfg.fused_projections {
                        false => Qkv::Separate {
                            q: lin(&a / "q_proj", h, cfg.num_heads * hd, cfg.qkv_bias),
                            k: lin(&a / "k_proj", h, cfg.num_kv_heads * hd, cfg.qkv_bias),
                            v: lin(&a / "v_proj", h, cfg.num_kv_heads * hd, cfg.qkv_bias),
                        },
                        true => Qkv::Fused(lin(
                            &a / "qkv_proj",
                            h,
                            (cfg.num_heads + 2 * cfg.num_kv_heads) * hd,
                            cfg.qkv_bias,
                        )),
                    },
                    o_proj: lin(&a / "o_proj", cfg.num_heads * hd, h, cfg.o_bias),
                    q_norm: q_dim.map(|d| rms(&a / "q_norm", d)),
                    k_norm: k_dim.map(|d| rms(&a / "k_norm", d)),
                    gate_up: match cfg.fused_projections {
                        false => GateUp::Separate {
                            gate: lin(&m / "gate_proj", h, cfg.intermediate_size, false),
                            up: lin(&m / "up_proj", h, cfg.intermediate_size, false),
                        },
                        true => GateUp::Fused(lin(
                            &m / "gate_up_proj",
                            h,
                            2 * cfg.intermediate_size,
                            false,
                        )),
                    },
                    down_proj: lin(&m / "down_proj", cfg.intermediate_size, h, false),
                    window,
                    local_rope: window.is_some() && cfg.local_rope.is_some(),
                    rope: cfg.layer_rope[i as usize],
                    whole_qk_norm: cfg.qk_norm == QkNorm::Whole,
                }
            })
            .collect();
        let norm = match cfg.gemma.norm_unit_offset {
            true => Norm::gemma_rms_norm(&p / "norm", h, cfg.norm_eps),
            false => Norm::rms_norm(&p / "norm", h, cfg.norm_eps),
        };
        let table = |rope: &super::rope::Rope| RotaryTable {
            inv_freq: rope.inv_freq(hd, p.device()),
            factor: rope.attention_factor(),
            long: rope.long_inv_freq(hd, p.device()),
        };
        let rope = cfg.rope.as_ref().expect("Llama-family configs carry RoPE");
        Llama {
            embed_tokens,
            layers,
            norm,
            heads: cfg.num_heads,
            kv_heads: cfg.num_kv_heads,
            head_dim: hd,
            rope: table(rope),
            local_rope: cfg.local_rope.as_ref().map(table),
            activation: cfg.activation,
            gemma: cfg.gemma.clone(),
        }
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
        if let Some(scale) = self.gemma.embed_scale {
            // transformers rounds the scale to the activations' kind first.
            let scale = Tensor::from(scale).to_kind(x.kind()).to_device(x.device());
            x = x * scale;
        }
        let global = self.rope.cos_sin(positions, x.kind());
        let local = self
            .local_rope
            .as_ref()
            .map(|r| r.cos_sin(positions, x.kind()));
        let last = self.layers.len() - 1;
        for (i, layer) in self.layers.iter().enumerate() {
            let kept = keep.filter(|_| i == last);
            let (cos, sin) = match &local {
                Some(cs) if layer.local_rope => cs,
                _ => &global,
            };
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
                    (cos, sin),
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
        // The keys this pass attends over, and (slot mode) each row's query
        // column: what a sliding window counts back from.
        let slot_columns = cache
            .as_ref()
            .and_then(|(c, _)| c.slot_columns())
            .map(Tensor::shallow_clone);
        let kv_len = match (&cache, &slot_columns) {
            // A slot cache's length already counts this step's column.
            (Some((c, _)), Some(_)) => c.len(),
            (Some((c, _)), None) => c.len() + t,
            (None, _) => t,
        };
        let a = maybe(&layer.attn_in_norm, x.shallow_clone());
        let [q, k, v] = layer.qkv.forward(
            &a,
            self.heads * self.head_dim,
            self.kv_heads * self.head_dim,
            train,
        );
        let heads = |y: Tensor, n: i64, norm: &Option<Norm>| {
            let y = match layer.whole_qk_norm {
                true => maybe(norm, y).view([b, t, n, self.head_dim]),
                false => maybe(norm, y.view([b, t, n, self.head_dim])),
            };
            y.transpose(1, 2)
        };
        let q = heads(q, self.heads, &layer.q_norm);
        let k = heads(k, self.kv_heads, &layer.k_norm);
        let v = v.view([b, t, self.kv_heads, self.head_dim]).transpose(1, 2);
        let (q, k) = match layer.rope {
            true => (rotate(&q), rotate(&k)),
            false => (q, k),
        };
        let (k, v) = match cache {
            Some((c, i)) => c.append(i, k, v),
            None => (k, v),
        };
        // The last layer's queries (and everything after attention)
        // only at the kept positions.
        let (x, q, mask, q_len) = match keep {
            Some(kept) => {
                let mask = match layer.window {
                    Some(w) => kept.windowed_mask(kv_len, w),
                    None => kept.mask.shallow_clone(),
                };
                (kept.take(x, 1), kept.take(&q, 2), mask, kept.per_row())
            }
            None => {
                let mask = match (layer.window, &slot_columns) {
                    (Some(w), Some(columns)) => mask.windowed_at(columns, kv_len, w),
                    (Some(w), None) => mask.windowed(t, kv_len, w, x.device()),
                    (None, _) => mask.shallow_clone(),
                };
                (x.shallow_clone(), q, mask, t)
            }
        };
        let scores = Scores {
            scale: self.gemma.attn_scale,
            softcap: self.gemma.attn_softcap,
        };
        let y = attend(&q, &k, &v, &mask, &scores, 0.0, train)
            .transpose(1, 2)
            .reshape([b, q_len, -1]);
        let x = x + maybe(&layer.attn_out_norm, layer.o_proj.forward(&y, train));
        let m = maybe(&layer.mlp_in_norm, x.shallow_clone());
        let (gate, up) = layer.gate_up.forward(&m, train);
        let gate = match self.activation {
            Activation::Silu => gate.silu(),
            Activation::GeluTanh => gate.gelu("tanh"),
        };
        let m = gate * up;
        x + maybe(&layer.mlp_out_norm, layer.down_proj.forward(&m, train))
    }

    pub fn linears(&self) -> impl Iterator<Item = &Linear> {
        self.layers.iter().flat_map(|l| {
            let mut all = l.qkv.linears();
            all.push(&l.o_proj);
            all.extend(l.gate_up.linears());
            all.push(&l.down_proj);
            all
        })
    }
}
