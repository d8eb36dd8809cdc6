//! Unit tests of the store: ids, the hash cache, ingest, records, locks,
//! verify and gc, each in a temporary folder.
use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, SystemTime};

use super::*;

fn cache() -> (tempfile::TempDir, Cache) {
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::open(&dir.path().join("cache")).unwrap();
    (dir, cache)
}

fn fp(n: u8) -> Fingerprint {
    Fingerprint(blake3::hash(&[n]).to_hex().to_string())
}

fn record(outputs: &[(&str, &ArtifactId)]) -> StageRecord {
    let key = StageKey {
        schema_version: STAGE_KEY_SCHEMA,
        op: "test".into(),
        op_version: 1,
        params: serde_json::json!({"lr": 3e-4, "n": outputs.len()}),
        inputs: BTreeMap::new(),
        seed: 7,
    };
    StageRecord {
        fingerprint: key.fingerprint(),
        key,
        pipeline: "p".into(),
        stage: "s".into(),
        outputs: outputs
            .iter()
            .map(|(n, id)| (n.to_string(), (*id).clone()))
            .collect(),
        metrics: BTreeMap::new(),
        duration_s: 1.5,
        engine_version: "0.1.0".into(),
        started_at: "2025-01-01T00:00:00Z".into(),
        finished_at: "2025-01-01T00:00:01Z".into(),
        provenance: None,
    }
}

/// A record that is no hit (corrupt bytes, or an output gone) does not
/// block the run that redoes its stage: the new record replaces it.
#[test]
fn a_commit_replaces_a_record_that_is_no_hit() {
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::open(dir.path()).unwrap();
    let src = dir.path().join("tmp").join("a");
    fs::write(&src, b"first").unwrap();
    let id = cache.ingest(&src).unwrap();
    let good = record(&[("out", &id)]);
    assert!(cache.commit_record(&good).unwrap());
    let path = common_record_path(dir.path());
    fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
    fs::write(&path, b"{ not json").unwrap();
    assert!(cache.record(&good.fingerprint).is_err());
    assert!(
        cache.commit_record(&good).unwrap(),
        "the corrupt record is replaced"
    );
    assert_eq!(cache.record(&good.fingerprint).unwrap(), Some(good.clone()));
    // An output that is gone: the record that names it is replaced too.
    let mut stale = good.clone();
    stale.outputs.insert(
        "out".into(),
        ArtifactId {
            kind: ArtifactKind::File,
            hash: "0".repeat(64),
        },
    );
    fs::write(&path, serde_json::to_vec(&stale).unwrap()).unwrap();
    assert_eq!(cache.hit(&good.fingerprint).unwrap(), None);
    assert!(cache.commit_record(&good).unwrap());
    assert_eq!(cache.hit(&good.fingerprint).unwrap(), Some(good.clone()));
    // A record that is a hit stands.
    assert!(!cache.commit_record(&good).unwrap());
}

/// The one record file under `records/`.
fn common_record_path(root: &Path) -> std::path::PathBuf {
    let files: Vec<_> = walk(&root.join("records"));
    assert_eq!(files.len(), 1, "{files:?}");
    files[0].clone()
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// Two nodes finishing the same stage: the first record stands, whole.
#[test]
fn a_record_is_committed_once() {
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::open(dir.path()).unwrap();
    let src = dir.path().join("tmp").join("a");
    fs::write(&src, b"first").unwrap();
    let first_id = cache.ingest(&src).unwrap();
    fs::write(&src, b"second").unwrap();
    let second_id = cache.ingest(&src).unwrap();
    let first = record(&[("out", &first_id)]);
    let mut second = first.clone();
    second.outputs.insert("out".into(), second_id);
    assert!(cache.commit_record(&first).unwrap());
    assert!(!cache.commit_record(&second).unwrap());
    assert_eq!(cache.record(&first.fingerprint).unwrap(), Some(first));
    let shard = fs::read_dir(dir.path().join("records"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap();
    let names: Vec<_> = fs::read_dir(shard.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 1, "no temporary file is left: {names:?}");
}

fn write(path: &Path, bytes: &[u8]) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, bytes).unwrap();
}

fn set_mtime(path: &Path, t: SystemTime) {
    fs::File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_modified(t)
        .unwrap();
}

/// A staged output: a file under a staging folder.
fn staged(cache: &Cache, name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let p = cache.staging_dir(&fp(99)).unwrap().join(name);
    write(&p, bytes);
    p
}

#[test]
fn cache_is_shared_across_tasks() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Cache>();
    send_sync::<StageLock>();
}

#[test]
fn file_id_is_plain_blake3_of_the_bytes() {
    let (dir, cache) = cache();
    let p = dir.path().join("data.jsonl");
    write(&p, b"{\"prompt\": \"hi\"}\n");
    let id = cache.hash_input(&p, false).unwrap();
    assert_eq!(id.kind, ArtifactKind::File);
    assert_eq!(
        id.hash,
        blake3::hash(b"{\"prompt\": \"hi\"}\n").to_hex().to_string()
    );
    assert_eq!(id.to_string().parse::<ArtifactId>().unwrap(), id);
}

