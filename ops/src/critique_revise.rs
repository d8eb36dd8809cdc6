//! `critique_revise`: step 1 of SL-CAI. For each response, K rounds of
//! critique and revision under principles sampled from a constitution; the
//! last revision becomes the new target answer, and the whole trail is kept.
//!
//! The worker runs the op (it generates with the model); this file holds the
//! declaration, the params and the pure parts: principle sampling, prompt
//! assembly, cutting a generation at the next turn marker, and the output
//! records, so all of it is testable without libtorch.
//!
//! The text the model continues follows the paper: the few-shot examples,
//! then the conversation with its latest answer and this round's request.
//! Earlier rounds' critiques are not kept in the running text; the revision
//! of round k is the answer critiqued in round k+1.
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::chat_format::{ChatTemplateChoice, CHAT_TEMPLATE_INPUT};
use crate::data::CritiqueRevision;
use crate::decoding::DecodingParams;
use crate::op::{require, AT_LEAST_ONE};
use crate::{OpDecl, OpParams, Outputs, ParamError, ParamsDecl, Placement, Port};

/// Where a generated critique or revision ends: the next turn marker.
pub const STOP_STRINGS: &[&str] = &[
    "\n\nHuman:",
    "\n\nAssistant:",
    "\n\nCritiqueRequest:",
    "\n\nRevisionRequest:",
    "\n\nCritique:",
    "\n\nRevision:",
];

/// How principles are drawn for the rounds of one record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum PrincipleSampling {
    /// Each round draws uniformly from all principles (as in the paper).
    WithReplacement,
    /// No principle repeats within a record until every one has been used.
    WithoutReplacement,
}

/// Params of `critique_revise`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
// Unknown names are refused by `op::parse` (serde cannot deny them
// beside `flatten`); the schema still lists the struct as closed.
#[schemars(deny_unknown_fields)]
pub struct CritiqueReviseParams {
    /// The dtype the stage's models are held in (`auto`: bfloat16 on
    /// CUDA, float32 on the CPU).
    #[serde(default, skip_serializing_if = "crate::memory::Dtype::is_auto")]
    pub dtype: crate::memory::Dtype,
    /// Critique/revision rounds per response (the paper uses 1 to 4).
    #[serde(default = "default_rounds")]
    pub rounds: usize,
    /// How each record's principles are drawn (seeded by the stage seed and the record index).
    #[serde(default = "default_sampling")]
    pub sampling: PrincipleSampling,
    /// Prepend the constitution's few-shot critique/revision examples.
    #[serde(default = "crate::defaults::yes")]
    pub few_shot: bool,
    /// Most new tokens, temperature, top-k and top-p.
    #[serde(flatten)]
    pub decoding: DecodingParams,
    /// Records decoding at once (continuous batching).
    #[serde(default = "crate::defaults::batch_size")]
    pub batch_size: usize,
    /// Conversation template for records without `prompt_text`; `{prompt}` is replaced by the prompt.
    #[serde(default = "default_template")]
    pub template: String,
    /// Chat template: `auto` holds the critique and the revision as turns
    /// of the conversation, rendered with the `chat_template` input's
    /// template, else the model's own, else as plain text; `none` always
    /// uses the plain text.
    #[serde(default, skip_serializing_if = "ChatTemplateChoice::is_auto")]
    pub chat_template: ChatTemplateChoice,
    /// Variables for the chat template beside the conversation, as
    /// transformers' `apply_chat_template` keyword arguments (Qwen3's
    /// `enable_thinking: false`, Llama 3.2's `date_string`).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub chat_template_kwargs: std::collections::BTreeMap<String, serde_json::Value>,
}

fn default_rounds() -> usize {
    4
}
fn default_sampling() -> PrincipleSampling {
    PrincipleSampling::WithReplacement
}
fn default_template() -> String {
    "\n\nHuman: {prompt}\n\nAssistant:".into()
}

/// One round of a record's trail.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrailStep {
    /// Id of the critique/revision principle used.
    pub principle: String,
    pub critique: String,
    pub revision: String,
}

/// A record of the `revisions` output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RevisionRecord {
    /// The prompt field of the input record.
    pub prompt: String,
    /// The conversation text, ending in `\n\nAssistant:`.
    pub prompt_text: String,
    /// The response that was critiqued first.
    pub original: String,
    pub trail: Vec<TrailStep>,
    /// The final answer (the last non-empty revision).
    pub revision: String,
}

