//! Where `ppo`'s per-response score comes from, and the contrastive
//! baseline subtracted from it.
//!
//! The reward sources of a stage (one bound input, or several weighed in
//! `params.rewards`; the score is their weighted sum):
//! - `reward_model`: a preference model's score of the full sequence
//!   (on its last real token);
//! - `feedback_model` (direct RLAIF, Lee et al. 2023): a language model
//!   reads [`rating_prompt`] under a principle (`params.principle`, or one
//!   of a `constitution` input's feedback principles drawn per response)
//!   and the score is its expected rating from 1 to 10 rescaled to `[-1, 1]`
//!   (see [`crate::rl::rating`] for the math and the tokenization). The
//!   response is decoded with the policy's tokenizer and re-encoded with the
//!   feedback model's, so the two need not share a vocabulary;
//! - `reward_program` and the built-in rules (`exact_match`, `regex`,
//!   `length`): the decoded response and the prompt's record, scored by
//!   [`TextRewards`] (the protocol: [`alignflow_ops::reward_program`]).
//!
//! With a `baseline` input (contrastive rewards, Shen et al. 2024: the
//! `baseline_scores` op) the score becomes the PM score minus the prompt's
//! mean baseline score ([`contrastive_scores`]).
//!
//! Prompts are found by their tokens: each rollout row starts from one of
//! the stage's tokenized prompts, so the rollout code hands over the
//! prompt tokens it sampled from and nothing else has to thread indices.

use std::collections::HashMap;
use std::path::Path;

use anyhow::Context;
use tch::{Device, Kind, Tensor};

use alignflow_ops::ai_feedback::question_conversation;
use alignflow_ops::data::{read_jsonl, Constitution};
use alignflow_ops::reward_program::Request;
use alignflow_ops::rewards::{
    effective_rewards, source_means, RewardKind, TextRewards, PROGRAM_INPUT,
};
use alignflow_ops::text::Tokenizer;
use alignflow_ops::{BaselineRecord, OpParams, PpoParams, StageContext};

use crate::model::{Head, Model};
use crate::ops::load;
use crate::ops::prompts::Prompt;
use crate::ops::scoring::{continuation_logprobs, pm_scores};
use crate::rl::{
    contrastive_scores, expected_rating, rating_continuation, rating_prompt, rating_reward,
    RewardNorm,
};

/// What scores responses: the frozen models and the text sources of the
/// stage's rewards, each with its weight (see
/// [`alignflow_ops::rewards::effective_rewards`]).
pub(super) struct Source {
    pm: Option<(Model, f64)>,
    feedback: Option<(Feedback, f64)>,
    text: TextRewards,
    /// Log each source's mean score (several sources, or a text one).
    log_sources: bool,
}

/// Direct RLAIF: the feedback model and the principles it rates under.
pub(super) struct Feedback {
    model: Model,
    tokenizer: Tokenizer,
    principles: Vec<String>,
    seed: u64,
    batch_size: usize,
}

impl Source {
    /// Checks the stage's reward sources (and their companions), loads
    /// the models frozen and starts the program.
    pub(super) fn load(
        ctx: &StageContext<'_>,
        p: &PpoParams,
        policy_vocab: i64,
        device: Device,
    ) -> anyhow::Result<Source> {
        let stage = &ctx.spec.stage;
        let bound = |name: &str| ctx.spec.inputs.get(name).map(|p| p.as_path());
        p.check_bindings(&|name| bound(name).is_some())
            .map_err(|e| anyhow::anyhow!("stage `{stage}`, {e}"))?;
        let rewards = effective_rewards(&p.rewards, &|name| bound(name).is_some());
        let mut source = Source {
            pm: None,
            feedback: None,
            text: TextRewards::start(&rewards, bound(PROGRAM_INPUT), stage)?,
            log_sources: rewards.len() > 1
                || rewards.iter().any(|c| c.kind().input().is_none())
                || bound(PROGRAM_INPUT).is_some(),
        };
        for c in &rewards {
            match c.kind() {
                RewardKind::Pm => {
                    let pm_dir = bound("reward_model").expect("checked by check_bindings");
                    let pm = load::frozen(pm_dir, device, Head::Reward, p.dtype)?;
                    anyhow::ensure!(
                        pm.lm.cfg.vocab_size == policy_vocab,
                        "stage `{stage}`: the reward model's vocabulary ({}) differs from the policy's ({policy_vocab}): they must share a tokenizer",
                        pm.lm.cfg.vocab_size,
                    );
                    source.pm = Some((pm, c.weight));
                }
                RewardKind::Feedback => {
                    let dir = bound("feedback_model").expect("checked by check_bindings");
                    source.feedback = Some((Feedback::load(ctx, p, dir, device)?, c.weight));
                }
                _ => {}
            }
        }
        Ok(source)
    }

