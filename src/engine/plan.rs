//! Planning: for each selected stage, `run` or `cached` and why.
//!
//! Inputs are hashed before anything runs (path inputs through the hash
//! cache). A stage whose upstream will rerun cannot know its fingerprint
//! yet: it is planned as `run (upstream X reruns)` and decided again, with
//! the upstream's actual output ids, once X finishes (early cutoff).

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::cache::{ArtifactId, Cache, Fingerprint, StageKey, StageRecord, STAGE_KEY_SCHEMA};
use crate::graph::Dag;
use crate::manifest::{Input, Pipeline, Stage};
use crate::ops::OpDecl;
use crate::remote::{Lookup, Remote};

use super::history::History;
use super::lockfile::{LockedStage, Lockfile};
use super::Error;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Run,
    Cached,
}

/// The plan for one stage.
#[derive(Debug, Clone)]
pub struct PlannedStage {
    /// Index into `pipeline.stages`.
    pub index: usize,
    /// The stage's op, looked up once here.
    pub op: &'static OpDecl,
    pub action: Action,
    pub reason: String,
    /// Known when every input's id is known now.
    pub key: Option<StageKey>,
    pub fingerprint: Option<Fingerprint>,
    /// Outputs of a cached stage.
    pub outputs: Option<BTreeMap<String, ArtifactId>>,
}

/// The plan of a run: selected stages in execution order.
#[derive(Debug, Clone)]
pub struct Plan {
    pub stages: Vec<PlannedStage>,
}

/// One row of `plan --json`.
#[derive(Debug, Serialize)]
pub struct PlanRow<'a> {
    pub stage: &'a str,
    pub action: Action,
    pub reason: &'a str,
    pub fingerprint: Option<&'a str>,
}

impl Plan {
    pub fn rows<'a>(&'a self, pipeline: &'a Pipeline) -> Vec<PlanRow<'a>> {
        self.stages
            .iter()
            .map(|p| PlanRow {
                stage: &pipeline.stages[p.index].id,
                action: p.action,
                reason: &p.reason,
                fingerprint: p.fingerprint.as_ref().map(|f| f.0.as_str()),
            })
            .collect()
    }

    pub fn to_run(&self) -> usize {
        self.stages
            .iter()
            .filter(|s| s.action == Action::Run)
            .count()
    }
}

/// What the planner needs besides the pipeline.
pub struct PlanContext<'a> {
    pub pipeline: &'a Pipeline,
    pub dag: &'a Dag,
    pub cache: &'a Cache,
    pub lockfile: Option<&'a Lockfile>,
    /// Ignore the hash cache and rehash every path input.
    pub rehash: bool,
    /// `run --locked`: assume stages that must run reproduce the outputs
    /// the lockfile records, so every fingerprint can be compared.
    pub locked: bool,
    /// A remote cache read through: a stage it holds a trusted record of
    /// is planned `cached` with the reason `remote` (pulled, not run).
    pub remote: Option<&'a Remote>,
    /// A remote that cannot be read fails the plan (`cache pull`, whose
    /// whole job is the remote), instead of being a miss with a warning
    /// (`run`, `plan`: the stage runs here).
    pub remote_must_answer: bool,
}

/// The reason of a stage whose record is on the remote.
pub const REMOTE_REASON: &str = "remote";

/// The seed of a stage: derived from the pipeline seed and the stage id only.
pub fn stage_seed(pipeline_seed: u64, stage_id: &str) -> u64 {
    let mut hasher = blake3::Hasher::new();
    hasher.update(b"alignflow-stage-seed-v1\0");
    hasher.update(&pipeline_seed.to_le_bytes());
    hasher.update(stage_id.as_bytes());
    let digest = hasher.finalize();
    u64::from_le_bytes(digest.as_bytes()[..8].try_into().expect("8 bytes"))
}

/// The key of `stage` once every input id is known.
pub fn stage_key(
    pipeline: &Pipeline,
    stage: &Stage,
    op_version: u32,
    inputs: BTreeMap<String, ArtifactId>,
) -> StageKey {
    StageKey {
        schema_version: STAGE_KEY_SCHEMA,
        op: stage.op.clone(),
        op_version,
        params: stage.params.clone(),
        inputs,
        seed: stage_seed(pipeline.seed, &stage.id),
    }
}

/// Hashes the path inputs of `stage`, with an error naming the stage, field
/// and manifest location when one cannot be read.
pub fn hash_path_inputs(
    cache: &Cache,
    stage: &Stage,
    rehash: bool,
) -> anyhow::Result<BTreeMap<String, ArtifactId>> {
    let mut ids = BTreeMap::new();
    for (name, path, written, location) in path_inputs(stage) {
        if !path.exists() {
            anyhow::bail!(missing_input(stage, name, written, location, path));
        }
        let id = cache.hash_input(path, rehash).map_err(|e| {
            anyhow::anyhow!(
                "{location}: stage `{}`, field `inputs.{name}`: {e}",
                stage.id
            )
        })?;
        ids.insert(name.clone(), id);
    }
    Ok(ids)
}

