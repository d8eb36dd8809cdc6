//! `dataset.import`: turns an external dataset into the project's records.
//!
//! HH-RLHF comparisons become [`Comparison`] records (shared prompt, two
//! responses, a label), prompt lists become [`PromptRecord`]s. Nothing is
//! dropped silently: records that cannot be split and malformed lines are
//! counted and listed, by line number, in the `report` output.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::data::{read_lines, Comparison, DataError, JsonlWriter, PromptRecord};
use crate::protocol::Metrics;
use crate::{OpDecl, OpParams, Outputs, ParamsDecl, Placement, Port, StageContext};

/// The marker that opens an assistant turn in HH-RLHF dialogues.
const ASSISTANT: &str = "\n\nAssistant:";
/// How many bad lines an error message quotes.
const QUOTED_BAD_LINES: usize = 5;
/// Progress is reported every this many lines.
const PROGRESS_EVERY: u64 = 1000;

/// Layout of the source file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    /// JSONL with `chosen` and `rejected` dialogues (`\n\nHuman: ...\n\nAssistant: ...`)
    /// -> comparison records `{prompt, chosen, rejected, label}`.
    HhRlhf,
    /// JSONL with a string field holding the prompt -> `{prompt, ...}`:
    /// the field is renamed `prompt` and the record's other fields (a
    /// `reference` answer for `exact_match`, ids, ...) are kept.
    Prompts,
    /// Plain text, one prompt per non-empty line -> `{prompt}`.
    Text,
    /// JSONL conversations in TRL's conversational formats, checked and
    /// kept: `{messages}` (a prompt when it ends with a user turn, an SFT
    /// example when it ends with the assistant), `{prompt: [messages]}`
    /// (written as `{messages}`), or the preference form `{prompt:
    /// [messages], chosen: [assistant message], rejected: [...]}`.
    Messages,
}

/// Params of `dataset.import`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ImportParams {
    /// Layout of the source file.
    #[serde(default = "default_format")]
    pub format: Format,
    /// `prompts` format: the field that holds the prompt.
    #[serde(default = "crate::defaults::prompt_field")]
    pub field: String,
    /// How many malformed lines to skip (and list in the report) before failing.
    #[serde(default)]
    pub max_bad_lines: u64,
    /// Stop after this many records (none: import everything).
    #[serde(default)]
    pub limit: Option<u64>,
    /// `hh-rlhf` format: `text` keeps the dialogue text (`prompt` ending
    /// with `\n\nAssistant:`), `messages` splits it into turns as TRL's
    /// conversational preference records: `prompt` a list of user/assistant
    /// messages, `chosen`/`rejected` a list holding one assistant message.
    #[serde(default, skip_serializing_if = "Emit::is_text")]
    pub emit: Emit,
}

/// How `hh-rlhf` comparisons are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Emit {
    /// Dialogue text, as the source has it.
    #[default]
    Text,
    /// Conversations: Human turns become `user`, Assistant turns `assistant`.
    Messages,
}

impl Emit {
    // Absent from the normalised params when it is the default, so
    // manifests written before it existed keep their fingerprints.
    fn is_text(&self) -> bool {
        *self == Emit::Text
    }
}

fn default_format() -> Format {
    Format::HhRlhf
}

/// Why an HH-RLHF record cannot become a comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Unsplittable {
    /// A dialogue has no `\n\nAssistant:` turn.
    NoAssistantTurn,
    /// The dialogues differ before their last `\n\nAssistant:`.
    PromptMismatch,
}

impl Unsplittable {
    const ALL: [Unsplittable; 2] = [Unsplittable::NoAssistantTurn, Unsplittable::PromptMismatch];

    fn key(self) -> &'static str {
        match self {
            Unsplittable::NoAssistantTurn => "no_assistant_turn",
            Unsplittable::PromptMismatch => "prompt_mismatch",
        }
    }
}

/// One line of an HH-RLHF file (other fields are ignored).
#[derive(Deserialize)]
struct HhRlhfLine {
    chosen: String,
    rejected: String,
}

