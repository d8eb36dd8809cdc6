//! `best_of_n`: n answers per prompt, scored by the stage's reward sources
//! (a PM, a reward program, built-in rules; a weighted sum), the best kept (see
//! `alignflow_ops::best_of_n` for the outputs and how `sft` reads them).
//!
//! Two phases, each holding one model: (1) the policy samples every prompt
//! `n` times, rows laid out prompt by prompt as `generate` does, batch `k`
//! drawing from its own stream of the stage seed; (2) the PM (if any) scores each
//! prompt's distinct `prompt + answer` sequences as `evaluate` does (the
//! scoring of `ppo`), so identical answers get identical scores and the
//! tie goes to the lowest sample index.

use alignflow_ops::best_of_n::{best_index, BestOfNReport};
use alignflow_ops::data::JsonlWriter;
use alignflow_ops::protocol::Metrics;
use alignflow_ops::reward_program::Request;
use alignflow_ops::rewards::{effective_rewards, TextRewards, PROGRAM_INPUT};
use alignflow_ops::text::Tokenizer;
use alignflow_ops::{BestOfNParams, StageContext};

use super::load::{self, shared_positions};
use super::prompts::{read_prompts, truncated, with_answer, Prompt, PromptSource};
use super::sampling::{
    cut_at_first_stop, decode_answer, decoding_config, hits_stop, sample_prompts,
};
use super::scoring::pm_score_answers;
use crate::model::sample::SamplingConfig;
use crate::model::{Head, Model};
use alignflow_ops::Role;

/// One sampled answer.
struct Answer {
    /// Sampled tokens, EOS included when sampled (what the PM scores).
    tokens: Vec<i64>,
    /// Decoded without EOS, stop strings cut (what `sft` trains on).
    text: String,
}

pub fn run(ctx: &StageContext<'_>) -> anyhow::Result<Metrics> {
    let p: BestOfNParams = ctx.params()?;
    let stage = ctx.spec.stage.clone();
    let placed = |role| load::role_device(ctx, &p.placement, role);
    let policy_dir = ctx.input("policy")?;
    let pm_dir = ctx.spec.inputs.get("reward_model").map(|d| d.as_path());
    let tokenizer = Tokenizer::from_dir(policy_dir)?;
    let pm_port: Vec<(&str, &std::path::Path)> =
        pm_dir.map(|d| ("reward_model", d)).into_iter().collect();
    let max_positions = shared_positions(
        &stage,
        policy_dir,
        &pm_port,
        "the PM scores the policy's tokens",
        p.decoding.max_new_tokens,
    )?;
    let source = PromptSource::new(
        ctx,
        &p.prompt,
        policy_dir,
        max_positions,
        p.decoding.max_new_tokens,
    )?
    .first(p.limit);
    let prompts = read_prompts(ctx, &source, &tokenizer)?;

    // (1) n answers per prompt.
    let answers = {
        let policy = load::frozen(policy_dir, placed(Role::Policy)?, Head::Lm, p.dtype)?;
        sample(ctx, &p, &policy, &tokenizer, &prompts)?
    };

    // (2) Scores, per prompt by sample index.
    let scored = score(ctx, &p, pm_dir, &prompts, &answers, placed(Role::Reward)?)?;
    let scores = &scored.totals;

    // Outputs.
    std::fs::create_dir_all(&ctx.spec.out_dir)?;
    let mut out = JsonlWriter::create(&ctx.output("data"))?;
    for (i, per) in scores.iter().enumerate() {
        let best = best_index(per).expect("n >= 1 scores");
        let mut record = serde_json::json!({
            "prompt": prompts[i].raw,
            "prompt_text": prompts[i].text,
            "response": answers[i][best].text,
            "score": per[best],
            "best_index": best,
            "rank_scores": per,
        });
        if let Some(messages) = with_answer(&prompts[i], &answers[i][best].text) {
            record["messages"] = messages;
        }
        if scored.log_sources {
            record["reward_sources"] = scored
                .sources
                .iter()
                .map(|(key, per)| (key.to_string(), per[i][best].into()))
                .collect::<serde_json::Map<_, _>>()
                .into();
        }
        out.write(&record)?;
    }
    out.finish()?;
    let report = BestOfNReport::of(scores, p.n);
    std::fs::write(
        ctx.output("report"),
        serde_json::to_string_pretty(&report)? + "\n",
    )?;
    let mut metrics = report.metrics();
    metrics.insert("truncated_prompts".into(), truncated(&prompts).into());
    if scored.log_sources {
        for (key, per) in &scored.sources {
            let all: Vec<f64> = per.iter().flatten().copied().collect();
            let mean = all.iter().sum::<f64>() / all.len().max(1) as f64;
            metrics.insert(format!("reward_{key}"), mean.into());
        }
    }
    Ok(metrics)
}

