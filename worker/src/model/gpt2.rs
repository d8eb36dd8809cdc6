//! The GPT-2 family: learned positions, pre-LayerNorm blocks, GELU (tanh),
//! fused QKV projection, under transformers' `GPT2Model` names.

use tch::{nn, Tensor};

use super::attention::{attend, KvCache, Mask, Queries, Scores};
use super::config::ModelConfig;
use super::linear::{Layout, Linear, LoraConfig, Norm};
use super::onednn::PostOp;
use super::recompute;

#[derive(Debug)]
struct Block {
    ln_1: Norm,
    c_attn: Linear,
    attn_proj: Linear,
    ln_2: Norm,
    c_fc: Linear,
    mlp_proj: Linear,
}

/// `transformer.*` of a GPT-2 checkpoint.
#[derive(Debug)]
pub struct Gpt2 {
    pub wte: Tensor,
    wpe: Tensor,
    blocks: Vec<Block>,
    ln_f: Norm,
    heads: i64,
    dropout: f64,
}

impl Gpt2 {
    pub fn new(p: nn::Path, cfg: &ModelConfig, lora: Option<&LoraConfig>) -> Gpt2 {
        let h = cfg.hidden_size;
        let init = nn::Init::Randn {
            mean: 0.0,
            stdev: 0.02,
        };
        let wte = (&p / "wte").var("weight", &[cfg.vocab_size, h], init);
        let wpe = (&p / "wpe").var(
            "weight",
            &[cfg.max_positions, h],
            nn::Init::Randn {
                mean: 0.0,
                stdev: 0.01,
            },
        );
        let blocks = (0..cfg.num_layers)
            .map(|i| {
                let b = &p / "h" / i;
                Block {
                    ln_1: Norm::layer_norm(&b / "ln_1", h, cfg.norm_eps),
                    c_attn: Linear::new(
                        &b / "attn" / "c_attn",
                        h,
                        3 * h,
                        true,
                        Layout::InOut,
                        lora,
                    ),
                    attn_proj: Linear::new(&b / "attn" / "c_proj", h, h, true, Layout::InOut, lora),
                    ln_2: Norm::layer_norm(&b / "ln_2", h, cfg.norm_eps),
                    c_fc: Linear::new(
                        &b / "mlp" / "c_fc",
                        h,
                        cfg.intermediate_size,
                        true,
                        Layout::InOut,
                        lora,
                    ),
                    mlp_proj: Linear::new(
                        &b / "mlp" / "c_proj",
                        cfg.intermediate_size,
                        h,
                        true,
                        Layout::InOut,
                        lora,
                    ),
                }
            })
            .collect();
        let ln_f = Norm::layer_norm(&p / "ln_f", h, cfg.norm_eps);
        Gpt2 {
            wte,
            wpe,
            blocks,
            ln_f,
            heads: cfg.num_heads,
            dropout: cfg.dropout,
        }
    }

    /// With `keep`, the last block computes and the result holds only the
    /// kept positions (see [`Queries`]).
    ///
    /// # Shapes
    /// `ids`, `positions`: `[b, t]`; `mask`: `[b, 1, t, past + t]` -> `[b, t, hidden]`
    /// (`[b, q, hidden]` with `keep`).
    /// With `recompute` (each block's trainable tensors), blocks run under
    /// activation checkpointing when autograd records (not with a cache,
    /// nor the last block with `keep`).
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
        let mut x = (Tensor::embedding(&self.wte, ids, -1, false, false)
            + Tensor::embedding(&self.wpe, positions, -1, false, false))
        .dropout(self.dropout, train);
        let last = self.blocks.len() - 1;
        for (i, block) in self.blocks.iter().enumerate() {
            let kept = keep.filter(|_| i == last);
            x = match recompute.filter(|_| cache.is_none() && kept.is_none()) {
                Some(params) => {
                    let mask = mask.shallow_clone();
                    // SAFETY: the closure borrows only `self`'s block (the
                    // model outlives its training steps) and owns the rest.
                    unsafe {
                        recompute::checkpoint(&x, &params[i], move |x| {
                            self.block(block, x, &mask, None, None, train)
                        })
                    }
                }
                None => self.block(
                    block,
                    &x,
                    mask,
                    cache.as_deref_mut().map(|c| (c, i)),
                    kept,
                    train,
                ),
            };
        }
        self.ln_f.forward(&x)
    }

    /// One block. With `keep`, the result holds only the kept positions
    /// (see [`Queries`]).
    ///
    /// # Shapes
    /// `x`: `[b, t, hidden]` -> `[b, t, hidden]` (`[b, q, hidden]` with `keep`).
    fn block(
        &self,
        block: &Block,
        x: &Tensor,
        mask: &Mask,
        cache: Option<(&mut KvCache, usize)>,
        keep: Option<&Queries>,
        train: bool,
    ) -> Tensor {
        let (b, t, _) = x.size3().expect("hidden states are [batch, time, hidden]");
        let a = block.ln_1.forward(x);
        let qkv = block.c_attn.forward(&a, train);
        let parts = qkv.split(qkv.size()[2] / 3, 2);
        let split = |t_: &Tensor| t_.view([b, t, self.heads, -1]).transpose(1, 2);
        let (q, k, v) = (split(&parts[0]), split(&parts[1]), split(&parts[2]));
        let (k, v) = match cache {
            Some((c, i)) => c.append(i, k, v),
            None => (k, v),
        };
        // The last block's queries (and everything after attention) only
        // at the kept positions.
        let (x, q, mask, q_len) = match keep {
            Some(kept) => (
                kept.take(x, 1),
                kept.take(&q, 2),
                &kept.mask,
                kept.per_row(),
            ),
            None => (x.shallow_clone(), q, mask, t),
        };
        let y = attend(&q, &k, &v, mask, &Scores::default(), self.dropout, train)
            .transpose(1, 2)
            .reshape([b, q_len, -1]);
        let x = x + block
            .attn_proj
            .forward(&y, train)
            .dropout(self.dropout, train);
        let m = block.ln_2.forward(&x);
        let m = block.c_fc.forward_then(&m, train, PostOp::GeluTanh);
        x + block
            .mlp_proj
            .forward(&m, train)
            .dropout(self.dropout, train)
    }

    pub fn linears(&self) -> impl Iterator<Item = &Linear> {
        self.blocks
            .iter()
            .flat_map(|b| [&b.c_attn, &b.attn_proj, &b.c_fc, &b.mlp_proj])
    }
}
