//! `ai_feedback`: soft preference labels from a feedback model (step 3 of
//! the RL-CAI pipeline).
//!
//! The feedback model reads the multiple-choice question of the
//! Constitutional AI paper (see [`feedback_prompt`]) and the label is the
//! normalised probability of ` (A)` against ` (B)`. Both orders are asked
//! and averaged, labels can be ensembled over several principles, and an
//! optional chain-of-thought variant reasons first and clamps to [0.4, 0.6].
//!
//! This file holds the declaration and everything that needs no libtorch
//! (prompt layout, reading pairs, principle sampling, the summary); the
//! scoring runs in `alignflow-worker` (`worker/src/ops/ai_feedback.rs`).

use std::collections::BTreeMap;
use std::path::Path;

use rand::SeedableRng;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::chat_format::{ChatTemplateChoice, CHAT_TEMPLATE_INPUT};
use crate::data::read_jsonl;
use crate::op::{check_temperature, require, AT_LEAST_ONE};
use crate::protocol::Metrics;
use crate::{OpDecl, OpParams, Outputs, ParamError, ParamsDecl, Placement, Port};

/// Params of `ai_feedback`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AiFeedbackParams {
    /// The dtype the stage's models are held in (`auto`: bfloat16 on
    /// CUDA, float32 on the CPU).
    #[serde(default, skip_serializing_if = "crate::memory::Dtype::is_auto")]
    pub dtype: crate::memory::Dtype,
    /// Feedback questions per forward pass (each is two sequences, one
    /// ending in ` (A)` and one in ` (B)`), and chain-of-thought rows
    /// decoding at once (continuous batching).
    #[serde(default = "crate::defaults::batch_size")]
    pub batch_size: usize,
    /// Distinct feedback principles sampled per pair (seeded by the stage
    /// seed and the pair index); the label is their mean.
    #[serde(default = "crate::defaults::one")]
    pub principles_per_pair: usize,
    /// Prepend the constitution's few-shot feedback examples to each question.
    #[serde(default)]
    pub few_shot: bool,
    /// Generate reasoning (`Let's think step by step:`) before the answer;
    /// each probability is then clamped to [0.4, 0.6].
    #[serde(default)]
    pub chain_of_thought: bool,
    /// Chain of thought: most new tokens of reasoning.
    #[serde(default = "crate::defaults::max_new_tokens")]
    pub max_new_tokens: i64,
    /// Chain of thought: sampling temperature; 0 is greedy.
    #[serde(default)]
    pub temperature: f64,
    /// Chat template: `auto` asks the question as a user turn (rendered with
    /// the `chat_template` input's template, else the model's own, else as
    /// plain text) and scores the options at the start of the assistant's
    /// turn; `none` always uses the plain text.
    #[serde(default, skip_serializing_if = "ChatTemplateChoice::is_auto")]
    pub chat_template: ChatTemplateChoice,
    /// Variables for the chat template beside the conversation, as
    /// transformers' `apply_chat_template` keyword arguments (Qwen3's
    /// `enable_thinking: false`, Llama 3.2's `date_string`).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub chat_template_kwargs: std::collections::BTreeMap<String, serde_json::Value>,
}

/// First line of every feedback question.
pub const PREAMBLE: &str = "Consider the following conversation between a human and an assistant:";
/// Ends a question that is answered at once.
pub const ANSWER_CUE: &str = "The answer is:";
/// Ends a chain-of-thought question; the model writes its reasoning after it.
pub const COT_CUE: &str = "Let's think step by step:";
/// The scored continuations, with the space that follows a cue.
pub const OPTION_A: &str = " (A)";
pub const OPTION_B: &str = " (B)";
/// Chain-of-thought labels are clamped to this range, as in the paper.
pub const COT_CLAMP: (f64, f64) = (0.4, 0.6);

/// The question up to and including the `(B)` line:
///
/// ```text
/// Consider the following conversation between a human and an assistant:\n
/// {conversation}\n
/// {principle}\n            <- trimmed; followed by "Options:\n" unless it ends with "Options:"
/// (A) {response_a}\n       <- responses trimmed
/// (B) {response_b}\n
/// ```
///
/// `conversation` is used as given (see [`conversation_of`]).
pub fn feedback_question(
    conversation: &str,
    principle: &str,
    response_a: &str,
    response_b: &str,
) -> String {
    let principle = principle.trim();
    // The paper's principles end with "Options:" already (on their own line).
    let options = if principle.ends_with("Options:") {
        ""
    } else {
        "\nOptions:"
    };
    format!(
        "{PREAMBLE}\n{conversation}\n{principle}{options}\n(A) {}\n(B) {}\n",
        response_a.trim(),
        response_b.trim()
    )
}

