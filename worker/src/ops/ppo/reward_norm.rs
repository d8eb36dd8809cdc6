//! The reward normalisation: an affine map fitted, before the first
//! iteration, to the raw scores of the reference policy's own responses.

use anyhow::Context;
use tch::Kind;

use alignflow_ops::StageContext;

use super::reward_source::Rewards;
use super::setup::{Models, Reference, Settings};
use crate::model::sample::SamplingConfig;
use crate::model::Model;
use crate::ops::rollout::sample;
use crate::rl::RewardNorm;
use crate::train::{epoch_permutation, step_seed};

/// The iteration seeds of the reward-normalisation rollouts count down from
/// here, far from the training iterations' `1..=iterations`.
const NORM_STREAM: u64 = u64::MAX;

/// The map that gives the reference's scores the configured mean and
/// standard deviation; `None` without `reward_norm`.
pub(super) fn fit(
    ctx: &StageContext<'_>,
    s: &Settings,
    models: &Models,
    prompts: &[Vec<i64>],
) -> anyhow::Result<Option<RewardNorm>> {
    let Some(rn) = &s.params.reward_norm else {
        return Ok(None);
    };
    let stage = &s.stage;
    anyhow::ensure!(
        rn.samples >= 2,
        "stage `{stage}`, field `params.reward_norm.samples`: {} reference samples cannot give a standard deviation (need at least 2)",
        rn.samples
    );
    ctx.reporter.progress(
        0,
        Some(s.params.iterations),
        &format!("scoring {} reference samples", rn.samples),
    );
    let raw = reference_scores(
        &models.policy,
        &models.reference,
        &models.rewards,
        prompts,
        rn.samples,
        s.batch_size,
        &s.sampling,
        s.seed,
        s.autocast,
    )?;
    let norm = RewardNorm::fit(&raw, rn.mean, rn.std).with_context(|| {
        format!(
            "stage `{stage}`, field `params.reward_norm`: the {} reference scores have no spread (or are not finite): {:?}",
            raw.len(),
            &raw[..raw.len().min(8)]
        )
    })?;
    Ok(Some(norm))
}

/// The raw preference-model scores of `samples` responses of the reference
/// policy, to prompts in a seeded order of their own, in batches of
/// `batch_size`.
#[allow(clippy::too_many_arguments)]
pub(super) fn reference_scores(
    policy: &Model,
    reference: &Reference,
    rewards: &Rewards,
    prompts: &[Vec<i64>],
    samples: usize,
    batch_size: usize,
    base_cfg: &SamplingConfig,
    seed: u64,
    autocast: bool,
) -> anyhow::Result<Vec<f64>> {
    let n = prompts.len();
    let mut scores = Vec::with_capacity(samples);
    let mut chunk = 0u64;
    while scores.len() < samples {
        let rows: Vec<usize> = (scores.len()..samples.min(scores.len() + batch_size))
            .map(|pos| {
                let order = epoch_permutation(n, seed, NORM_STREAM - (pos / n) as u64);
                order[pos % n]
            })
            .collect();
        let batch: Vec<Vec<i64>> = rows.iter().map(|&i| prompts[i].clone()).collect();
        let cfg = SamplingConfig {
            seed: step_seed(seed, NORM_STREAM - chunk) as u64,
            ..base_cfg.clone()
        };
        let sc = tch::no_grad(|| {
            crate::train::autocast_if(autocast, || {
                let ro = reference.with(policy, |m| sample(m, &batch, &cfg, m.vs.device()));
                rewards.raw_scores(&rows, &ro.ids, &ro.mask, &ro.resp, &ro.gen_mask)
            })
        })?
        .scores;
        scores.extend(
            Vec::<f64>::try_from(&sc.to_kind(Kind::Double).to_device(tch::Device::Cpu))
                .expect("scores"),
        );
        chunk += 1;
    }
    Ok(scores)
}
