//! `loops:`: stages that run once per round, each round reading what the
//! previous one produced.
//!
//! The loader unrolls a loop into ordinary stages `STAGE[round=1]`,
//! `STAGE[round=2]`, ... (named like matrix instances, so plan, cache,
//! lockfile, `--target` and the report need nothing of their own), and
//! substitutes `${loop.NAME}` per round as text before anything else is
//! read: round 1 reads a carried value's `init`, round k what its `next`
//! named in round k-1 (`next: ${stages.dpo.model}` reads, in round 3,
//! `${stages.dpo[round=2].model}`). `${loop.round}` is the round number.
//!
//! Errors come back as [`LoopError`]s, key paths into the manifest that
//! the resolver locates.
use std::collections::{BTreeMap, HashMap};

use serde_json::Value as Json;
use serde_yaml::Value as Yaml;

use super::include::{key_text, kp};
use super::interp::{self, Piece, LOOP};
use super::locate::KeyPath;
use super::schema::{Manifest, Rounds};
use crate::ops::nearest;

const LOOP_KEYS: &[&str] = &["rounds", "carry", "stages"];
const CARRY_KEYS: &[&str] = &["init", "next"];
/// `${loop.round}`: the round number, not a carried value.
const ROUND: &str = "round";
/// A bound on `rounds`, so a typo (`rounds: 30000`) is an error rather
/// than a manifest of a hundred thousand stages.
pub(crate) const MAX_ROUNDS: u64 = 1000;

/// A loop error, at a key path of the manifest (its key, or its value).
#[derive(Debug)]
pub(crate) struct LoopError {
    pub at: KeyPath,
    /// Located at the key rather than the value.
    pub at_key: bool,
    pub field: String,
    pub message: String,
    pub suggestion: Option<String>,
}

impl LoopError {
    fn at_value(at: KeyPath, message: String, suggestion: Option<String>) -> LoopError {
        let field = at.join(".");
        LoopError {
            at,
            at_key: false,
            field,
            message,
            suggestion,
        }
    }

    fn at_key(at: KeyPath, message: String, suggestion: Option<String>) -> LoopError {
        LoopError {
            at_key: true,
            ..LoopError::at_value(at, message, suggestion)
        }
    }
}

/// A reference that does not resolve: the message and a suggestion.
type RefError = (String, Option<String>);

/// The checked loops of a manifest.
#[derive(Debug, Default)]
pub(crate) struct Loops {
    loops: Vec<Loop>,
    /// Stage key -> index into `loops`.
    of_stage: HashMap<String, usize>,
}

/// One loop, its round count known.
#[derive(Debug)]
pub(crate) struct Loop {
    pub name: String,
    pub rounds: u64,
    /// Its stages, in the order of its `stages:` list.
    pub stages: Vec<String>,
    carry: BTreeMap<String, Carry>,
}

#[derive(Debug)]
struct Carry {
    /// Round 1's value, as written.
    init: String,
    next: Next,
}

/// Where a carried value comes from after round 1.
#[derive(Debug)]
enum Next {
    /// `${stages.STAGE.OUTPUT}` of a stage of the loop, in the round before.
    Output { stage: String, output: String },
    /// `${loop.NAME}`: another carried value as it was in the round before.
    Carried(String),
}

/// Refuses what serde would only call an unknown field: a loop inside a
/// loop, and misspelt keys (with the nearest valid one).
pub(crate) fn check_tree(loops: &Yaml) -> Result<(), LoopError> {
    let Some(loops) = loops.as_mapping() else {
        return Ok(());
    };
    for (name, def) in loops {
        let name = key_text(name);
        let Some(def) = def.as_mapping() else {
            continue;
        };
        for key in def.keys().map(key_text) {
            let at = kp(&["loops", &name, &key]);
            if key == "loops" {
                let msg = format!(
                    "a loop inside a loop is not supported: declare the inner loop beside `{name}` under the top-level `loops:`, and let it read the rounds it needs as `${{stages.STAGE[round=N].OUTPUT}}`"
                );
                return Err(LoopError::at_key(at, msg, None));
            }
            if !LOOP_KEYS.contains(&key.as_str()) {
                let s = nearest(&key, LOOP_KEYS.iter().copied());
                return Err(LoopError::at_key(at, "unknown field".into(), s));
            }
        }
        let Some(carry) = def.get("carry").and_then(Yaml::as_mapping) else {
            continue;
        };
        for (value, spec) in carry {
            let value = key_text(value);
            for key in spec.as_mapping().into_iter().flat_map(|m| m.keys()) {
                let key = key_text(key);
                if !CARRY_KEYS.contains(&key.as_str()) {
                    let at = kp(&["loops", &name, "carry", &value, &key]);
                    let s = nearest(&key, CARRY_KEYS.iter().copied());
                    return Err(LoopError::at_key(at, "unknown field".into(), s));
                }
            }
        }
    }
    Ok(())
}

