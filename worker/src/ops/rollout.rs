//! Sampled responses laid out as tensors after their prompts, as the ops
//! that score a policy's own samples read them (`ppo`, `baseline_scores`,
//! `evaluate`'s KL).

use tch::{Device, Kind, Tensor};

use crate::model::sample::{generate, left_pad, sample_requests, Request, Sample, SamplingConfig};
use crate::model::Model;
use crate::rl::response_mask;

/// A batch of sampled responses, padded into tensors.
pub struct Rollout {
    /// `[b, p + r]` prompt (left-padded) and response (right-padded).
    pub ids: Tensor,
    pub mask: Tensor,
    /// `[b, r]` response tokens and 0/1 generated-token mask.
    pub resp: Tensor,
    pub gen_mask: Tensor,
    /// Prompt width `p` and response width `r`.
    pub p_len: i64,
    pub r: i64,
    /// Generated tokens in the batch.
    pub tokens: u64,
}

impl Rollout {
    /// Lays out `samples`, row `i` continuing `prompts[i]`, padded with `pad`.
    ///
    /// # Shapes
    /// `prompts`, `samples`: `b` rows each; `r` is the longest response
    /// (at least 1).
    pub fn of(prompts: &[Vec<i64>], samples: &[Sample], pad: i64, device: Device) -> Rollout {
        let tokens: Vec<&[i64]> = samples.iter().map(|s| s.tokens.as_slice()).collect();
        Rollout::of_tokens(prompts, &tokens, pad, device)
    }

    /// [`Rollout::of`] from each row's new tokens alone.
    pub fn of_tokens(
        prompts: &[Vec<i64>],
        responses: &[&[i64]],
        pad: i64,
        device: Device,
    ) -> Rollout {
        let r_len = responses.iter().map(|t| t.len()).max().unwrap_or(1).max(1);
        let b = prompts.len() as i64;
        let mut resp_v = Vec::with_capacity(prompts.len() * r_len);
        let mut len_v = Vec::with_capacity(prompts.len() * r_len);
        for t in responses {
            for k in 0..r_len {
                resp_v.push(t.get(k).copied().unwrap_or(pad));
                len_v.push(i64::from(k < t.len()));
            }
        }
        let r = r_len as i64;
        let resp = Tensor::from_slice(&resp_v).view([b, r]).to_device(device);
        let gen_mask = Tensor::from_slice(&len_v).view([b, r]).to_device(device);
        let (prompt_ids, prompt_mask) = left_pad(prompts, pad, device);
        let p_len = prompt_ids.size()[1];
        Rollout {
            ids: Tensor::cat(&[&prompt_ids, &resp], 1),
            mask: Tensor::cat(&[&prompt_mask, &gen_mask], 1),
            resp,
            gen_mask,
            p_len,
            r,
            tokens: len_v.iter().sum::<i64>() as u64,
        }
    }

    /// `[b, r]` float 0/1: the response tokens that count, those generated
    /// up to and including the first `eos` (all generated ones without an
    /// EOS token).
    pub fn scored_mask(&self, eos_ids: &[i64]) -> Tensor {
        response_mask(&self.resp, eos_ids, None) * self.gen_mask.to_kind(Kind::Float)
    }
}

/// Samples one response per prompt of `batch` from `m`.
pub fn sample(m: &Model, batch: &[Vec<i64>], cfg: &SamplingConfig, device: Device) -> Rollout {
    let samples = generate(&m.lm, batch, cfg, device, |_, _| false);
    Rollout::of(batch, &samples, cfg.pad_token_id, device)
}

/// One response per row of `rows`, rows `first..` of a larger batch: row
/// `j` draws from the random stream of row `first + j`, so a share of a
/// batch samples what the whole batch would at those rows.
pub fn sample_rows(
    m: &Model,
    rows: &[Vec<i64>],
    first: usize,
    cfg: &SamplingConfig,
    device: Device,
) -> Vec<Sample> {
    let requests: Vec<Request<'_>> = rows
        .iter()
        .enumerate()
        .map(|(j, prompt)| Request {
            prompt,
            prompt_index: (first + j) as u64,
            sample_index: 0,
        })
        .collect();
    sample_requests(&m.lm, &requests, cfg, device, |_, _| false, |_| Ok(()))
        .expect("no hook fails")
        .samples
}
