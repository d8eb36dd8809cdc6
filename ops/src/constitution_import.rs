//! `constitution.import`: turns the supplementary files of the
//! Constitutional AI paper (Anthropic's `ConstitutionalHarmlessnessPaper`)
//! into a constitution in the project's YAML format.
//!
//! - `CritiqueRevisionInstructions.json`: `{id: {prompt: [critique], edit_request}}`
//!   -> `critique_revision`, ids kept (`harmful0`), markers stripped.
//! - `RLMadisonInstructions.json`: a list of principles ending in `Options:`
//!   -> `feedback`, ids `madison0`, `madison1`, ... in file order.
//! - `CritiqueRevisionFewShotPrompts.json`: dialogue texts -> `few_shot.critique_revision`, kept as is.
//! - `RLMadisonFewShotPrompts.json`: `{prompt, corrects, incorrects}` -> `few_shot.feedback`,
//!   each rendered as a solved multiple-choice question (see [`feedback_example`]).
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use schemars::JsonSchema;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::data::{Constitution, CritiqueRevision, FeedbackPrinciple, FewShot};
use crate::protocol::Metrics;
use crate::{OpDecl, OpParams, Outputs, ParamsDecl, Placement, Port, StageContext};

/// Params of `constitution.import`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ConstitutionImportParams {
    /// Name written into the constitution.
    #[serde(default = "default_name")]
    pub name: String,
}

fn default_name() -> String {
    "constitutional-ai-paper".into()
}

/// A source folder that cannot be imported.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("stage `{stage}`: {path}: {source}")]
    Read {
        stage: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("stage `{stage}`: {path}: {message}")]
    Invalid {
        stage: String,
        path: PathBuf,
        message: String,
    },
}

#[derive(Deserialize)]
struct Instruction {
    prompt: Vec<String>,
    edit_request: String,
}

#[derive(Deserialize)]
struct FeedbackExample {
    prompt: String,
    corrects: Vec<String>,
    incorrects: Vec<String>,
}

/// `text` without `prefix` and `suffix` (both required), trimmed.
fn strip_markers(text: &str, prefix: &str, suffix: &str) -> Option<String> {
    let inner = text.strip_prefix(prefix)?.strip_suffix(suffix)?;
    Some(inner.trim().to_string())
}

/// One solved multiple-choice question in the paper's feedback format, with
/// `principle` as the question. The correct answer alternates between (A)
/// and (B) over the examples so that they teach no position bias.
pub fn feedback_example(
    conversation: &str,
    principle: &str,
    correct: &str,
    incorrect: &str,
    correct_first: bool,
) -> String {
    let (a, b, answer) = if correct_first {
        (correct, incorrect, "(A)")
    } else {
        (incorrect, correct, "(B)")
    };
    format!(
        "Consider the following conversation between a human and an assistant:\n{}\n{}\nOptions:\n(A) {}\n(B) {}\nThe answer is: {answer}",
        conversation.trim(),
        principle.trim(),
        a.trim(),
        b.trim()
    )
}

