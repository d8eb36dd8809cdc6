//! The two processes: the engine does not link libtorch; the worker runs a
//! stage from a JSON spec and reports JSON lines; `doctor` goes through it.
mod common;
use common::*;

use std::path::PathBuf;
use std::process::Command;

fn worker() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_alignflow")).with_file_name("alignflow-worker")
}

#[test]
fn the_engine_binary_does_not_link_libtorch() {
    let out = Command::new("ldd")
        .arg(env!("CARGO_BIN_EXE_alignflow"))
        .output()
        .expect("ldd runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    // Library names only: hex load addresses can contain "c10" by chance.
    let libs: Vec<&str> = text
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert!(
        !libs
            .iter()
            .any(|l| l.starts_with("libtorch") || l.starts_with("libc10")),
        "alignflow links libtorch:\n{text}"
    );
}

#[test]
fn the_worker_links_libtorch_and_finds_it_without_ld_library_path() {
    let out = Command::new("ldd")
        .arg(worker())
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .expect("ldd runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("libtorch_cpu.so =>"), "{text}");
    assert!(!text.contains("not found"), "{text}");
}

#[test]
fn doctor_reports_versions_devices_threads_and_cache() {
    let p = Project::new();
    let text = p.ok(&["doctor"]);
    assert!(
        text.contains(&format!("alignflow {}", env!("CARGO_PKG_VERSION"))),
        "{text}"
    );
    assert!(text.contains("libtorch   \"2.11.0"), "{text}");
    assert!(text.contains("cuda_available"), "{text}");
    assert!(text.contains("device_names"), "{text}");
    assert!(text.contains("threads"), "{text}");
    assert!(
        text.contains(&p.path("cache").display().to_string()),
        "{text}"
    );
}

#[test]
fn the_worker_runs_a_stage_spec_and_streams_json_events() {
    let p = Project::new();
    let out_dir = p.path("out");
    std::fs::create_dir_all(&out_dir).unwrap();
    let spec = serde_json::json!({
        "pipeline": "t", "stage": "s", "op": "exec", "op_version": 1,
        "params": {"cmd": "echo hi > $ALIGNFLOW_OUT/greeting"},
        "inputs": {}, "outputs": ["greeting"],
        "out_dir": out_dir, "work_dir": p.dir.path(), "checkpoint_dir": p.path("ckpt"),
        "device": "cpu", "seed": 1, "threads": 1
    });
    let spec_path = p.write("spec.json", &spec.to_string());
    let out = Command::new(worker())
        .arg("run")
        .arg(&spec_path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let last = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap()
        .to_string();
    let event: serde_json::Value = serde_json::from_str(&last).unwrap();
    assert_eq!(event["event"], "done", "{last}");
    assert_eq!(
        std::fs::read_to_string(out_dir.join("greeting")).unwrap(),
        "hi\n"
    );

    // A failing stage: a `failed` event and a non-zero exit.
    let bad = serde_json::json!({
        "pipeline": "t", "stage": "s", "op": "exec", "op_version": 1,
        "params": {"cmd": "exit 4"}, "inputs": {}, "outputs": [],
        "out_dir": out_dir, "work_dir": p.dir.path(), "checkpoint_dir": p.path("ckpt"),
        "device": "cpu", "seed": 1, "threads": null
    });
    let spec_path = p.write("bad.json", &bad.to_string());
    let out = Command::new(worker())
        .arg("run")
        .arg(&spec_path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let last = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap()
        .to_string();
    let event: serde_json::Value = serde_json::from_str(&last).unwrap();
    assert_eq!(event["event"], "failed");
    assert!(
        event["message"].as_str().unwrap().contains("exit status 4"),
        "{last}"
    );
}

#[test]
fn zero_threads_are_refused_before_anything_runs() {
    let p = Project::new();
    p.write("pipeline.yaml", CHAIN);
    p.write("input.txt", "abc\n");
    let err = p.fails(&["run", "pipeline.yaml", "--threads", "0"]);
    assert!(
        err.contains("--threads") && err.contains("at least 1"),
        "{err}"
    );
    let out = p
        .cmd(&["run", "pipeline.yaml"])
        .env("ALIGNFLOW_THREADS", "0")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("at least 1"), "{err}");
    assert!(!p.path("runs.txt").exists(), "no stage ran");
}

/// Runs `alignflow ARGS` with its stdout a pipe whose reader is already
/// gone, as in `alignflow plan | head` once head has had enough.
fn run_into_a_closed_pipe(p: &Project, args: &[&str]) -> std::process::Output {
    use std::os::fd::FromRawFd;
    let mut fds = [0; 2];
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    unsafe { libc::close(fds[0]) };
    let writer = unsafe { std::fs::File::from_raw_fd(fds[1]) };
    p.cmd(args)
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap()
}

#[test]
fn printing_commands_end_quietly_on_a_closed_pipe() {
    use std::os::unix::process::ExitStatusExt;
    let p = Project::new();
    p.write("pipeline.yaml", CHAIN);
    p.write("input.txt", "abc\n");
    for args in [&["plan", "pipeline.yaml"][..], &["doctor"], &["ops"]] {
        let out = run_into_a_closed_pipe(&p, args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert!(
            out.status.success() || out.status.signal() == Some(libc::SIGPIPE),
            "{args:?}: {:?} {err}",
            out.status
        );
    }
}

#[test]
fn a_missing_worker_says_where_it_was_looked_for() {
    let p = Project::new();
    let out = p
        .cmd(&["doctor"])
        .env("ALIGNFLOW_WORKER", "/nonexistent/alignflow-worker")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("ALIGNFLOW_WORKER is set to /nonexistent/alignflow-worker"),
        "{text}"
    );

    // An engine with no worker beside it and none on PATH.
    let alone = p.path("bin/alignflow");
    std::fs::create_dir_all(alone.parent().unwrap()).unwrap();
    std::fs::copy(env!("CARGO_BIN_EXE_alignflow"), &alone).unwrap();
    let out = Command::new(&alone)
        .arg("doctor")
        .env_remove("ALIGNFLOW_WORKER")
        .env("PATH", p.path("empty"))
        .env("ALIGNFLOW_CACHE_DIR", p.path("cache"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    let beside = p.path("bin/alignflow-worker");
    assert!(
        text.contains(&format!(
            "looked for {} (beside the engine), then `alignflow-worker` on PATH",
            beside.display()
        )),
        "{text}"
    );
    assert!(text.contains("set ALIGNFLOW_WORKER"), "{text}");
}
