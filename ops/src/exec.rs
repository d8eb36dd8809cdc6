//! `exec`: a user command as a stage.
//!
//! The command runs with `sh -c` in the manifest's folder, in its own process
//! group so that cancellation kills everything it started; its leader dies
//! with the engine (PDEATHSIG) even when the engine is killed with SIGKILL.
//! Its inputs and output folder arrive in the environment; its stdout and
//! stderr go to the run log line by line.
//!
//! It inherits the engine's whole environment, secrets included, unless
//! `env:` lists the variables it may see. Neither the environment's values
//! nor the folder it runs in are part of the stage's fingerprint (a secret
//! must never end up in a cache key); the names in `env:` are.
//!
//! What protects the cache from the command (it may run as root, which file
//! modes do not stop; the engine does this, see `src/engine/feed.rs`):
//! - a FILE input from another stage is a private read-only copy in the
//!   stage's staging folder (a reflink where the filesystem has them, else a
//!   copy up to 256 MiB; a bigger file on a filesystem without reflinks is
//!   the store's read-only file): writing to it changes only the copy;
//! - a FOLDER input is the store's folder, read-only (folders 0555, files
//!   0444), so an ordinary user cannot change it;
//! - every input path the command is handed (except the private copies) is
//!   fingerprinted before it runs (size, mtime, inode, mode of each file)
//!   and compared after: a change fails the stage, naming the input and the
//!   file, records nothing, and quarantines the store object if its content
//!   changed (the next run recomputes it);
//! - before it runs, each input from the store is checked against its id, so
//!   a corrupt object is never fed to the command.
use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::protocol::Metrics;
use crate::{
    Cancelled, OpDecl, OpParams, Outputs, ParamError, ParamsDecl, Placement, StageContext,
};

/// How often the child is polled for exit and the cancel flag checked.
const POLL: Duration = Duration::from_millis(50);
/// How many stderr lines a failure quotes.
const STDERR_TAIL: usize = 20;
/// After the command's group is killed, how long its output pipes may stay
/// open (held by a process that left the group) before they are given up.
const DRAIN_GRACE: Duration = Duration::from_millis(500);

/// Params of `exec`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecParams {
    /// Shell command, run with `sh -c` in the manifest's folder.
    pub cmd: String,
    /// The engine's environment variables the command may see (none given:
    /// all of them). With a list it sees only these, the basics a shell
    /// needs (PATH, HOME, USER, LANG, LC_ALL, TZ, TMPDIR) and its
    /// ALIGNFLOW_* variables. Values never enter the fingerprint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<Vec<String>>,
    /// Pass a checkpoint request (SIGUSR1: a Slurm job's warning
    /// `signal_before` its time limit) to the command's process group, as
    /// training ops take it: the command saves a checkpoint in
    /// `$ALIGNFLOW_CHECKPOINT_DIR` and goes on. Untrapped, SIGUSR1 kills a
    /// process: the command must handle it (a shell: `trap`, or `exec` the
    /// program that does). Off by default.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub checkpoint_signal: bool,
}

/// What a command run with an `env:` allow-list still sees.
const BASIC_ENV: [&str; 7] = ["PATH", "HOME", "USER", "LANG", "LC_ALL", "TZ", "TMPDIR"];

/// The `exec` op.
pub const OP: OpDecl = OpDecl {
    name: "exec",
    version: 1,
    summary: "run a shell command; inputs in $ALIGNFLOW_IN_<NAME>, outputs under $ALIGNFLOW_OUT",
    inputs: &[],
    outputs: Outputs::FromStage,
    params: ParamsDecl::of::<ExecParams>(),
    placement: Placement::Engine(run),
    conventions: &[],
};

impl OpParams for ExecParams {
    fn check(&self) -> Result<(), ParamError> {
        for name in self.env.iter().flatten() {
            if name.is_empty() || name.contains('=') || name.contains('\0') {
                return Err(ParamError::invalid(
                    "env",
                    format!("`{name}` is not an environment variable name"),
                ));
            }
        }
        Ok(())
    }
}

