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
