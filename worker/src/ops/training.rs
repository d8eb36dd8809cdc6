//! What the training ops share: the loop (resume, checkpoints, metrics,
//! NaN guard, progress), batching and the causal-LM loss.

use std::collections::BTreeMap;

use tch::{Device, Kind, Tensor};

use alignflow_ops::checkpoint_request;
use alignflow_ops::protocol::Metrics;
use alignflow_ops::training::TrainParams;
use alignflow_ops::StageContext;

use super::metrics_log::{finite_or_null, MetricsLog};
use crate::model::{Keep, Model};
use crate::train::per_second;
use crate::train::{
    AdamWConfig, Checkpoints, MicroBatch, ScheduleConfig, StepMetrics, TrainState, Trainer,
    TrainerConfig,
};

/// What a loss closure returns for one micro-batch.
pub struct BatchLoss {
    /// The micro-batch's loss: a weighted mean (scalar, with a graph).
    pub loss: Tensor,
    /// Tokens in the micro-batch, for throughput.
    pub tokens: u64,
    /// The mean's denominator: labelled tokens for a token-level loss,
    /// pairs (or the sum of pair weights) for a per-pair loss. A step's
    /// micro-batches, and data-parallel ranks' shards, count by it (see
    /// [`crate::train::accumulate`]).
    pub weight: f64,
}

/// Loss-computing closure: the model and the example indices of one
/// micro-batch -> its loss.
pub type LossFn<'a> = dyn FnMut(&Model, &[usize]) -> anyhow::Result<BatchLoss> + 'a;

/// Figures of the step just taken, beyond the loop's own (DPO's implicit
/// rewards): called once after each optimizer step; non-finite values are
/// written as null.
pub type StepFiguresFn<'a> = dyn FnMut() -> Vec<(String, f64)> + 'a;

/// Optimizer steps for `examples` examples under `p`: each epoch's
/// micro-batches in steps of `grad_accum`, its last step shorter when they
/// do not divide (as transformers' Trainer and TRL count).
pub fn total_steps(p: &TrainParams, examples: usize) -> u64 {
    let micro_per_epoch = examples.div_ceil(p.batch_size.max(1)) as u64;
    let per_epoch = micro_per_epoch.div_ceil(p.grad_accum.max(1) as u64);
    p.max_steps.unwrap_or(per_epoch * p.epochs as u64).max(1)
}

/// The examples of micro-batch `i` of the step being taken, or `None` once
/// the epoch has run out after its first: a step never reaches into the
/// next epoch, so `epochs: E` is E passes, each example once per pass.
pub fn step_batch(
    state: &mut TrainState,
    i: usize,
    examples: usize,
    batch_size: usize,
    seed: u64,
) -> Option<Vec<usize>> {
    if i > 0 && state.cursor as usize >= examples {
        return None;
    }
    Some(state.next_batch(examples, batch_size, seed))
}

/// Turns activation checkpointing on for a training stage as its
/// `gradient_checkpointing` asks (default: CUDA models over 300M
/// parameters), once its trainable tensors are final.
pub fn set_gradient_checkpointing(model: &mut Model, asked: Option<bool>) {
    let params: i64 = model
        .vs
        .variables()
        .values()
        .map(|t| t.numel() as i64)
        .sum();
    let on =
        alignflow_ops::memory::gradient_checkpointing(asked, model.vs.device().is_cuda(), params);
    if on {
        tracing::info!(
            "gradient checkpointing: each block's activations are recomputed in backward"
        );
    }
    model.set_gradient_checkpointing(on);
}

/// Runs the training loop of a stage: resumes from the stage's latest
/// checkpoint (same fingerprint), reseeds torch per step, writes
/// `metrics.jsonl`, checkpoints every `checkpoint_every` steps and stops
/// with a clear error on a non-finite loss, keeping the last good checkpoint.
///
/// In a data-parallel group ([`crate::dist::group`]) every rank draws the
/// same batch, computes the loss of its share of it and the gradients are
/// averaged over the ranks, so each step is the single-process step on the
/// whole batch; rank 0 alone writes the log, checkpoints and the model.
pub fn run_training(
    ctx: &StageContext<'_>,
    model: &mut Model,
    p: &TrainParams,
    lr: f64,
    examples: usize,
    loss_fn: &mut LossFn<'_>,
) -> anyhow::Result<Metrics> {
    run_training_with_figures(ctx, model, p, lr, examples, loss_fn, &mut Vec::new)
}

