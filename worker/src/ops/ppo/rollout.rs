//! The rollout of one iteration: the next prompts, responses sampled from
//! the policy, their log-probs under the policy and the reference, their
//! values and scores, and the rewards shaped from the scores and the KL.

use tch::{Kind, Tensor};

use alignflow_ops::PpoKlMode;

use super::reward_source::RawScores;
use super::scalar;
use super::setup::{Models, Settings};
use super::stop::Stop;
use crate::dist::Group;
use crate::model::sample::Sample;
use crate::model::sample::SamplingConfig;
use crate::model::Model;
use crate::ops::rollout::{sample, sample_rows, Rollout as Sampled};
use crate::ops::scoring::{response_logprobs, response_values};
use crate::rl::{
    contains_eos, kl_per_token, mean_sequence_kl, shape_rewards, RewardNorm, ShapedRewards,
};
use crate::train::{epoch_permutation, step_seed};

/// The update's forward passes over the whole batch, with grad: the
/// policy's log-probs of the response tokens and its entropy at each of
/// them, and the value model's values (see `Passes::Auto`).
pub(super) struct Forwards {
    pub logp: Tensor,
    pub entropy: Tensor,
    pub values: Option<Tensor>,
}

/// One iteration's prompts and the policy's responses to them.
pub(super) struct Rollout {
    /// The prompts, each repeated `group` times in consecutive rows.
    pub batch: Vec<Vec<i64>>,
    /// Each row's prompt, by its index in the stage's prompts.
    pub prompt_rows: Vec<usize>,
    /// Rows of the batch.
    pub b: i64,
    pub sampled: Sampled,
    /// `[b, r]` float 1 on the response tokens that count: generated, up
    /// to and including the first EOS.
    pub rmask: Tensor,
    /// `[b]` whether each response has an EOS.
    pub has_eos: Tensor,
}

/// Samples iteration `it`'s responses from the policy. On several ranks
/// each samples its rows ([`Settings::my_rows`]) and the responses are
/// gathered: every rank holds the whole batch, as one process would.
pub(super) fn roll_out(
    s: &Settings,
    policy: &Model,
    prompts: &[Vec<i64>],
    it: u64,
) -> anyhow::Result<Rollout> {
    let prompt_rows = next_prompts(s, prompts.len(), it);
    let batch: Vec<Vec<i64>> = prompt_rows.iter().map(|&i| prompts[i].clone()).collect();
    let b = batch.len() as i64;
    let cfg = SamplingConfig {
        seed: step_seed(s.seed, it) as u64,
        ..s.sampling.clone()
    };
    let sampled = match s.ranks {
        None => tch::no_grad(|| {
            crate::train::autocast_if(s.autocast, || sample(policy, &batch, &cfg, s.device))
        }),
        Some(g) => {
            let rows = s.my_rows();
            let mine = tch::no_grad(|| {
                crate::train::autocast_if(s.autocast, || {
                    sample_rows(policy, &batch[rows.clone()], rows.start, &cfg, s.device)
                })
            });
            let responses = gather_responses(g, &mine, rows.start, batch.len(), s)?;
            let responses: Vec<&[i64]> = responses.iter().map(Vec::as_slice).collect();
            Sampled::of_tokens(&batch, &responses, cfg.pad_token_id, s.device)
        }
    };
    let rmask = sampled.scored_mask(&s.eos);
    let has_eos = contains_eos(&sampled.resp, &s.eos);
    Ok(Rollout {
        batch,
        prompt_rows,
        b,
        sampled,
        rmask,
        has_eos,
    })
}

