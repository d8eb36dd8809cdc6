//! The shipped pipelines, end to end: the tiny Constitutional AI pipeline
//! runs from nothing on CPU, a rerun is fully cached, and a run from an empty
//! cache under `--locked` reproduces every locked artifact byte for byte.
mod common;
use common::*;

fn copy_shipped(p: &Project) {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    for rel in [
        "pipelines/cai.yaml",
        "pipelines/cai-tiny.yaml",
        "pipelines/constitutions/default.yaml",
        "examples/hh-rlhf-sample.jsonl",
        "examples/red-team-prompts.jsonl",
    ] {
        p.write(rel, &std::fs::read_to_string(root.join(rel)).unwrap());
    }
}

#[test]
fn the_tiny_cai_pipeline_runs_caches_and_reproduces_under_locked() {
    let p = Project::new();
    copy_shipped(&p);
    let m = "pipelines/cai-tiny.yaml";
    let sets = [
        "--set",
        "params.max_new_tokens=12",
        "--set",
        "params.rounds=1",
    ];
    let mut args = vec!["run", m, "--quiet"];
    args.extend(sets);
    let out = p.ok(&args);
    let ran = stages_with_status(&out, "ran");
    for stage in [
        "base",
        "answers",
        "revisions",
        "sl_cai",
        "samples",
        "labels",
        "pmp",
        "pm",
    ] {
        assert!(ran.contains(stage), "{stage} did not run:\n{out}");
    }
    assert_eq!(
        stages_with_status(&p.ok(&args), "ran"),
        set(&[]),
        "a rerun is fully cached"
    );

    let shown: serde_json::Value = serde_json::from_str(&p.ok(&[
        "show", m, "labels", "--json", sets[0], sets[1], sets[2], sets[3],
    ]))
    .unwrap();
    let labels = std::fs::read_to_string(shown["comparisons"]["path"].as_str().unwrap()).unwrap();
    for line in labels.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let p_a = v["p_a"].as_f64().unwrap();
        assert!(p_a > 0.0 && p_a < 1.0, "soft label {p_a}");
    }

    // cai.yaml itself, on a local Hugging Face folder given as a param: the
    // tiny run's pretrained base model.
    let base: serde_json::Value = serde_json::from_str(&p.ok(&[
        "show", m, "base", "--json", sets[0], sets[1], sets[2], sets[3],
    ]))
    .unwrap();
    let folder = format!(
        "params.base_model={}",
        base["model"]["path"].as_str().unwrap()
    );
    let out = p.ok(&[
        "run",
        "pipelines/cai.yaml",
        "--quiet",
        "--set",
        &folder,
        sets[0],
        sets[1],
        sets[2],
        sets[3],
    ]);
    assert!(stages_with_status(&out, "ran").contains("pm"), "{out}");

    std::fs::remove_dir_all(p.path("cache")).unwrap();
    let mut locked = args.clone();
    locked.push("--locked");
    let out = p.ok(&locked);
    assert!(!out.contains("FAILED"), "{out}");
    assert_eq!(stages_with_status(&out, "ran").len(), 11, "{out}");
}
