//! Batched sampling with a key/value cache: temperature (0 is greedy),
//! top-k, top-p, EOS, stop conditions, left padding. Returns the new tokens
//! and their log-probabilities under the model (temperature 1, no
//! filtering: what a full forward pass gives, and what PPO's ratio needs).
//!
//! Draws come from a ChaCha generator seeded per call, not from torch's
//! process-global generator: samples depend on the seed alone, whatever
//! else runs in the process, and are the same on CPU and CUDA up to the
//! rounding of the cumulative sums.

use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tch::{Device, Kind, Tensor};

use super::{positions_from_mask, KvCache, Mask, Transformer};

/// How to sample.
#[derive(Debug, Clone)]
pub struct SamplingConfig {
    pub max_new_tokens: i64,
    /// Before this many new tokens EOS cannot be sampled.
    pub min_new_tokens: i64,
    /// 0 means greedy decoding.
    pub temperature: f64,
    /// Keep the k most likely tokens (0: off).
    pub top_k: i64,
    /// Keep the smallest set of tokens whose probability reaches p (1: off).
    pub top_p: f64,
    /// The ids a row ends on (EOS and the other stop ids of the
    /// checkpoint's generation config); empty: only the length ends rows.
    pub eos_token_ids: Vec<i64>,
    pub pad_token_id: i64,
    /// Seed of the sampling generator.
    pub seed: u64,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        SamplingConfig {
            max_new_tokens: 64,
            min_new_tokens: 0,
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            eos_token_ids: Vec::new(),
            pad_token_id: 0,
            seed: 0,
        }
    }
}

/// What a row finished on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    Eos,
    Stop,
    Length,
}

/// The continuation of one prompt.
#[derive(Debug, Clone)]
pub struct Sample {
    /// New tokens, including the EOS token when it ended the row.
    pub tokens: Vec<i64>,
    /// Log-probability of each new token under the model.
    pub logprobs: Vec<f32>,
    pub finish: Finish,
}

impl Sample {
    /// The new tokens without the EOS that ended the row: what the answer's
    /// text is decoded from.
    pub fn without_eos(&self) -> &[i64] {
        match self.finish {
            Finish::Eos => &self.tokens[..self.tokens.len() - 1],
            _ => &self.tokens[..],
        }
    }
}

/// Left-pads `rows` into ids and a 0/1 mask.
///
/// # Shapes
/// -> two `[rows, max_len]` int64 tensors.
pub fn left_pad(rows: &[Vec<i64>], pad: i64, device: Device) -> (Tensor, Tensor) {
    let len = rows.iter().map(Vec::len).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(rows.len() * len);
    let mut mask = Vec::with_capacity(rows.len() * len);
    for r in rows {
        let padding = len - r.len();
        ids.extend(std::iter::repeat_n(pad, padding).chain(r.iter().copied()));
        mask.extend(std::iter::repeat_n(0i64, padding).chain(std::iter::repeat_n(1, r.len())));
    }
    let shape = [rows.len() as i64, len as i64];
    (
        Tensor::from_slice(&ids).view(shape).to_device(device),
        Tensor::from_slice(&mask).view(shape).to_device(device),
    )
}