/// The multiple-choice prompt whose continuation ` (A)` or ` (B)` is scored:
/// [`feedback_question`] followed by `The answer is:` (no trailing space or
/// newline; the options carry their leading space).
pub fn feedback_prompt(
    conversation: &str,
    principle: &str,
    response_a: &str,
    response_b: &str,
) -> String {
    feedback_question(conversation, principle, response_a, response_b) + ANSWER_CUE
}

/// The chain-of-thought prompt: [`feedback_question`] followed by
/// `Let's think step by step:`; the model's reasoning follows directly.
pub fn cot_prompt(
    conversation: &str,
    principle: &str,
    response_a: &str,
    response_b: &str,
) -> String {
    feedback_question(conversation, principle, response_a, response_b) + COT_CUE
}

/// The scored prompt after chain-of-thought `reasoning` (trailing
/// whitespace dropped): `{cot_prompt}{reasoning}\nThe answer is:`.
pub fn cot_answer_prompt(cot_prompt: &str, reasoning: &str) -> String {
    format!("{cot_prompt}{}\n{ANSWER_CUE}", reasoning.trim_end())
}

/// With a chat template, the turns a question is asked in: each few-shot
/// example's question as a user turn and its `The answer is: (X)` as the
/// assistant's, then `question` (a [`feedback_question`]) as the last user
/// turn. The rendered turns (with the generation prompt) are followed by
/// the cue, so the options are scored at the start of the assistant's turn.
pub fn feedback_messages(few_shot: &[String], question: &str) -> Vec<serde_json::Value> {
    let mut turns = Vec::new();
    for example in few_shot {
        let example = example.trim();
        let (asked, answer) = match example.rfind(ANSWER_CUE) {
            Some(at) => (&example[..at], &example[at..]),
            None => (example, ""),
        };
        turns.push(serde_json::json!({"role": "user", "content": asked.trim_end()}));
        if !answer.is_empty() {
            turns.push(serde_json::json!({"role": "assistant", "content": answer}));
        }
    }
    turns.push(serde_json::json!({"role": "user", "content": question.trim_end()}));
    turns
}

/// Few-shot feedback examples before a question, each followed by a blank line.
pub fn with_few_shot(examples: &[String], prompt: &str) -> String {
    let mut out = String::new();
    for e in examples {
        out.push_str(e.trim_end());
        out.push_str("\n\n");
    }
    out.push_str(prompt);
    out
}

/// The conversation shown in the question, from a prompt (HH-RLHF
/// `\n\nHuman: ...\n\nAssistant:`): surrounding whitespace trimmed and the
/// final, empty `Assistant:` turn dropped, since the two options are that turn.
pub fn conversation_of(prompt: &str) -> String {
    let t = prompt.trim();
    t.strip_suffix("Assistant:")
        .map(str::trim_end)
        .unwrap_or(t)
        .to_string()
}

/// The conversation a question shows: a chat prompt's turns written out
/// as `Human:` / `Assistant:` text, else the prompt text through
/// [`conversation_of`]. Never the policy's rendered chat text: inside the
/// feedback model's own user turn its markup (`<|im_start|>`, a second
/// system prompt, an open assistant turn) would read as control tokens.
pub fn question_conversation(text: &str, messages: Option<&serde_json::Value>) -> String {
    match messages.and_then(|m| m.as_array()) {
        Some(turns) => transcript(turns),
        None => conversation_of(text),
    }
}