/// Splits an HH-RLHF pair into prompt and responses: the prompt is
/// everything up to and including the last `\n\nAssistant:` and must be the
/// same in both dialogues.
fn split_pair(chosen: &str, rejected: &str) -> Result<Comparison, Unsplittable> {
    let prompt_end = |dialogue: &str| dialogue.rfind(ASSISTANT).map(|i| i + ASSISTANT.len());
    let (Some(c), Some(r)) = (prompt_end(chosen), prompt_end(rejected)) else {
        return Err(Unsplittable::NoAssistantTurn);
    };
    if chosen[..c] != rejected[..r] {
        return Err(Unsplittable::PromptMismatch);
    }
    Ok(Comparison {
        prompt: chosen[..c].to_string(),
        chosen: chosen[c..].to_string(),
        rejected: rejected[r..].to_string(),
        label: 1.0,
    })
}

/// The marker that opens a human turn in HH-RLHF dialogues.
const HUMAN: &str = "\n\nHuman:";

/// A comparison as a TRL conversational preference record: the prompt's
/// turns (each trimmed of the space after its marker), and each response
/// as one assistant message.
fn as_messages(pair: &Comparison) -> Result<serde_json::Value, String> {
    let mut turns = Vec::new();
    let mut rest = pair.prompt.as_str();
    // The prompt ends with the empty assistant turn that the responses fill.
    rest = rest
        .strip_suffix(ASSISTANT)
        .expect("a split prompt ends with it");
    while !rest.is_empty() {
        let (role, body) = if let Some(body) = rest.strip_prefix(HUMAN) {
            ("user", body)
        } else if let Some(body) = rest.strip_prefix(ASSISTANT) {
            ("assistant", body)
        } else {
            return Err(
                "the dialogue does not start with a Human turn: it cannot become messages".into(),
            );
        };
        let end = [body.find(HUMAN), body.find(ASSISTANT)]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(body.len());
        turns.push(serde_json::json!({"role": role, "content": body[..end].trim()}));
        rest = &body[end..];
    }
    let answer = |text: &str| serde_json::json!([{"role": "assistant", "content": text.trim()}]);
    Ok(serde_json::json!({
        "prompt": turns,
        "chosen": answer(&pair.chosen),
        "rejected": answer(&pair.rejected),
        "label": pair.label,
    }))
}

/// A malformed line of the source.
#[derive(Debug, Clone, Serialize)]
struct BadLine {
    line: usize,
    reason: String,
}

/// The `report` output (and, flattened, the metrics).
#[derive(Debug, Default, Serialize)]
struct ImportReport {
    format: Option<Format>,
    /// Records written to `data`.
    records: u64,
    /// Records that cannot be split, by reason.
    unsplittable: BTreeMap<&'static str, u64>,
    /// Their line numbers, by reason.
    unsplittable_lines: BTreeMap<&'static str, Vec<usize>>,
    /// Skipped malformed lines.
    bad_lines: u64,
    bad_line_details: Vec<BadLine>,
    /// Imported comparisons whose two responses are identical.
    identical_pairs: u64,
    identical_pair_lines: Vec<usize>,
    /// Whether `limit` stopped the import before the end of the source.
    truncated: bool,
}

impl ImportReport {
    fn new(format: Format) -> Self {
        let mut report = ImportReport {
            format: Some(format),
            ..Default::default()
        };
        if format == Format::HhRlhf {
            for reason in Unsplittable::ALL {
                report.unsplittable.insert(reason.key(), 0);
                report.unsplittable_lines.insert(reason.key(), Vec::new());
            }
        }
        report
    }

    fn metrics(&self) -> Metrics {
        let mut m = Metrics::new();
        m.insert("records".into(), self.records.into());
        m.insert("bad_lines".into(), self.bad_lines.into());
        if self.format == Some(Format::HhRlhf) {
            m.insert("identical_pairs".into(), self.identical_pairs.into());
            m.insert(
                "unsplittable".into(),
                self.unsplittable.values().sum::<u64>().into(),
            );
            for (reason, n) in &self.unsplittable {
                m.insert(format!("unsplittable_{reason}"), (*n).into());
            }
        }
        m
    }
}

