//! A cache shared by a group on a cluster filesystem: `cache init --shared`
//! and `gc`'s age threshold.

mod common;

use std::os::unix::fs::PermissionsExt;

use common::{Project, CHAIN};

#[test]
fn a_shared_cache_is_group_writable_and_gc_keeps_young_garbage() {
    let p = Project::new();
    p.write("pipe.yaml", CHAIN);
    p.write("input.txt", "some input\n");
    p.ok(&["run", "pipe.yaml", "--quiet"]);
    let out = p.ok(&["cache", "init", "--shared"]);
    assert!(out.contains("shared"), "{out}");
    let mode = |rel: &str| std::fs::metadata(p.path(rel)).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode("cache/records"), 0o2775);
    assert_eq!(mode("cache/objects"), 0o2775);

    // Garbage: the outputs of a stage whose record is gone.
    let record = common::walk(&p.path("cache/records"))
        .into_iter()
        .find(|f| f.extension().is_some_and(|e| e == "json"))
        .unwrap();
    std::fs::remove_file(record).unwrap();
    let out = p.ok(&["cache", "gc"]);
    assert!(
        out.contains("removed 0 item(s)"),
        "young garbage is kept on a shared cache: {out}"
    );
    let out = p.ok(&["cache", "gc", "--min-age", "0s"]);
    assert!(!out.contains("removed 0 item(s)"), "{out}");

    // New record folders of the group's runs are group-writable too.
    p.write("input.txt", "other input\n");
    p.ok(&["run", "pipe.yaml", "--quiet"]);
    for shard in std::fs::read_dir(p.path("cache/records")).unwrap() {
        let m = shard.unwrap().metadata().unwrap().permissions().mode() & 0o7777;
        assert_eq!(m & 0o2070, 0o2070, "{m:o}");
    }
}

/// On a shared cache a running stage keeps its staging folder young (a gc
/// on another node judges it by its change time: the stage's lock may not
/// be seen from there): here with a gc age of 4 s, marked every second.
#[test]
fn a_running_stage_keeps_its_staging_folder_young() {
    let p = Project::new();
    p.write(
        "pipe.yaml",
        r#"version: 1
name: long
stages:
  nap:
    op: exec
    outputs: [x]
    params: { cmd: 'touch started; for i in $(seq 600); do [ -f go ] && break; sleep 0.05; done; echo done > "$ALIGNFLOW_OUT/x"' }
"#,
    );
    p.ok(&["cache", "init", "--shared"]);
    p.write(
        "cache/config.json",
        r#"{"shared": true, "gc_min_age_s": 4}"#,
    );
    let mut run = p.spawn_until(&["run", "pipe.yaml", "--quiet"], "started");
    let staging = std::fs::read_dir(p.path("cache/tmp"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|d| d.join("out").is_dir())
        .expect("the stage's staging folder");
    let changed = || {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(&staging).unwrap();
        std::time::UNIX_EPOCH + std::time::Duration::new(m.ctime() as u64, m.ctime_nsec() as u32)
    };
    let first = changed();
    std::thread::sleep(std::time::Duration::from_millis(2500));
    let later = changed();
    let age = later.elapsed().unwrap();
    p.write("go", "");
    assert!(run.wait().unwrap().success());
    assert!(later > first, "the staging folder was not marked young");
    // Marked each second: younger than the gc age by far.
    assert!(age < std::time::Duration::from_secs(3), "{age:?}");
}
