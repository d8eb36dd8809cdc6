//! `cache verify`, `cache gc` and `show`.
mod common;
use common::*;

fn output_path(p: &Project, stage: &str) -> std::path::PathBuf {
    let shown: serde_json::Value =
        serde_json::from_str(&p.ok(&["show", "pipeline.yaml", stage, "--json"])).unwrap();
    std::path::PathBuf::from(shown["out"]["path"].as_str().unwrap())
}

#[test]
fn show_prints_absolute_output_paths() {
    let p = Project::new();
    p.write("pipeline.yaml", CHAIN);
    p.write("input.txt", "abc\n");
    let err = p.fails(&["show", "pipeline.yaml", "b"]);
    assert!(err.contains("run it first"), "{err}");
    p.run_stages("pipeline.yaml", &[]);
    let text = p.ok(&["show", "pipeline.yaml", "b"]);
    let (name, path) = text.trim().split_once('\t').unwrap();
    assert_eq!(name, "out");
    assert!(std::path::Path::new(path).is_absolute());
    assert_eq!(std::fs::read_to_string(path).unwrap(), "abc\nhello\n");
}

#[test]
fn verify_names_a_corrupt_object() {
    let p = Project::new();
    p.write("pipeline.yaml", CHAIN);
    p.write("input.txt", "abc\n");
    p.run_stages("pipeline.yaml", &[]);
    assert!(p.ok(&["cache", "verify"]).contains(": 0 problem(s)"));
    let path = output_path(&p, "b");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[0] ^= 0x01;
    let mut perms = std::fs::metadata(&path).unwrap().permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    perms.set_readonly(false);
    std::fs::set_permissions(&path, perms).unwrap();
    std::fs::write(&path, &bytes).unwrap();
    let out = p.run(&["cache", "verify"]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    let name = path.file_name().unwrap().to_string_lossy().to_string();
    assert!(
        text.lines()
            .any(|l| l.contains(&name) && l.contains("corrupt")),
        "{text}"
    );
}

#[test]
fn gc_removes_only_unreachable_objects() {
    let p = Project::new();
    p.write("pipeline.yaml", CHAIN);
    p.write("input.txt", "abc\n");
    p.run_stages("pipeline.yaml", &[]);
    // An object no record reaches, as a crash between ingest and commit leaves.
    let orphan_hash = blake3::hash(b"orphan").to_hex().to_string();
    let orphan = p
        .path("cache/objects")
        .join(&orphan_hash[..2])
        .join(&orphan_hash[2..]);
    std::fs::create_dir_all(orphan.parent().unwrap()).unwrap();
    std::fs::write(&orphan, b"orphan").unwrap();

    let dry = p.ok(&["cache", "gc", "--dry-run"]);
    assert!(dry.contains("would remove"), "{dry}");
    assert!(orphan.exists(), "dry run removes nothing");
    let out = p.ok(&["cache", "gc"]);
    assert!(out.contains(&orphan_hash[2..]), "{out}");
    assert!(!orphan.exists());
    // Everything a record reaches is still there: nothing reruns.
    assert_eq!(p.run_stages("pipeline.yaml", &[]), set(&[]));
    assert!(output_path(&p, "c").exists());
    assert!(p.ok(&["cache", "verify"]).contains(": 0 problem(s)"));
}

#[test]
fn checkpoints_go_when_the_record_commits_unless_the_stage_keeps_them() {
    let p = Project::new();
    p.write(
        "pipeline.yaml",
        r#"version: 1
name: ckpt
stages:
  plain:
    op: exec
    outputs: [out]
    params: { cmd: "echo plain > $ALIGNFLOW_OUT/out" }
  keeper:
    op: exec
    keep_checkpoints: true
    outputs: [out]
    params: { cmd: "echo keeper > $ALIGNFLOW_OUT/out" }
"#,
    );
    let plan: serde_json::Value =
        serde_json::from_str(&p.ok(&["plan", "pipeline.yaml", "--json"])).unwrap();
    let fingerprint = |stage: &str| {
        plan.as_array()
            .unwrap()
            .iter()
            .find(|r| r["stage"] == stage)
            .unwrap()["fingerprint"]
            .as_str()
            .unwrap()
            .to_string()
    };
    p.run_stages("pipeline.yaml", &[]);
    let checkpoints = p.path("cache/checkpoints");
    assert!(!checkpoints.join(fingerprint("plain")).exists());
    assert!(checkpoints.join(fingerprint("keeper")).is_dir());

    // What an engine that died between the commit and the removal leaves.
    let left = checkpoints.join(fingerprint("plain")).join("train");
    std::fs::create_dir_all(&left).unwrap();
    std::fs::write(left.join("w.bin"), b"12345").unwrap();
    let out = p.ok(&["cache", "gc"]);
    let line = out
        .lines()
        .find(|l| l.contains(&fingerprint("plain")))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        line.starts_with("removed ") && line.ends_with("(5 bytes)"),
        "{out}"
    );
    assert!(!checkpoints.join(fingerprint("plain")).exists());
    assert!(checkpoints.join(fingerprint("keeper")).is_dir(), "{out}");
    assert_eq!(
        p.run_stages("pipeline.yaml", &[]),
        set(&[]),
        "keep_checkpoints is not in the fingerprint"
    );
}
