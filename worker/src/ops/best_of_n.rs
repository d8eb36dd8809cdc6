//! `best_of_n`: n answers per prompt, scored by the PM, the best kept (see
//! `alignflow_ops::best_of_n` for the outputs and how `sft` reads them).
//!
//! Two phases, each holding one model: (1) the policy samples every prompt
//! `n` times, rows laid out prompt by prompt as `generate` does, batch `k`
//! drawing from its own stream of the stage seed; (2) the PM scores each
//! prompt's distinct `prompt + answer` sequences as `evaluate` does (the
//! scoring of `ppo`), so identical answers get identical scores and the
//! tie goes to the lowest sample index.

use alignflow_ops::best_of_n::{best_index, BestOfNReport};
use alignflow_ops::data::JsonlWriter;
use alignflow_ops::protocol::Metrics;
use alignflow_ops::text::Tokenizer;
use alignflow_ops::{BestOfNParams, StageContext};

use super::load::{self, shared_positions};
use super::prompts::{read_prompts, truncated, with_answer, Prompt, PromptSource};
use super::sampling::{
    cut_at_first_stop, decode_answer, decoding_config, hits_stop, sample_prompts,
};
use super::scoring::pm_score_answers;
use crate::model::sample::SamplingConfig;
use crate::model::{self, Head, Model};

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
    let device = model::device(&ctx.spec.device)?;
    let policy_dir = ctx.input("policy")?;
    let pm_dir = ctx.input("reward_model")?;
    let tokenizer = Tokenizer::from_dir(policy_dir)?;
    let max_positions = shared_positions(
        &stage,
        policy_dir,
        &[("reward_model", pm_dir)],
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
        let policy = load::frozen(policy_dir, device, Head::Lm)?;
        sample(ctx, &p, &policy, &tokenizer, &prompts)?
    };

    // (2) Scores, per prompt by sample index.
    let scores = {
        let pm = load::frozen(pm_dir, device, Head::Reward)?;
        pm_score_answers(
            ctx,
            &pm,
            &prompts,
            p.batch_size.max(1),
            |i| answers[i].iter().map(|a| a.tokens.as_slice()).collect(),
            device,
        )?
    };

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
        out.write(&record)?;
    }
    out.finish()?;
    let report = BestOfNReport::of(&scores, p.n);
    std::fs::write(
        ctx.output("report"),
        serde_json::to_string_pretty(&report)? + "\n",
    )?;
    let mut metrics = report.metrics();
    metrics.insert("truncated_prompts".into(), truncated(&prompts).into());
    Ok(metrics)
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
