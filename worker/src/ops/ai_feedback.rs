//! `ai_feedback`: soft preference labels from a feedback model.
//!
//! For each pair, each sampled principle and both orders (A = first, then
//! swapped), the model reads the multiple-choice question
//! ([`alignflow_ops::ai_feedback::feedback_prompt`]) and
//! `p(A) = exp(lA) / (exp(lA) + exp(lB))`, where lA and lB are its
//! log-probabilities of the continuations ` (A)` and ` (B)`.
//!
//! Tokenization of the options: `prompt + " (A)"` and `prompt + " (B)"` are
//! tokenized whole (as the model would read them) and each continuation is
//! the tokens after the two sequences' longest common token prefix; lA and
//! lB are the sums of their log-probs. Tokens of the common prefix would
//! contribute the same factor to both options and cancel in the
//! normalisation, so this equals scoring the full ` (A)` / ` (B)` texts,
//! whatever the tokenizer merges across the prompt/option boundary (a
//! byte-level BPE often makes ` (` one token, shared by both).

use alignflow_ops::ai_feedback::{
    combine_orders, conversation_of, cot_answer_prompt, cot_prompt, feedback_prompt, read_pairs,
    sample_principles, with_few_shot, FeedbackSummary, PairLabel, ANSWER_CUE, COT_CLAMP, OPTION_A,
    OPTION_B,
};
use alignflow_ops::data::{Constitution, JsonlWriter};
use alignflow_ops::protocol::Metrics;
use alignflow_ops::text::Tokenizer;
use alignflow_ops::{AiFeedbackParams, StageContext};
use tch::{Device, Kind};

use crate::model::sample::{generate, left_pad, Finish, SamplingConfig};
use crate::model::{self, BuildOptions, Head, Keep, Model, Transformer};

/// The two scored sequences of one question.
#[derive(Debug, Clone, PartialEq)]
pub struct OptionTokens {
    /// Tokens of `prompt + " (A)"`.
    pub a: Vec<i64>,
    /// Tokens of `prompt + " (B)"`.
    pub b: Vec<i64>,
    /// Length of their common token prefix: the continuations are `a[start..]`
    /// and `b[start..]` (never empty, `start >= 1`).
    pub start: usize,
}

impl OptionTokens {
    /// Tokenizes both options after `prompt` (see the module docs); keeps at
    /// most `max_len` tokens of each by dropping the same number of prompt
    /// tokens from the left. Returns whether it had to.
    pub fn encode(
        tokenizer: &Tokenizer,
        prompt: &str,
        max_len: usize,
    ) -> anyhow::Result<(OptionTokens, bool)> {
        let mut a = tokenizer.encode(&format!("{prompt}{OPTION_A}"))?;
        let mut b = tokenizer.encode(&format!("{prompt}{OPTION_B}"))?;
        let mut start = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
        anyhow::ensure!(
            start < a.len() && start < b.len(),
            "the tokenizer does not tell `{OPTION_A}` from `{OPTION_B}`"
        );
        let drop = a.len().max(b.len()).saturating_sub(max_len);
        anyhow::ensure!(
            drop < start,
            "the options do not fit the model's {max_len} positions"
        );
        a.drain(..drop);
        b.drain(..drop);
        start -= drop;
        anyhow::ensure!(start >= 1, "an empty feedback prompt");
        Ok((OptionTokens { a, b, start }, drop > 0))
    }
}

/// The summed log-prob of each row's tokens from `starts[i]` on, in one
/// forward pass over all rows.
///
/// # Shapes
/// Rows are left-padded, so every row's continuation ends at the last
/// position: logits are computed for the last `k` positions only, `k` the
/// longest continuation of the batch (`[rows, k, vocab]`, not `[rows, t, vocab]`).
/// `rows`: `n` sequences -> `n` log-probs.
pub fn continuation_logprobs(
    model: &Transformer,
    rows: &[Vec<i64>],
    starts: &[usize],
    device: Device,
) -> Vec<f64> {
    tch::no_grad(|| {
        let (ids, mask) = left_pad(rows, model.cfg.pad_id(), device);
        let t = ids.size()[1];
        let k = rows
            .iter()
            .zip(starts)
            .map(|(r, s)| r.len() - s)
            .max()
            .unwrap_or(1) as i64;
        // Position j predicts token j + 1: the last k targets need the k
        // positions before the last (the only ones the last block computes).
        let hidden = model.hidden_kept(
            &ids,
            &mask,
            Keep::Span {
                start: t - 1 - k,
                len: k,
            },
            false,
        );
        let logprobs = model
            .logits(&hidden)
            .to_kind(Kind::Double)
            .log_softmax(-1, Kind::Double);
        let targets = ids.narrow(1, t - k, k);
        let token_lp = logprobs
            .gather(2, &targets.unsqueeze(2), false)
            .squeeze_dim(2)
            .to_device(Device::Cpu);
        let lp = Vec::<Vec<f64>>::try_from(&token_lp).expect("log-probs");
        rows.iter()
            .zip(starts)
            .zip(&lp)
            .map(|((r, s), l)| l[k as usize - (r.len() - s)..].iter().sum())
            .collect()
    })
}

