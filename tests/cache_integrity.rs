//! The cache cannot be corrupted through a stage's inputs, corruption is
//! not passed on to new stages, and `cache verify --repair` removes what was
//! built on a corrupt object. These run as root in CI, where file modes do
//! not stop a write: detection must.
mod common;
use common::*;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

fn is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

/// Where output `out` of `stage` is in the store.
fn output_path(p: &Project, file: &str, stage: &str) -> PathBuf {
    let shown: serde_json::Value =
        serde_json::from_str(&p.ok(&["show", file, stage, "--json"])).unwrap();
    PathBuf::from(shown["out"]["path"].as_str().unwrap())
}

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path)
        .unwrap()
        .permissions()
        .mode()
        & 0o7777
}

/// Overwrites a store file as root can (write permission restored first).
fn corrupt(path: &Path) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut bytes = std::fs::read(path).unwrap();
    bytes[0] ^= 0x01;
    std::fs::write(path, &bytes).unwrap();
}

fn verify_is_clean(p: &Project) {
    let out = p.ok(&["cache", "verify"]);
    assert!(out.contains(": 0 problem(s)"), "{out}");
}

const APPEND_TO_FILE_INPUT: &str = r#"version: 1
name: append
stages:
  a:
    op: exec
    outputs: [out]
    params: { cmd: "echo upstream > $ALIGNFLOW_OUT/out" }
  b:
    op: exec
    inputs: { x: "${stages.a.out}" }
    outputs: [out]
    params: { cmd: "echo appended >> \"$ALIGNFLOW_IN_X\"; cat \"$ALIGNFLOW_IN_X\" > $ALIGNFLOW_OUT/out" }
"#;

#[test]
fn appending_to_a_file_input_leaves_the_cached_object_intact() {
    let p = Project::new();
    p.write("pipeline.yaml", APPEND_TO_FILE_INPUT);
    let out = p.run(&["run", "pipeline.yaml", "--quiet"]);
    let a_out = output_path(&p, "pipeline.yaml", "a");
    assert_eq!(std::fs::read_to_string(&a_out).unwrap(), "upstream\n");
    verify_is_clean(&p);
    if is_root() {
        // The command appended to its private copy: that is its own business.
        assert!(out.status.success(), "{out:?}");
        let b_out = output_path(&p, "pipeline.yaml", "b");
        assert_eq!(
            std::fs::read_to_string(b_out).unwrap(),
            "upstream\nappended\n"
        );
    }
    // Nothing was corrupted, so nothing reruns once b succeeded.
    if out.status.success() {
        assert_eq!(p.run_stages("pipeline.yaml", &[]), set(&[]));
    }
}

#[test]
fn changing_a_file_inside_a_folder_input_fails_the_stage_and_records_nothing() {
    let p = Project::new();
    p.write(
        "pipeline.yaml",
        r#"version: 1
name: folder
stages:
  a:
    op: exec
    outputs: [out]
    params: { cmd: "mkdir -p $ALIGNFLOW_OUT/out/sub; echo model > $ALIGNFLOW_OUT/out/sub/config.json" }
  b:
    op: exec
    inputs: { x: "${stages.a.out}" }
    outputs: [out]
    params: { cmd: "echo tampered >> \"$ALIGNFLOW_IN_X/sub/config.json\"; touch $ALIGNFLOW_OUT/out" }
"#,
    );
    let out = p.run(&["run", "pipeline.yaml", "--quiet"]);
    assert_eq!(out.status.code(), Some(1));
    let table = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stages_with_status(&table, "FAILED"), set(&["b"]), "{table}");
    let err = p.fails(&["show", "pipeline.yaml", "b"]);
    assert!(err.contains("run it first"), "no record for b: {err}");
    if is_root() {
        let text = format!("{table}\n{stderr}");
        assert!(text.contains("changed its inputs"), "{text}");
        assert!(text.contains("`x`"), "{text}");
        assert!(text.contains("sub/config.json"), "{text}");
        // The corrupted tree left the store: a is recomputed, not reused.
        let plan = p.ok(&["plan", "pipeline.yaml"]);
        assert!(
            plan.lines()
                .any(|l| l.starts_with("run") && l.contains(" a ")),
            "{plan}"
        );
        assert!(p
            .walk_quarantine()
            .iter()
            .any(|f| f.ends_with("sub/config.json")));
        // a's record now names a quarantined tree: repair removes it.
        let repaired = p.run(&["cache", "verify", "--repair"]);
        let text = String::from_utf8_lossy(&repaired.stdout);
        assert!(text.contains("(stage `a`): an output is missing"), "{text}");
        verify_is_clean(&p);
    } else {
        // Read-only folders and files stopped the write.
        verify_is_clean(&p);
    }
}