impl Loops {
    /// Checks the manifest's loops, in declaration `order`: round counts
    /// (after `--set`), stage lists, carried values. `outputs(KEY)` lists
    /// a stage's outputs.
    pub fn new<'o>(
        manifest: &Manifest,
        order: &[String],
        params: &BTreeMap<String, Json>,
        outputs: impl Fn(&str) -> Option<&'o [String]>,
    ) -> Result<Loops, LoopError> {
        let mut loops = Loops::default();
        for name in order {
            let def = &manifest.loops[name];
            let at = |rest: &[&str]| [kp(&["loops", name]), kp(rest)].concat();
            let rounds = rounds(&def.rounds, params, at(&["rounds"]))?;
            if def.stages.is_empty() {
                let msg = "a loop needs at least one stage".to_string();
                return Err(LoopError::at_value(at(&["stages"]), msg, None));
            }
            for (i, stage) in def.stages.iter().enumerate() {
                let here = at(&["stages", &i.to_string()]);
                loops.check_member(manifest, name, stage, &def.stages[..i], here)?;
                loops.of_stage.insert(stage.clone(), loops.loops.len());
            }
            let mut carry = BTreeMap::new();
            for (value, spec) in &def.carry {
                if value == ROUND {
                    let msg = "`round` is the round number (`${loop.round}`); give the carried value another name".to_string();
                    return Err(LoopError::at_key(at(&["carry", value]), msg, None));
                }
                let init_at = at(&["carry", value, "init"]);
                if !interp::names(&spec.init, LOOP).is_empty() {
                    let msg =
                        "`init` is round 1's value and cannot read `${loop.NAME}`".to_string();
                    return Err(LoopError::at_value(init_at, msg, None));
                }
                let next_at = at(&["carry", value, "next"]);
                let next = next(name, &def.stages, &spec.next, &outputs)
                    .map_err(|(m, s)| LoopError::at_value(next_at, m, s))?;
                let init = spec.init.clone();
                carry.insert(value.clone(), Carry { init, next });
            }
            let l = Loop {
                name: name.clone(),
                rounds,
                stages: def.stages.clone(),
                carry,
            };
            l.check_carried(&at)?;
            l.check_init_reads_no_round_of_itself(manifest, &at)?;
            loops.loops.push(l);
        }
        Ok(loops)
    }

    /// One entry of a loop's `stages:`: a declared stage, in no other loop,
    /// listed once, not a loop, without a matrix.
    fn check_member(
        &self,
        manifest: &Manifest,
        name: &str,
        stage: &str,
        before: &[String],
        at: KeyPath,
    ) -> Result<(), LoopError> {
        if manifest.loops.contains_key(stage) && !manifest.stages.contains_key(stage) {
            let msg = format!(
                "`{stage}` is a loop, and a loop inside a loop is not supported: list stages here, and let loop `{stage}` read the rounds it needs as `${{stages.STAGE[round=N].OUTPUT}}`"
            );
            return Err(LoopError::at_value(at, msg, None));
        }
        let Some(def) = manifest.stages.get(stage) else {
            let msg = format!("unknown stage `{stage}` in loop `{name}`");
            let s = nearest(stage, manifest.stages.keys().map(String::as_str));
            return Err(LoopError::at_value(at, msg, s));
        };
        if before.iter().any(|s| s == stage) {
            let msg = format!("stage `{stage}` is listed twice in loop `{name}`");
            return Err(LoopError::at_value(at, msg, None));
        }
        if let Some(&other) = self.of_stage.get(stage) {
            let msg = format!(
                "stage `{stage}` is already in loop `{}`: a stage belongs to one loop (a loop inside a loop is not supported)",
                self.loops[other].name
            );
            return Err(LoopError::at_value(at, msg, None));
        }
        if def.matrix.is_some() {
            let msg = format!(
                "stage `{stage}` has a `matrix`, and a loop's stage cannot: its rounds are its instances (`{stage}[round=1]`, ...)"
            );
            return Err(LoopError::at_value(at, msg, None));
        }
        Ok(())
    }

    /// The loop of stage `key`, if it is in one.
    pub fn of(&self, key: &str) -> Option<&Loop> {
        self.of_stage.get(key).map(|&i| &self.loops[i])
    }

    /// `s`, written in stage `key`, with every `${loop.NAME}` replaced by
    /// its value in `round` (`$${` escapes kept).
    pub fn substitute(&self, s: &str, key: &str, round: Option<u64>) -> Result<String, RefError> {
        interp::substitute_refs(s, LOOP, |name| {
            match (self.of(key), round) {
            (Some(l), Some(round)) => l.value(name, round),
            _ => Err((
                format!(
                    "`${{loop.{name}}}` in stage `{key}`, which is in no loop (list it in a loop's `stages:`)"
                ),
                None,
            )),
        }
        })
    }

    /// `${loop.round}` as the whole of `s` in a loop's stage: the round,
    /// as a number (a param keeps its type, as with `${params.NAME}`).
    pub fn whole_round(s: &str, round: Option<u64>) -> Option<Json> {
        round.filter(|_| s == "${loop.round}").map(Json::from)
    }
}