/// Every rank's responses (`mine`: rows `start..` of `rows`), gathered:
/// each row's length and tokens in a `[rows, 1 + max_new_tokens]` table.
fn gather_responses(
    g: &Group,
    mine: &[Sample],
    start: usize,
    rows: usize,
    s: &Settings,
) -> anyhow::Result<Vec<Vec<i64>>> {
    let width = 1 + s.params.max_new_tokens.max(1) as usize;
    let mut table = vec![0i64; mine.len() * width];
    for (row, sample) in table.chunks_mut(width).zip(mine) {
        row[0] = sample.tokens.len() as i64;
        row[1..=sample.tokens.len()].copy_from_slice(&sample.tokens);
    }
    let mine = Tensor::from_slice(&table).view([mine.len() as i64, width as i64]);
    let all = crate::dist::gather_rows(g, &mine, start, rows)?;
    let all = Vec::<Vec<i64>>::try_from(&all)?;
    Ok(all
        .into_iter()
        .map(|row| row[1..=row[0] as usize].to_vec())
        .collect())
}

/// The indices of the next prompts of `n`, cycling over seeded orders,
/// each repeated `group` times in consecutive rows (one group per prompt).
fn next_prompts(s: &Settings, n: usize, it: u64) -> Vec<usize> {
    (0..s.batch_size)
        .flat_map(|j| {
            let pos = (it - 1) as usize * s.batch_size + j;
            let order = epoch_permutation(n, s.seed, (pos / n) as u64);
            std::iter::repeat_n(order[pos % n], s.group)
        })
        .collect()
}

/// What the update learns from and the metrics report: the rollout's
/// log-probs, values, scores and shaped rewards.
pub(super) struct Experience {
    /// `[b, r]` the policy's and the reference's log-probs of the response
    /// tokens at rollout time.
    pub old_logp: Tensor,
    pub ref_logp: Tensor,
    /// `[b, r]` the value model's values at rollout time (masked); `None`
    /// without a value model.
    pub old_values: Option<Tensor>,
    /// `[b]` the reward source's scores, before any normalisation.
    pub raw_scores: Tensor,
    /// Each reward source's mean score, when the stage logs them
    /// (`reward_<source>`).
    pub source_scores: Vec<(String, f64)>,
    /// The contrastive baseline's mean score, when there is one.
    pub baseline_score: Option<f64>,
    pub mean_kl: f64,
    pub mean_score: f64,
    /// The KL coefficient of this iteration.
    pub kl_coef: f64,
    pub shaped: ShapedRewards,
}

/// Scores the rollout and shapes its rewards. `forwards` are the update's
/// own forwards when they stand in for the rollout's (see `Passes::Auto`).
#[allow(clippy::too_many_arguments)]
pub(super) fn experience(
    s: &Settings,
    models: &Models,
    ro: &Rollout,
    forwards: Option<&Forwards>,
    norm: Option<&RewardNorm>,
    kl_coef: f64,
    it: u64,
    stop: &Stop<'_>,
) -> anyhow::Result<Experience> {
    let rmask = &ro.rmask;
    let (old_logp, ref_logp, old_values, raw) = rollout_forwards(s, models, ro, forwards)?;
    let (raw_scores, source_scores) = (raw.scores, raw.sources);
    let scores = match norm {
        Some(nm) => &raw_scores * nm.gain + nm.bias,
        None => raw_scores.shallow_clone(),
    };
    let (scores, baseline_score) = models.rewards.contrastive(&ro.prompt_rows, scores, norm);
    let kl = kl_per_token(&old_logp, &ref_logp, s.estimator) * rmask;
    let mean_kl = scalar(&mean_sequence_kl(&kl, rmask));
    let mean_score = scalar(&scores.mean(Kind::Float));
    stop.unless_finite(it, "score", mean_score)?;
    stop.unless_finite(it, "KL", mean_kl)?;
    // With `kl_mode: loss` the KL is a loss term, not a reward.
    let reward_kl_coef = match s.params.kl_mode {
        PpoKlMode::Reward => kl_coef,
        PpoKlMode::Loss => 0.0,
    };
    let shaped = shape_rewards(
        &scores,
        &kl,
        rmask,
        &ro.has_eos,
        reward_kl_coef,
        s.params.no_eos_penalty,
    );
    Ok(Experience {
        old_logp,
        ref_logp,
        old_values,
        raw_scores,
        source_scores,
        baseline_score,
        mean_kl,
        mean_score,
        kl_coef,
        shaped,
    })
}

