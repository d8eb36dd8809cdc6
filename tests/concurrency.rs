//! Two runs on one cache, and a run killed with SIGKILL mid-stage.
mod common;
use common::*;

use std::time::{Duration, Instant};

const SLOW: &str = r#"version: 1
name: slow
stages:
  first:
    op: exec
    outputs: [out]
    params: { cmd: "echo first >> runs.txt; echo one > $ALIGNFLOW_OUT/out" }
  second:
    op: exec
    inputs: { x: "${stages.first.out}" }
    outputs: [out]
    params: { cmd: "echo second-started >> runs.txt; sleep 1.5; cp $ALIGNFLOW_IN_X $ALIGNFLOW_OUT/out; echo second-done >> runs.txt" }
"#;

#[test]
fn two_concurrent_runs_never_run_a_stage_twice() {
    let p = Project::new();
    p.write("pipeline.yaml", SLOW);
    let a = p.cmd(&["run", "pipeline.yaml", "--quiet"]).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let b = p.cmd(&["run", "pipeline.yaml", "--quiet"]).spawn().unwrap();
    for child in [a, b] {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let runs = p.read("runs.txt");
    assert_eq!(runs.matches("first").count(), 1, "{runs}");
    assert_eq!(runs.matches("second-started").count(), 1, "{runs}");
    let verify = p.ok(&["cache", "verify"]);
    assert!(verify.contains(": 0 problem(s)"), "{verify}");
}

#[test]
fn kill_9_mid_stage_leaves_a_consistent_cache_and_the_rerun_reuses_finished_work() {
    let p = Project::new();
    // `second` waits for the file `go`, written only after the kill: it
    // cannot finish (and commit) before the engine is killed, however slow
    // the machine (with a fixed sleep it could, were this thread descheduled
    // for that long). Bounded, so no shell waits forever.
    p.write(
        "pipeline.yaml",
        &SLOW.replace(
            "sleep 1.5",
            "for i in $(seq 3000); do [ -f go ] && break; sleep 0.1; done",
        ),
    );
    let mut child = p.cmd(&["run", "pipeline.yaml", "--quiet"]).spawn().unwrap();
    let start = Instant::now();
    while !p.path("runs.txt").exists() || !p.read("runs.txt").contains("second-started") {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "second stage never started"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    // The killed stage has no record; the finished one does.
    let plan = p.ok(&["plan", "pipeline.yaml"]);
    assert!(
        plan.lines()
            .any(|l| l.starts_with("cached") && l.contains("first")),
        "{plan}"
    );
    assert!(
        plan.lines()
            .any(|l| l.starts_with("run") && l.contains("second")),
        "{plan}"
    );
    let verify = p.ok(&["cache", "verify"]);
    assert!(verify.contains(": 0 problem(s)"), "{verify}");
    // The rerun completes and reuses `first`.
    p.write("go", "");
    assert_eq!(p.run_stages("pipeline.yaml", &[]), set(&["second"]));
    assert_eq!(p.read("runs.txt").matches("first").count(), 1);
    let verify = p.ok(&["cache", "verify"]);
    assert!(verify.contains(": 0 problem(s)"), "{verify}");
}

/// A path input edited while its stage waited for another run's lock: the
/// stage would read the new bytes under the fingerprint of the old ones.
/// It fails instead, storing nothing, and the next run uses the new bytes.
#[test]
fn an_input_edited_while_its_stage_waits_is_not_run_under_the_old_fingerprint() {
    let p = Project::new();
    p.write("input.txt", "old\n");
    p.write(
        "pipeline.yaml",
        r#"version: 1
name: wait
stages:
  copy:
    op: exec
    inputs: { x: input.txt }
    outputs: [out]
    params:
      cmd: >-
        if [ -n "$HOLD" ]; then touch held; while [ ! -f release ]; do sleep 0.05; done; exit 1; fi;
        cp "$ALIGNFLOW_IN_X" "$ALIGNFLOW_OUT/out"
"#,
    );
    let logs = || common::walk(&p.path("cache/logs"));
    // The first run holds the stage's lock until `release` appears, then fails.
    let holder = p
        .cmd(&["run", "pipeline.yaml", "--quiet"])
        .env("HOLD", "1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let wait = |what: &str, done: &dyn Fn() -> bool| {
        let start = Instant::now();
        while !done() {
            assert!(start.elapsed() < Duration::from_secs(30), "{what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    wait("the holder runs", &|| p.path("held").exists());
    // The second run hashes `old`, then waits for the lock.
    let waiter = p
        .cmd(&["run", "pipeline.yaml", "--quiet"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait("the second run waits for the lock", &|| {
        logs()
            .iter()
            .any(|f| std::fs::read_to_string(f).is_ok_and(|t| t.contains("waiting copy")))
    });
    p.write("input.txt", "new\n");
    p.write("release", "");
    assert!(!holder.wait_with_output().unwrap().status.success());
    let out = waiter.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("input(s) [\"x\"] changed after the run hashed them"),
        "{stderr}"
    );
    assert!(
        common::walk(&p.path("cache/records")).is_empty(),
        "nothing stored"
    );
    p.ok(&["run", "pipeline.yaml", "--quiet"]);
    let shown: serde_json::Value =
        serde_json::from_str(&p.ok(&["show", "pipeline.yaml", "copy", "--json"])).unwrap();
    let path = shown["out"]["path"].as_str().unwrap();
    assert_eq!(std::fs::read_to_string(path).unwrap(), "new\n");
}