#[test]
fn folder_id_ignores_creation_order_and_sees_one_byte() {
    let (dir, cache) = cache();
    let a = dir.path().join("a");
    write(&a.join("x.txt"), b"x");
    write(&a.join("sub/y.txt"), b"y");
    fs::create_dir_all(a.join("empty")).unwrap();
    let b = dir.path().join("b");
    write(&b.join("sub/y.txt"), b"y");
    write(&b.join("x.txt"), b"x");
    let ida = cache.hash_input(&a, false).unwrap();
    assert_eq!(ida.kind, ArtifactKind::Tree);
    assert_eq!(ida, cache.hash_input(&b, false).unwrap());

    write(&b.join("sub/y.txt"), b"z");
    assert_ne!(ida, cache.hash_input(&b, false).unwrap());
    // The listing is the documented canonical JSON.
    let listing = format!(
        "[[\"sub/y.txt\",\"{}\"],[\"x.txt\",\"{}\"]]",
        blake3::hash(b"y").to_hex(),
        blake3::hash(b"x").to_hex()
    );
    assert_eq!(
        ida.hash,
        blake3::hash(listing.as_bytes()).to_hex().to_string()
    );
}

#[test]
fn a_snapshot_folder_of_links_hashes_as_the_files_they_point_at() {
    // As a Hugging Face cache snapshot: files are links into `blobs/`.
    let (dir, cache) = cache();
    let blobs = dir.path().join("blobs");
    write(&blobs.join("1f2e"), b"{\"model_type\": \"gpt2\"}");
    write(&blobs.join("9a8b"), b"weights");
    let snap = dir.path().join("snapshots/abc");
    fs::create_dir_all(snap.join("sub")).unwrap();
    std::os::unix::fs::symlink("../../blobs/1f2e", snap.join("config.json")).unwrap();
    std::os::unix::fs::symlink("../../../blobs/9a8b", snap.join("sub/model.bin")).unwrap();
    let plain = dir.path().join("plain");
    write(&plain.join("config.json"), b"{\"model_type\": \"gpt2\"}");
    write(&plain.join("sub/model.bin"), b"weights");
    assert_eq!(
        cache.hash_input(&snap, false).unwrap(),
        cache.hash_input(&plain, false).unwrap()
    );
    // A link to a folder (it could loop) or a broken one is refused, named.
    std::os::unix::fs::symlink("sub", snap.join("loop")).unwrap();
    match cache.hash_input(&snap, false) {
        Err(CacheError::Unsupported { path, .. }) => assert!(path.ends_with("abc/loop")),
        other => panic!("{other:?}"),
    }
}

#[test]
fn symlink_inside_an_output_is_unsupported() {
    let (dir, cache) = cache();
    let a = dir.path().join("a");
    write(&a.join("x"), b"x");
    std::os::unix::fs::symlink("x", a.join("link")).unwrap();
    match cache.ingest(&a) {
        Err(CacheError::Unsupported { path, .. }) => assert!(path.ends_with("a/link")),
        other => panic!("{other:?}"),
    }
}

#[test]
fn hash_cache_skips_unchanged_files_and_notices_changes() {
    let (dir, cache) = cache();
    let p = dir.path().join("big.bin");
    let bytes: Vec<u8> = (0..4u32 << 20).map(|i| (i % 251) as u8).collect();
    write(&p, &bytes);
    let id = cache.hash_input(&p, false).unwrap();
    assert_eq!(cache.hashed_bytes(), 4 << 20);

    // Just written: not remembered (a same-size rewrite could keep the
    // mtime), so read again.
    assert_eq!(cache.hash_input(&p, false).unwrap(), id);
    assert_eq!(cache.hashed_bytes(), 8 << 20);
    let same_tick = fs::metadata(&p).unwrap().modified().unwrap();
    let mut other = bytes.clone();
    other[0] ^= 1;
    fs::write(&p, &other).unwrap();
    set_mtime(&p, same_tick);
    let racy = cache.hash_input(&p, false).unwrap();
    assert_eq!(racy.hash, blake3::hash(&other).to_hex().to_string());
    fs::write(&p, &bytes).unwrap();
    let a_while_ago = SystemTime::now() - Duration::from_secs(10);
    set_mtime(&p, a_while_ago);
    assert_eq!(cache.hash_input(&p, false).unwrap(), id);
    let read = cache.hashed_bytes();

    // Unchanged: nothing read.
    assert_eq!(cache.hash_input(&p, false).unwrap(), id);
    assert_eq!(cache.hashed_bytes(), read);

    // Same bytes, new mtime: rehashed, same id.
    fs::write(&p, &bytes).unwrap();
    set_mtime(&p, SystemTime::now() + Duration::from_secs(5));
    assert_eq!(cache.hash_input(&p, false).unwrap(), id);
    assert_eq!(cache.hashed_bytes(), read + (4 << 20));

    // New bytes of another size under the old mtime: noticed.
    let old_mtime = fs::metadata(&p).unwrap().modified().unwrap();
    fs::write(&p, &bytes[1..]).unwrap();
    set_mtime(&p, old_mtime);
    let changed = cache.hash_input(&p, false).unwrap();
    assert_eq!(changed.hash, blake3::hash(&bytes[1..]).to_hex().to_string());

    // rehash=true always reads.
    let before = cache.hashed_bytes();
    assert_eq!(cache.hash_input(&p, true).unwrap(), changed);
    assert_eq!(cache.hashed_bytes(), before + bytes.len() as u64 - 1);
}

