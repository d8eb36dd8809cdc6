//! Gathering what a report shows, with no rendering: each stage's status as
//! of the cache (the same planner as `alignflow plan`, the lockfile, the
//! stage records and the run logs under `cache/logs/`), the DAG's edges,
//! the training curves of `metrics.jsonl` outputs and the tables of
//! `report.json` outputs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::cache::{ArtifactId, ArtifactKind, Cache, StageRecord};
use crate::engine::{self, Action, LockedStage, Plan, PlannedStage};
use crate::graph::Dag;
use crate::manifest::{LoopRound, Pipeline, Stage};
use crate::ops::OpDecl;

use super::examples::{read_examples, Examples, EXAMPLE_OUTPUTS};
use super::ReportError;

/// Everything one report page shows.
#[derive(Debug, Clone)]
pub struct ReportData {
    pub pipeline: String,
    pub manifest: PathBuf,
    pub cache_dir: PathBuf,
    /// RFC 3339, when the report was collected.
    pub generated_at: String,
    /// In execution (topological) order.
    pub stages: Vec<StageInfo>,
    /// Producer -> consumer, as indices into `stages`.
    pub edges: Vec<EdgeInfo>,
    pub curves: Vec<MetricsLog>,
    pub evaluations: Vec<Evaluation>,
    /// A few records of each output that holds what models wrote.
    pub examples: Vec<Examples>,
    /// Problems met while collecting (an unreadable metrics line, ...):
    /// shown on the page rather than failing the whole report.
    pub notes: Vec<String>,
}

/// Where a stage stands as of the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Up to date: a `run` would take it from the cache.
    Cached,
    /// Ran before, but a `run` would run it again (see the reason).
    Stale,
    /// Its last attempt failed and nothing cached covers it.
    Failed,
    /// No record, lockfile entry or run log mentions it.
    NeverRun,
}

impl Status {
    /// The word shown on the page and used as `data-status`.
    pub fn label(self) -> &'static str {
        match self {
            Status::Cached => "cached",
            Status::Stale => "would rerun",
            Status::Failed => "failed",
            Status::NeverRun => "never run",
        }
    }

    /// A CSS-safe identifier.
    pub fn slug(self) -> &'static str {
        match self {
            Status::Cached => "cached",
            Status::Stale => "stale",
            Status::Failed => "failed",
            Status::NeverRun => "never-run",
        }
    }
}

/// The state of a stage's current fingerprint in the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheState {
    /// A record with every output present.
    Hit,
    /// A record whose outputs were removed (`cache gc`, corruption).
    OutputsMissing,
    /// No record for the fingerprint.
    NoRecord,
    /// The fingerprint is not known until an upstream stage runs.
    Pending,
}

impl CacheState {
    pub fn label(&self) -> &'static str {
        match self {
            CacheState::Hit => "hit",
            CacheState::OutputsMissing => "record, outputs missing",
            CacheState::NoRecord => "no record",
            CacheState::Pending => "key pending upstream",
        }
    }
}

/// The last time a stage ran (or tried to).
#[derive(Debug, Clone)]
pub struct LastRun {
    /// RFC 3339.
    pub started_at: String,
    pub duration_s: Option<f64>,
    pub failed: bool,
    /// The record or run log it comes from.
    pub source: String,
}

#[derive(Debug, Clone)]
pub struct StageInfo {
    pub id: String,
    pub op: String,
    /// The manifest's `description`, if any.
    pub description: Option<String>,
    pub status: Status,
    /// The planner's reason (`up to date`, `params.lr changed ...`), plus the
    /// failure message for a failed stage.
    pub reason: String,
    /// Longest path from a source stage: the DAG column.
    pub depth: usize,
    pub fingerprint: Option<String>,
    pub cache: CacheState,
    pub last_run: Option<LastRun>,
}

#[derive(Debug, Clone)]
pub struct EdgeInfo {
    pub from: usize,
    pub to: usize,
    /// `output -> input`.
    pub label: String,
}

