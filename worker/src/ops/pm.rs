//! `pm.train` and `pm.pretrain`: a transformer with a scalar reward head on
//! the last real token, trained with the soft-label Bradley-Terry loss
//! (docs/DESIGN.md §1, step 4), then evaluated on held-out pairs.
//!
//! Both ops share everything but where their pairs come from: `pm.pretrain`
//! reads one `data` file (HH comparisons or rankings); `pm.train` reads
//! `comparisons` and the optional `extra`, weighted per set by `mix`, and
//! holds out the optional `eval` input or `eval_fraction` of its records.

mod data;
mod eval;
mod loss;

use std::path::Path;

use anyhow::Context;
use tch::{Device, Tensor};

use alignflow_ops::protocol::Metrics;
use alignflow_ops::text::Tokenizer;
use alignflow_ops::{
    ChatFormat, PmParams, PmPretrainParams, PmTrainParams, StageContext, PM_TRAIN_SETS,
};

use super::examples::{held_out, TextFormat};
use super::load::{self, eos_id};
use super::metrics_log::write_held_out_eval;
use super::training::{is_other_rank, run_training, BatchLoss};
use crate::model::{self, Head, Model};

pub use data::{pair_sequences, read_records, Encoder, Pair, Record, Side};
pub use eval::{figures, pair_loss, sigmoid, Bin, Figures, BINS};
pub use loss::{pair_rewards, soft_bt_loss};

/// A loaded preference model and its text encoding.
struct Loaded {
    model: Model,
    tokenizer: Tokenizer,
    chat: Option<ChatFormat>,
    eos: Option<i64>,
    max_len: usize,
    device: Device,
}

impl Loaded {
    /// How this model's pairs are tokenized.
    fn encoder(&self) -> Encoder<'_> {
        Encoder {
            format: TextFormat::new(&self.tokenizer, self.chat.as_ref()),
            eos: self.eos,
            stop_ids: load::stop_ids(&self.tokenizer, &self.model),
            max_len: self.max_len,
        }
    }
}

/// Loads `model` with the reward head (fresh on a plain LM, kept on a PM).
/// With LoRA the head trains beside the adapters.
fn load(ctx: &StageContext<'_>, c: &PmParams) -> anyhow::Result<Loaded> {
    let device = model::device(&ctx.spec.device)?;
    let dir = ctx.input("model")?;
    let tokenizer = Tokenizer::from_dir(dir)?;
    // A fresh reward head (and LoRA adapters) draw from torch's generator:
    // `trainable` seeds it so the stage is a function of its fingerprint.
    let model = load::trainable(
        &ctx.spec.stage,
        dir,
        device,
        Head::Reward,
        c.lora.as_ref(),
        ctx.spec.seed,
        tch::Kind::Float,
    )?;
    if c.lora.is_some() {
        for (name, t) in model.vs.variables() {
            if name.starts_with("score.") {
                let _ = t.set_requires_grad(true);
            }
        }
    }
    let eos = if c.append_eos {
        let id = eos_id(&tokenizer, &model).context("append_eos: the model has no EOS token")?;
        Some(id)
    } else {
        None
    };
    let max_len = c.max_len.min(model.lm.cfg.max_positions) as usize;
    Ok(Loaded {
        model,
        tokenizer,
        chat: load::chat_format(ctx, c.chat_template, dir)?,
        eos,
        max_len,
        device,
    })
}

/// Margins `rA - rB` of `pairs` under `model` in eval mode, in batches of
/// `batch` pairs.
pub fn margins(model: &Model, pairs: &[Pair], batch: usize, device: Device) -> Vec<f64> {
    let mut out = Vec::with_capacity(pairs.len());
    tch::no_grad(|| {
        for chunk in pairs.chunks(batch.max(1)) {
            let a: Vec<&[i64]> = chunk.iter().map(|p| p.a.as_slice()).collect();
            let b: Vec<&[i64]> = chunk.iter().map(|p| p.b.as_slice()).collect();
            let (ra, rb, _) = pair_rewards(model, &a, &b, device, false);
            let d = (ra - rb).to_kind(tch::Kind::Double).to_device(Device::Cpu);
            out.extend(Vec::<f64>::try_from(&d).expect("margins"));
        }
    });
    out
}