/// Chat turns as `Human: ...\n\nAssistant: ...` text (a system turn as
/// `System:`, another role by its name), each content trimmed; a content
/// given as parts keeps its text parts.
pub fn transcript(turns: &[serde_json::Value]) -> String {
    turns
        .iter()
        .filter_map(|turn| {
            let content = match &turn["content"] {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Array(parts) => parts
                    .iter()
                    .filter_map(|part| part["text"].as_str())
                    .collect::<Vec<_>>()
                    .join(""),
                _ => return None,
            };
            let speaker = match turn["role"].as_str()? {
                "user" => "Human".to_string(),
                "assistant" => "Assistant".to_string(),
                "system" => "System".to_string(),
                other => {
                    let mut chars = other.chars();
                    chars
                        .next()
                        .map_or_else(String::new, |c| c.to_uppercase().chain(chars).collect())
                }
            };
            Some(format!("{speaker}: {}", content.trim()))
        })
        .collect::<Vec<_>>()
        .join("\n\n")
}

/// One pair to label.
#[derive(Debug, Clone, PartialEq)]
pub struct FeedbackPair {
    /// The prompt as recorded in the input (`prompt`).
    pub prompt: String,
    /// The text the question shows as the conversation (before [`conversation_of`]):
    /// of a `generate` record, its `messages` as a [`transcript`] (chat) or
    /// its `prompt_text`; else `prompt`.
    pub context: String,
    pub response_a: String,
    pub response_b: String,
    /// The human label, P(response_a preferred), of imported comparisons.
    pub label: Option<f64>,
}

/// Reads `pairs`: either `generate` output (`{prompt, prompt_text,
/// prompt_index, sample_index, response}`; the two lowest `sample_index`
/// of each `prompt_index` make a pair, in order of first appearance) or
/// comparisons (`{prompt, chosen, rejected, label}`; A = chosen).
pub fn read_pairs(path: &Path) -> anyhow::Result<Vec<FeedbackPair>> {
    /// The samples of one `prompt_index` of `generate` output.
    struct Group {
        first_seen: usize,
        prompt: String,
        context: String,
        samples: Vec<(u64, String)>,
    }
    let mut pairs = Vec::new();
    let mut groups: BTreeMap<u64, Group> = BTreeMap::new();
    let at = |line: usize| format!("{}:{line}", path.display());
    for (line, record) in read_jsonl::<serde_json::Value>(path)? {
        let r = record.map_err(|e| anyhow::anyhow!("{}: {e}", at(line)))?;
        let text = |field: &str| -> anyhow::Result<String> {
            r[field]
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| anyhow::anyhow!("{}: no string field `{field}`", at(line)))
        };
        if r.get("chosen").is_some() {
            let prompt = text("prompt")?;
            pairs.push(FeedbackPair {
                context: prompt.clone(),
                prompt,
                response_a: text("chosen")?,
                response_b: text("rejected")?,
                label: r["label"].as_f64(),
            });
        } else if let Some(index) = r["prompt_index"].as_u64() {
            let prompt = text("prompt")?;
            // A chat record's conversation is its `messages` less the
            // answer (the options show the answers).
            let context = match r["messages"].as_array() {
                Some(turns) => {
                    let asked = match turns.last() {
                        Some(last) if last["role"] == "assistant" => &turns[..turns.len() - 1],
                        _ => &turns[..],
                    };
                    transcript(asked)
                }
                None => r["prompt_text"]
                    .as_str()
                    .map_or_else(|| prompt.clone(), str::to_string),
            };
            let sample = r["sample_index"].as_u64().unwrap_or(0);
            let first_seen = groups.len();
            groups
                .entry(index)
                .or_insert_with(|| Group {
                    first_seen,
                    prompt,
                    context,
                    samples: Vec::new(),
                })
                .samples
                .push((sample, text("response")?));
        } else {
            anyhow::bail!(
                "{}: neither a comparison (`chosen`, `rejected`) nor a `generate` record (`prompt_index`, `response`)",
                at(line)
            );
        }
    }
    anyhow::ensure!(
        pairs.is_empty() || groups.is_empty(),
        "{}: mixes comparisons and `generate` records",
        path.display()
    );
    let mut groups: Vec<(u64, Group)> = groups.into_iter().collect();
    groups.sort_by_key(|(_, g)| g.first_seen);
    for (index, mut g) in groups {
        anyhow::ensure!(
            g.samples.len() >= 2,
            "{}: prompt_index {index} has {} response(s); `generate` with `n: 2` makes pairs",
            path.display(),
            g.samples.len()
        );
        g.samples.sort_by_key(|(s, _)| *s);
        let mut it = g.samples.into_iter().map(|(_, r)| r);
        pairs.push(FeedbackPair {
            prompt: g.prompt,
            context: g.context,
            response_a: it.next().expect("two samples"),
            response_b: it.next().expect("two samples"),
            label: None,
        });
    }
    Ok(pairs)
}

