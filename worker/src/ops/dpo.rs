//! `dpo.reference` and `dpo`: Direct Preference Optimization and IPO with
//! soft labels (the math and its derivation: `alignflow_ops::dpo`).
//!
//! `dpo.reference` scores every pair once under the frozen reference and
//! writes the sums to `reference_logps`; `dpo` reads them (checking that they
//! belong to the same tokenized pairs) and trains the policy through the
//! shared trainer (resume, schedule, clipping, accumulation), logging the
//! implicit rewards `beta * (logpi - logref)` per step, then evaluates them
//! on held-out pairs. The reference stays an artifact with LoRA too: it is
//! cached, so the base model with adapters off would only recompute it.

mod data;
mod loss;

use std::cell::RefCell;
use std::collections::BTreeMap;

use anyhow::Context;
use tch::{Device, Kind, Tensor};

use alignflow_ops::protocol::Metrics;
use alignflow_ops::text::Tokenizer;
use alignflow_ops::{DpoLoss, DpoParams, DpoReferenceParams, StageContext};

use super::examples::{held_out, TextFormat};
use super::load::{self, eos_id};
use super::metrics_log::{finite_or_null, write_held_out_eval};
use super::training::{is_other_rank, run_training_with_figures, BatchLoss};
use crate::model::{self, Head, Model};

pub use data::{
    attach_reference, read_pairs, read_reference, write_reference, DpoPair, RefLogps, Settings,
};
pub use loss::{dpo_losses, response_logps, scored_tokens};

/// The comparison inputs `dpo.reference` scores, in output order.
const SETS: [&str; 2] = ["comparisons", "eval"];

/// `dpo.reference`.
pub fn run_reference(ctx: &StageContext<'_>) -> anyhow::Result<Metrics> {
    let p: DpoReferenceParams = ctx.params()?;
    let stage = ctx.spec.stage.as_str();
    let device = model::device(&ctx.spec.device)?;
    let (tokenizer, model) = load::language_model(ctx.input("model")?, device, p.dtype)?;
    let eos =
        if p.append_eos {
            Some(eos_id(&tokenizer, &model).with_context(|| {
                format!("stage `{stage}`: append_eos: the model has no EOS token")
            })?)
        } else {
            None
        };
    let max_len = p.max_len.min(model.lm.cfg.max_positions) as usize;
    let chat = load::chat_format(ctx, p.chat_template, ctx.input("model")?)?;
    let format = TextFormat::new(&tokenizer, chat.as_ref());
    let eos = format.response_eos(eos);
    let mut lines = Vec::new();
    let mut counts = BTreeMap::new();
    let mut metrics = Metrics::new();
    for set in SETS {
        let Some(path) = ctx.spec.inputs.get(set) else {
            continue;
        };
        let pairs: Vec<DpoPair> = read_pairs(stage, path, &format, eos, max_len)?
            .into_iter()
            .flatten()
            .collect();
        counts.insert(set.to_string(), pairs.len());
        let (mut sum_a, mut sum_b) = (0.0, 0.0);
        for (i, chunk) in pairs.chunks(p.batch_size.max(1)).enumerate() {
            ctx.cancel.check()?;
            let (a, b) = tch::no_grad(|| pair_logps(&model, chunk, device, false)).0;
            let (a, b) = (to_vec(&a), to_vec(&b));
            for (k, pair) in chunk.iter().enumerate() {
                sum_a += a[k];
                sum_b += b[k];
                lines.push(RefLogps {
                    set: set.to_string(),
                    line: pair.line,
                    pair: pair.pair,
                    chosen: a[k],
                    rejected: b[k],
                    chosen_tokens: scored_tokens(pair.chosen.len(), pair.chosen_start),
                    rejected_tokens: scored_tokens(pair.rejected.len(), pair.rejected_start),
                    digest: pair.digest(),
                });
            }
            ctx.reporter.progress(
                ((i + 1) * p.batch_size).min(pairs.len()) as u64,
                Some(pairs.len() as u64),
                set,
            );
        }
        let n = pairs.len().max(1) as f64;
        metrics.insert(format!("{set}_pairs"), pairs.len().into());
        metrics.insert(format!("{set}_mean_chosen_logp"), (sum_a / n).into());
        metrics.insert(format!("{set}_mean_rejected_logp"), (sum_b / n).into());
    }
    let settings = Settings {
        max_len,
        eos,
        pairs: counts,
        definition: "per pair: `chosen` / `rejected` = sum of the reference's log-probs of the response tokens (and EOS) of A / B, prompt masked; `*_tokens` = tokens summed; `digest` = FNV-1a 64 of the scored token rows and response starts".into(),
    };
    format.report(stage, &mut metrics);
    std::fs::create_dir_all(&ctx.spec.out_dir)?;
    write_reference(&ctx.output("reference_logps"), &settings, &lines)?;
    Ok(metrics)
}