impl Loop {
    /// Carried value `name` (or `round`) in `round`, as text.
    fn value(&self, name: &str, round: u64) -> Result<String, RefError> {
        if name == ROUND {
            return Ok(round.to_string());
        }
        let Some(carry) = self.carry.get(name) else {
            let known: Vec<&str> = self.carry.keys().map(String::as_str).collect();
            let msg = format!(
                "unknown carried value `{name}` in `${{loop.{name}}}` (loop `{}` carries: {}; `${{loop.round}}` is the round)",
                self.name,
                if known.is_empty() {
                    "nothing".to_string()
                } else {
                    known.join(", ")
                }
            );
            let s = nearest(name, known.iter().copied().chain([ROUND]));
            return Err((msg, s));
        };
        if round == 1 {
            return Ok(carry.init.clone());
        }
        match &carry.next {
            Next::Output { stage, output } => {
                Ok(format!("${{stages.{stage}[round={}].{output}}}", round - 1))
            }
            Next::Carried(other) => self.value(other, round - 1),
        }
    }

    /// A `next: ${loop.NAME}` names a carried value, and following such
    /// `next`s ends at a stage's output: a cycle of them is a value no
    /// stage ever produces.
    fn check_carried(&self, at: &dyn Fn(&[&str]) -> KeyPath) -> Result<(), LoopError> {
        for (start, carry) in &self.carry {
            let mut path = vec![start.as_str()];
            let mut next = &carry.next;
            while let Next::Carried(other) = next {
                let next_at = at(&["carry", path[path.len() - 1], "next"]);
                let Some(c) = self.carry.get(other) else {
                    let msg = format!(
                        "unknown carried value `{other}` in `${{loop.{other}}}` (loop `{}` carries: {})",
                        self.name,
                        self.carry.keys().cloned().collect::<Vec<_>>().join(", ")
                    );
                    let s = nearest(other, self.carry.keys().map(String::as_str));
                    return Err(LoopError::at_value(next_at, msg, s));
                };
                if path.contains(&other.as_str()) {
                    path.push(other);
                    let msg = format!(
                        "cycle through `next`: {} (each takes the other's value, so no stage of loop `{}` ever produces them; one `next` must read a stage's output, `${{stages.STAGE.OUTPUT}}`)",
                        path.join(" -> "),
                        self.name
                    );
                    let start_at = at(&["carry", start, "next"]);
                    return Err(LoopError::at_value(start_at, msg, None));
                }
                path.push(other);
                next = &c.next;
            }
        }
        Ok(())
    }

    /// Round 1 cannot read the loop's own stages: they need round 1.
    fn check_init_reads_no_round_of_itself(
        &self,
        manifest: &Manifest,
        at: &dyn Fn(&[&str]) -> KeyPath,
    ) -> Result<(), LoopError> {
        for (name, carry) in &self.carry {
            let Ok(pieces) = interp::parse(&carry.init) else {
                // The stage that reads it reports the syntax, located.
                continue;
            };
            for piece in pieces {
                let Piece::Stage(r) = piece else { continue };
                let Some(stage) = stage_key(manifest.stages.keys().map(String::as_str), &r) else {
                    continue;
                };
                if self.stages.iter().any(|s| s == stage) {
                    let msg = format!(
                        "cycle through `init`: `{stage}` is a stage of loop `{}`, so round 1 would read its own output; `init` is what round 1 starts from (a path, `${{params.NAME}}` or a stage outside the loop), `next` what later rounds read",
                        self.name
                    );
                    return Err(LoopError::at_value(at(&["carry", name, "init"]), msg, None));
                }
            }
        }
        Ok(())
    }
}