/// `k` distinct indices into `n` principles for pair `pair`: a function of
/// the stage seed and the pair index only (so adding pairs does not change
/// the principles of the others).
pub fn sample_principles(n: usize, k: usize, seed: u64, pair: usize) -> Vec<usize> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(
        seed ^ (pair as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15),
    );
    rand::seq::index::sample(&mut rng, n, k.min(n)).into_vec()
}

/// The label of one principle from the two orders: forward (A first) and
/// swapped (B first) probabilities of `(A)`.
pub fn combine_orders(p_a_forward: f64, p_a_swapped: f64) -> f64 {
    (p_a_forward + (1.0 - p_a_swapped)) / 2.0
}

/// What the summary needs of one labelled pair.
#[derive(Debug, Clone, PartialEq)]
pub struct PairLabel {
    /// The AI label.
    pub p_a: f64,
    /// `(p_a_forward, p_a_swapped)` of each principle.
    pub orders: Vec<(f64, f64)>,
    /// The human label, if any.
    pub human: Option<f64>,
}

/// The figures of a finished labelling (the `summary` output and the stage metrics).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct FeedbackSummary {
    /// Labelled pairs.
    pub count: usize,
    /// Mean AI label.
    pub mean_p_a: f64,
    /// Mean of `p_a_forward - (1 - p_a_swapped)` over every (pair,
    /// principle): how much more the model prefers the first option.
    pub position_bias: f64,
    /// Pairs with a human label other than a tie (0.5).
    pub labelled: usize,
    /// Accuracy of `(p_a > 0.5) == (label > 0.5)` over those pairs (an AI
    /// label of exactly 0.5 counts as wrong).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agreement: Option<f64>,
    /// Sequences truncated (from the left) to fit the model's context.
    pub truncated: usize,
}

impl FeedbackSummary {
    /// From the labels of every pair.
    pub fn new(labels: &[PairLabel], truncated: usize) -> Self {
        let count = labels.len();
        let mean = |xs: &[f64]| {
            if xs.is_empty() {
                0.0
            } else {
                xs.iter().sum::<f64>() / xs.len() as f64
            }
        };
        let p: Vec<f64> = labels.iter().map(|l| l.p_a).collect();
        let bias: Vec<f64> = labels
            .iter()
            .flat_map(|l| l.orders.iter().map(|(f, s)| f - (1.0 - s)))
            .collect();
        // A human tie says nothing of who is right: left out. An AI tie
        // picks no side: a miss (as pm.* and dpo count their accuracy).
        let agree: Vec<f64> = labels
            .iter()
            .filter_map(|l| l.human.filter(|&h| h != 0.5).map(|h| (l.p_a, h)))
            .map(|(p, h)| f64::from(u8::from(p != 0.5 && (p > 0.5) == (h > 0.5))))
            .collect();
        FeedbackSummary {
            count,
            mean_p_a: mean(&p),
            position_bias: mean(&bias),
            labelled: agree.len(),
            agreement: (!agree.is_empty()).then(|| mean(&agree)),
            truncated,
        }
    }

    /// The same figures as stage metrics.
    pub fn metrics(&self) -> Metrics {
        match serde_json::to_value(self).expect("summary serialises") {
            serde_json::Value::Object(m) => m.into_iter().collect(),
            _ => unreachable!("a struct serialises to an object"),
        }
    }
}

