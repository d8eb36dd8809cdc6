//! The rollout of one iteration: the next prompts, responses sampled from
//! the policy, their log-probs under the policy and the reference, their
//! values and scores, and the rewards shaped from the scores and the KL.

use tch::{Kind, Tensor};

use alignflow_ops::PpoKlMode;

use super::reward_source::RawScores;
use super::scalar;
use super::setup::{Models, Settings};
use super::stop::Stop;
use crate::model::sample::SamplingConfig;
use crate::model::Model;
use crate::ops::rollout::{sample, Rollout as Sampled};
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
    /// Rows of the batch.
    pub b: i64,
    pub sampled: Sampled,
    /// `[b, r]` float 1 on the response tokens that count: generated, up
    /// to and including the first EOS.
    pub rmask: Tensor,
    /// `[b]` whether each response has an EOS.
    pub has_eos: Tensor,
}

/// Samples iteration `it`'s responses from the policy.
pub(super) fn roll_out(s: &Settings, policy: &Model, prompts: &[Vec<i64>], it: u64) -> Rollout {
    let batch = next_prompts(s, prompts, it);
    let b = batch.len() as i64;
    let cfg = SamplingConfig {
        seed: step_seed(s.seed, it) as u64,
        ..s.sampling.clone()
    };
    let sampled = tch::no_grad(|| {
        crate::train::autocast_if(s.autocast, || sample(policy, &batch, &cfg, s.device))
    });
    let rmask = sampled.scored_mask(&s.eos);
    let has_eos = contains_eos(&sampled.resp, &s.eos);
    Rollout {
        batch,
        b,
        sampled,
        rmask,
        has_eos,
    }
}

/// The next prompts, cycling over seeded orders, each repeated `group`
/// times in consecutive rows (one group per prompt).
fn next_prompts(s: &Settings, prompts: &[Vec<i64>], it: u64) -> Vec<Vec<i64>> {
    let n = prompts.len();
    (0..s.batch_size)
        .flat_map(|j| {
            let pos = (it - 1) as usize * s.batch_size + j;
            let order = epoch_permutation(n, s.seed, (pos / n) as u64);
            std::iter::repeat_n(&prompts[order[pos % n]], s.group).cloned()
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
    let (scores, baseline_score) = models.rewards.contrastive(&ro.batch, scores, norm);
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
/// the reference's log-probs and the raw scores.
fn rollout_forwards(
    s: &Settings,
    models: &Models,
    ro: &Rollout,
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
    let rmask = &ro.rmask;
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
            let sc = models
                .rewards
                .raw_scores(&ro.batch, ids, mask, resp, gen_mask);
            (old, rf, v, sc)
        })
    });
    Ok((old_logp, ref_logp, old_values, raw_scores?))
}