/// One `metrics.jsonl` output: a curve per numeric field.
#[derive(Debug, Clone)]
pub struct MetricsLog {
    pub stage: String,
    pub output: String,
    /// The field on the x axis (`step`, `iteration`, ...), or `line` when
    /// no line has one.
    pub x_field: String,
    /// Lines holding a JSON object.
    pub lines: usize,
    /// True when read from an earlier run than the current fingerprint's.
    pub previous_run: bool,
    pub series: Vec<Series>,
}

/// One numeric field of a metrics log against its x field.
#[derive(Debug, Clone)]
pub struct Series {
    pub field: String,
    /// In file order; only lines where the field is a finite number.
    pub points: Vec<(f64, f64)>,
}

/// One `report.json`-like output, shown as a table of whatever shape it has.
#[derive(Debug, Clone)]
pub struct Evaluation {
    pub stage: String,
    /// The stage's key (its id without `[...]`).
    pub key: String,
    /// The loop and round of a loop's stage.
    pub round: Option<LoopRound>,
    pub output: String,
    pub previous_run: bool,
    pub value: serde_json::Value,
}

/// Fields that serve as the x axis of a metrics log, by preference.
const X_FIELDS: &[&str] = &["step", "iteration", "iter", "epoch", "global_step"];

/// Collects the report of `pipeline` as of `cache` (no stage runs).
pub fn collect(pipeline: &Pipeline, dag: &Dag, cache: &Cache) -> anyhow::Result<ReportData> {
    let (plan, lockfile) = engine::plan_from_cache(pipeline, dag, cache)?;
    let records = records_by_stage(cache, &pipeline.name)?;
    let events = match cache.logs_dir() {
        Ok(dir) => read_run_logs(&dir, pipeline),
        Err(e) => {
            tracing::warn!("no run logs: {e}");
            BTreeMap::new()
        }
    };
    let depth = stage_depths(pipeline, dag);

    let mut data = ReportData {
        pipeline: pipeline.name.clone(),
        manifest: pipeline.file.clone(),
        cache_dir: cache.root().to_path_buf(),
        generated_at: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
        stages: Vec::new(),
        edges: Vec::new(),
        curves: Vec::new(),
        evaluations: Vec::new(),
        examples: Vec::new(),
        notes: Vec::new(),
    };
    for planned in &plan.stages {
        let stage = &pipeline.stages[planned.index];
        let locked = lockfile.as_ref().and_then(|l| l.stages.get(&stage.id));
        let current = match &planned.fingerprint {
            Some(fp) => cache.record(fp).unwrap_or_else(|e| {
                data.notes
                    .push(format!("stage `{}`: unreadable record: {e}", stage.id));
                None
            }),
            None => None,
        };
        let cache_state = match (&planned.fingerprint, planned.action, &current) {
            (None, _, _) => CacheState::Pending,
            (Some(_), Action::Cached, _) => CacheState::Hit,
            (Some(_), Action::Run, Some(_)) => CacheState::OutputsMissing,
            (Some(_), Action::Run, None) => CacheState::NoRecord,
        };
        let event = events.get(&stage.id);
        let last_run = last_run(planned, current.as_ref(), records.get(&stage.id), event);
        let failure = event.and_then(|e| e.failure.clone());
        let (status, reason) = status_and_reason(planned, failure, last_run.as_ref(), locked);
        if let Some((outs, previous_run)) = outputs_to_show(cache, planned, locked) {
            gather_outputs(cache, stage, planned.op, &outs, previous_run, &mut data);
        }
        data.stages.push(StageInfo {
            id: stage.id.clone(),
            op: stage.op.clone(),
            description: stage.description.clone(),
            status,
            reason,
            depth: depth[planned.index],
            fingerprint: planned.fingerprint.as_ref().map(|f| f.0.clone()),
            cache: cache_state,
            last_run,
        });
    }
    data.edges = edges(&plan, dag);
    Ok(data)
}

/// Each stage's depth in the DAG: its longest path from a source.
fn stage_depths(pipeline: &Pipeline, dag: &Dag) -> Vec<usize> {
    let mut depth = vec![0usize; pipeline.stages.len()];
    for &i in dag.order() {
        depth[i] = dag
            .upstream(i)
            .iter()
            .map(|(j, _)| depth[*j] + 1)
            .max()
            .unwrap_or(0);
    }
    depth
}