/// The `ai_feedback` op.
pub const OP: OpDecl = OpDecl {
    name: "ai_feedback",
    version: 5,
    summary: "soft preference labels from a feedback model: P((A)) vs P((B)) on the CAI multiple-choice question, both orders, principle ensembles, optional chain of thought",
    inputs: &[
        Port::input("model", "the feedback model folder"),
        Port::input(
            "pairs",
            "JSONL: `generate` output with n = 2 per prompt, or comparisons {prompt, chosen, rejected, label}",
        ),
        Port::input("constitution", "constitution YAML (feedback principles, few-shot examples)"),
        Port::optional("chat_template", CHAT_TEMPLATE_INPUT),
    ],
    outputs: Outputs::Declared(&[
        Port::output(
            "comparisons",
            "JSONL: {prompt, response_a, response_b, p_a, details: [{principle, p_a_forward, p_a_swapped}]} plus the human `label` when the input had one",
        ),
        Port::output(
            "summary",
            "JSON: count, mean_p_a, position_bias, labelled, agreement (with human labels), truncated",
        ),
    ]),
    params: ParamsDecl::of::<AiFeedbackParams>(),
    placement: Placement::Worker,
    conventions: &[
        "plain text: [few-shot examples, each followed by a blank line] + the question + `The answer is:`; the label is P(` (A)`) / (P(` (A)`) + P(` (B)`)) of the two continuations",
        "chat template: the turns [few-shot questions (user) and their `The answer is: (X)` (assistant)..., {user: the question}] rendered with the generation prompt, followed by `The answer is:`, so the options are scored at the start of the assistant's turn; chain of thought puts `Let's think step by step:` there instead, and the reasoning and `\\nThe answer is:` follow it",
    ],
};