/// Failures of `dataset.import`.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("stage `{stage}`: {source}")]
    Data { stage: String, source: DataError },
    #[error(
        "stage `{stage}`: {count} bad lines in {} (max_bad_lines = {max}):{}",
        path.display(),
        quote_bad_lines(path, first)
    )]
    TooManyBadLines {
        stage: String,
        path: PathBuf,
        count: u64,
        max: u64,
        first: Vec<(usize, String)>,
    },
    #[error(
        "stage `{stage}`: no records in {} ({unsplittable} cannot be split, {bad} bad lines): nothing downstream could use it",
        path.display()
    )]
    Empty {
        stage: String,
        path: PathBuf,
        unsplittable: u64,
        bad: u64,
    },
    #[error("stage `{stage}`: cannot write {}: {source}", path.display())]
    Write {
        stage: String,
        path: PathBuf,
        source: std::io::Error,
    },
}

fn quote_bad_lines(path: &Path, first: &[(usize, String)]) -> String {
    first
        .iter()
        .map(|(line, reason)| format!("\n  {}:{line}: {reason}", path.display()))
        .collect()
}

/// The `dataset.import` op.
pub const OP: OpDecl = OpDecl {
    name: "dataset.import",
    // 2: `format: prompts` keeps the records' other fields.
    version: 2,
    summary: "import HH-RLHF comparisons, JSONL prompts, text lines or conversations (TRL's formats) as JSONL records, with a report",
    inputs: &[Port {
        name: "source",
        doc: "the file to import (JSONL, or text for `format: text`)",
        required: true,
        volatile: false,
    }],
    outputs: Outputs::Declared(&[
        Port::output("data", "JSONL records: {prompt, chosen, rejected, label} (hh-rlhf; with `emit: messages` prompt is a list of messages and each response a list holding one assistant message), {prompt, ...the other fields} (prompts), {prompt} (text), or the checked conversations (messages)"),
        Port::output(
            "report",
            "JSON: counts of records, unsplittable records by reason, bad lines and identical pairs, with line numbers",
        ),
    ]),
    params: ParamsDecl::of::<ImportParams>(),
    placement: Placement::Engine(run),
    conventions: &[],
};

impl OpParams for ImportParams {}