#[test]
fn a_corrupt_object_is_not_fed_to_a_new_stage() {
    let p = Project::new();
    p.write("pipeline.yaml", CHAIN);
    p.write("input.txt", "abc\n");
    p.run_stages("pipeline.yaml", &[]);
    corrupt(&output_path(&p, "pipeline.yaml", "a"));
    // b reruns (new greeting) and would read a's corrupt output.
    let args = [
        "run",
        "pipeline.yaml",
        "--quiet",
        "--set",
        "params.greeting=bonjour",
    ];
    let out = p.run(&args);
    assert_eq!(out.status.code(), Some(1));
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stages_with_status(&text, "FAILED"), set(&["b"]), "{text}");
    assert!(
        text.contains("input `x`") && text.contains("corrupt"),
        "{text}"
    );
    assert_eq!(
        p.read("runs.txt").lines().count(),
        4,
        "nothing ran after the first run"
    );
    // The next run recomputes a, then b and c from the sound object.
    assert_eq!(
        p.run_stages("pipeline.yaml", &["--set", "params.greeting=bonjour"]),
        set(&["a", "b", "c"])
    );
    let b_out = output_path(&p, "pipeline.yaml", "b");
    assert!(
        std::fs::read_to_string(b_out).is_ok_and(|t| t.starts_with("abc\n")),
        "b read the sound bytes"
    );
    verify_is_clean(&p);
}

