//! Reward sources that score a response: the models (`pm`, `feedback`), a
//! reward program (`program`, see [`crate::reward_program`]) and the
//! built-in rules that need no program (`exact_match`, `regex`, `length`).
//!
//! `ppo` and `best_of_n` take a weighted sum of several (`params.rewards`);
//! `evaluate` uses the text ones as judges. This file holds the params
//! (one [`RewardComponent`] per source), their checks and the built-in
//! rules; the models' scores are computed in the worker.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use std::collections::BTreeMap;
use std::path::Path;

use crate::op::require;
use crate::reward_program::{ProgramParams, Request, RewardProgram};
use crate::ParamError;

/// The input a reward program is bound to.
pub const PROGRAM_INPUT: &str = "reward_program";
/// The port doc of [`PROGRAM_INPUT`].
pub const PROGRAM_INPUT_DOC: &str = "a reward program (script or binary; its content is part of the fingerprint): started once per stage, fed JSON lines {id, prompt, messages?, response, reference?, ...record fields} on stdin in batches, answering {id, score} or {id, scores: {name: value}} lines on stdout (see `alignflow ops ppo`)";

/// `exact_match`: 1 when the response equals the record's reference after
/// normalisation, else 0.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExactMatchParams {
    /// The record field holding the expected answer.
    #[serde(default = "default_reference_field")]
    pub field: String,
}

fn default_reference_field() -> String {
    "reference".into()
}

/// `regex`: 1 when the pattern matches somewhere in the response (anchor it
/// with `^` / `$` for a whole-response match), else 0.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RegexParams {
    /// A Rust `regex` pattern.
    pub pattern: String,
}

/// `length`: a penalty of `-max(0, chars - free_chars)`, the response's
/// characters beyond a free allowance (scale it with `weight`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LengthParams {
    /// Characters that cost nothing.
    #[serde(default)]
    pub free_chars: usize,
}

/// One reward source and its weight; exactly one of the source keys.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RewardComponent {
    /// The `reward_model` input's preference-model score (`pm: {}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pm: Option<Empty>,
    /// The `feedback_model` input's rescaled rating in `[-1, 1]` (`feedback: {}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub feedback: Option<Empty>,
    /// The `reward_program` input's score (its args and timeout here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub program: Option<ProgramParams>,
    /// 1 if the response matches the record's reference (normalised: case,
    /// surrounding whitespace and runs of whitespace, a trailing period).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exact_match: Option<ExactMatchParams>,
    /// 1 if the pattern matches the response.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regex: Option<RegexParams>,
    /// Minus the response's characters beyond `free_chars`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub length: Option<LengthParams>,
    /// The component's weight in the summed reward.
    #[serde(default = "crate::defaults::one_f64")]
    pub weight: f64,
}

/// An empty settings block (`pm: {}`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Empty {}

/// Which source a component names.
#[derive(Debug, Clone, PartialEq)]
pub enum RewardKind<'a> {
    Pm,
    Feedback,
    Program(&'a ProgramParams),
    ExactMatch(&'a ExactMatchParams),
    Regex(&'a RegexParams),
    Length(&'a LengthParams),
}

impl RewardKind<'_> {
    /// The source's key, also its metric name (`reward_<key>`).
    pub fn key(&self) -> &'static str {
        match self {
            RewardKind::Pm => "pm",
            RewardKind::Feedback => "feedback",
            RewardKind::Program(_) => "program",
            RewardKind::ExactMatch(_) => "exact_match",
            RewardKind::Regex(_) => "regex",
            RewardKind::Length(_) => "length",
        }
    }

    /// The input the source reads, if any.
    pub fn input(&self) -> Option<&'static str> {
        match self {
            RewardKind::Pm => Some("reward_model"),
            RewardKind::Feedback => Some("feedback_model"),
            RewardKind::Program(_) => Some(PROGRAM_INPUT),
            _ => None,
        }
    }
}

