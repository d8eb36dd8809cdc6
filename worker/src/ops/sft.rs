//! `sft`: supervised fine-tuning on (prompt, response) records; the loss
//! covers response tokens only. Full fine-tuning or LoRA (merged on export).

use anyhow::Context;
use tch::Tensor;

use alignflow_ops::data::read_jsonl;
use alignflow_ops::protocol::Metrics;
use alignflow_ops::text::{apply_template, Tokenizer};
use alignflow_ops::{SftParams, StageContext};

use super::common::{causal_lm_loss, right_pad, run_training};
use crate::model::{self, BuildOptions, Head, LoraConfig, Model};

/// One tokenized example: the tokens and where the response starts.
pub struct Example {
    pub tokens: Vec<i64>,
    pub response_start: usize,
}

/// Tokenizes `prompt` + `response` (+ EOS), truncated to `max_len` by
/// dropping the prompt's beginning first, then the response's end.
pub fn tokenize_example(
    tokenizer: &Tokenizer,
    prompt: &str,
    response: &str,
    eos: Option<i64>,
    max_len: usize,
) -> anyhow::Result<Example> {
    let mut p = tokenizer.encode(prompt)?;
    let mut r = tokenizer.encode(response)?;
    if let Some(e) = eos {
        r.push(e);
    }
    // Keep at least half the budget for the response.
    let r_keep = r
        .len()
        .min(max_len.saturating_sub(p.len().min(max_len / 2)));
    r.truncate(r_keep.max(1).min(r.len()));
    let p_keep = max_len.saturating_sub(r.len()).min(p.len());
    p.drain(..p.len() - p_keep);
    let response_start = p.len();
    p.extend(r);
    Ok(Example {
        tokens: p,
        response_start,
    })
}

pub fn run(ctx: &StageContext<'_>) -> anyhow::Result<Metrics> {
    let p: SftParams = ctx.params()?;
    let device = model::device(&ctx.spec.device)?;
    let model_dir = ctx.input("model")?;
    let tokenizer = Tokenizer::from_dir(model_dir)?;
    let lora = p.lora.as_ref().map(|l| LoraConfig {
        rank: l.rank,
        alpha: l.alpha,
        dropout: l.dropout,
        targets: l.targets.clone(),
    });
    // LoRA adapters are initialised randomly: seed first, for byte-identical reruns.
    tch::manual_seed(ctx.spec.seed as i64);
    let mut model = Model::load(
        model_dir,
        &BuildOptions {
            device,
            head: Head::Lm,
            lora,
        },
    )?;
    let eos = p
        .append_eos
        .then(|| {
            tokenizer
                .eos_id
                .map(i64::from)
                .or(model.lm.cfg.eos_token_id)
        })
        .flatten();
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
        Ok(causal_lm_loss(m, &ids, &mask, &labels, true))
    };
    let n = examples.len();
    let mut metrics = run_training(ctx, &mut model, &p.train, p.lr, n, &mut loss_fn)?;
    metrics.insert("examples".into(), n.into());
    Ok(metrics)
}