/// `p(A)` of each question: one forward pass per chunk of questions (two
/// left-padded rows each), log-probs only where the options are.
pub fn p_option_a(model: &Transformer, questions: &[OptionTokens], device: Device) -> Vec<f64> {
    let rows: Vec<Vec<i64>> = questions
        .iter()
        .flat_map(|q| [q.a.clone(), q.b.clone()])
        .collect();
    let starts: Vec<usize> = questions.iter().flat_map(|q| [q.start, q.start]).collect();
    let lp = continuation_logprobs(model, &rows, &starts, device);
    lp.chunks(2)
        // exp(lA) / (exp(lA) + exp(lB)), stably.
        .map(|ab| 1.0 / (1.0 + (ab[1] - ab[0]).exp()))
        .collect()
}

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
    let tokenizer = Tokenizer::from_dir(model_dir)?;
    let model = Model::load(
        model_dir,
        &BuildOptions {
            device,
            head: Head::Lm,
            lora: None,
        },
    )?;
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
                let text = if p.chain_of_thought {
                    cot_prompt(&conversation, &principles[j].text, a, b)
                } else {
                    feedback_prompt(&conversation, &principles[j].text, a, b)
                };
                questions.push(Question {
                    pair: i,
                    slot,
                    swapped,
                    text: with_few_shot(few_shot, &text),
                    reasoning: None,
                });
            }
        }
    }

    let max_len = model.lm.cfg.max_positions.max(2) as usize;
    let batch = p.batch_size.max(1);
    let total = questions.len() as u64;
    if p.chain_of_thought {
        reason(ctx, &p, &model, &tokenizer, &mut questions, device)?;
    }
    let mut truncated = 0usize;
    let mut probs = Vec::with_capacity(questions.len());
    for chunk in questions.chunks(batch) {
        ctx.cancel.check()?;
        let mut encoded = Vec::with_capacity(chunk.len());
        for q in chunk {
            let (tokens, cut) = OptionTokens::encode(&tokenizer, &q.text, max_len)
                .map_err(|e| anyhow::anyhow!("stage `{stage}`: pair {}: {e}", q.pair))?;
            truncated += usize::from(cut);
            encoded.push(tokens);
        }
        probs.extend(p_option_a(&model.lm, &encoded, device));
        ctx.reporter
            .progress(probs.len() as u64, Some(total), "scoring options");
    }
    if p.chain_of_thought {
        for x in &mut probs {
            *x = x.clamp(COT_CLAMP.0, COT_CLAMP.1);
        }
    }

    // Per pair: (p_a, [(forward, swapped)], label) and the details records.
    let mut orders = vec![vec![(f64::NAN, f64::NAN); p.principles_per_pair]; pairs.len()];
    let mut reasons = vec![vec![(None, None); p.principles_per_pair]; pairs.len()];
    for (q, prob) in questions.iter().zip(&probs) {
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
    let summary = FeedbackSummary::new(&labels, truncated);
    std::fs::write(
        ctx.output("summary"),
        serde_json::to_string_pretty(&summary)? + "\n",
    )?;
    if truncated > 0 {
        tracing::warn!(
            truncated,
            "feedback prompts longer than the model's {max_len} positions lost their beginning"
        );
    }
    Ok(summary.metrics())
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
    device: Device,
) -> anyhow::Result<()> {
    let cfg = SamplingConfig {
        max_new_tokens: p.max_new_tokens,
        min_new_tokens: 0,
        temperature: p.temperature,
        top_k: 0,
        top_p: 1.0,
        eos_token_id: tokenizer
            .eos_id
            .map(i64::from)
            .or(model.lm.cfg.eos_token_id),
        pad_token_id: model.lm.cfg.pad_id(),
        seed: ctx.spec.seed,
    };
    // Room for the reasoning; over-long prompts keep their end.
    let budget = (model.lm.cfg.max_positions - p.max_new_tokens).max(1) as usize;
    let cue = ANSWER_CUE.trim_end_matches(':');
    let total = questions.len() as u64;
    let mut done = 0u64;
    for (n, chunk) in questions.chunks_mut(p.batch_size.max(1)).enumerate() {
        ctx.cancel.check()?;
        let mut prompts = Vec::with_capacity(chunk.len());
        for q in chunk.iter() {
            let mut ids = tokenizer.encode(&q.text)?;
            ids.drain(..ids.len().saturating_sub(budget));
            prompts.push(ids);
        }
        let stop = |_: usize, toks: &[i64]| tokenizer.decode(toks).is_ok_and(|t| t.contains(cue));
        // Each batch draws from its own stream of the stage's seed.
        let cfg = SamplingConfig {
            seed: ctx.spec.seed ^ (n as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
            ..cfg.clone()
        };
        let samples = generate(&model.lm, &prompts, &cfg, device, stop);
        for (q, s) in chunk.iter_mut().zip(samples) {
            let body = match s.finish {
                Finish::Eos => &s.tokens[..s.tokens.len() - 1],
                _ => &s.tokens[..],
            };
            let mut text = tokenizer.decode(body)?;
            if let Some(cut) = text.find(cue) {
                text.truncate(cut);
            }
            q.text = cot_answer_prompt(&q.text, &text);
            q.reasoning = Some(text.trim_end().to_string());
        }
        done += chunk.len() as u64;
        ctx.reporter.progress(done, Some(total), "reasoning");
    }
    Ok(())
}
