//! The report in a real browser: headless Chromium renders a page that is
//! not blank (many non-white pixels, several colours) and its DOM holds one
//! curve per numeric metrics field. Chromium is a test prerequisite
//! (`make test` installs it): this test fails, not skips, without it.
mod common;
use common::*;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Two exec stages: one writes a metrics log (3 numeric fields against
/// `step`, 8 lines) and one a `report` JSON.
const PIPELINE: &str = r#"version: 1
name: shown
seed: 1
stages:
  train:
    op: exec
    outputs: [metrics]
    params:
      cmd: >-
        for i in 1 2 3 4 5 6 7 8; do
        echo "{\"step\": $((i*10)), \"loss\": $((100 - i*i)).5, \"accuracy\": 0.$i, \"kl\": $i.25, \"note\": \"s$i\"}";
        done > "$ALIGNFLOW_OUT/metrics"
  eval:
    op: exec
    inputs: { log: "${stages.train.metrics}" }
    outputs: [report]
    params:
      cmd: >-
        echo '{"win_rate": {"pm": 0.62, "feedback": 0.58}, "mean_reward": 1.5}' > "$ALIGNFLOW_OUT/report"
"#;

const CHROMIUM_FLAGS: &[&str] = &[
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--no-first-run",
    "--window-size=1280,1400",
];

fn chromium() -> PathBuf {
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        for name in ["chromium", "chromium-browser"] {
            let p = Path::new(dir).join(name);
            if p.is_file() {
                return p;
            }
        }
    }
    panic!(
        "chromium is not installed: `make test` installs it \
         (apt-get install -y --no-install-recommends chromium)"
    );
}