/// A record of the `sft` output: what `sft` trains on with default fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SftRecord {
    /// The conversation text.
    pub prompt: String,
    /// `" " + final revision`, continuing `Assistant:`.
    pub response: String,
    /// With a chat template: the prompt's turns and the final revision as
    /// the assistant's (what `sft` trains on with a chat template).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages: Option<serde_json::Value>,
}

/// The principle indices (into `count` principles) for the `rounds` rounds
/// of record `record`: a function of `(seed, record, count, rounds,
/// sampling)` alone, so reruns and other batch sizes draw the same ones.
pub fn choose_principles(
    seed: u64,
    record: u64,
    count: usize,
    rounds: usize,
    sampling: PrincipleSampling,
) -> Vec<usize> {
    assert!(count > 0, "no principles to choose from");
    // One ChaCha stream per record: independent of how records are batched.
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(record);
    match sampling {
        PrincipleSampling::WithReplacement => {
            (0..rounds).map(|_| rng.random_range(0..count)).collect()
        }
        PrincipleSampling::WithoutReplacement => {
            let mut out = Vec::with_capacity(rounds);
            let mut pool: Vec<usize> = Vec::new();
            while out.len() < rounds {
                if pool.is_empty() {
                    pool = (0..count).collect();
                }
                out.push(pool.swap_remove(rng.random_range(0..pool.len())));
            }
            out
        }
    }
}

/// The few-shot examples joined into one prefix. The paper's examples end
/// in `\n\nHuman:` (the start of the next conversation); that marker is
/// dropped because the conversation that follows brings its own.
pub fn few_shot_prefix(examples: &[String]) -> String {
    examples
        .iter()
        .map(|e| e.strip_suffix("\n\nHuman:").unwrap_or(e).trim_end())
        .collect()
}

/// The text whose continuation is the critique: `prefix`, the
/// conversation, the answer under review and the critique request.
pub fn critique_prompt(
    prefix: &str,
    conversation: &str,
    answer: &str,
    principle: &CritiqueRevision,
) -> String {
    format!(
        "{prefix}{conversation} {}\n\nCritiqueRequest: {}\n\nCritique:",
        answer.trim(),
        principle.critique.trim()
    )
}

/// The text whose continuation is the revision: the critique prompt, the
/// critique and the revision request.
pub fn revision_prompt(
    prefix: &str,
    conversation: &str,
    answer: &str,
    principle: &CritiqueRevision,
    critique: &str,
) -> String {
    format!(
        "{} {}\n\nRevisionRequest: {}\n\nRevision:",
        critique_prompt(prefix, conversation, answer, principle),
        critique.trim(),
        principle.revision.trim()
    )
}

/// With a chat template, the conversation whose continuation is the
/// critique: the few-shot turns, the prompt's turns, the answer as the
/// assistant's turn and the critique request as a follow-up user turn.
pub fn critique_messages(
    few_shot: &[serde_json::Value],
    prompt: &[serde_json::Value],
    answer: &str,
    principle: &CritiqueRevision,
) -> Vec<serde_json::Value> {
    let mut turns = few_shot.to_vec();
    turns.extend_from_slice(prompt);
    turns.push(turn("assistant", answer.trim()));
    turns.push(turn("user", principle.critique.trim()));
    turns
}

/// With a chat template, the conversation whose continuation is the
/// revision: the critique conversation, the critique as the assistant's
/// turn and the revision request as the next user turn.
pub fn revision_messages(
    few_shot: &[serde_json::Value],
    prompt: &[serde_json::Value],
    answer: &str,
    principle: &CritiqueRevision,
    critique: &str,
) -> Vec<serde_json::Value> {
    let mut turns = critique_messages(few_shot, prompt, answer, principle);
    turns.push(turn("assistant", critique.trim()));
    turns.push(turn("user", principle.revision.trim()));
    turns
}