#[test]
fn hash_cache_persists_across_opens() {
    let (dir, cache) = cache();
    let p = dir.path().join("in/data.bin");
    write(&p, &[7u8; 100_000]);
    write(&dir.path().join("in/other.bin"), b"other");
    // Still for a while (a file just written is not remembered).
    let a_while_ago = SystemTime::now() - Duration::from_secs(10);
    set_mtime(&p, a_while_ago);
    set_mtime(&dir.path().join("in/other.bin"), a_while_ago);
    let id = cache.hash_input(&dir.path().join("in"), false).unwrap();
    cache.flush_hash_cache().unwrap();
    drop(cache);

    let again = Cache::open(&dir.path().join("cache")).unwrap();
    assert_eq!(again.hash_input(&dir.path().join("in"), false).unwrap(), id);
    assert_eq!(again.hashed_bytes(), 0);
}

#[test]
fn flush_merges_entries_of_two_handles() {
    let (dir, a) = cache();
    let b = Cache::open(a.root()).unwrap();
    write(&dir.path().join("1"), b"one");
    write(&dir.path().join("2"), b"two");
    let a_while_ago = SystemTime::now() - Duration::from_secs(10);
    set_mtime(&dir.path().join("1"), a_while_ago);
    set_mtime(&dir.path().join("2"), a_while_ago);
    a.hash_input(&dir.path().join("1"), false).unwrap();
    b.hash_input(&dir.path().join("2"), false).unwrap();
    a.flush_hash_cache().unwrap();
    b.flush_hash_cache().unwrap();
    let c = Cache::open(a.root()).unwrap();
    c.hash_input(&dir.path().join("1"), false).unwrap();
    c.hash_input(&dir.path().join("2"), false).unwrap();
    assert_eq!(c.hashed_bytes(), 0);
}

#[test]
fn ingest_dedups_files_and_materialises_trees() {
    let (dir, cache) = cache();
    let f1 = staged(&cache, "a.bin", b"same bytes");
    let f2 = staged(&cache, "b.bin", b"same bytes");
    let id1 = cache.ingest(&f1).unwrap();
    let id2 = cache.ingest(&f2).unwrap();
    assert_eq!(id1, id2);
    assert!(!f1.exists() && !f2.exists());
    let blob = cache.artifact_path(&id1);
    assert_eq!(fs::read(&blob).unwrap(), b"same bytes");
    assert_eq!(
        fs::metadata(&blob).unwrap().permissions().mode() & 0o777,
        0o444
    );
    let shard = blob.parent().unwrap();
    assert_eq!(fs::read_dir(shard).unwrap().count(), 1);

    // A folder: its id equals hash_input of the same folder.
    let original = dir.path().join("model");
    write(&original.join("config.json"), b"{}");
    write(&original.join("weights/part0.bin"), &[1u8; 5000]);
    write(&original.join("weights/part1.bin"), b"same bytes");
    let expected = cache.hash_input(&original, false).unwrap();
    let out = cache.staging_dir(&fp(1)).unwrap().join("model");
    for rel in ["config.json", "weights/part0.bin", "weights/part1.bin"] {
        write(&out.join(rel), &fs::read(original.join(rel)).unwrap());
    }
    let id = cache.ingest(&out).unwrap();
    assert_eq!(id, expected);
    assert!(!out.exists());
    assert!(cache.has_artifact(&id));
    let tree = cache.artifact_path(&id);
    assert_eq!(
        fs::read(tree.join("weights/part0.bin")).unwrap(),
        vec![1u8; 5000]
    );
    assert_eq!(
        fs::read(tree.join("weights/part1.bin")).unwrap(),
        b"same bytes"
    );
    assert_eq!(cache.hash_input(&tree, true).unwrap(), id);

    // The same tree again is a no-op; verify finds nothing wrong.
    let again = cache.staging_dir(&fp(2)).unwrap().join("m");
    for rel in ["config.json", "weights/part0.bin", "weights/part1.bin"] {
        write(&again.join(rel), &fs::read(original.join(rel)).unwrap());
    }
    assert_eq!(cache.ingest(&again).unwrap(), id);
    let report = cache.verify().unwrap();
    assert_eq!(report.problems, Vec::<String>::new());
    assert_eq!((report.objects_checked, report.trees_checked), (3, 1));
}

