//! `ai_feedback`: soft preference labels from a feedback model.
//!
//! For each pair, each sampled principle and both orders (A = first, then
//! swapped), the model reads the multiple-choice question
//! ([`alignflow_ops::ai_feedback::feedback_prompt`]) and
//! `p(A) = exp(lA) / (exp(lA) + exp(lB))`, where lA and lB are its
//! log-probabilities of the continuations ` (A)` and ` (B)` (tokenized as
//! [`super::scoring::OptionTokens`] explains).

use alignflow_ops::ai_feedback::{
    combine_orders, conversation_of, cot_answer_prompt, cot_prompt, feedback_messages,
    feedback_prompt, feedback_question, read_pairs, sample_principles, with_few_shot, FeedbackPair,
    FeedbackSummary, PairLabel, ANSWER_CUE, COT_CLAMP, COT_CUE,
};
use alignflow_ops::data::{Constitution, FeedbackPrinciple, JsonlWriter};
use alignflow_ops::protocol::Metrics;
use alignflow_ops::text::Tokenizer;
use alignflow_ops::{AiFeedbackParams, ChatFormat, StageContext};

use super::load;
use super::sampling::{decode_answer, sample_prompts, sampling_config};
use super::scoring::ask_questions;
use crate::model::sample::SamplingConfig;
use crate::model::{self, Model};

/// One question: pair `pair`, its `slot`-th principle, in one order.
struct Question {
    pair: usize,
    slot: usize,
    swapped: bool,
    text: String,
    reasoning: Option<String>,
}

pub fn run(ctx: &StageContext<'_>) -> anyhow::Result<Metrics> {
    let p: AiFeedbackParams = ctx.params()?;
    let stage = &ctx.spec.stage;
    let device = model::device(&ctx.spec.device)?;
    let model_dir = ctx.input("model")?;
    let (tokenizer, model) = load::language_model(model_dir, device, p.dtype)?;
    let chat = load::chat_format(ctx, p.chat_template, model_dir)?;
    let constitution = Constitution::load(ctx.input("constitution")?)?;
    let principles = &constitution.feedback;
    anyhow::ensure!(
        !principles.is_empty(),
        "stage `{stage}`: the constitution has no feedback principles"
    );
    anyhow::ensure!(
        p.principles_per_pair <= principles.len(),
        "stage `{stage}`: principles_per_pair is {} but the constitution has {} feedback principle(s)",
        p.principles_per_pair,
        principles.len()
    );
    let pairs =
        read_pairs(ctx.input("pairs")?).map_err(|e| anyhow::anyhow!("stage `{stage}`: {e}"))?;
    let few_shot: &[String] = if p.few_shot {
        &constitution.few_shot.feedback
    } else {
        &[]
    };

    let chosen: Vec<Vec<usize>> = (0..pairs.len())
        .map(|i| sample_principles(principles.len(), p.principles_per_pair, ctx.spec.seed, i))
        .collect();
    let mut questions = questions(&p, &pairs, &chosen, principles, few_shot, chat.as_ref())
        .map_err(|e| anyhow::anyhow!("stage `{stage}`: {e:#}"))?;
    let rendered = chat.is_some();
    if p.chain_of_thought {
        reason(ctx, &p, &model, &tokenizer, &mut questions, rendered)?;
    }
    let texts: Vec<&str> = questions.iter().map(|q| q.text.as_str()).collect();
    let (mut probs, truncated) = ask_questions(
        ctx,
        &model,
        &tokenizer,
        &texts,
        p.batch_size.max(1),
        |i| format!("pair {}", questions[i].pair),
        "scoring options",
        rendered,
        device,
    )?;
    if p.chain_of_thought {
        for x in &mut probs {
            *x = x.clamp(COT_CLAMP.0, COT_CLAMP.1);
        }
    }

    let labels = write_comparisons(ctx, &p, &pairs, &chosen, principles, &questions, &probs)?;
    let summary = FeedbackSummary::new(&labels, truncated);
    std::fs::write(
        ctx.output("summary"),
        serde_json::to_string_pretty(&summary)? + "\n",
    )?;
    if truncated > 0 {
        let max_len = model.lm.cfg.max_positions.max(2) as usize;
        tracing::warn!(
            truncated,
            "feedback prompts longer than the model's {max_len} positions lost their beginning"
        );
    }
    Ok(summary.metrics())
}

/// Every question, pair by pair: per chosen principle, the pair in order
/// and then swapped; with a chat template, asked as a user turn.
fn questions(
    p: &AiFeedbackParams,
    pairs: &[FeedbackPair],
    chosen: &[Vec<usize>],
    principles: &[FeedbackPrinciple],
    few_shot: &[String],
    chat: Option<&ChatFormat>,
) -> anyhow::Result<Vec<Question>> {
    let mut questions = Vec::new();
    for (i, pair) in pairs.iter().enumerate() {
        let conversation = conversation_of(&pair.context);
        for (slot, &j) in chosen[i].iter().enumerate() {
            for swapped in [false, true] {
                let (a, b) = if swapped {
                    (&pair.response_b, &pair.response_a)
                } else {
                    (&pair.response_a, &pair.response_b)
                };
                let principle = &principles[j].text;
                let text = match chat {
                    None if p.chain_of_thought => {
                        with_few_shot(few_shot, &cot_prompt(&conversation, principle, a, b))
                    }
                    None => {
                        with_few_shot(few_shot, &feedback_prompt(&conversation, principle, a, b))
                    }
                    Some(chat) => {
                        let question = feedback_question(&conversation, principle, a, b);
                        let turns =
                            serde_json::Value::Array(feedback_messages(few_shot, &question));
                        let rendered = chat
                            .prompt(&turns)
                            .map_err(|e| anyhow::anyhow!("{e} ({})", chat.source))?;
                        if questions.is_empty() {
                            // The options are scored after the cue that follows.
                            super::rendered::log("question", &turns, &rendered.text);
                        }
                        let cue = if p.chain_of_thought {
                            COT_CUE
                        } else {
                            ANSWER_CUE
                        };
                        rendered.text + cue
                    }
                };
                questions.push(Question {
                    pair: i,
                    slot,
                    swapped,
                    text,
                    reasoning: None,
                });
            }
        }
    }
    Ok(questions)
}