/// The longest stage key that reference `r` (`ID.OUTPUT`, `ID[..].OUTPUT`)
/// starts with (keys may contain dots).
pub(crate) fn stage_key<'k>(keys: impl Iterator<Item = &'k str>, r: &str) -> Option<&'k str> {
    keys.filter(|k| {
        r.strip_prefix(*k)
            .is_some_and(|rest| rest.starts_with(['.', '[']))
    })
    .max_by_key(|k| k.len())
}

/// A loop's round count: a number, or a whole `${params.NAME}`.
fn rounds(
    written: &Rounds,
    params: &BTreeMap<String, Json>,
    at: KeyPath,
) -> Result<u64, LoopError> {
    let (n, from) = match written {
        Rounds::Count(n) => (Json::from(*n), String::new()),
        Rounds::Other(v) => (v.clone(), String::new()),
        Rounds::Param(s) => {
            let name = match interp::parse(s).as_deref() {
                Ok([Piece::Param(name)]) => name.clone(),
                _ => {
                    let quoted = if s.trim().parse::<f64>().is_ok() {
                        format!(" (write {} without quotes)", s.trim())
                    } else {
                        String::new()
                    };
                    let msg = format!(
                        "`rounds` must be a whole number or `${{params.NAME}}`, not the text \"{s}\"{quoted}"
                    );
                    return Err(LoopError::at_value(at, msg, None));
                }
            };
            let Some(value) = params.get(&name) else {
                let msg = format!("unknown param `${{params.{name}}}`");
                let s = nearest(&name, params.keys().map(String::as_str))
                    .map(|s| format!("params.{s}"));
                return Err(LoopError::at_value(at, msg, s));
            };
            (value.clone(), format!(" (`${{params.{name}}}`)"))
        }
    };
    match n.as_u64() {
        Some(n @ 1..=MAX_ROUNDS) => Ok(n),
        _ => {
            let msg = format!(
                "a loop runs from 1 to {MAX_ROUNDS} rounds, not {}{from}",
                interp::render(&n)
            );
            Err(LoopError::at_value(at, msg, None))
        }
    }
}

/// Parses a carried value's `next`: an output of one of the loop's stages,
/// or another carried value.
fn next<'o>(
    name: &str,
    stages: &[String],
    written: &str,
    outputs: &impl Fn(&str) -> Option<&'o [String]>,
) -> Result<Next, RefError> {
    if let [other] = interp::names(written, LOOP).as_slice() {
        if written == format!("${{loop.{other}}}") {
            return Ok(Next::Carried(other.clone()));
        }
    }
    let form =
        "`next` must be `${stages.STAGE.OUTPUT}` of one of the loop's stages, or `${loop.NAME}`";
    let pieces = interp::parse(written);
    let Ok([Piece::Stage(r)]) = pieces.as_deref() else {
        return Err((format!("{form}, not `{written}`"), None));
    };
    let listed = || stages.join(", ");
    let Some(stage) = stage_key(stages.iter().map(String::as_str), r) else {
        let id = &r[..r.find(['.', '[']).unwrap_or(r.len())];
        let within = nearest(id, stages.iter().map(String::as_str));
        let msg = if outputs(id).is_some() {
            format!("the carried value is never produced: `next` reads `{id}`, which is not a stage of loop `{name}` (its stages: {})", listed())
        } else {
            format!(
                "unknown stage `{id}` in `next` (loop `{name}`'s stages: {})",
                listed()
            )
        };
        return Err((msg, within));
    };
    let rest = &r[stage.len()..];
    if rest.starts_with('[') {
        let msg = format!(
            "`next` reads the round that just ended: write `${{stages.{stage}.OUTPUT}}` without a round"
        );
        return Err((msg, None));
    }
    let output = &rest[1..];
    let declared = outputs(stage).unwrap_or_default();
    if !declared.iter().any(|o| o == output) {
        let msg = format!(
            "the carried value is never produced: stage `{stage}` has no output `{output}` (outputs: {})",
            declared.join(", ")
        );
        return Err((msg, nearest(output, declared.iter().map(String::as_str))));
    }
    Ok(Next::Output {
        stage: stage.to_string(),
        output: output.to_string(),
    })
}

/// The round a reference names inside `[...]` (`round=3`), if it names one.
pub(crate) fn named_round(brackets: &str) -> Option<u64> {
    brackets
        .strip_prefix('[')?
        .strip_suffix(']')?
        .strip_prefix("round=")?
        .parse()
        .ok()
}
