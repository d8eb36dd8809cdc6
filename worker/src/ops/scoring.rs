//! How the ops score tokens with a model, shared so that every op scores
//! the same way: the policy's log-probs of its response tokens (`ppo`,
//! `evaluate`'s KL), the preference model's score of a sequence (`ppo`,
//! `baseline_scores`, `evaluate`, `best_of_n`), and a feedback model's
//! probability of option `(A)` over `(B)` (`ai_feedback`, `evaluate`;
//! `ppo`'s ratings use its continuation log-probs).

use std::collections::BTreeSet;

use tch::{Device, Kind, Tensor};

use alignflow_ops::ai_feedback::{OPTION_A, OPTION_B};
use alignflow_ops::text::Tokenizer;
use alignflow_ops::StageContext;

use super::prompts::Prompt;
use crate::model::sample::left_pad;
use crate::model::{Keep, Model, TokenLogprobs, Transformer};

/// Policy log-probs of the response tokens of `ids`, and with `entropy`
/// the entropy of the whole vocabulary's distribution at those positions;
/// with `train`, the forward has the model's dropout. Computed in chunks of
/// positions (see [`crate::model::TokenLogprobs`]). Like every scoring
/// function here, it runs on the model's device and answers on the
/// device of `ids` (models placed by role, `params.placement`).
///
/// # Shapes
/// `ids`, `mask`: `[b, p + r]`, `resp`: `[b, r]` -> `[b, r]` each.
#[allow(clippy::too_many_arguments)]
pub fn response_logprobs(
    m: &Model,
    ids: &Tensor,
    mask: &Tensor,
    resp: &Tensor,
    p_len: i64,
    temperature: f64,
    train: bool,
    entropy: bool,
) -> TokenLogprobs {
    let r = resp.size()[1];
    let (home, on) = (ids.device(), m.vs.device());
    let hidden = m.lm.hidden_kept(
        &ids.to_device(on),
        &mask.to_device(on),
        before_each_response_token(p_len, r),
        train,
    );
    let out =
        m.lm.token_logprobs(&hidden, &resp.to_device(on), temperature, entropy);
    TokenLogprobs {
        logp: out.logp.to_device(home),
        entropy: out.entropy.map(|e| e.to_device(home)),
    }
}

/// The positions whose outputs score the response tokens: from the last
/// prompt token to the one before the last response token.
fn before_each_response_token(p_len: i64, r: i64) -> Keep {
    Keep::Span {
        start: p_len - 1,
        len: r,
    }
}

/// Values of the states before each response token (`train`: with the
/// model's dropout).
///
/// # Shapes
/// `ids`, `mask`: `[b, p + r]` -> `[b, r]`.
pub fn response_values(
    m: &Model,
    ids: &Tensor,
    mask: &Tensor,
    p_len: i64,
    r: i64,
    train: bool,
) -> Tensor {
    let on = m.vs.device();
    let hidden = m.lm.hidden_kept(
        &ids.to_device(on),
        &mask.to_device(on),
        before_each_response_token(p_len, r),
        train,
    );
    m.value
        .as_ref()
        .expect("value head")
        .forward(&hidden)
        .to_kind(Kind::Float)
        .to_device(ids.device())
}

/// The preference model's raw score of each full sequence.
///
/// # Shapes
/// `ids`, `mask`: `[b, t]` -> `[b]` float32.
pub fn pm_scores(pm: &Model, ids: &Tensor, mask: &Tensor) -> Tensor {
    let on = pm.vs.device();
    pm.scores(&ids.to_device(on), &mask.to_device(on), false)
        .to_kind(Kind::Float)
        .to_device(ids.device())
}

/// The PM's raw score of each row (`prompt + answer` tokens, EOS included
/// when sampled), left-padded into one forward pass: the scoring of `ppo`'s
/// rollouts.
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