/// The DAG's edges between the rows of the stage table.
fn edges(plan: &Plan, dag: &Dag) -> Vec<EdgeInfo> {
    // Row position of each stage index, in execution order.
    let position: BTreeMap<usize, usize> = plan
        .stages
        .iter()
        .enumerate()
        .map(|(row, p)| (p.index, row))
        .collect();
    let mut edges = Vec::new();
    for &i in dag.order() {
        for (j, edge) in dag.upstream(i) {
            edges.push(EdgeInfo {
                from: position[&j],
                to: position[&i],
                label: format!("{} -> {}", edge.output, edge.input),
            });
        }
    }
    edges
}

/// The stage's latest run: from its record (the current one when cached,
/// else the newest this pipeline left) or from a run log, whichever started
/// later.
fn last_run(
    planned: &PlannedStage,
    current: Option<&StageRecord>,
    latest: Option<&StageRecord>,
    event: Option<&LogEvent>,
) -> Option<LastRun> {
    let record_run = current
        .filter(|_| planned.action == Action::Cached)
        .or(latest)
        .map(|r| LastRun {
            started_at: r.started_at.clone(),
            duration_s: Some(r.duration_s),
            failed: false,
            source: format!("record {}", r.fingerprint.short()),
        });
    let log_run = event.map(|e| LastRun {
        started_at: humantime::format_rfc3339_seconds(e.started).to_string(),
        duration_s: e.duration.map(|d| d.as_secs_f64()),
        failed: e.failure.is_some(),
        source: format!("run log {}", e.log),
    });
    match (record_run, log_run) {
        (Some(r), Some(l)) if later(&l.started_at, &r.started_at) => Some(l),
        (Some(r), _) => Some(r),
        (None, l) => l,
    }
}

/// The stage's status, and why.
fn status_and_reason(
    planned: &PlannedStage,
    failure: Option<String>,
    last_run: Option<&LastRun>,
    locked: Option<&LockedStage>,
) -> (Status, String) {
    // The planner says `never run` for any stage the lockfile lacks; a
    // record or a log can show otherwise (the lockfile is only written
    // after a successful run).
    let never = planned.reason == "never run";
    if planned.action == Action::Cached {
        (Status::Cached, planned.reason.clone())
    } else if let Some(message) = failure.filter(|_| last_run.is_some_and(|l| l.failed)) {
        let reason = if never {
            message
        } else {
            format!("{message}; would rerun: {}", planned.reason)
        };
        (Status::Failed, reason)
    } else if last_run.is_none() && locked.is_none() {
        (Status::NeverRun, planned.reason.clone())
    } else if never {
        (
            Status::Stale,
            "no cached result for the current inputs (not in the lockfile to compare)".into(),
        )
    } else {
        (Status::Stale, planned.reason.clone())
    }
}

/// Outputs to read curves and tables from: the current ones, else those of
/// the run the lockfile records, when still in the store (`true`: from that
/// previous run).
fn outputs_to_show(
    cache: &Cache,
    planned: &PlannedStage,
    locked: Option<&LockedStage>,
) -> Option<(BTreeMap<String, ArtifactId>, bool)> {
    match (&planned.outputs, locked) {
        (Some(outs), _) => Some((outs.clone(), false)),
        (None, Some(l)) if l.outputs.values().all(|id| cache.has_artifact(id)) => {
            Some((l.outputs.clone(), true))
        }
        _ => None,
    }
}

/// True when RFC 3339 time `a` is after `b` (unparsable times are not).
fn later(a: &str, b: &str) -> bool {
    match (
        humantime::parse_rfc3339_weak(a),
        humantime::parse_rfc3339_weak(b),
    ) {
        (Ok(a), Ok(b)) => a > b,
        _ => false,
    }
}