pub fn run(ctx: &StageContext<'_>) -> anyhow::Result<Metrics> {
    let params: ExecParams = ctx.params()?;
    let spec = ctx.spec;
    let stage = spec.stage.clone();

    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(&params.cmd)
        .current_dir(&spec.work_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    die_with_the_engine(&mut cmd);
    if let Some(allowed) = &params.env {
        cmd.env_clear();
        for name in BASIC_ENV
            .iter()
            .copied()
            .chain(allowed.iter().map(String::as_str))
        {
            if let Some(value) = std::env::var_os(name) {
                cmd.env(name, value);
            }
        }
    }
    for (name, path) in &spec.inputs {
        cmd.env(input_var(name), path);
    }
    cmd.env("ALIGNFLOW_OUT", &spec.out_dir)
        // Survives an interrupted run of the same fingerprint: a long command
        // can checkpoint there and resume (a resubmitted Slurm job does).
        .env("ALIGNFLOW_CHECKPOINT_DIR", &spec.checkpoint_dir)
        .env("ALIGNFLOW_STAGE", &spec.stage)
        .env("ALIGNFLOW_SEED", spec.seed.to_string());
    let mut child = cmd.spawn().map_err(|source| ExecError::Spawn {
        stage: stage.clone(),
        dir: spec.work_dir.clone(),
        source,
    })?;
    // The child leads its own group: its pid is the group id.
    let pgid = child.id() as libc::pid_t;
    let _listener = params
        .checkpoint_signal
        .then(|| crate::checkpoint_request::Listener::group(child.id()));

    let tail = Arc::new(Mutex::new(VecDeque::with_capacity(STDERR_TAIL)));
    let readers = [
        stream_lines(
            child.stdout.take().expect("piped stdout"),
            stage.clone(),
            None,
        ),
        stream_lines(
            child.stderr.take().expect("piped stderr"),
            stage.clone(),
            Some(tail.clone()),
        ),
    ];

    let status = loop {
        if ctx.cancel.is_cancelled() {
            kill_group(pgid);
            let _ = child.wait();
            drain(readers);
            return Err(Cancelled.into());
        }
        match exited(pgid) {
            Ok(true) => {
                // What the command left running (`job > log &` holds no
                // pipe) would go on writing into the outputs, which are
                // linked into the store once hashed: killed with the
                // group, while the unreaped leader keeps the group's id
                // from naming any other.
                kill_group(pgid);
                match child.wait() {
                    Ok(status) => break status,
                    Err(source) => return Err(ExecError::Wait { stage, source }.into()),
                }
            }
            Ok(false) => std::thread::sleep(POLL),
            Err(source) => {
                kill_group(pgid);
                let _ = child.wait();
                return Err(ExecError::Wait { stage, source }.into());
            }
        }
    };
    drain(readers);

    let stderr_tail: Vec<String> = tail.lock().expect("stderr tail").iter().cloned().collect();
    if !status.success() {
        let status = match (status.code(), status.signal()) {
            (Some(code), _) => format!("exit status {code}"),
            (None, Some(signal)) => format!("signal {signal}"),
            (None, None) => status.to_string(),
        };
        return Err(ExecError::Failed {
            stage,
            status,
            stderr_tail,
        }
        .into());
    }

    let missing: Vec<String> = spec
        .outputs
        .iter()
        .filter(|name| !spec.out_dir.join(name).exists())
        .cloned()
        .collect();
    if !missing.is_empty() {
        return Err(ExecError::MissingOutputs {
            stage,
            out_dir: spec.out_dir.clone(),
            missing,
        }
        .into());
    }

    let mut metrics = Metrics::new();
    metrics.insert("exit_code".into(), 0.into());
    metrics.insert("outputs".into(), spec.outputs.len().into());
    Ok(metrics)
}

/// Makes the command (the leader of its process group) receive SIGKILL when
/// the thread that forks it exits, so a command never outlives an engine
/// killed with SIGKILL. That thread is the one calling `run`, which waits
/// for the leader (or kills its group) before returning, so the signal can
/// only fire once the engine itself is gone. On a clean stop (Ctrl-C,
/// SIGTERM, fail-fast) the cancel flag kills the whole group instead.
pub(crate) fn die_with_the_engine(cmd: &mut Command) {
    let engine = std::process::id() as libc::pid_t;
    // SAFETY: prctl and getppid are async-signal-safe system calls, and the
    // closure allocates nothing between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The engine died before the prctl took effect: no signal will come.
            if libc::getppid() != engine {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

/// Failures of `exec`.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("stage `{stage}`: cannot start `sh` in {}: {source}", dir.display())]
    Spawn {
        stage: String,
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("stage `{stage}`: waiting for the command: {source}")]
    Wait {
        stage: String,
        source: std::io::Error,
    },
    #[error(
        "stage `{stage}`: exec failed with {status}{}",
        quote_tail(stderr_tail)
    )]
    Failed {
        stage: String,
        status: String,
        stderr_tail: Vec<String>,
    },
    #[error(
        "stage `{stage}`: the command succeeded but did not create {} under $ALIGNFLOW_OUT ({})",
        missing.iter().map(|m| format!("`{m}`")).collect::<Vec<_>>().join(", "),
        out_dir.display()
    )]
    MissingOutputs {
        stage: String,
        out_dir: PathBuf,
        missing: Vec<String>,
    },
}

