//! `sft`: supervised fine-tuning on (prompt, response) records; the loss
//! covers response tokens only: the last turn, or, for a conversation whose
//! chat template marks `{% generation %}`, every assistant turn. Full
//! fine-tuning or LoRA (merged on export).

use anyhow::Context;

use alignflow_ops::data::read_jsonl;
use alignflow_ops::protocol::Metrics;
use alignflow_ops::text::{apply_template, Tokenizer};
use alignflow_ops::{SftParams, StageContext};

use super::examples::{tokenize_conversation, tokenize_example, Example, TextFormat};
use super::load::{self, eos_id};
use super::training::{causal_lm_loss, right_pad_labelled, run_training, BatchLoss};
use crate::model::{self, Head, Model};

pub fn run(ctx: &StageContext<'_>) -> anyhow::Result<Metrics> {
    let p: SftParams = ctx.params()?;
    let device = model::device(&ctx.spec.device)?;
    let model_dir = ctx.input("model")?;
    let tokenizer = Tokenizer::from_dir(model_dir)?;
    let mut model = load::trainable(
        &ctx.spec.stage,
        model_dir,
        device,
        Head::Lm,
        p.lora.as_ref(),
        ctx.spec.seed,
        tch::Kind::Float,
    )?;
    let eos = p.append_eos.then(|| eos_id(&tokenizer, &model)).flatten();
    if p.append_eos {
        eos.context("append_eos: the model has no EOS token")?;
    }
    let max_len = (p.max_len.min(model.lm.cfg.max_positions)) as usize;

    let chat = load::chat_format(ctx, p.chat_template, model_dir)?;
    let format = TextFormat::new(&tokenizer, chat.as_ref());

    let data = ctx.input("data")?;
    let mut examples = Vec::new();
    // Conversations trained on every assistant turn (the template marks them).
    let mut assistant_turns_trained = 0usize;
    for (line, record) in read_jsonl::<serde_json::Value>(data)? {
        let at = || format!("stage `{}`: {}:{line}", ctx.spec.stage, data.display());
        let record = record.map_err(|e| anyhow::anyhow!("{}: {e}", at()))?;
        let (prompt, response) =
            prompt_and_response(&record, &p).map_err(|e| anyhow::anyhow!("{}: {e}", at()))?;
        let every_turn = match record.get("messages") {
            Some(messages) => {
                tokenize_conversation(&format, messages, max_len).with_context(|| at())?
            }
            None => None,
        };
        let example = match every_turn {
            Some(example) => {
                assistant_turns_trained += 1;
                example
            }
            None => {
                tokenize_example(&format, &prompt, &response, eos, max_len).with_context(|| at())?
            }
        };
        examples.push(example);
    }
    let pad = model.lm.cfg.pad_id();
    let labelled: Vec<Vec<bool>> = examples.iter().map(Example::labelled).collect();
    let mut loss_fn = |m: &Model, idx: &[usize]| -> anyhow::Result<BatchLoss> {
        let rows: Vec<(&[i64], &[bool])> = idx
            .iter()
            .map(|&i| (examples[i].tokens.as_slice(), labelled[i].as_slice()))
            .collect();
        let (ids, mask, labels) = right_pad_labelled(&rows, pad, device);
        let (loss, counted) = causal_lm_loss(m, &ids, &mask, &labels, p.dropout);
        Ok(BatchLoss {
            loss,
            tokens: counted,
            weight: counted as f64,
        })
    };
    let n = examples.len();
    let mut metrics = run_training(ctx, &mut model, &p.train, p.lr, n, &mut loss_fn)?;
    metrics.insert("examples".into(), n.into());
    if chat.as_ref().is_some_and(|c| c.marks_generation()) {
        metrics.insert(
            "conversations_on_every_assistant_turn".into(),
            assistant_turns_trained.into(),
        );
    }
    format.report(&ctx.spec.stage, &mut metrics);
    Ok(metrics)
}

/// A record's prompt (the prompt field through `template`; with a chat
/// template, one user turn) and response; or, for a `messages` record (a
/// conversation ending with the assistant), every turn before the last as
/// the prompt and the last turn's text as the response.
fn prompt_and_response(
    record: &serde_json::Value,
    p: &SftParams,
) -> Result<(serde_json::Value, String), String> {
    if let Some(messages) = record.get("messages") {
        let turns = messages.as_array().map(Vec::as_slice).unwrap_or_default();
        let Some((last, before)) = turns.split_last() else {
            return Err("`messages` must be a non-empty list of messages".into());
        };
        if last["role"] != "assistant" {
            return Err("the last message of an `sft` conversation must be the assistant's".into());
        }
        let response = last["content"]
            .as_str()
            .ok_or("the last message has no string `content`")?;
        return Ok((
            serde_json::Value::Array(before.to_vec()),
            response.to_string(),
        ));
    }
    let field = |name: &str| -> Result<String, String> {
        record[name]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| format!("no string field `{name}`"))
    };
    let prompt = apply_template(&p.template, &field(&p.prompt_field)?);
    Ok((prompt.into(), field(&p.response_field)?))
}