    /// The frozen models packed for oneDNN for the whole stage (see
    /// [`crate::model::Transformer::packed`]).
    pub(super) fn packed(&self) -> Vec<crate::model::Packing<'_>> {
        let pm = self.pm.iter().map(|(m, _)| m.lm.packed(8));
        pm.chain(self.feedback.iter().map(|(f, _)| f.model.lm.packed(8)))
            .collect()
    }

    /// The most positions a scored sequence may take, when a source reads
    /// the rollout's tokens directly (the PM); the feedback model reads its
    /// own prompt, cut from the left to fit, and the text sources text.
    pub(super) fn max_positions(&self) -> Option<i64> {
        self.pm.as_ref().map(|(pm, _)| pm.lm.cfg.max_positions)
    }
}

impl Feedback {
    /// The feedback model in `dir` and the principles it rates under.
    fn load(
        ctx: &StageContext<'_>,
        p: &PpoParams,
        dir: &Path,
        device: Device,
    ) -> anyhow::Result<Feedback> {
        let stage = &ctx.spec.stage;
        let principles = match (p.principle.as_deref(), ctx.spec.inputs.get("constitution")) {
            (Some(text), _) => vec![text.to_string()],
            (None, Some(path)) => {
                let c = Constitution::load(path)?;
                anyhow::ensure!(
                    !c.feedback.is_empty(),
                    "stage `{stage}`: the constitution has no feedback principles"
                );
                c.feedback.into_iter().map(|f| f.text).collect()
            }
            (None, None) => unreachable!("check_bindings requires principles"),
        };
        Ok(Feedback {
            tokenizer: Tokenizer::from_dir(dir)?,
            model: load::frozen(dir, device, Head::Lm, p.dtype)?,
            principles,
            seed: ctx.spec.seed,
            batch_size: p.batch_size.max(1),
        })
    }
}

/// One prompt of the stage, as the rollouts carry it.
pub(super) struct PromptInfo {
    /// Its tokens, as the policy reads it.
    pub ids: Vec<i64>,
    /// The templated text (what the baseline is keyed by).
    pub text: String,
    /// Its mean baseline score (with a `baseline` input).
    baseline: Option<f64>,
    /// The prompt field as recorded, the conversation, the whole record
    /// and where it is: what the text sources read.
    pub raw: String,
    pub messages: Option<serde_json::Value>,
    record: serde_json::Value,
    at: String,
}

/// The reward sources plus what they need to know about each prompt.
pub(super) struct Rewards {
    source: Source,
    /// The policy's tokenizer (decodes responses for the feedback model
    /// and the text sources).
    tokenizer: Tokenizer,
    eos: Vec<i64>,
    /// By the prompt's index in the stage's prompts: two prompts that read
    /// alike (after truncation, or records that differ in other fields
    /// alone) keep their own records.
    prompts: Vec<PromptInfo>,
    contrastive: bool,
}

/// A rollout's raw scores and, when the stage logs them, each source's
/// mean score (`reward_<source>`).
pub(super) struct RawScores {
    /// `[b]` float32 on the rollout's device.
    pub scores: Tensor,
    pub sources: Vec<(String, f64)>,
}