#[test]
fn verify_names_the_users_and_repair_removes_what_was_built_on_it() {
    let p = Project::new();
    p.write("pipeline.yaml", CHAIN);
    p.write("input.txt", "abc\n");
    p.run_stages("pipeline.yaml", &[]);
    let b_out = output_path(&p, "pipeline.yaml", "b");
    corrupt(&b_out);

    let out = p.run(&["cache", "verify"]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("output `out` of stage `b`"), "{text}");
    assert!(text.contains("input `y` of stage `c`"), "{text}");
    // Nothing was changed by a plain verify.
    assert!(b_out.exists());

    let out = p.run(&["cache", "verify", "--repair"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("removed record") && text.contains("(stage `b`)"),
        "{text}"
    );
    assert!(text.contains("(stage `c`)"), "{text}");
    assert!(
        !text.contains("(stage `a`)") && !text.contains("(stage `d`)"),
        "{text}"
    );
    assert!(text.contains("quarantined"), "{text}");
    verify_is_clean(&p);
    // Exactly what was built on the corrupt object runs again.
    assert_eq!(p.run_stages("pipeline.yaml", &[]), set(&["b", "c"]));
    verify_is_clean(&p);
}

#[test]
fn repair_follows_a_corrupt_object_downstream() {
    let p = Project::new();
    p.write("pipeline.yaml", CHAIN);
    p.write("input.txt", "abc\n");
    p.run_stages("pipeline.yaml", &[]);
    corrupt(&output_path(&p, "pipeline.yaml", "a"));
    let out = p.run(&["cache", "verify", "--repair"]);
    let text = String::from_utf8_lossy(&out.stdout);
    for stage in ["a", "b", "c"] {
        assert!(text.contains(&format!("(stage `{stage}`)")), "{text}");
    }
    assert!(!text.contains("(stage `d`)"), "{text}");
    verify_is_clean(&p);
    assert_eq!(p.run_stages("pipeline.yaml", &[]), set(&["a", "b", "c"]));
}

#[test]
fn committed_objects_and_tree_folders_are_read_only_and_gc_still_removes_them() {
    let p = Project::new();
    let manifest = r#"version: 1
name: modes
params: { text: one }
stages:
  a:
    op: exec
    outputs: [file, dir]
    params: { cmd: "echo ${params.text} > $ALIGNFLOW_OUT/file; mkdir -p $ALIGNFLOW_OUT/dir/sub; echo ${params.text} > $ALIGNFLOW_OUT/dir/sub/f" }
"#;
    p.write("pipeline.yaml", manifest);
    p.run_stages("pipeline.yaml", &[]);
    let shown: serde_json::Value =
        serde_json::from_str(&p.ok(&["show", "pipeline.yaml", "a", "--json"])).unwrap();
    let file = PathBuf::from(shown["file"]["path"].as_str().unwrap());
    let dir = PathBuf::from(shown["dir"]["path"].as_str().unwrap());
    assert_eq!(mode(&file), 0o444);
    assert_eq!(mode(&dir), 0o555);
    assert_eq!(mode(&dir.join("sub")), 0o555);
    assert_eq!(mode(&dir.join("sub/f")), 0o444);
    // A new value leaves the old tree unreachable: gc removes it, sealed or not.
    p.run_stages("pipeline.yaml", &["--set", "params.text=two"]);
    std::fs::remove_dir_all(p.path("cache/records")).unwrap();
    p.ok(&["cache", "gc"]);
    assert!(!dir.exists() && !file.exists());
}

/// The user the non-root variants run as when the tests run as root.
const NOBODY: u32 = 65534;

/// `alignflow ARGS` as an ordinary user: `nobody` (owning the project
/// folder) when the tests run as root, else the current user.
fn run_unprivileged(p: &Project, args: &[&str]) -> std::process::Output {
    use std::os::unix::process::CommandExt;
    let mut cmd = p.cmd(args);
    if is_root() {
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(NOBODY) != 0
                    || libc::setuid(NOBODY) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    cmd.output().expect("alignflow runs")
}

#[test]
fn an_ordinary_user_cannot_change_a_folder_input_and_chmod_is_caught() {
    let p = Project::new();
    p.write(
        "pipeline.yaml",
        r#"version: 1
name: unprivileged
stages:
  a:
    op: exec
    outputs: [out]
    params: { cmd: "mkdir -p $ALIGNFLOW_OUT/out/sub; echo model > $ALIGNFLOW_OUT/out/sub/config.json" }
  sed:
    op: exec
    inputs: { x: "${stages.a.out}" }
    outputs: [out]
    params: { cmd: "sed -i s/model/tampered/ \"$ALIGNFLOW_IN_X/sub/config.json\" && touch $ALIGNFLOW_OUT/out" }
  chmod:
    op: exec
    inputs: { x: "${stages.a.out}" }
    outputs: [out]
    params: { cmd: "chmod -R u+w \"$ALIGNFLOW_IN_X\"; echo tampered >> \"$ALIGNFLOW_IN_X/sub/config.json\"; touch $ALIGNFLOW_OUT/out" }
"#,
    );
    if is_root() {
        let chown = std::process::Command::new("chown")
            .args(["-R", &format!("{NOBODY}:{NOBODY}")])
            .arg(p.dir.path())
            .status()
            .unwrap();
        assert!(chown.success());
        if !run_unprivileged(&p, &["--version"]).status.success() {
            eprintln!("skipped: `nobody` cannot run the alignflow binary here");
            return;
        }
    }
    // `sed -i` writes a new file beside the old one: the read-only folder stops it.
    let out = run_unprivileged(&p, &["run", "pipeline.yaml", "--quiet", "--target", "sed"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let table = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stages_with_status(&table, "FAILED"),
        set(&["sed"]),
        "{table}"
    );
    let config = output_path(&p, "pipeline.yaml", "a").join("sub/config.json");
    assert_eq!(std::fs::read_to_string(&config).unwrap(), "model\n");
    let verify = run_unprivileged(&p, &["cache", "verify"]);
    let text = String::from_utf8_lossy(&verify.stdout);
    assert!(text.contains(": 0 problem(s)"), "{text}");

    // The owner can make it writable again: the input check catches that.
    let out = run_unprivileged(
        &p,
        &["run", "pipeline.yaml", "--quiet", "--target", "chmod"],
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stages_with_status(&text, "FAILED"),
        set(&["chmod"]),
        "{text}"
    );
    assert!(
        text.contains("changed its inputs") && text.contains("sub/config.json"),
        "{text}"
    );
    assert!(!config.exists(), "the tampered tree left the store");
    // Cleaning up as root, or as the owner of everything: both work.
    let gc = run_unprivileged(&p, &["cache", "gc"]);
    assert!(gc.status.success(), "{gc:?}");
}

trait Quarantine {
    fn walk_quarantine(&self) -> Vec<PathBuf>;
}

impl Quarantine for Project {
    fn walk_quarantine(&self) -> Vec<PathBuf> {
        walk(&self.path("cache/quarantine"))
    }
}

/// A command that swaps its output folder for a symbolic link to some
/// other folder: the engine stores nothing from there and leaves that
/// folder's files as they were (ingest would have sealed, stored and
/// removed them).
#[test]
fn an_output_folder_replaced_by_a_link_is_refused_and_its_target_untouched() {
    let p = Project::new();
    let victim = p.path("elsewhere");
    std::fs::create_dir_all(&victim).unwrap();
    std::fs::write(victim.join("result"), "not the cache's\n").unwrap();
    p.write(
        "pipeline.yaml",
        &format!(
            r#"version: 1
name: swap
stages:
  swap:
    op: exec
    outputs: [result]
    params:
      cmd: 'rmdir "$ALIGNFLOW_OUT" && ln -s {} "$ALIGNFLOW_OUT"'
"#,
            victim.display()
        ),
    );
    let err = p.fails(&["run", "pipeline.yaml", "--quiet"]);
    assert!(
        err.contains("swap") && err.contains("no longer the folder the engine made"),
        "{err}"
    );
    let result = victim.join("result");
    assert_eq!(
        std::fs::read_to_string(&result).unwrap(),
        "not the cache's\n"
    );
    assert_eq!(mode(&result) & 0o222, 0o200, "still writable by its owner");
    assert!(common::walk(&p.path("cache/records")).is_empty());
    verify_is_clean(&p);
}

/// A record that lacks an output its stage declares (pulled from a remote
/// another engine wrote) is no hit: the plan says why, the stage runs and
/// its record replaces that one, instead of the scheduler panicking when
/// the downstream stage looks the output up.
#[test]
fn a_record_lacking_a_declared_output_is_replaced_by_a_rerun() {
    let p = Project::new();
    p.write(
        "pipeline.yaml",
        r#"version: 1
name: lacking
stages:
  a:
    op: exec
    outputs: [out]
    params: { cmd: 'echo a > "$ALIGNFLOW_OUT/out"' }
  b:
    op: exec
    inputs: { x: "${stages.a.out}" }
    outputs: [out]
    params: { cmd: 'cp "$ALIGNFLOW_IN_X" "$ALIGNFLOW_OUT/out"' }
"#,
    );
    p.ok(&["run", "pipeline.yaml", "--quiet", "--target", "a"]);
    let record = common::walk(&p.path("cache/records"))
        .into_iter()
        .find(|f| f.extension().is_some_and(|e| e == "json"))
        .unwrap();
    let mut json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&record).unwrap()).unwrap();
    json["outputs"].as_object_mut().unwrap().clear();
    std::fs::set_permissions(&record, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::write(&record, serde_json::to_vec(&json).unwrap()).unwrap();
    let plan = p.ok(&["plan", "pipeline.yaml"]);
    assert!(
        plan.contains("its cached record lacks output(s) out"),
        "{plan}"
    );
    assert_eq!(p.run_stages("pipeline.yaml", &[]), common::set(&["a", "b"]));
    let replaced: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&record).unwrap()).unwrap();
    assert!(replaced["outputs"]["out"].is_string(), "{replaced}");
    verify_is_clean(&p);
}

/// A path input given as a symbolic link to a folder is watched through
/// the link: a stage that writes into the folder fails and stores nothing
/// (the guard looked at the link itself, and saw nothing change).
#[test]
fn a_folder_input_given_as_a_link_is_watched_through_it() {
    let p = Project::new();
    p.write("data/real/config.json", "{}\n");
    std::os::unix::fs::symlink(p.path("data/real"), p.path("model")).unwrap();
    p.write(
        "pipeline.yaml",
        r#"version: 1
name: linked
stages:
  b:
    op: exec
    inputs: { x: model }
    outputs: [out]
    params: { cmd: "echo tampered >> \"$ALIGNFLOW_IN_X/config.json\"; touch $ALIGNFLOW_OUT/out" }
"#,
    );
    let err = p.fails(&["run", "pipeline.yaml", "--quiet"]);
    assert!(err.contains("`x`") && err.contains("config.json"), "{err}");
    assert!(
        common::walk(&p.path("cache/records")).is_empty(),
        "nothing stored"
    );
}