pub fn run(ctx: &StageContext<'_>) -> anyhow::Result<Metrics> {
    let params: ImportParams = ctx.params()?;
    let stage = &ctx.spec.stage;
    let source = ctx.input("source")?;
    let data_err = |source| ImportError::Data {
        stage: stage.clone(),
        source,
    };

    let mut out = JsonlWriter::create(&ctx.output("data")).map_err(data_err)?;
    let mut report = ImportReport::new(params.format);
    let len = std::fs::metadata(source).ok().map(|m| m.len());
    let mut bytes_read = 0u64;

    for (line, bytes) in read_lines(source).map_err(data_err)? {
        ctx.cancel.check()?;
        let bytes = bytes.map_err(|err| {
            data_err(DataError::Read {
                path: source.to_path_buf(),
                line,
                source: err,
            })
        })?;
        bytes_read += bytes.len() as u64 + 1;
        if line as u64 % PROGRESS_EVERY == 0 {
            ctx.reporter.progress(bytes_read, len, "importing");
        }
        if params.limit.is_some_and(|limit| report.records >= limit) {
            report.truncated = true;
            break;
        }
        match parse_line(&params, &bytes) {
            Ok(Parsed::Comparison(c)) => {
                if c.chosen == c.rejected {
                    report.identical_pairs += 1;
                    report.identical_pair_lines.push(line);
                }
                out.write(&c).map_err(data_err)?;
                report.records += 1;
            }
            Ok(Parsed::Prompt(p)) => {
                out.write(&p).map_err(data_err)?;
                report.records += 1;
            }
            Ok(Parsed::Record(c)) => {
                if c.get("chosen").is_some() && c["chosen"] == c["rejected"] {
                    report.identical_pairs += 1;
                    report.identical_pair_lines.push(line);
                }
                out.write(&c).map_err(data_err)?;
                report.records += 1;
            }
            Err(LineProblem::Unsplittable(reason)) => {
                *report.unsplittable.entry(reason.key()).or_default() += 1;
                report
                    .unsplittable_lines
                    .entry(reason.key())
                    .or_default()
                    .push(line);
            }
            Err(LineProblem::Bad(reason)) => {
                report.bad_lines += 1;
                report.bad_line_details.push(BadLine { line, reason });
            }
        }
    }

    if report.bad_lines > params.max_bad_lines {
        let first = report
            .bad_line_details
            .iter()
            .take(QUOTED_BAD_LINES)
            .map(|b| (b.line, b.reason.clone()));
        return Err(ImportError::TooManyBadLines {
            stage: stage.clone(),
            path: source.to_path_buf(),
            count: report.bad_lines,
            max: params.max_bad_lines,
            first: first.collect(),
        }
        .into());
    }
    let unsplittable: u64 = report.unsplittable.values().sum();
    if report.records == 0 {
        return Err(ImportError::Empty {
            stage: stage.clone(),
            path: source.to_path_buf(),
            unsplittable,
            bad: report.bad_lines,
        }
        .into());
    }
    out.finish().map_err(data_err)?;

    let report_path = ctx.output("report");
    let mut json = serde_json::to_vec_pretty(&report)?;
    json.push(b'\n');
    std::fs::write(&report_path, json).map_err(|source| ImportError::Write {
        stage: stage.clone(),
        path: report_path,
        source,
    })?;
    if unsplittable + report.bad_lines > 0 {
        tracing::warn!(
            target: "alignflow::stage",
            stage = %stage,
            "{} records imported; {unsplittable} cannot be split and {} bad lines skipped (see the report)",
            report.records,
            report.bad_lines,
        );
    }
    Ok(report.metrics())
}

enum Parsed {
    Comparison(Comparison),
    Prompt(PromptRecord),
    /// A record kept as JSON: a checked conversation (`format: messages`)
    /// or a prompt with its other fields (`format: prompts`).
    Record(serde_json::Value),
}

enum LineProblem {
    Unsplittable(Unsplittable),
    /// A malformed line, with the reason.
    Bad(String),
}

/// Turns one non-blank source line into a record.
fn parse_line(params: &ImportParams, bytes: &[u8]) -> Result<Parsed, LineProblem> {
    let text =
        std::str::from_utf8(bytes).map_err(|_| LineProblem::Bad("not valid UTF-8".into()))?;
    match params.format {
        Format::HhRlhf => {
            let pair: HhRlhfLine =
                serde_json::from_str(text).map_err(|e| LineProblem::Bad(e.to_string()))?;
            let comparison =
                split_pair(&pair.chosen, &pair.rejected).map_err(LineProblem::Unsplittable)?;
            match params.emit {
                Emit::Text => Ok(Parsed::Comparison(comparison)),
                Emit::Messages => as_messages(&comparison)
                    .map(Parsed::Record)
                    .map_err(LineProblem::Bad),
            }
        }
        Format::Prompts => {
            let value: serde_json::Value =
                serde_json::from_str(text).map_err(|e| LineProblem::Bad(e.to_string()))?;
            let serde_json::Value::Object(mut fields) = value else {
                return Err(LineProblem::Bad("not a JSON object".into()));
            };
            match fields.remove(&params.field) {
                // The other fields (a `reference` answer, ids, ...) stay on
                // the record for the ops that read them.
                Some(serde_json::Value::String(prompt)) => {
                    fields.insert("prompt".into(), prompt.into());
                    Ok(Parsed::Record(fields.into()))
                }
                Some(_) => Err(LineProblem::Bad(format!(
                    "field `{}` is not a string",
                    params.field
                ))),
                None => Err(LineProblem::Bad(format!("no field `{}`", params.field))),
            }
        }
        Format::Messages => {
            let value: serde_json::Value =
                serde_json::from_str(text).map_err(|e| LineProblem::Bad(e.to_string()))?;
            conversation_record(value)
                .map(Parsed::Record)
                .map_err(LineProblem::Bad)
        }
        // Blank lines never get here; a trailing `\r` (CRLF files) is a line ending.
        Format::Text => {
            let prompt = text.strip_suffix('\r').unwrap_or(text);
            Ok(Parsed::Prompt(PromptRecord {
                prompt: prompt.to_string(),
            }))
        }
    }
}