impl Rewards {
    /// The reward models packed for the stage (see [`Source::packed`]).
    pub(super) fn packed(&self) -> Vec<crate::model::Packing<'_>> {
        self.source.packed()
    }

    /// The stage's prompts as the rollouts use them. With a `baseline`
    /// input every prompt must have a baseline record.
    pub(super) fn new(
        ctx: &StageContext<'_>,
        source: Source,
        tokenizer: Tokenizer,
        eos: Vec<i64>,
        prompts: &[Prompt],
    ) -> anyhow::Result<Rewards> {
        let stage = &ctx.spec.stage;
        let baseline = match ctx.spec.inputs.get("baseline") {
            Some(path) => Some(read_baseline(path, stage)?),
            None => None,
        };
        let mut infos = Vec::with_capacity(prompts.len());
        for pr in prompts {
            let text = &pr.text;
            let base = match &baseline {
                Some((path, means)) => Some(*means.get(text).with_context(|| {
                    format!(
                        "stage `{stage}`: prompt {text:?} has no baseline score in {} (run `baseline_scores` on the same prompts with the same `template` and `prompt_field`)",
                        path.display()
                    )
                })?),
                None => None,
            };
            infos.push(PromptInfo {
                ids: pr.ids.clone(),
                text: text.clone(),
                baseline: base,
                raw: pr.raw.clone(),
                messages: pr.messages.clone(),
                record: pr.record.clone(),
                at: pr.at.clone(),
            });
        }
        Ok(Rewards {
            source,
            tokenizer,
            eos,
            prompts: infos,
            contrastive: baseline.is_some(),
        })
    }

    /// A PM source with no prompt texts and no baseline (unit tests).
    #[cfg(test)]
    pub(super) fn from_pm(pm: Model, tokenizer: Tokenizer) -> Rewards {
        Rewards {
            source: Source {
                pm: Some((pm, 1.0)),
                feedback: None,
                text: TextRewards::start(&[], None, "test").expect("no sources"),
                log_sources: false,
            },
            tokenizer,
            eos: Vec::new(),
            prompts: Vec::new(),
            contrastive: false,
        }
    }

    pub(super) fn prompt(&self, index: usize) -> &PromptInfo {
        &self.prompts[index]
    }

    /// Each row's response tokens up to its first EOS, decoded.
    pub(super) fn responses(
        &self,
        resp: &Tensor,
        gen_mask: &Tensor,
    ) -> anyhow::Result<Vec<(Vec<i64>, String)>> {
        let resp_v = Vec::<Vec<i64>>::try_from(&resp.to_device(Device::Cpu))?;
        let lens = Vec::<i64>::try_from(
            &gen_mask
                .to_kind(Kind::Int64)
                .sum_dim_intlist([1i64].as_slice(), false, Kind::Int64)
                .to_device(Device::Cpu),
        )?;
        resp_v
            .iter()
            .zip(lens)
            .map(|(row, len)| {
                let mut toks = &row[..len as usize];
                if let Some(at) = toks.iter().position(|t| self.eos.contains(t)) {
                    toks = &toks[..at];
                }
                Ok((toks.to_vec(), self.tokenizer.decode(toks)?))
            })
            .collect()
    }

    /// The raw score of each rollout row (before normalisation and
    /// baseline): the weighted sum of the sources' scores (PM score,
    /// rescaled expected rating in `[-1, 1]`, program or rule score).
    ///
    /// # Shapes
    /// `batch`: `b` prompts' indices; `ids`, `mask`: `[b, p + r]`; `resp`,
    /// `gen_mask`: `[b, r]` -> `[b]` float32 on the rollout's device.
    pub(super) fn raw_scores(
        &self,
        batch: &[usize],
        ids: &Tensor,
        mask: &Tensor,
        resp: &Tensor,
        gen_mask: &Tensor,
    ) -> anyhow::Result<RawScores> {
        let src = &self.source;
        // A preference model alone keeps its scores as they are.
        if let (Some((pm, w)), None, true) = (&src.pm, &src.feedback, src.text.is_empty()) {
            if *w == 1.0 && !src.log_sources {
                return Ok(RawScores {
                    scores: pm_scores(pm, ids, mask),
                    sources: Vec::new(),
                });
            }
        }
        let mut total = vec![0.0f64; batch.len()];
        let mut sources = Vec::new();
        let mut add = |key: &str, w: f64, scores: &[f64]| {
            for (t, s) in total.iter_mut().zip(scores) {
                *t += w * s;
            }
            let mean = scores.iter().sum::<f64>() / scores.len().max(1) as f64;
            sources.push((format!("reward_{key}"), mean));
        };
        if let Some((pm, w)) = &src.pm {
            let sc = pm_scores(pm, ids, mask).to_kind(Kind::Double);
            add("pm", *w, &Vec::<f64>::try_from(&sc.to_device(Device::Cpu))?);
        }
        let responses = if src.feedback.is_some() || !src.text.is_empty() {
            self.responses(resp, gen_mask)?
        } else {
            Vec::new()
        };
        if let Some((f, w)) = &src.feedback {
            let mut questions = Vec::with_capacity(batch.len());
            for (&prompt, (toks, response)) in batch.iter().zip(&responses) {
                let info = self.prompt(prompt);
                let principle = &f.principles[pick(f.seed, &info.ids, toks, f.principles.len())];
                let conversation = question_conversation(&info.text, info.messages.as_ref());
                questions.push(rating_prompt(&conversation, principle, response));
            }
            add("feedback", *w, &f.rewards(&questions)?);
        }
        if !src.text.is_empty() {
            let requests: Vec<Request<'_>> = batch
                .iter()
                .zip(&responses)
                .map(|(&prompt, (_, response))| {
                    let info = self.prompt(prompt);
                    Request {
                        record: &info.record,
                        prompt: &info.raw,
                        messages: info.messages.as_ref(),
                        response,
                        at: info.at.clone(),
                    }
                })
                .collect();
            let scored = src.text.score(&requests)?;
            for s in &scored {
                add(s.key, s.weight, &s.scores);
            }
            // The program's named scores after the sources.
            sources.extend(
                source_means(&scored).into_iter().filter(|(name, _)| {
                    !scored.iter().any(|s| *name == format!("reward_{}", s.key))
                }),
            );
        }
        if !src.log_sources {
            sources.clear();
        }
        // Each source's scores were finite; their weighted sum must stay
        // so in float32, the rollout's kind.
        if let Some(row) = total.iter().position(|t| !(t.abs() <= f64::from(f32::MAX))) {
            let at = &self.prompt(batch[row]).at;
            anyhow::bail!(
                "{at}: the reward sources' weighted sum {} does not fit a float32",
                total[row]
            );
        }
        Ok(RawScores {
            scores: Tensor::from_slice(&total)
                .to_kind(Kind::Float)
                .to_device(ids.device()),
            sources,
        })
    }

    /// With a baseline: `scores` minus each row's prompt baseline (mapped
    /// by `norm` like the scores), and the batch's mean baseline for the
    /// metrics. Without: `scores` unchanged.
    ///
    /// # Shapes
    /// `scores`: `[b]`, one per row of `batch`.
    pub(super) fn contrastive(
        &self,
        batch: &[usize],
        scores: Tensor,
        norm: Option<&RewardNorm>,
    ) -> (Tensor, Option<f64>) {
        if !self.contrastive {
            return (scores, None);
        }
        let base: Vec<f64> = batch
            .iter()
            .map(|&i| self.prompt(i).baseline.expect("checked in new"))
            .collect();
        let mean = base.iter().sum::<f64>() / base.len().max(1) as f64;
        (contrastive_scores(&scores, &base, norm), Some(mean))
    }
}

