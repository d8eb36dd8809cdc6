//! Sampling with continuous batching: temperature (0 is greedy), top-k,
//! top-p, EOS, stop conditions. Returns the new tokens and their
//! log-probabilities under the model (temperature 1, no filtering: what a
//! full forward pass gives, and what PPO's ratio needs).
//!
//! At most [`SamplingConfig::max_rows`] rows decode at once. A row that
//! finishes (EOS, stop, length) leaves the batch at once and the next
//! waiting request takes its slot of the key/value cache (slot mode of
//! [`KvCache`]: each row writes at its own column, so no row decodes
//! padding); when nothing waits, the batch is compacted. The samples of one
//! prompt share one prefill: the prompt's keys and values are computed once
//! and copied into each of its rows.
//!
//! Draws come from a ChaCha generator per row, seeded with the call's seed
//! and set to the stream of the row's (prompt index, sample index), not from
//! torch's process-global generator: a row's tokens depend on the seed, its
//! prompt and its indices alone, whatever else is in the batch or the
//! process, and are the same on CPU and CUDA up to the rounding of the
//! cumulative sums. Prompt 0's sample 0 draws from the seed's stream 0, as
//! a one-prompt call did before rows had streams of their own.

use std::collections::HashMap;

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
    /// Seed of the rows' generators (each row draws from its own stream).
    pub seed: u64,
    /// Rows decoding at once (0: every request at once).
    pub max_rows: usize,
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
            max_rows: 0,
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

/// One row to sample.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// Token ids, not padded; at least one.
    pub prompt: &'a [i64],
    /// The prompt's index in the stage and which of its samples the row
    /// is: with the seed they choose the row's random stream.
    pub prompt_index: u64,
    pub sample_index: u64,
}

/// What a sampling call computed, for benchmarks and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SamplerStats {
    /// Prompt forwards: one per distinct prompt, whatever its samples.
    pub prefills: usize,
    /// Decoding steps (forwards of the batch).
    pub steps: u64,
    /// Rows of the batch summed over the steps: every one yields a token,
    /// so `row_steps` minus the new tokens is the idle rows' work (none).
    pub row_steps: u64,
}

/// The samples of a call, in the order of its requests.
#[derive(Debug)]
pub struct Sampled {
    pub samples: Vec<Sample>,
    pub stats: SamplerStats,
}

/// Samples continuations of `prompts` (token ids, not padded), row `j`
/// being prompt index `j`, sample 0 (see [`sample_requests`]), every row
/// at once unless `cfg.max_rows` says otherwise.
pub fn generate(
    model: &Transformer,
    prompts: &[Vec<i64>],
    cfg: &SamplingConfig,
    device: Device,
    stop: impl FnMut(usize, &[i64]) -> bool,
) -> Vec<Sample> {
    let requests = rows_of(prompts);
    sample_requests(model, &requests, cfg, device, stop, |_| Ok(()))
        .expect("no hook fails")
        .samples
}

/// Row `j` of `prompts` as prompt index `j`, sample 0.
pub fn rows_of(prompts: &[Vec<i64>]) -> Vec<Request<'_>> {
    prompts
        .iter()
        .enumerate()
        .map(|(j, p)| Request {
            prompt: p,
            prompt_index: j as u64,
            sample_index: 0,
        })
        .collect()
}

/// A row decoding in a slot of the batch.
struct Slot {
    request: usize,
    /// The token the next step feeds: the prompt's last, then each sampled
    /// one.
    pending: i64,
    /// The cache column (and position) the next step writes: slots hold
    /// their prompt's real tokens from column 0, no padding.
    column: i64,
    rng: ChaCha8Rng,
    sample: Sample,
}

/// The requests sharing one prompt and, while some of them wait, its
/// cached keys and values (`[kv_heads, len - 1, head_dim]` per layer).
struct Group {
    /// A request with this prompt.
    first: usize,
    waiting: usize,
    kv: Option<Vec<(Tensor, Tensor)>>,
}