/// The (A, B) response log-prob sums of `pairs` in one forward of `2n` rows
/// (A rows first), and the count of real tokens.
///
/// # Shapes
/// -> (`[n]`, `[n]`) float32.
fn pair_logps(
    m: &Model,
    pairs: &[DpoPair],
    device: Device,
    train: bool,
) -> ((Tensor, Tensor), u64) {
    let n = pairs.len() as i64;
    let rows: Vec<(&[i64], usize)> = pairs
        .iter()
        .map(|p| (p.chosen.as_slice(), p.chosen_start))
        .chain(
            pairs
                .iter()
                .map(|p| (p.rejected.as_slice(), p.rejected_start)),
        )
        .collect();
    let (lp, tokens) = response_logps(m, &rows, device, train);
    ((lp.narrow(0, 0, n), lp.narrow(0, n, n)), tokens)
}

fn to_vec(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(&t.to_kind(Kind::Double)).expect("a float vector")
}

/// A pair with its reference log-probs and its training label.
struct Example {
    pair: DpoPair,
    ref_a: f64,
    ref_b: f64,
    /// `p` after `label_smoothing`.
    q: f64,
}

/// Sums of the per-pair implicit-reward figures of a step or an evaluation.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct RewardSums {
    pub pairs: usize,
    /// Pairs with `p != 0.5`.
    pub decisive: usize,
    /// Decisive pairs whose margin has the label's sign (a tie is wrong).
    pub correct: usize,
    pub chosen: f64,
    pub rejected: f64,
    pub loss: f64,
}

impl RewardSums {
    /// Adds pairs: implicit rewards `beta*(logpi - logref)` of A and B, the
    /// raw label `p` and the per-pair loss.
    pub fn add(&mut self, r_a: &[f64], r_b: &[f64], p: &[f64], loss: &[f64]) {
        for i in 0..r_a.len() {
            self.pairs += 1;
            self.chosen += r_a[i];
            self.rejected += r_b[i];
            self.loss += loss[i];
            if p[i] != 0.5 {
                self.decisive += 1;
                let m = r_a[i] - r_b[i];
                if (p[i] > 0.5 && m > 0.0) || (p[i] < 0.5 && m < 0.0) {
                    self.correct += 1;
                }
            }
        }
    }

    /// These sums added up over the ranks of a data-parallel group, so the
    /// step's figures are the whole batch's, not rank 0's share.
    pub fn summed_over(
        &self,
        group: &crate::dist::Group,
    ) -> Result<RewardSums, crate::dist::DistError> {
        let s = group.sum_f64(&[
            self.pairs as f64,
            self.decisive as f64,
            self.correct as f64,
            self.chosen,
            self.rejected,
            self.loss,
        ])?;
        Ok(RewardSums {
            pairs: s[0] as usize,
            decisive: s[1] as usize,
            correct: s[2] as usize,
            chosen: s[3],
            rejected: s[4],
            loss: s[5],
        })
    }

    /// Named means (NaN, written `null`, where nothing counted).
    pub fn figures(&self, prefix: &str) -> Vec<(String, f64)> {
        let n = self.pairs as f64;
        let name = |s: &str| format!("{prefix}{s}");
        vec![
            (
                name("reward_accuracy"),
                self.correct as f64 / self.decisive as f64,
            ),
            (name("margin"), (self.chosen - self.rejected) / n),
            (name("chosen_reward"), self.chosen / n),
            (name("rejected_reward"), self.rejected / n),
            (name("loss"), self.loss / n),
        ]
    }
}

/// Implicit rewards and losses of `examples` under the policy (no graph).
fn evaluate(m: &Model, examples: &[Example], p: &DpoParams, device: Device) -> RewardSums {
    let mut sums = RewardSums::default();
    for chunk in examples.chunks(p.train.batch_size.max(1)) {
        let pairs: Vec<DpoPair> = chunk.iter().map(|e| e.pair.clone()).collect();
        let ((a, b), _) = tch::no_grad(|| pair_logps(m, &pairs, device, false));
        let refs: Vec<&Example> = chunk.iter().collect();
        let (_, (r_a, r_b, raw, l)) = batch_losses(&a, &b, &refs, p, device);
        sums.add(&r_a, &r_b, &raw, &l);
    }
    sums
}

