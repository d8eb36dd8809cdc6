//! `evaluate`: win rate of a policy against a reference policy (see
//! `alignflow_ops::evaluate` for the judges and the report layout).
//!
//! Phases, each loading only the models it needs so peak memory is two
//! models: (1) both policies sample every prompt with the same seed per
//! batch, and the KL of the policy from the reference is computed on the
//! policy's samples with `ppo`'s log-prob code (in `scoring`); (2) the PM
//! scores both answers; (3) the feedback model answers the multiple-choice
//! question of `ai_feedback` in both orders; (4) the text judges
//! (`exact_match`, a reward program, ...) score each decoded answer.
//!
//! Judging is symmetric by construction, so that swapping the two policies
//! gives exactly `1 - w`: every forward pass of a judge is laid out from the
//! *set* of texts to score (per prompt for the PM, over all questions for the
//! feedback model), sorted and deduplicated, never from which side an answer
//! came from. Identical answers are scored once, so they tie exactly rather
//! than by luck of floating-point rounding across batch rows.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use tch::{Device, Kind};

use alignflow_ops::ai_feedback::{
    combine_orders, feedback_messages, feedback_prompt, feedback_question, question_conversation,
    sample_principles, with_few_shot, ANSWER_CUE,
};
use alignflow_ops::data::{Constitution, JsonlWriter};
use alignflow_ops::evaluate::{
    mean_interval, policy_label, EvalReport, JudgeReport, Outcome, PerPolicy, PerPolicyInterval,
    Tally, FEEDBACK_JUDGE, REWARD_JUDGE,
};
use alignflow_ops::protocol::Metrics;
use alignflow_ops::reward_program::Request;
use alignflow_ops::rewards::{TextRewards, PROGRAM_INPUT};
use alignflow_ops::text::Tokenizer;
use alignflow_ops::{ChatFormat, EvaluateParams, OpParams, StageContext};

use super::load::{self, shared_positions, stop_ids};
use super::prompts::{read_prompts, truncated, with_answer, Prompt, PromptSource};
use super::rollout::Rollout;
use super::sampling::{decode_answer, sample_prompts, sampling_config};
use super::scoring::{ask_questions, pm_score_answers, response_logprobs};
use crate::model::sample::{Sample, SamplingConfig};
use crate::model::{Head, Model};
use crate::rl::{kl_per_token, masked_sum, KlEstimator};
use alignflow_ops::Role;

/// One policy's answer.
struct Answer {
    /// Sampled tokens, EOS included when sampled (what the PM scores).
    tokens: Vec<i64>,
    /// Decoded text without EOS (what the feedback model reads).
    text: String,
}

/// Both policies' answers to every prompt, and the KL of the policy from
/// the reference on its own answers.
struct Answers {
    policy: Vec<Answer>,
    reference: Vec<Answer>,
    kls: Vec<f64>,
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
    let placed = |role| load::role_device(ctx, &p.placement, role);
    let (policy_device, reward_device) = (placed(Role::Policy)?, placed(Role::Reward)?);
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
    let source = PromptSource::new(ctx, &p.prompt, policy_dir, max_positions, p.max_new_tokens)?
        .first(p.limit);
    let prompts = read_prompts(ctx, &source, &tokenizer)?;

    // (1) Answers and KL.
    let answers = {
        let policy = load::frozen(policy_dir, policy_device, Head::Lm, p.dtype)?;
        let reference = load::frozen(reference_dir, placed(Role::Reference)?, Head::Lm, p.dtype)?;
        sample_both(
            ctx,
            &p,
            &policy,
            &reference,
            &tokenizer,
            &prompts,
            policy_device,
        )?
    };

    // (2) The PM.
    let mut judges = BTreeMap::new();
    let mut pm_scores: Option<Vec<(f64, f64)>> = None;
    if let Some(dir) = &pm_dir {
        let (report, scores) = judge_with_pm(ctx, &p, dir, &prompts, &answers, reward_device)?;
        judges.insert(REWARD_JUDGE.to_string(), report);
        pm_scores = Some(scores);
    }

