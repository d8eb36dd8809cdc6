//! `baseline_scores`: `samples` responses of the starting policy to each
//! distinct templated prompt, scored by the preference model, for `ppo`'s
//! contrastive rewards (see `alignflow_ops::BaselineScoresParams`).
//! Prompts are tokenized and cut to fit exactly as `ppo` cuts them; the
//! records are keyed by the templated text.

use std::collections::HashSet;

use anyhow::Context;
use tch::Kind;

use alignflow_ops::data::JsonlWriter;
use alignflow_ops::protocol::Metrics;
use alignflow_ops::text::Tokenizer;
use alignflow_ops::{BaselineRecord, BaselineScoresParams, StageContext};

use super::load;
use super::prompts::{read_prompts, PromptSource};
use super::rollout::Rollout;
use super::sampling::{sample_prompts, sampling_config};
use super::scoring::pm_scores;
use crate::model::sample::SamplingConfig;
use crate::model::{self, Head};
use crate::rl::baseline_mean;
use crate::train::step_seed;

pub fn run(ctx: &StageContext<'_>) -> anyhow::Result<Metrics> {
    let p: BaselineScoresParams = ctx.params()?;
    let stage = &ctx.spec.stage;
    let device = model::device(&ctx.spec.device)?;
    anyhow::ensure!(
        p.samples >= 1,
        "stage `{stage}`, field `params.samples`: need at least 1"
    );
    let policy_dir = ctx.input("policy")?;
    let tokenizer = Tokenizer::from_dir(policy_dir)?;
    let policy = load::frozen(policy_dir, device, Head::Lm, p.dtype)?;
    let pm = load::frozen(ctx.input("reward_model")?, device, Head::Reward, p.dtype)?;
    anyhow::ensure!(
        pm.lm.cfg.vocab_size == policy.lm.cfg.vocab_size,
        "stage `{stage}`: the reward model's vocabulary ({}) differs from the policy's ({}): they must share a tokenizer",
        pm.lm.cfg.vocab_size,
        policy.lm.cfg.vocab_size
    );
    let max_new = p.max_new_tokens.max(1);
    let max_positions = policy.lm.cfg.max_positions.min(pm.lm.cfg.max_positions);

    // Each distinct prompt once: the baseline is keyed by its text.
    let mut seen = HashSet::new();
    let source = PromptSource::new(ctx, &p.prompt, policy_dir, max_positions, max_new)?;
    let (texts, prompts): (Vec<String>, Vec<Vec<i64>>) = read_prompts(ctx, &source, &tokenizer)?
        .into_iter()
        .filter(|pr| seen.insert(pr.text.clone()))
        .map(|pr| (pr.text, pr.ids))
        .unzip();

    let sampling = sampling_config(&tokenizer, &policy, max_new, p.temperature);
    // Row `j` of the flat list is sample `j % k` of prompt `j / k`.
    let k = p.samples;
    let total = prompts.len() * k;
    let cfg = SamplingConfig {
        seed: step_seed(ctx.spec.seed, 1) as u64,
        max_rows: p.batch_size.max(1),
        ..sampling
    };
    let ids: Vec<&[i64]> = prompts.iter().map(Vec::as_slice).collect();
    let never = |_: usize, _: &[i64]| false;
    let sampled = sample_prompts(ctx, &policy.lm, &ids, k, &cfg, never, "baseline samples")?;
    let rows: Vec<Vec<i64>> = (0..total).map(|j| prompts[j / k].clone()).collect();
    let mut scores = Vec::with_capacity(total);
    for (batch, samples) in rows
        .chunks(p.batch_size.max(1))
        .zip(sampled.samples.chunks(p.batch_size.max(1)))
    {
        ctx.cancel.check()?;
        let sc = tch::no_grad(|| {
            let ro = Rollout::of(batch, samples, cfg.pad_token_id, device);
            pm_scores(&pm, &ro.ids, &ro.mask)
        });
        scores.extend(Vec::<f64>::try_from(&sc.to_kind(Kind::Double))?);
    }

    let mut out = JsonlWriter::create(&ctx.output("scores"))?;
    let mut sum = 0.0;
    for (text, s) in texts.iter().zip(scores.chunks(k)) {
        let mean = baseline_mean(s).with_context(|| {
            format!("stage `{stage}`: prompt {text:?}: a baseline score is not finite: {s:?}")
        })?;
        sum += mean;
        out.write(&BaselineRecord {
            prompt: text.clone(),
            mean,
            scores: s.to_vec(),
        })?;
    }
    out.finish()?;
    let mut m = Metrics::new();
    m.insert("prompts".into(), texts.len().into());
    m.insert("samples".into(), total.into());
    m.insert("mean_score".into(), (sum / texts.len() as f64).into());
    Ok(m)
}