/// A `format: messages` record, checked (see [`Format::Messages`]).
fn conversation_record(value: serde_json::Value) -> Result<serde_json::Value, String> {
    if let Some(messages) = value.get("messages") {
        check_turns(messages, "messages")?;
        return Ok(value);
    }
    let prompt = value
        .get("prompt")
        .ok_or("neither `messages` nor `prompt` (TRL's conversational formats)")?;
    check_turns(prompt, "prompt")?;
    if prompt
        .as_array()
        .and_then(|t| t.last())
        .is_some_and(|t| t["role"] == "assistant")
    {
        return Err(
            "`prompt` ends with the assistant's turn: a prompt ends with a user turn".into(),
        );
    }
    match (value.get("chosen"), value.get("rejected")) {
        (None, None) => {
            // A prompt-only record: the sampling ops read `messages`.
            let mut value = value;
            let object = value.as_object_mut().expect("a record with `prompt`");
            let turns = object.remove("prompt").expect("checked");
            object.insert("messages".into(), turns);
            Ok(value)
        }
        (Some(chosen), Some(rejected)) => {
            for (key, answer) in [("chosen", chosen), ("rejected", rejected)] {
                let one_assistant_turn = answer.as_array().is_some_and(|t| {
                    t.len() == 1 && t[0]["role"] == "assistant" && t[0]["content"].is_string()
                });
                if !one_assistant_turn && !answer.is_string() {
                    return Err(format!(
                        "`{key}` must be a list holding one assistant message (or a string)"
                    ));
                }
            }
            Ok(value)
        }
        _ => Err("a preference record needs both `chosen` and `rejected`".into()),
    }
}