    // (3) The feedback model.
    let mut verdicts: Option<Vec<FeedbackVerdict>> = None;
    if let Some(setup) = &feedback {
        let (report, v) =
            judge_with_feedback_model(ctx, &p, setup, &prompts, &answers, reward_device)?;
        judges.insert(FEEDBACK_JUDGE.to_string(), report);
        verdicts = Some(v);
    }

    // (4) The text judges.
    let text_scores = judge_as_text(ctx, &p, &prompts, &answers)?;
    for (name, report, _) in &text_scores {
        judges.insert(name.to_string(), report.clone());
    }

    std::fs::create_dir_all(&ctx.spec.out_dir)?;
    write_samples(
        ctx,
        &prompts,
        &answers,
        pm_scores.as_deref(),
        verdicts.as_deref(),
        &text_scores,
    )?;
    let report = EvalReport {
        policy: policy_label(p.policy_name.as_deref(), policy_dir, &ctx.spec.work_dir),
        reference: policy_label(
            p.reference_name.as_deref(),
            reference_dir,
            &ctx.spec.work_dir,
        ),
        n: prompts.len(),
        temperature: p.temperature,
        max_new_tokens: p.max_new_tokens,
        kl: mean(answers.kls.iter().copied()),
        response_len: PerPolicy {
            policy: mean(answers.policy.iter().map(|a| a.tokens.len() as f64)),
            reference: mean(answers.reference.iter().map(|a| a.tokens.len() as f64)),
        },
        interval: "wilson-95".into(),
        judges,
    };
    std::fs::write(
        ctx.output("report"),
        serde_json::to_string_pretty(&report)? + "\n",
    )?;
    std::fs::write(ctx.output("report_md"), report.markdown())?;
    let mut metrics = report.metrics();
    metrics.insert("truncated_prompts".into(), truncated(&prompts).into());
    Ok(metrics)
}

/// Phase (2): the PM's report and its `(policy, reference)` scores.
fn judge_with_pm(
    ctx: &StageContext<'_>,
    p: &EvaluateParams,
    dir: &Path,
    prompts: &[Prompt],
    answers: &Answers,
    device: Device,
) -> anyhow::Result<(JudgeReport, Vec<(f64, f64)>)> {
    let pm = load::frozen(dir, device, Head::Reward, p.dtype)?;
    let scores = score_with_pm(ctx, p, &pm, prompts, answers, device)?;
    let tally = Tally::of(scores.iter().map(|(a, b)| Outcome::from_scores(*a, *b)));
    let mut report = tally.judge_report();
    report.mean_reward = Some(PerPolicy {
        policy: mean(scores.iter().map(|s| s.0)),
        reference: mean(scores.iter().map(|s| s.1)),
    });
    Ok((report, scores))
}

