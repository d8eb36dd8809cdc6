//! The `samples` output: what the policy wrote at the first and at the last
//! iteration, each response with its prompt, its reward source's raw score
//! and its KL to the reference; what a reader of the report looks at first.
//!
//! The first iteration's records are kept in the checkpoint folder, so a run
//! resumed after it still publishes them; the last iteration's are written
//! when the stage ends.

use std::path::{Path, PathBuf};

use anyhow::Context;
use tch::{Device, Kind};

use alignflow_ops::data::JsonlWriter;
use alignflow_ops::StageContext;

use super::rollout::{Experience, Rollout};
use super::setup::{Models, Settings};
use crate::rl::kl_per_token;

/// The first iteration's records, beside the checkpoints.
fn first_path(checkpoint_dir: &Path) -> PathBuf {
    checkpoint_dir.join("samples-first.jsonl")
}

/// One record per rollout row of iteration `it`: `iteration`, `row`,
/// `prompt` (the recorded field), `prompt_text` (as the policy read it),
/// `response` (up to its first EOS), `score` (the reward source's raw
/// score), `kl` (summed over the response), and for a chat prompt
/// `messages` (the conversation with the response as its new turn).
pub(super) fn records(
    s: &Settings,
    models: &Models,
    ro: &Rollout,
    ex: &Experience,
    it: u64,
) -> anyhow::Result<Vec<serde_json::Value>> {
    let kl = (kl_per_token(&ex.old_logp, &ex.ref_logp, s.estimator) * &ro.rmask)
        .sum_dim_intlist([1i64].as_slice(), false, Kind::Double)
        .to_device(Device::Cpu);
    let kl = Vec::<f64>::try_from(&kl)?;
    let scores = Vec::<f64>::try_from(&ex.raw_scores.to_kind(Kind::Double).to_device(Device::Cpu))?;
    let responses = models
        .rewards
        .responses(&ro.sampled.resp, &ro.sampled.gen_mask)?;
    Ok(ro
        .prompt_rows
        .iter()
        .zip(responses)
        .enumerate()
        .map(|(row, (&prompt, (_, response)))| {
            let info = models.rewards.prompt(prompt);
            let mut record = serde_json::json!({
                "iteration": it,
                "row": row,
                "prompt": info.raw,
                "prompt_text": info.text,
                "response": response,
                "score": scores[row],
                "kl": kl[row],
            });
            if let Some(mut messages) = info.messages.clone() {
                if let Some(turns) = messages.as_array_mut() {
                    turns.push(serde_json::json!({"role": "assistant", "content": response}));
                    record["messages"] = messages;
                }
            }
            record
        })
        .collect())
}

/// Keeps the first iteration's records where a resumed run finds them.
pub(super) fn keep_first(
    checkpoint_dir: &Path,
    records: &[serde_json::Value],
) -> anyhow::Result<()> {
    let path = first_path(checkpoint_dir);
    let mut out = JsonlWriter::create(&path)?;
    for r in records {
        out.write(r)?;
    }
    out.finish()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Writes the `samples` output: the first iteration's records, then the
/// last one's (once, when they are the same iteration).
pub(super) fn publish(ctx: &StageContext<'_>, last: &[serde_json::Value]) -> anyhow::Result<()> {
    let first = std::fs::read_to_string(first_path(&ctx.spec.checkpoint_dir))
        .context("the first iteration's samples (samples-first.jsonl in the checkpoint folder)")?;
    let mut out = JsonlWriter::create(&ctx.output("samples"))?;
    let mut first_iteration = None;
    for line in first.lines() {
        let record: serde_json::Value = serde_json::from_str(line)?;
        first_iteration = record["iteration"].as_u64();
        out.write(&record)?;
    }
    for record in last {
        if record["iteration"].as_u64() != first_iteration {
            out.write(record)?;
        }
    }
    out.finish()?;
    Ok(())
}
