//! A stage's `prompts` input as the sampling ops read it (generate, ppo,
//! baseline_scores, evaluate, best_of_n): the prompt field of each JSONL
//! record, put through the template and tokenized, each prompt keeping its
//! end within a token budget (the answer continues the end). Prompts cut
//! that way are flagged, logged, and counted in the ops' metrics as
//! `truncated_prompts`.

use anyhow::Context;

use alignflow_ops::data::read_jsonl;
use alignflow_ops::text::{apply_template, Tokenizer};
use alignflow_ops::StageContext;

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
}

/// How to read them.
pub(crate) struct PromptSource<'a> {
    /// The record field (`params.prompt_field`).
    pub field: &'a str,
    /// `{prompt}` is replaced by the field (`params.template`).
    pub template: &'a str,
    /// Read at most this many (`params.limit`).
    pub limit: Option<usize>,
    /// Tokens a prompt may keep.
    pub budget: usize,
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
        let raw = record[source.field].as_str().with_context(|| {
            format!(
                "stage `{stage}`: {}:{line}: no string field `{}` (params.prompt_field)",
                path.display(),
                source.field
            )
        })?;
        let text = apply_template(source.template, raw);
        let mut ids = tokenizer.encode(&text)?;
        let cut = ids.len().saturating_sub(source.budget);
        ids.drain(..cut);
        anyhow::ensure!(
            !ids.is_empty(),
            "stage `{stage}`: {}:{line}: empty prompt",
            path.display()
        );
        prompts.push(Prompt {
            raw: raw.to_string(),
            text,
            ids,
            truncated: cut > 0,
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
            "stage `{stage}`: {cut} of {} prompts have more than {} tokens and keep only their last {}",
            prompts.len(),
            source.budget,
            source.budget
        );
    }
    Ok(prompts)
}

/// How many of `prompts` lost their beginning to the budget.
pub(crate) fn truncated(prompts: &[Prompt]) -> usize {
    prompts.iter().filter(|p| p.truncated).count()
}