/// The baseline means by templated prompt text.
fn read_baseline<'a>(
    path: &'a Path,
    stage: &str,
) -> anyhow::Result<(&'a Path, HashMap<String, f64>)> {
    let mut means = HashMap::new();
    for (line, record) in read_jsonl::<BaselineRecord>(path)? {
        let r = record.map_err(|e| {
            anyhow::anyhow!(
                "stage `{stage}`: {}:{line}: not a baseline_scores record: {e}",
                path.display()
            )
        })?;
        anyhow::ensure!(
            r.mean.is_finite(),
            "stage `{stage}`: {}:{line}: the baseline mean is {}",
            path.display(),
            r.mean
        );
        means.entry(r.prompt).or_insert(r.mean);
    }
    Ok((path, means))
}

/// A principle index from the seed, the prompt and the response: fixed for
/// a given rollout, so a resumed run rates alike.
fn pick(seed: u64, prompt: &[i64], response: &[i64], n: usize) -> usize {
    if n <= 1 {
        return 0;
    }
    // FNV-1a over the tokens, then a SplitMix64 finaliser.
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for t in prompt.iter().chain([-1i64].iter()).chain(response) {
        h = (h ^ *t as u64).wrapping_mul(0x0100_0000_01b3);
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    ((h ^ (h >> 31)) % n as u64) as usize
}

/// The ten scored sequences of one rating question.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct RatingTokens {
    /// Tokens of `prompt + " 1"` .. `prompt + " 10"`.
    pub rows: Vec<Vec<i64>>,
    /// Length of their common token prefix: the continuations are
    /// `rows[s][start..]` (never empty, `start >= 1`).
    pub start: usize,
}

