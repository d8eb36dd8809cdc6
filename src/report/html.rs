//! The report page: [`ReportData`] to one self-contained HTML document.
//!
//! Every string from the manifest, the cache or an output goes through
//! [`esc`]. The page is written as polyglot markup (quoted attributes,
//! closed empty elements, no HTML-only entities), so it is also well-formed
//! XML.

use std::fmt::Write as _;

use super::collect::{Evaluation, MetricsLog, ReportData, StageInfo, Status};
use super::dag::{colours, dag_svg};
use super::escape::esc;
use super::plots::curve_svg;
use super::rounds::rounds_section;
use super::ReportError;

const STYLE: &str = r#"
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; background: #fff; }
h1 { margin-bottom: 4px; }
h2 { border-bottom: 1px solid #ccc; padding-bottom: 4px; margin-top: 32px; }
.meta { color: #555; font-size: 14px; }
table { border-collapse: collapse; font-size: 14px; }
th, td { border: 1px solid #ddd; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f5f5f5; }
table.json td.num { text-align: right; font-variant-numeric: tabular-nums; }
.badge { padding: 1px 6px; border-radius: 4px; border: 1px solid; white-space: nowrap; }
.legend span { margin-right: 14px; }
.swatch { display: inline-block; width: 12px; height: 12px; border: 1px solid; vertical-align: middle; margin-right: 4px; }
.plots { display: flex; flex-wrap: wrap; gap: 8px; }
.plots svg { border: 1px solid #eee; }
.scroll { overflow-x: auto; }
code { font-size: 12px; }
td.why { white-space: pre-wrap; max-width: 60ch; }
.note { color: #8a6d00; }
svg.dag { max-width: 100%; height: auto; }
table.examples { table-layout: fixed; width: 100%; }
table.examples td { white-space: pre-wrap; overflow-wrap: anywhere; }
table.examples summary { cursor: pointer; }
"#;

/// Cells longer than this are folded behind their first words.
const FOLD_CHARS: usize = 160;
/// What a folded cell shows.
const SUMMARY_CHARS: usize = 72;

/// Renders the whole page.
pub fn render(data: &ReportData) -> Result<String, ReportError> {
    let mut page = String::new();
    let _ = write!(
        page,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\"/>\n<title>alignflow report: {name}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n<h1>Pipeline {name}</h1>\n",
        name = esc(&data.pipeline)
    );
    let count = |s: Status| data.stages.iter().filter(|x| x.status == s).count();
    let _ = writeln!(
        page,
        "<p class=\"meta\">Manifest <code>{}</code>; cache <code>{}</code>; generated {}.<br/>{} stage(s): {} cached, {} would rerun, {} failed, {} never run.</p>",
        esc(&data.manifest.display().to_string()),
        esc(&data.cache_dir.display().to_string()),
        esc(&data.generated_at),
        data.stages.len(),
        count(Status::Cached),
        count(Status::Stale),
        count(Status::Failed),
        count(Status::NeverRun),
    );

    page.push_str("<section id=\"dag\">\n<h2>Stage graph</h2>\n<p class=\"legend\">");
    for s in [
        Status::Cached,
        Status::Stale,
        Status::Failed,
        Status::NeverRun,
    ] {
        let (fill, stroke) = colours(s);
        let _ = write!(
            page,
            "<span><span class=\"swatch\" style=\"background: {fill}; border-color: {stroke}\"></span>{}</span>",
            s.label()
        );
    }
    page.push_str("</p>\n<div class=\"scroll\">\n");
    page.push_str(&dag_svg(data));
    page.push_str("</div>\n</section>\n");

    page.push_str("<section id=\"stages\">\n<h2>Stages</h2>\n");
    stage_table(&mut page, &data.stages);
    page.push_str("</section>\n");

    page.push_str("<section id=\"curves\">\n<h2>Training curves</h2>\n");
    if data.curves.is_empty() {
        page.push_str("<p>No cached stage has a <code>metrics.jsonl</code> output.</p>\n");
    }
    for log in &data.curves {
        curves(&mut page, log)?;
    }
    page.push_str("</section>\n");

    page.push_str("<section id=\"evaluations\">\n<h2>Evaluations</h2>\n");
    if data.evaluations.is_empty() {
        page.push_str("<p>No cached stage has a <code>report.json</code> output.</p>\n");
    }
    let rows = win_rate_rows(&data.evaluations);
    if !rows.is_empty() {
        // Every evaluation's win rates in one table, so policies trained by
        // different methods in one manifest read side by side.
        page.push_str("<table class=\"win-rates\">\n<tr><th>stage</th><th>policy</th><th>reference</th><th>judge</th><th>win rate</th><th>95% CI</th><th>n</th></tr>\n");
        for row in &rows {
            page.push_str("<tr>");
            for c in row {
                let _ = write!(page, "<td>{}</td>", esc(c));
            }
            page.push_str("</tr>\n");
        }
        page.push_str("</table>\n");
    }
    rounds_section(&mut page, &data.evaluations)?;
    for e in &data.evaluations {
        let _ = write!(
            page,
            "<div class=\"evaluation\" data-stage=\"{s}\" data-output=\"{o}\">\n<h3>{s} \u{b7} {o}{prev}</h3>\n",
            s = esc(&e.stage),
            o = esc(&e.output),
            prev = previous_note(e.previous_run)
        );
        json_block(&mut page, &e.value, 0);
        page.push_str("</div>\n");
    }
    page.push_str("</section>\n");

    examples_section(&mut page, &data.examples);

    if !data.notes.is_empty() {
        page.push_str("<section id=\"notes\">\n<h2>Notes</h2>\n<ul>\n");
        for n in &data.notes {
            let _ = writeln!(page, "<li class=\"note\">{}</li>", esc(n));
        }
        page.push_str("</ul>\n</section>\n");
    }
    page.push_str("</body>\n</html>\n");
    Ok(page)
}

/// A few records of each output that holds what models wrote, long texts
/// folded.
fn examples_section(page: &mut String, examples: &[super::Examples]) {
    page.push_str("<section id=\"examples\">\n<h2>Examples</h2>\n");
    if examples.is_empty() {
        page.push_str("<p>No cached stage has revisions, comparisons or evaluation samples.</p>\n");
    }
    for e in examples {
        let _ = write!(
            page,
            "<div class=\"examples\" data-stage=\"{s}\" data-output=\"{o}\">\n<h3>{s} \u{b7} {o}</h3>\n<p class=\"meta\">{n} of {total} records, drawn at random (seeded by the stage).</p>\n<div class=\"scroll\"><table class=\"examples\">\n<tr>",
            s = esc(&e.stage),
            o = esc(&e.output),
            n = e.rows.len(),
            total = e.total,
        );
        for c in &e.columns {
            let _ = write!(page, "<th>{}</th>", esc(c));
        }
        page.push_str("</tr>\n");
        for row in &e.rows {
            page.push_str("<tr>");
            for cell in row {
                page.push_str("<td>");
                folded(page, cell);
                page.push_str("</td>");
            }
            page.push_str("</tr>\n");
        }
        page.push_str("</table></div>\n</div>\n");
    }
    page.push_str("</section>\n");
}

/// A cell's text, escaped; a long one inside `<details>` behind its start.
fn folded(page: &mut String, text: &str) {
    if text.chars().count() <= FOLD_CHARS {
        page.push_str(&esc(text));
        return;
    }
    let start: String = text.chars().take(SUMMARY_CHARS).collect();
    let _ = write!(
        page,
        "<details><summary>{}\u{2026}</summary>{}</details>",
        esc(&start),
        esc(text)
    );
}

/// One row per (evaluation, judge) of every output shaped like `evaluate`'s
/// report (`judges.NAME.win_rate`): stage, policy, reference, judge, win
/// rate, interval, n.
fn win_rate_rows(evaluations: &[Evaluation]) -> Vec<[String; 7]> {
    let mut rows = Vec::new();
    for e in evaluations {
        let Some(judges) = e.value.get("judges").and_then(|j| j.as_object()) else {
            continue;
        };
        let text = |key: &str| e.value.get(key).map(scalar).unwrap_or_default();
        for (judge, figures) in judges {
            let Some(win) = figures.get("win_rate").and_then(|w| w.as_f64()) else {
                continue;
            };
            let ci = ci_text(figures);
            rows.push([
                e.stage.clone(),
                text("policy"),
                text("reference"),
                judge.clone(),
                format!("{win:.3}"),
                ci,
                text("n"),
            ]);
        }
    }
    rows
}

/// A judge's `ci95` as `[lo, hi]`, or nothing.
pub(super) fn ci_text(figures: &serde_json::Value) -> String {
    match figures.get("ci95").and_then(|c| c.as_array()) {
        Some(c) if c.len() == 2 => format!(
            "[{:.3}, {:.3}]",
            c[0].as_f64().unwrap_or(f64::NAN),
            c[1].as_f64().unwrap_or(f64::NAN)
        ),
        _ => String::new(),
    }
}

fn previous_note(previous_run: bool) -> &'static str {
    if previous_run {
        " (previous run: the stage would rerun)"
    } else {
        ""
    }
}

fn stage_table(page: &mut String, stages: &[StageInfo]) {
    page.push_str(
        "<table class=\"stages\">\n<thead><tr><th>stage</th><th>op</th><th>status</th><th>why</th><th>last run</th><th>duration</th><th>cache</th></tr></thead>\n<tbody>\n",
    );
    for s in stages {
        let (fill, stroke) = colours(s.status);
        let (when, duration) = match &s.last_run {
            Some(r) => (
                format!(
                    "<span title=\"{}\">{}{}</span>",
                    esc(&r.source),
                    esc(&r.started_at),
                    if r.failed { " (failed)" } else { "" }
                ),
                r.duration_s
                    .map(|d| format!("{d:.2} s"))
                    .unwrap_or_else(|| "-".into()),
            ),
            None => ("-".into(), "-".into()),
        };
        let key = match &s.fingerprint {
            Some(fp) => format!(
                "{} <code title=\"{}\">{}</code>",
                esc(s.cache.label()),
                esc(fp),
                esc(&fp[..12.min(fp.len())])
            ),
            None => esc(s.cache.label()),
        };
        let _ = writeln!(
            page,
            "<tr class=\"stage-row\" data-stage=\"{id}\" data-status=\"{slug}\"><td title=\"{description}\">{id}</td><td>{op}</td><td><span class=\"badge\" style=\"background: {fill}; border-color: {stroke}\">{status}</span></td><td class=\"why\">{reason}</td><td>{when}</td><td>{duration}</td><td>{key}</td></tr>",
            id = esc(&s.id),
            description = esc(s.description.as_deref().unwrap_or("")),
            slug = s.status.slug(),
            op = esc(&s.op),
            status = esc(s.status.label()),
            reason = esc(&s.reason),
        );
    }
    page.push_str("</tbody>\n</table>\n");
}

fn curves(page: &mut String, log: &MetricsLog) -> Result<(), ReportError> {
    let _ = write!(
        page,
        "<div class=\"metrics\" data-stage=\"{s}\" data-output=\"{o}\" data-lines=\"{n}\">\n<h3>{s} \u{b7} {o}{prev}</h3>\n<p>{n} line(s); x axis: <code>{x}</code>.</p>\n<div class=\"plots\">\n",
        s = esc(&log.stage),
        o = esc(&log.output),
        n = log.lines,
        x = esc(&log.x_field),
        prev = previous_note(log.previous_run),
    );
    for series in &log.series {
        let name = format!("{}/{}/{}", log.stage, log.output, series.field);
        page.push_str(&curve_svg(
            &name,
            &series.field,
            &log.x_field,
            &series.points,
        )?);
    }
    page.push_str("</div>\n</div>\n");
    Ok(())
}

/// Arrays longer than this show their first items and a count.
const MAX_LIST: usize = 20;

/// Renders any JSON value readably: objects as key/value tables, arrays of
/// objects as tables with a column per key, short arrays of scalars inline.
fn json_block(page: &mut String, value: &serde_json::Value, depth: usize) {
    use serde_json::Value;
    match value {
        Value::Object(map) if map.is_empty() => page.push_str("<em>empty</em>"),
        Value::Object(map) => {
            page.push_str("<table class=\"json\">\n");
            for (k, v) in map {
                let _ = write!(page, "<tr><th>{}</th>", esc(k));
                cell(page, v, depth);
                page.push_str("</tr>\n");
            }
            page.push_str("</table>\n");
        }
        Value::Array(items) if !items.is_empty() && items.iter().all(Value::is_object) => {
            let mut columns: Vec<&String> = Vec::new();
            for item in items {
                for k in item.as_object().expect("all objects").keys() {
                    if !columns.contains(&k) {
                        columns.push(k);
                    }
                }
            }
            page.push_str("<table class=\"json\">\n<tr>");
            for c in &columns {
                let _ = write!(page, "<th>{}</th>", esc(c));
            }
            page.push_str("</tr>\n");
            for item in items.iter().take(MAX_LIST * 5) {
                page.push_str("<tr>");
                for c in &columns {
                    match item.get(c.as_str()) {
                        Some(v) => cell(page, v, depth),
                        None => page.push_str("<td></td>"),
                    }
                }
                page.push_str("</tr>\n");
            }
            page.push_str("</table>\n");
            if items.len() > MAX_LIST * 5 {
                let _ = writeln!(
                    page,
                    "<p>... {} more row(s)</p>",
                    items.len() - MAX_LIST * 5
                );
            }
        }
        Value::Array(items) if items.iter().all(|v| !v.is_object() && !v.is_array()) => {
            let shown: Vec<String> = items.iter().take(MAX_LIST).map(scalar).collect();
            page.push_str(&esc(&shown.join(", ")));
            if items.len() > MAX_LIST {
                let _ = write!(page, " ... ({} more)", items.len() - MAX_LIST);
            }
        }
        Value::Array(items) => {
            page.push_str("<ol>\n");
            for v in items.iter().take(MAX_LIST) {
                page.push_str("<li>");
                json_block(page, v, depth + 1);
                page.push_str("</li>\n");
            }
            page.push_str("</ol>\n");
            if items.len() > MAX_LIST {
                let _ = write!(page, "<p>... {} more</p>", items.len() - MAX_LIST);
            }
        }
        other => page.push_str(&esc(&scalar(other))),
    }
}

fn cell(page: &mut String, value: &serde_json::Value, depth: usize) {
    if value.is_number() {
        let _ = write!(page, "<td class=\"num\">{}</td>", esc(&scalar(value)));
    } else {
        page.push_str("<td>");
        json_block(page, value, depth + 1);
        page.push_str("</td>");
    }
}

/// A scalar as text; floats to 4 decimals (or 4 significant digits when tiny).
pub(super) fn scalar(value: &serde_json::Value) -> String {
    use serde_json::Value;
    match value {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::String(s) => s.clone(),
        Value::Number(n) if n.is_f64() => {
            let v = n.as_f64().unwrap_or(f64::NAN);
            if v != 0.0 && v.abs() < 1e-3 {
                format!("{v:.3e}")
            } else {
                let s = format!("{v:.4}");
                s.trim_end_matches('0').trim_end_matches('.').to_string()
            }
        }
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_evaluation_judge_is_one_row_of_the_win_rate_table() {
        let eval = |stage: &str, policy: &str, w: f64| Evaluation {
            stage: stage.into(),
            key: stage.into(),
            round: None,
            output: "report".into(),
            previous_run: false,
            value: serde_json::json!({
                "policy": policy, "reference": "sl_cai", "n": 60,
                "judges": {
                    "reward_model": {"win_rate": w, "ci95": [w - 0.1, w + 0.1]},
                    "feedback_model": {"win_rate": 0.5}
                }
            }),
        };
        let other = Evaluation {
            stage: "x".into(),
            key: "x".into(),
            round: None,
            output: "report".into(),
            previous_run: false,
            value: serde_json::json!({"accuracy": 0.7}),
        };
        let rows = win_rate_rows(&[
            eval("eval_ppo", "ppo", 0.69),
            other,
            eval("eval_dpo", "dpo", 0.55),
        ]);
        assert_eq!(rows.len(), 4);
        assert_eq!(
            rows[1],
            [
                "eval_ppo",
                "ppo",
                "sl_cai",
                "reward_model",
                "0.690",
                "[0.590, 0.790]",
                "60"
            ]
            .map(String::from)
        );
        assert_eq!(rows[0][3], "feedback_model");
        assert_eq!(rows[0][5], "");
        assert_eq!(
            rows[3][..5],
            ["eval_dpo", "dpo", "sl_cai", "reward_model", "0.550"].map(String::from)
        );
    }

    #[test]
    fn json_objects_become_tables_and_arrays_of_objects_get_columns() {
        let v = serde_json::json!({
            "win_rate": {"pm": 0.61234, "feedback": 0.5},
            "ci": [0.4, 0.7],
            "rows": [{"judge": "pm", "n": 3}, {"judge": "<fm>", "kl": 1e-5}],
        });
        let mut page = String::new();
        json_block(&mut page, &v, 0);
        assert!(page.contains("<th>win_rate</th>"), "{page}");
        assert!(page.contains("<td class=\"num\">0.6123</td>"), "{page}");
        assert!(page.contains("0.4, 0.7"), "{page}");
        assert!(
            page.contains("<tr><th>judge</th><th>n</th><th>kl</th></tr>"),
            "{page}"
        );
        assert!(page.contains("&lt;fm&gt;"), "{page}");
        assert!(page.contains("1.000e-5"), "{page}");
    }
}
