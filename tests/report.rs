//! `alignflow report`: the page holds each stage with its status as of the
//! cache, the DAG, a curve per numeric field of every metrics log (with a
//! point per line, in step order) and evaluation tables, all escaped.
mod common;
use common::*;

use std::collections::{BTreeMap, BTreeSet};

/// A tiny LM, SFT on it, a stage that is never run, an exec stage writing
/// a `report` output, one whose params the test changes, one that fails.
const PIPELINE: &str = r#"version: 1
name: rep
seed: 3
params:
  greeting: hello
stages:
  hh:
    op: dataset.import
    inputs: { source: hh.jsonl }
  tok:
    op: tokenizer.train
    inputs: { data: "${stages.hh.data}" }
    params: { vocab_size: 384 }
  base:
    op: lm.pretrain
    inputs: { data: "${stages.hh.data}", tokenizer: "${stages.tok.tokenizer}" }
    params: { width: 32, layers: 1, heads: 2, positions: 64, seq_len: 32, batch_size: 2, max_steps: 6, lr: 1e-2 }
  sft:
    op: sft
    inputs: { model: "${stages.base.model}", data: "${stages.hh.data}" }
    params: { response_field: chosen, max_len: 48, batch_size: 2, max_steps: 4, lr: 1e-3 }
  gen:
    op: generate
    description: samples from the SFT model
    inputs: { model: "${stages.sft.model}", prompts: prompts.jsonl }
    params: { n: 1, max_new_tokens: 4 }
  judge:
    op: exec
    outputs: [report]
    params:
      cmd: >-
        printf '%s' '{"win_rate": {"<pm & co>": 0.61234, "feedback": 0.5}, "ci": [0.41, 0.7], "judges": [{"judge": "pm", "n": 8}, {"judge": "fm", "kl": 0.25}]}' > "$ALIGNFLOW_OUT/report"
  note:
    op: exec
    outputs: [out]
    params:
      cmd: echo ${params.greeting} > "$ALIGNFLOW_OUT/out"
  broken:
    op: exec
    outputs: [out]
    params:
      cmd: echo "bad <input>" >&2; exit 3
"#;

fn project() -> Project {
    let p = Project::new();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let sample = std::fs::read_to_string(root.join("examples/hh-rlhf-sample.jsonl")).unwrap();
    p.write(
        "hh.jsonl",
        &sample.lines().take(40).collect::<Vec<_>>().join("\n"),
    );
    p.write(
        "prompts.jsonl",
        "{\"prompt\": \"\\n\\nHuman: hi\\n\\nAssistant:\"}\n",
    );
    p.write("rep.yaml", PIPELINE);
    p
}

/// The report page parsed as XML (the page is polyglot markup).
struct Page {
    text: String,
}

impl Page {
    fn read(p: &Project, rel: &str) -> Page {
        Page { text: p.read(rel) }
    }

    fn doc(&self) -> roxmltree::Document<'_> {
        roxmltree::Document::parse_with_options(
            &self.text,
            roxmltree::ParsingOptions {
                allow_dtd: true,
                ..Default::default()
            },
        )
        .unwrap_or_else(|e| panic!("the report is not well-formed: {e}"))
    }
}

fn has_class(n: &roxmltree::Node, class: &str) -> bool {
    n.attribute("class")
        .is_some_and(|c| c.split_whitespace().any(|x| x == class))
}

fn text_of(n: &roxmltree::Node) -> String {
    n.descendants().filter_map(|d| d.text()).collect()
}

/// data-stage -> data-status of the elements with `class` and `tag`.
fn statuses(doc: &roxmltree::Document, tag: &str, class: &str) -> BTreeMap<String, String> {
    doc.descendants()
        .filter(|n| n.has_tag_name(tag) && has_class(n, class))
        .map(|n| {
            (
                n.attribute("data-stage").unwrap().to_string(),
                n.attribute("data-status").unwrap().to_string(),
            )
        })
        .collect()
}

fn row<'a>(doc: &'a roxmltree::Document, stage: &str) -> roxmltree::Node<'a, 'a> {
    doc.descendants()
        .find(|n| n.has_tag_name("tr") && n.attribute("data-stage") == Some(stage))
        .unwrap_or_else(|| panic!("no table row for {stage}"))
}

