//! The team cache: push from one cache, pull into another, against a real
//! S3 server (SeaweedFS) and a shared folder (`file://`), with tampering,
//! signatures, a read-only identity, racing pushes and interrupted
//! transfers.
mod common;
use common::seaweed::{Seaweed, PUSHER, READER, WRITER};
use common::*;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// A chain with a folder output (a tree) besides the file outputs.
fn pipeline() -> String {
    format!(
        "{CHAIN}  model:\n    op: exec\n    inputs:\n      x: ${{stages.b.out}}\n    outputs: [weights]\n    params:\n      cmd: mkdir -p \"$ALIGNFLOW_OUT/weights/sub\" && cp \"$ALIGNFLOW_IN_X\" \"$ALIGNFLOW_OUT/weights/a\" && seq 1000 > \"$ALIGNFLOW_OUT/weights/sub/b\"; echo model >> runs.txt\n"
    )
}

const STAGES: [&str; 5] = ["a", "b", "c", "d", "model"];

/// The key prefix of the S3 remotes: a space, a non-ASCII letter and a
/// `~` that the URL percent-encodes (or not) must still name these keys.
const PREFIX: &str = "team cache/équipe~ci";

/// One remote under test and the environment a command needs for it.
struct Backend {
    url: String,
    env: Vec<(String, String)>,
    _server: Option<Seaweed>,
    _folder: Option<tempfile::TempDir>,
}

impl Backend {
    fn s3() -> Backend {
        let server = Seaweed::start();
        Backend {
            url: server.url(PREFIX),
            env: pairs(&WRITER),
            _server: Some(server),
            _folder: None,
        }
    }

    fn folder() -> Backend {
        let dir = tempfile::tempdir().unwrap();
        Backend {
            url: format!("file://{}", dir.path().join("remote").display()),
            env: Vec::new(),
            _server: None,
            _folder: Some(dir),
        }
    }

    fn server(&self) -> Option<&Seaweed> {
        self._server.as_ref()
    }
}

fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
    p.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A project with the pipeline, its input and a config file of its own
/// (so no user config on the machine takes part).
fn project() -> Project {
    let p = Project::new();
    p.write("pipeline.yaml", &pipeline());
    p.write("input.txt", "some input\n");
    p.write("alignflow.config.yaml", "remotes: {}\n");
    p
}

fn cmd(p: &Project, b: &Backend, args: &[&str]) -> Command {
    let mut c = p.cmd(args);
    c.env("ALIGNFLOW_CONFIG", p.path("alignflow.config.yaml"));
    c.env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY");
    for (k, v) in &b.env {
        c.env(k, v);
    }
    c
}