/// The per-pair losses of a batch (with its graph) and its detached figures:
/// (reward A, reward B, raw p, loss) per pair.
fn batch_losses(
    pi_a: &Tensor,
    pi_b: &Tensor,
    batch: &[&Example],
    p: &DpoParams,
    device: Device,
) -> (Tensor, (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>)) {
    let col = |f: &dyn Fn(&Example) -> f64| {
        Tensor::from_slice(&batch.iter().map(|e| f(e)).collect::<Vec<f64>>())
            .to_kind(Kind::Float)
            .to_device(device)
    };
    let (mut ref_a, mut ref_b, q) = (col(&|e| e.ref_a), col(&|e| e.ref_b), col(&|e| e.q));
    let mut pi_a = pi_a.to_kind(Kind::Float);
    let mut pi_b = pi_b.to_kind(Kind::Float);
    if p.loss == DpoLoss::Ipo {
        // IPO compares mean log-probs per response token, as TRL does: its
        // margin target 1/(2 beta) holds whatever the responses' lengths.
        let n_a = col(&|e| scored_tokens(e.pair.chosen.len(), e.pair.chosen_start) as f64);
        let n_b = col(&|e| scored_tokens(e.pair.rejected.len(), e.pair.rejected_start) as f64);
        pi_a = pi_a / &n_a;
        ref_a = ref_a / &n_a;
        pi_b = pi_b / &n_b;
        ref_b = ref_b / &n_b;
    }
    let losses = dpo_losses(&pi_a, &pi_b, &ref_a, &ref_b, &q, p.beta, p.loss);
    let r_a = to_vec(&((pi_a.detach() - &ref_a) * p.beta));
    let r_b = to_vec(&((pi_b.detach() - &ref_b) * p.beta));
    let raw = batch.iter().map(|e| e.pair.p).collect();
    let l = to_vec(&losses.detach());
    (losses, (r_a, r_b, raw, l))
}

fn examples(records: Vec<Vec<(DpoPair, f64, f64)>>, p: &DpoParams) -> Vec<Example> {
    records
        .into_iter()
        .flatten()
        .map(|(pair, ref_a, ref_b)| Example {
            q: p.smoothed(pair.p),
            pair,
            ref_a,
            ref_b,
        })
        .collect()
}

/// `dpo`.
pub fn run(ctx: &StageContext<'_>) -> anyhow::Result<Metrics> {
    let p: DpoParams = ctx.params()?;
    let stage = ctx.spec.stage.as_str();
    let device = model::device(&ctx.spec.device)?;
    let (settings, reference) = read_reference(stage, ctx.input("reference_logps")?)?;

    let dir = ctx.input("policy")?;
    let tokenizer = Tokenizer::from_dir(dir)?;
    let mut model = load::trainable(
        &ctx.spec.stage,
        dir,
        device,
        Head::Lm,
        p.lora.as_ref(),
        ctx.spec.seed,
        tch::Kind::Float,
    )?;
    anyhow::ensure!(
        settings.max_len as i64 <= model.lm.cfg.max_positions,
        "stage `{stage}`: `reference_logps` was computed with max_len {} but the policy has {} positions: lower dpo.reference's `max_len`",
        settings.max_len,
        model.lm.cfg.max_positions
    );

    let chat = load::chat_format(ctx, p.chat_template, dir)?;
    let format = TextFormat::new(&tokenizer, chat.as_ref());
    let read = |set: &str| -> anyhow::Result<Option<Vec<Vec<(DpoPair, f64, f64)>>>> {
        let Some(path) = ctx.spec.inputs.get(set) else {
            return Ok(None);
        };
        let recs = read_pairs(stage, path, &format, settings.eos, settings.max_len)?;
        attach_reference(stage, set, path, recs, &reference).map(Some)
    };
    let records = read("comparisons")?.expect("a required input");
    let (train, held_out, source) = held_out(
        records,
        read("eval")?,
        p.eval_fraction,
        ctx.spec.seed,
        "comparison records",
    );
    let train = examples(train, &p);
    let held_out = examples(held_out, &p);
    anyhow::ensure!(!train.is_empty(), "stage `{stage}`: no training pairs");

    let mut metrics = train_policy(ctx, &mut model, &p, &train, device)?;
    if is_other_rank() {
        return Ok(metrics);
    }
    metrics.insert("pairs".into(), train.len().into());
    format.report(stage, &mut metrics);

    // Held-out implicit rewards of the trained policy (as saved: LoRA merged).
    ctx.reporter
        .progress(0, Some(held_out.len() as u64), "evaluating");
    let sums = evaluate(&model, &held_out, &p, device);
    let figures: BTreeMap<String, f64> = sums.figures("").into_iter().collect();
    let report = serde_json::json!({
        "source": source,
        "pairs": sums.pairs,
        "decisive_pairs": sums.decisive,
        "figures": figures.iter().map(|(k, v)| (k.clone(), finite_or_null(*v))).collect::<serde_json::Map<_, _>>(),
        "definitions": {
            "reward": "implicit reward beta * (logpi - logref) of a response, log-probs summed over its tokens (prompt masked)",
            "reward_accuracy": "over pairs with p != 0.5: fraction whose reward margin (A minus B) has the label's sign (a tie counts as wrong)",
            "margin": "mean reward of A minus reward of B, A = chosen / response_a",
            "loss": "the training loss (loss, beta, label_smoothing) averaged over the pairs",
        },
    });
    let eval_figures = sums
        .figures("eval_")
        .into_iter()
        .map(|(k, v)| (k, finite_or_null(v)))
        .collect();
    write_held_out_eval(ctx, &mut metrics, &report, sums.pairs, eval_figures)?;
    Ok(metrics)
}