impl RewardComponent {
    /// A component of weight 1.
    pub fn of(kind: RewardKind<'_>) -> RewardComponent {
        let mut c = RewardComponent {
            pm: None,
            feedback: None,
            program: None,
            exact_match: None,
            regex: None,
            length: None,
            weight: 1.0,
        };
        match kind {
            RewardKind::Pm => c.pm = Some(Empty {}),
            RewardKind::Feedback => c.feedback = Some(Empty {}),
            RewardKind::Program(p) => c.program = Some(p.clone()),
            RewardKind::ExactMatch(p) => c.exact_match = Some(p.clone()),
            RewardKind::Regex(p) => c.regex = Some(p.clone()),
            RewardKind::Length(p) => c.length = Some(p.clone()),
        }
        c
    }

    /// The source it names (checked: exactly one).
    pub fn kind(&self) -> RewardKind<'_> {
        self.kinds()
            .into_iter()
            .next()
            .expect("checked: one source per component")
    }

    fn kinds(&self) -> Vec<RewardKind<'_>> {
        let mut kinds = Vec::new();
        if self.pm.is_some() {
            kinds.push(RewardKind::Pm);
        }
        if self.feedback.is_some() {
            kinds.push(RewardKind::Feedback);
        }
        if let Some(p) = &self.program {
            kinds.push(RewardKind::Program(p));
        }
        if let Some(p) = &self.exact_match {
            kinds.push(RewardKind::ExactMatch(p));
        }
        if let Some(p) = &self.regex {
            kinds.push(RewardKind::Regex(p));
        }
        if let Some(p) = &self.length {
            kinds.push(RewardKind::Length(p));
        }
        kinds
    }
}

/// Checks a `rewards` list: one source per component, finite weights, a
/// source at most once, valid patterns and program settings.
pub fn check_rewards(rewards: &[RewardComponent], field: &str) -> Result<(), ParamError> {
    let mut seen = Vec::new();
    for (i, c) in rewards.iter().enumerate() {
        let at = format!("{field}[{i}]");
        let kinds = c.kinds();
        require(
            kinds.len() == 1,
            &at,
            format!(
                "give exactly one reward source (pm, feedback, program, exact_match, regex or length), got {}",
                kinds.len()
            ),
        )?;
        let kind = &kinds[0];
        require(
            c.weight.is_finite(),
            &format!("{at}.weight"),
            "must be a finite number",
        )?;
        require(
            !seen.contains(&kind.key()),
            &at,
            format!("`{}` is already a reward source of this stage", kind.key()),
        )?;
        seen.push(kind.key());
        match kind {
            RewardKind::Regex(r) => {
                if let Err(e) = regex::Regex::new(&r.pattern) {
                    return Err(ParamError::invalid(
                        &format!("{at}.regex.pattern"),
                        format!("not a valid regex: {e}"),
                    ));
                }
            }
            RewardKind::Program(p) => p.check(&format!("{at}.program"))?,
            _ => {}
        }
    }
    Ok(())
}

/// The components a stage scores with: `rewards` when given, else the one
/// model or program bound as an input (the single-source shorthand).
pub fn effective_rewards(
    rewards: &[RewardComponent],
    bound: &dyn Fn(&str) -> bool,
) -> Vec<RewardComponent> {
    if !rewards.is_empty() {
        return rewards.to_vec();
    }
    let program = ProgramParams::default();
    [
        RewardKind::Pm,
        RewardKind::Feedback,
        RewardKind::Program(&program),
    ]
    .into_iter()
    .filter(|k| k.input().is_some_and(bound))
    .map(RewardComponent::of)
    .collect()
}

/// Checks that every model or program a `rewards` list names is bound, and
/// that no reward input is bound without being used.
pub fn check_reward_inputs(
    rewards: &[RewardComponent],
    bound: &dyn Fn(&str) -> bool,
) -> Result<(), crate::BindingError> {
    for (i, c) in rewards.iter().enumerate() {
        if let Some(input) = c.kind().input() {
            if !bound(input) {
                return Err(crate::BindingError::new(
                    &format!("params.rewards[{i}].{}", c.kind().key()),
                    &format!("needs the `{input}` input"),
                ));
            }
        }
    }
    for input in ["reward_model", "feedback_model", PROGRAM_INPUT] {
        if bound(input) && !rewards.iter().any(|c| c.kind().input() == Some(input)) {
            return Err(crate::BindingError::new(
                &format!("inputs.{input}"),
                "bound, but no entry of `params.rewards` uses it",
            ));
        }
    }
    Ok(())
}

