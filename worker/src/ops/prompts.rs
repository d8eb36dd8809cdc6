//! A stage's `prompts` input as the sampling ops read it (generate, ppo,
//! baseline_scores, evaluate, best_of_n): the prompt field of each JSONL
//! record, put through the template and tokenized, each prompt keeping its
//! end within a token budget (the answer continues the end). With a chat
//! template, a record's `messages` (or its prompt field as one user turn)
//! are rendered with the generation prompt instead. Prompts cut
//! that way are flagged, logged, and counted in the ops' metrics as
//! `truncated_prompts`.

use anyhow::Context;

use alignflow_ops::data::read_jsonl;
use alignflow_ops::text::{apply_template, Tokenizer};
use std::path::Path;

use alignflow_ops::{ChatFormat, PromptParams, StageContext};

use super::examples::check_prompt_turns;
use super::load;

/// One prompt.
#[derive(Debug, Clone)]
pub(crate) struct Prompt {
    /// The prompt field as recorded.
    pub raw: String,
    /// After the template: what the policy reads and the judges show.
    pub text: String,
    /// `text` tokenized, cut from the left to the budget.
    pub ids: Vec<i64>,
    /// `text` had more tokens than the budget and lost its beginning.
    pub truncated: bool,
    /// With a chat template: the conversation `text` renders.
    pub messages: Option<serde_json::Value>,
    /// The whole record (what reward programs and rules read: `reference`, ...).
    pub record: serde_json::Value,
    /// Where the record is: ``input `prompts` line N (FILE)``.
    pub at: String,
}

/// How to read them.
pub(crate) struct PromptSource<'a> {
    /// The field, the plain template and the chat template choice.
    params: &'a PromptParams,
    /// The chat template, if the stage formats prompts as conversations.
    chat: Option<ChatFormat>,
    /// Read at most this many (`params.limit`).
    limit: Option<usize>,
    /// Tokens a prompt may keep.
    budget: usize,
}

impl<'a> PromptSource<'a> {
    /// Every prompt of the stage's `prompts` input, formatted for the model
    /// in `model_dir` (whose chat template `params` may choose), each
    /// keeping the tokens that `max_new_tokens` leave of `max_positions`
    /// (too few is an error naming `params.max_new_tokens`).
    pub(crate) fn new(
        ctx: &StageContext<'_>,
        params: &'a PromptParams,
        model_dir: &Path,
        max_positions: i64,
        max_new_tokens: i64,
    ) -> anyhow::Result<Self> {
        Ok(PromptSource {
            params,
            chat: load::chat_format(ctx, params.chat_template, model_dir)?,
            limit: None,
            budget: load::prompt_budget(&ctx.spec.stage, max_positions, max_new_tokens)?,
        })
    }

    /// Only the first `limit` prompts (none: all).
    pub(crate) fn first(self, limit: Option<usize>) -> Self {
        PromptSource { limit, ..self }
    }
}

/// Reads the `prompts` input. Errors name the stage, file, line and field;
/// an input with no prompt is an error.
pub(crate) fn read_prompts(
    ctx: &StageContext<'_>,
    source: &PromptSource<'_>,
    tokenizer: &Tokenizer,
) -> anyhow::Result<Vec<Prompt>> {
    let stage = &ctx.spec.stage;
    let path = ctx.input("prompts")?;
    let mut prompts = Vec::new();
    for (line, record) in read_jsonl::<serde_json::Value>(path)? {
        if source.limit.is_some_and(|l| prompts.len() >= l) {
            break;
        }
        let record = record
            .map_err(|e| anyhow::anyhow!("stage `{stage}`: {}:{line}: {e}", path.display()))?;
        let at = || format!("stage `{stage}`: {}:{line}", path.display());
        let (raw, text, messages) = match &source.chat {
            Some(chat) => {
                let (raw, messages) =
                    conversation(&record, source).map_err(|e| anyhow::anyhow!("{}: {e}", at()))?;
                let rendered = chat
                    .prompt(&messages)
                    .map_err(|e| anyhow::anyhow!("{}: {e} ({})", at(), chat.source))?;
                (raw, rendered.text, Some(messages))
            }
            None => {
                let raw = record[source.params.prompt_field.as_str()]
                    .as_str()
                    .with_context(|| {
                        format!(
                            "{}: no string field `{}` (params.prompt_field)",
                            at(),
                            source.params.prompt_field
                        )
                    })?;
                (
                    raw.to_string(),
                    apply_template(&source.params.template, raw),
                    None,
                )
            }
        };
        // A chat template writes its own BOS where the model wants one:
        // nothing is added (as transformers' apply_chat_template tokenizes);
        // a plain prompt starts with the BOS the tokenizer adds, if any.
        let mut ids = match source.chat {
            Some(_) => tokenizer.encode(&text)?,
            None => tokenizer.encode_start(&text)?,
        };
        let cut = ids.len().saturating_sub(source.budget);
        tokenizer.cut_start(&mut ids, cut);
        anyhow::ensure!(
            !ids.is_empty(),
            "stage `{stage}`: {}:{line}: empty prompt",
            path.display()
        );
        if let (true, Some(m)) = (prompts.is_empty(), &messages) {
            super::rendered::log("prompt", m, &text);
        }
        prompts.push(Prompt {
            raw,
            text,
            ids,
            truncated: cut > 0,
            messages,
            // The input's name first: its path is a cache object's.
            at: format!("input `prompts` line {line} ({})", path.display()),
            record,
        });
    }
    anyhow::ensure!(
        !prompts.is_empty(),
        "stage `{stage}`: no prompts in {}",
        path.display()
    );
    let cut = truncated(&prompts);
    if cut > 0 {
        tracing::warn!(
            "stage `{stage}`: {cut} of {} prompts have more than {} tokens and keep only their last {} (after their BOS, if any)",
            prompts.len(),
            source.budget,
            source.budget
        );
    }
    Ok(prompts)
}

/// A record as a conversation for the chat template, and its prompt text:
/// its `messages` (TRL's conversational format: a prompt ends with a user
/// turn), else the prompt field through `template` as one user turn.
fn conversation(
    record: &serde_json::Value,
    source: &PromptSource<'_>,
) -> Result<(String, serde_json::Value), String> {
    if let Some(messages) = record.get("messages") {
        check_prompt_turns(messages)?;
        let turns = messages.as_array().expect("checked");
        let last = &turns[turns.len() - 1];
        let raw = record[source.params.prompt_field.as_str()]
            .as_str()
            .or(last["content"].as_str())
            .unwrap_or_default();
        return Ok((raw.to_string(), messages.clone()));
    }
    let raw = record[source.params.prompt_field.as_str()]
        .as_str()
        .ok_or_else(|| {
            format!(
                "neither `messages` nor a string field `{}` (params.prompt_field)",
                source.params.prompt_field
            )
        })?;
    let content = apply_template(&source.params.template, raw);
    Ok((
        raw.to_string(),
        serde_json::json!([{"role": "user", "content": content}]),
    ))
}

/// A chat prompt's conversation with `answer` as the assistant's new turn
/// (`None` for a plain prompt).
pub(crate) fn with_answer(prompt: &Prompt, answer: &str) -> Option<serde_json::Value> {
    let mut messages = prompt.messages.clone()?;
    messages
        .as_array_mut()?
        .push(serde_json::json!({"role": "assistant", "content": answer}));
    Some(messages)
}

/// How many of `prompts` lost their beginning to the budget.
pub(crate) fn truncated(prompts: &[Prompt]) -> usize {
    prompts.iter().filter(|p| p.truncated).count()
}
