//! Content-addressed caching: what reruns and what does not.
mod common;
use common::*;

fn chain() -> Project {
    let p = Project::new();
    p.write("pipeline.yaml", CHAIN);
    p.write("input.txt", "some input\n");
    p
}

#[test]
fn first_run_runs_everything_and_second_run_executes_nothing() {
    let p = chain();
    assert_eq!(
        p.run_stages("pipeline.yaml", &[]),
        set(&["a", "b", "c", "d"])
    );
    assert_eq!(p.run_stages("pipeline.yaml", &[]), set(&[]));
    assert_eq!(
        p.read("runs.txt").lines().count(),
        4,
        "no stage executed twice"
    );
    let plan: serde_json::Value =
        serde_json::from_str(&p.ok(&["plan", "pipeline.yaml", "--json"])).unwrap();
    for row in plan.as_array().unwrap() {
        assert_eq!(row["action"], "cached", "{row}");
        assert_eq!(row["reason"], "up to date");
        assert_eq!(row["fingerprint"].as_str().unwrap().len(), 64);
    }
}

#[test]
fn changing_a_param_reruns_exactly_its_stage_and_descendants() {
    let p = chain();
    p.run_stages("pipeline.yaml", &[]);
    // `greeting` is used by b only: b and c rerun, a and d do not.
    let plan = p.ok(&["plan", "pipeline.yaml", "--set", "params.greeting=bonjour"]);
    assert!(plan.contains(r#"params.cmd changed"#), "{plan}");
    assert!(plan.contains("upstream b reruns"), "{plan}");
    assert_eq!(
        p.run_stages("pipeline.yaml", &["--set", "params.greeting=bonjour"]),
        set(&["b", "c"])
    );
    // `n` is used by d only.
    assert_eq!(
        p.run_stages("pipeline.yaml", &["--set", "params.n=5"]),
        set(&["d"])
    );
}

#[test]
fn plan_json_explains_why() {
    let p = chain();
    let plan: serde_json::Value =
        serde_json::from_str(&p.ok(&["plan", "pipeline.yaml", "--json"])).unwrap();
    let reasons: Vec<(&str, &str, &str)> = plan
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["stage"].as_str().unwrap(),
                r["action"].as_str().unwrap(),
                r["reason"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        reasons,
        vec![
            ("a", "run", "never run"),
            ("b", "run", "upstream a reruns"),
            ("c", "run", "upstream b reruns"),
            ("d", "run", "never run")
        ]
    );
    p.run_stages("pipeline.yaml", &[]);
    p.write("input.txt", "changed input\n");
    let plan = p.ok(&["plan", "pipeline.yaml"]);
    assert!(
        plan.contains("input src changed (path input.txt)"),
        "{plan}"
    );
}

#[test]
fn changed_input_bytes_rerun_but_a_touch_does_not() {
    let p = chain();
    p.run_stages("pipeline.yaml", &[]);
    // Same bytes, new mtime: nothing reruns.
    std::thread::sleep(std::time::Duration::from_millis(20));
    p.write("input.txt", "some input\n");
    assert_eq!(p.run_stages("pipeline.yaml", &[]), set(&[]));
    // New bytes: the consumer and its descendants rerun.
    p.write("input.txt", "other input\n");
    assert_eq!(p.run_stages("pipeline.yaml", &[]), set(&["a", "b", "c"]));
}

#[test]
fn early_cutoff_keeps_downstream_cached_when_outputs_are_identical() {
    let p = chain();
    p.run_stages("pipeline.yaml", &[]);
    // `a` reruns (its command changes) but writes the same bytes: b and c stay cached.
    let changed = CHAIN.replace(
        r#"cat "$ALIGNFLOW_IN_SRC" > "$ALIGNFLOW_OUT/out""#,
        r#"cat < "$ALIGNFLOW_IN_SRC" > "$ALIGNFLOW_OUT/out""#,
    );
    assert_ne!(changed, CHAIN);
    p.write("pipeline.yaml", &changed);
    let out = p.ok(&["run", "pipeline.yaml", "--quiet"]);
    assert_eq!(stages_with_status(&out, "ran"), set(&["a"]), "{out}");
    assert!(out.contains("early cutoff"), "{out}");
}

#[test]
fn targets_run_only_their_ancestors() {
    let p = chain();
    assert_eq!(
        p.run_stages("pipeline.yaml", &["--target", "b"]),
        set(&["a", "b"])
    );
    assert_eq!(
        p.run_stages("pipeline.yaml", &["--target", "d"]),
        set(&["d"])
    );
    assert_eq!(p.run_stages("pipeline.yaml", &[]), set(&["c"]));
}

#[test]
fn a_failing_stage_fails_its_dependents_and_independent_branches_finish() {
    let p = Project::new();
    p.write(
        "pipeline.yaml",
        r#"version: 1
name: failing
stages:
  bad:
    op: exec
    outputs: [out]
    params: { cmd: "echo something broke >&2; exit 3" }
  after_bad:
    op: exec
    inputs: { x: "${stages.bad.out}" }
    outputs: [out]
    params: { cmd: "touch $ALIGNFLOW_OUT/out" }
  independent:
    op: exec
    outputs: [out]
    params: { cmd: "sleep 0.3; touch $ALIGNFLOW_OUT/out" }
"#,
    );
    let out = p.run(&["run", "pipeline.yaml", "--quiet"]);
    assert_eq!(out.status.code(), Some(1));
    let table = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stages_with_status(&table, "FAILED"),
        set(&["bad"]),
        "{table}"
    );
    assert_eq!(
        stages_with_status(&table, "skipped"),
        set(&["after_bad"]),
        "{table}"
    );
    assert_eq!(
        stages_with_status(&table, "ran"),
        set(&["independent"]),
        "{table}"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        table.contains("exit status 3") || stderr.contains("exit status 3"),
        "{table}\n{stderr}"
    );
    assert!(
        stderr.contains("something broke"),
        "stderr tail is shown: {stderr}"
    );
    assert!(
        !p.path("pipeline.lock").exists(),
        "no lockfile after a failed run"
    );
}

#[test]
fn fail_fast_cancels_running_stages() {
    let p = Project::new();
    p.write(
        "pipeline.yaml",
        r#"version: 1
name: failfast
stages:
  bad:
    op: exec
    outputs: [out]
    params: { cmd: "sleep 0.2; exit 1" }
  slow:
    op: exec
    outputs: [out]
    params: { cmd: "sleep 30; touch $ALIGNFLOW_OUT/out" }
"#,
    );
    let start = std::time::Instant::now();
    let out = p.run(&[
        "run",
        "pipeline.yaml",
        "--quiet",
        "--fail-fast",
        "--jobs",
        "2",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(start.elapsed().as_secs() < 20, "the slow stage was killed");
    let table = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stages_with_status(&table, "cancelled"),
        set(&["slow"]),
        "{table}"
    );
}

#[test]
fn a_path_input_enters_by_content_not_by_name() {
    let p = chain();
    p.run_stages("pipeline.yaml", &[]);
    std::fs::rename(p.path("input.txt"), p.path("renamed.txt")).unwrap();
    p.write(
        "pipeline.yaml",
        &CHAIN.replace("src: input.txt", "src: renamed.txt"),
    );
    assert_eq!(p.run_stages("pipeline.yaml", &[]), set(&[]));
    // A folder input is hashed as a tree of relative paths and contents.
    p.write("folder/x.txt", "x");
    p.write("folder/sub/y.txt", "y");
    p.write(
        "pipeline.yaml",
        &CHAIN.replace("src: input.txt", "src: folder"),
    );
    let folder_run = p.run_stages("pipeline.yaml", &[]);
    assert!(folder_run.contains("a"), "{folder_run:?}");
    p.write("folder/sub/y.txt", "y");
    assert_eq!(
        p.run_stages("pipeline.yaml", &[]),
        set(&[]),
        "same bytes in a folder: cached"
    );
    p.write("folder/sub/y.txt", "changed");
    assert!(p.run_stages("pipeline.yaml", &[]).contains("a"));
}

#[test]
fn ctrl_c_stops_cleanly_and_leaves_the_cache_consistent() {
    let p = Project::new();
    p.write(
        "pipeline.yaml",
        r#"version: 1
name: interrupt
stages:
  quick:
    op: exec
    outputs: [out]
    params: { cmd: "echo ok > $ALIGNFLOW_OUT/out" }
  long:
    op: exec
    inputs: { x: "${stages.quick.out}" }
    outputs: [out]
    params: { cmd: "echo started >> runs.txt; sleep 30; touch $ALIGNFLOW_OUT/out" }
"#,
    );
    let child = p
        .cmd(&["run", "pipeline.yaml", "--quiet"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while !p.path("runs.txt").exists() {
        assert!(
            start.elapsed().as_secs() < 30,
            "the long stage never started"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130));
    assert!(
        start.elapsed().as_secs() < 20,
        "the running stage was stopped"
    );
    let table = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stages_with_status(&table, "cancelled"),
        set(&["long"]),
        "{table}"
    );
    let plan = p.ok(&["plan", "pipeline.yaml"]);
    assert!(
        plan.lines()
            .any(|l| l.starts_with("cached") && l.contains("quick")),
        "{plan}"
    );
    assert!(p.ok(&["cache", "verify"]).contains(": 0 problem(s)"));
    let leftovers: Vec<_> = std::fs::read_dir(p.path("cache/tmp"))
        .map(|d| d.flatten().collect())
        .unwrap_or_default();
    assert!(
        leftovers.is_empty(),
        "staging folders removed: {leftovers:?}"
    );
}

#[test]
fn each_run_keeps_a_log_in_the_cache() {
    let p = chain();
    p.run_stages("pipeline.yaml", &[]);
    let logs: Vec<_> = std::fs::read_dir(p.path("cache/logs"))
        .unwrap()
        .flatten()
        .collect();
    assert_eq!(logs.len(), 1);
    let log = std::fs::read_to_string(logs[0].path()).unwrap();
    assert!(log.contains("plan a Run: never run"), "{log}");
    assert!(log.contains("done    a"), "{log}");
}

/// Whether process `pid` still runs (a zombie waiting for its reaper does not).
fn process_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z') || rest.starts_with('X')),
        Err(_) => false,
    }
}

#[test]
fn sigterm_stops_cleanly_and_kills_the_exec_process_group() {
    let p = Project::new();
    p.write(
        "pipeline.yaml",
        r#"version: 1
name: terminate
stages:
  quick:
    op: exec
    outputs: [out]
    params: { cmd: "echo ok > $ALIGNFLOW_OUT/out" }
  long:
    op: exec
    inputs: { x: "${stages.quick.out}" }
    outputs: [out]
    params: { cmd: "sleep 300 & echo $! > background.pid; echo $$ > leader.pid; sleep 300; touch $ALIGNFLOW_OUT/out" }
"#,
    );
    let child = p
        .cmd(&["run", "pipeline.yaml"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    let read_pid = |name: &str| -> Option<i32> {
        std::fs::read_to_string(p.path(name))
            .ok()?
            .trim()
            .parse()
            .ok()
    };
    while read_pid("leader.pid").is_none() || read_pid("background.pid").is_none() {
        assert!(
            start.elapsed().as_secs() < 30,
            "the long stage never started"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let (leader, background) = (
        read_pid("leader.pid").unwrap(),
        read_pid("background.pid").unwrap(),
    );
    assert!(process_alive(leader) && process_alive(background));
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(143), "{out:?}");
    assert!(
        start.elapsed().as_secs() < 20,
        "the running stage was stopped"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("SIGTERM"), "{stderr}");
    let table = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stages_with_status(&table, "ran"),
        set(&["quick"]),
        "{table}"
    );
    assert_eq!(
        stages_with_status(&table, "cancelled"),
        set(&["long"]),
        "{table}"
    );
    let gone = std::time::Instant::now();
    while process_alive(leader) || process_alive(background) {
        assert!(
            gone.elapsed().as_secs() < 5,
            "the exec command (pid {leader}) or its background child (pid {background}) outlived the run"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let plan = p.ok(&["plan", "pipeline.yaml"]);
    assert!(
        plan.lines()
            .any(|l| l.starts_with("cached") && l.contains("quick")),
        "{plan}"
    );
}

#[test]
fn an_exec_command_dies_with_a_killed_engine() {
    let p = Project::new();
    p.write(
        "pipeline.yaml",
        r#"version: 1
name: killed
stages:
  long:
    op: exec
    outputs: [out]
    params: { cmd: "echo $$ > leader.pid; sleep 300; touch $ALIGNFLOW_OUT/out" }
"#,
    );
    let mut child = p.cmd(&["run", "pipeline.yaml", "--quiet"]).spawn().unwrap();
    let start = std::time::Instant::now();
    let leader = loop {
        if let Some(pid) = std::fs::read_to_string(p.path("leader.pid"))
            .ok()
            .and_then(|t| t.trim().parse::<i32>().ok())
        {
            break pid;
        }
        assert!(start.elapsed().as_secs() < 30, "the stage never started");
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    child.kill().unwrap();
    child.wait().unwrap();
    let gone = std::time::Instant::now();
    while process_alive(leader) {
        assert!(
            gone.elapsed().as_secs() < 5,
            "the exec command outlived a killed engine"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // What the command started in the background is not the leader and
    // outlives a SIGKILLed engine; only a clean stop kills the whole group.
    unsafe { libc::kill(-leader, libc::SIGKILL) };
}

/// An `exec` stage that declares another output keeps its fingerprint (the
/// command is the same), but its record from before lacks that output: it
/// runs again, the new record replaces the old, and the stage reading the
/// new output gets it.
#[test]
fn declaring_another_exec_output_reruns_the_stage() {
    let p = Project::new();
    let stage_a = "  a:\n    op: exec\n    outputs: OUTPUTS\n    params: {cmd: 'echo 1 > $${ALIGNFLOW_OUT}/x; echo 2 > $${ALIGNFLOW_OUT}/y'}\n";
    let one = format!(
        "version: 1\nname: eo\nstages:\n{}",
        stage_a.replace("OUTPUTS", "[x]")
    );
    p.write("eo.yaml", &one);
    assert_eq!(p.run_stages("eo.yaml", &[]), set(&["a"]));
    let two = format!(
        "version: 1\nname: eo\nstages:\n{}  b:\n    op: exec\n    outputs: [o]\n    inputs: {{i: \"${{stages.a.y}}\"}}\n    params: {{cmd: 'cat \"$ALIGNFLOW_IN_I\" > $${{ALIGNFLOW_OUT}}/o'}}\n",
        stage_a.replace("OUTPUTS", "[x, y]")
    );
    p.write("eo.yaml", &two);
    let plan = p.ok(&["plan", "eo.yaml"]);
    assert!(
        plan.contains("its cached record lacks output(s) y (declared since it ran"),
        "{plan}"
    );
    assert_eq!(p.run_stages("eo.yaml", &[]), set(&["a", "b"]));
    let shown: serde_json::Value =
        serde_json::from_str(&p.ok(&["show", "eo.yaml", "b", "--json"])).unwrap();
    let o = std::fs::read_to_string(shown["o"]["path"].as_str().unwrap()).unwrap();
    assert_eq!(o.trim(), "2");
    assert_eq!(p.run_stages("eo.yaml", &[]), set(&[]));
    // Declaring fewer again is a hit on the record with more.
    p.write("eo.yaml", &one);
    assert_eq!(p.run_stages("eo.yaml", &[]), set(&[]));
}

/// A stage reading one upstream through two inputs names it once.
#[test]
fn a_rerun_reason_names_each_upstream_once() {
    let p = Project::new();
    p.write(
        "up.yaml",
        r#"version: 1
name: up
stages:
  x:
    op: exec
    outputs: [o]
    params: { cmd: "echo x > $ALIGNFLOW_OUT/o" }
  y:
    op: exec
    outputs: [o]
    params: { cmd: "echo y > $ALIGNFLOW_OUT/o" }
  z:
    op: exec
    inputs: { a: "${stages.x.o}", b: "${stages.y.o}", c: "${stages.x.o}" }
    outputs: [o]
    params: { cmd: "cat $ALIGNFLOW_IN_A > $ALIGNFLOW_OUT/o" }
"#,
    );
    let plan = p.ok(&["plan", "up.yaml"]);
    assert!(plan.contains("upstream x, y reruns\n"), "{plan}");
}