/// Trains on `train`, evaluates on `held_out`, writes the outputs.
fn train_and_evaluate(
    ctx: &StageContext<'_>,
    c: &PmParams,
    mut m: Loaded,
    train: Vec<Pair>,
    held_out: Vec<Pair>,
    eval_source: &str,
) -> anyhow::Result<Metrics> {
    let device = m.device;
    let mut loss_fn = |model: &Model, idx: &[usize]| -> anyhow::Result<BatchLoss> {
        let a: Vec<&[i64]> = idx.iter().map(|&i| train[i].a.as_slice()).collect();
        let b: Vec<&[i64]> = idx.iter().map(|&i| train[i].b.as_slice()).collect();
        let p: Vec<f64> = idx.iter().map(|&i| train[i].p).collect();
        let w: Vec<f64> = idx.iter().map(|&i| train[i].weight).collect();
        let (ra, rb, tokens) = pair_rewards(model, &a, &b, device, c.dropout);
        let p = Tensor::from_slice(&p).to_device(device);
        // The loss is a weighted mean: its denominator is the sum of the
        // weights (floored as `soft_bt_loss` floors it).
        let weight = w.iter().sum::<f64>().max(1e-12);
        let w = Tensor::from_slice(&w).to_device(device);
        Ok(BatchLoss {
            loss: soft_bt_loss(&ra, &rb, &p, Some(&w)),
            tokens,
            weight,
        })
    };
    let n = train.len();
    let mut metrics = run_training(ctx, &mut m.model, &c.train, c.lr, n, &mut loss_fn)?;
    metrics.insert("train_pairs".into(), n.into());
    if is_other_rank() {
        return Ok(metrics);
    }

    // The model is now what `run_training` saved (LoRA merged).
    ctx.reporter
        .progress(0, Some(held_out.len() as u64), "evaluating");
    let d = margins(&m.model, &held_out, c.train.batch_size, device);
    let labels: Vec<f64> = held_out.iter().map(|p| p.p).collect();
    let f = figures(&d, &labels);
    let report = serde_json::json!({
        "source": eval_source,
        "figures": f,
        "definitions": {
            "accuracy": "over pairs with p != 0.5: fraction where rA > rB agrees with p > 0.5 (a tie rA == rB counts as wrong)",
            "mean_margin": "mean of rA - rB over all pairs, A = chosen / response_a",
            "ece": "each pair enters as (q, p) and (1 - q, 1 - p), q = sigmoid(rA - rB); 10 equal-width bins of q on [0, 1]; sum over bins of n_k / 2N * |mean q - mean p|",
        },
    });
    let named = [
        ("eval_accuracy", f.accuracy),
        ("eval_mean_margin", f.mean_margin),
        ("eval_mean_abs_margin", f.mean_abs_margin),
        ("eval_loss", f.loss),
        ("eval_ece", f.ece),
    ];
    let eval_figures = named
        .into_iter()
        .map(|(k, v)| (k.to_string(), serde_json::json!(v)))
        .collect();
    write_held_out_eval(ctx, &mut metrics, &report, f.pairs, eval_figures)?;
    Ok(metrics)
}

fn flatten(records: Vec<Record>) -> Vec<Pair> {
    records.into_iter().flatten().collect()
}

/// `pm.train`.
pub fn run_train(ctx: &StageContext<'_>) -> anyhow::Result<Metrics> {
    let p: PmTrainParams = ctx.params()?;
    let c = &p.pm;
    let m = load(ctx, c)?;
    let enc = m.encoder();
    let stage = ctx.spec.stage.as_str();
    let mut records = Vec::new();
    for set in PM_TRAIN_SETS {
        let Some(path) = ctx.spec.inputs.get(set) else {
            continue;
        };
        let weight = p.weight(set);
        if weight == 0.0 {
            tracing::info!("`{set}` has mix weight 0: not read");
            continue;
        }
        records.extend(read_records(stage, path, &enc, weight)?);
    }
    let eval = match ctx.spec.inputs.get("eval") {
        Some(path) => Some(read_records(stage, path, &enc, 1.0)?),
        None => None,
    };
    let (train, held_out, source) = held_out(
        records,
        eval,
        c.eval_fraction,
        ctx.spec.seed,
        "training records",
    );
    let mut notes = Metrics::new();
    enc.format.report(stage, &mut notes);
    let mut metrics = train_and_evaluate(ctx, c, m, flatten(train), flatten(held_out), &source)?;
    metrics.extend(notes);
    Ok(metrics)
}

/// `pm.pretrain`.
pub fn run_pretrain(ctx: &StageContext<'_>) -> anyhow::Result<Metrics> {
    let p: PmPretrainParams = ctx.params()?;
    let c = &p.pm;
    let m = load(ctx, c)?;
    let enc = m.encoder();
    let data: &Path = ctx.input("data")?;
    let records = read_records(&ctx.spec.stage, data, &enc, 1.0)?;
    let (tr, te, source) = held_out(records, None, c.eval_fraction, ctx.spec.seed, "records");
    let mut notes = Metrics::new();
    enc.format.report(&ctx.spec.stage, &mut notes);
    let mut metrics = train_and_evaluate(ctx, c, m, flatten(tr), flatten(te), &source)?;
    metrics.extend(notes);
    Ok(metrics)
}