fn ok(out: Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn run_ok(p: &Project, b: &Backend, args: &[&str]) -> String {
    ok(cmd(p, b, args).output().unwrap(), &format!("{args:?}"))
}

fn run_fails(p: &Project, b: &Backend, args: &[&str]) -> String {
    let out = cmd(p, b, args).output().unwrap();
    assert!(
        !out.status.success(),
        "{args:?} should fail:\nstdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// (stage, action, reason) of `plan --json`.
fn plan(p: &Project, b: &Backend, extra: &[&str]) -> Vec<(String, String, String)> {
    let mut args = vec!["plan", "pipeline.yaml", "--json"];
    args.extend_from_slice(extra);
    let rows: serde_json::Value = serde_json::from_str(&run_ok(p, b, &args)).unwrap();
    rows.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["stage"].as_str().unwrap().to_string(),
                r["action"].as_str().unwrap().to_string(),
                r["reason"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// Every file of stage `stage`'s outputs: relative path -> bytes.
fn outputs(p: &Project, b: &Backend, stage: &str) -> Vec<(String, Vec<u8>)> {
    let shown: serde_json::Value =
        serde_json::from_str(&run_ok(p, b, &["show", "pipeline.yaml", stage, "--json"])).unwrap();
    let mut files = Vec::new();
    for (name, out) in shown.as_object().unwrap() {
        let path = PathBuf::from(out["path"].as_str().unwrap());
        if path.is_dir() {
            for f in walk(&path) {
                let rel = f.strip_prefix(&path).unwrap().display().to_string();
                files.push((format!("{name}/{rel}"), std::fs::read(&f).unwrap()));
            }
        } else {
            files.push((name.clone(), std::fs::read(&path).unwrap()));
        }
    }
    files.sort();
    files
}

/// A project that ran the pipeline and pushed it.
fn pushed(b: &Backend) -> Project {
    let a = project();
    assert_eq!(a.run_stages("pipeline.yaml", &[]), set(&STAGES));
    let out = run_ok(
        &a,
        b,
        &["cache", "push", "--remote", &b.url, "pipeline.yaml"],
    );
    assert!(out.contains("5 record(s) pushed, 0 already"), "{out}");
    a
}

fn push_then_pull_into_an_empty_cache(b: Backend) {
    let a = pushed(&b);
    // Pushing again sends nothing.
    let again = run_ok(&a, &b, &["cache", "push", "--remote", &b.url]);
    assert!(again.contains("0 record(s) pushed, 5 already"), "{again}");

    let fresh = project();
    for (stage, action, reason) in plan(&fresh, &b, &["--remote", &b.url]) {
        assert_eq!(
            (action.as_str(), reason.as_str()),
            ("cached", "remote"),
            "{stage}"
        );
    }
    let out = run_ok(
        &fresh,
        &b,
        &["cache", "pull", "--remote", &b.url, "pipeline.yaml"],
    );
    assert!(out.contains("5 record(s) pulled"), "{out}");
    for (stage, action, reason) in plan(&fresh, &b, &[]) {
        assert_eq!(
            (action.as_str(), reason.as_str()),
            ("cached", "up to date"),
            "{stage}"
        );
    }
    for stage in STAGES {
        assert_eq!(
            outputs(&fresh, &b, stage),
            outputs(&a, &b, stage),
            "{stage}"
        );
    }
    assert!(
        !fresh.path("runs.txt").exists(),
        "nothing ran in the fresh project"
    );
    // The pulled cache is sound.
    run_ok(&fresh, &b, &["cache", "verify"]);
    let verified = run_ok(&a, &b, &["cache", "verify", "--remote", &b.url]);
    assert!(verified.contains("0 problem(s)"), "{verified}");
    // Pull without a manifest: everything on the remote, here already local.
    let all = run_ok(&fresh, &b, &["cache", "pull", "--remote", &b.url]);
    assert!(all.contains("0 record(s) pulled, 5 already local"), "{all}");
    // No credential reached a record, a lockfile or a log.
    for p in [&a, &fresh] {
        for f in walk(p.dir.path()) {
            let text = String::from_utf8_lossy(&std::fs::read(&f).unwrap()).to_string();
            for (_, secret) in WRITER {
                assert!(!text.contains(secret), "{} holds a credential", f.display());
            }
        }
    }
}

#[test]
fn s3_push_then_pull_into_an_empty_cache() {
    push_then_pull_into_an_empty_cache(Backend::s3());
}

#[test]
fn folder_push_then_pull_into_an_empty_cache() {
    push_then_pull_into_an_empty_cache(Backend::folder());
}

/// A server asked to do without conditional writes (`conditional_put:
/// disabled`, for stores that lack them): folder outputs' listings are
/// pushed with plain writes too, and a fresh cache pulls every stage.
#[test]
fn s3_without_conditional_writes_pushes_and_pulls_folders() {
    let mut b = Backend::s3();
    b.url.push_str("&conditional_put=disabled");
    push_then_pull_into_an_empty_cache(b);
}

/// Replaces the remote object of blob `hash` with other bytes.
fn tamper(b: &Backend, hash: &str, bytes: &[u8]) {
    let key = format!("objects/{}/{}", &hash[..2], &hash[2..]);
    match b.server() {
        Some(server) => {
            use object_store::ObjectStore;
            let store = object_store::aws::AmazonS3Builder::new()
                .with_bucket_name(common::seaweed::BUCKET)
                .with_endpoint(format!("http://127.0.0.1:{}", server.s3_port))
                .with_allow_http(true)
                .with_region("us-east-1")
                .with_access_key_id(WRITER[0].1)
                .with_secret_access_key(WRITER[1].1)
                .build()
                .unwrap();
            let rt = tokio::runtime::Runtime::new().unwrap();
            // The remote's keys are the prefix's text, unencoded.
            let path = object_store::path::Path::parse(format!("{PREFIX}/{key}")).unwrap();
            rt.block_on(store.put(&path, bytes.to_vec().into()))
                .unwrap();
        }
        None => {
            let root = b.url.strip_prefix("file://").unwrap();
            let path = Path::new(root).join(key);
            assert!(path.is_file(), "{}", path.display());
            std::fs::write(path, bytes).unwrap();
        }
    }
}

/// One malformed record on the remote fails that record's pull, not the
/// whole pull: the other stages arrive, and the exit status says one failed.
#[test]
fn a_malformed_remote_record_fails_alone() {
    let b = Backend::folder();
    let _a = pushed(&b);
    let root = PathBuf::from(b.url.strip_prefix("file://").unwrap());
    let record = walk(&root.join("records"))
        .into_iter()
        .find(|f| f.extension().is_some_and(|e| e == "json"))
        .unwrap();
    std::fs::write(&record, b"{ not a record").unwrap();
    let fresh = project();
    let out = cmd(&fresh, &b, &["cache", "pull", "--remote", &b.url])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{stdout}");
    assert!(
        stdout.contains("4 record(s) pulled, 0 already local, 0 untrusted, 1 failed"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The blob hash of stage `stage`'s output `out` in project `p`.
fn output_hash(p: &Project, b: &Backend, stage: &str) -> String {
    let shown: serde_json::Value =
        serde_json::from_str(&run_ok(p, b, &["show", "pipeline.yaml", stage, "--json"])).unwrap();
    let id = shown["out"]["id"].as_str().unwrap();
    id.strip_prefix("file:").unwrap().to_string()
}

fn a_tampered_object_is_refused(b: Backend) {
    let a = pushed(&b);
    tamper(&b, &output_hash(&a, &b, "a"), b"forged content\n");
    let fresh = project();
    let out = run_fails(
        &fresh,
        &b,
        &["cache", "pull", "--remote", &b.url, "pipeline.yaml"],
    );
    assert!(out.contains("content hash is"), "{out}");
    assert!(out.contains("rejected"), "{out}");
    let rows = plan(&fresh, &b, &["--no-remote"]);
    assert_eq!(
        rows[0],
        ("a".into(), "run".into(), "never run".into()),
        "{rows:?}"
    );
    assert!(walk(&fresh.path("cache/objects"))
        .iter()
        .all(|f| std::fs::read(f).unwrap() != b"forged content\n"));
    // `run` through the remote refuses it too, and runs `a` instead.
    let ran = run_ok(&fresh, &b, &["run", "pipeline.yaml", "--remote", &b.url]);
    assert_eq!(stages_with_status(&ran, "ran"), set(&["a"]), "{ran}");
    assert_eq!(outputs(&fresh, &b, "a"), outputs(&a, &b, "a"));
    let verify = run_fails(&a, &b, &["cache", "verify", "--remote", &b.url]);
    // The object, and the record that names it.
    assert!(
        verify.contains("(corrupt)") && verify.contains("2 problem(s)"),
        "{verify}"
    );
    assert!(verify.contains("(stage `a`): output `out`"), "{verify}");
}

#[test]
fn s3_a_tampered_object_is_refused() {
    a_tampered_object_is_refused(Backend::s3());
}

#[test]
fn folder_a_tampered_object_is_refused() {
    a_tampered_object_is_refused(Backend::folder());
}

/// Writes a config with remote `team` at `url` plus `extra` YAML lines.
fn configure(p: &Project, url: &str, extra: &str) {
    p.write(
        "alignflow.config.yaml",
        &format!("remotes:\n  team:\n    url: \"{url}\"\n{extra}"),
    );
}

fn keygen(p: &Project, b: &Backend, name: &str) -> String {
    run_ok(
        p,
        b,
        &["cache", "keygen", name, "--out", &format!("{name}.key")],
    )
    .trim()
    .to_string()
}

fn untrusted_records_are_ignored_when_keys_are_configured(b: Backend) {
    let a = project();
    a.run_stages("pipeline.yaml", &[]);
    let ci_key = keygen(&a, &b, "ci");
    let other_key = keygen(&a, &b, "other");
    assert!(ci_key.starts_with("ci:") && other_key.starts_with("other:"));
    // `d` unsigned, every other stage signed by `ci`.
    configure(&a, &b.url, "");
    run_ok(
        &a,
        &b,
        &[
            "cache",
            "push",
            "--remote",
            "team",
            "pipeline.yaml",
            "--target",
            "d",
        ],
    );
    // The others signed: `d` is not among them (its unsigned record would
    // be replaced, tested below).
    configure(&a, &b.url, "    signing_key: ci.key\n");
    let out = run_ok(
        &a,
        &b,
        &[
            "cache",
            "push",
            "--remote",
            "team",
            "pipeline.yaml",
            "--target",
            "c",
            "--target",
            "model",
        ],
    );
    assert!(out.contains("4 record(s) pushed, 0 already"), "{out}");

    let fresh = project();
    // Only a key that signed nothing is trusted: every record is a miss.
    configure(
        &fresh,
        &b.url,
        &format!("    trusted_keys: [\"{other_key}\"]\n"),
    );
    let out = run_ok(
        &fresh,
        &b,
        &["cache", "pull", "--remote", "team", "pipeline.yaml"],
    );
    assert!(out.contains("0 record(s) pulled"), "{out}");
    for (stage, action, _) in plan(&fresh, &b, &["--remote", "team"]) {
        assert_eq!(action, "run", "{stage}");
    }
    // Trusting `ci`: its records are used, the unsigned one is not.
    configure(
        &fresh,
        &b.url,
        &format!("    trusted_keys: [\"{ci_key}\"]\n"),
    );
    let out = run_ok(&fresh, &b, &["cache", "pull", "--remote", "team"]);
    assert!(
        out.contains("4 record(s) pulled") && out.contains("1 untrusted"),
        "{out}"
    );
    assert!(out.contains("not signed"), "{out}");
    let rows = plan(&fresh, &b, &["--remote", "team"]);
    for (stage, action, _) in rows {
        assert_eq!(action == "cached", stage != "d", "{stage}");
    }
    let verify = run_fails(&fresh, &b, &["cache", "verify", "--remote", "team"]);
    assert!(
        verify.contains("untrusted: the record is not signed"),
        "{verify}"
    );
    // A push signed by `ci` replaces the unsigned record of `d` (a teammate
    // pushed first): the consumers that trust `ci` then use it.
    let out = run_ok(
        &a,
        &b,
        &["cache", "push", "--remote", "team", "pipeline.yaml"],
    );
    assert!(
        out.contains("0 record(s) pushed, 1 unsigned replaced by signed, 4 already"),
        "{out}"
    );
    assert!(out.contains("signed  d"), "{out}");
    let out = run_ok(&fresh, &b, &["cache", "pull", "--remote", "team"]);
    assert!(out.contains("1 record(s) pulled"), "{out}");
    run_ok(&fresh, &b, &["cache", "verify", "--remote", "team"]);
    // A record signed by another key stands, and the push says so.
    let out = run_ok(
        &a,
        &b,
        &[
            "cache",
            "push",
            "--remote",
            &b.url,
            "pipeline.yaml",
            "--target",
            "d",
        ],
    );
    assert!(out.contains("0 record(s) pushed, 1 already"), "{out}");
    configure(&a, &b.url, "    signing_key: other.key\n");
    let out = run_ok(
        &a,
        &b,
        &[
            "cache",
            "push",
            "--remote",
            "team",
            "pipeline.yaml",
            "--target",
            "d",
        ],
    );
    assert!(out.contains("signed by `ci`"), "{out}");
    assert!(out.contains("0 record(s) pushed, 1 already"), "{out}");
}

#[test]
fn s3_untrusted_records_are_ignored_when_keys_are_configured() {
    untrusted_records_are_ignored_when_keys_are_configured(Backend::s3());
}

#[test]
fn folder_untrusted_records_are_ignored_when_keys_are_configured() {
    untrusted_records_are_ignored_when_keys_are_configured(Backend::folder());
}

#[test]
fn the_read_only_identity_cannot_push() {
    let b = Backend::s3();
    let a = project();
    a.run_stages("pipeline.yaml", &[]);
    let reader = Backend {
        url: b.url.clone(),
        env: pairs(&READER),
        _server: None,
        _folder: None,
    };
    let out = run_fails(
        &a,
        &reader,
        &["cache", "push", "--remote", &b.url, "pipeline.yaml"],
    );
    assert!(out.contains("read-only"), "{out}");
    assert!(out.contains("writer identity"), "{out}");
    // Nothing reached the server: the writer's push uploads everything.
    let pushed = run_ok(
        &a,
        &b,
        &["cache", "push", "--remote", &b.url, "pipeline.yaml"],
    );
    assert!(pushed.contains("5 record(s) pushed"), "{pushed}");
    // The reader can pull.
    let fresh = project();
    // A pull of a manifest's stages that cannot read the remote (a wrong
    // secret) fails, naming the stage: it pulled nothing.
    let wrong = Backend {
        url: b.url.clone(),
        env: pairs(&[
            ("AWS_ACCESS_KEY_ID", READER[0].1),
            ("AWS_SECRET_ACCESS_KEY", "wrong"),
        ]),
        _server: None,
        _folder: None,
    };
    let out = run_fails(
        &fresh,
        &wrong,
        &["cache", "pull", "--remote", &b.url, "pipeline.yaml"],
    );
    assert!(
        out.contains("stage `a`: cannot look up its record on remote"),
        "{out}"
    );
    let pulled = run_ok(&fresh, &reader, &["cache", "pull", "--remote", &b.url]);
    assert!(pulled.contains("5 record(s) pulled"), "{pulled}");
    // A remote configured read-only is refused before any request.
    configure(&a, &b.url, "    write: false\n");
    let out = run_fails(&a, &b, &["cache", "push", "--remote", "team"]);
    assert!(
        out.contains("remote `team` is read-only: `write: false`"),
        "{out}"
    );
}

/// An identity that may write but not read (S3 answers its HEADs 403)
/// pushes: a refused HEAD is no "read-only", and a second push finds the
/// records present through the create-if-absent write.
#[test]
fn an_identity_that_may_write_but_not_read_pushes() {
    let b = Backend::s3();
    let a = project();
    a.run_stages("pipeline.yaml", &[]);
    let pusher = Backend {
        url: b.url.clone(),
        env: pairs(&PUSHER),
        _server: None,
        _folder: None,
    };
    let push = ["cache", "push", "--remote", &b.url, "pipeline.yaml"];
    let pushed = run_ok(&a, &pusher, &push);
    assert!(pushed.contains("5 record(s) pushed"), "{pushed}");
    let again = run_ok(&a, &pusher, &push);
    assert!(again.contains("0 record(s) pushed"), "{again}");
    let fresh = project();
    let pulled = run_ok(&fresh, &b, &["cache", "pull", "--remote", &b.url]);
    assert!(pulled.contains("5 record(s) pulled"), "{pulled}");
}

fn concurrent_pushes_leave_one_record(b: Backend) {
    let first = project();
    let second = project();
    first.run_stages("pipeline.yaml", &[]);
    second.run_stages("pipeline.yaml", &[]);
    let children: Vec<_> = [&first, &second]
        .iter()
        .map(|p| {
            cmd(
                p,
                &b,
                &["cache", "push", "--remote", &b.url, "pipeline.yaml", "-q"],
            )
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
        })
        .collect();
    let outs: Vec<String> = children
        .into_iter()
        .map(|c| ok(c.wait_with_output().unwrap(), "push"))
        .collect();
    // Each stage was created by exactly one of the two pushes.
    for stage in STAGES {
        let created = outs
            .iter()
            .filter(|o| {
                o.lines()
                    .any(|l| l.starts_with(&format!("pushed  {stage} ")))
            })
            .count();
        let present = outs
            .iter()
            .filter(|o| {
                o.lines()
                    .any(|l| l.starts_with(&format!("present {stage} ")))
            })
            .count();
        assert_eq!((created, present), (1, 1), "{stage}: {outs:?}");
    }
    let fresh = project();
    let out = run_ok(&fresh, &b, &["cache", "pull", "--remote", &b.url]);
    assert!(out.contains("5 record(s) pulled, 0 already local"), "{out}");
    let verified = run_ok(&fresh, &b, &["cache", "verify", "--remote", &b.url]);
    assert!(
        verified.contains("5 records") && verified.contains("0 problem(s)"),
        "{verified}"
    );
}

#[test]
fn s3_concurrent_pushes_leave_one_record() {
    concurrent_pushes_leave_one_record(Backend::s3());
}

#[test]
fn folder_concurrent_pushes_leave_one_record() {
    concurrent_pushes_leave_one_record(Backend::folder());
}

const BIG: &str = r#"version: 1
name: big
stages:
  big:
    op: exec
    outputs: [out]
    params:
      cmd: head -c 48000000 /dev/urandom > "$ALIGNFLOW_OUT/out"
"#;

/// The parts a transfer's state file records as done: the entries of its
/// array `field` that are neither null nor false.
fn parts_done(state: &Path, field: &str) -> usize {
    std::fs::read_to_string(state)
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| {
            v[field].as_array().map(|p| {
                p.iter()
                    .filter(|x| !x.is_null() && **x != serde_json::Value::Bool(false))
                    .count()
            })
        })
        .unwrap_or(0)
}

/// Starts `args`, kills it (SIGKILL) once `ready` holds, then waits.
fn kill_when(mut c: Command, ready: impl Fn() -> bool) {
    let mut child = c
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !ready() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "finished before it was killed"
        );
        assert!(start.elapsed() < Duration::from_secs(60), "never got there");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
}

fn a_killed_download_resumes(b: Backend) {
    let a = big_project();
    a.run_stages("pipeline.yaml", &[]);
    run_ok(
        &a,
        &b,
        &["cache", "push", "--remote", &b.url, "pipeline.yaml"],
    );

    let fresh = big_project();
    // Slowed to 12 MB/s, one 8 MiB range at a time, so that it is surely
    // killed half-way: once two of its six ranges are in.
    let slow = format!(
        "{}{}max_mbps=12&jobs=1",
        b.url,
        if b.url.contains('?') { "&" } else { "?" }
    );
    let downloads = fresh.path("cache/downloads");
    let ranges_in = || {
        walk(&downloads)
            .iter()
            .filter(|f| f.to_string_lossy().ends_with(".parts.json"))
            .map(|f| parts_done(f, "done"))
            .max()
            .unwrap_or(0)
    };
    kill_when(
        cmd(&fresh, &b, &["cache", "pull", "--remote", &slow]),
        || ranges_in() >= 2,
    );
    let before = ranges_in();
    assert!((2..6).contains(&before), "{before}");
    let out = run_ok(&fresh, &b, &["cache", "pull", "--remote", &b.url]);
    assert!(out.contains("1 record(s) pulled"), "{out}");
    let count = |marker: &str| -> u64 {
        out.split(marker)
            .next()
            .and_then(|s| s.rsplit('(').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no `{marker}` in {out}"))
    };
    let resumed = count(" bytes) of an interrupted transfer");
    let downloaded = count(" bytes) downloaded");
    assert!(resumed >= before as u64 * 8 * 1024 * 1024, "{out}");
    assert_eq!(resumed + downloaded, 48_000_000, "{out}");
    let shown_a = run_ok(&a, &b, &["show", "pipeline.yaml", "big"]);
    let shown_b = run_ok(&fresh, &b, &["show", "pipeline.yaml", "big"]);
    let path = |s: &str| PathBuf::from(s.split('\t').nth(1).unwrap().trim());
    assert_eq!(
        std::fs::read(path(&shown_a)).unwrap(),
        std::fs::read(path(&shown_b)).unwrap()
    );
    let left: Vec<_> = walk(&downloads)
        .into_iter()
        .filter(|f| !f.file_name().unwrap().to_string_lossy().starts_with('.'))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn s3_a_killed_download_resumes() {
    a_killed_download_resumes(Backend::s3());
}

#[test]
fn folder_a_killed_download_resumes() {
    a_killed_download_resumes(Backend::folder());
}

/// A project with `BIG` and a config of its own.
fn big_project() -> Project {
    let p = Project::new();
    p.write("pipeline.yaml", BIG);
    p.write("alignflow.config.yaml", "remotes: {}\n");
    p
}

/// Runs `BIG` in a new project and pushes it, killed once two 8 MiB parts
/// are recorded as sent: the project and its `cache/uploads` folder.
fn killed_upload(b: &Backend) -> (Project, PathBuf) {
    killed_upload_after(b, |_| {})
}

/// [`killed_upload`], with `edit` applied to the project before the push.
fn killed_upload_after(b: &Backend, edit: impl FnOnce(&Project)) -> (Project, PathBuf) {
    let a = big_project();
    a.run_stages("pipeline.yaml", &[]);
    edit(&a);
    let slow = format!("{}&max_mbps=12&jobs=1", b.url);
    let uploads = a.path("cache/uploads");
    kill_when(cmd(&a, b, &["cache", "push", "--remote", &slow]), || {
        walk(&uploads).iter().any(|f| parts_done(f, "parts") >= 2)
    });
    (a, uploads)
}

/// A fresh project pulls `BIG`'s one record from `b`.
fn assert_big_pulls(b: &Backend) {
    let pulled = run_ok(&big_project(), b, &["cache", "pull", "--remote", &b.url]);
    assert!(pulled.contains("1 record(s) pulled"), "{pulled}");
}

#[test]
fn s3_a_killed_upload_resumes() {
    let b = Backend::s3();
    let (a, uploads) = killed_upload(&b);
    assert!(
        walk(&uploads).iter().any(|f| parts_done(f, "parts") < 6),
        "killed before the end"
    );
    let out = run_ok(&a, &b, &["cache", "push", "--remote", &b.url]);
    assert!(out.contains("1 record(s) pushed"), "{out}");
    assert!(out.contains("resumed"), "{out}");
    assert_big_pulls(&b);
    // The upload's state is gone (a temporary file the kill interrupted
    // may remain: `cache gc` removes it).
    let states: Vec<_> = walk(&uploads)
        .into_iter()
        .filter(|f| !f.file_name().unwrap().to_string_lossy().starts_with('.'))
        .collect();
    assert!(states.is_empty(), "{states:?}");
    run_ok(&a, &b, &["cache", "gc"]);
    assert!(walk(&uploads).is_empty(), "{:?}", walk(&uploads));
}

/// The largest blob in `p`'s store (`BIG`'s output).
fn largest_blob(p: &Project) -> PathBuf {
    walk(&p.path("cache/objects"))
        .into_iter()
        .max_by_key(|f| f.metadata().unwrap().len())
        .unwrap()
}

/// Flips the first byte of `file` (a store file, read-only).
fn flip_first_byte(file: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let mode = file.metadata().unwrap().permissions();
    std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut bytes = std::fs::read(file).unwrap();
    bytes[0] ^= 0xff;
    std::fs::write(file, bytes).unwrap();
    std::fs::set_permissions(file, mode).unwrap();
}

/// An upload interrupted while the local blob was corrupt, resumed once it
/// is intact again: the parts sent from the corrupt bytes are sent again,
/// so what the remote publishes under the blob's hash is the blob.
#[test]
fn s3_a_resumed_upload_resends_parts_sent_from_other_bytes() {
    let b = Backend::s3();
    let (a, _uploads) = killed_upload_after(&b, |a| flip_first_byte(&largest_blob(a)));
    flip_first_byte(&largest_blob(&a));
    let out = cmd(&a, &b, &["cache", "push", "--remote", &b.url])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    let stdout = ok(out, "the resumed push");
    assert!(stdout.contains("1 record(s) pushed"), "{stdout}");
    assert!(
        stderr.contains("part 0 was sent with other bytes"),
        "{stderr}"
    );
    assert_big_pulls(&b);
}

/// An interrupted upload the server no longer knows (an abort rule, a
/// restart): the push that resumes it fails, and forgets it, so the next
/// push starts over and succeeds instead of failing on the dead id for ever.
#[test]
fn s3_an_upload_the_server_dropped_starts_over() {
    let b = Backend::s3();
    let (a, uploads) = killed_upload(&b);
    let state = walk(&uploads)
        .into_iter()
        .find(|f| parts_done(f, "parts") >= 2)
        .expect("the interrupted upload's state");
    let mut json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&state).unwrap()).unwrap();
    json["upload"] = "an-upload-the-server-dropped".into();
    std::fs::write(&state, serde_json::to_vec(&json).unwrap()).unwrap();
    let failed = run_fails(&a, &b, &["cache", "push", "--remote", &b.url]);
    assert!(!state.exists(), "the dead upload is forgotten:\n{failed}");
    let out = run_ok(&a, &b, &["cache", "push", "--remote", &b.url]);
    assert!(out.contains("1 record(s) pushed"), "{out}");
    assert_big_pulls(&b);
}

fn run_locked_on_a_fresh_machine_pulls_everything(b: Backend) {
    let a = pushed(&b);
    assert!(a.path("pipeline.lock").is_file());
    let fresh = project();
    std::fs::copy(a.path("pipeline.lock"), fresh.path("pipeline.lock")).unwrap();
    configure(&fresh, &b.url, "");
    fresh.write(
        "alignflow.config.yaml",
        &format!("remote: team\n{}", fresh.read("alignflow.config.yaml")),
    );
    let rows = plan(&fresh, &b, &[]);
    assert!(rows.iter().all(|r| r.2 == "remote"), "{rows:?}");
    let out = run_ok(&fresh, &b, &["run", "pipeline.yaml", "--locked"]);
    assert_eq!(stages_with_status(&out, "cached"), set(&STAGES), "{out}");
    assert!(out.contains("pulled from remote `team`"), "{out}");
    assert!(!fresh.path("runs.txt").exists(), "nothing ran");
    for stage in STAGES {
        assert_eq!(
            outputs(&fresh, &b, stage),
            outputs(&a, &b, stage),
            "{stage}"
        );
    }
    assert_eq!(fresh.read("pipeline.lock"), a.read("pipeline.lock"));
}

#[test]
fn s3_run_locked_on_a_fresh_machine_pulls_everything() {
    run_locked_on_a_fresh_machine_pulls_everything(Backend::s3());
}

#[test]
fn folder_run_locked_on_a_fresh_machine_pulls_everything() {
    run_locked_on_a_fresh_machine_pulls_everything(Backend::folder());
}

#[test]
fn run_writes_back_when_configured() {
    let b = Backend::s3();
    let a = project();
    configure(&a, &b.url, "    write_back: true\n");
    let out = run_ok(&a, &b, &["run", "pipeline.yaml", "--remote", "team"]);
    assert_eq!(stages_with_status(&out, "ran"), set(&STAGES), "{out}");
    let fresh = project();
    let pulled = run_ok(
        &fresh,
        &b,
        &["cache", "pull", "--remote", &b.url, "pipeline.yaml"],
    );
    assert!(pulled.contains("5 record(s) pulled"), "{pulled}");
}

#[test]
fn doctor_reports_remotes_and_whether_they_answer() {
    let b = Backend::s3();
    let p = project();
    let dead = DeadPort::new();
    p.write(
        "alignflow.config.yaml",
        &format!(
            "remote: team\nremotes:\n  team:\n    url: \"{}\"\n  gone:\n    url: \"s3://team/x?endpoint=http://127.0.0.1:{}\"\n    write: false\n",
            b.url, dead.port
        ),
    );
    let out = String::from_utf8(cmd(&p, &b, &["doctor"]).output().unwrap().stdout).unwrap();
    let team = out
        .lines()
        .find(|l| l.contains("remote     team:"))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(team.contains("(read-write, default): answers in"), "{team}");
    assert!(
        !team.contains("writer-secret") && !out.contains("writer-key"),
        "{out}"
    );
    let gone = out
        .lines()
        .find(|l| l.contains("remote     gone:"))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(gone.contains("(read-only): does not answer"), "{gone}");
}

/// A remote that does not answer is given up after its first failed
/// request: the run runs its stages itself and says so once, instead of
/// paying the client's retries again for every stage's lookup and pull.
#[test]
fn a_run_whose_remote_does_not_answer_gives_it_up_once() {
    let dead = DeadPort::new();
    let url = format!(
        "s3://team/cache?endpoint=http://127.0.0.1:{}&region=us-east-1&retries=1",
        dead.port
    );
    let b = Backend {
        url: url.clone(),
        env: pairs(&WRITER),
        _server: None,
        _folder: None,
    };
    let p = project();
    let out = cmd(&p, &b, &["run", "pipeline.yaml", "--remote", &url])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let ran = stages_with_status(&String::from_utf8_lossy(&out.stdout), "ran");
    assert_eq!(ran, set(&STAGES));
    assert_eq!(stderr.matches("does not answer").count(), 1, "{stderr}");
    assert!(
        stderr.contains("not used for the rest of this command"),
        "{stderr}"
    );
}

/// Commands about a key or a remote only open no local cache: run in a
/// folder without one, they leave none behind.
#[test]
fn keygen_and_remote_verify_leave_no_local_cache_behind() {
    let b = Backend::folder();
    let p = project();
    assert!(keygen(&p, &b, "ci").starts_with("ci:"));
    let verified = run_ok(&p, &b, &["cache", "verify", "--remote", &b.url]);
    assert!(verified.contains("0 problem(s)"), "{verified}");
    assert!(!p.path("cache").exists(), "a cache was created");
}