/// Samples every request with continuous batching (see the module doc).
/// `stop` is asked after each token whether a row's text so far should
/// stop (stop strings); it sees the request's index and its new tokens.
/// `finished` hears how many rows have finished each time one does; an
/// error from it (a cancelled stage) ends the call.
pub fn sample_requests(
    model: &Transformer,
    requests: &[Request<'_>],
    cfg: &SamplingConfig,
    device: Device,
    mut stop: impl FnMut(usize, &[i64]) -> bool,
    mut finished: impl FnMut(usize) -> anyhow::Result<()>,
) -> anyhow::Result<Sampled> {
    anyhow::ensure!(
        requests.iter().all(|r| !r.prompt.is_empty()),
        "sampling needs a token in every prompt"
    );
    let mut out: Vec<Option<Sample>> = vec![None; requests.len()];
    let mut stats = SamplerStats::default();
    if cfg.max_new_tokens <= 0 || requests.is_empty() {
        let empty = Sample {
            tokens: Vec::new(),
            logprobs: Vec::new(),
            finish: Finish::Length,
        };
        return Ok(Sampled {
            samples: vec![empty; requests.len()],
            stats,
        });
    }
    tch::no_grad(|| {
        // The weights stay fixed for the whole call: pack them once.
        let _packing = model.packed(8);
        let max_rows = match cfg.max_rows {
            0 => requests.len(),
            n => n.min(requests.len()),
        };
        let longest = requests.iter().map(|r| r.prompt.len()).max().unwrap_or(0);
        let mut cache = KvCache::slots(
            model.cfg.num_layers,
            max_rows as i64,
            longest as i64 + cfg.max_new_tokens,
        );
        let mut group_of: HashMap<&[i64], usize> = HashMap::new();
        let mut groups: Vec<Group> = Vec::new();
        let request_group: Vec<usize> = requests
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let g = *group_of.entry(r.prompt).or_insert_with(|| {
                    groups.push(Group {
                        first: i,
                        waiting: 0,
                        kv: None,
                    });
                    groups.len() - 1
                });
                groups[g].waiting += 1;
                g
            })
            .collect();
        let eos = (!cfg.eos_token_ids.is_empty())
            .then(|| Tensor::from_slice(&cfg.eos_token_ids).to_device(device));
        let mut slots: Vec<Option<Slot>> = (0..max_rows).map(|_| None).collect();
        let (mut next, mut done) = (0usize, 0usize);
        loop {
            // Waiting requests take the free slots.
            let admitted: Vec<(usize, usize)> = (0..slots.len())
                .filter(|&i| slots[i].is_none())
                .zip(next..requests.len())
                .collect();
            next += admitted.len();
            let need: Vec<usize> = admitted
                .iter()
                .map(|&(_, r)| request_group[r])
                .filter(|&g| groups[g].kv.is_none() && requests[groups[g].first].prompt.len() > 1)
                .collect();
            stats.prefills += prefill(
                model,
                requests,
                &mut groups,
                &need,
                cfg.pad_token_id,
                device,
            );
            for &(slot, r) in &admitted {
                let g = request_group[r];
                if let Some(kv) = &groups[g].kv {
                    for (layer, (k, v)) in kv.iter().enumerate() {
                        cache.write_slot(layer, slot as i64, k, v);
                    }
                }
                groups[g].waiting -= 1;
                if groups[g].waiting == 0 {
                    groups[g].kv = None;
                }
                slots[slot] = Some(new_slot(cfg.seed, r, &requests[r]));
            }
            // Nothing waits: the finished rows' slots go.
            if slots.iter().any(Option::is_none) {
                let keep: Vec<i64> = (0..slots.len() as i64)
                    .filter(|&i| slots[i as usize].is_some())
                    .collect();
                cache.select_rows(&Tensor::from_slice(&keep).to_device(device));
                slots.retain(Option::is_some);
            }
            if slots.is_empty() {
                break;
            }
            let live: Vec<&mut Slot> = slots.iter_mut().flatten().collect();
            let logits = decode_step(model, &mut cache, &live, device);
            stats.steps += 1;
            stats.row_steps += live.len() as u64;
            let mut scores = logits.shallow_clone();
            if let Some(eos) = &eos {
                let young: Vec<i64> = (0..live.len() as i64)
                    .filter(|&i| (live[i as usize].sample.tokens.len() as i64) < cfg.min_new_tokens)
                    .collect();
                if !young.is_empty() {
                    let rows = Tensor::from_slice(&young).to_device(device);
                    let blocked =
                        scores
                            .index_select(0, &rows)
                            .index_fill(1, eos, f64::NEG_INFINITY);
                    scores = scores.index_copy(0, &rows, &blocked);
                }
            }
            let mut live = live;
            let uniforms: Vec<f32> = if cfg.temperature > 0.0 {
                live.iter_mut().map(|s| uniform(&mut s.rng)).collect()
            } else {
                Vec::new()
            };
            let next_tokens = pick(&scores, cfg, &uniforms); // [b]
                                                             // log_softmax is one fused kernel; logsumexp is several ops
                                                             // (measured 2-3x slower on a [8, 4096] step).
            let chosen_lp = logits
                .log_softmax(-1, Kind::Float)
                .gather(1, &next_tokens.unsqueeze(1), false)
                .squeeze_dim(1);
            let tokens = Vec::<i64>::try_from(&next_tokens).expect("token ids");
            let lps = Vec::<f32>::try_from(&chosen_lp).expect("log-probs");
            for ((s, &tok), &lp) in live.iter_mut().zip(&tokens).zip(&lps) {
                s.sample.tokens.push(tok);
                s.sample.logprobs.push(lp);
                s.pending = tok;
                s.column += 1;
                if cfg.eos_token_ids.contains(&tok) {
                    s.sample.finish = Finish::Eos;
                } else if stop(s.request, &s.sample.tokens) {
                    s.sample.finish = Finish::Stop;
                } else if s.sample.tokens.len() as i64 >= cfg.max_new_tokens {
                    s.sample.finish = Finish::Length;
                } else {
                    continue;
                }
                // Marked finished by a column past the end; taken out below.
                s.column = -1;
            }
            for slot in slots.iter_mut() {
                if slot.as_ref().is_some_and(|s| s.column < 0) {
                    let s = slot.take().expect("a finished row");
                    out[s.request] = Some(s.sample);
                    done += 1;
                    finished(done)?;
                }
            }
        }
        Ok(Sampled {
            samples: out
                .into_iter()
                .map(|s| s.expect("every request sampled"))
                .collect(),
            stats,
        })
    })
}

