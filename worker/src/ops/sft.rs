//! `sft`: supervised fine-tuning on (prompt, response) records; the loss
//! covers response tokens only. Full fine-tuning or LoRA (merged on export).

use anyhow::Context;
use tch::Tensor;

use alignflow_ops::data::read_jsonl;
use alignflow_ops::protocol::Metrics;
use alignflow_ops::text::{apply_template, Tokenizer};
use alignflow_ops::{SftParams, StageContext};

use super::examples::tokenize_example;
use super::load::{self, eos_id};
use super::training::{causal_lm_loss, right_pad, run_training};
use crate::model::{self, Head, Model};

pub fn run(ctx: &StageContext<'_>) -> anyhow::Result<Metrics> {
    let p: SftParams = ctx.params()?;
    let device = model::device(&ctx.spec.device)?;
    let model_dir = ctx.input("model")?;
    let tokenizer = Tokenizer::from_dir(model_dir)?;
    let mut model = load::trainable(model_dir, device, Head::Lm, p.lora.as_ref(), ctx.spec.seed)?;
    let eos = p.append_eos.then(|| eos_id(&tokenizer, &model)).flatten();
    if p.append_eos {
        eos.context("append_eos: the model has no EOS token")?;
    }
    let max_len = (p.max_len.min(model.lm.cfg.max_positions)) as usize;

    let data = ctx.input("data")?;
    let mut examples = Vec::new();
    for (line, record) in read_jsonl::<serde_json::Value>(data)? {
        let record = record.map_err(|e| {
            anyhow::anyhow!("stage `{}`: {}:{line}: {e}", ctx.spec.stage, data.display())
        })?;
        let field = |name: &str| -> anyhow::Result<String> {
            record[name].as_str().map(str::to_string).with_context(|| {
                format!(
                    "stage `{}`: {}:{line}: no string field `{name}`",
                    ctx.spec.stage,
                    data.display()
                )
            })
        };
        let prompt = apply_template(&p.template, &field(&p.prompt_field)?);
        examples.push(tokenize_example(
            &tokenizer,
            &prompt,
            &field(&p.response_field)?,
            eos,
            max_len,
        )?);
    }
    let pad = model.lm.cfg.pad_id();
    let mut loss_fn = |m: &Model, idx: &[usize]| -> anyhow::Result<(Tensor, u64)> {
        let rows: Vec<(&[i64], usize)> = idx
            .iter()
            .map(|&i| (examples[i].tokens.as_slice(), examples[i].response_start))
            .collect();
        let (ids, mask, labels) = right_pad(&rows, pad, device);
        Ok(causal_lm_loss(m, &ids, &mask, &labels, p.dropout))
    };
    let n = examples.len();
    let mut metrics = run_training(ctx, &mut model, &p.train, p.lr, n, &mut loss_fn)?;
    metrics.insert("examples".into(), n.into());
    Ok(metrics)
}