/// One text judge: its name, report and per-prompt `(policy, reference)`
/// scores.
type TextJudgment = (&'static str, JudgeReport, Vec<(f64, f64)>);

/// Phase (4): the text judges (`params.judges`, a bound `reward_program`)
/// score every answer of both policies.
fn judge_as_text(
    ctx: &StageContext<'_>,
    p: &EvaluateParams,
    prompts: &[Prompt],
    answers: &Answers,
) -> anyhow::Result<Vec<TextJudgment>> {
    let bound = |name: &str| ctx.spec.inputs.get(name).map(|d| d.as_path());
    let judges = p.text_judges(&|name| bound(name).is_some());
    if judges.is_empty() {
        return Ok(Vec::new());
    }
    let text = TextRewards::start(&judges, bound(PROGRAM_INPUT), &ctx.spec.stage)?;
    ctx.reporter
        .progress(0, None, "judging the answers as text");
    // The policy's answers, then the reference's.
    let requests: Vec<Request<'_>> = [&answers.policy, &answers.reference]
        .into_iter()
        .flat_map(|side| {
            prompts.iter().zip(side.iter()).map(|(pr, a)| Request {
                record: &pr.record,
                prompt: &pr.raw,
                messages: pr.messages.as_ref(),
                response: &a.text,
                at: pr.at.clone(),
            })
        })
        .collect();
    let n = prompts.len();
    Ok(text
        .score(&requests)?
        .into_iter()
        .map(|s| {
            let (policy, reference) = s.scores.split_at(n);
            let pairs: Vec<(f64, f64)> = policy
                .iter()
                .copied()
                .zip(reference.iter().copied())
                .collect();
            let mut report =
                Tally::of(pairs.iter().map(|(a, b)| Outcome::from_scores(*a, *b))).judge_report();
            let (mp, cp) = mean_interval(policy);
            let (mr, cr) = mean_interval(reference);
            report.mean_score = Some(PerPolicy {
                policy: mp,
                reference: mr,
            });
            report.mean_score_ci95 = Some(PerPolicyInterval {
                policy: cp,
                reference: cr,
            });
            (s.key, report, pairs)
        })
        .collect())
}

/// Phase (3): the feedback model's report and its verdicts.
fn judge_with_feedback_model(
    ctx: &StageContext<'_>,
    p: &EvaluateParams,
    setup: &FeedbackSetup,
    prompts: &[Prompt],
    answers: &Answers,
    device: Device,
) -> anyhow::Result<(JudgeReport, Vec<FeedbackVerdict>)> {
    let dir = ctx.input(FEEDBACK_JUDGE)?;
    let fb_tokenizer = Tokenizer::from_dir(dir)?;
    let fb = load::frozen(dir, device, Head::Lm, p.dtype)?;
    // The judge asks in its own chat template when it has one (`auto`), as
    // `ai_feedback` does; the `chat_template` input is the policies'.
    let chat = ChatFormat::for_stage(p.prompt.chat_template, None, dir)?;
    let (v, truncated) = ask_feedback_model(
        ctx,
        p,
        setup,
        (&fb, &fb_tokenizer, chat.as_ref()),
        prompts,
        answers,
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
    Ok((report, v))
}

/// Writes the `samples` output: per prompt both answers, the KL and each
/// judge's verdict.
fn write_samples(
    ctx: &StageContext<'_>,
    prompts: &[Prompt],
    answers: &Answers,
    pm_scores: Option<&[(f64, f64)]>,
    verdicts: Option<&[FeedbackVerdict]>,
    text_scores: &[TextJudgment],
) -> anyhow::Result<()> {
    let mut out = JsonlWriter::create(&ctx.output("samples"))?;
    for (i, prompt) in prompts.iter().enumerate() {
        let (policy, reference) = (&answers.policy[i], &answers.reference[i]);
        let mut record = serde_json::json!({
            "prompt_index": i,
            "prompt": prompt.raw,
            "policy_response": policy.text,
            "reference_response": reference.text,
            "policy_tokens": policy.tokens.len(),
            "reference_tokens": reference.tokens.len(),
            "kl": answers.kls[i],
        });
        // Conversations keep their turns: each answer as the new assistant turn.
        if let Some(messages) = with_answer(prompt, &policy.text) {
            record["policy_messages"] = messages;
        }
        if let Some(messages) = with_answer(prompt, &reference.text) {
            record["reference_messages"] = messages;
        }
        if let Some(scores) = pm_scores {
            let (a, b) = scores[i];
            record[REWARD_JUDGE] = serde_json::json!({
                "policy": a,
                "reference": b,
                "outcome": Outcome::from_scores(a, b),
            });
        }
        if let Some(v) = verdicts {
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
        for (name, _, pairs) in text_scores {
            let (a, b) = pairs[i];
            record[*name] = serde_json::json!({
                "policy": a,
                "reference": b,
                "outcome": Outcome::from_scores(a, b),
            });
        }
        out.write(&record)?;
    }
    out.finish()?;
    Ok(())
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

/// How `m` samples in an evaluation: `base` with its own end ids (its
/// folder's generation config may list an end of turn the other model's
/// does not; swapping the two swaps their answers exactly) and pad.
fn sampling_of(
    base: &SamplingConfig,
    tokenizer: &Tokenizer,
    m: &Model,
    seed: u64,
    batch_size: usize,
) -> SamplingConfig {
    SamplingConfig {
        seed,
        eos_token_ids: stop_ids(tokenizer, m),
        pad_token_id: m.lm.cfg.pad_id(),
        max_rows: batch_size.max(1),
        ..base.clone()
    }
}

/// Both policies' answers (prompt `i` drawing from the same random stream,
/// of params.seed or the stage's, for both: common random numbers) and the per-prompt KL of the policy
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
) -> anyhow::Result<Answers> {
    let eos = stop_ids(tokenizer, policy);
    let base = sampling_config(tokenizer, policy, p.max_new_tokens, p.temperature);
    let answer = |s: Sample| -> anyhow::Result<Answer> {
        Ok(Answer {
            text: decode_answer(tokenizer, &s)?,
            tokens: s.tokens,
        })
    };
    let seed = p.seed.unwrap_or(ctx.spec.seed);
    let cfg = |m: &Model| sampling_of(&base, tokenizer, m, seed, p.batch_size);
    let ids: Vec<&[i64]> = prompts.iter().map(|q| q.ids.as_slice()).collect();
    let never = |_: usize, _: &[i64]| false;
    let a = sample_prompts(
        ctx,
        &policy.lm,
        &ids,
        1,
        &cfg(policy),
        never,
        "sampling policy",
    )?;
    let b = sample_prompts(
        ctx,
        &reference.lm,
        &ids,
        1,
        &cfg(reference),
        never,
        "sampling reference",
    )?;
    let mut kls = Vec::with_capacity(prompts.len());
    for (chunk, samples) in prompts
        .chunks(p.batch_size.max(1))
        .zip(a.samples.chunks(p.batch_size.max(1)))
    {
        ctx.cancel.check()?;
        let ids: Vec<Vec<i64>> = chunk.iter().map(|q| q.ids.clone()).collect();
        kls.extend(sequence_kl(
            policy,
            reference,
            &ids,
            samples,
            p.temperature,
            &eos,
            device,
        ));
    }
    let pol = a
        .samples
        .into_iter()
        .map(answer)
        .collect::<anyhow::Result<Vec<_>>>()?;
    let refs = b
        .samples
        .into_iter()
        .map(answer)
        .collect::<anyhow::Result<Vec<_>>>()?;
    if let Some(i) = kls.iter().position(|k| !k.is_finite()) {
        anyhow::bail!(
            "stage `{}`: prompt {i}: the KL is {} (the reference gives a sampled token probability 0?)",
            ctx.spec.stage,
            kls[i]
        );
    }
    Ok(Answers {
        policy: pol,
        reference: refs,
        kls,
    })
}

/// Per row: `sum_t (logp_policy - logp_ref)` over the response tokens (up
/// to and including EOS), both log-probs from `ppo`'s code
/// ([`response_logprobs`]) at `temperature`.
///
/// # Shapes
/// `prompts`: `b` rows, `samples`: `b` answers -> `b` values.
fn sequence_kl(
    policy: &Model,
    reference: &Model,
    prompts: &[Vec<i64>],
    samples: &[Sample],
    temperature: f64,
    eos: &[i64],
    device: Device,
) -> Vec<f64> {
    tch::no_grad(|| {
        let ro = Rollout::of(prompts, samples, policy.lm.cfg.pad_id(), device);
        let rmask = ro.scored_mask(eos);
        let logprobs = |m: &Model| {
            response_logprobs(
                m,
                &ro.ids,
                &ro.mask,
                &ro.resp,
                ro.p_len,
                temperature,
                false,
                false,
            )
            .logp
        };
        let (lp, lr) = (logprobs(policy), logprobs(reference));
        let kl = kl_per_token(&lp, &lr, KlEstimator::K1);
        let per_row = masked_sum(&kl.to_kind(Kind::Double), &rmask, Some(1));
        Vec::<f64>::try_from(&per_row.to_device(Device::Cpu)).expect("KL values")
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
    answers: &Answers,
    device: Device,
) -> anyhow::Result<Vec<(f64, f64)>> {
    let scores = pm_score_answers(
        ctx,
        pm,
        prompts,
        p.batch_size.max(1),
        |i| {
            vec![
                answers.policy[i].tokens.as_slice(),
                answers.reference[i].tokens.as_slice(),
            ]
        },
        device,
    )?;
    Ok(scores.into_iter().map(|s| (s[0], s[1])).collect())
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
    (model, tokenizer, chat): (&Model, &Tokenizer, Option<&ChatFormat>),
    prompts: &[Prompt],
    answers: &Answers,
    device: Device,
) -> anyhow::Result<(Vec<FeedbackVerdict>, usize)> {
    // With a chat template: the question as a user turn (the few-shot
    // questions and answers as turns before it), the options scored after
    // the cue at the start of the assistant's turn.
    let logged = std::cell::Cell::new(false);
    let ask = |conversation: &str, principle: &str, x: &str, y: &str| -> anyhow::Result<String> {
        let Some(chat) = chat else {
            return Ok(with_few_shot(
                &setup.few_shot,
                &feedback_prompt(conversation, principle, x, y),
            ));
        };
        let question = feedback_question(conversation, principle, x, y);
        let turns = serde_json::Value::Array(feedback_messages(&setup.few_shot, &question));
        let rendered = chat
            .prompt(&turns)
            .map_err(|e| anyhow::anyhow!("stage `{}`: {e} ({})", ctx.spec.stage, chat.source))?;
        if !logged.replace(true) {
            super::rendered::log("question", &turns, &rendered.text);
        }
        Ok(rendered.text + ANSWER_CUE)
    };
    // Per prompt, per principle: (principle index, forward text, swapped text).
    let mut asked: Vec<Vec<(usize, String, String)>> = Vec::with_capacity(prompts.len());
    for (i, prompt) in prompts.iter().enumerate() {
        let conversation = question_conversation(&prompt.text, prompt.messages.as_ref());
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
        let (a, b) = (&answers.policy[i].text, &answers.reference[i].text);
        asked.push(
            chosen
                .into_iter()
                .map(|j| {
                    let text = &setup.principles[j].1;
                    Ok((
                        j,
                        ask(&conversation, text, a, b)?,
                        ask(&conversation, text, b, a)?,
                    ))
                })
                .collect::<anyhow::Result<_>>()?,
        );
    }
    let distinct: BTreeSet<&str> = asked
        .iter()
        .flatten()
        .flat_map(|(_, f, s)| [f.as_str(), s.as_str()])
        .collect();
    let distinct: Vec<&str> = distinct.into_iter().collect();
    let (scored, truncated) = ask_questions(
        ctx,
        model,
        tokenizer,
        &distinct,
        p.batch_size.max(1),
        |_| "feedback question".to_string(),
        "asking the feedback model",
        chat.is_some(),
        device,
    )?;
    let probs: BTreeMap<&str, f64> = distinct.iter().copied().zip(scored).collect();
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{BuildOptions, Head, ModelConfig};

    /// The reference stops at the end ids of its own folder (an instruct
    /// checkpoint's generation config listing its end of turn), not the
    /// policy's: swapped, each still stops at its own.
    #[test]
    fn each_model_samples_with_its_own_end_ids() {
        let (_dir, tokenizer) = crate::testing::word_tokenizer(
            &["<unk>", "</s>", "a", "b", "<eot>"],
            &["</s>", "<eot>"],
            serde_json::json!({"eos_token": "</s>"}),
        );
        let model = |eos: serde_json::Value| {
            let mut json = ModelConfig::llama_json(5, 16, 16, 1, 2, 2, 32, 1, false);
            json["eos_token_id"] = eos;
            let cfg = ModelConfig::from_json(json).unwrap();
            Model::init(&cfg, &BuildOptions::new(Device::Cpu, Head::Lm))
        };
        let (policy, instruct) = (model(1.into()), model(serde_json::json!([1, 4])));
        let base = sampling_config(&tokenizer, &policy, 8, 1.0);
        assert_eq!(
            sampling_of(&base, &tokenizer, &policy, 3, 4).eos_token_ids,
            [1]
        );
        assert_eq!(
            sampling_of(&base, &tokenizer, &instruct, 3, 4).eos_token_ids,
            [1, 4]
        );
        let swapped = sampling_config(&tokenizer, &instruct, 8, 1.0);
        assert_eq!(
            sampling_of(&swapped, &tokenizer, &policy, 3, 4).eos_token_ids,
            [1]
        );
    }
}