impl OpParams for AiFeedbackParams {
    fn check(&self) -> Result<(), ParamError> {
        require(
            self.principles_per_pair > 0,
            "principles_per_pair",
            AT_LEAST_ONE,
        )?;
        require(self.batch_size > 0, "batch_size", AT_LEAST_ONE)?;
        require(
            !self.chain_of_thought || self.max_new_tokens >= 1,
            "max_new_tokens",
            AT_LEAST_ONE,
        )?;
        check_temperature(self.temperature)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prompt_layout_is_the_papers() {
        let p = feedback_prompt("Human: hi", "Which is kinder?", " Hello!", "Go away.\n");
        assert_eq!(
            p,
            "Consider the following conversation between a human and an assistant:\n\
             Human: hi\nWhich is kinder?\nOptions:\n(A) Hello!\n(B) Go away.\nThe answer is:"
        );
        // A principle that ends with "Options:" (the paper's) is not doubled.
        let p = feedback_prompt(
            "c",
            "\nPlease choose the better response. Options:",
            "a",
            "b",
        );
        assert!(p.contains(
            "\nPlease choose the better response. Options:\n(A) a\n(B) b\nThe answer is:"
        ));
        assert_eq!(p.matches("Options:").count(), 1);
        let cot = cot_prompt("c", "Which?", "a", "b");
        assert!(cot.ends_with("(B) b\nLet's think step by step:"));
        assert_eq!(
            cot_answer_prompt(&cot, " A is nicer. \n"),
            format!("{cot} A is nicer.\nThe answer is:")
        );
        assert_eq!(with_few_shot(&["ex one\n".into()], "Q"), "ex one\n\nQ");
    }

    #[test]
    fn conversations_drop_the_empty_assistant_turn() {
        assert_eq!(
            conversation_of("\n\nHuman: hi\n\nAssistant: yo\n\nHuman: why?\n\nAssistant:"),
            "Human: hi\n\nAssistant: yo\n\nHuman: why?"
        );
        assert_eq!(conversation_of("just text "), "just text");
    }

    #[test]
    fn a_chat_prompt_is_shown_as_its_turns_not_as_the_policys_rendered_text() {
        let rendered = "<|im_start|>system\nYou are Qwen.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n";
        let turns = serde_json::json!([
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": " hi "},
            {"role": "assistant", "content": [{"type": "text", "text": "yo"}]},
            {"role": "user", "content": "why?"},
        ]);
        assert_eq!(
            question_conversation(rendered, Some(&turns)),
            "System: Be brief.\n\nHuman: hi\n\nAssistant: yo\n\nHuman: why?"
        );
        assert_eq!(
            question_conversation("\n\nHuman: hi\n\nAssistant:", None),
            "Human: hi"
        );
        // A chat `generate` record: its messages less the answer.
        let dir = tempfile::tempdir().unwrap();
        let gen = dir.path().join("gen.jsonl");
        let record = |s: usize, answer: &str| {
            serde_json::json!({
                "prompt": "hi", "prompt_text": rendered, "prompt_index": 0,
                "sample_index": s, "response": answer,
                "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": answer}],
            })
            .to_string()
        };
        std::fs::write(&gen, [record(0, "a"), record(1, "b")].join("\n")).unwrap();
        let pairs = read_pairs(&gen).unwrap();
        assert_eq!(pairs[0].context, "Human: hi");
        assert_eq!(conversation_of(&pairs[0].context), "Human: hi");
    }

    #[test]
    fn principles_are_distinct_and_seeded() {
        let a = sample_principles(16, 4, 7, 3);
        assert_eq!(a, sample_principles(16, 4, 7, 3));
        let mut d = a.clone();
        d.sort();
        d.dedup();
        assert_eq!(d.len(), 4);
        assert!(a.iter().all(|&i| i < 16));
        assert_eq!(sample_principles(2, 5, 0, 0).len(), 2);
    }

    #[test]
    fn pairs_from_generate_and_from_comparisons() {
        let dir = tempfile::tempdir().unwrap();
        let gen = dir.path().join("gen.jsonl");
        std::fs::write(
            &gen,
            [
                r#"{"prompt":"p1","prompt_text":"T1","prompt_index":1,"sample_index":1,"response":"b1"}"#,
                r#"{"prompt":"p1","prompt_text":"T1","prompt_index":1,"sample_index":0,"response":"a1"}"#,
                r#"{"prompt":"p0","prompt_index":0,"sample_index":0,"response":"a0"}"#,
                r#"{"prompt":"p0","prompt_index":0,"sample_index":1,"response":"b0"}"#,
            ]
            .join("\n"),
        )
        .unwrap();
        let pairs = read_pairs(&gen).unwrap();
        assert_eq!(pairs.len(), 2);
        assert_eq!(
            (
                pairs[0].context.as_str(),
                pairs[0].response_a.as_str(),
                pairs[0].response_b.as_str()
            ),
            ("T1", "a1", "b1")
        );
        assert_eq!(pairs[1].context, "p0");
        let cmp = dir.path().join("cmp.jsonl");
        std::fs::write(
            &cmp,
            r#"{"prompt":"p","chosen":" c","rejected":" r","label":1.0}"#,
        )
        .unwrap();
        let pairs = read_pairs(&cmp).unwrap();
        assert_eq!(pairs[0].response_a, " c");
        assert_eq!(pairs[0].label, Some(1.0));
        std::fs::write(
            &gen,
            r#"{"prompt":"p","prompt_index":0,"sample_index":0,"response":"a"}"#,
        )
        .unwrap();
        assert!(read_pairs(&gen).unwrap_err().to_string().contains("n: 2"));
    }

    fn label(p_a: f64, orders: Vec<(f64, f64)>, human: Option<f64>) -> PairLabel {
        PairLabel { p_a, orders, human }
    }

    #[test]
    fn summary_figures() {
        let s = FeedbackSummary::new(
            &[
                label(0.7, vec![(0.8, 0.4)], Some(1.0)),
                label(0.4, vec![(0.5, 0.7)], Some(1.0)),
            ],
            0,
        );
        assert_eq!(s.count, 2);
        assert!((s.mean_p_a - 0.55).abs() < 1e-12);
        // (0.8 - 0.6 + 0.5 - 0.3) / 2
        assert!((s.position_bias - 0.2).abs() < 1e-12);
        assert_eq!(s.agreement, Some(0.5));
        assert!((combine_orders(0.8, 0.4) - 0.7).abs() < 1e-12);
        assert!(FeedbackSummary::new(&[label(0.5, vec![], None)], 0)
            .agreement
            .is_none());
        // A human tie is left out; an AI tie is a miss.
        let ties = FeedbackSummary::new(
            &[
                label(0.9, vec![], Some(0.5)),
                label(0.5, vec![], Some(0.0)),
                label(0.2, vec![], Some(0.0)),
            ],
            0,
        );
        assert_eq!((ties.labelled, ties.agreement), (2, Some(0.5)));
    }

    #[test]
    fn chat_questions_follow_few_shot_turns() {
        let turns = feedback_messages(
            &["Consider ...\nOptions:\n(A) x\n(B) y\nThe answer is: (A)".into()],
            "Consider this\n(A) a\n(B) b\n",
        );
        assert_eq!(turns.len(), 3);
        assert_eq!(turns[0]["content"], "Consider ...\nOptions:\n(A) x\n(B) y");
        assert_eq!(turns[1]["role"], "assistant");
        assert_eq!(turns[1]["content"], "The answer is: (A)");
        assert_eq!(turns[2]["role"], "user");
        assert_eq!(turns[2]["content"], "Consider this\n(A) a\n(B) b");
    }
}
