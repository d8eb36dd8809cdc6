//! `evaluate`: win rate of a policy against a reference policy (see
//! `alignflow_ops::evaluate` for the judges and the report layout).
//!
//! Phases, each loading only the models it needs so peak memory is two
//! models: (1) both policies sample every prompt with the same seed per
//! batch, and the KL of the policy from the reference is computed on the
//! policy's samples with `ppo`'s log-prob code; (2) the PM scores both
//! answers; (3) the feedback model answers the multiple-choice question of
//! `ai_feedback` in both orders.
//!
//! Judging is symmetric by construction, so that swapping the two policies
//! gives exactly `1 - w`: every forward pass of a judge is laid out from the
//! *set* of texts to score (per prompt for the PM, over all questions for the
//! feedback model), sorted and deduplicated, never from which side an answer
//! came from. Identical answers are scored once, so they tie exactly rather
//! than by luck of floating-point rounding across batch rows.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use anyhow::Context;
use tch::{Device, Kind, Tensor};

use alignflow_ops::ai_feedback::{
    combine_orders, conversation_of, feedback_prompt, sample_principles, with_few_shot,
};
use alignflow_ops::data::{Constitution, JsonlWriter};
use alignflow_ops::evaluate::{
    policy_label, EvalReport, Outcome, PerPolicy, Tally, FEEDBACK_JUDGE, REWARD_JUDGE,
};
use alignflow_ops::protocol::Metrics;
use alignflow_ops::text::Tokenizer;
use alignflow_ops::{EvaluateParams, OpParams, StageContext};

use super::ai_feedback::{p_option_a, OptionTokens};
use super::ppo::response_logprobs;
use super::prompts::{read_prompts, Prompt, PromptSource};
use crate::model::sample::{generate, left_pad, Finish, Sample, SamplingConfig};
use crate::model::{self, BuildOptions, Head, Model, ModelConfig};
use crate::rl::{kl_per_token, masked_sum, response_mask, KlEstimator};

/// Mixes a batch index into the stage seed (as `generate` does).
const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// One policy's answer.
struct Answer {
    /// Sampled tokens, EOS included when sampled (what the PM scores).
    tokens: Vec<i64>,
    /// Decoded text without EOS (what the feedback model reads).
    text: String,
}

/// Where the feedback judge takes its principles: `(id, text)`.
struct FeedbackSetup {
    principles: Vec<(String, String)>,
    few_shot: Vec<String>,
    /// Whether principles are sampled per prompt (a constitution) or fixed.
    sampled: bool,
}

/// What the feedback judge found for one prompt.
struct FeedbackVerdict {
    p_policy: f64,
    /// Per principle: (id, P(A) with the policy first, P(A) with the reference first).
    details: Vec<(String, f64, f64)>,
}

