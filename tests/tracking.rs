//! Experiment trackers: training stages' `metrics.jsonl` streamed to
//! TensorBoard event files (read back with the `tensorboard` package's own
//! reader) and to a real MLflow server (its REST API read back), exported
//! later with `export-tb`; tracking settings enter no fingerprint, and a
//! tracker that is down costs a warning, not the stage.
mod common;
use common::*;

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Two tiny LMs: training stages with `metrics` outputs, the second long
/// enough to be watched while it runs: seconds of steps, against the
/// trackers' half-second poll, and fewer than the 1000 points the MLflow
/// reader asks for (40 steps ran in 80 ms, and the live check
/// failed in CI when no poll fell inside them).
const PIPELINE: &str = r#"version: 1
name: tracked
seed: 5
params:
  lr: 1e-2
stages:
  hh:
    op: dataset.import
    inputs: { source: hh.jsonl }
  tok:
    op: tokenizer.train
    inputs: { data: "${stages.hh.data}" }
    params: { vocab_size: 320 }
  base:
    op: lm.pretrain
    inputs: { data: "${stages.hh.data}", tokenizer: "${stages.tok.tokenizer}" }
    params: { width: 32, layers: 1, heads: 2, positions: 64, seq_len: 32, batch_size: 2, max_steps: 6, lr: "${params.lr}" }
  longer:
    op: lm.pretrain
    inputs: { data: "${stages.hh.data}", tokenizer: "${stages.tok.tokenizer}" }
    params: { width: 32, layers: 1, heads: 2, positions: 64, seq_len: 32, batch_size: 16, max_steps: 600, lr: 5e-3 }
"#;

const TRAINING: [&str; 2] = ["base", "longer"];

fn project(tracking: &str) -> Project {
    let p = Project::new();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let sample = std::fs::read_to_string(root.join("examples/hh-rlhf-sample.jsonl")).unwrap();
    p.write(
        "hh.jsonl",
        &sample.lines().take(30).collect::<Vec<_>>().join("\n"),
    );
    p.write("tracked.yaml", &format!("{PIPELINE}{tracking}"));
    p
}

fn venv_bin(name: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(".venv/bin")
        .join(name);
    assert!(
        path.is_file(),
        "{} is missing: `make test` (or `make trackers`) installs tensorboard and mlflow into .venv",
        path.display()
    );
    path
}

/// A stage's outputs and their paths, as `alignflow show` prints them.
fn output_paths(p: &Project, stage: &str) -> BTreeMap<String, String> {
    p.ok(&["show", "tracked.yaml", stage])
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .map(|(name, path)| (name.to_string(), path.to_string()))
        .collect()
}

/// A stage's committed `metrics.jsonl` as `field -> [(step, value)]`: every
/// finite number but the step, at its line's step.
fn metrics_of(p: &Project, stage: &str) -> BTreeMap<String, Vec<(i64, f64)>> {
    let path = output_paths(p, stage)["metrics"].clone();
    let mut series: BTreeMap<String, Vec<(i64, f64)>> = BTreeMap::new();
    for line in std::fs::read_to_string(path).unwrap().lines() {
        let fields: serde_json::Map<String, Value> = serde_json::from_str(line).unwrap();
        let step = fields["step"].as_i64().expect("a step on every line");
        for (name, value) in &fields {
            match value.as_f64() {
                Some(v) if name != "step" && v.is_finite() => {
                    series.entry(name.clone()).or_default().push((step, v))
                }
                _ => {}
            }
        }
    }
    assert!(series.contains_key("loss"), "{stage}: {series:?}");
    series
}

/// Every run under `root` as TensorBoard's own reader sees it:
/// `run -> tag -> [(step, value)]`, and the event files per run.
fn read_tensorboard(
    root: &Path,
) -> (
    BTreeMap<String, BTreeMap<String, Vec<(i64, f64)>>>,
    BTreeMap<String, usize>,
) {
    const READER: &str = r#"
import json, os, sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
root = sys.argv[1]
runs, files = {}, {}
for run in sorted(os.listdir(root)):
    files[run] = len([f for f in os.listdir(os.path.join(root, run)) if 'tfevents' in f])
    acc = EventAccumulator(os.path.join(root, run), size_guidance={'scalars': 0})
    acc.Reload()
    runs[run] = {tag: [[e.step, e.value] for e in acc.Scalars(tag)] for tag in acc.Tags()['scalars']}
print(json.dumps({"runs": runs, "files": files}))
"#;
    let out = Command::new(venv_bin("python"))
        .args(["-c", READER])
        .arg(root)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    (
        serde_json::from_value(v["runs"].clone()).unwrap(),
        serde_json::from_value(v["files"].clone()).unwrap(),
    )
}