/// The rollout's no-grad forwards: the policy's log-probs of the response
/// tokens (or the update's, detached), the value model's values (masked),
/// the reference's log-probs and the raw scores. On several ranks each
/// takes its rows' forwards and the results are gathered.
fn rollout_forwards(
    s: &Settings,
    models: &Models,
    ro: &Rollout,
    forwards: Option<&Forwards>,
) -> anyhow::Result<(Tensor, Tensor, Option<Tensor>, RawScores)> {
    let Some(g) = s.ranks else {
        return forwards_of_rows(s, models, ro, 0..ro.batch.len(), forwards);
    };
    // `Plan` never lets the update's forwards stand in on several ranks.
    let rows = s.my_rows();
    let (old, rf, v, raw) = forwards_of_rows(s, models, ro, rows.clone(), None)?;
    let b = ro.batch.len();
    let gather = |t: &Tensor| crate::dist::gather_rows(g, t, rows.start, b);
    let old = gather(&old)?;
    let rf = gather(&rf)?;
    let v = v.as_ref().map(gather).transpose()?;
    let scores = gather(&raw.scores)?;
    // Each source's mean over the whole batch, from the ranks' sums.
    let n = rows.len() as f64;
    let sums: Vec<f64> = raw.sources.iter().map(|(_, mean)| mean * n).collect();
    let sums = g.sum_f64(&sums)?;
    let sources = raw
        .sources
        .into_iter()
        .zip(sums)
        .map(|((name, _), sum)| (name, sum / b as f64))
        .collect();
    Ok((old, rf, v, RawScores { scores, sources }))
}

/// [`rollout_forwards`] of the batch's rows `rows`.
fn forwards_of_rows(
    s: &Settings,
    models: &Models,
    ro: &Rollout,
    rows: std::ops::Range<usize>,
    forwards: Option<&Forwards>,
) -> anyhow::Result<(Tensor, Tensor, Option<Tensor>, RawScores)> {
    let Sampled {
        ids,
        mask,
        resp,
        gen_mask,
        p_len,
        r,
        ..
    } = &ro.sampled;
    let (p_len, r) = (*p_len, *r);
    let (start, len) = (rows.start as i64, rows.len() as i64);
    let at = |t: &Tensor| t.narrow(0, start, len);
    let (ids, mask, resp, gen_mask, rmask) = (
        &at(ids),
        &at(mask),
        &at(resp),
        &at(gen_mask),
        &at(&ro.rmask),
    );
    let batch = &ro.prompt_rows[rows];
    let (old_logp, ref_logp, old_values, raw_scores) = tch::no_grad(|| {
        crate::train::autocast_if(s.autocast, || {
            let (old, v) = match forwards {
                Some(f) => (
                    f.logp.detach(),
                    f.values.as_ref().map(|v| v.detach() * rmask),
                ),
                None => (
                    response_logprobs(
                        &models.policy,
                        ids,
                        mask,
                        resp,
                        p_len,
                        s.params.temperature,
                        false,
                        false,
                    )
                    .logp,
                    models
                        .critic
                        .as_ref()
                        .map(|c| response_values(c, ids, mask, p_len, r, false) * rmask),
                ),
            };
            let rf = models.reference.with(&models.policy, |m| {
                response_logprobs(
                    m,
                    ids,
                    mask,
                    resp,
                    p_len,
                    s.params.temperature,
                    false,
                    false,
                )
                .logp
            });
            let sc = models.rewards.raw_scores(batch, ids, mask, resp, gen_mask);
            (old, rf, v, sc)
        })
    });
    Ok((old_logp, ref_logp, old_values, raw_scores?))
}
