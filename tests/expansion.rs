//! `matrix:`, `include:` and `--set` expand as specified, end to end.
mod common;
use common::*;

#[test]
fn matrix_expands_into_one_stage_per_combination_with_stable_ids() {
    let p = Project::new();
    p.write(
        "pipeline.yaml",
        r#"version: 1
name: sweep
stages:
  train:
    op: exec
    matrix:
      cmd: ["echo 1 > $ALIGNFLOW_OUT/out", "echo 2 > $ALIGNFLOW_OUT/out"]
    outputs: [out]
    description: "runs ${matrix.cmd}"
  report:
    op: exec
    inputs:
      one: ${stages.train[cmd=echo 1 > $ALIGNFLOW_OUT/out].out}
    outputs: [out]
    params: { cmd: "cp $ALIGNFLOW_IN_ONE $ALIGNFLOW_OUT/out" }
"#,
    );
    let dag = p.ok(&["dag", "pipeline.yaml"]);
    assert!(
        dag.contains("train[cmd=echo 1 > $ALIGNFLOW_OUT/out] (exec)"),
        "{dag}"
    );
    assert!(
        dag.contains("train[cmd=echo 2 > $ALIGNFLOW_OUT/out] (exec)"),
        "{dag}"
    );
    assert!(
        dag.contains("one <- train[cmd=echo 1 > $ALIGNFLOW_OUT/out].out"),
        "{dag}"
    );
    // The description, with the instance's matrix value.
    assert!(
        dag.contains(
            "train[cmd=echo 2 > $ALIGNFLOW_OUT/out] (exec)\n  # runs echo 2 > $ALIGNFLOW_OUT/out\n"
        ),
        "{dag}"
    );
    let ran = p.run_stages("pipeline.yaml", &[]);
    assert_eq!(ran.len(), 3, "{ran:?}");
    let shown = p.ok(&["show", "pipeline.yaml", "report"]);
    let path = shown.trim().split_once('\t').unwrap().1;
    assert_eq!(std::fs::read_to_string(path).unwrap(), "1\n");
}

#[test]
fn matrix_instances_get_distinct_seeds_and_outputs() {
    let p = Project::new();
    p.write(
        "pipeline.yaml",
        r#"version: 1
name: seeds
params: { base: 10 }
stages:
  s:
    op: exec
    matrix: { cmd: ["echo $ALIGNFLOW_SEED > $ALIGNFLOW_OUT/out"] }
    outputs: [out]
  t:
    op: exec
    params: { cmd: "echo $ALIGNFLOW_SEED > $ALIGNFLOW_OUT/out" }
    outputs: [out]
"#,
    );
    p.run_stages("pipeline.yaml", &[]);
    let read = |stage: &str| {
        let shown = p.ok(&["show", "pipeline.yaml", stage]);
        std::fs::read_to_string(shown.trim().split_once('\t').unwrap().1).unwrap()
    };
    assert_ne!(
        read("s[cmd=echo $ALIGNFLOW_SEED > $ALIGNFLOW_OUT/out]"),
        read("t")
    );
}

#[test]
fn include_merges_a_base_manifest_and_resolves_its_paths_from_its_folder() {
    let p = Project::new();
    p.write("base/data.txt", "base data\n");
    p.write(
        "base/base.yaml",
        r#"version: 1
name: base
params: { suffix: from-base }
stages:
  read:
    op: exec
    inputs: { src: data.txt }
    outputs: [out]
    params: { cmd: "cat $ALIGNFLOW_IN_SRC > $ALIGNFLOW_OUT/out; echo ${params.suffix} >> $ALIGNFLOW_OUT/out" }
"#,
    );
    p.write(
        "team.yaml",
        r#"version: 1
name: team
include: base/base.yaml
params: { suffix: from-team }
stages:
  extra:
    op: exec
    inputs: { x: "${stages.read.out}" }
    outputs: [out]
    params: { cmd: "cp $ALIGNFLOW_IN_X $ALIGNFLOW_OUT/out" }
"#,
    );
    assert_eq!(p.run_stages("team.yaml", &[]), set(&["read", "extra"]));
    let shown = p.ok(&["show", "team.yaml", "extra"]);
    let text = std::fs::read_to_string(shown.trim().split_once('\t').unwrap().1).unwrap();
    assert_eq!(text, "base data\nfrom-team\n");
    assert!(p.path("team.lock").exists());
}

#[test]
fn include_cycles_are_reported_as_a_chain() {
    let p = Project::new();
    p.write("a.yaml", "version: 1\nname: a\ninclude: b.yaml\n");
    p.write("b.yaml", "version: 1\nname: b\ninclude: a.yaml\n");
    let err = p.fails(&["validate", "a.yaml"]);
    assert!(
        err.contains("include cycle: a.yaml -> b.yaml -> a.yaml"),
        "{err}"
    );
}

#[test]
fn set_overrides_are_typed() {
    let p = Project::new();
    p.write(
        "pipeline.yaml",
        r#"version: 1
name: typed
params: { n: 3 }
stages:
  s:
    op: exec
    outputs: [out]
    params: { cmd: "seq ${params.n} > $ALIGNFLOW_OUT/out" }
"#,
    );
    let err = p.fails(&["plan", "pipeline.yaml", "--set", "params.m=4"]);
    assert!(
        err.contains("--set: unknown param `m` (did you mean `params.n`?)"),
        "{err}"
    );
    p.ok(&["run", "pipeline.yaml", "--quiet", "--set", "params.n=4"]);
    let shown = p.ok(&["show", "pipeline.yaml", "s", "--set", "params.n=4"]);
    let text = std::fs::read_to_string(shown.trim().split_once('\t').unwrap().1).unwrap();
    assert_eq!(text.lines().count(), 4);
}

