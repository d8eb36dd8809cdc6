//! The data ops of the engine, driven through the binary on real data.
mod common;
use common::*;

#[test]
fn dataset_import_counts_the_real_hh_rlhf_file() {
    let p = Project::new();
    let source = test_data("hh-rlhf/harmless-base-test-1000.jsonl");
    p.write(
        "pipeline.yaml",
        &format!(
            "version: 1\nname: hh\nstages:\n  hh:\n    op: dataset.import\n    inputs: {{ source: {} }}\n    params: {{ format: hh-rlhf }}\n",
            source.display()
        ),
    );
    let out = p.ok(&["run", "pipeline.yaml", "--quiet"]);
    assert!(
        out.contains("records=1000") && out.contains("unsplittable=0"),
        "{out}"
    );
    let shown: serde_json::Value =
        serde_json::from_str(&p.ok(&["show", "pipeline.yaml", "hh", "--json"])).unwrap();
    let data = std::fs::read_to_string(shown["data"]["path"].as_str().unwrap()).unwrap();
    assert_eq!(data.lines().count(), 1000);
    let first: serde_json::Value = serde_json::from_str(data.lines().next().unwrap()).unwrap();
    assert!(first["prompt"]
        .as_str()
        .unwrap()
        .ends_with("\n\nAssistant:"));
    assert_eq!(first["label"], 1.0);
    let report: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(shown["report"]["path"].as_str().unwrap()).unwrap(),
    )
    .unwrap();
    assert_eq!(report["records"], 1000, "{report}");
}

#[test]
fn dataset_import_reports_unsplittable_and_bad_lines() {
    let p = Project::new();
    p.write(
        "in.jsonl",
        concat!(
            r#"{"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go away"}"#, "\n",
            r#"{"chosen": "\n\nHuman: no assistant turn", "rejected": "\n\nHuman: no assistant turn"}"#, "\n",
            "not json\n",
        ),
    );
    p.write(
        "pipeline.yaml",
        "version: 1\nname: bad\nstages:\n  hh:\n    op: dataset.import\n    inputs: { source: in.jsonl }\n    params: { format: hh-rlhf }\n",
    );
    let out = p.run(&["run", "pipeline.yaml", "--quiet"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "a bad line over max_bad_lines fails the stage"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("in.jsonl:3"),
        "names file and line: {stderr}"
    );
    p.write(
        "pipeline.yaml",
        "version: 1\nname: bad\nstages:\n  hh:\n    op: dataset.import\n    inputs: { source: in.jsonl }\n    params: { format: hh-rlhf, max_bad_lines: 1 }\n",
    );
    let out = p.ok(&["run", "pipeline.yaml", "--quiet"]);
    assert!(
        out.contains("records=1") && out.contains("unsplittable=1") && out.contains("bad_lines=1"),
        "{out}"
    );
}

#[test]
fn ops_lists_and_describes_from_the_schema() {
    let p = Project::new();
    let list = p.ok(&["ops"]);
    for op in ["dataset.import", "dataset.split", "exec", "tokenizer.train"] {
        assert!(list.contains(op), "{list}");
    }
    let desc = p.ok(&["ops", "tokenizer.train"]);
    assert!(desc.contains("vocab_size"), "{desc}");
    assert!(desc.contains("default 4096"), "{desc}");
    assert!(desc.contains("outputs:\n  tokenizer"), "{desc}");
    let err = p.fails(&["ops", "tokenizer.trian"]);
    assert!(err.contains("did you mean `tokenizer.train`"), "{err}");
}

#[test]
fn the_demo_pipeline_runs_then_is_fully_cached() {
    let p = Project::new();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    for rel in [
        "pipelines/demo.yaml",
        "examples/hh-rlhf-sample.jsonl",
        "examples/red-team-prompts.jsonl",
    ] {
        p.write(rel, &std::fs::read_to_string(root.join(rel)).unwrap());
    }
    let out = p.ok(&["run", "pipelines/demo.yaml", "--quiet"]);
    assert_eq!(stages_with_status(&out, "ran").len(), 5, "{out}");
    let plan: serde_json::Value =
        serde_json::from_str(&p.ok(&["plan", "pipelines/demo.yaml", "--json"])).unwrap();
    assert!(
        plan.as_array()
            .unwrap()
            .iter()
            .all(|r| r["action"] == "cached"),
        "{plan}"
    );
    assert!(p.path("pipelines/demo.lock").exists());
}
