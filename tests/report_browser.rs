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