#[test]
fn records_roundtrip_and_hit_needs_outputs() {
    let (_dir, cache) = cache();
    let id = cache.ingest(&staged(&cache, "out", b"output")).unwrap();
    let rec = record(&[("out", &id)]);
    assert!(cache.record(&rec.fingerprint).unwrap().is_none());
    cache.write_record(&rec).unwrap();
    assert_eq!(cache.record(&rec.fingerprint).unwrap().as_ref(), Some(&rec));
    assert_eq!(cache.hit(&rec.fingerprint).unwrap().as_ref(), Some(&rec));
    assert_eq!(cache.records().unwrap(), vec![rec.clone()]);

    fs::remove_file(cache.artifact_path(&id)).unwrap();
    assert!(cache.hit(&rec.fingerprint).unwrap().is_none());
    // A record never points at missing outputs.
    assert!(cache
        .write_record(&record(&[("out", &id), ("x", &id)]))
        .is_err());
}

#[test]
fn corrupt_record_is_an_error_for_record_and_a_miss_for_hit() {
    let (_dir, cache) = cache();
    let id = cache.ingest(&staged(&cache, "out", b"output")).unwrap();
    let rec = record(&[("out", &id)]);
    cache.write_record(&rec).unwrap();
    let path = cache
        .root()
        .join("records")
        .join(&rec.fingerprint.0[..2])
        .join(format!("{}.json", rec.fingerprint));
    fs::write(&path, b"{\"fingerprint\": ").unwrap();
    assert!(matches!(
        cache.record(&rec.fingerprint),
        Err(CacheError::CorruptRecord { .. })
    ));
    assert!(cache.hit(&rec.fingerprint).unwrap().is_none());
    assert!(cache.records().unwrap().is_empty());
    let report = cache.verify().unwrap();
    assert!(
        report.problems.iter().any(|p| p.contains("corrupt record")),
        "{:?}",
        report.problems
    );
    // gc refuses rather than guessing what the record kept.
    assert!(cache.gc(true).is_err());
    // A record file holding another fingerprint's record is no record of
    // its name either.
    let other = path.with_file_name(format!("{}.json", "ab".repeat(32)));
    let mut sound = rec.clone();
    sound.outputs.clear();
    fs::write(&other, serde_json::to_vec(&sound).unwrap()).unwrap();
    assert_eq!(cache.verify().unwrap().records_unusable.len(), 2);
    // `--repair` removes both (misses already), and gc runs again.
    let repaired = cache.verify_and_repair().unwrap();
    assert_eq!(repaired.repaired.len(), 2, "{:?}", repaired.repaired);
    assert!(!path.exists() && !other.exists());
    assert!(cache.verify().unwrap().problems.is_empty());
    assert!(cache.gc(true).is_ok());
}

#[test]
fn verify_names_a_corrupt_blob() {
    let (_dir, cache) = cache();
    let id = cache
        .ingest(&staged(&cache, "out", b"precious bytes"))
        .unwrap();
    cache.write_record(&record(&[("out", &id)])).unwrap();
    assert!(cache.verify().unwrap().problems.is_empty());

    let blob = cache.artifact_path(&id);
    fs::set_permissions(&blob, fs::Permissions::from_mode(0o644)).unwrap();
    let mut bytes = fs::read(&blob).unwrap();
    bytes[3] ^= 1;
    fs::write(&blob, &bytes).unwrap();
    let report = cache.verify().unwrap();
    let rel = format!("objects/{}/{}", &id.hash[..2], &id.hash[2..]);
    assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
    assert!(
        report.problems[0].starts_with(&format!("{rel}: content hash is ")),
        "{:?}",
        report.problems
    );
    assert!(report.problems[0].ends_with("(corrupt)"));
}

#[test]
fn verify_reports_missing_outputs_and_tree_files() {
    let (_dir, cache) = cache();
    let out = cache.staging_dir(&fp(1)).unwrap().join("d");
    write(&out.join("a"), b"a");
    write(&out.join("b"), b"b");
    let tree = cache.ingest(&out).unwrap();
    let file = cache.ingest(&staged(&cache, "f", b"f")).unwrap();
    cache
        .write_record(&record(&[("d", &tree), ("f", &file)]))
        .unwrap();
    fs::remove_file(cache.artifact_path(&file)).unwrap();
    fs::remove_file(cache.artifact_path(&tree).join("b")).unwrap();
    let problems = cache.verify().unwrap().problems;
    assert!(
        problems
            .iter()
            .any(|p| p.contains("output `f`") && p.contains("missing")),
        "{problems:?}"
    );
    assert!(
        problems
            .iter()
            .any(|p| p.starts_with(&format!("trees/{}/b: missing", tree.hash))),
        "{problems:?}"
    );
}