/// Runs Chromium on `page` with `args`, killing it after a minute.
fn browse(page: &Path, profile: &Path, args: &[&str]) -> Output {
    let mut child = Command::new(chromium())
        .args(CHROMIUM_FLAGS)
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(format!("file://{}", page.display()))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("chromium starts");
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("chromium did not finish within a minute");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "chromium {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[test]
fn chromium_renders_a_non_blank_report_with_every_curve() {
    let p = Project::new();
    p.write("shown.yaml", PIPELINE);
    p.ok(&["run", "shown.yaml", "--quiet"]);
    let page = PathBuf::from(p.ok(&["report", "shown.yaml"]).trim());
    let profile = p.path("chromium-profile");

    let dom = String::from_utf8(browse(&page, &profile, &["--dump-dom"]).stdout).unwrap();
    let series: BTreeSet<&str> = dom
        .split("data-series=\"")
        .skip(1)
        .map(|s| &s[..s.find('"').unwrap()])
        .collect();
    assert_eq!(
        series,
        BTreeSet::from([
            "train/metrics/loss",
            "train/metrics/accuracy",
            "train/metrics/kl"
        ]),
        "one curve per numeric field"
    );
    assert_eq!(dom.matches("class=\"curve\"").count(), 3);
    assert!(
        dom.contains("win_rate"),
        "the evaluation table is in the DOM"
    );

    let shot = p.path("shot.png");
    browse(
        &page,
        &profile,
        &[&format!("--screenshot={}", shot.display())],
    );
    let decoder = png::Decoder::new(std::io::BufReader::new(
        std::fs::File::open(&shot).expect("a screenshot"),
    ));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    let channels = info.color_type.samples();
    assert!(channels >= 3, "{:?}", info.color_type);
    let pixels: Vec<[u8; 3]> = buf[..info.buffer_size()]
        .chunks(channels)
        .map(|c| [c[0], c[1], c[2]])
        .collect();
    let total = pixels.len();
    let inked = pixels.iter().filter(|p| **p != [255, 255, 255]).count();
    // Colours, coarsely binned so anti-aliasing does not count.
    let colours: BTreeSet<[u8; 3]> = pixels
        .iter()
        .map(|p| [p[0] / 32, p[1] / 32, p[2] / 32])
        .collect();
    assert!(
        inked * 50 > total,
        "only {inked} of {total} pixels are not white: a blank page?"
    );
    assert!(colours.len() >= 6, "colours: {colours:?}");
    // The curve's blue (#1f77b4) and the cached stages' green (#c8e6c9) show.
    let near = |want: [u8; 3]| {
        pixels.iter().any(|p| {
            p.iter()
                .zip(want)
                .all(|(a, b)| (*a as i32 - b as i32).abs() <= 8)
        })
    };
    assert!(near([0x1f, 0x77, 0xb4]), "a curve is drawn");
    assert!(near([0xc8, 0xe6, 0xc9]), "a cached stage box is drawn");
}

/// Ten stages in a chain (wider than the window when laid out at full
/// size) and four stages writing what models wrote, in the shapes of
/// `critique_revise`, `ai_feedback`, `evaluate` and `ppo` outputs, with
/// markup and long texts in them.
fn examples_pipeline() -> String {
    let long = "a long answer that goes on ".repeat(12);
    let script = "<script>window.pwned = true</script>";
    let revision = serde_json::json!({"prompt": "q", "prompt_text": format!("Human: {script}"), "original": long,
        "trail": [{"principle": "harmless", "critique": "too long", "revision": "short"},
                  {"principle": "honest", "critique": script, "revision": "shorter"}],
        "revision": "shorter"});
    let comparison = serde_json::json!({"prompt": "p", "response_a": script, "response_b": "b", "p_a": 0.75,
        "details": [{"principle": "kind", "p_a_forward": 0.8, "p_a_swapped": 0.7}]});
    let sample = serde_json::json!({"prompt_index": 0, "prompt": "p", "policy_response": long, "reference_response": "r",
        "reward_model": {"policy": 1.5, "reference": 0.5, "outcome": "win"},
        "feedback_model": {"p_policy": 0.6, "outcome": "win", "details": []}});
    let ppo_sample = |iteration: u64| {
        serde_json::json!({"iteration": iteration, "row": 0, "prompt": "p",
            "response": format!("{script} at {iteration}"), "score": 0.5, "kl": 0.25})
    };
    let writer = |name: &str, output: &str, lines: &[&serde_json::Value]| {
        // Single quotes do not occur in the lines.
        let echoes: Vec<String> = lines
            .iter()
            .map(|line| {
                let line = line.to_string();
                assert!(!line.contains('\''));
                format!("echo '{line}'")
            })
            .collect();
        format!(
            "  {name}:\n    op: exec\n    outputs: [{output}]\n    params:\n      cmd: |\n        for i in 1 2 3 4 5; do {}; done > \"$ALIGNFLOW_OUT/{output}\"\n",
            echoes.join("; ")
        )
    };
    let mut yaml = String::from("version: 1\nname: wide\nstages:\n");
    for i in 0..10 {
        let input = if i == 0 {
            String::new()
        } else {
            format!("    inputs: {{ prev: \"${{stages.s{}.out}}\" }}\n", i - 1)
        };
        yaml += &format!("  s{i}:\n    op: exec\n{input}    outputs: [out]\n    params:\n      cmd: echo {i} > \"$ALIGNFLOW_OUT/out\"\n");
    }
    yaml += &writer("cr", "revisions", &[&revision]);
    yaml += &writer("fb", "comparisons", &[&comparison]);
    yaml += &writer("ev", "samples", &[&sample]);
    yaml += &writer("rl", "samples", &[&ppo_sample(1), &ppo_sample(20)]);
    yaml
}

/// Measures the rendered page from inside it: the graph's right edge
/// against the window, and what the example tables hold.
const MEASURE: &str = r#"<script>
const dag = document.querySelector('svg.dag').getBoundingClientRect();
const tables = [...document.querySelectorAll('div.examples')];
const result = {
  dag_right: dag.right, page_width: document.documentElement.clientWidth,
  page_scroll_width: document.documentElement.scrollWidth,
  pwned: window.pwned === true,
  scripts: document.scripts.length,
  tables: tables.map(t => t.dataset.stage + '/' + t.dataset.output),
  rows: tables.map(t => t.querySelectorAll('tr').length - 1),
  folded: document.querySelectorAll('table.examples details').length,
  open: document.querySelectorAll('table.examples details[open]').length,
  shown_script_text: [...document.querySelectorAll('table.examples td')].filter(td => td.textContent.includes('<script>window.pwned')).length,
};
const out = document.createElement('pre');
out.id = 'measure';
out.textContent = JSON.stringify(result);
document.body.appendChild(out);
</script>"#;

#[test]
fn chromium_shows_examples_escaped_and_folded_and_the_graph_fits_the_page() {
    let p = Project::new();
    p.write("wide.yaml", &examples_pipeline());
    p.ok(&["run", "wide.yaml", "--quiet"]);
    let page = PathBuf::from(p.ok(&["report", "wide.yaml"]).trim());
    let html = std::fs::read_to_string(&page).unwrap();
    assert!(
        !html.contains("<script"),
        "the report has no script, the fed one escaped"
    );
    // The test's own measuring script, added to a copy of the page.
    let measured = p.path("measured.html");
    std::fs::write(
        &measured,
        html.replace("</body>", &format!("{MEASURE}</body>")),
    )
    .unwrap();
    let dom =
        String::from_utf8(browse(&measured, &p.path("chromium-profile"), &["--dump-dom"]).stdout)
            .unwrap();
    let json = dom
        .split("<pre id=\"measure\">")
        .nth(1)
        .and_then(|s| s.split("</pre>").next())
        .expect("the measuring script ran");
    let m: serde_json::Value = serde_json::from_str(
        &json
            .replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&amp;", "&")
            .replace("&quot;", "\""),
    )
    .unwrap();
    assert!(
        m["dag_right"].as_f64().unwrap() <= m["page_width"].as_f64().unwrap(),
        "the stage graph fits the page width: {m}"
    );
    assert!(
        m["page_scroll_width"].as_f64().unwrap() <= m["page_width"].as_f64().unwrap(),
        "nothing scrolls sideways: {m}"
    );
    assert_eq!(m["pwned"], false, "fed markup does not run");
    assert_eq!(
        m["scripts"], 1,
        "only the test's own script is a script: {m}"
    );
    assert_eq!(
        m["tables"],
        serde_json::json!(["cr/revisions", "fb/comparisons", "ev/samples", "rl/samples"]),
        "{m}"
    );
    assert_eq!(
        m["rows"],
        serde_json::json!([3, 3, 3, 6]),
        "three drawn records each (ppo: of its first and of its last iteration): {m}"
    );
    // The long original answer and policy response, folded and closed.
    assert_eq!(m["folded"], 6, "{m}");
    assert_eq!(m["open"], 0);
    // The fed text shows as text: the prompt, a critique, a response (3
    // rows each), and the ppo responses (6 rows).
    assert_eq!(m["shown_script_text"], 15, "{m}");
    for header in [
        "original answer",
        "critique 2",
        "revision 2",
        "p_a, B shown first",
        "reference response",
        "KL",
    ] {
        assert!(html.contains(&format!("<th>{header}</th>")), "{header}");
    }
    assert!(html.contains("reward_model: win (policy 1.5000, reference 0.5000)"));
}
