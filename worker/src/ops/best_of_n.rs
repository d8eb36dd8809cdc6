//! `best_of_n`: n answers per prompt, scored by the PM, the best kept (see
//! `alignflow_ops::best_of_n` for the outputs and how `sft` reads them).
//!
//! Two phases, each holding one model: (1) the policy samples every prompt
//! `n` times, rows laid out prompt by prompt as `generate` does, batch `k`
//! drawing from seed `stage seed ^ k * GOLDEN`; (2) the PM scores each
//! prompt's distinct `prompt + answer` sequences with `evaluate`'s scoring
//! (that of `ppo`), so identical answers get identical scores and the tie
//! goes to the lowest sample index.

use std::collections::BTreeSet;

use alignflow_ops::best_of_n::{best_index, BestOfNReport};
use alignflow_ops::data::JsonlWriter;
use alignflow_ops::protocol::Metrics;
use alignflow_ops::text::Tokenizer;
use alignflow_ops::{BestOfNParams, StageContext};

use super::evaluate::{pm_score_rows, shared_positions};
use super::prompts::{read_prompts, Prompt, PromptSource};
use crate::model::sample::{generate, Finish, SamplingConfig};
use crate::model::{self, BuildOptions, Head, Model};

/// Mixes a batch index into the stage seed (as `generate` does).
const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

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
        p.max_new_tokens,
    )?;
    let prompts = read_prompts(
        ctx,
        &PromptSource {
            field: &p.prompt_field,
            template: &p.template,
            limit: p.limit,
            budget: (max_positions - p.max_new_tokens) as usize,
        },
        &tokenizer,
    )?;
    let opts = |head| BuildOptions {
        device,
        head,
        lora: None,
    };

    // (1) n answers per prompt.
    let answers = {
        let mut policy = Model::load(policy_dir, &opts(Head::Lm))?;
        policy.vs.freeze();
        sample(ctx, &p, &policy, &tokenizer, &prompts, device)?
    };

    // (2) Scores, per prompt by sample index.
    let mut scores: Vec<Vec<f64>> = Vec::with_capacity(prompts.len());
    {
        let mut pm = Model::load(pm_dir, &opts(Head::Reward))?;
        pm.vs.freeze();
        let batch = p.batch_size.max(1);
        for (k, chunk) in prompts.chunks(batch).enumerate() {
            ctx.cancel.check()?;
            let first = k * batch;
            let seq = |i: usize, a: &Answer| [prompts[i].ids.as_slice(), &a.tokens].concat();
            let mut rows: Vec<Vec<i64>> = Vec::new();
            for i in first..first + chunk.len() {
                let distinct: BTreeSet<Vec<i64>> = answers[i].iter().map(|a| seq(i, a)).collect();
                rows.extend(distinct);
            }
            let row_scores = pm_score_rows(&pm, &rows, device);
            for i in first..first + chunk.len() {
                let per: Vec<f64> = answers[i]
                    .iter()
                    .map(|a| {
                        let s = seq(i, a);
                        row_scores[rows.iter().position(|r| *r == s).expect("scored row")]
                    })
                    .collect();
                anyhow::ensure!(
                    per.iter().all(|s| s.is_finite()),
                    "stage `{stage}`: prompt {i}: the reward model's score is not finite"
                );
                scores.push(per);
            }
            ctx.reporter.progress(
                scores.len() as u64,
                Some(prompts.len() as u64),
                "scoring with the reward model",
            );
        }
    }

    // Outputs.
    std::fs::create_dir_all(&ctx.spec.out_dir)?;
    let mut out = JsonlWriter::create(&ctx.output("data"))?;
    for (i, per) in scores.iter().enumerate() {
        let best = best_index(per).expect("n >= 1 scores");
        out.write(&serde_json::json!({
            "prompt": prompts[i].raw,
            "prompt_text": prompts[i].text,
            "response": answers[i][best].text,
            "score": per[best],
            "best_index": best,
            "rank_scores": per,
        }))?;
    }
    out.finish()?;
    let report = BestOfNReport::of(&scores, p.n);
    std::fs::write(
        ctx.output("report"),
        serde_json::to_string_pretty(&report)? + "\n",
    )?;
    Ok(report.metrics())
}

/// Per prompt, its `n` answers by sample index.
fn sample(
    ctx: &StageContext<'_>,
    p: &BestOfNParams,
    policy: &Model,
    tokenizer: &Tokenizer,
    prompts: &[Prompt],
    device: tch::Device,
) -> anyhow::Result<Vec<Vec<Answer>>> {
    let base = SamplingConfig {
        max_new_tokens: p.max_new_tokens,
        temperature: p.temperature,
        top_k: p.top_k,
        top_p: p.top_p,
        eos_token_id: tokenizer
            .eos_id
            .map(i64::from)
            .or(policy.lm.cfg.eos_token_id),
        pad_token_id: policy.lm.cfg.pad_id(),
        ..Default::default()
    };
    let rows: Vec<usize> = (0..prompts.len())
        .flat_map(|i| std::iter::repeat_n(i, p.n))
        .collect();
    let mut answers: Vec<Vec<Answer>> = (0..prompts.len()).map(|_| Vec::new()).collect();
    let stop = |_: usize, toks: &[i64]| -> bool {
        !p.stop.is_empty()
            && tokenizer
                .decode(toks)
                .is_ok_and(|t| p.stop.iter().any(|s| t.contains(s.as_str())))
    };
    for (k, chunk) in rows.chunks(p.batch_size.max(1)).enumerate() {
        ctx.cancel.check()?;
        let ids: Vec<Vec<i64>> = chunk.iter().map(|&i| prompts[i].ids.clone()).collect();
        let cfg = SamplingConfig {
            seed: ctx.spec.seed ^ (k as u64).wrapping_mul(GOLDEN),
            ..base.clone()
        };
        for (&i, s) in chunk
            .iter()
            .zip(generate(&policy.lm, &ids, &cfg, device, stop))
        {
            let body = match s.finish {
                Finish::Eos => &s.tokens[..s.tokens.len() - 1],
                _ => &s.tokens[..],
            };
            let mut text = tokenizer.decode(body)?;
            if let Some(cut) = p.stop.iter().filter_map(|x| text.find(x.as_str())).min() {
                text.truncate(cut);
            }
            answers[i].push(Answer {
                tokens: s.tokens,
                text,
            });
        }
        ctx.reporter.progress(
            ((k + 1) * p.batch_size).min(rows.len()) as u64,
            Some(rows.len() as u64),
            "sampling",
        );
    }
    Ok(answers)
}