#[test]
fn gc_removes_only_unreachable_objects() {
    let (_dir, cache) = cache();
    let kept = cache.ingest(&staged(&cache, "kept", b"kept")).unwrap();
    let out = cache.staging_dir(&fp(1)).unwrap().join("d");
    write(&out.join("inner"), b"inner");
    let tree = cache.ingest(&out).unwrap();
    cache
        .write_record(&record(&[("kept", &kept), ("tree", &tree)]))
        .unwrap();
    let garbage = cache
        .ingest(&staged(&cache, "garbage", b"garbage!"))
        .unwrap();
    let gout = cache.staging_dir(&fp(2)).unwrap().join("g");
    write(&gout.join("g"), b"in a garbage tree");
    let gtree = cache.ingest(&gout).unwrap();

    let dry = cache.gc(true).unwrap();
    assert!(
        dry.removed.contains(&cache.artifact_path(&garbage)),
        "{:?}",
        dry.removed
    );
    assert!(dry.removed.contains(&cache.artifact_path(&gtree)));
    assert_eq!(dry.freed_bytes, 8 + 17 + gtree_listing_len(&cache, &gtree));
    assert!(cache.has_artifact(&garbage) && cache.has_artifact(&gtree));

    let real = cache.gc(false).unwrap();
    assert_eq!(real.removed, dry.removed);
    assert_eq!(real.freed_bytes, dry.freed_bytes);
    assert_eq!(real.kept_objects, 2);
    assert!(!cache.has_artifact(&garbage) && !cache.has_artifact(&gtree));
    assert!(cache.has_artifact(&kept) && cache.has_artifact(&tree));
    assert!(cache.verify().unwrap().problems.is_empty());
}

fn gtree_listing_len(cache: &Cache, id: &ArtifactId) -> u64 {
    fs::metadata(cache.root().join("trees").join(format!("{}.json", id.hash)))
        .unwrap()
        .len()
}

#[test]
fn stage_locks_exclude_other_handles() {
    let (_dir, a) = cache();
    let b = Cache::open(a.root()).unwrap();
    let lock = a.try_lock_stage(&fp(1)).unwrap().expect("free");
    assert!(b.try_lock_stage(&fp(1)).unwrap().is_none());
    assert!(a.try_lock_stage(&fp(1)).unwrap().is_none());
    assert!(b.try_lock_stage(&fp(2)).unwrap().is_some());
    drop(lock);
    assert!(b.try_lock_stage(&fp(1)).unwrap().is_some());

    // lock_stage blocks until the holder lets go.
    let held = a.lock_stage(&fp(3)).unwrap();
    let root = a.root().to_path_buf();
    let waiter = std::thread::spawn(move || {
        let c = Cache::open(&root).unwrap();
        let _l = c.lock_stage(&fp(3)).unwrap();
    });
    std::thread::sleep(Duration::from_millis(100));
    assert!(!waiter.is_finished());
    drop(held);
    waiter.join().unwrap();
}

#[test]
fn gc_keeps_staging_of_running_stages_and_objects_while_busy() {
    let (_dir, cache) = cache();
    let other = Cache::open(cache.root()).unwrap();
    let lock = other.lock_stage(&fp(1)).unwrap();
    let running = other.staging_dir(&fp(1)).unwrap();
    write(&running.join("partial.bin"), b"partial");
    let stale = cache.staging_dir(&fp(2)).unwrap();
    write(&stale.join("left.bin"), b"left over");
    // Ingested by the running stage, not yet recorded.
    let fresh = other.ingest(&staged(&other, "fresh", b"fresh")).unwrap();

    let report = cache.gc(false).unwrap();
    assert!(running.join("partial.bin").exists());
    assert!(!stale.exists());
    assert!(report.removed.contains(&stale));
    assert!(cache.has_artifact(&fresh), "busy cache: objects are kept");

    drop(lock);
    let report = cache.gc(false).unwrap();
    assert!(
        !running.exists() && !cache.has_artifact(&fresh),
        "{:?}",
        report.removed
    );
}

#[test]
fn open_creates_the_layout_and_dirs_on_demand() {
    let (_dir, cache) = cache();
    for sub in ["objects", "trees", "records", "locks", "tmp"] {
        assert!(cache.root().join(sub).is_dir(), "{sub}");
    }
    let ck = cache.checkpoint_dir(&fp(1)).unwrap();
    assert!(ck.is_dir() && ck.ends_with(format!("checkpoints/{}", fp(1))));
    assert!(cache.logs_dir().unwrap().is_dir());
    let s1 = cache.staging_dir(&fp(1)).unwrap();
    let s2 = cache.staging_dir(&fp(1)).unwrap();
    assert_ne!(s1, s2);
    assert_eq!(fs::read_dir(&s1).unwrap().count(), 0);
    assert!(cache.record(&Fingerprint("../x".into())).is_err());
}

