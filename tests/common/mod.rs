//! Helpers for the integration tests: a temporary project folder, the
//! `alignflow` binary run inside it, and parsers for its output.
#![allow(dead_code)]

pub mod a_world;
pub mod seaweed;
pub mod slurm;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A temporary folder with a manifest and a cache.
pub struct Project {
    pub dir: tempfile::TempDir,
}

impl Project {
    pub fn new() -> Project {
        Project {
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn write(&self, rel: &str, text: &str) -> PathBuf {
        let path = self.path(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, text).unwrap();
        path
    }

    pub fn read(&self, rel: &str) -> String {
        std::fs::read_to_string(self.path(rel)).unwrap()
    }

    /// A command for `alignflow ARGS` in the project folder with its own cache.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_alignflow"));
        cmd.args(args)
            .current_dir(self.dir.path())
            .env("ALIGNFLOW_CACHE_DIR", self.path("cache"))
            .env_remove("RUST_LOG");
        cmd
    }

    /// Starts `alignflow ARGS` (output discarded) and returns once the file
    /// `marker` exists in the project (a stage's command made it).
    pub fn spawn_until(&self, args: &[&str], marker: &str) -> std::process::Child {
        let child = self
            .cmd(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("alignflow starts");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !self.path(marker).exists() {
            assert!(
                std::time::Instant::now() < deadline,
                "no `{marker}` after 30 s"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        child
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().expect("alignflow runs")
    }

    /// Runs and asserts success, returning stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "alignflow {args:?} failed ({}):\nstdout:\n{}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs and asserts failure, returning stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            !out.status.success(),
            "alignflow {args:?} should fail:\nstdout:\n{}\nstderr:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stderr).unwrap()
    }

    /// `alignflow run FILE ...`, returning the stages whose status is `ran`.
    pub fn run_stages(&self, file: &str, extra: &[&str]) -> BTreeSet<String> {
        let mut args = vec!["run", file, "--quiet"];
        args.extend_from_slice(extra);
        let out = self.ok(&args);
        stages_with_status(&out, "ran")
    }
}

/// Stage ids with `status` in a run's summary table (columns are aligned;
/// stage ids may contain spaces).
pub fn stages_with_status(table: &str, status: &str) -> BTreeSet<String> {
    let mut lines = table.lines().skip_while(|l| !l.starts_with("stage "));
    let Some(header) = lines.next() else {
        return BTreeSet::new();
    };
    let col = header.find("status").expect("status column");
    lines
        .filter(|l| l.len() > col)
        .filter(|l| l[col..].split_whitespace().next() == Some(status))
        .map(|l| l[..col].trim().to_string())
        .collect()
}

pub fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// Real public data copied into `tests/data/` (sources and licenses in its
/// README).
pub fn test_data(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(rel)
}

/// A chain a -> b -> c of exec stages plus an independent d; each stage
/// appends its name to `runs.txt` (outside the cache) when it executes.
pub const CHAIN: &str = r#"version: 1
name: chain
seed: 7
params:
  greeting: hello
  n: 3
stages:
  a:
    op: exec
    inputs:
      src: input.txt
    outputs: [out]
    params:
      cmd: cat "$ALIGNFLOW_IN_SRC" > "$ALIGNFLOW_OUT/out"; echo a >> runs.txt
  b:
    op: exec
    inputs:
      x: ${stages.a.out}
    outputs: [out]
    params:
      cmd: (cat "$ALIGNFLOW_IN_X"; echo ${params.greeting}) > "$ALIGNFLOW_OUT/out"; echo b >> runs.txt
  c:
    op: exec
    inputs:
      y: ${stages.b.out}
    outputs: [out]
    params:
      cmd: wc -c < "$ALIGNFLOW_IN_Y" > "$ALIGNFLOW_OUT/out"; echo c >> runs.txt
  d:
    op: exec
    outputs: [out]
    params:
      cmd: seq ${params.n} > "$ALIGNFLOW_OUT/out"; echo d >> runs.txt
"#;

/// Every file under `dir`, recursively (empty when it does not exist).
pub fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// The table of a report page with one row per round of a loop's
/// evaluations, and its rows.
pub fn rounds_table(html: &str) -> (&str, usize) {
    let start = html
        .find("<table class=\"rounds\">")
        .expect("a table of rounds");
    let table = &html[start..start + html[start..].find("</table>").unwrap()];
    (table, table.matches("<tr class=\"round-row\"").count())
}

/// How many points the report page's curve `series` (its `data-series`) has.
pub fn curve_points(html: &str, series: &str) -> usize {
    let curve = html
        .split("<polyline")
        .find(|p| p.contains(&format!("data-series=\"{series}\"")))
        .unwrap_or_else(|| panic!("no curve {series}"));
    let start = curve.find("points=\"").unwrap() + 8;
    curve[start..]
        .split('"')
        .next()
        .unwrap()
        .split_whitespace()
        .count()
}

/// A small deterministic generator for synthetic test data (no dependency,
/// the same data on every machine).
pub struct Lcg(pub u64);

impl Lcg {
    /// The next number in `0..n`.
    pub fn below(&mut self, n: usize) -> usize {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 33) % n as u64) as usize
    }

    /// One word of `vocab`.
    pub fn pick<'a>(&mut self, vocab: &[&'a str]) -> &'a str {
        vocab[self.below(vocab.len())]
    }

    /// `n` words of `vocab`.
    pub fn picks<'a>(&mut self, vocab: &[&'a str], n: usize) -> Vec<&'a str> {
        (0..n).map(|_| self.pick(vocab)).collect()
    }
}

/// The cache record of `stage` in the project's cache (the first found).
pub fn stage_record(p: &Project, stage: &str) -> serde_json::Value {
    walk(&p.path("cache/records"))
        .into_iter()
        .filter(|f| f.extension().is_some_and(|e| e == "json"))
        .map(|f| {
            serde_json::from_str::<serde_json::Value>(&std::fs::read_to_string(f).unwrap()).unwrap()
        })
        .find(|r| r["stage"] == stage)
        .unwrap_or_else(|| panic!("a record of stage `{stage}`"))
}

/// A port on 127.0.0.1 that nothing listens on for as long as this lives: a
/// socket bound to it without `listen`, so connections are refused at once
/// and no server this test binary (or anything else) starts meanwhile can
/// take the port. (A port bound and then closed can be handed out again,
/// by `bind(0)`, to a server started by a test running alongside.)
pub struct DeadPort {
    fd: libc::c_int,
    pub port: u16,
}

impl DeadPort {
    pub fn new() -> DeadPort {
        // SAFETY: plain socket calls on a socket this function owns; the
        // address structures are fully initialised.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
            assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
            let mut addr: libc::sockaddr_in = std::mem::zeroed();
            addr.sin_family = libc::AF_INET as libc::sa_family_t;
            addr.sin_addr.s_addr = u32::from(std::net::Ipv4Addr::LOCALHOST).to_be();
            addr.sin_port = 0;
            let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            let rc = libc::bind(fd, &addr as *const _ as *const libc::sockaddr, len);
            assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
            let mut len = len;
            let rc = libc::getsockname(fd, &mut addr as *mut _ as *mut libc::sockaddr, &mut len);
            assert_eq!(rc, 0, "getsockname: {}", std::io::Error::last_os_error());
            DeadPort {
                fd,
                port: u16::from_be(addr.sin_port),
            }
        }
    }
}

impl Drop for DeadPort {
    fn drop(&mut self) {
        // SAFETY: closes the socket `new` opened, once.
        unsafe {
            libc::close(self.fd);
        }
    }
}