/// The reason `plan --json` gives for `stage`.
fn reason(p: &Project, file: &str, stage: &str) -> String {
    let plan: serde_json::Value = serde_json::from_str(&p.ok(&["plan", file, "--json"])).unwrap();
    plan.as_array()
        .unwrap()
        .iter()
        .find(|r| r["stage"] == stage)
        .unwrap_or_else(|| panic!("no `{stage}` in {plan}"))["reason"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn a_new_experiment_on_an_included_pipeline_is_explained_against_its_cached_stages() {
    let p = Project::new();
    p.write("data.txt", "data\n");
    p.write(
        "base.yaml",
        r#"version: 1
name: base
params: { coef: 0.05 }
stages:
  train:
    op: exec
    inputs: { src: data.txt }
    outputs: [out]
    params: { cmd: "echo ${params.coef} > $ALIGNFLOW_OUT/out" }
"#,
    );
    p.run_stages("base.yaml", &[]);
    // A new experiment: the base with another coefficient, no lockfile yet.
    p.write(
        "exp.yaml",
        "version: 1\nname: exp\ninclude: base.yaml\nparams: { coef: 0.1 }\n",
    );
    let against_base = "params.cmd changed \"echo 0.05 > $ALIGNFLOW_OUT/out\" -> \"echo 0.1 > $ALIGNFLOW_OUT/out\" (against the cached run of pipeline `base`)";
    assert_eq!(reason(&p, "exp.yaml", "train"), against_base);
    // An unrelated pipeline's stage of the same name, run since, is not
    // what the experiment (or, without its lockfile, the base) compares with.
    p.write("other.txt", "other\n");
    p.write(
        "other.yaml",
        "version: 1\nname: other\nstages:\n  train:\n    op: exec\n    inputs: { src: other.txt }\n    outputs: [out]\n    params: { cmd: \"echo hi > $ALIGNFLOW_OUT/out\" }\n",
    );
    p.run_stages("other.yaml", &[]);
    assert_eq!(reason(&p, "exp.yaml", "train"), against_base);
    std::fs::remove_file(p.path("base.lock")).unwrap();
    p.write("base.yaml", &p.read("base.yaml").replace("0.05", "0.1"));
    assert_eq!(reason(&p, "base.yaml", "train"), against_base);

    // A matrix instance identical to the cached stage but for its id: the
    // plan says why it reruns (its seed derives from its id).
    p.write(
        "sweep.yaml",
        r#"version: 1
name: sweep
stages:
  other:
    op: exec
    inputs: { src: data.txt }
    outputs: [out]
    matrix: { cmd: ["echo 0.05 > $ALIGNFLOW_OUT/out"] }
"#,
    );
    let why = reason(
        &p,
        "sweep.yaml",
        "other[cmd=echo 0.05 > $ALIGNFLOW_OUT/out]",
    );
    assert!(
        why.starts_with("same op, params and inputs as the cached stage `train` of pipeline `base`, but a stage's seed derives from the pipeline seed and its own id"),
        "{why}"
    );
    // With nothing comparable in the cache, the plain reason.
    p.write("new.txt", "new\n");
    p.write(
        "fresh.yaml",
        &p.read("base.yaml")
            .replace("data.txt", "new.txt")
            .replace("train:", "fresh:"),
    );
    assert_eq!(reason(&p, "fresh.yaml", "fresh"), "never run");
}

#[test]
fn show_on_a_matrix_key_lists_its_instances_and_a_failed_stage_says_it_failed() {
    let p = Project::new();
    p.write(
        "m.yaml",
        r#"version: 1
name: m
stages:
  s:
    op: exec
    outputs: [out]
    matrix: { cmd: ["echo 1 > $ALIGNFLOW_OUT/out", "echo oops >&2; exit 3"] }
"#,
    );
    // Before any run no instance has outputs: show fails, as for a stage.
    let none = p.run(&["show", "m.yaml", "s"]);
    assert_eq!(none.status.code(), Some(1));
    assert_eq!(p.run(&["run", "m.yaml", "--quiet"]).status.code(), Some(1));
    let out = p.run(&["show", "m.yaml", "s"]);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stderr}");
    assert!(
        stdout.starts_with("s[cmd=echo 1 > $ALIGNFLOW_OUT/out]\tout\t"),
        "{stdout}"
    );
    assert!(
        stderr.contains("stage `s[cmd=echo oops >&2; exit 3]` has no cached outputs for its current inputs (last run failed at "),
        "{stderr}"
    );
    assert!(
        stderr.contains("exec failed with exit status 3"),
        "{stderr}"
    );
    assert!(stderr.contains("(log: "), "{stderr}");
    let json: serde_json::Value =
        serde_json::from_str(&p.ok(&["show", "m.yaml", "s", "--json"])).unwrap();
    assert!(
        json["s[cmd=echo 1 > $ALIGNFLOW_OUT/out]"]["out"]["path"].is_string(),
        "{json}"
    );
    assert!(
        json["s[cmd=echo oops >&2; exit 3]"]["error"].is_string(),
        "{json}"
    );
    // The plan says so too; once the stage succeeds the note is gone.
    let why = reason(&p, "m.yaml", "s[cmd=echo oops >&2; exit 3]");
    assert!(why.starts_with("last run failed at "), "{why}");
    assert!(p.fails(&["show", "m.yaml", "t"]).contains("no stage `t`"));
}