/// The newest record (by start time) of each stage of pipeline `name`.
fn records_by_stage(
    cache: &Cache,
    name: &str,
) -> Result<BTreeMap<String, StageRecord>, ReportError> {
    let mut out: BTreeMap<String, StageRecord> = BTreeMap::new();
    let records = cache.records().map_err(|e| ReportError::Cache {
        path: cache.root().join("records"),
        message: e.to_string(),
    })?;
    for r in records.into_iter().filter(|r| r.pipeline == name) {
        let newer = out
            .get(&r.stage)
            .is_none_or(|old| later(&r.started_at, &old.started_at));
        if newer {
            out.insert(r.stage.clone(), r);
        }
    }
    Ok(out)
}

/// The last thing a run log says about a stage.
#[derive(Debug, Clone)]
struct LogEvent {
    /// The log's file name.
    log: String,
    started: SystemTime,
    /// Known once the stage finished or failed.
    duration: Option<Duration>,
    /// The failure message (its first [`MAX_FAILURE_LINES`] lines).
    failure: Option<String>,
}

/// Lines of a failure message kept: enough for an exec stage's stderr tail.
const MAX_FAILURE_LINES: usize = 12;

/// Reads `PIPELINE-STAMP-PID.log` files (written by the scheduler's UI)
/// oldest first, keeping the last event of each stage.
///
/// The lines parsed are the scheduler's own: `run     ID (OP)` (`on DEVICE`
/// after it for worker stages),
/// `done    ID (1.23s)` and `FAILED  ID: message`, each behind a
/// `[  1.234s]` offset from the start of the run. Stage ids are matched
/// against the manifest's, so ids with spaces or brackets parse.
fn read_run_logs(dir: &Path, pipeline: &Pipeline) -> BTreeMap<String, LogEvent> {
    let mut logs: Vec<(SystemTime, SystemTime, PathBuf, String)> = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(start) = log_start(&name, &pipeline.name) else {
            continue;
        };
        let mtime = entry.metadata().and_then(|m| m.modified()).unwrap_or(start);
        logs.push((start, mtime, entry.path(), name));
    }
    logs.sort();
    let mut out: BTreeMap<String, LogEvent> = BTreeMap::new();
    for (start, _, path, name) in logs {
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let mut started_at: BTreeMap<&str, f64> = BTreeMap::new();
        // The stage whose failure message the following unstamped lines continue.
        let mut continuing: Option<String> = None;
        for line in text.lines() {
            let Some((offset, body)) = split_log_line(line) else {
                if let Some(f) = continuing
                    .as_ref()
                    .and_then(|id| out.get_mut(id))
                    .and_then(|e| e.failure.as_mut())
                {
                    if f.lines().count() < MAX_FAILURE_LINES {
                        f.push('\n');
                        f.push_str(line);
                    }
                }
                continue;
            };
            continuing = None;
            for stage in &pipeline.stages {
                let id = stage.id.as_str();
                let run_line = format!("run     {id} ({})", stage.op);
                // Worker stages name their device: `run     ID (OP) on cpu`.
                if body == run_line || body.starts_with(&format!("{run_line} on ")) {
                    started_at.insert(id, offset);
                    out.insert(
                        id.to_string(),
                        LogEvent {
                            log: name.clone(),
                            started: start + Duration::from_secs_f64(offset),
                            duration: None,
                            failure: None,
                        },
                    );
                } else if let Some(message) = body.strip_prefix(&format!("FAILED  {id}: ")) {
                    let began = started_at.get(id).copied().unwrap_or(offset);
                    out.insert(
                        id.to_string(),
                        LogEvent {
                            log: name.clone(),
                            started: start + Duration::from_secs_f64(began),
                            duration: Some(Duration::from_secs_f64((offset - began).max(0.0))),
                            failure: Some(message.to_string()),
                        },
                    );
                    continuing = Some(id.to_string());
                } else if body.starts_with(&format!("done    {id} (")) {
                    if let (Some(began), Some(e)) = (started_at.get(id), out.get_mut(id)) {
                        e.duration = Some(Duration::from_secs_f64((offset - began).max(0.0)));
                    }
                }
            }
        }
    }
    out
}

/// `[    1.234s] text` -> (1.234, "text").
fn split_log_line(line: &str) -> Option<(f64, &str)> {
    let rest = line.strip_prefix('[')?;
    let (offset, body) = rest.split_once("s] ")?;
    Some((offset.trim().parse().ok()?, body))
}