/// `cargo test -p alignflow --lib cache -- --ignored`: a 1 GiB input hashes in
/// about a second, and a cached one in microseconds.
#[test]
#[ignore = "writes 1 GiB"]
fn large_input_timing() {
    use std::io::Write;
    let (dir, cache) = cache();
    let p = dir.path().join("big.bin");
    let mut f = fs::File::create(&p).unwrap();
    let chunk: Vec<u8> = (0..1u32 << 20).map(|i| (i * 31 % 256) as u8).collect();
    for _ in 0..1024 {
        f.write_all(&chunk).unwrap();
    }
    drop(f);
    let t = std::time::Instant::now();
    let id = cache.hash_input(&p, false).unwrap();
    let first = t.elapsed();
    let t = std::time::Instant::now();
    assert_eq!(cache.hash_input(&p, false).unwrap(), id);
    let cached = t.elapsed();
    eprintln!("1 GiB: first hash {first:?}, cached {cached:?}");
    assert!(cached < Duration::from_millis(50));
}

/// A committed record of its own fingerprint (`seed` tells them apart).
fn committed(cache: &Cache, seed: u64) -> Fingerprint {
    let mut rec = record(&[]);
    rec.key.seed = seed;
    rec.fingerprint = rec.key.fingerprint();
    cache.write_record(&rec).unwrap();
    rec.fingerprint
}

#[test]
fn a_committed_stage_retires_its_checkpoints_unless_kept() {
    let (_dir, cache) = cache();
    let gone = cache.checkpoint_dir(&fp(1)).unwrap();
    write(&gone.join("train/step-00000002/w.bin"), b"weights");
    cache.retire_checkpoints(&fp(1), false).unwrap();
    assert!(!gone.exists());
    cache.retire_checkpoints(&fp(1), false).unwrap();

    let kept = cache.checkpoint_dir(&fp(2)).unwrap();
    write(&kept.join("train/step-00000002/w.bin"), b"weights");
    cache.retire_checkpoints(&fp(2), true).unwrap();
    assert!(kept.join("train/step-00000002/w.bin").exists());
}

#[test]
fn gc_collects_checkpoints_nothing_resumes_from() {
    let (_dir, cache) = cache();
    let done = committed(&cache, 1);
    let done_dir = cache.checkpoint_dir(&done).unwrap();
    write(&done_dir.join("train/step-00000002/w.bin"), b"0123456789");
    let empty = cache.checkpoint_dir(&fp(2)).unwrap();
    // An interrupted stage resumes from this one: it stays.
    let resumable = cache.checkpoint_dir(&fp(3)).unwrap();
    write(&resumable.join("train/step-00000001/w.bin"), b"resume");
    let kept = committed(&cache, 4);
    let kept_dir = cache.checkpoint_dir(&kept).unwrap();
    write(&kept_dir.join("train/step-00000002/w.bin"), b"kept");
    cache.retire_checkpoints(&kept, true).unwrap();
    // Committed, but a run holds the lock (it is retiring them itself).
    let busy = committed(&cache, 5);
    let busy_dir = cache.checkpoint_dir(&busy).unwrap();
    write(&busy_dir.join("w.bin"), b"busy");
    let other = Cache::open(cache.root()).unwrap();
    let lock = other.lock_stage(&busy).unwrap();

    let dry = cache.gc(true).unwrap();
    let listed: Vec<(&std::path::PathBuf, &u64)> =
        dry.removed.iter().zip(&dry.removed_bytes).collect();
    assert!(listed.contains(&(&done_dir, &10)), "{listed:?}");
    assert!(listed.contains(&(&empty, &0)), "{listed:?}");
    for stays in [&resumable, &kept_dir, &busy_dir] {
        assert!(!dry.removed.contains(stays), "{stays:?} in {listed:?}");
    }
    assert!(done_dir.exists(), "a dry run removes nothing");

    let real = cache.gc(false).unwrap();
    assert_eq!(real.removed, dry.removed);
    assert!(!done_dir.exists() && !empty.exists());
    assert!(resumable.exists() && kept_dir.exists() && busy_dir.exists());
    drop(lock);
    let after = cache.gc(false).unwrap();
    assert!(after.removed.contains(&busy_dir), "{:?}", after.removed);
}

/// On a shared cache an empty checkpoint folder may be a stage's that
/// another node runs (its lock perhaps unseen from here), before its first
/// checkpoint: gc keeps it until it is `min_age` old.
#[test]
fn gc_keeps_young_empty_checkpoint_folders_on_a_shared_cache() {
    let (_dir, cache) = cache();
    let empty = cache.checkpoint_dir(&fp(2)).unwrap();
    cache
        .gc_min_age(false, Duration::from_secs(86_400))
        .unwrap();
    assert!(empty.exists(), "young: kept");
    cache.gc_min_age(false, Duration::ZERO).unwrap();
    assert!(!empty.exists(), "no minimum age: removed");
}