pub fn run(ctx: &StageContext<'_>) -> anyhow::Result<Metrics> {
    let p: EvaluateParams = ctx.params()?;
    let stage = ctx.spec.stage.clone();
    let feedback = check_judges(ctx, &p)?;
    let device = model::device(&ctx.spec.device)?;
    let policy_dir = ctx.input("policy")?;
    let reference_dir = ctx.input("reference")?;
    let pm_dir = ctx.spec.inputs.get(REWARD_JUDGE).cloned();
    let tokenizer = Tokenizer::from_dir(policy_dir)?;

    // Configs first: a mismatch fails before anything heavy loads.
    let mut others = vec![("reference", reference_dir)];
    others.extend(pm_dir.as_deref().map(|d| (REWARD_JUDGE, d)));
    let max_positions = shared_positions(
        &stage,
        policy_dir,
        &others,
        "the KL and the PM need one tokenizer",
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
    let n = prompts.len();

    // (1) Answers and KL.
    let opts = |head| BuildOptions {
        device,
        head,
        lora: None,
    };
    let (policy_answers, reference_answers, kls) = {
        let mut policy = Model::load(policy_dir, &opts(Head::Lm))?;
        policy.vs.freeze();
        let mut reference = Model::load(reference_dir, &opts(Head::Lm))?;
        reference.vs.freeze();
        sample_both(ctx, &p, &policy, &reference, &tokenizer, &prompts, device)?
    };

    // (2) The PM.
    let mut judges = BTreeMap::new();
    let mut pm_scores: Option<Vec<(f64, f64)>> = None;
    if let Some(dir) = &pm_dir {
        let mut pm = Model::load(dir, &opts(Head::Reward))?;
        pm.vs.freeze();
        let scores = score_with_pm(
            ctx,
            &p,
            &pm,
            &prompts,
            &policy_answers,
            &reference_answers,
            device,
        )?;
        let tally = Tally::of(scores.iter().map(|(a, b)| Outcome::from_scores(*a, *b)));
        let mut report = tally.judge_report();
        report.mean_reward = Some(PerPolicy {
            policy: mean(scores.iter().map(|s| s.0)),
            reference: mean(scores.iter().map(|s| s.1)),
        });
        judges.insert(REWARD_JUDGE.to_string(), report);
        pm_scores = Some(scores);
    }

    // (3) The feedback model.
    let mut verdicts: Option<Vec<FeedbackVerdict>> = None;
    if let Some(setup) = &feedback {
        let dir = ctx.input(FEEDBACK_JUDGE)?;
        let fb_tokenizer = Tokenizer::from_dir(dir)?;
        let mut fb = Model::load(dir, &opts(Head::Lm))?;
        fb.vs.freeze();
        let (v, truncated) = ask_feedback_model(
            ctx,
            &p,
            setup,
            &fb,
            &fb_tokenizer,
            &prompts,
            &policy_answers,
            &reference_answers,
            device,
        )?;
        let tally = Tally::of(v.iter().map(|v| Outcome::from_probability(v.p_policy)));
        let mut report = tally.judge_report();
        report.mean_p_policy = Some(mean(v.iter().map(|v| v.p_policy)));
        report.principles_per_prompt = Some(p.principles_per_prompt);
        report.truncated = Some(truncated);
        if truncated > 0 {
            tracing::warn!(
                truncated,
                "feedback questions longer than the feedback model's positions lost their beginning"
            );
        }
        judges.insert(FEEDBACK_JUDGE.to_string(), report);
        verdicts = Some(v);
    }

    // Outputs.
    std::fs::create_dir_all(&ctx.spec.out_dir)?;
    let mut out = JsonlWriter::create(&ctx.output("samples"))?;
    for i in 0..n {
        let mut record = serde_json::json!({
            "prompt_index": i,
            "prompt": prompts[i].raw,
            "policy_response": policy_answers[i].text,
            "reference_response": reference_answers[i].text,
            "policy_tokens": policy_answers[i].tokens.len(),
            "reference_tokens": reference_answers[i].tokens.len(),
            "kl": kls[i],
        });
        if let Some(scores) = &pm_scores {
            let (a, b) = scores[i];
            record[REWARD_JUDGE] = serde_json::json!({
                "policy": a,
                "reference": b,
                "outcome": Outcome::from_scores(a, b),
            });
        }
        if let Some(v) = &verdicts {
            let v = &v[i];
            record[FEEDBACK_JUDGE] = serde_json::json!({
                "p_policy": v.p_policy,
                "outcome": Outcome::from_probability(v.p_policy),
                "details": v.details.iter().map(|(id, f, s)| serde_json::json!({
                    "principle": id,
                    "p_a_policy_first": f,
                    "p_a_reference_first": s,
                })).collect::<Vec<_>>(),
            });
        }
        out.write(&record)?;
    }
    out.finish()?;
    let report = EvalReport {
        policy: policy_label(p.policy_name.as_deref(), policy_dir, &ctx.spec.work_dir),
        reference: policy_label(
            p.reference_name.as_deref(),
            reference_dir,
            &ctx.spec.work_dir,
        ),
        n,
        temperature: p.temperature,
        max_new_tokens: p.max_new_tokens,
        kl: mean(kls.iter().copied()),
        response_len: PerPolicy {
            policy: mean(policy_answers.iter().map(|a| a.tokens.len() as f64)),
            reference: mean(reference_answers.iter().map(|a| a.tokens.len() as f64)),
        },
        interval: "wilson-95".into(),
        judges,
    };
    std::fs::write(
        ctx.output("report"),
        serde_json::to_string_pretty(&report)? + "\n",
    )?;
    std::fs::write(ctx.output("report_md"), report.markdown())?;
    Ok(report.metrics())
}

fn mean(xs: impl Iterator<Item = f64>) -> f64 {
    let (sum, n) = xs.fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
    if n == 0 {
        0.0
    } else {
        sum / n as f64
    }
}

/// Checks which judges are bound (before anything loads): at least one, and
/// the feedback judge with exactly one source of principles.
fn check_judges(
    ctx: &StageContext<'_>,
    p: &EvaluateParams,
) -> anyhow::Result<Option<FeedbackSetup>> {
    let stage = &ctx.spec.stage;
    let bound = |name: &str| ctx.spec.inputs.contains_key(name);
    p.check_bindings(&bound)
        .map_err(|e| anyhow::anyhow!("stage `{stage}`, {e}"))?;
    if !bound(FEEDBACK_JUDGE) {
        return Ok(None);
    }
    match (bound("constitution"), &p.principle) {
        (false, Some(text)) => Ok(Some(FeedbackSetup {
            principles: vec![("principle".into(), text.clone())],
            few_shot: Vec::new(),
            sampled: false,
        })),
        (false, None) | (true, Some(_)) => {
            unreachable!("check_bindings requires one source of principles")
        }
        (true, None) => {
            let c = Constitution::load(ctx.input("constitution")?)
                .map_err(|e| anyhow::anyhow!("stage `{stage}`: {e}"))?;
            anyhow::ensure!(
                !c.feedback.is_empty(),
                "stage `{stage}`: the constitution has no feedback principles"
            );
            anyhow::ensure!(
                p.principles_per_prompt <= c.feedback.len(),
                "stage `{stage}`: params.principles_per_prompt is {} but the constitution has {} feedback principle(s)",
                p.principles_per_prompt,
                c.feedback.len()
            );
            Ok(Some(FeedbackSetup {
                principles: c
                    .feedback
                    .iter()
                    .map(|f| (f.id.clone(), f.text.clone()))
                    .collect(),
                few_shot: if p.few_shot {
                    c.few_shot.feedback.clone()
                } else {
                    Vec::new()
                },
                sampled: true,
            }))
        }
    }
}

/// Checks that every `(port, folder)` in `others` shares the policy's
/// tokenizer (`why` says what needs it) and returns the positions all of
/// them have, which must leave room for `max_new_tokens`. Reads configs
/// only, so a mismatch fails before anything heavy loads.
pub(crate) fn shared_positions(
    stage: &str,
    policy_dir: &Path,
    others: &[(&str, &Path)],
    why: &str,
    max_new_tokens: i64,
) -> anyhow::Result<i64> {
    let policy_cfg = ModelConfig::load(policy_dir)?;
    let mut max_positions = policy_cfg.max_positions;
    for &(port, dir) in others {
        let cfg = ModelConfig::load(dir)?;
        anyhow::ensure!(
            same_tokenizer(policy_dir, dir)? && cfg.vocab_size == policy_cfg.vocab_size,
            "stage `{stage}`: input `{port}` has another tokenizer than input `policy` \
             (vocabulary {} vs {}, or different tokenizer.json): {why}",
            cfg.vocab_size,
            policy_cfg.vocab_size
        );
        max_positions = max_positions.min(cfg.max_positions);
    }
    anyhow::ensure!(
        max_new_tokens < max_positions,
        "stage `{stage}`: params.max_new_tokens {max_new_tokens} leaves no room for a prompt in {max_positions} positions"
    );
    Ok(max_positions)
}

/// Whether two model folders share a tokenizer: equal `tokenizer.json`
/// bytes when both have one (the ops copy it verbatim from their source).
pub(crate) fn same_tokenizer(a: &Path, b: &Path) -> anyhow::Result<bool> {
    let (fa, fb) = (a.join("tokenizer.json"), b.join("tokenizer.json"));
    if !fa.exists() || !fb.exists() {
        return Ok(true);
    }
    let read = |f: &Path| std::fs::read(f).with_context(|| format!("reading {}", f.display()));
    Ok(read(&fa)? == read(&fb)?)
}

/// Both policies' answers (batch `k` sampled with seed `seed ^ k * GOLDEN`,
/// `seed` being params.seed or the stage's,
/// for both: common random numbers) and the per-prompt KL of the policy
/// from the reference on the policy's answers.
#[allow(clippy::type_complexity)]
fn sample_both(
    ctx: &StageContext<'_>,
    p: &EvaluateParams,
    policy: &Model,
    reference: &Model,
    tokenizer: &Tokenizer,
    prompts: &[Prompt],
    device: Device,
) -> anyhow::Result<(Vec<Answer>, Vec<Answer>, Vec<f64>)> {
    let eos = tokenizer
        .eos_id
        .map(i64::from)
        .or(policy.lm.cfg.eos_token_id);
    let base = SamplingConfig {
        max_new_tokens: p.max_new_tokens,
        temperature: p.temperature,
        eos_token_id: eos,
        ..Default::default()
    };
    let answer = |s: Sample| -> anyhow::Result<Answer> {
        let body = match s.finish {
            Finish::Eos => &s.tokens[..s.tokens.len() - 1],
            _ => &s.tokens[..],
        };
        Ok(Answer {
            text: tokenizer.decode(body)?,
            tokens: s.tokens,
        })
    };
    let (mut pol, mut refs, mut kls) = (Vec::new(), Vec::new(), Vec::new());
    for (k, chunk) in prompts.chunks(p.batch_size.max(1)).enumerate() {
        ctx.cancel.check()?;
        let ids: Vec<Vec<i64>> = chunk.iter().map(|q| q.ids.clone()).collect();
        let seed = p.seed.unwrap_or(ctx.spec.seed) ^ (k as u64).wrapping_mul(GOLDEN);
        let cfg = |m: &Model| SamplingConfig {
            seed,
            pad_token_id: m.lm.cfg.pad_id(),
            ..base.clone()
        };
        let a = generate(&policy.lm, &ids, &cfg(policy), device, |_, _| false);
        let b = generate(&reference.lm, &ids, &cfg(reference), device, |_, _| false);
        kls.extend(sequence_kl(
            policy,
            reference,
            &ids,
            &a,
            p.temperature,
            eos,
            device,
        ));
        for s in a {
            pol.push(answer(s)?);
        }
        for s in b {
            refs.push(answer(s)?);
        }
        ctx.reporter
            .progress(pol.len() as u64, Some(prompts.len() as u64), "sampling");
    }
    if let Some(i) = kls.iter().position(|k| !k.is_finite()) {
        anyhow::bail!(
            "stage `{}`: prompt {i}: the KL is {} (the reference gives a sampled token probability 0?)",
            ctx.spec.stage,
            kls[i]
        );
    }
    Ok((pol, refs, kls))
}

/// Per row: `sum_t (logp_policy - logp_ref)` over the response tokens (up
/// to and including EOS), both log-probs from `ppo`'s code at `temperature`.
///
/// # Shapes
/// `prompts`: `b` rows, `samples`: `b` answers -> `b` values.
fn sequence_kl(
    policy: &Model,
    reference: &Model,
    prompts: &[Vec<i64>],
    samples: &[Sample],
    temperature: f64,
    eos: Option<i64>,
    device: Device,
) -> Vec<f64> {
    tch::no_grad(|| {
        let pad = policy.lm.cfg.pad_id();
        let b = samples.len() as i64;
        let r = samples
            .iter()
            .map(|s| s.tokens.len())
            .max()
            .unwrap_or(1)
            .max(1);
        let (mut resp_v, mut len_v) = (Vec::new(), Vec::new());
        for s in samples {
            for k in 0..r {
                resp_v.push(s.tokens.get(k).copied().unwrap_or(pad));
                len_v.push(i64::from(k < s.tokens.len()));
            }
        }
        let r = r as i64;
        let resp = Tensor::from_slice(&resp_v).view([b, r]).to_device(device);
        let gen_mask = Tensor::from_slice(&len_v).view([b, r]).to_device(device);
        let (prompt_ids, prompt_mask) = left_pad(prompts, pad, device);
        let p_len = prompt_ids.size()[1];
        let ids = Tensor::cat(&[&prompt_ids, &resp], 1);
        let mask = Tensor::cat(&[&prompt_mask, &gen_mask], 1);
        let rmask = match eos {
            Some(e) => response_mask(&resp, e, None) * gen_mask.to_kind(Kind::Float),
            None => gen_mask.to_kind(Kind::Float),
        };
        let (lp, _) = response_logprobs(policy, &ids, &mask, &resp, p_len, temperature);
        let (lr, _) = response_logprobs(reference, &ids, &mask, &resp, p_len, temperature);
        let kl = kl_per_token(&lp, &lr, KlEstimator::K1);
        let per_row = masked_sum(&kl.to_kind(Kind::Double), &rmask, Some(1));
        Vec::<f64>::try_from(&per_row.to_device(Device::Cpu)).expect("KL values")
    })
}

/// The PM's raw score of each row (`prompt + answer` tokens, EOS included
/// when sampled), left-padded into one forward pass: the scoring of `ppo`'s
/// rollouts. Shared with `best_of_n`.
///
/// # Shapes
/// `rows`: `b` token lists -> `b` scores.
pub(crate) fn pm_score_rows(pm: &Model, rows: &[Vec<i64>], device: Device) -> Vec<f64> {
    tch::no_grad(|| {
        let (ids, mask) = left_pad(rows, pm.lm.cfg.pad_id(), device);
        let s = pm.scores(&ids, &mask, false).to_kind(Kind::Double);
        Vec::<f64>::try_from(&s.to_device(Device::Cpu)).expect("scores")
    })
}

/// PM scores `(policy, reference)` of each prompt's answers. Each pass
/// holds a chunk of prompts; a prompt contributes its distinct
/// `prompt + answer` sequences in sorted order (one row when both answers
/// are the same tokens), so the layout does not depend on which policy is which.
fn score_with_pm(
    ctx: &StageContext<'_>,
    p: &EvaluateParams,
    pm: &Model,
    prompts: &[Prompt],
    policy: &[Answer],
    reference: &[Answer],
    device: Device,
) -> anyhow::Result<Vec<(f64, f64)>> {
    let mut out = Vec::with_capacity(prompts.len());
    let batch = p.batch_size.max(1);
    for (k, chunk) in prompts.chunks(batch).enumerate() {
        ctx.cancel.check()?;
        let seq = |i: usize, a: &Answer| [prompts[i].ids.as_slice(), a.tokens.as_slice()].concat();
        let first = k * batch;
        let mut rows: Vec<Vec<i64>> = Vec::new();
        for i in first..first + chunk.len() {
            let distinct: BTreeSet<Vec<i64>> = [seq(i, &policy[i]), seq(i, &reference[i])]
                .into_iter()
                .collect();
            rows.extend(distinct);
        }
        let scores = pm_score_rows(pm, &rows, device);
        let score_of = |row: &[i64]| -> f64 {
            let at = rows.iter().position(|r| r == row).expect("scored row");
            scores[at]
        };
        for i in first..first + chunk.len() {
            let pair = (
                score_of(&seq(i, &policy[i])),
                score_of(&seq(i, &reference[i])),
            );
            anyhow::ensure!(
                pair.0.is_finite() && pair.1.is_finite(),
                "stage `{}`: prompt {i}: the reward model's score is not finite",
                ctx.spec.stage
            );
            out.push(pair);
        }
        ctx.reporter.progress(
            out.len() as u64,
            Some(prompts.len() as u64),
            "scoring with the reward model",
        );
    }
    Ok(out)
}

/// The feedback model's verdict on each prompt and the number of questions
/// truncated to fit. Questions are those of `ai_feedback` (its prompt and
/// its `(A)`/`(B)` scoring): per sampled principle, the policy's answer as
/// `(A)` and then as `(B)`; P(policy better) is their
/// [`combine_orders`], averaged over principles. Distinct questions are
/// scored once each, in sorted order.
#[allow(clippy::too_many_arguments)]
fn ask_feedback_model(
    ctx: &StageContext<'_>,
    p: &EvaluateParams,
    setup: &FeedbackSetup,
    model: &Model,
    tokenizer: &Tokenizer,
    prompts: &[Prompt],
    policy: &[Answer],
    reference: &[Answer],
    device: Device,
) -> anyhow::Result<(Vec<FeedbackVerdict>, usize)> {
    let stage = &ctx.spec.stage;
    // Per prompt, per principle: (principle index, forward text, swapped text).
    let mut asked: Vec<Vec<(usize, String, String)>> = Vec::with_capacity(prompts.len());
    for (i, prompt) in prompts.iter().enumerate() {
        let conversation = conversation_of(&prompt.text);
        let chosen = if setup.sampled {
            sample_principles(
                setup.principles.len(),
                p.principles_per_prompt,
                p.seed.unwrap_or(ctx.spec.seed),
                i,
            )
        } else {
            vec![0]
        };
        let (a, b) = (&policy[i].text, &reference[i].text);
        asked.push(
            chosen
                .into_iter()
                .map(|j| {
                    let text = &setup.principles[j].1;
                    let q = |x: &str, y: &str| {
                        with_few_shot(&setup.few_shot, &feedback_prompt(&conversation, text, x, y))
                    };
                    (j, q(a, b), q(b, a))
                })
                .collect(),
        );
    }
    let distinct: BTreeSet<&str> = asked
        .iter()
        .flatten()
        .flat_map(|(_, f, s)| [f.as_str(), s.as_str()])
        .collect();
    let distinct: Vec<&str> = distinct.into_iter().collect();
    let max_len = model.lm.cfg.max_positions.max(2) as usize;
    let mut truncated = 0usize;
    let mut probs: BTreeMap<&str, f64> = BTreeMap::new();
    for chunk in distinct.chunks(p.batch_size.max(1)) {
        ctx.cancel.check()?;
        let mut encoded = Vec::with_capacity(chunk.len());
        for q in chunk {
            let (tokens, cut) = OptionTokens::encode(tokenizer, q, max_len)
                .map_err(|e| anyhow::anyhow!("stage `{stage}`: feedback question: {e}"))?;
            truncated += usize::from(cut);
            encoded.push(tokens);
        }
        for (q, prob) in chunk.iter().zip(p_option_a(&model.lm, &encoded, device)) {
            probs.insert(*q, prob);
        }
        ctx.reporter.progress(
            probs.len() as u64,
            Some(distinct.len() as u64),
            "asking the feedback model",
        );
    }
    let verdicts = asked
        .iter()
        .map(|per| {
            let details: Vec<(String, f64, f64)> = per
                .iter()
                .map(|(j, f, s)| {
                    (
                        setup.principles[*j].0.clone(),
                        probs[f.as_str()],
                        probs[s.as_str()],
                    )
                })
                .collect();
            let p_policy = mean(details.iter().map(|(_, f, s)| combine_orders(*f, *s)));
            FeedbackVerdict { p_policy, details }
        })
        .collect();
    Ok((verdicts, truncated))
}