/// The start of a run from its log's name `NAME-YYYY-MM-DDTHHMMSSZ-PID.log`.
fn log_start(file: &str, pipeline: &str) -> Option<SystemTime> {
    let rest = file.strip_prefix(pipeline)?.strip_prefix('-')?;
    let (stamp, tail) = rest.split_at_checked(18)?;
    let pid = tail.strip_prefix('-')?.strip_suffix(".log")?;
    if pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // The stamp is RFC 3339 with the colons removed (file-name safe).
    let (date, time) = stamp.split_once('T')?;
    let time = time.strip_suffix('Z')?;
    if time.len() != 6 {
        return None;
    }
    let rfc = format!("{date}T{}:{}:{}Z", &time[..2], &time[2..4], &time[4..6]);
    humantime::parse_rfc3339(&rfc).ok()
}

/// What kind of file an output is, from its name or its op's port doc
/// (which names the file: `metrics.jsonl: step, loss, ...`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OutputKind {
    Metrics,
    Report,
    Other,
}

fn output_kind(op: &OpDecl, output: &str) -> OutputKind {
    let doc = op
        .declared_outputs()
        .iter()
        .find(|p| p.name == output)
        .map(|p| p.doc)
        .unwrap_or("");
    if matches!(output, "metrics" | "metrics.jsonl") || doc.starts_with("metrics.jsonl") {
        OutputKind::Metrics
    } else if matches!(output, "report" | "report.json") || doc.starts_with("report.json") {
        OutputKind::Report
    } else {
        OutputKind::Other
    }
}

/// Reads the curves and evaluation tables among a stage's outputs: file
/// outputs by kind, and `metrics.jsonl` / `report.json` at the top of
/// folder outputs.
fn gather_outputs(
    cache: &Cache,
    stage: &Stage,
    op: &OpDecl,
    outputs: &BTreeMap<String, ArtifactId>,
    previous_run: bool,
    data: &mut ReportData,
) {
    for (name, id) in outputs {
        let path = cache.artifact_path(id);
        if id.kind == ArtifactKind::File && EXAMPLE_OUTPUTS.contains(&name.as_str()) {
            match std::fs::read_to_string(&path) {
                Ok(text) => data.examples.extend(read_examples(&stage.id, name, &text)),
                Err(e) => data
                    .notes
                    .push(format!("stage `{}`, output `{name}`: {e}", stage.id)),
            }
        }
        let mut files: Vec<(String, PathBuf, OutputKind)> = Vec::new();
        match id.kind {
            ArtifactKind::File => files.push((name.clone(), path, output_kind(op, name))),
            ArtifactKind::Tree => {
                for (file, kind) in [
                    ("metrics.jsonl", OutputKind::Metrics),
                    ("report.json", OutputKind::Report),
                ] {
                    if path.join(file).is_file() {
                        files.push((format!("{name}/{file}"), path.join(file), kind));
                    }
                }
            }
        }
        for (output, path, kind) in files {
            match kind {
                OutputKind::Metrics => match read_metrics(&path) {
                    Ok((log, problems)) => {
                        for p in problems {
                            data.notes.push(format!("stage `{}`, {p}", stage.id));
                        }
                        data.curves.push(MetricsLog {
                            stage: stage.id.clone(),
                            output,
                            previous_run,
                            ..log
                        });
                    }
                    Err(e) => data.notes.push(format!("stage `{}`: {e}", stage.id)),
                },
                OutputKind::Report => match read_json(&path) {
                    Ok(value) => data.evaluations.push(Evaluation {
                        stage: stage.id.clone(),
                        key: stage.key.clone(),
                        round: stage.round.clone(),
                        output,
                        previous_run,
                        value,
                    }),
                    Err(e) => data.notes.push(format!("stage `{}`: {e}", stage.id)),
                },
                OutputKind::Other => {}
            }
        }
    }
}