/// Every path input of `pipeline` that does not exist, as the error a run
/// would give for it (`alignflow validate` names them all up front).
pub fn missing_path_inputs(pipeline: &Pipeline) -> Vec<String> {
    // One line per input as written: the rounds of a loop and the
    // instances of a matrix read it from one place, and are named once.
    let mut missing: Vec<(String, Vec<&Stage>)> = Vec::new();
    let mut at: BTreeMap<(String, String, std::path::PathBuf), usize> = BTreeMap::new();
    for stage in &pipeline.stages {
        for (name, path, written, location) in path_inputs(stage) {
            if path.exists() {
                continue;
            }
            let place = (location.to_string(), name.clone(), path.clone());
            match at.get(&place) {
                Some(&i) => missing[i].1.push(stage),
                None => {
                    at.insert(place, missing.len());
                    missing.push((
                        missing_input(stage, name, written, location, path),
                        vec![stage],
                    ));
                }
            }
        }
    }
    missing
        .into_iter()
        .map(|(line, stages)| match stages.len() {
            1 => line,
            n => format!(
                "{line} (read by {n} instances of stage `{}`)",
                stages[0].key
            ),
        })
        .collect()
}

/// A stage's file and folder inputs: name, resolved path, the path as
/// written, and where it was written.
fn path_inputs(
    stage: &Stage,
) -> impl Iterator<
    Item = (
        &String,
        &std::path::PathBuf,
        &str,
        &crate::manifest::Location,
    ),
> {
    stage.inputs.iter().filter_map(|(name, input)| match input {
        Input::Path {
            path,
            written,
            location,
        } => Some((name, path, written.as_str(), location)),
        Input::Stage { .. } => None,
    })
}

fn missing_input(
    stage: &Stage,
    name: &str,
    written: &str,
    location: &crate::manifest::Location,
    path: &std::path::Path,
) -> String {
    format!(
        "{location}: stage `{}`, field `inputs.{name}`: `{written}` does not exist ({})",
        stage.id,
        path.display()
    )
}

/// Plans the `selected` stages.
/// The plan of every stage as of the cache and the lockfile beside the
/// manifest, with no remote and no rehashing: what `report` and
/// `export-tb` see. Also returns the lockfile.
pub fn plan_from_cache(
    pipeline: &Pipeline,
    dag: &Dag,
    cache: &Cache,
) -> anyhow::Result<(Plan, Option<Lockfile>)> {
    let lockfile = Lockfile::load(&super::lockfile_path(&pipeline.file))?;
    let selected = (0..pipeline.stages.len()).collect();
    let plan = plan(
        &PlanContext {
            pipeline,
            dag,
            cache,
            lockfile: lockfile.as_ref(),
            rehash: false,
            locked: false,
            remote: None,
            remote_must_answer: false,
        },
        &selected,
    )?;
    Ok((plan, lockfile))
}

pub fn plan(ctx: &PlanContext<'_>, selected: &BTreeSet<usize>) -> Result<Plan, Error> {
    // Outputs known now, per stage index: cached stages, and under --locked
    // the lockfile's outputs of stages that must run.
    let mut known: BTreeMap<usize, BTreeMap<String, ArtifactId>> = BTreeMap::new();
    let history = History::new(ctx.cache);
    let mut out = Vec::new();
    for &i in ctx.dag.order() {
        if selected.contains(&i) {
            out.push(plan_stage(ctx, &history, i, &mut known)?);
        }
    }
    Ok(Plan { stages: out })
}