/// The PM's score of each prompt's answers (`answers(i)`: the answer
/// tokens of prompt `i`), per prompt in the order given. Each pass holds a
/// chunk of `batch` prompts; a prompt contributes its distinct
/// `prompt + answer` sequences in sorted order, so identical answers get
/// identical scores and the layout does not depend on the answers' order.
/// A score that is not finite is an error.
pub(crate) fn pm_score_answers<'a>(
    ctx: &StageContext<'_>,
    pm: &Model,
    prompts: &[Prompt],
    batch: usize,
    answers: impl Fn(usize) -> Vec<&'a [i64]>,
    device: Device,
) -> anyhow::Result<Vec<Vec<f64>>> {
    let mut out: Vec<Vec<f64>> = Vec::with_capacity(prompts.len());
    for (k, chunk) in prompts.chunks(batch).enumerate() {
        ctx.cancel.check()?;
        let first = k * batch;
        let seq = |i: usize, a: &[i64]| [prompts[i].ids.as_slice(), a].concat();
        let mut rows: Vec<Vec<i64>> = Vec::new();
        for i in first..first + chunk.len() {
            let distinct: BTreeSet<Vec<i64>> = answers(i).into_iter().map(|a| seq(i, a)).collect();
            rows.extend(distinct);
        }
        let row_scores = pm_score_rows(pm, &rows, device);
        for i in first..first + chunk.len() {
            let per: Vec<f64> = answers(i)
                .into_iter()
                .map(|a| {
                    let s = seq(i, a);
                    row_scores[rows.iter().position(|r| *r == s).expect("scored row")]
                })
                .collect();
            anyhow::ensure!(
                per.iter().all(|s| s.is_finite()),
                "stage `{}`: prompt {i}: the reward model's score is not finite",
                ctx.spec.stage
            );
            out.push(per);
        }
        ctx.reporter.progress(
            out.len() as u64,
            Some(prompts.len() as u64),
            "scoring with the reward model",
        );
    }
    Ok(out)
}

/// The two scored sequences of one multiple-choice question.
///
/// Tokenization of the options: `prompt + " (A)"` and `prompt + " (B)"` are
/// tokenized whole (as the model would read them) and each continuation is
/// the tokens after the two sequences' longest common token prefix. Tokens
/// of the common prefix would contribute the same factor to both options
/// and cancel in the normalisation, so scoring the continuations equals
/// scoring the full ` (A)` / ` (B)` texts, whatever the tokenizer merges
/// across the prompt/option boundary (a byte-level BPE often makes ` (` one
/// token, shared by both).
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
    /// Tokenizes both options after `prompt` (see the type's docs); keeps at
    /// most `max_len` tokens of each by dropping the same number of prompt
    /// tokens from the left. Returns whether it had to.
    pub fn encode(
        tokenizer: &Tokenizer,
        prompt: &str,
        max_len: usize,
        rendered: bool,
    ) -> anyhow::Result<(OptionTokens, bool)> {
        // A rendered chat template writes its own BOS.
        let encode = |text: String| match rendered {
            true => tokenizer.encode(&text),
            false => tokenizer.encode_start(&text),
        };
        let mut a = encode(format!("{prompt}{OPTION_A}"))?;
        let mut b = encode(format!("{prompt}{OPTION_B}"))?;
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
        tokenizer.cut_start(&mut a, drop);
        tokenizer.cut_start(&mut b, drop);
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

/// `p(A)` of each question text under `model`, in chunks of `batch`
/// questions (one forward pass each), and how many questions lost their
/// beginning to fit the model's positions. `name(i)` says in an error which
/// question `i` is; `progress` labels the progress reports.
#[allow(clippy::too_many_arguments)]
pub(crate) fn ask_questions(
    ctx: &StageContext<'_>,
    model: &Model,
    tokenizer: &Tokenizer,
    questions: &[&str],
    batch: usize,
    name: impl Fn(usize) -> String,
    progress: &str,
    rendered: bool,
    device: Device,
) -> anyhow::Result<(Vec<f64>, usize)> {
    let stage = &ctx.spec.stage;
    let max_len = model.lm.cfg.max_positions.max(2) as usize;
    let mut truncated = 0usize;
    let mut probs = Vec::with_capacity(questions.len());
    for (k, chunk) in questions.chunks(batch).enumerate() {
        ctx.cancel.check()?;
        let mut encoded = Vec::with_capacity(chunk.len());
        for (j, q) in chunk.iter().enumerate() {
            let (tokens, cut) = OptionTokens::encode(tokenizer, q, max_len, rendered)
                .map_err(|e| anyhow::anyhow!("stage `{stage}`: {}: {e}", name(k * batch + j)))?;
            truncated += usize::from(cut);
            encoded.push(tokens);
        }
        probs.extend(p_option_a(&model.lm, &encoded, device));
        ctx.reporter
            .progress(probs.len() as u64, Some(questions.len() as u64), progress);
    }
    Ok((probs, truncated))
}