impl RatingTokens {
    /// Tokenizes the ten ratings after `prompt`; keeps at most `max_len`
    /// tokens of each by dropping the same number of prompt tokens from the
    /// left.
    pub(crate) fn encode(
        tokenizer: &Tokenizer,
        prompt: &str,
        max_len: usize,
    ) -> anyhow::Result<RatingTokens> {
        let mut rows = (1..=10)
            .map(|s| tokenizer.encode_start(&format!("{prompt}{}", rating_continuation(s))))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let mut start = rows[0].len();
        for r in &rows[1..] {
            start = start.min(r.iter().zip(&rows[0]).take_while(|(x, y)| x == y).count());
        }
        anyhow::ensure!(
            rows.iter().all(|r| start < r.len()),
            "the feedback model's tokenizer does not tell the ratings 1 to 10 apart"
        );
        let drop = rows
            .iter()
            .map(Vec::len)
            .max()
            .unwrap_or(0)
            .saturating_sub(max_len);
        anyhow::ensure!(
            drop < start,
            "the ratings do not fit the feedback model's {max_len} positions"
        );
        for r in &mut rows {
            tokenizer.cut_start(r, drop);
        }
        start -= drop;
        Ok(RatingTokens { rows, start })
    }
}

impl Feedback {
    /// The rescaled expected rating of each question, in chunks of
    /// `batch_size` questions (ten rows each).
    fn rewards(&self, questions: &[String]) -> anyhow::Result<Vec<f64>> {
        let max_len = self.model.lm.cfg.max_positions.max(2) as usize;
        let device = self.model.vs.device();
        let mut out = Vec::with_capacity(questions.len());
        for chunk in questions.chunks(self.batch_size) {
            let encoded = chunk
                .iter()
                .map(|q| RatingTokens::encode(&self.tokenizer, q, max_len))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let rows: Vec<Vec<i64>> = encoded.iter().flat_map(|e| e.rows.clone()).collect();
            let starts: Vec<usize> = encoded.iter().flat_map(|e| [e.start; 10]).collect();
            let lp = continuation_logprobs(&self.model.lm, &rows, &starts, device);
            for q in lp.chunks(10) {
                let q: [f64; 10] = q.try_into().expect("ten ratings");
                out.push(rating_reward(expected_rating(&q)));
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_principle_pick_is_stable_and_in_range() {
        assert_eq!(pick(7, &[1, 2], &[3], 1), 0);
        let a = pick(7, &[1, 2], &[3, 4], 5);
        assert_eq!(a, pick(7, &[1, 2], &[3, 4], 5));
        assert!(a < 5);
        let spread: std::collections::BTreeSet<usize> =
            (0..64).map(|i| pick(7, &[1, 2], &[i], 5)).collect();
        assert!(spread.len() > 2, "{spread:?}");
    }
}