/// Plans stage `i`, adding its outputs to `known` when they are known now.
fn plan_stage(
    ctx: &PlanContext<'_>,
    history: &History<'_>,
    i: usize,
    known: &mut BTreeMap<usize, BTreeMap<String, ArtifactId>>,
) -> Result<PlannedStage, Error> {
    let pipeline = ctx.pipeline;
    let stage = &pipeline.stages[i];
    let op =
        crate::ops::find(&stage.op).ok_or_else(|| anyhow::anyhow!("unknown op `{}`", stage.op))?;
    let mut inputs = hash_path_inputs(ctx.cache, stage, ctx.rehash)?;
    let mut waiting_on = Vec::new();
    for input in ctx.dag.stage_inputs(pipeline, i) {
        match known
            .get(&input.from)
            .and_then(|outs| outs.get(input.output))
        {
            Some(id) => {
                inputs.insert(input.name.to_string(), id.clone());
            }
            None => waiting_on.push(input.from_id.to_string()),
        }
    }
    if !waiting_on.is_empty() {
        // In input order, each upstream once (two inputs may read one).
        let mut seen = BTreeSet::new();
        waiting_on.retain(|id| seen.insert(id.clone()));
        let mut reason = format!("upstream {} reruns", waiting_on.join(", "));
        // A change to the stage itself is named too: in a loop, every
        // round after the first waits on the round before, and this is
        // what says that the change reaches it as well.
        if let Some(prev) = ctx.lockfile.and_then(|l| l.stages.get(&stage.id)) {
            let own = own_changes(prev, &stage.op, op.version, &stage.params);
            if !own.is_empty() {
                reason = format!("{}; {reason}", own.join("; "));
            }
        }
        return Ok(PlannedStage {
            index: i,
            op,
            action: Action::Run,
            reason,
            key: None,
            fingerprint: None,
            outputs: None,
        });
    }
    let key = stage_key(pipeline, stage, op.version, inputs);
    let fingerprint = key.fingerprint();
    let local = ctx.cache.hit(&fingerprint)?;
    let lacking = local
        .as_ref()
        .map(|record| lacking_outputs(&stage.outputs, record))
        .unwrap_or_default();
    if let Some(record) = local.filter(|_| lacking.is_empty()) {
        known.insert(i, record.outputs.clone());
        return Ok(PlannedStage {
            index: i,
            op,
            action: Action::Cached,
            reason: "up to date".into(),
            key: Some(key),
            fingerprint: Some(fingerprint),
            outputs: Some(record.outputs),
        });
    }
    let remote_record = match ctx.remote {
        Some(remote) => remote_hit(remote, stage, &fingerprint, ctx.remote_must_answer)?,
        None => None,
    };
    if let Some(record) =
        remote_record.filter(|record| lacking_outputs(&stage.outputs, record).is_empty())
    {
        known.insert(i, record.outputs.clone());
        return Ok(PlannedStage {
            index: i,
            op,
            action: Action::Cached,
            reason: REMOTE_REASON.into(),
            key: Some(key),
            fingerprint: Some(fingerprint),
            outputs: Some(record.outputs),
        });
    }
    let previous = ctx.lockfile.and_then(|l| l.stages.get(&stage.id));
    let reason = match (ctx.cache.failure(&fingerprint), previous) {
        _ if !lacking.is_empty() => format!(
            "its cached record lacks output(s) {} (declared since it ran, or written by another engine)",
            lacking.join(", ")
        ),
        (Some(note), _) => failed_reason(&note),
        (None, Some(prev)) => explain(pipeline, stage, prev, &key),
        (None, None) => history
            .reason(pipeline, stage, &key)
            .unwrap_or_else(|| "never run".to_string()),
    };
    if ctx.locked {
        if let Some(prev) = previous.filter(|p| p.fingerprint == fingerprint) {
            known.insert(i, prev.outputs.clone());
        }
    }
    Ok(PlannedStage {
        index: i,
        op,
        action: Action::Run,
        reason,
        key: Some(key),
        fingerprint: Some(fingerprint),
        outputs: None,
    })
}

/// The outputs `stage` declares that `record` lacks: an `exec` stage that
/// declares another output has the same fingerprint (the same command
/// writes it), and its record from before is no hit for it.
pub(super) fn lacking_outputs<'a>(declared: &'a [String], record: &StageRecord) -> Vec<&'a str> {
    declared
        .iter()
        .filter(|name| !record.outputs.contains_key(*name))
        .map(String::as_str)
        .collect()
}

/// The remote's trusted record of `fp`. A remote that cannot be read is
/// a miss with a warning, as a remote build cache is: the stage runs.
fn remote_hit(
    remote: &Remote,
    stage: &Stage,
    fp: &Fingerprint,
    must_answer: bool,
) -> Result<Option<StageRecord>, Error> {
    Ok(match remote.lookup(fp) {
        Ok(Lookup::Found(record)) => Some(record),
        Ok(Lookup::Absent) => None,
        Ok(Lookup::Untrusted(why)) => {
            tracing::warn!(
                "stage `{}`: the record on remote `{}` is ignored: {why}",
                stage.id,
                remote.name()
            );
            None
        }
        Err(e) if must_answer => {
            return Err(anyhow::anyhow!(
                "stage `{}`: cannot look up its record on remote `{}`: {e}",
                stage.id,
                remote.name()
            )
            .into())
        }
        Err(e) => {
            tracing::warn!("stage `{}`: remote not used: {e}", stage.id);
            None
        }
    })
}