/// Pixel coordinates of each curve, by its data-series.
fn curves(doc: &roxmltree::Document) -> BTreeMap<String, Vec<(f64, f64)>> {
    let mut out = BTreeMap::new();
    for n in doc
        .descendants()
        .filter(|n| n.has_tag_name("polyline") && has_class(n, "curve"))
    {
        let series = n.attribute("data-series").unwrap().to_string();
        let points = n
            .attribute("points")
            .unwrap()
            .split_whitespace()
            .map(|xy| {
                let (x, y) = xy.split_once(',').unwrap();
                (x.parse().unwrap(), y.parse().unwrap())
            })
            .collect();
        assert!(
            out.insert(series.clone(), points).is_none(),
            "series {series} drawn twice"
        );
    }
    out
}

/// The lines of a stage's metrics output, found with `show --json`.
fn metrics_lines(p: &Project, stage: &str) -> Vec<serde_json::Map<String, serde_json::Value>> {
    let shown: serde_json::Value =
        serde_json::from_str(&p.ok(&["show", "rep.yaml", stage, "--json"])).unwrap();
    let path = shown["metrics"]["path"].as_str().unwrap();
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn report_shows_statuses_dag_curves_and_evaluations() {
    let p = project();
    // A targeted run records the lockfile only when asked: the report
    // compares `note`'s params against it below.
    p.ok(&[
        "run",
        "rep.yaml",
        "--quiet",
        "--update-lock",
        "-t",
        "sft",
        "-t",
        "judge",
        "-t",
        "note",
    ]);
    let stderr = p.fails(&["run", "rep.yaml", "--quiet", "-t", "broken"]);
    assert!(stderr.contains("exit status 3"), "{stderr}");

    // `note` now differs from what it last ran with.
    let out = p.ok(&["report", "rep.yaml", "--set", "params.greeting=bye"]);
    assert_eq!(
        out.trim(),
        p.path("cache/reports/rep.html").display().to_string()
    );
    let page = Page::read(&p, "cache/reports/rep.html");
    let doc = page.doc();

    let expected: BTreeMap<String, String> = [
        ("hh", "cached"),
        ("tok", "cached"),
        ("base", "cached"),
        ("sft", "cached"),
        ("gen", "never-run"),
        ("judge", "cached"),
        ("note", "stale"),
        ("broken", "failed"),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    assert_eq!(statuses(&doc, "tr", "stage-row"), expected, "stage table");
    // The manifest's description, on the stage's name.
    let html = std::fs::read_to_string(p.path("cache/reports/rep.html")).unwrap();
    assert!(
        html.contains("<td title=\"samples from the SFT model\">gen</td>"),
        "no description in the stage table"
    );
    assert_eq!(statuses(&doc, "g", "stage"), expected, "DAG boxes");
    // Each stage-reference input is one edge.
    let edges: BTreeSet<(String, String)> = doc
        .descendants()
        .filter(|n| n.has_tag_name("path") && has_class(n, "edge"))
        .map(|n| {
            (
                n.attribute("data-from").unwrap().into(),
                n.attribute("data-to").unwrap().into(),
            )
        })
        .collect();
    let want: BTreeSet<(String, String)> = [
        ("hh", "tok"),
        ("hh", "base"),
        ("tok", "base"),
        ("base", "sft"),
        ("hh", "sft"),
        ("sft", "gen"),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    assert_eq!(edges, want);

    let note = text_of(&row(&doc, "note"));
    assert!(note.contains("would rerun"), "{note}");
    assert!(note.contains("params.cmd changed"), "{note}");
    assert!(note.contains(" s"), "a duration: {note}");
    let broken = text_of(&row(&doc, "broken"));
    assert!(broken.contains("exit status 3"), "{broken}");
    assert!(broken.contains("(failed)"), "{broken}");
    assert!(broken.contains("bad <input>"), "stderr tail: {broken}");
    assert!(page.text.contains("bad &lt;input&gt;"));
    let gen = text_of(&row(&doc, "gen"));
    assert!(gen.contains("never run"), "{gen}");
    let base = text_of(&row(&doc, "base"));
    assert!(base.contains("hit"), "{base}");
    assert!(base.contains(" s"), "{base}");

    // One curve per numeric field of each metrics log, one point per line,
    // x increasing with the step.
    let drawn = curves(&doc);
    let mut expected_series = BTreeSet::new();
    for stage in ["base", "sft"] {
        let lines = metrics_lines(&p, stage);
        assert!(lines.len() >= 4, "{stage}: {} lines", lines.len());
        let fields: BTreeSet<&String> = lines
            .iter()
            .flat_map(|l| l.iter().filter(|(k, v)| *k != "step" && v.is_number()))
            .map(|(k, _)| k)
            .collect();
        assert!(fields.contains(&"loss".to_string()), "{fields:?}");
        for field in fields {
            let series = format!("{stage}/metrics/{field}");
            let points = drawn
                .get(&series)
                .unwrap_or_else(|| panic!("no curve {series}"));
            assert_eq!(points.len(), lines.len(), "{series}");
            assert!(
                points.windows(2).all(|w| w[0].0 < w[1].0),
                "{series}: x must increase with the step: {points:?}"
            );
            expected_series.insert(series);
        }
        // The loss curve goes up where the loss goes down (SVG y points down).
        let loss: Vec<f64> = lines.iter().map(|l| l["loss"].as_f64().unwrap()).collect();
        let ys: Vec<f64> = drawn[&format!("{stage}/metrics/loss")]
            .iter()
            .map(|p| p.1)
            .collect();
        let span = loss.iter().cloned().fold(f64::MIN, f64::max)
            - loss.iter().cloned().fold(f64::MAX, f64::min);
        for i in 0..loss.len() {
            for j in 0..loss.len() {
                if loss[i] > loss[j] + span * 0.05 {
                    assert!(ys[i] < ys[j], "{stage} loss {i} vs {j}: {loss:?} {ys:?}");
                }
            }
        }
    }
    assert_eq!(
        drawn.keys().cloned().collect::<BTreeSet<_>>(),
        expected_series,
        "no other curves"
    );

    // The evaluation table of `judge`, escaped.
    let judge = doc
        .descendants()
        .find(|n| has_class(n, "evaluation") && n.attribute("data-stage") == Some("judge"))
        .expect("judge's report table");
    let text = text_of(&judge);
    for want in ["<pm & co>", "0.6123", "0.41, 0.7", "feedback", "kl", "0.25"] {
        assert!(text.contains(want), "{want} in {text}");
    }
    assert!(page.text.contains("&lt;pm &amp; co&gt;"));
    assert!(!page.text.contains("<script"), "no scripts");
    assert_eq!(
        page.text.matches("http").count(),
        page.text.matches("http://www.w3.org/2000/svg").count(),
        "nothing fetched: the only URIs are the SVG namespace"
    );

    // --out writes elsewhere; the default page is left as it was.
    let out = p.ok(&["report", "rep.yaml", "--out", "elsewhere/r.html"]);
    assert_eq!(out.trim(), "elsewhere/r.html");
    let other = Page::read(&p, "elsewhere/r.html");
    assert_eq!(statuses(&other.doc(), "tr", "stage-row")["note"], "cached");
}

#[test]
fn statuses_follow_the_cache_before_and_after_runs_and_edits() {
    let p = Project::new();
    p.write("input.txt", "one\n");
    p.write("chain.yaml", CHAIN);
    let report = |p: &Project| {
        p.ok(&["report", "chain.yaml"]);
        let page = Page::read(p, "cache/reports/chain.html");
        let doc = page.doc();
        let s = statuses(&doc, "tr", "stage-row");
        assert_eq!(s, statuses(&doc, "g", "stage"));
        assert_eq!(curves(&doc).len(), 0, "no metrics logs");
        s
    };
    let all = |status: &str| -> BTreeMap<String, String> {
        ["a", "b", "c", "d"]
            .iter()
            .map(|s| (s.to_string(), status.to_string()))
            .collect()
    };
    assert_eq!(report(&p), all("never-run"));
    assert!(!p.path("runs.txt").exists(), "report runs nothing");
    p.ok(&["run", "chain.yaml", "--quiet"]);
    assert_eq!(report(&p), all("cached"));
    p.write("input.txt", "two\n");
    let mut want = all("stale");
    want.insert("d".into(), "cached".into());
    assert_eq!(report(&p), want);
    let page = Page::read(&p, "cache/reports/chain.html");
    let doc = page.doc();
    assert!(text_of(&row(&doc, "a")).contains("input src changed"));
    assert!(text_of(&row(&doc, "b")).contains("upstream a reruns"));
    assert!(text_of(&row(&doc, "c")).contains("key pending upstream"));
}