/// Samples continuations of `prompts` (token ids, not padded). `stop`
/// is asked after each token whether a row's text so far should stop (stop
/// strings); it sees the row index and its new tokens. Samples are a
/// function of `cfg.seed`.
pub fn generate(
    model: &Transformer,
    prompts: &[Vec<i64>],
    cfg: &SamplingConfig,
    device: Device,
    mut stop: impl FnMut(usize, &[i64]) -> bool,
) -> Vec<Sample> {
    tch::no_grad(|| {
        let b = prompts.len();
        // The weights stay fixed for the whole call: pack them once.
        let _packing = model.packed(8);
        let (ids, mut mask) = left_pad(prompts, cfg.pad_token_id, device);
        let prompt_len = ids.size()[1];
        let mut cache =
            KvCache::with_capacity(model.cfg.num_layers, prompt_len + cfg.max_new_tokens);
        let positions = positions_from_mask(&mask);
        let mut next_pos = positions.select(1, -1) + 1; // [b]
                                                        // Rows never gain padding while decoding: an unpadded batch decodes
                                                        // with no mask at all; a padded one only masks its keys.
        let padded = mask.min().int64_value(&[]) == 0;
        let hidden = model.hidden(&ids, &positions, &mask, Some(&mut cache), false);
        let mut logits = model.logits(&hidden.select(1, -1)).to_kind(Kind::Float); // [b, V]

        let mut out: Vec<Sample> = (0..b)
            .map(|_| Sample {
                tokens: Vec::new(),
                logprobs: Vec::new(),
                finish: Finish::Length,
            })
            .collect();
        let mut active = vec![true; b];
        let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
        for step in 0..cfg.max_new_tokens {
            let mut scores = logits.shallow_clone();
            if !cfg.eos_token_ids.is_empty() && step < cfg.min_new_tokens {
                scores = scores.index_fill(
                    1,
                    &Tensor::from_slice(&cfg.eos_token_ids).to_device(device),
                    f64::NEG_INFINITY,
                );
            }
            let next = pick(&scores, cfg, &mut rng); // [b]
                                                     // log_softmax is one fused kernel; logsumexp is several ops
                                                     // (measured 2-3x slower on a [8, 4096] step).
            let chosen_lp = logits
                .log_softmax(-1, Kind::Float)
                .gather(1, &next.unsqueeze(1), false)
                .squeeze_dim(1);
            let next_v: Vec<i64> = Vec::<i64>::try_from(&next).expect("token ids");
            let lp_v: Vec<f32> = Vec::<f32>::try_from(&chosen_lp).expect("log-probs");
            let mut tokens = next_v.clone();
            for i in 0..b {
                if !active[i] {
                    tokens[i] = cfg.pad_token_id;
                    continue;
                }
                out[i].tokens.push(next_v[i]);
                out[i].logprobs.push(lp_v[i]);
                if cfg.eos_token_ids.contains(&next_v[i]) {
                    active[i] = false;
                    out[i].finish = Finish::Eos;
                } else if stop(i, &out[i].tokens) {
                    active[i] = false;
                    out[i].finish = Finish::Stop;
                }
            }
            if !active.iter().any(|a| *a) || step + 1 == cfg.max_new_tokens {
                break;
            }
            let step_ids = Tensor::from_slice(&tokens)
                .view([b as i64, 1])
                .to_device(device);
            let attn = if padded {
                mask = Tensor::cat(
                    &[&mask, &Tensor::ones([b as i64, 1], (Kind::Int64, device))],
                    1,
                );
                Mask::Explicit(mask.to_kind(Kind::Bool).view([b as i64, 1, 1, -1]))
            } else {
                Mask::None
            };
            let pos = next_pos.view([b as i64, 1]);
            let hidden = model.hidden_masked(&step_ids, &pos, &attn, Some(&mut cache), false);
            logits = model.logits(&hidden.select(1, -1)).to_kind(Kind::Float);
            next_pos += 1;
        }
        out
    })
}

/// One token per row from `scores` `[b, V]`.
fn pick(scores: &Tensor, cfg: &SamplingConfig, rng: &mut ChaCha8Rng) -> Tensor {
    if cfg.temperature <= 0.0 {
        return scores.argmax(-1, false);
    }
    let mut s = if cfg.temperature == 1.0 {
        scores.shallow_clone()
    } else {
        scores / cfg.temperature
    };
    let vocab = s.size()[1];
    if cfg.top_k > 0 && cfg.top_k < vocab {
        let (top, _) = s.topk(cfg.top_k, -1, true, true);
        let threshold = top.narrow(1, cfg.top_k - 1, 1);
        s = s.masked_fill(&s.lt_tensor(&threshold), f64::NEG_INFINITY);
    }
    if cfg.top_p < 1.0 {
        // Keep the smallest prefix of the sorted distribution whose mass
        // reaches top_p (always at least the most likely token), as
        // transformers' TopPLogitsWarper does.
        let (sorted, order) = s.sort(-1, true);
        let cum = sorted.softmax(-1, Kind::Float).cumsum(-1, Kind::Float);
        let remove = (cum - sorted.softmax(-1, Kind::Float)).gt(cfg.top_p);
        let _ = remove.narrow(1, 0, 1).fill_(0);
        let remove_orig = remove.scatter(1, &order, &remove);
        s = s.masked_fill(&remove_orig, f64::NEG_INFINITY);
    }
    // Inverse-CDF sampling with our own uniforms: the first token whose
    // cumulative probability exceeds u * total.
    let b = s.size()[0];
    let cdf = s.softmax(-1, Kind::Float).cumsum(-1, Kind::Float);
    // 24 random bits: exact in f32, and below 1.
    let uniforms: Vec<f32> = (0..b)
        .map(|_| (rng.next_u64() >> 40) as f32 / (1u32 << 24) as f32)
        .collect();
    let u = Tensor::from_slice(&uniforms)
        .to_device(s.device())
        .unsqueeze(1)
        * cdf.narrow(1, vocab - 1, 1);
    u.searchsorted::<Tensor>(&cdf, false, true, "right", None)
        .clamp_max(vocab - 1)
        .squeeze_dim(1)
}