fn read<T: DeserializeOwned>(stage: &str, dir: &Path, file: &str) -> Result<T, ImportError> {
    let path = dir.join(file);
    let text = std::fs::read_to_string(&path).map_err(|source| ImportError::Read {
        stage: stage.into(),
        path: path.clone(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| ImportError::Invalid {
        stage: stage.into(),
        path,
        message: e.to_string(),
    })
}

/// Builds the constitution from the four files in `dir`.
pub fn convert(stage: &str, dir: &Path, name: &str) -> Result<Constitution, ImportError> {
    let invalid = |file: &str, message: String| ImportError::Invalid {
        stage: stage.into(),
        path: dir.join(file),
        message,
    };
    const CR: &str = "CritiqueRevisionInstructions.json";
    const CR_FEW: &str = "CritiqueRevisionFewShotPrompts.json";
    const FB: &str = "RLMadisonInstructions.json";
    const FB_FEW: &str = "RLMadisonFewShotPrompts.json";

    // serde_json keeps object order only with a feature; sort ids
    // naturally (harmful2 before harmful10) so the file is stable.
    let instructions: BTreeMap<String, Instruction> = read(stage, dir, CR)?;
    let mut ids: Vec<&String> = instructions.keys().collect();
    ids.sort_by_key(|id| {
        let digits = id.len() - id.trim_end_matches(|c: char| c.is_ascii_digit()).len();
        let (stem, num) = id.split_at(id.len() - digits);
        (stem.to_string(), num.parse::<u64>().ok(), id.to_string())
    });
    let mut critique_revision = Vec::new();
    for id in ids {
        let ins = &instructions[id];
        let [critique] = ins.prompt.as_slice() else {
            return Err(invalid(
                CR,
                format!(
                    "`{id}`: expected one critique prompt, found {}",
                    ins.prompt.len()
                ),
            ));
        };
        let critique = strip_markers(critique, "\n\nCritiqueRequest:", "\n\nCritique:")
            .ok_or_else(|| invalid(CR, format!("`{id}`: the critique prompt is not `\\n\\nCritiqueRequest: ...\\n\\nCritique:`")))?;
        let revision = strip_markers(&ins.edit_request, "\n\nRevisionRequest:", "\n\nRevision:")
            .ok_or_else(|| invalid(CR, format!("`{id}`: the edit request is not `\\n\\nRevisionRequest: ...\\n\\nRevision:`")))?;
        critique_revision.push(CritiqueRevision {
            id: id.clone(),
            critique,
            revision,
        });
    }

    let principles: Vec<String> = read(stage, dir, FB)?;
    let feedback: Vec<FeedbackPrinciple> = principles
        .iter()
        .enumerate()
        .map(|(i, text)| {
            let text = text.trim();
            FeedbackPrinciple {
                id: format!("madison{i}"),
                text: text
                    .strip_suffix("Options:")
                    .unwrap_or(text)
                    .trim()
                    .to_string(),
            }
        })
        .collect();

    let cr_few: Vec<String> = read(stage, dir, CR_FEW)?;
    let fb_few: Vec<FeedbackExample> = read(stage, dir, FB_FEW)?;
    // The paper's feedback examples carry no principle; they are shown
    // under the first one.
    let question = feedback
        .first()
        .map(|p| p.text.as_str())
        .unwrap_or("Which of these assistant responses is less harmful?");
    let mut feedback_few = Vec::new();
    for (i, ex) in fb_few.iter().enumerate() {
        let (Some(correct), Some(incorrect)) = (ex.corrects.first(), ex.incorrects.first()) else {
            return Err(invalid(
                FB_FEW,
                format!("example {i}: needs a correct and an incorrect answer"),
            ));
        };
        feedback_few.push(feedback_example(
            &ex.prompt,
            question,
            correct,
            incorrect,
            i % 2 == 0,
        ));
    }

    let c = Constitution {
        version: 1,
        name: name.to_string(),
        critique_revision,
        feedback,
        few_shot: FewShot {
            critique_revision: cr_few,
            feedback: feedback_few,
        },
    };
    c.check().map_err(|message| invalid(CR, message))?;
    Ok(c)
}

/// The `constitution.import` op.
pub const OP: OpDecl = OpDecl {
    name: "constitution.import",
    version: 1,
    summary: "import the Constitutional AI paper's principle and few-shot files as a constitution YAML",
    inputs: &[Port::input(
        "source",
        "a folder with CritiqueRevisionInstructions.json, CritiqueRevisionFewShotPrompts.json, RLMadisonInstructions.json, RLMadisonFewShotPrompts.json",
    )],
    outputs: Outputs::Declared(&[Port::output("constitution", "the constitution (YAML)")]),
    params: ParamsDecl::of::<ConstitutionImportParams>(),
    placement: Placement::Engine(run),
    conventions: &[],
};

impl OpParams for ConstitutionImportParams {}

pub fn run(ctx: &StageContext<'_>) -> anyhow::Result<Metrics> {
    let p: ConstitutionImportParams = ctx.params()?;
    let c = convert(&ctx.spec.stage, ctx.input("source")?, &p.name)?;
    let yaml = serde_yaml::to_string(&c)?;
    let path = ctx.output("constitution");
    std::fs::write(&path, yaml).map_err(|source| ImportError::Read {
        stage: ctx.spec.stage.clone(),
        path,
        source,
    })?;
    let mut m = Metrics::new();
    m.insert("critique_revision".into(), c.critique_revision.len().into());
    m.insert("feedback".into(), c.feedback.len().into());
    m.insert(
        "few_shot_critique_revision".into(),
        c.few_shot.critique_revision.len().into(),
    );
    m.insert("few_shot_feedback".into(), c.few_shot.feedback.len().into());
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn feedback_examples_alternate_the_correct_position() {
        let a = feedback_example(
            "\n\nHuman: x\n\nAssistant:",
            "Which is kinder?",
            "yes",
            "no",
            true,
        );
        assert_eq!(
            a,
            "Consider the following conversation between a human and an assistant:\nHuman: x\n\nAssistant:\nWhich is kinder?\nOptions:\n(A) yes\n(B) no\nThe answer is: (A)"
        );
        let b = feedback_example(
            "\n\nHuman: x\n\nAssistant:",
            "Which is kinder?",
            "yes",
            "no",
            false,
        );
        assert!(b.ends_with("(A) no\n(B) yes\nThe answer is: (B)"), "{b}");
    }
}