/// A built-in rule, compiled once.
pub enum Builtin {
    ExactMatch { field: String },
    Regex(regex::Regex),
    Length { free_chars: usize },
}

impl Builtin {
    /// The rule of a built-in component (`None`: a model or a program).
    pub fn of(kind: &RewardKind<'_>) -> anyhow::Result<Option<Builtin>> {
        Ok(match kind {
            RewardKind::ExactMatch(p) => Some(Builtin::ExactMatch {
                field: p.field.clone(),
            }),
            RewardKind::Regex(p) => Some(Builtin::Regex(regex::Regex::new(&p.pattern)?)),
            RewardKind::Length(p) => Some(Builtin::Length {
                free_chars: p.free_chars,
            }),
            _ => None,
        })
    }

    /// The score of `response` to `record`. `exact_match` on a record
    /// without the reference field is an error (naming the field), never a
    /// made-up 0.
    pub fn score(&self, record: &serde_json::Value, response: &str) -> Result<f64, String> {
        match self {
            Builtin::ExactMatch { field } => match record.get(field) {
                Some(serde_json::Value::String(reference)) => {
                    let reference = normalise(reference);
                    if reference.is_empty() {
                        // Every empty answer would score 1.
                        return Err(format!("field `{field}` is empty"));
                    }
                    Ok(f64::from(reference == normalise(response)))
                }
                // A number matches an answer of the same value, however
                // either is written (`3`, `3.0`, `3e0`).
                Some(serde_json::Value::Number(n)) => {
                    let answer = normalise(response).parse::<f64>().ok();
                    Ok(f64::from(answer.is_some() && answer == n.as_f64()))
                }
                Some(_) => Err(format!("field `{field}` is not a string or a number")),
                None => Err(format!("no field `{field}` (exact_match compares with it)")),
            },
            Builtin::Regex(re) => Ok(f64::from(re.is_match(response))),
            Builtin::Length { free_chars } => {
                Ok(-(response.chars().count().saturating_sub(*free_chars) as f64))
            }
        }
    }
}

/// What `exact_match` compares: lower case, whitespace runs as one space,
/// no surrounding whitespace, no trailing period.
pub fn normalise(text: &str) -> String {
    let words: Vec<String> = text.split_whitespace().map(str::to_lowercase).collect();
    let joined = words.join(" ");
    joined
        .strip_suffix('.')
        .unwrap_or(&joined)
        .trim_end()
        .to_string()
}

/// One text source of a stage, ready to score.
enum TextScorer {
    Builtin(Builtin),
    /// Behind a mutex: scoring takes `&self` in the ops' loops.
    Program(std::sync::Mutex<RewardProgram>),
}

/// The sources of a `rewards` list that read text (built-in rules and the
/// program), started once for the stage.
pub struct TextRewards {
    stage: String,
    entries: Vec<(&'static str, f64, TextScorer)>,
}

/// One source's scores of a batch of responses.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceScores {
    /// The source's key (`exact_match`, `program`, ...).
    pub key: &'static str,
    pub weight: f64,
    /// One unweighted score per response.
    pub scores: Vec<f64>,
    /// A program's named scores (`scores: {name: value}`), per response.
    pub parts: BTreeMap<String, Vec<f64>>,
}