/// TensorBoard's values are 32-bit floats: each must be the log's value
/// rounded to one, at the log's step.
fn assert_same_scalars(
    what: &str,
    tb: &BTreeMap<String, Vec<(i64, f64)>>,
    log: &BTreeMap<String, Vec<(i64, f64)>>,
) {
    assert_eq!(
        tb.keys().collect::<Vec<_>>(),
        log.keys().collect::<Vec<_>>(),
        "{what}: the tags are the metric names"
    );
    // Compared as 32-bit floats: serde_json's float parsing may be one
    // ulp off the shortest representation Python prints.
    let as_f32 = |points: &[(i64, f64)]| -> Vec<(i64, f32)> {
        points.iter().map(|(s, v)| (*s, *v as f32)).collect()
    };
    for (name, points) in log {
        assert_eq!(as_f32(&tb[name]), as_f32(points), "{what}: scalar `{name}`");
    }
}

#[test]
fn tensorboard_gets_every_scalar_of_metrics_jsonl_and_trackers_touch_no_fingerprint() {
    // The manifest names an MLflow server nobody listens on: a warning.
    let dead = DeadPort::new();
    let down = dead.port;
    // With credentials in the address, which no message may show.
    let p = project(&format!(
        "tracking:\n  mlflow: http://ann:hunter2@127.0.0.1:{down}\n"
    ));
    let mut run = p
        .cmd(&["run", "tracked.yaml", "--quiet", "--tensorboard", "tb"])
        .stdout(std::fs::File::create(p.path("run.out")).unwrap())
        .stderr(std::fs::File::create(p.path("run.err")).unwrap())
        .spawn()
        .unwrap();
    // Live: the event file grows while the stage has no record yet.
    let mut live = false;
    while run.try_wait().unwrap().is_none() {
        if !live && scalar_bytes(&p.path("tb/longer")) > 0 && !has_record(&p, "longer") {
            live = true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = std::process::Output {
        status: run.wait().unwrap(),
        stdout: std::fs::read(p.path("run.out")).unwrap(),
        stderr: std::fs::read(p.path("run.err")).unwrap(),
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "a tracker that is down fails no stage:\n{stderr}"
    );
    assert!(live, "scalars reach TensorBoard while the stage runs");
    assert!(!stderr.contains("hunter2"), "{stderr}");
    for stage in TRAINING {
        assert!(
            stderr.contains(&format!(
                "stage `{stage}`: MLflow at http://127.0.0.1:{down} is not tracking this stage"
            )),
            "a warning names the stage and the tracker:\n{stderr}"
        );
    }
    assert_eq!(
        stages_with_status(&String::from_utf8_lossy(&out.stdout), "ran"),
        set(&["hh", "tok", "base", "longer"])
    );

    let (runs, files) = read_tensorboard(&p.path("tb"));
    assert_eq!(
        runs.keys().collect::<Vec<_>>(),
        TRAINING.iter().collect::<Vec<_>>(),
        "one run folder per training stage"
    );
    assert!(files.values().all(|n| *n == 1), "{files:?}");
    for stage in TRAINING {
        assert_same_scalars(stage, &runs[stage], &metrics_of(&p, stage));
    }

    // Exported later from the cache: the same runs.
    let listed = p.ok(&["export-tb", "tracked.yaml", "--out", "exported"]);
    assert_eq!(listed.lines().count(), 2, "{listed}");
    let (exported, files) = read_tensorboard(&p.path("exported"));
    assert_eq!(exported, runs);
    assert!(files.values().all(|n| *n == 1), "{files:?}");
    // Exported again into the same folder: our earlier file is replaced.
    p.ok(&["export-tb", "tracked.yaml", "--out", "exported"]);
    assert_eq!(read_tensorboard(&p.path("exported")), (exported, files));

    // Other trackers, none, or the manifest's TensorBoard folder: nothing reruns.
    p.write(
        "tracked.yaml",
        &format!("{PIPELINE}tracking:\n  tensorboard: tb-manifest\n"),
    );
    assert!(p.run_stages("tracked.yaml", &[]).is_empty());
    assert!(p
        .run_stages("tracked.yaml", &["--tensorboard", "tb-other"])
        .is_empty());
    p.write("tracked.yaml", PIPELINE);
    assert!(p.run_stages("tracked.yaml", &[]).is_empty());
    assert!(
        !p.path("tb-manifest").exists() && !p.path("tb-other").exists(),
        "cached stages stream nothing"
    );
    // export-tb defaults to the manifest's folder, and says where it is missing.
    assert!(p.fails(&["export-tb", "tracked.yaml"]).contains("--out"));
}

/// A server that takes connections and never answers holds up the run
/// once, within the stage's tracker deadline (10 s), and is not asked
/// again: before, each tracked stage waited out its requests (20 s each).
#[test]
fn an_mlflow_server_that_never_answers_holds_up_one_stage_at_most() {
    // Listening, never accepting: connections complete, requests hang.
    let hung = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = hung.local_addr().unwrap().port();
    let p = project(&format!("tracking:\n  mlflow: http://127.0.0.1:{port}\n"));
    p.write(
        "tracked.yaml",
        &p.read("tracked.yaml")
            .replace("max_steps: 600", "max_steps: 6"),
    );
    let start = Instant::now();
    let out = p.cmd(&["run", "tracked.yaml", "--quiet"]).output().unwrap();
    let took = start.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(
        stderr.matches("does not answer in time").count(),
        1,
        "{stderr}"
    );
    assert!(took < Duration::from_secs(30), "{took:?}\n{stderr}");
    drop(hung);
}

/// Bytes of scalar events in a run folder's event files: past the first
/// record (the file version event every file starts with).
fn scalar_bytes(run: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(run) else {
        return 0;
    };
    entries
        .filter_map(|e| std::fs::read(e.ok()?.path()).ok())
        .map(|bytes| {
            // TFRecord framing: u64 length, u32 crc, data, u32 crc.
            let first = bytes
                .get(..8)
                .map_or(u64::MAX, |l| u64::from_le_bytes(l.try_into().unwrap()) + 16);
            (bytes.len() as u64).saturating_sub(first)
        })
        .sum()
}

/// Whether the cache holds a committed record of `stage`.
fn has_record(p: &Project, stage: &str) -> bool {
    walk(&p.path("cache/records")).iter().any(|f| {
        std::fs::read_to_string(f)
            .ok()
            .and_then(|t| serde_json::from_str::<Value>(&t).ok())
            .is_some_and(|r| r["stage"] == stage)
    })
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `mlflow server` from the venv on 127.0.0.1 with a SQLite store, stopped
/// by pid when dropped.
struct Mlflow {
    child: Child,
    uri: String,
    _dir: tempfile::TempDir,
}

impl Mlflow {
    fn start() -> Mlflow {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let child = Command::new(venv_bin("mlflow"))
            .args([
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--workers",
                "1",
            ])
            .arg("--backend-store-uri")
            .arg(format!(
                "sqlite:///{}",
                dir.path().join("mlflow.db").display()
            ))
            .arg("--default-artifact-root")
            .arg(dir.path().join("artifacts"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("server.log")).unwrap())
            .process_group(0)
            .spawn()
            .expect("mlflow server starts");
        Mlflow {
            child,
            uri: format!("http://127.0.0.1:{port}"),
            _dir: dir,
        }
    }

    /// Waits until `/health` answers; returns how long that took.
    fn wait_ready(&mut self) -> Duration {
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(180) {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("mlflow server exited ({status}):\n{}", self.log());
            }
            if http(&format!("{}/health", self.uri), None).is_ok() {
                return started.elapsed();
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("mlflow server not ready in 180 s:\n{}", self.log());
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("server.log")).unwrap_or_default()
    }

    fn get(&self, endpoint: &str) -> Value {
        let body = http(&format!("{}/api/2.0/mlflow/{endpoint}", self.uri), None).unwrap();
        serde_json::from_str(&body).unwrap()
    }

    fn post(&self, endpoint: &str, body: Value) -> Value {
        let answer = http(
            &format!("{}/api/2.0/mlflow/{endpoint}", self.uri),
            Some(body),
        )
        .unwrap();
        serde_json::from_str(&answer).unwrap()
    }
}

impl Drop for Mlflow {
    fn drop(&mut self) {
        // The server's workers are its children: stop its process group
        // (its own, by pid).
        unsafe {
            libc::kill(-(self.child.id() as i32), libc::SIGTERM);
        }
        let _ = self.child.wait();
    }
}

/// A GET (or a JSON POST) with curl, the body on success.
fn http(url: &str, body: Option<Value>) -> Result<String, String> {
    let mut cmd = Command::new("curl");
    cmd.args(["-sf", "--max-time", "10", url]);
    if let Some(body) = body {
        cmd.args([
            "-H",
            "Content-Type: application/json",
            "-d",
            &body.to_string(),
        ]);
    }
    let out = cmd.output().map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!("{url}: {}", out.status))
    }
}

#[test]
fn mlflow_gets_params_fingerprint_metrics_and_output_paths() {
    let mut server = Mlflow::start();
    let ready = server.wait_ready();
    eprintln!("mlflow server ready in {:.1} s", ready.as_secs_f64());
    let p = project(&format!("tracking:\n  mlflow: {}\n", server.uri));
    let out = p.cmd(&["run", "tracked.yaml", "--quiet"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains("not tracking"), "{stderr}");

    let experiment = server.get("experiments/get-by-name?experiment_name=tracked");
    let experiment_id = experiment["experiment"]["experiment_id"]
        .as_str()
        .unwrap()
        .to_string();
    let found = server.post(
        "runs/search",
        serde_json::json!({"experiment_ids": [experiment_id], "max_results": 100}),
    );
    let runs: BTreeMap<String, &Value> = found["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["info"]["run_name"].as_str().unwrap().to_string(), r))
        .collect();
    assert_eq!(
        runs.keys().collect::<Vec<_>>(),
        TRAINING.iter().collect::<Vec<_>>(),
        "one run per training stage"
    );

    for stage in TRAINING {
        let run = runs[stage];
        let record = stage_record(&p, stage);
        assert_eq!(run["info"]["status"], "FINISHED", "{stage}");
        let pairs = |field: &str| -> BTreeMap<String, String> {
            run["data"][field]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|kv| {
                            (
                                kv["key"].as_str().unwrap().into(),
                                kv["value"].as_str().unwrap().into(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default()
        };
        let params = pairs("params");
        assert_eq!(
            params["alignflow.fingerprint"],
            record["fingerprint"].as_str().unwrap(),
            "{stage}"
        );
        assert_eq!(
            params["alignflow.op"],
            record["key"]["op"].as_str().unwrap()
        );
        // Every normalised param, defaults included.
        let normalised = record["key"]["params"].as_object().unwrap();
        for (name, value) in normalised.iter().filter(|(_, v)| !v.is_object()) {
            let text = value
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| value.to_string());
            assert_eq!(params.get(name), Some(&text), "{stage}: param {name}");
        }
        let tags = pairs("tags");
        let paths = output_paths(&p, stage);
        assert_eq!(paths.len(), record["outputs"].as_object().unwrap().len());
        for (output, path) in &paths {
            assert_eq!(
                &tags[&format!("alignflow.output.{output}")],
                path,
                "{stage}"
            );
        }
        // Every scalar at its step, as metrics.jsonl has it.
        let run_id = run["info"]["run_id"].as_str().unwrap();
        for (name, points) in metrics_of(&p, stage) {
            let history = server.get(&format!(
                "metrics/get-history?run_id={run_id}&metric_key={name}&max_results=1000"
            ));
            let mut got: Vec<(i64, f64)> = history["metrics"]
                .as_array()
                .unwrap_or_else(|| panic!("{stage}: no history of {name}: {history}"))
                .iter()
                .map(|m| {
                    (
                        m["step"].as_i64().unwrap_or(0),
                        m["value"].as_f64().unwrap(),
                    )
                })
                .collect();
            got.sort_by_key(|(s, _)| *s);
            let mut expected = points.clone();
            expected.sort_by_key(|(s, _)| *s);
            assert_eq!(got, expected, "{stage}: metric {name}");
        }
    }
}