fn read_json(path: &Path) -> Result<serde_json::Value, ReportError> {
    let text = std::fs::read_to_string(path).map_err(|e| ReportError::Read {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    serde_json::from_str(&text).map_err(|e| ReportError::Read {
        path: path.to_path_buf(),
        message: format!("not JSON: {e}"),
    })
}

/// Parses a metrics log: one JSON object per line. Every field that is a
/// number on some line becomes a series against the first of [`X_FIELDS`]
/// present (else the line number). Bad lines are reported, not fatal.
pub fn read_metrics(path: &Path) -> Result<(MetricsLog, Vec<String>), ReportError> {
    let text = std::fs::read_to_string(path).map_err(|e| ReportError::Read {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let mut problems = Vec::new();
    let mut rows: Vec<serde_json::Map<String, serde_json::Value>> = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<serde_json::Value>(line) {
            Ok(serde_json::Value::Object(map)) => rows.push(map),
            Ok(_) => problems.push(format!(
                "{} line {}: not a JSON object; skipped",
                path.display(),
                n + 1
            )),
            Err(e) => problems.push(format!("{} line {}: {e}; skipped", path.display(), n + 1)),
        }
    }
    let x_field = X_FIELDS
        .iter()
        .find(|f| {
            rows.iter()
                .any(|r| r.get(**f).is_some_and(|v| v.is_number()))
        })
        .map(|f| f.to_string());
    // Fields in order of first appearance.
    let mut fields: Vec<String> = Vec::new();
    for row in &rows {
        for (k, v) in row {
            if Some(k) != x_field.as_ref()
                && v.as_f64().is_some_and(f64::is_finite)
                && !fields.contains(k)
            {
                fields.push(k.clone());
            }
        }
    }
    let series = fields
        .into_iter()
        .map(|field| {
            let points = rows
                .iter()
                .enumerate()
                .filter_map(|(n, row)| {
                    let x = match &x_field {
                        Some(f) => row.get(f)?.as_f64()?,
                        None => n as f64,
                    };
                    let y = row.get(&field)?.as_f64()?;
                    (x.is_finite() && y.is_finite()).then_some((x, y))
                })
                .collect();
            Series { field, points }
        })
        .collect();
    Ok((
        MetricsLog {
            stage: String::new(),
            output: String::new(),
            x_field: x_field.unwrap_or_else(|| "line".into()),
            lines: rows.len(),
            previous_run: false,
            series,
        },
        problems,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_names_parse_back_to_their_start_time() {
        let t = log_start("cai-tiny-2025-03-04T050607Z-123.log", "cai-tiny").unwrap();
        assert_eq!(
            humantime::format_rfc3339_seconds(t).to_string(),
            "2025-03-04T05:06:07Z"
        );
        assert!(log_start("cai-tiny-x-2025-03-04T050607Z-123.log", "cai-tiny").is_none());
        assert!(log_start("cai-2025-03-04T050607Z-12a.log", "cai").is_none());
    }

    #[test]
    fn log_lines_split_into_offset_and_text() {
        assert_eq!(
            split_log_line("[    1.250s] FAILED  a b: boom"),
            Some((1.25, "FAILED  a b: boom"))
        );
        assert_eq!(split_log_line("continued message"), None);
    }

    #[test]
    fn metrics_series_follow_the_step_field_and_skip_non_numbers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.jsonl");
        std::fs::write(
            &path,
            "{\"step\":1,\"loss\":2.0,\"tag\":\"x\"}\nnot json\n{\"step\":2,\"loss\":1.5,\"kl\":null}\n{\"step\":3,\"loss\":1.0,\"kl\":0.1}\n",
        )
        .unwrap();
        let (log, problems) = read_metrics(&path).unwrap();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].contains("line 2"), "{problems:?}");
        assert_eq!(log.x_field, "step");
        assert_eq!(log.lines, 3);
        let fields: Vec<&str> = log.series.iter().map(|s| s.field.as_str()).collect();
        assert_eq!(fields, ["loss", "kl"]);
        assert_eq!(log.series[0].points, [(1.0, 2.0), (2.0, 1.5), (3.0, 1.0)]);
        assert_eq!(log.series[1].points, [(3.0, 0.1)]);
    }
}