impl TextRewards {
    /// Compiles the rules and starts the program (`program`: the
    /// `reward_program` input) of `rewards`' text sources.
    pub fn start(
        rewards: &[RewardComponent],
        program: Option<&Path>,
        stage: &str,
    ) -> anyhow::Result<TextRewards> {
        let mut entries = Vec::new();
        for c in rewards {
            let kind = c.kind();
            let scorer = match (&kind, Builtin::of(&kind)?) {
                (_, Some(rule)) => TextScorer::Builtin(rule),
                (RewardKind::Program(p), None) => {
                    let path = program.ok_or_else(|| {
                        anyhow::anyhow!(
                            "stage `{stage}`: `program` needs the `{PROGRAM_INPUT}` input"
                        )
                    })?;
                    let started = RewardProgram::start(path, p)
                        .map_err(|e| anyhow::anyhow!("stage `{stage}`: {e}"))?;
                    TextScorer::Program(std::sync::Mutex::new(started))
                }
                _ => continue,
            };
            entries.push((kind.key(), c.weight, scorer));
        }
        Ok(TextRewards {
            stage: stage.to_string(),
            entries,
        })
    }

    /// Whether there is any text source.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Every text source's scores of `requests`.
    pub fn score(&self, requests: &[Request<'_>]) -> anyhow::Result<Vec<SourceScores>> {
        let stage = &self.stage;
        let mut out = Vec::with_capacity(self.entries.len());
        for (key, weight, scorer) in &self.entries {
            let mut parts: BTreeMap<String, Vec<f64>> = BTreeMap::new();
            let scores = match scorer {
                TextScorer::Builtin(rule) => requests
                    .iter()
                    .map(|r| {
                        rule.score(r.record, r.response).map_err(|e| {
                            anyhow::anyhow!("stage `{stage}`, reward `{key}`: record {}: {e}", r.at)
                        })
                    })
                    .collect::<anyhow::Result<Vec<f64>>>()?,
                TextScorer::Program(program) => {
                    let mut program = program.lock().unwrap_or_else(|e| e.into_inner());
                    let scored = program
                        .score(requests)
                        .map_err(|e| anyhow::anyhow!("stage `{stage}`: {e}"))?;
                    for s in &scored {
                        for (name, v) in &s.parts {
                            parts.entry(name.clone()).or_default().push(*v);
                        }
                    }
                    scored.iter().map(|s| s.total).collect()
                }
            };
            // Each number was finite; weighted, it must stay so.
            if let Some((r, s)) = requests
                .iter()
                .zip(&scores)
                .find(|(_, s)| !((weight * *s).abs() <= f64::from(f32::MAX)))
            {
                anyhow::bail!(
                    "stage `{stage}`, reward `{key}`: record {}: the score {s} (weight {weight}) is too large to use",
                    r.at
                );
            }
            out.push(SourceScores {
                key,
                weight: *weight,
                scores,
                parts,
            });
        }
        Ok(out)
    }
}

/// The mean of each source's scores and of a program's named parts, as
/// metrics: `reward_<key>` and `reward_program_<name>`.
pub fn source_means(sources: &[SourceScores]) -> Vec<(String, f64)> {
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let mut out = Vec::new();
    for s in sources {
        out.push((format!("reward_{}", s.key), mean(&s.scores)));
        for (name, v) in &s.parts {
            out.push((format!("reward_{}_{name}", s.key), mean(v)));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: serde_json::Value) -> Vec<RewardComponent> {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn exact_match_is_normalised_and_needs_the_reference() {
        let rule = Builtin::of(&RewardKind::ExactMatch(&ExactMatchParams {
            field: "reference".into(),
        }))
        .unwrap()
        .unwrap();
        let rec = json!({"prompt": "12+7=", "reference": "19"});
        assert_eq!(rule.score(&rec, " 19 "), Ok(1.0));
        assert_eq!(rule.score(&rec, "19."), Ok(1.0));
        assert_eq!(rule.score(&rec, "18"), Ok(0.0));
        assert_eq!(rule.score(&json!({"reference": 19}), "19"), Ok(1.0));
        // A number reference matches by value, however it was written.
        assert_eq!(rule.score(&json!({"reference": 3.0}), "3"), Ok(1.0));
        assert_eq!(rule.score(&json!({"reference": 3}), "3.0."), Ok(1.0));
        assert_eq!(rule.score(&json!({"reference": 3}), "three"), Ok(0.0));
        // An empty reference would reward every empty answer.
        let err = rule.score(&json!({"reference": " . "}), "").unwrap_err();
        assert!(err.contains("`reference` is empty"), "{err}");
        assert_eq!(normalise("  The  Answer\tIs X. "), "the answer is x");
        let err = rule.score(&json!({"prompt": "x"}), "19").unwrap_err();
        assert!(err.contains("no field `reference`"), "{err}");
    }

    #[test]
    fn regex_and_length_rules() {
        let re = Builtin::of(&RewardKind::Regex(&RegexParams {
            pattern: "^[0-9]+$".into(),
        }))
        .unwrap()
        .unwrap();
        assert_eq!(re.score(&json!({}), "42"), Ok(1.0));
        assert_eq!(re.score(&json!({}), "4 2"), Ok(0.0));
        let len = Builtin::of(&RewardKind::Length(&LengthParams { free_chars: 3 }))
            .unwrap()
            .unwrap();
        assert_eq!(len.score(&json!({}), "abcdé"), Ok(-2.0));
        assert_eq!(len.score(&json!({}), "ab"), Ok(0.0));
    }

    #[test]
    fn a_rewards_list_is_checked() {
        let ok = parse(json!([{"pm": {}, "weight": 1.0}, {"exact_match": {}, "weight": 0.5}]));
        check_rewards(&ok, "rewards").unwrap();
        assert_eq!(ok[1].kind().key(), "exact_match");
        assert_eq!(ok[1].weight, 0.5);

        let two = parse(json!([{"pm": {}, "regex": {"pattern": "x"}}]));
        let e = check_rewards(&two, "rewards").unwrap_err();
        assert_eq!(e.field, "rewards[0]");
        let none = parse(json!([{"weight": 2.0}]));
        assert!(check_rewards(&none, "rewards").is_err());
        let bad = parse(json!([{"regex": {"pattern": "("}}]));
        let e = check_rewards(&bad, "rewards").unwrap_err();
        assert_eq!(e.field, "rewards[0].regex.pattern");
        let twice = parse(json!([{"exact_match": {}}, {"exact_match": {"field": "b"}}]));
        assert!(check_rewards(&twice, "rewards").is_err());
        assert!(
            serde_json::from_value::<Vec<RewardComponent>>(json!([{"pm": {}, "wieght": 1}]))
                .is_err()
        );
    }

    /// A score times its weight past float32's range is refused, naming
    /// the record, not turned into an infinite reward downstream.
    #[test]
    fn a_weighted_score_out_of_range_is_refused_naming_the_record() {
        let rewards = parse(json!([{"exact_match": {}, "weight": 1e300}]));
        let text = TextRewards::start(&rewards, None, "s").unwrap();
        let record = json!({"reference": "7"});
        let request = |response| crate::reward_program::Request {
            record: &record,
            prompt: "3+4=",
            messages: None,
            response,
            at: "prompts.jsonl:1".into(),
        };
        // A miss scores 0, which any weight keeps.
        assert!(text.score(&[request("8")]).is_ok());
        let e = text.score(&[request("7")]).unwrap_err().to_string();
        assert!(
            e.contains("record prompts.jsonl:1") && e.contains("too large"),
            "{e}"
        );
    }

    #[test]
    fn the_shorthand_and_the_bindings() {
        let bound = |n: &str| n == "reward_program";
        let eff = effective_rewards(&[], &bound);
        assert_eq!(eff.len(), 1);
        assert_eq!(eff[0].kind().key(), "program");
        let rewards = parse(json!([{"exact_match": {}}]));
        let e = check_reward_inputs(&rewards, &bound).unwrap_err();
        assert!(e.to_string().contains("inputs.reward_program"), "{e}");
        let rewards = parse(json!([{"pm": {}}]));
        let e = check_reward_inputs(&rewards, &|_| false).unwrap_err();
        assert!(e.to_string().contains("reward_model"), "{e}");
    }
}