fn quote_tail(lines: &[String]) -> String {
    if lines.is_empty() {
        return String::new();
    }
    let body: String = lines.iter().map(|l| format!("\n  {l}")).collect();
    format!("; last lines of stderr:{body}")
}

/// `ALIGNFLOW_IN_<NAME>`: the input name uppercased, anything but ASCII
/// letters and digits replaced by `_`.
pub fn input_var(name: &str) -> String {
    let name: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    format!("ALIGNFLOW_IN_{name}")
}

/// Logs each line of `pipe` under the stage, keeping the last lines in `tail`.
fn stream_lines(
    pipe: impl Read + Send + 'static,
    stage: String,
    tail: Option<Arc<Mutex<VecDeque<String>>>>,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(pipe);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            let line = String::from_utf8_lossy(&buf);
            let line = line.trim_end_matches(['\n', '\r']);
            tracing::info!(target: "alignflow::stage", stage = %stage, "{line}");
            if let Some(tail) = &tail {
                let mut tail = tail.lock().expect("stderr tail");
                if tail.len() == STDERR_TAIL {
                    tail.pop_front();
                }
                tail.push_back(line.to_string());
            }
        }
    })
}

/// Waits for the output readers to reach end of file, once the command's
/// group has been killed. A process that left the group (`setsid`) and
/// still holds the pipes is not waited for past a grace period: its
/// reader is left behind (the group's id, its leader reaped, may name
/// another group by now, so nothing is signalled).
fn drain(readers: [JoinHandle<()>; 2]) {
    let deadline = Instant::now() + DRAIN_GRACE;
    while readers.iter().any(|r| !r.is_finished()) {
        if Instant::now() >= deadline {
            tracing::warn!(target: "alignflow::stage", "a process the command started outside its process group still holds its output");
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    for reader in readers {
        let _ = reader.join();
    }
}

/// Whether process `pid` (a child) has exited, leaving it unreaped.
pub(crate) fn exited(pid: libc::pid_t) -> std::io::Result<bool> {
    // SAFETY: waitid(2) writes only into `info`, which is zeroed and ours;
    // WNOWAIT leaves the child to be reaped by `Child::wait`.
    unsafe {
        let mut info: libc::siginfo_t = std::mem::zeroed();
        let flags = libc::WEXITED | libc::WNOHANG | libc::WNOWAIT;
        if libc::waitid(libc::P_PID, pid as libc::id_t, &mut info, flags) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(info.si_pid() != 0)
    }
}

/// SIGKILL to every process of the group.
pub(crate) fn kill_group(pgid: libc::pid_t) {
    // SAFETY: kill(2) with a negative pid signals a process group; it has no
    // memory effects. ESRCH (group already gone) is fine.
    unsafe {
        libc::kill(-pgid, libc::SIGKILL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::testing::{run, spec};
    use serde_json::json;

    fn exec_spec(dir: &std::path::Path, cmd: &str, outputs: &[&str]) -> crate::protocol::StageSpec {
        let input = dir.join("in.txt");
        std::fs::write(&input, "input text\n").unwrap();
        let mut spec = spec(&OP, dir, json!({ "cmd": cmd }), &[("my-data.v2", input)]);
        spec.outputs = outputs.iter().map(|s| s.to_string()).collect();
        spec.seed = 42;
        spec
    }

    #[test]
    fn env_and_outputs() {
        let dir = tempfile::tempdir().unwrap();
        let cmd = r#"echo "$ALIGNFLOW_STAGE $ALIGNFLOW_SEED $(pwd)" > "$ALIGNFLOW_OUT/a"
            cat "$ALIGNFLOW_IN_MY_DATA_V2" >> "$ALIGNFLOW_OUT/a"; mkdir "$ALIGNFLOW_OUT/b"; echo to stderr >&2"#;
        let metrics = run(&OP, &exec_spec(dir.path(), cmd, &["a", "b"])).unwrap();
        assert_eq!(metrics["exit_code"], 0);
        assert_eq!(metrics["outputs"], 2);
        let cwd = dir.path().canonicalize().unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.path().join("out/a")).unwrap(),
            format!("s 42 {}\ninput text\n", cwd.display())
        );
    }

    #[test]
    fn an_env_allow_list_hides_everything_else() {
        let dir = tempfile::tempdir().unwrap();
        // The test process's own environment: HOME is there, and this
        // variable plays a secret (no other test reads it).
        std::env::set_var("ALIGNFLOW_TEST_SECRET_EXEC", "hunter2");
        let cmd = r#"env > "$ALIGNFLOW_OUT/env""#;
        let mut spec = exec_spec(dir.path(), cmd, &["env"]);
        run(&OP, &spec).unwrap();
        let all = std::fs::read_to_string(dir.path().join("out/env")).unwrap();
        assert!(all.contains("ALIGNFLOW_TEST_SECRET_EXEC=hunter2"), "{all}");

        spec.params = json!({"cmd": cmd, "env": ["HOME"]});
        std::fs::remove_dir_all(dir.path().join("out")).unwrap();
        std::fs::create_dir_all(dir.path().join("out")).unwrap();
        run(&OP, &spec).unwrap();
        let env = std::fs::read_to_string(dir.path().join("out/env")).unwrap();
        assert!(!env.contains("hunter2"), "{env}");
        assert!(env.contains("ALIGNFLOW_OUT="), "{env}");
        assert!(env.contains("ALIGNFLOW_IN_MY_DATA_V2="), "{env}");
        assert!(env.lines().any(|l| l.starts_with("PATH=")), "{env}");

        let bad = OP.normalize_params(&json!({"cmd": "true", "env": ["A=B"]}));
        assert_eq!(bad.unwrap_err().field, "env");
    }

    #[test]
    fn failure_quotes_stderr_tail() {
        let dir = tempfile::tempdir().unwrap();
        let cmd = "for i in $(seq 1 30); do echo line$i >&2; done; exit 3";
        let err = run(&OP, &exec_spec(dir.path(), cmd, &[]))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("stage `s`: exec failed with exit status 3; last lines of stderr:"),
            "{err}"
        );
        assert!(
            err.contains("\n  line11\n") && err.ends_with("\n  line30"),
            "{err}"
        );
        assert!(!err.contains("line10\n"), "{err}");
    }

    #[test]
    fn missing_outputs_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let err = run(
            &OP,
            &exec_spec(dir.path(), "touch $ALIGNFLOW_OUT/a", &["a", "b", "c"]),
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("did not create `b`, `c` under $ALIGNFLOW_OUT"),
            "{err}"
        );
    }

    #[test]
    fn cancel_kills_the_group() {
        let dir = tempfile::tempdir().unwrap();
        // The background sleep holds the pipes: only a group kill ends it.
        let spec = exec_spec(dir.path(), "sleep 30 & sleep 30; wait", &[]);
        let cancel = crate::CancelFlag::default();
        let flag = cancel.clone();
        let canceller = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            flag.cancel();
        });
        let start = Instant::now();
        let ctx = StageContext {
            spec: &spec,
            reporter: &crate::NullReporter,
            cancel: &cancel,
        };
        let err = super::run(&ctx).unwrap_err();
        canceller.join().unwrap();
        assert!(err.downcast_ref::<Cancelled>().is_some(), "{err}");
        assert!(start.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn background_leftovers_do_not_hang() {
        let dir = tempfile::tempdir().unwrap();
        let start = Instant::now();
        run(&OP, &exec_spec(dir.path(), "sleep 30 & echo started", &[])).unwrap();
        assert!(start.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn nothing_the_command_left_running_writes_into_its_outputs_after_it() {
        let dir = tempfile::tempdir().unwrap();
        // No pipe held: the leftover writes through its own descriptor.
        let cmd = r#"echo early > "$ALIGNFLOW_OUT/out"; (exec 3>>"$ALIGNFLOW_OUT/out"; sleep 1; echo late >&3) >/dev/null 2>&1 </dev/null &"#;
        run(&OP, &exec_spec(dir.path(), cmd, &["out"])).unwrap();
        std::thread::sleep(Duration::from_millis(1500));
        assert_eq!(
            std::fs::read_to_string(dir.path().join("out/out")).unwrap(),
            "early\n"
        );
    }

    #[test]
    fn input_names_become_variables() {
        assert_eq!(input_var("data"), "ALIGNFLOW_IN_DATA");
        assert_eq!(input_var("my-data.v2"), "ALIGNFLOW_IN_MY_DATA_V2");
    }
}