/// On a shared cache a temporary whose pid is not alive here may be another
/// node's write in progress: gc keeps it until it is `min_age` old; on a
/// machine's own cache (no minimum age) it goes at once.
#[test]
fn gc_keeps_young_temporaries_of_unknown_writers_on_a_shared_cache() {
    let (dir, cache) = cache();
    let root = dir.path().join("cache");
    // A pid no process has (above the kernel's pid_max).
    let temp = root.join(format!(".hashes.json.tmp.{}.0", 1u32 << 30));
    fs::write(&temp, b"half written").unwrap();
    let tree_temp = root
        .join("tmp")
        .join(format!(".tree-x.tmp.{}.1", 1u32 << 30));
    fs::create_dir_all(&tree_temp).unwrap();
    cache
        .gc_min_age(false, Duration::from_secs(86_400))
        .unwrap();
    assert!(temp.exists() && tree_temp.exists(), "young: kept");
    cache.gc_min_age(false, Duration::ZERO).unwrap();
    assert!(
        !temp.exists() && !tree_temp.exists(),
        "no minimum age: removed"
    );
}

/// A temporary another host writes (a Slurm job committing into a cache
/// not marked shared) is not judged by its pid, which means nothing here:
/// gc keeps it, minimum age or not, until it is a day old.
#[test]
fn gc_keeps_another_hosts_temporaries() {
    let (dir, cache) = cache();
    let root = dir.path().join("cache");
    let temp = root.join(format!(".hashes.json.tmp.{}-0123abcd.0", 1u32 << 30));
    fs::write(&temp, b"being written on another node").unwrap();
    let tree_temp = root
        .join("tmp")
        .join(format!(".tree-x.tmp.{}-0123abcd.1", 1u32 << 30));
    fs::create_dir_all(&tree_temp).unwrap();
    cache.gc_min_age(false, Duration::ZERO).unwrap();
    assert!(temp.exists() && tree_temp.exists());
}

/// A copy into the store is checked against the hash it is stored under:
/// a file written through another of its names after it was hashed is
/// refused, and nothing is stored.
#[test]
fn a_copy_that_is_not_its_hash_is_not_stored() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    fs::write(&src, b"written after hashing").unwrap();
    let dst = dir.path().join("blob");
    let hashed = blake3::hash(b"what was hashed").to_hex().to_string();
    let err = super::objects::copy_into_store(&src, &dst, &hashed).unwrap_err();
    assert!(
        err.to_string().contains("changed while it was stored"),
        "{err}"
    );
    assert!(!dst.exists());
    let right = blake3::hash(b"written after hashing").to_hex().to_string();
    super::objects::copy_into_store(&src, &dst, &right).unwrap();
    assert_eq!(fs::read(&dst).unwrap(), b"written after hashing");
    let left: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(left.len(), 2, "no temporary left: {left:?}");
}

/// A stage output identical to an unreachable, old object reuses it. A gc
/// on a shared cache (another node's, which listed the records before the
/// stage's was committed) keeps only unreachable objects younger than its
/// minimum age: reuse makes the object young again, so it stays until the
/// record that reaches it is in.
#[test]
fn a_reused_object_is_young_again_for_a_shared_cache_gc() {
    let (_dir, cache) = cache();
    let garbage = cache.ingest(&staged(&cache, "g", b"never reused")).unwrap();
    let first = cache.ingest(&staged(&cache, "a", b"reused bytes")).unwrap();
    let out = cache.staging_dir(&fp(1)).unwrap().join("d");
    write(&out.join("inner"), b"reused tree");
    let first_tree = cache.ingest(&out).unwrap();
    // Long enough for the reuse and the gc below on a loaded machine.
    let min_age = Duration::from_secs(3);
    std::thread::sleep(min_age + Duration::from_millis(100));

    // A stage's outputs, the same bytes: ingested, their record not yet written.
    let blob = cache.ingest(&staged(&cache, "b", b"reused bytes")).unwrap();
    let out = cache.staging_dir(&fp(2)).unwrap().join("d");
    write(&out.join("inner"), b"reused tree");
    let tree = cache.ingest(&out).unwrap();
    assert_eq!((&blob, &tree), (&first, &first_tree));

    let report = cache.gc_min_age(false, min_age).unwrap();
    assert!(!cache.has_artifact(&garbage), "{:?}", report.removed);
    assert!(
        cache.has_artifact(&blob) && cache.has_artifact(&tree),
        "{:?}",
        report.removed
    );
    cache
        .write_record(&record(&[("blob", &blob), ("tree", &tree)]))
        .unwrap();
    assert!(cache.verify().unwrap().problems.is_empty());
}

