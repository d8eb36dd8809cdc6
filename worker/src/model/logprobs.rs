//! Log-probs of chosen tokens (and the entropy) from final hidden states,
//! over chunks of positions: the LM head, log-softmax, the chosen token's
//! log-prob and the entropy of one chunk at a time, so `[b, t, vocab]`
//! float32 logits (5 GB at 16 x 512 with a 152k vocabulary) never exist
//! at once. With autograd on, each chunk runs under activation
//! checkpointing ([`super::recompute`]): its logits are recomputed in
//! backward rather than kept, so the graph holds one chunk's at a time
//! too. Batches whose logits fit in [`CHUNK_LOGITS_BYTES`] take one plain
//! pass, exactly as before chunking.

use tch::{Kind, Tensor};

use super::recompute;
use super::Transformer;

/// The most float32 logits one chunk holds (256 MiB).
pub const CHUNK_LOGITS_BYTES: i64 = 256 << 20;

/// The chosen tokens' log-probs and, when asked, each position's entropy.
pub struct TokenLogprobs {
    /// `[b, t]`.
    pub logp: Tensor,
    /// `[b, t]`, without a graph (a metric); `None` unless asked.
    pub entropy: Option<Tensor>,
}

impl Transformer {
    /// Log-probs of `targets` under the model's next-token distribution at
    /// each position of `hidden` (logits divided by `temperature` unless it
    /// is 0 or 1), in chunks of at most [`CHUNK_LOGITS_BYTES`] of logits.
    ///
    /// # Shapes
    /// `hidden`: `[b, t, h]`, `targets`: `[b, t]` int64 (valid ids) ->
    /// `[b, t]` each.
    pub fn token_logprobs(
        &self,
        hidden: &Tensor,
        targets: &Tensor,
        temperature: f64,
        entropy: bool,
    ) -> TokenLogprobs {
        let rows = hidden.size()[0].max(1);
        let per_position = rows * self.cfg.vocab_size * 4;
        let chunk = (CHUNK_LOGITS_BYTES / per_position.max(1)).max(1);
        self.token_logprobs_in_chunks(hidden, targets, temperature, entropy, chunk)
    }

    /// [`Transformer::token_logprobs`] in chunks of `chunk` positions.
    pub fn token_logprobs_in_chunks(
        &self,
        hidden: &Tensor,
        targets: &Tensor,
        temperature: f64,
        entropy: bool,
        chunk: i64,
    ) -> TokenLogprobs {
        let t = hidden.size()[1];
        if chunk >= t {
            return self.chunk_logprobs(hidden, targets, temperature, entropy);
        }
        let head = [self.head_weight().shallow_clone()];
        let mut parts = Vec::new();
        let mut start = 0;
        while start < t {
            let len = chunk.min(t - start);
            let h = hidden.narrow(1, start, len);
            let tg = targets.narrow(1, start, len);
            // SAFETY: the closure borrows only `self` (the model outlives
            // its training steps) and owns its targets.
            let part = unsafe {
                recompute::checkpoint(&h, &head, move |h| {
                    let out = self.chunk_logprobs(h, &tg, temperature, entropy);
                    match out.entropy {
                        Some(e) => Tensor::stack(&[out.logp, e], 0),
                        None => out.logp.unsqueeze(0),
                    }
                })
            };
            parts.push(part);
            start += len;
        }
        let all = Tensor::cat(&parts, 2);
        TokenLogprobs {
            logp: all.get(0),
            entropy: entropy.then(|| all.get(1).detach()),
        }
    }

    /// One chunk, plainly.
    fn chunk_logprobs(
        &self,
        hidden: &Tensor,
        targets: &Tensor,
        temperature: f64,
        entropy: bool,
    ) -> TokenLogprobs {
        let mut logits = self.logits(hidden).to_kind(Kind::Float);
        if temperature > 0.0 && temperature != 1.0 {
            logits /= temperature;
        }
        let all = logits.log_softmax(-1, Kind::Float);
        let logp = all.gather(2, &targets.unsqueeze(-1), false).squeeze_dim(-1);
        let entropy =
            entropy.then(|| tch::no_grad(|| crate::rl::entropy_from_log_probs(&all.detach())));
        TokenLogprobs { logp, entropy }
    }
}

#[cfg(test)]
mod tests {
    use tch::{Device, Kind, Tensor};

    use crate::model::{BuildOptions, Head, Model, ModelConfig};

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[])
    }

    /// Values and gradients of chunked log-probs equal the one-pass ones.
    fn check(raw: serde_json::Value) {
        let _rng = crate::testing::torch_rng();
        tch::manual_seed(21);
        let cfg = ModelConfig::from_json(raw).unwrap();
        let model = Model::init(&cfg, &BuildOptions::new(Device::Cpu, Head::Lm));
        let ids = Tensor::randint(cfg.vocab_size, [3, 10], (Kind::Int64, Device::Cpu));
        let mask = ids.ones_like();
        let run = |chunk: i64| {
            for (_, t) in model.trainable() {
                let mut g = t.grad();
                if g.defined() {
                    let _ = g.zero_();
                }
            }
            let hidden = model.lm.hidden(
                &ids,
                &crate::model::positions_from_mask(&mask),
                &mask,
                None,
                false,
            );
            let targets = ids.roll([-1], [1]);
            let out = model
                .lm
                .token_logprobs_in_chunks(&hidden, &targets, 0.7, true, chunk);
            // A loss that weighs each position differently.
            let weights = Tensor::arange(10, (Kind::Float, Device::Cpu)).view([1, 10]) - 4.5;
            (out.logp.shallow_clone() * weights)
                .sum(Kind::Float)
                .backward();
            let grads: Vec<Tensor> = model
                .trainable()
                .iter()
                .map(|(_, t)| t.grad().copy())
                .collect();
            (out.logp.detach(), out.entropy.unwrap(), grads)
        };
        let (lp_full, ent_full, g_full) = run(10);
        for chunk in [1, 3, 4] {
            let (lp, ent, g) = run(chunk);
            assert!(max_diff(&lp, &lp_full) < 1e-5, "chunk {chunk}: log-probs");
            assert!(max_diff(&ent, &ent_full) < 1e-5, "chunk {chunk}: entropy");
            // Relative to the gradient's scale: a tied head's gradient sums
            // the chunks' contributions in another order than one pass does,
            // which moves it by float32 roundings of its own size (1.1e-5
            // was drawn in CI at an absolute 1e-5).
            for (a, b) in g.iter().zip(&g_full) {
                let scale = b.abs().max().double_value(&[]).max(1.0);
                assert!(
                    max_diff(a, b) < 1e-5 * scale,
                    "chunk {chunk}: gradient {} at scale {scale}",
                    max_diff(a, b)
                );
            }
        }
        // Against the full log-softmax, written out.
        let logits = tch::no_grad(|| model.lm.forward(&ids, &mask, false)) / 0.7;
        let want = logits
            .log_softmax(-1, Kind::Float)
            .gather(2, &ids.roll([-1], [1]).unsqueeze(-1), false)
            .squeeze_dim(-1);
        assert!(max_diff(&lp_full, &want) < 1e-5);
        assert!(g_full.iter().any(|g| g.abs().max().double_value(&[]) > 0.0));
    }

    #[test]
    fn chunked_logprobs_equal_the_full_computation_tied_head() {
        check(ModelConfig::gpt2_json(60, 16, 16, 2, 2, 0, 0.0));
    }

    #[test]
    fn chunked_logprobs_equal_the_full_computation_untied_head() {
        check(ModelConfig::llama_json(60, 16, 16, 2, 4, 2, 24, 0, false));
    }
}
