//! The lockfile and `run --locked`.
mod common;
use common::*;

#[test]
fn run_writes_a_lockfile_and_locked_refuses_a_changed_param() {
    let p = Project::new();
    p.write("pipeline.yaml", CHAIN);
    p.write("input.txt", "abc\n");
    let err = p.fails(&["run", "pipeline.yaml", "--locked"]);
    assert!(err.contains("there is no lockfile"), "{err}");
    p.run_stages("pipeline.yaml", &[]);
    let lock = p.read("pipeline.lock");
    for stage in [
        "a:",
        "b:",
        "c:",
        "d:",
        "fingerprint:",
        "outputs:",
        "op_version: 1",
    ] {
        assert!(lock.contains(stage), "{stage} missing in\n{lock}");
    }
    assert_eq!(p.run_stages("pipeline.yaml", &["--locked"]), set(&[]));

    let err = p.fails(&[
        "run",
        "pipeline.yaml",
        "--locked",
        "--set",
        "params.greeting=hi",
    ]);
    assert!(err.contains("--locked: the plan differs from"), "{err}");
    assert!(err.contains("~ b: params.cmd changed"), "{err}");
    // Running without --locked would not update the lockfile for a --set
    // run: the hint says what does.
    assert!(
        err.contains("with --update-lock to record this one"),
        "{err}"
    );
    assert_eq!(
        p.read("pipeline.lock"),
        lock,
        "a refused run leaves the lockfile alone"
    );
}

#[test]
fn locked_run_on_an_empty_cache_reproduces_the_locked_outputs() {
    let p = Project::new();
    p.write("pipeline.yaml", CHAIN);
    p.write("input.txt", "abc\n");
    p.run_stages("pipeline.yaml", &[]);
    let lock = p.read("pipeline.lock");
    std::fs::remove_dir_all(p.path("cache")).unwrap();
    let out = p.ok(&["run", "pipeline.yaml", "--locked", "--quiet"]);
    assert_eq!(
        stages_with_status(&out, "ran"),
        set(&["a", "b", "c", "d"]),
        "{out}"
    );
    assert!(out.contains("reproduced locked outputs"), "{out}");
    assert_eq!(p.read("pipeline.lock"), lock);
}

#[test]
fn locked_run_reports_an_output_that_does_not_reproduce() {
    let p = Project::new();
    let nondeterministic = CHAIN.replace("seq ${params.n}", "date +%s%N");
    p.write("pipeline.yaml", &nondeterministic);
    p.write("input.txt", "abc\n");
    p.run_stages("pipeline.yaml", &[]);
    std::fs::remove_dir_all(p.path("cache")).unwrap();
    let out = p.run(&["run", "pipeline.yaml", "--locked", "--quiet"]);
    assert_eq!(out.status.code(), Some(1));
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("d ") && l.contains("not reproducible")),
        "{table}"
    );
}

#[test]
fn ad_hoc_runs_leave_the_lockfile_alone() {
    let p = Project::new();
    p.write("pipeline.yaml", CHAIN);
    p.write("input.txt", "abc\n");
    p.run_stages("pipeline.yaml", &[]);
    let lock = p.read("pipeline.lock");

    let out = p.run(&[
        "run",
        "pipeline.yaml",
        "--target",
        "b",
        "--set",
        "params.greeting=hi",
    ]);
    assert!(out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("left unchanged"), "{stderr}");
    assert_eq!(
        stages_with_status(&String::from_utf8_lossy(&out.stdout), "ran"),
        set(&["b"])
    );
    assert_eq!(
        p.read("pipeline.lock"),
        lock,
        "an ad-hoc run rewrote the lockfile"
    );
    p.run_stages("pipeline.yaml", &["--set", "params.n=5"]);
    assert_eq!(
        p.read("pipeline.lock"),
        lock,
        "a --set run rewrote the lockfile"
    );
    assert_eq!(p.run_stages("pipeline.yaml", &["--locked"]), set(&[]));

    p.run_stages(
        "pipeline.yaml",
        &["--target", "d", "--set", "params.n=5", "--update-lock"],
    );
    assert_ne!(
        p.read("pipeline.lock"),
        lock,
        "--update-lock records the ad-hoc run"
    );
}

/// Two runs of one manifest update its lockfile in turn, each from the file
/// as it is then: a `--target` run that finishes while another is running
/// keeps its entry when the other one writes.
#[test]
fn runs_side_by_side_keep_each_others_lockfile_entries() {
    let p = Project::new();
    p.write(
        "pipeline.yaml",
        r#"version: 1
name: two
stages:
  slow:
    op: exec
    outputs: [x]
    params: { cmd: 'touch started; for i in $(seq 600); do [ -f go ] && break; sleep 0.05; done; echo slow > "$ALIGNFLOW_OUT/x"' }
  quick:
    op: exec
    outputs: [x]
    params: { cmd: 'echo quick > "$ALIGNFLOW_OUT/x"' }
"#,
    );
    let mut slow = p.spawn_until(
        &[
            "run",
            "pipeline.yaml",
            "--target",
            "slow",
            "--update-lock",
            "--quiet",
        ],
        "started",
    );
    p.ok(&[
        "run",
        "pipeline.yaml",
        "--target",
        "quick",
        "--update-lock",
        "--quiet",
    ]);
    assert!(p.read("pipeline.lock").contains("quick:"));
    p.write("go", "");
    assert!(slow.wait().unwrap().success());
    let lock = p.read("pipeline.lock");
    assert!(lock.contains("slow:") && lock.contains("quick:"), "{lock}");
}