/// Flips one byte of a stored file in place (its inode, and so every
/// tree file linked to it, changes with it).
fn corrupt_in_place(path: &Path) {
    fs::set_permissions(path, fs::Permissions::from_mode(0o644)).unwrap();
    let mut bytes = fs::read(path).unwrap();
    bytes[0] ^= 1;
    fs::write(path, &bytes).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(0o444)).unwrap();
}

/// An output whose blob (and tree) is already stored but damaged is
/// stored anew, the damaged copies moved to quarantine: reused, the record
/// would name bytes the next stage's input check refuses.
#[test]
fn an_output_is_not_deduplicated_onto_a_damaged_copy() {
    let (dir, cache) = cache();
    let file = cache
        .ingest(&staged(&cache, "out", b"precious bytes"))
        .unwrap();
    let folder = cache.staging_dir(&fp(2)).unwrap().join("d");
    write(&folder.join("w.bin"), b"weights");
    let tree = cache.ingest(&folder).unwrap();
    let weights = blake3::hash(b"weights").to_hex().to_string();
    corrupt_in_place(&cache.blob_path(&file.hash));
    corrupt_in_place(&cache.blob_path(&weights));

    assert_eq!(
        cache
            .ingest(&staged(&cache, "out", b"precious bytes"))
            .unwrap(),
        file
    );
    write(&folder.join("w.bin"), b"weights");
    assert_eq!(cache.ingest(&folder).unwrap(), tree);

    assert_eq!(
        fs::read(cache.artifact_path(&file)).unwrap(),
        b"precious bytes"
    );
    assert_eq!(
        fs::read(cache.artifact_path(&tree).join("w.bin")).unwrap(),
        b"weights"
    );
    assert!(cache.verify().unwrap().problems.is_empty());
    let quarantined = walk(&dir.path().join("cache").join("quarantine"));
    assert_eq!(
        quarantined.len(),
        4,
        "two blobs, a tree and its listing: {quarantined:?}"
    );
}

/// gc removes from `downloads/` what is there for blobs already stored (a
/// part a killed adoption left linked to its blob, which freed nothing,
/// and a part whose blob came another way) unless a pull holds it, and
/// range states without a part; an interrupted download stays to resume.
#[test]
fn gc_removes_download_parts_of_stored_blobs() {
    let (dir, cache) = cache();
    let stored = cache
        .ingest(&staged(&cache, "out", b"stored bytes"))
        .unwrap();
    let extra = cache
        .ingest(&staged(&cache, "more", b"more bytes"))
        .unwrap();
    cache
        .write_record(&record(&[("out", &stored), ("more", &extra)]))
        .unwrap();
    let busy = cache
        .ingest(&staged(&cache, "busy", b"busy bytes"))
        .unwrap();
    cache.write_record(&record(&[("busy", &busy)])).unwrap();
    let downloads = cache.downloads_dir().unwrap();
    let part = |hash: &str| downloads.join(format!("{hash}.part"));
    fs::hard_link(cache.artifact_path(&stored), part(&stored.hash)).unwrap();
    write(&part(&extra.hash), b"more");
    write(&downloads.join(format!("{}.parts.json", extra.hash)), b"{}");
    write(&part(&busy.hash), b"busy");
    let pending = blake3::hash(b"not here yet").to_hex().to_string();
    write(&part(&pending), b"not here");
    write(&downloads.join(format!("{pending}.parts.json")), b"{}");
    let orphan = downloads.join(format!("{}.parts.json", fp(5)));
    write(&orphan, b"{}");

    let mut pull = fd_lock::RwLock::new(fs::File::open(part(&busy.hash)).unwrap());
    let _held = pull.write().unwrap();
    let report = cache.gc(false).unwrap();
    // (The staging folders the outputs came from go too.)
    let mut removed: Vec<_> = report
        .removed
        .iter()
        .filter(|p| p.starts_with(&downloads))
        .cloned()
        .collect();
    removed.sort();
    let mut expected = vec![part(&stored.hash), part(&extra.hash), orphan];
    expected.sort();
    assert_eq!(removed, expected);
    assert!(!downloads
        .join(format!("{}.parts.json", extra.hash))
        .exists());
    let freed =
        |p: &Path| report.removed_bytes[report.removed.iter().position(|r| r == p).unwrap()];
    assert_eq!(freed(&part(&stored.hash)), 0, "a second link frees nothing");
    assert_eq!(freed(&part(&extra.hash)), 4);
    assert!(part(&busy.hash).exists(), "a pull holds it");
    assert!(part(&pending).exists() && downloads.join(format!("{pending}.parts.json")).exists());
    assert_eq!(
        fs::read(cache.artifact_path(&stored)).unwrap(),
        b"stored bytes"
    );
    drop(dir);
}