/// `turns` is a non-empty list of `{role, content}` messages with known roles.
fn check_turns(turns: &serde_json::Value, key: &str) -> Result<(), String> {
    let list = turns
        .as_array()
        .filter(|t| !t.is_empty())
        .ok_or_else(|| format!("`{key}` must be a non-empty list of messages"))?;
    for (i, turn) in list.iter().enumerate() {
        let role = turn["role"].as_str().unwrap_or_default();
        if !["system", "user", "assistant", "tool"].contains(&role) {
            return Err(format!(
                "{key}[{i}]: role {} is not system, user, assistant or tool",
                turn["role"]
            ));
        }
        if !turn["content"].is_string() {
            return Err(format!("{key}[{i}]: no string `content`"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::read_jsonl;
    use crate::data::testing::{hh_rlhf_sample, run, spec};
    use serde_json::json;

    fn import(dir: &Path, params: serde_json::Value, source: PathBuf) -> anyhow::Result<Metrics> {
        run(&OP, &spec(&OP, dir, params, &[("source", source)]))
    }

    fn read_report(dir: &Path) -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(dir.join("out/report")).unwrap()).unwrap()
    }

    #[test]
    fn hh_rlhf_sample_imports_whole_and_reconstructs() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = import(dir.path(), json!({}), hh_rlhf_sample()).unwrap();
        // Every one of the 1,000 pairs shares its context and differs in the
        // last Assistant turn: nothing is unsplittable, bad or identical.
        assert_eq!(metrics["records"], 1000);
        assert_eq!(metrics["unsplittable"], 0);
        assert_eq!(metrics["unsplittable_no_assistant_turn"], 0);
        assert_eq!(metrics["unsplittable_prompt_mismatch"], 0);
        assert_eq!(metrics["bad_lines"], 0);
        assert_eq!(metrics["identical_pairs"], 0);

        let originals: Vec<serde_json::Value> = read_jsonl(&hh_rlhf_sample())
            .unwrap()
            .map(|(_, r)| r.unwrap())
            .collect();
        let records: Vec<Comparison> = read_jsonl(&dir.path().join("out/data"))
            .unwrap()
            .map(|(_, r)| r.unwrap())
            .collect();
        assert_eq!(records.len(), originals.len());
        let mut empty_chosen = 0;
        for (rec, orig) in records.iter().zip(&originals) {
            assert_eq!(
                format!("{}{}", rec.prompt, rec.chosen),
                orig["chosen"].as_str().unwrap()
            );
            assert_eq!(
                format!("{}{}", rec.prompt, rec.rejected),
                orig["rejected"].as_str().unwrap()
            );
            assert!(rec.prompt.starts_with("\n\nHuman:") && rec.prompt.ends_with(ASSISTANT));
            assert_eq!(rec.label, 1.0);
            empty_chosen += rec.chosen.trim().is_empty() as usize;
        }
        // The data has three pairs whose preferred answer is empty: kept as is.
        assert_eq!(empty_chosen, 3);

        let report = read_report(dir.path());
        assert_eq!(report["records"], 1000);
        assert_eq!(
            report["unsplittable"],
            json!({"no_assistant_turn": 0, "prompt_mismatch": 0})
        );
    }

    #[test]
    fn limit_stops_early() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = import(dir.path(), json!({"limit": 10}), hh_rlhf_sample()).unwrap();
        assert_eq!(metrics["records"], 10);
        assert_eq!(read_report(dir.path())["truncated"], true);
        let text = std::fs::read_to_string(dir.path().join("out/data")).unwrap();
        assert_eq!(text.lines().count(), 10);
    }

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn a_source_with_no_records_is_an_error_not_an_empty_dataset() {
        let dir = tempfile::tempdir().unwrap();
        let empty = write(dir.path(), "empty.jsonl", "\n\n");
        let err = import(dir.path(), json!({}), empty)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("stage `s`: no records in "), "{err}");
        assert!(err.contains("(0 cannot be split, 0 bad lines)"), "{err}");
        let unsplittable = write(
            dir.path(),
            "none.jsonl",
            &json!({"chosen": "\n\nHuman: hi", "rejected": "\n\nHuman: hi\n\nAssistant: x"})
                .to_string(),
        );
        let err = import(dir.path(), json!({}), unsplittable)
            .unwrap_err()
            .to_string();
        assert!(err.contains("(1 cannot be split, 0 bad lines)"), "{err}");
    }

    #[test]
    fn unsplittable_and_bad_lines_are_counted_by_line() {
        let dir = tempfile::tempdir().unwrap();
        let lines = [
            json!({"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go away"})
                .to_string(),
            json!({"chosen": "\n\nHuman: hi", "rejected": "\n\nHuman: hi\n\nAssistant: x"}).to_string(),
            "{not json".to_string(),
            json!({"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: b\n\nAssistant: x"}).to_string(),
            String::new(),
            json!({"chosen": "only chosen"}).to_string(),
            json!({"chosen": "\n\nHuman: a\n\nAssistant: same", "rejected": "\n\nHuman: a\n\nAssistant: same"})
                .to_string(),
        ];
        let source = write(dir.path(), "src.jsonl", &lines.join("\n"));

        let err = import(dir.path(), json!({"max_bad_lines": 1}), source.clone())
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("stage `s`: 2 bad lines in"), "{err}");
        assert!(err.contains("src.jsonl:3: "), "{err}");
        assert!(
            err.contains("src.jsonl:6: missing field `rejected`"),
            "{err}"
        );

        let metrics = import(dir.path(), json!({"max_bad_lines": 2}), source).unwrap();
        assert_eq!(metrics["records"], 2);
        assert_eq!(metrics["bad_lines"], 2);
        assert_eq!(metrics["unsplittable"], 2);
        assert_eq!(metrics["identical_pairs"], 1);
        let report = read_report(dir.path());
        assert_eq!(
            report["unsplittable_lines"],
            json!({"no_assistant_turn": [2], "prompt_mismatch": [4]})
        );
        assert_eq!(report["bad_line_details"][1]["line"], 6);
        assert_eq!(report["identical_pair_lines"], json!([7]));
        let first: Comparison = serde_json::from_str(
            std::fs::read_to_string(dir.path().join("out/data"))
                .unwrap()
                .lines()
                .next()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(first.prompt, "\n\nHuman: hi\n\nAssistant:");
        assert_eq!(first.chosen, " hello");
    }

    #[test]
    fn prompts_and_text_formats() {
        let dir = tempfile::tempdir().unwrap();
        let source = write(
            dir.path(),
            "p.jsonl",
            "{\"q\": \"why?\"}\n{\"q\": 3}\n{\"q\": \"how?\", \"reference\": \"19\", \"x\": 1}\n",
        );
        let err = import(
            dir.path(),
            json!({"format": "prompts", "field": "q"}),
            source.clone(),
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("p.jsonl:2: field `q` is not a string"),
            "{err}"
        );
        let metrics = import(
            dir.path(),
            json!({"format": "prompts", "field": "q", "max_bad_lines": 1}),
            source,
        )
        .unwrap();
        assert_eq!(metrics["records"], 2);
        assert!(!metrics.contains_key("identical_pairs"));
        assert_eq!(
            std::fs::read_to_string(dir.path().join("out/data")).unwrap(),
            // The other fields stay on the record.
            "{\"prompt\":\"why?\"}\n{\"prompt\":\"how?\",\"reference\":\"19\",\"x\":1}\n"
        );

        let source = write(
            dir.path(),
            "p.txt",
            "first prompt\r\n\n  second, \"quoted\"\n",
        );
        let metrics = import(dir.path(), json!({"format": "text"}), source).unwrap();
        assert_eq!(metrics["records"], 2);
        assert_eq!(
            std::fs::read_to_string(dir.path().join("out/data")).unwrap(),
            "{\"prompt\":\"first prompt\"}\n{\"prompt\":\"  second, \\\"quoted\\\"\"}\n"
        );
    }

    #[test]
    fn params_are_normalised_and_checked() {
        let normal = OP.normalize_params(&serde_json::Value::Null).unwrap();
        assert_eq!(
            normal,
            json!({"format": "hh-rlhf", "field": "prompt", "max_bad_lines": 0, "limit": null})
        );
        let err = OP.normalize_params(&json!({"fromat": "text"})).unwrap_err();
        assert_eq!(err.suggestion.as_deref(), Some("format"));
        assert!(OP.normalize_params(&json!({"format": "csv"})).is_err());
    }

    #[test]
    fn hh_rlhf_emits_conversations_turn_by_turn() {
        let dir = tempfile::tempdir().unwrap();
        let dialogue = |last: &str| {
            format!("\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: How do I bake bread?\n\nAssistant: {last}")
        };
        let lines = [
            json!({"chosen": dialogue("Knead the dough."), "rejected": dialogue("No.")}),
            json!({"chosen": dialogue("Same"), "rejected": dialogue("Same")}),
            json!({"chosen": "preamble\n\nAssistant: a", "rejected": "preamble\n\nAssistant: b"}),
        ];
        let text: String = lines.iter().map(|l| l.to_string() + "\n").collect();
        let source = write(dir.path(), "hh.jsonl", &text);
        let metrics = import(
            dir.path(),
            json!({"emit": "messages", "max_bad_lines": 1}),
            source,
        )
        .unwrap();
        assert_eq!(metrics["records"], 2);
        assert_eq!(metrics["bad_lines"], 1);
        let records: Vec<serde_json::Value> = read_jsonl(&dir.path().join("out/data"))
            .unwrap()
            .map(|(_, r)| r.unwrap())
            .collect();
        assert_eq!(
            records[0],
            json!({
                "prompt": [
                    {"role": "user", "content": "Hi there"},
                    {"role": "assistant", "content": "Hello!"},
                    {"role": "user", "content": "How do I bake bread?"},
                ],
                "chosen": [{"role": "assistant", "content": "Knead the dough."}],
                "rejected": [{"role": "assistant", "content": "No."}],
                "label": 1.0,
            })
        );
        let report = read_report(dir.path());
        assert_eq!(report["identical_pair_lines"], json!([2]));
        assert!(report["bad_line_details"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("does not start with a Human turn"));
    }

    #[test]
    fn hh_rlhf_sample_as_messages_keeps_every_comparison() {
        let dir = tempfile::tempdir().unwrap();
        let as_text = import(dir.path(), json!({}), hh_rlhf_sample()).unwrap();
        let other = tempfile::tempdir().unwrap();
        let as_messages =
            import(other.path(), json!({"emit": "messages"}), hh_rlhf_sample()).unwrap();
        assert_eq!(as_text["records"], as_messages["records"]);
        assert_eq!(as_messages["bad_lines"], 0);
        // The `text` default stays out of the normalised params (fingerprints).
        let normalised = serde_json::to_value(
            serde_json::from_value::<ImportParams>(json!({"emit": "text"})).unwrap(),
        )
        .unwrap();
        assert!(normalised.get("emit").is_none(), "{normalised}");
    }

    #[test]
    fn messages_format_keeps_checked_conversations_and_counts_bad_ones() {
        let dir = tempfile::tempdir().unwrap();
        let lines = [
            json!({"messages": [{"role": "user", "content": "hi"}]}),
            json!({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}),
            json!({"prompt": [{"role": "user", "content": "only a prompt"}]}),
            json!({"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "good"}], "rejected": [{"role": "assistant", "content": "bad"}]}),
            json!({"messages": []}),
            json!({"messages": [{"role": "robot", "content": "x"}]}),
            json!({"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}),
            json!({"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "user", "content": "no"}], "rejected": "b"}),
            json!({"prompt": [{"role": "user", "content": "q"}], "chosen": "only one side"}),
        ];
        let text: String = lines.iter().map(|l| l.to_string() + "\n").collect();
        let source = write(dir.path(), "chats.jsonl", &text);
        let metrics = import(
            dir.path(),
            json!({"format": "messages", "max_bad_lines": 5}),
            source,
        )
        .unwrap();
        assert_eq!(metrics["records"], 4);
        assert_eq!(metrics["bad_lines"], 5);
        let records: Vec<serde_json::Value> = read_jsonl(&dir.path().join("out/data"))
            .unwrap()
            .map(|(_, r)| r.unwrap())
            .collect();
        assert_eq!(records[0], lines[0]);
        assert_eq!(records[1], lines[1]);
        // A prompt-only record becomes `messages`, which the sampling ops read.
        assert_eq!(
            records[2],
            json!({"messages": [{"role": "user", "content": "only a prompt"}]})
        );
        assert_eq!(records[3], lines[3]);
        let report = read_report(dir.path());
        let reasons: Vec<(u64, String)> = report["bad_line_details"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| {
                (
                    b["line"].as_u64().unwrap(),
                    b["reason"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        assert_eq!(
            reasons[0],
            (5, "`messages` must be a non-empty list of messages".into())
        );
        assert!(reasons[1].1.contains("role \"robot\""), "{reasons:?}");
        assert!(
            reasons[2].1.contains("ends with the assistant's turn"),
            "{reasons:?}"
        );
        assert!(
            reasons[3]
                .1
                .contains("`chosen` must be a list holding one assistant message"),
            "{reasons:?}"
        );
        assert!(
            reasons[4].1.contains("both `chosen` and `rejected`"),
            "{reasons:?}"
        );
    }
}