/// [`run_training`], adding `step_figures()` to each step's metrics line
/// and reported point.
pub fn run_training_with_figures(
    ctx: &StageContext<'_>,
    model: &mut Model,
    p: &TrainParams,
    lr: f64,
    examples: usize,
    loss_fn: &mut LossFn<'_>,
    step_figures: &mut StepFiguresFn<'_>,
) -> anyhow::Result<Metrics> {
    anyhow::ensure!(
        examples > 0,
        "stage `{}`: no training examples",
        ctx.spec.stage
    );
    let steps = total_steps(p, examples);
    set_gradient_checkpointing(model, p.gradient_checkpointing);
    let mut trainer = Trainer::new(&model.vs, trainer_config(p, lr, ctx.spec.seed), steps)?;
    let group = crate::dist::group();
    let root = group.is_none_or(|g| g.is_root());
    if let Some(g) = group {
        anyhow::ensure!(
            p.batch_size >= g.world(),
            "stage `{}`: data_parallel: {} needs batch_size >= {} (each rank takes a share of every batch), got {}",
            ctx.spec.stage,
            g.world(),
            g.world(),
            p.batch_size
        );
        trainer = trainer.data_parallel(g);
    }
    let checkpoints = Checkpoints::new(ctx.spec.checkpoint_dir.join("train"), 2);
    let resumed = match crate::dist::agreed_checkpoint(
        group,
        &checkpoints,
        crate::dist::CHECKPOINT_PATIENCE,
    )? {
        Some(dir) => {
            trainer.resume(&dir, &mut model.vs)?;
            let step = trainer.state().step;
            tracing::info!(step, "resuming from checkpoint {}", dir.display());
            Some(("step", step))
        }
        None => None,
    };
    if let Some(g) = group {
        // Every rank starts from rank 0's weights: the same checkpoint or
        // the same initialisation, bit for bit.
        crate::dist::broadcast_weights(g, &model.vs)?;
    }
    let mut log = match root {
        true => Some(MetricsLog::open(&ctx.spec.checkpoint_dir, resumed)?),
        false => None,
    };
    let autocast = p.bf16 && model.vs.device().is_cuda();
    let batch_size = p.batch_size.max(1);
    let seed = ctx.spec.seed;
    let start = std::time::Instant::now();
    let start_tokens = trainer.state().tokens_seen;
    let mut last_loss = f64::NAN;
    while !trainer.done() {
        ctx.cancel.check()?;
        let m = trainer.step(|i, state| -> anyhow::Result<MicroBatch> {
            let Some(idx) = step_batch(state, i, examples, batch_size, seed) else {
                // Past the epoch's end: the step is its micro-batches so far.
                return Ok(MicroBatch {
                    loss: tch::Tensor::zeros([], (tch::Kind::Float, model.vs.device())),
                    tokens: 0,
                    weight: 0.0,
                });
            };
            let idx = match group {
                Some(g) => crate::dist::shard(&idx, g.rank(), g.world()).to_vec(),
                None => idx,
            };
            // An epoch's short last batch can leave a rank nothing: it
            // adds nothing (weight 0), and still joins the all-reduce.
            if idx.is_empty() {
                crate::dist::test_fault_point(state.step + 1);
                return Ok(MicroBatch {
                    loss: tch::Tensor::zeros([], (tch::Kind::Float, model.vs.device())),
                    tokens: 0,
                    weight: 0.0,
                });
            }
            let out = crate::train::autocast_if(autocast, || loss_fn(model, &idx))?;
            crate::dist::test_fault_point(state.step + 1);
            Ok(MicroBatch {
                loss: out.loss,
                tokens: out.tokens,
                weight: out.weight,
            })
        })?;
        if !m.loss.is_finite() || !m.grad_norm.is_finite() {
            anyhow::bail!(
                "stage `{}`: step {}: the {} is {} (NaN or inf); stopped, keeping the last good checkpoint",
                ctx.spec.stage,
                m.step,
                if m.loss.is_finite() { "gradient norm" } else { "loss" },
                if m.loss.is_finite() { m.grad_norm } else { m.loss }
            );
        }
        last_loss = m.loss;
        crate::dist::test_dump_grads(&model.vs, m.step)?;
        let (line, point) = step_record(&m, trainer.state().epoch, step_figures());
        if let Some(log) = log.as_mut() {
            if m.step % p.log_every.max(1) == 0 || m.step == steps {
                log.write(&line)?;
                ctx.reporter.metric(&point);
            }
        }
        ctx.reporter
            .progress(m.step, Some(steps), &format!("loss {:.4}", m.loss));
        let periodic = p.checkpoint_every > 0 && m.step % p.checkpoint_every == 0;
        // Asked for: SIGUSR1 before a Slurm time limit, which the engine
        // passes to rank 0, the rank that writes checkpoints.
        let asked = checkpoint_request::take();
        if (periodic || asked) && m.step < steps {
            if let Some(log) = log.as_mut() {
                if asked {
                    tracing::info!(step = m.step, "checkpoint asked for (SIGUSR1): saving");
                }
                // On disk before the checkpoint: a resume keeps the log's
                // lines up to its step and appends from there.
                log.sync()?;
                trainer.save(&checkpoints, &model.vs, serde_json::Value::Null)?;
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let tokens = trainer.state().tokens_seen - start_tokens;
    match log {
        Some(log) => {
            log.publish(ctx)?;
            model.save(&ctx.output("model"))?;
        }
        // The model, the log and the held-out figures are rank 0's to
        // write ([`is_other_rank`]).
        None => {}
    }
    let mut out = Metrics::new();
    out.insert("steps".into(), steps.into());
    out.insert("final_loss".into(), serde_json::json!(last_loss));
    out.insert("tokens".into(), trainer.state().tokens_seen.into());
    out.insert("tokens_per_s".into(), per_second(tokens, secs).into());
    Ok(out)
}

/// Whether this process is a rank other than 0 of a data-parallel stage:
/// its part ends with training, as the stage's outputs (the model, the
/// metrics, the held-out evaluation) are rank 0's alone.
pub fn is_other_rank() -> bool {
    crate::dist::group().is_some_and(|g| !g.is_root())
}

/// The trainer's settings from the training params.
fn trainer_config(p: &TrainParams, lr: f64, seed: u64) -> TrainerConfig {
    TrainerConfig {
        optimizer: AdamWConfig {
            betas: p.betas,
            eps: p.eps,
            weight_decay: p.weight_decay,
            ..Default::default()
        },
        schedule: ScheduleConfig {
            lr,
            warmup_steps: p.warmup_steps,
            decay: p.schedule.into(),
            min_lr_ratio: p.min_lr_ratio,
        },
        max_grad_norm: p.grad_clip,
        accum_steps: p.grad_accum.max(1),
        skip_nonfinite: false,
        seed,
    }
}

/// A step's `metrics.jsonl` line (`figures` non-finite as null) and its
/// reported point.
fn step_record(
    m: &StepMetrics,
    epoch: u64,
    figures: Vec<(String, f64)>,
) -> (serde_json::Value, BTreeMap<String, f64>) {
    let mut line = serde_json::json!({
        "step": m.step, "loss": m.loss, "lr": m.lr, "grad_norm": m.grad_norm,
        "tokens": m.tokens, "tokens_per_s": m.tokens_per_s, "epoch": epoch,
    });
    let mut point: BTreeMap<String, f64> = [
        ("step", m.step as f64),
        ("loss", m.loss),
        ("lr", m.lr),
        ("grad_norm", m.grad_norm),
        ("tokens_per_s", m.tokens_per_s),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    for (k, v) in figures {
        line[&k] = finite_or_null(v);
        point.insert(k, v);
    }
    (line, point)
}

/// Right-pads token rows into ids, a 0/1 mask and labels (`-100` where no
/// loss applies: padding and, via `loss_from`, each row's prompt).
///
/// # Shapes
/// -> three `[rows, max_len]` int64 tensors.
pub fn right_pad(rows: &[(&[i64], usize)], pad: i64, device: Device) -> (Tensor, Tensor, Tensor) {
    let labelled: Vec<Vec<bool>> = rows
        .iter()
        .map(|(r, loss_from)| (0..r.len()).map(|i| i >= *loss_from).collect())
        .collect();
    let rows: Vec<(&[i64], &[bool])> = rows
        .iter()
        .zip(&labelled)
        .map(|((r, _), l)| (*r, l.as_slice()))
        .collect();
    right_pad_labelled(&rows, pad, device)
}

/// [`right_pad`] with the labelled tokens of each row given one by one
/// (e.g. every assistant turn of a conversation).
pub fn right_pad_labelled(
    rows: &[(&[i64], &[bool])],
    pad: i64,
    device: Device,
) -> (Tensor, Tensor, Tensor) {
    let len = rows.iter().map(|(r, _)| r.len()).max().unwrap_or(0);
    let (mut ids, mut mask, mut labels) = (Vec::new(), Vec::new(), Vec::new());
    for (r, labelled) in rows {
        for (&t, &l) in r.iter().zip(labelled.iter()) {
            ids.push(t);
            mask.push(1i64);
            labels.push(if l { t } else { -100 });
        }
        for _ in r.len()..len {
            ids.push(pad);
            mask.push(0);
            labels.push(-100);
        }
    }
    let shape = [rows.len() as i64, len as i64];
    let t = |v: Vec<i64>| Tensor::from_slice(&v).view(shape).to_device(device);
    (t(ids), t(mask), t(labels))
}

/// Next-token log-probs of the labelled targets (float32, computed in
/// chunks of positions: see [`crate::model::TokenLogprobs`]) at the
/// positions where some row has a labelled target: from the one before the
/// first labelled token of any row to the end, so the last block and the LM
/// head skip a prompt prefix every row masks. Also the targets (`-100`
/// where unlabelled; the log-prob there is of token 0 and counts for
/// nothing). `None` for one-token rows (nothing is predicted).
///
/// # Shapes
/// `ids`, `mask`, `labels`: `[b, t]` -> `([b, s], [b, s])`.
pub fn labelled_logprobs(
    model: &Model,
    ids: &Tensor,
    mask: &Tensor,
    labels: &Tensor,
    train: bool,
) -> Option<(Tensor, Tensor)> {
    let t = ids.size()[1];
    if t < 2 {
        return None;
    }
    // Position p predicts token p + 1. With no labelled token at all, every
    // position (the loss is then a mean over nothing).
    let labelled = labels.narrow(1, 1, t - 1).ne(-100).any_dim(0, false);
    let first = if labelled.any().int64_value(&[]) == 1 {
        labelled
            .to_kind(Kind::Int64)
            .argmax(0, false)
            .int64_value(&[])
    } else {
        0
    };
    let span = t - 1 - first;
    let hidden = model.lm.hidden_kept(
        ids,
        mask,
        Keep::Span {
            start: first,
            len: span,
        },
        train,
    );
    let targets = labels.narrow(1, first + 1, span);
    let logp = model
        .lm
        .token_logprobs(&hidden, &targets.clamp_min(0), 1.0, false)
        .logp;
    Some((logp, targets))
}

/// Mean next-token cross-entropy over the labelled positions.
///
/// # Shapes
/// `ids`, `mask`, `labels`: `[b, t]` -> scalar loss; also the count of
/// labelled target tokens.
pub fn causal_lm_loss(
    model: &Model,
    ids: &Tensor,
    mask: &Tensor,
    labels: &Tensor,
    train: bool,
) -> (Tensor, u64) {
    let Some((logp, targets)) = labelled_logprobs(model, ids, mask, labels, train) else {
        // Nothing is predicted: the mean over no tokens, as cross-entropy gives.
        return (Tensor::from(f32::NAN).to_device(ids.device()), 0);
    };
    let counted = targets.ne(-100);
    let count = counted.sum(Kind::Int64).int64_value(&[]) as u64;
    let total = logp
        .where_self(&counted, &logp.zeros_like())
        .sum(Kind::Float);
    (-total / count as f64, count)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every micro-batch a run of `p` over `examples` draws, step by step.
    fn drawn(p: &TrainParams, examples: usize) -> Vec<Vec<Vec<usize>>> {
        let mut state = TrainState::default();
        (0..total_steps(p, examples))
            .map(|_| {
                (0..p.grad_accum)
                    .map_while(|i| step_batch(&mut state, i, examples, p.batch_size, 7))
                    .collect()
            })
            .collect()
    }

    /// 10 examples, batches of 4, 2 accumulated: 2 steps an epoch, the
    /// second of one micro-batch (2 examples); each example once a pass,
    /// as transformers' Trainer counts (before: 14 examples a "pass").
    #[test]
    fn accumulation_never_reaches_into_the_next_epoch() {
        let mut p: TrainParams = serde_json::from_value(serde_json::json!({})).unwrap();
        p.batch_size = 4;
        p.grad_accum = 2;
        for epochs in [1usize, 3] {
            p.epochs = epochs;
            let steps = drawn(&p, 10);
            assert_eq!(steps.len(), 2 * epochs);
            for pass in steps.chunks(2) {
                let sizes: Vec<Vec<usize>> = pass
                    .iter()
                    .map(|s| s.iter().map(Vec::len).collect())
                    .collect();
                assert_eq!(sizes, [vec![4, 4], vec![2]]);
                let mut seen: Vec<usize> = pass.iter().flatten().flatten().copied().collect();
                seen.sort();
                assert_eq!(seen, (0..10).collect::<Vec<_>>());
            }
        }
    }
}