/// Writes the `comparisons` output (per pair: `p_a` and each principle's
/// details) and returns the pairs' labels.
fn write_comparisons(
    ctx: &StageContext<'_>,
    p: &AiFeedbackParams,
    pairs: &[FeedbackPair],
    chosen: &[Vec<usize>],
    principles: &[FeedbackPrinciple],
    questions: &[Question],
    probs: &[f64],
) -> anyhow::Result<Vec<PairLabel>> {
    // Per pair, per principle: (forward, swapped) P(A) and reasoning.
    let mut orders = vec![vec![(f64::NAN, f64::NAN); p.principles_per_pair]; pairs.len()];
    let mut reasons = vec![vec![(None, None); p.principles_per_pair]; pairs.len()];
    for (q, prob) in questions.iter().zip(probs) {
        let (o, r) = (&mut orders[q.pair][q.slot], &mut reasons[q.pair][q.slot]);
        if q.swapped {
            o.1 = *prob;
            r.1 = q.reasoning.clone();
        } else {
            o.0 = *prob;
            r.0 = q.reasoning.clone();
        }
    }
    let mut out = JsonlWriter::create(&ctx.output("comparisons"))?;
    let mut labels = Vec::with_capacity(pairs.len());
    for (i, pair) in pairs.iter().enumerate() {
        let per: Vec<f64> = orders[i]
            .iter()
            .map(|(f, s)| combine_orders(*f, *s))
            .collect();
        let p_a = per.iter().sum::<f64>() / per.len() as f64;
        let details: Vec<serde_json::Value> = chosen[i]
            .iter()
            .zip(&orders[i])
            .zip(&reasons[i])
            .map(|((&j, (f, s)), (rf, rs))| {
                let mut d = serde_json::json!({
                    "principle": principles[j].id,
                    "p_a_forward": f,
                    "p_a_swapped": s,
                });
                if p.chain_of_thought {
                    d["reasoning_forward"] = rf.clone().into();
                    d["reasoning_swapped"] = rs.clone().into();
                }
                d
            })
            .collect();
        let mut record = serde_json::json!({
            "prompt": pair.prompt,
            "response_a": pair.response_a,
            "response_b": pair.response_b,
            "p_a": p_a,
            "details": details,
        });
        if let Some(label) = pair.label {
            record["label"] = label.into();
        }
        out.write(&record)?;
        labels.push(PairLabel {
            p_a,
            orders: orders[i].clone(),
            human: pair.label,
        });
    }
    out.finish()?;
    Ok(labels)
}

/// Chain of thought: generates each question's reasoning after
/// `Let's think step by step:` (cut where the model writes `The answer is`
/// itself) and turns the question into `{question}{reasoning}\nThe answer is:`.
fn reason(
    ctx: &StageContext<'_>,
    p: &AiFeedbackParams,
    model: &Model,
    tokenizer: &Tokenizer,
    questions: &mut [Question],
    rendered: bool,
) -> anyhow::Result<()> {
    let cfg = SamplingConfig {
        seed: ctx.spec.seed,
        max_rows: p.batch_size.max(1),
        ..sampling_config(tokenizer, model, p.max_new_tokens, p.temperature)
    };
    // Room for the reasoning; over-long prompts keep their end.
    let budget = load::prompt_budget(
        &ctx.spec.stage,
        model.lm.cfg.max_positions,
        p.max_new_tokens,
    )?;
    let cue = ANSWER_CUE.trim_end_matches(':');
    let mut prompts = Vec::with_capacity(questions.len());
    for q in questions.iter() {
        // A rendered chat template writes its own BOS.
        let mut ids = match rendered {
            true => tokenizer.encode(&q.text)?,
            false => tokenizer.encode_start(&q.text)?,
        };
        let cut = ids.len().saturating_sub(budget);
        tokenizer.cut_start(&mut ids, cut);
        prompts.push(ids);
    }
    let stop = |_: usize, toks: &[i64]| tokenizer.decode(toks).is_ok_and(|t| t.contains(cue));
    let ids: Vec<&[i64]> = prompts.iter().map(Vec::as_slice).collect();
    let sampled = sample_prompts(ctx, &model.lm, &ids, 1, &cfg, stop, "reasoning")?;
    for (q, s) in questions.iter_mut().zip(sampled.samples) {
        let mut text = decode_answer(tokenizer, &s)?;
        if let Some(cut) = text.find(cue) {
            text.truncate(cut);
        }
        q.text = cot_answer_prompt(&q.text, &text);
        q.reasoning = Some(text.trim_end().to_string());
    }
    Ok(())
}