/// The few-shot examples as conversation turns: each transcript split at
/// its markers, `Human:`, `CritiqueRequest:` and `RevisionRequest:` turns
/// the user's, `Assistant:`, `Critique:` and `Revision:` the assistant's.
pub fn few_shot_messages(examples: &[String]) -> Vec<serde_json::Value> {
    const MARKERS: [(&str, &str); 6] = [
        ("Human:", "user"),
        ("Assistant:", "assistant"),
        ("CritiqueRequest:", "user"),
        ("Critique:", "assistant"),
        ("RevisionRequest:", "user"),
        ("Revision:", "assistant"),
    ];
    let mut turns = Vec::new();
    for example in examples {
        let text = format!("\n\n{}", example.trim_start());
        // (position of "\n\n", marker length, role) of every turn start.
        let mut starts: Vec<(usize, usize, &str)> = Vec::new();
        let mut at = 0;
        while let Some(i) = text[at..].find("\n\n") {
            let pos = at + i;
            let rest = &text[pos + 2..];
            if let Some((marker, role)) = MARKERS.iter().find(|(m, _)| rest.starts_with(m)) {
                starts.push((pos, 2 + marker.len(), role));
            }
            at = pos + 2;
        }
        for (k, &(pos, skip, role)) in starts.iter().enumerate() {
            let end = starts.get(k + 1).map_or(text.len(), |s| s.0);
            let content = text[pos + skip..end].trim();
            if !content.is_empty() {
                turns.push(turn(role, content));
            }
        }
    }
    turns
}

fn turn(role: &str, content: &str) -> serde_json::Value {
    serde_json::json!({"role": role, "content": content})
}

/// A generated critique or revision: cut at the first turn marker, trimmed.
pub fn cut_at_stop(text: &str) -> String {
    let end = STOP_STRINGS
        .iter()
        .filter_map(|s| text.find(s))
        .min()
        .unwrap_or(text.len());
    text[..end].trim().to_string()
}

/// The `critique_revise` op.
pub const OP: OpDecl = OpDecl {
    name: "critique_revise",
    version: 3,
    summary: "SL-CAI: K rounds of critique and revision of each response under sampled constitution principles (batched)",
    inputs: &[
        Port::input("model", "the model folder that critiques and revises"),
        Port::input(
            "responses",
            "JSONL from `generate`: {prompt, prompt_text, response}",
        ),
        Port::input("constitution", "a constitution YAML file"),
        Port::optional("chat_template", CHAT_TEMPLATE_INPUT),
    ],
    outputs: Outputs::Declared(&[
        Port::output(
            "revisions",
            "JSONL: {prompt, prompt_text, original, trail: [{principle, critique, revision}], revision}",
        ),
        Port::output(
            "sft",
            "JSONL: {prompt: conversation text, response: \" \" + final revision}, ready for `sft`",
        ),
    ]),
    params: ParamsDecl::of::<CritiqueReviseParams>(),
    placement: Placement::Worker,
    conventions: &[
        "plain text: few-shot examples, the conversation, ` ` + answer, `\\n\\nCritiqueRequest: ` + request, `\\n\\nCritique:`; the revision continues that with ` ` + critique, `\\n\\nRevisionRequest: ` + request, `\\n\\nRevision:`",
        "chat template: the turns [few-shot turns..., prompt turns..., {assistant: answer}, {user: critique request}] rendered with the generation prompt; the revision's are those plus [{assistant: critique}, {user: revision request}]; few-shot transcripts become turns (Human, CritiqueRequest, RevisionRequest: user; Assistant, Critique, Revision: assistant); the prompt turns are the record's `messages` before its answer, else the prompt through `template` as one user turn",
        "rounds: the revision of round k is the answer critiqued in round k+1; earlier critiques are not kept",
    ],
};