/// A stage whose last run with these inputs failed: when, and why.
fn failed_reason(note: &crate::cache::FailureNote) -> String {
    let first_line = note.error.lines().next().unwrap_or_default();
    let log = note
        .log
        .as_ref()
        .map(|l| format!(" (log: {})", l.display()))
        .unwrap_or_default();
    format!("last run failed at {}: {first_line}{log}", note.at)
}

/// Why `key` differs from what the lockfile recorded for the stage.
pub fn explain(pipeline: &Pipeline, stage: &Stage, prev: &LockedStage, key: &StageKey) -> String {
    describe_changes(explain_changes(pipeline, stage, prev, key))
}

/// The changes [`explain_changes`] found, as a reason.
pub(super) fn describe_changes(reasons: Vec<String>) -> String {
    if reasons.is_empty() {
        "outputs missing from the cache".into()
    } else {
        reasons.join("; ")
    }
}

/// What differs between `key` and `prev`, one line a change.
pub(super) fn explain_changes(
    pipeline: &Pipeline,
    stage: &Stage,
    prev: &LockedStage,
    key: &StageKey,
) -> Vec<String> {
    let mut reasons = own_changes(prev, &key.op, key.op_version, &key.params);
    let names: BTreeSet<&String> = prev.inputs.keys().chain(key.inputs.keys()).collect();
    for name in names {
        match (prev.inputs.get(name), key.inputs.get(name)) {
            (Some(_), None) => reasons.push(format!("input {name} removed")),
            (None, Some(_)) => reasons.push(format!("input {name} added")),
            (Some(a), Some(b)) if a.id != *b => {
                let source = match stage.inputs.get(name) {
                    Some(Input::Stage { stage: from, .. }) => format!("upstream {from}"),
                    Some(Input::Path { written, .. }) => format!("path {written}"),
                    None => "?".into(),
                };
                reasons.push(format!("input {name} changed ({source})"));
            }
            _ => {}
        }
    }
    if prev.seed != key.seed {
        reasons.push(format!("seed changed (pipeline seed {})", pipeline.seed));
    }
    reasons
}

/// What changed in the stage itself since `prev`: its op, the op's
/// version, its params.
fn own_changes(
    prev: &LockedStage,
    op: &str,
    op_version: u32,
    params: &serde_json::Value,
) -> Vec<String> {
    let mut reasons = Vec::new();
    if prev.op != op {
        reasons.push(format!("op changed {} -> {op}", prev.op));
    } else if prev.op_version != op_version {
        reasons.push(format!(
            "op {op} version {} -> {op_version}",
            prev.op_version
        ));
    }
    diff_json("params", &prev.params, params, &mut reasons);
    reasons
}

/// Appends `PATH changed A -> B` for each differing leaf.
fn diff_json(path: &str, a: &serde_json::Value, b: &serde_json::Value, out: &mut Vec<String>) {
    use serde_json::Value;
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            for k in keys {
                let p = format!("{path}.{k}");
                match (x.get(k), y.get(k)) {
                    (Some(va), Some(vb)) => diff_json(&p, va, vb, out),
                    (None, Some(vb)) => out.push(format!("{p} added ({})", show(vb))),
                    (Some(va), None) => out.push(format!("{p} removed (was {})", show(va))),
                    (None, None) => {}
                }
            }
        }
        _ if a != b => out.push(format!("{path} changed {} -> {}", show(a), show(b))),
        _ => {}
    }
}

fn show(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) if s.len() > 40 => {
            format!("{:?}", format!("{}...", &s[..s.floor_char_boundary(37)]))
        }
        serde_json::Value::String(s) => format!("{s:?}"),
        other => other.to_string(),
    }
}

/// Differences between the plan and the lockfile that `run --locked` refuses.
pub fn locked_diff(
    pipeline: &Pipeline,
    plan: &Plan,
    lockfile: &Lockfile,
    all_selected: bool,
) -> Vec<String> {
    let mut diffs = Vec::new();
    for p in &plan.stages {
        let stage = &pipeline.stages[p.index];
        match (lockfile.stages.get(&stage.id), &p.key) {
            (None, _) => diffs.push(format!("+ {}: not in the lockfile", stage.id)),
            (Some(prev), Some(key)) if prev.fingerprint != key.fingerprint() => diffs.push(
                format!("~ {}: {}", stage.id, explain(pipeline, stage, prev, key)),
            ),
            (Some(_), None) => diffs.push(format!("~ {}: depends on {}", stage.id, p.reason)),
            _ => {}
        }
    }
    if all_selected {
        for id in lockfile.stages.keys() {
            if pipeline.stage(id).is_none() {
                diffs.push(format!("- {id}: in the lockfile but not in the manifest"));
            }
        }
    }
    diffs
}