/// Every answer's score: the weighted sum, and each source's own.
struct Scored {
    /// Per prompt, by sample index.
    totals: Vec<Vec<f64>>,
    /// Per source key, per prompt, by sample index (unweighted).
    sources: Vec<(&'static str, Vec<Vec<f64>>)>,
    /// Whether the sources are reported (several, or a text one).
    log_sources: bool,
}

/// Scores every answer with the stage's reward sources (see
/// [`alignflow_ops::rewards`]): the PM as `evaluate` does, the program
/// and the rules on the decoded answer and the prompt's record.
fn score(
    ctx: &StageContext<'_>,
    p: &BestOfNParams,
    pm_dir: Option<&std::path::Path>,
    prompts: &[Prompt],
    answers: &[Vec<Answer>],
    device: tch::Device,
) -> anyhow::Result<Scored> {
    let stage = &ctx.spec.stage;
    let bound = |name: &str| ctx.spec.inputs.get(name).map(|d| d.as_path());
    let rewards = effective_rewards(&p.rewards, &|name| bound(name).is_some());
    let mut totals: Vec<Vec<f64>> = answers.iter().map(|a| vec![0.0; a.len()]).collect();
    let mut sources = Vec::new();
    let mut add = |key: &'static str, weight: f64, per: Vec<Vec<f64>>| {
        for (t, s) in totals.iter_mut().zip(&per) {
            for (t, s) in t.iter_mut().zip(s) {
                *t += weight * s;
            }
        }
        sources.push((key, per));
    };
    if let (Some(c), Some(dir)) = (rewards.iter().find(|c| c.pm.is_some()), pm_dir) {
        let pm = load::frozen(dir, device, Head::Reward, p.dtype)?;
        let per = pm_score_answers(
            ctx,
            &pm,
            prompts,
            p.batch_size.max(1),
            |i| answers[i].iter().map(|a| a.tokens.as_slice()).collect(),
            device,
        )?;
        add("pm", c.weight, per);
    }
    let text = TextRewards::start(&rewards, bound(PROGRAM_INPUT), stage)?;
    if !text.is_empty() {
        let requests: Vec<Request<'_>> = prompts
            .iter()
            .zip(answers)
            .flat_map(|(pr, per)| {
                per.iter().map(move |a| Request {
                    record: &pr.record,
                    prompt: &pr.raw,
                    messages: pr.messages.as_ref(),
                    response: &a.text,
                    at: pr.at.clone(),
                })
            })
            .collect();
        ctx.reporter
            .progress(0, None, "scoring with the text reward sources");
        for s in text.score(&requests)? {
            let mut flat = s.scores.into_iter();
            let per = answers
                .iter()
                .map(|a| flat.by_ref().take(a.len()).collect())
                .collect();
            add(s.key, s.weight, per);
        }
    }
    // Each source's scores were finite; their weighted sum must be too.
    if let Some(i) = totals.iter().position(|t| t.iter().any(|x| !x.is_finite())) {
        anyhow::bail!(
            "stage `{stage}`: {}: the reward sources' weighted sum is not finite",
            prompts[i].at
        );
    }
    Ok(Scored {
        totals,
        sources,
        log_sources: !p.rewards.is_empty() || bound(PROGRAM_INPUT).is_some(),
    })
}

/// Per prompt, its `n` answers by sample index.
fn sample(
    ctx: &StageContext<'_>,
    p: &BestOfNParams,
    policy: &Model,
    tokenizer: &Tokenizer,
    prompts: &[Prompt],
) -> anyhow::Result<Vec<Vec<Answer>>> {
    let cfg = SamplingConfig {
        max_rows: p.batch_size.max(1),
        ..decoding_config(tokenizer, policy, &p.decoding, ctx.spec.seed)
    };
    let ids: Vec<&[i64]> = prompts.iter().map(|q| q.ids.as_slice()).collect();
    let stop = |_: usize, toks: &[i64]| hits_stop(tokenizer, toks, &p.stop);
    let sampled = sample_prompts(ctx, &policy.lm, &ids, p.n, &cfg, stop, "sampling")?;
    let mut answers: Vec<Vec<Answer>> = (0..prompts.len()).map(|_| Vec::new()).collect();
    // Row `i * n + s` is sample `s` of prompt `i`.
    for (row, s) in sampled.samples.into_iter().enumerate() {
        let mut text = decode_answer(tokenizer, &s)?;
        cut_at_first_stop(&mut text, &p.stop);
        answers[row / p.n].push(Answer {
            tokens: s.tokens,
            text,
        });
    }
    Ok(answers)
}