impl OpParams for CritiqueReviseParams {
    fn check(&self) -> Result<(), ParamError> {
        require(self.rounds > 0, "rounds", AT_LEAST_ONE)?;
        self.decoding.check()?;
        require(self.batch_size > 0, "batch_size", AT_LEAST_ONE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn principle() -> CritiqueRevision {
        CritiqueRevision {
            id: "harm".into(),
            critique: "Say how the answer is harmful.".into(),
            revision: "Rewrite it without the harm.".into(),
        }
    }

    #[test]
    fn prompts_follow_the_paper_format() {
        let prefix = few_shot_prefix(&[
            "\n\nHuman: a?\n\nAssistant: b\n\nCritiqueRequest: c\n\nCritique: d\n\nRevisionRequest: e\n\nRevision: f\n\nHuman:".into(),
        ]);
        let conv = "\n\nHuman: hi\n\nAssistant:";
        assert_eq!(
            critique_prompt(&prefix, conv, " go away ", &principle()),
            "\n\nHuman: a?\n\nAssistant: b\n\nCritiqueRequest: c\n\nCritique: d\n\nRevisionRequest: e\n\nRevision: f\n\nHuman: hi\n\nAssistant: go away\n\nCritiqueRequest: Say how the answer is harmful.\n\nCritique:"
        );
        assert_eq!(
            revision_prompt("", conv, "go away", &principle(), " rude. "),
            "\n\nHuman: hi\n\nAssistant: go away\n\nCritiqueRequest: Say how the answer is harmful.\n\nCritique: rude.\n\nRevisionRequest: Rewrite it without the harm.\n\nRevision:"
        );
    }

    #[test]
    fn generations_stop_at_the_next_marker() {
        assert_eq!(cut_at_stop(" fine.\n\nHuman: more"), "fine.");
        assert_eq!(cut_at_stop(" a\n\nRevision: b\n\nCritique: c"), "a");
        assert_eq!(cut_at_stop(" no marker "), "no marker");
    }

    #[test]
    fn principles_are_seeded_per_record() {
        let s = PrincipleSampling::WithReplacement;
        let a = choose_principles(7, 3, 16, 4, s);
        assert_eq!(a, choose_principles(7, 3, 16, 4, s));
        assert!(a.iter().all(|&i| i < 16));
        let others: Vec<_> = (0..8).map(|r| choose_principles(7, r, 16, 4, s)).collect();
        assert!(others.iter().any(|o| *o != a));
        assert_ne!(
            (0..8)
                .map(|r| choose_principles(8, r, 16, 4, s))
                .collect::<Vec<_>>(),
            others
        );
    }

    #[test]
    fn without_replacement_uses_every_principle_before_repeating() {
        for record in 0..20 {
            let c = choose_principles(1, record, 3, 7, PrincipleSampling::WithoutReplacement);
            for pass in c.chunks(3).filter(|p| p.len() == 3) {
                let mut p = pass.to_vec();
                p.sort();
                assert_eq!(p, vec![0, 1, 2]);
            }
        }
    }

    #[test]
    fn params_have_the_documented_defaults_and_bounds() {
        let p = OP.normalize_params(&serde_json::Value::Null).unwrap();
        assert_eq!(p["rounds"], 4);
        assert_eq!(p["sampling"], "with_replacement");
        assert_eq!(p["few_shot"], true);
        assert_eq!(p["max_new_tokens"], 64);
        assert_eq!(p["batch_size"], 8);
        assert_eq!(p["template"], "\n\nHuman: {prompt}\n\nAssistant:");
        let err = OP
            .normalize_params(&serde_json::json!({"rounds": 0}))
            .unwrap_err();
        assert_eq!(err.field, "rounds");
    }

    #[test]
    fn few_shot_transcripts_become_alternating_turns() {
        let turns = few_shot_messages(&[
            "\n\nHuman: hi\n\nAssistant: poison it\n\nCritiqueRequest: harmful?\n\nCritique: yes\n\nRevisionRequest: fix it\n\nRevision: talk to them".into(),
            "Human: q2\n\nAssistant: a2".into(),
        ]);
        let pairs: Vec<(String, String)> = turns
            .iter()
            .map(|t| {
                (
                    t["role"].as_str().unwrap().into(),
                    t["content"].as_str().unwrap().into(),
                )
            })
            .collect();
        let expect = [
            ("user", "hi"),
            ("assistant", "poison it"),
            ("user", "harmful?"),
            ("assistant", "yes"),
            ("user", "fix it"),
            ("assistant", "talk to them"),
            ("user", "q2"),
            ("assistant", "a2"),
        ];
        let expect: Vec<(String, String)> = expect
            .iter()
            .map(|(r, c)| (r.to_string(), c.to_string()))
            .collect();
        assert_eq!(pairs, expect);
    }

    #[test]
    fn chat_requests_are_follow_up_user_turns() {
        let prompt = vec![serde_json::json!({"role": "user", "content": "hi"})];
        let few = few_shot_messages(&["Human: a\n\nAssistant: b".into()]);
        let critique = critique_messages(&few, &prompt, " bad answer ", &principle());
        let roles: Vec<&str> = critique
            .iter()
            .map(|t| t["role"].as_str().unwrap())
            .collect();
        assert_eq!(roles, ["user", "assistant", "user", "assistant", "user"]);
        assert_eq!(critique[3]["content"], "bad answer");
        assert_eq!(critique[4]["content"], "Say how the answer is harmful.");
        let revision = revision_messages(&few, &prompt, "bad answer", &principle(), " it harms ");
        assert_eq!(revision.len(), 7);
        assert_eq!(
            revision[5],
            serde_json::json!({"role": "assistant", "content": "it harms"})
        );
        assert_eq!(
            revision[6],
            serde_json::json!({"role": "user", "content": "Rewrite it without the harm."})
        );
    }
}