/// A fresh slot for request `r`: the prompt's last token is fed by the
/// first decoding step, after the others were prefilled.
fn new_slot(seed: u64, r: usize, request: &Request<'_>) -> Slot {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(stream(request.prompt_index, request.sample_index));
    let len = request.prompt.len() as i64;
    Slot {
        request: r,
        pending: request.prompt[request.prompt.len() - 1],
        column: len - 1,
        rng,
        sample: Sample {
            tokens: Vec::new(),
            logprobs: Vec::new(),
            finish: Finish::Length,
        },
    }
}

/// The random stream of sample `sample` of prompt `prompt`: prompt 0's
/// sample 0 is stream 0.
fn stream(prompt: u64, sample: u64) -> u64 {
    (prompt << 32) ^ sample
}

/// One uniform in [0, 1): 24 random bits, exact in f32, and below 1.
fn uniform(rng: &mut ChaCha8Rng) -> f32 {
    (rng.next_u64() >> 40) as f32 / (1u32 << 24) as f32
}

/// Prefills the prompts of `need` (each prompt but its last token, in one
/// left-padded batch) and keeps each one's keys and values in its group.
/// Returns how many prompts it ran.
fn prefill(
    model: &Transformer,
    requests: &[Request<'_>],
    groups: &mut [Group],
    need: &[usize],
    pad: i64,
    device: Device,
) -> usize {
    let mut distinct: Vec<usize> = need.to_vec();
    distinct.sort_unstable();
    distinct.dedup();
    if distinct.is_empty() {
        return 0;
    }
    let heads: Vec<Vec<i64>> = distinct
        .iter()
        .map(|&g| {
            let p = requests[groups[g].first].prompt;
            p[..p.len() - 1].to_vec()
        })
        .collect();
    let (ids, mask) = left_pad(&heads, pad, device);
    let positions = positions_from_mask(&mask);
    let mut cache = KvCache::new(model.cfg.num_layers);
    let _ = model.hidden(&ids, &positions, &mask, Some(&mut cache), false);
    let width = ids.size()[1];
    for (row, (&g, head)) in distinct.iter().zip(&heads).enumerate() {
        let len = head.len() as i64;
        let kv = (0..model.cfg.num_layers as usize)
            .map(|layer| {
                let (k, v) = cache.buffers(layer).expect("prefilled layer");
                let take = |t: &Tensor| t.get(row as i64).narrow(1, width - len, len);
                (take(k), take(v))
            })
            .collect();
        groups[g].kv = Some(kv);
    }
    distinct.len()
}

/// Feeds each live row its pending token and returns the next logits.
///
/// # Shapes
/// -> `[rows, vocab]` float32.
fn decode_step(
    model: &Transformer,
    cache: &mut KvCache,
    live: &[&mut Slot],
    device: Device,
) -> Tensor {
    let rows = live.len() as i64;
    let columns: Vec<i64> = live.iter().map(|s| s.column).collect();
    let pending: Vec<i64> = live.iter().map(|s| s.pending).collect();
    cache.set_columns(&columns, device);
    let width = cache.len();
    let ids = Tensor::from_slice(&pending)
        .to_device(device)
        .view([rows, 1]);
    let positions = Tensor::from_slice(&columns)
        .to_device(device)
        .view([rows, 1]);
    // Rows level with each other see every key; otherwise each row's keys
    // end at its own column.
    let attn = if columns.iter().all(|&c| c + 1 == width) {
        Mask::None
    } else {
        let keys = Tensor::arange(width, (Kind::Int64, device)).view([1, width]);
        Mask::Explicit(keys.le_tensor(&positions).view([rows, 1, 1, width]))
    };
    let hidden = model.hidden_masked(&ids, &positions, &attn, Some(cache), false);
    model.logits(&hidden.select(1, -1)).to_kind(Kind::Float)
}

/// One token per row from `scores` `[b, V]`.
/// `uniforms`: one per row in [0, 1) (unused when greedy).
fn pick(scores: &Tensor, cfg: &SamplingConfig, uniforms: &[f32]) -> Tensor {
    if cfg.temperature <= 0.0 {
        return scores.argmax(-1, false);
    }
    let s = warped(scores, cfg);
    let vocab = s.size()[1];
    // Inverse-CDF sampling with our own uniforms: the first token whose
    // cumulative probability exceeds u * total.
    let cdf = s.softmax(-1, Kind::Float).cumsum(-1, Kind::Float);
    // NaN or infinite scores (a float16 overflow) give a NaN total, which
    // the search below would turn into the last token id, silently.
    let total = cdf.narrow(1, vocab - 1, 1);
    assert!(
        bool::try_from(total.isfinite().all()).unwrap_or(false),
        "sampling: the scores are not finite (NaN or an infinity): the model overflowed (use float32 or bfloat16)"
    );
    let u = Tensor::from_slice(uniforms)
        .to_device(s.device())
        .unsqueeze(1)
        * total;
    u.searchsorted::<Tensor>(&cdf, false, true, "right", None)
        .clamp_max(vocab - 1)
        .squeeze_dim(1)
}

/// `scores` after temperature, top-k and top-p (the tokens they rule out
/// at minus infinity), in transformers' order.
fn warped(scores: &Tensor, cfg: &SamplingConfig) -> Tensor {
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
        // transformers' TopPLogitsWarper, step for step: in ascending
        // order, the tokens whose cumulative mass is at most 1 - top_p go
        // (a boundary token whose mass before it is exactly top_p too),
        // the most likely always stays.
        let (sorted, order) = s.sort(-1, false);
        let cum = sorted.softmax(-1, Kind::Float).cumsum(-1, Kind::Float);
        let remove = cum.le(1.0 - cfg.top_p);
        let _ = remove.narrow(1, vocab - 1, 1).fill_(0);
        let remove_orig = remove.scatter(1, &order, &remove);
        s = s.masked_fill(&remove_orig, f64::NEG_INFINITY);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{BuildOptions, Head, Model, ModelConfig};

    /// Tiny random GPT-2 and Llama (grouped-query attention, untied head).
    fn tiny_models() -> Vec<(&'static str, Model)> {
        let _rng = crate::testing::torch_rng();
        tch::manual_seed(3);
        let options = BuildOptions::new(Device::Cpu, Head::Lm);
        let gpt2 = ModelConfig::gpt2_json(64, 64, 32, 2, 4, 5, 0.0);
        let llama = ModelConfig::llama_json(64, 64, 32, 2, 4, 2, 64, 5, false);
        [("gpt2", gpt2), ("llama", llama)]
            .into_iter()
            .map(|(name, json)| {
                let cfg = ModelConfig::from_json(json).expect("tiny config");
                (name, Model::init(&cfg, &options))
            })
            .collect()
    }

    /// Scores that overflowed fail loudly instead of drawing the last id.
    #[test]
    #[should_panic(expected = "the scores are not finite")]
    fn non_finite_scores_are_not_sampled_from() {
        let scores = Tensor::from_slice(&[0.0f32, f32::NAN, 1.0]).view([1, 3]);
        let cfg = SamplingConfig {
            temperature: 1.0,
            ..Default::default()
        };
        let _ = pick(&scores, &cfg, &[0.5]);
    }

    /// Greedy, and sampling with temperature, top-k and top-p; two EOS ids
    /// that cannot end a row before its third token.
    fn configs() -> Vec<SamplingConfig> {
        let base = SamplingConfig {
            max_new_tokens: 12,
            min_new_tokens: 3,
            eos_token_ids: vec![5, 17],
            pad_token_id: 0,
            seed: 7,
            ..Default::default()
        };
        vec![
            SamplingConfig {
                temperature: 0.0,
                ..base.clone()
            },
            SamplingConfig {
                temperature: 0.8,
                top_k: 10,
                ..base.clone()
            },
            SamplingConfig {
                temperature: 1.0,
                top_p: 0.9,
                ..base
            },
        ]
    }

    /// Prompts of mixed lengths (one of a single token, which needs no
    /// prefill), each sampled three times.
    fn prompts() -> Vec<Vec<i64>> {
        vec![
            vec![3, 9, 4, 11, 7, 2, 30],
            vec![8],
            vec![12, 40, 41],
            vec![2, 2, 60, 33, 14, 9, 9, 1, 50, 6],
            vec![21, 22],
        ]
    }

    fn requests(prompts: &[Vec<i64>], n: u64) -> Vec<Request<'_>> {
        prompts
            .iter()
            .enumerate()
            .flat_map(|(i, p)| {
                (0..n).map(move |s| Request {
                    prompt: p,
                    prompt_index: i as u64,
                    sample_index: s,
                })
            })
            .collect()
    }

    /// Ends request `r` after `3 + r % 7` tokens, so rows end at mixed times.
    fn stop_at(r: usize, tokens: &[i64]) -> bool {
        tokens.len() >= 3 + r % 7
    }

    /// The row decoded alone with no cache: a full forward over prompt and
    /// tokens so far at each step, drawing from the row's own stream.
    fn alone_without_cache(
        model: &Transformer,
        r: usize,
        req: &Request<'_>,
        cfg: &SamplingConfig,
    ) -> Sample {
        let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
        rng.set_stream(stream(req.prompt_index, req.sample_index));
        let mut seq = req.prompt.to_vec();
        let mut out = Sample {
            tokens: Vec::new(),
            logprobs: Vec::new(),
            finish: Finish::Length,
        };
        let eos = Tensor::from_slice(&cfg.eos_token_ids);
        tch::no_grad(|| loop {
            let ids = Tensor::from_slice(&seq).view([1, -1]);
            let logits = model
                .forward(&ids, &ids.ones_like(), false)
                .select(1, -1)
                .to_kind(Kind::Float);
            let mut scores = logits.shallow_clone();
            if (out.tokens.len() as i64) < cfg.min_new_tokens {
                scores = scores.index_fill(1, &eos, f64::NEG_INFINITY);
            }
            let u: Vec<f32> = match cfg.temperature > 0.0 {
                true => vec![uniform(&mut rng)],
                false => Vec::new(),
            };
            let tok = pick(&scores, cfg, &u).int64_value(&[0]);
            let lp = logits.log_softmax(-1, Kind::Float).double_value(&[0, tok]);
            out.tokens.push(tok);
            out.logprobs.push(lp as f32);
            seq.push(tok);
            if cfg.eos_token_ids.contains(&tok) {
                out.finish = Finish::Eos;
            } else if stop_at(r, &out.tokens) {
                out.finish = Finish::Stop;
            } else if out.tokens.len() as i64 >= cfg.max_new_tokens {
                out.finish = Finish::Length;
            } else {
                continue;
            }
            return out;
        })
    }

    fn assert_same(name: &str, what: &str, got: &[Sample], want: &[Sample]) {
        assert_eq!(got.len(), want.len());
        for (r, (g, w)) in got.iter().zip(want).enumerate() {
            assert_eq!(g.tokens, w.tokens, "{name} {what}: request {r}");
            assert_eq!(g.finish, w.finish, "{name} {what}: request {r}");
            for (a, b) in g.logprobs.iter().zip(&w.logprobs) {
                assert!(
                    (a - b).abs() < 1e-4,
                    "{name} {what}: request {r}: {a} vs {b}"
                );
            }
        }
    }

    /// How many tokens of `probs` top-p leaves to draw from.
    fn kept_by_top_p(probs: &[f64], top_p: f64) -> i64 {
        let logits = Tensor::from_slice(probs)
            .log()
            .to_kind(Kind::Float)
            .unsqueeze(0);
        let cfg = SamplingConfig {
            top_p,
            ..SamplingConfig::default()
        };
        warped(&logits, &cfg)
            .isfinite()
            .sum(Kind::Int64)
            .int64_value(&[])
    }

    /// transformers' TopPLogitsWarper keeps 2, 1 and 2 tokens of these
    /// (checked with transformers 5.23): a token whose mass before it is
    /// exactly top_p goes.
    #[test]
    fn top_p_keeps_what_transformers_keeps_at_the_boundary() {
        assert_eq!(kept_by_top_p(&[0.5, 0.25, 0.25], 0.75), 2);
        assert_eq!(kept_by_top_p(&[0.5, 0.5], 0.5), 1);
        assert_eq!(kept_by_top_p(&[0.4, 0.3, 0.2, 0.1], 0.7), 2);
        assert_eq!(kept_by_top_p(&[0.4, 0.3, 0.2, 0.1], 0.75), 3);
    }

    #[test]
    fn each_row_samples_the_same_tokens_whatever_the_batch() {
        let prompts = prompts();
        let reqs = requests(&prompts, 3);
        for (name, model) in tiny_models() {
            for cfg in configs() {
                let what = format!(
                    "temperature {} top_k {} top_p {}",
                    cfg.temperature, cfg.top_k, cfg.top_p
                );
                let alone: Vec<Sample> = reqs
                    .iter()
                    .enumerate()
                    .map(|(r, q)| alone_without_cache(&model.lm, r, q, &cfg))
                    .collect();
                // One row at a time through the sampler, then batches of
                // 4 (rows leave and waiting ones join), then all at once;
                // and the requests in another order.
                for max_rows in [1, 4, 0] {
                    let cfg = SamplingConfig {
                        max_rows,
                        ..cfg.clone()
                    };
                    let got =
                        sample_requests(&model.lm, &reqs, &cfg, Device::Cpu, stop_at, |_| Ok(()))
                            .unwrap()
                            .samples;
                    assert_same(name, &format!("{what} max_rows {max_rows}"), &got, &alone);
                }
                let reversed: Vec<Request<'_>> = reqs.iter().rev().copied().collect();
                let n = reqs.len();
                let cfg4 = SamplingConfig {
                    max_rows: 4,
                    ..cfg.clone()
                };
                let got = sample_requests(
                    &model.lm,
                    &reversed,
                    &cfg4,
                    Device::Cpu,
                    |r, t| stop_at(n - 1 - r, t),
                    |_| Ok(()),
                )
                .unwrap()
                .samples;
                let got: Vec<Sample> = got.into_iter().rev().collect();
                assert_same(name, &format!("{what} reversed"), &got, &alone);
                if cfg.temperature > 0.0 {
                    assert!(
                        alone.chunks(3).any(|s| s[0].tokens != s[1].tokens),
                        "{name} {what}: the samples of a prompt differ"
                    );
                }
            }
        }
    }

    /// Phi-3's LongRoPE switches to its long factors past the original
    /// context: for the row that is past it, not for every row that shares
    /// its batch (before, a short prompt beside a long one was rotated
    /// with the long factors, and its tokens changed with the batch).
    #[test]
    fn a_longrope_row_short_of_the_context_decodes_alike_beside_a_long_one() {
        let _rng = crate::testing::torch_rng();
        tch::manual_seed(5);
        let json = serde_json::json!({
            "model_type": "phi3", "vocab_size": 64, "hidden_size": 32,
            "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 4, "max_position_embeddings": 64,
            "original_max_position_embeddings": 8,
            "rope_scaling": {"type": "longrope", "short_factor": [1.0, 1.0, 1.0, 1.0],
                             "long_factor": [1.0, 3.0, 9.0, 27.0]},
            "eos_token_id": 5, "pad_token_id": 0,
        });
        let cfg = crate::model::ModelConfig::from_json(json).unwrap();
        let model = Model::init(&cfg, &BuildOptions::new(Device::Cpu, Head::Lm));
        drop(_rng);
        // 2 + 5 positions stay short of 8; 10 are past it from the start.
        let (short, long) = ([8i64, 3], [2i64, 2, 60, 33, 14, 9, 9, 1, 50, 6]);
        let req = |prompt, prompt_index| Request {
            prompt,
            prompt_index,
            sample_index: 0,
        };
        let cfg = SamplingConfig {
            max_new_tokens: 5,
            temperature: 0.0,
            pad_token_id: 0,
            ..Default::default()
        };
        let run = |reqs: &[Request<'_>]| {
            sample_requests(&model.lm, reqs, &cfg, Device::Cpu, |_, _| false, |_| Ok(()))
                .unwrap()
                .samples
        };
        let alone = run(&[req(&short[..], 0)]);
        let beside = run(&[req(&short[..], 0), req(&long[..], 1)]);
        assert_eq!(alone[0].tokens, beside[0].tokens);
        let (a, b) = (&alone[0].logprobs, &beside[0].logprobs);
        assert!(
            a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-5),
            "{a:?} vs {b:?}"
        );
    }

    #[test]
    fn samples_of_a_prompt_share_one_prefill_and_finished_rows_leave() {
        let prompts = prompts();
        let reqs = requests(&prompts, 3);
        let (_, model) = tiny_models().remove(0);
        let cfg = SamplingConfig {
            max_rows: 4,
            ..configs().remove(1)
        };
        let mut finished = Vec::new();
        let out = sample_requests(&model.lm, &reqs, &cfg, Device::Cpu, stop_at, |done| {
            finished.push(done);
            Ok(())
        })
        .unwrap();
        // Four prompts have more than one token (the one-token prompt
        // needs no prefill); batches of 4 split the 3 samples of a prompt
        // across admissions, and its keys wait for the later ones.
        assert_eq!(out.stats.prefills, 4);
        let tokens: usize = out.samples.iter().map(|s| s.tokens.len()).sum();
        // Every row of every step yields a token: no row decodes padding.
        assert_eq!(out.stats.row_steps, tokens as u64);
        assert!(out.stats.row_steps <= out.stats.steps * 4);
        assert_eq!(finished, (1..=reqs.len()).collect::<Vec<_>>());
        // A failing hook ends the call with its error.
        let err = sample_requests(&model.lm, &reqs, &cfg, Device::Cpu, stop_at, |_| {
            anyhow::bail!("cancelled")
        })
        .unwrap_err();
        assert_eq!(err.to_string(), "cancelled");
    }
}
