//! How the ops load a stage's model folders: the tokenizer, the model on
//! the stage's device with the head (and LoRA adapters) the op asks for, its
//! EOS token, and the checks that several folders fit together.

use std::path::Path;

use anyhow::Context;
use tch::Device;

use alignflow_ops::text::Tokenizer;
use alignflow_ops::training::LoraParams;
use alignflow_ops::{ChatFormat, ChatTemplateChoice, StageContext};

use crate::model::{BuildOptions, Head, LoraConfig, Model, ModelConfig};

/// `dir`'s model with `head` on `device`, without adapters.
pub(crate) fn model(dir: &Path, device: Device, head: Head) -> anyhow::Result<Model> {
    Model::load(
        dir,
        &BuildOptions {
            device,
            head,
            lora: None,
        },
    )
}

/// [`model`], frozen: a policy or a judge that only runs forwards.
pub(crate) fn frozen(dir: &Path, device: Device, head: Head) -> anyhow::Result<Model> {
    let mut m = model(dir, device, head)?;
    m.vs.freeze();
    Ok(m)
}

/// `dir`'s tokenizer and its language model (tokenizer first: a folder
/// without one fails before the weights load).
pub(crate) fn language_model(dir: &Path, device: Device) -> anyhow::Result<(Tokenizer, Model)> {
    let tokenizer = Tokenizer::from_dir(dir)?;
    Ok((tokenizer, model(dir, device, Head::Lm)?))
}

/// A model to train, with `params.lora`'s adapters if any.
pub(crate) fn trainable(
    dir: &Path,
    device: Device,
    head: Head,
    lora: Option<&LoraParams>,
    seed: u64,
) -> anyhow::Result<Model> {
    // Fresh heads and LoRA adapters draw from torch's generator: seed it
    // first, so the stage is a function of its fingerprint (byte-identical
    // reruns).
    tch::manual_seed(seed as i64);
    Model::load(
        dir,
        &BuildOptions {
            device,
            head,
            lora: lora.map(LoraConfig::from),
        },
    )
}

/// The EOS token: the tokenizer's, else the model config's.
pub(crate) fn eos_id(tokenizer: &Tokenizer, model: &Model) -> Option<i64> {
    tokenizer
        .eos_id
        .map(i64::from)
        .or(model.lm.cfg.eos_token_id)
}

/// Every id a sampled answer ends on: [`eos_id`] first, then the stop ids
/// of the model's `config.json` and `generation_config.json` (as
/// transformers' `generate` stops on any of them).
pub(crate) fn stop_ids(tokenizer: &Tokenizer, model: &Model) -> Vec<i64> {
    let mut ids: Vec<i64> = eos_id(tokenizer, model).into_iter().collect();
    for &id in &model.lm.cfg.stop_token_ids {
        if !ids.contains(&id) {
            ids.push(id);
        }
    }
    ids
}

/// Checks that every `(port, folder)` in `others` shares the policy's
/// tokenizer (`why` says what needs it) and returns the positions all of
/// them have, which must leave room for `max_new_tokens`. Reads configs
/// only, so a mismatch fails before anything heavy loads.
pub(crate) fn shared_positions(
    stage: &str,
    policy_dir: &Path,
    others: &[(&str, &Path)],
    why: &str,
    max_new_tokens: i64,
) -> anyhow::Result<i64> {
    let policy_cfg = ModelConfig::load(policy_dir)?;
    let mut max_positions = policy_cfg.max_positions;
    for &(port, dir) in others {
        let cfg = ModelConfig::load(dir)?;
        anyhow::ensure!(
            same_tokenizer(policy_dir, dir)? && cfg.vocab_size == policy_cfg.vocab_size,
            "stage `{stage}`: input `{port}` has another tokenizer than input `policy` \
             (vocabulary {} vs {}, or different tokenizer.json): {why}",
            cfg.vocab_size,
            policy_cfg.vocab_size
        );
        max_positions = max_positions.min(cfg.max_positions);
    }
    prompt_budget(stage, max_positions, max_new_tokens)?;
    Ok(max_positions)
}

/// Tokens a prompt may keep when `max_new_tokens` follow it within
/// `max_positions`. Checked before anything is sampled: a budget of zero
/// would otherwise fail (or panic in the position embedding) only after
/// the stage's work.
pub(crate) fn prompt_budget(
    stage: &str,
    max_positions: i64,
    max_new_tokens: i64,
) -> anyhow::Result<usize> {
    anyhow::ensure!(
        max_new_tokens < max_positions,
        "stage `{stage}`, field `params.max_new_tokens`: {max_new_tokens} new tokens leave no room for a prompt in the model's {max_positions} positions (at most {})",
        max_positions - 1
    );
    Ok((max_positions - max_new_tokens) as usize)
}

/// Whether two model folders share a tokenizer: equal `tokenizer.json`
/// bytes when both have one (the ops copy it verbatim from their source).
fn same_tokenizer(a: &Path, b: &Path) -> anyhow::Result<bool> {
    let (fa, fb) = (a.join("tokenizer.json"), b.join("tokenizer.json"));
    if !fa.exists() || !fb.exists() {
        return Ok(true);
    }
    let read = |f: &Path| std::fs::read(f).with_context(|| format!("reading {}", f.display()));
    Ok(read(&fa)? == read(&fb)?)
}

/// The stage's chat template, or `None` for the plain `template`: with
/// `choice` auto, the file bound to its `chat_template` input, else the
/// model's own (see [`ChatFormat::for_stage`]).
pub(crate) fn chat_format(
    ctx: &StageContext<'_>,
    choice: ChatTemplateChoice,
    model_dir: &Path,
) -> anyhow::Result<Option<ChatFormat>> {
    let file = ctx.spec.inputs.get("chat_template").map(|f| f.as_path());
    ChatFormat::for_stage(choice, file, model_dir).map_err(|e| {
        anyhow::anyhow!(
            "stage `{}`, field `params.chat_template`: {e:#}",
            ctx.spec.stage
        )
    })
}