/// Trains the policy in the shared loop ([`run_training_with_figures`]), with each
/// step's implicit-reward figures (accuracy, margin, chosen and rejected
/// rewards) in `metrics.jsonl`: the loss closure adds each micro-batch to
/// the step's sums, the figures closure reads and resets them.
fn train_policy(
    ctx: &StageContext<'_>,
    model: &mut Model,
    p: &DpoParams,
    train: &[Example],
    device: Device,
) -> anyhow::Result<Metrics> {
    let sums = RefCell::new(RewardSums::default());
    let mut loss_fn = |m: &Model, idx: &[usize]| -> anyhow::Result<BatchLoss> {
        let batch: Vec<&Example> = idx.iter().map(|&i| &train[i]).collect();
        let pairs: Vec<DpoPair> = batch.iter().map(|e| e.pair.clone()).collect();
        let ((a, b), tokens) = pair_logps(m, &pairs, device, p.dropout);
        let (losses, (ra, rb, raw, l)) = batch_losses(&a, &b, &batch, p, device);
        sums.borrow_mut().add(&ra, &rb, &raw, &l);
        Ok(BatchLoss {
            loss: losses.mean(Kind::Float),
            tokens,
            weight: batch.len() as f64,
        })
    };
    // The step's mean loss comes from the loop; the rest from the sums.
    let mut figures = || {
        let mut step = std::mem::take(&mut *sums.borrow_mut());
        if let Some(g) = crate::dist::group() {
            // A failed collective fails the next step's too: the figures
            // of this one fall back to this rank's share meanwhile.
            match step.summed_over(g) {
                Ok(all) => step = all,
                Err(e) => tracing::warn!("figures of this rank's share only: {e}"),
            }
        }
        step.figures("")
            .into_iter()
            .filter(|(k, _)| k != "loss")
            .collect()
    };
    run_training_with_figures(
        ctx,
        model,
        &p.train,
        p.lr,
        train.len(),
        &mut loss_fn,
        &mut figures,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reward_sums_count_ties_as_wrong_and_skip_even_labels() {
        let mut s = RewardSums::default();
        s.add(
            &[1.0, 0.0, 2.0, -1.0],
            &[0.0, 0.0, 1.0, 0.5],
            &[1.0, 1.0, 0.5, 0.0],
            &[0.1, 0.2, 0.3, 0.4],
        );
        assert_eq!((s.pairs, s.decisive, s.correct), (4, 3, 2));
        let f: BTreeMap<String, f64> = s.figures("eval_").into_iter().collect();
        assert!((f["eval_reward_accuracy"] - 2.0 / 3.0).abs() < 1e-12);
        assert!((f["eval_margin"] - (2.0 - 1.5) / 4.0).abs() < 1e-12);
        assert!((f["eval_chosen_reward"] - 0.5).abs() < 1e-12);
        assert!((f["eval_rejected_reward"] - 0.375).abs() < 1e-12);
        assert!((f["eval_loss"] - 0.25).abs() < 1e-12);
        assert!(RewardSums::default().figures("")[0].1.is_nan());
    }
}
