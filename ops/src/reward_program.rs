//! A reward program: a script or binary that scores responses, run once
//! per stage and spoken to in JSON lines.
//!
//! # Protocol
//!
//! The stage starts `[interpreter...] PROGRAM args...` once (PROGRAM is the
//! `reward_program` input, so its content is part of the stage's
//! fingerprint) and writes requests to its stdin in batches of up to
//! `batch_size`, one JSON object a line:
//!
//! ```json
//! {"id": 0, "prompt": "12+7=", "response": "19", "reference": "19", ...}
//! ```
//!
//! `id` is a number unique within the stage, `prompt` the record's prompt
//! field (before the template), `response` the decoded answer (no EOS),
//! `messages` the conversation with a chat template, and every other field
//! of the prompt's record (`reference`, ...) as it is. The program answers
//! each request, in order, with one line on stdout:
//!
//! ```json
//! {"id": 0, "score": 1.0}
//! {"id": 1, "scores": {"correct": 1.0, "format": 0.5}}
//! ```
//!
//! With `scores` the response's score is the sum of the named values, and
//! each name is logged on its own. The program must flush stdout after each
//! batch and may write anything to stderr (it goes to the stage log). A
//! program that exits, takes longer than `timeout_s` to answer a batch,
//! answers another id, a non-number, NaN or an infinity, or a line that is
//! not such an object (or not UTF-8), or `scores` that sum to an infinity
//! fails the stage with an error naming the program, the record and the
//! answer line: no score is ever made up. The program runs in its own
//! process group, killed whole when the stage is done with it (or fails),
//! and it dies with the process that started it.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::op::require;
use crate::ParamError;

/// How the program is started and fed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ProgramParams {
    /// Arguments after the program's path.
    #[serde(default)]
    pub args: Vec<String>,
    /// The command that runs the program, e.g. `[python3]` (empty: the
    /// program is executed itself and needs its execute permission).
    #[serde(default)]
    pub interpreter: Vec<String>,
    /// Seconds the program may take to answer one batch.
    #[serde(default = "default_timeout_s")]
    pub timeout_s: f64,
    /// Requests per batch.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
}

impl Default for ProgramParams {
    fn default() -> Self {
        ProgramParams {
            args: Vec::new(),
            interpreter: Vec::new(),
            timeout_s: default_timeout_s(),
            batch_size: default_batch_size(),
        }
    }
}

/// The longest `timeout_s` (about 31 years: "no timeout" in practice).
const MAX_TIMEOUT_S: f64 = 1e9;

fn default_timeout_s() -> f64 {
    60.0
}
fn default_batch_size() -> usize {
    64
}

impl ProgramParams {
    /// Positive timeout and batch size.
    pub fn check(&self, field: &str) -> Result<(), ParamError> {
        require(
            self.timeout_s.is_finite() && self.timeout_s > 0.0 && self.timeout_s <= MAX_TIMEOUT_S,
            &format!("{field}.timeout_s"),
            "must be a positive number of seconds, at most 1e9",
        )?;
        require(
            self.batch_size > 0,
            &format!("{field}.batch_size"),
            crate::op::AT_LEAST_ONE,
        )
    }
}

/// Why a reward program gave no score.
#[derive(Debug, thiserror::Error)]
pub enum ProgramError {
    #[error("reward program `{program}`: cannot start `{command}`: {source}")]
    Start {
        program: String,
        command: String,
        source: std::io::Error,
    },
    #[error("reward program `{program}` exited ({status}) before answering record {record} (id {id}); its stderr is in the stage log")]
    Exited {
        program: String,
        status: String,
        record: String,
        id: u64,
    },
    #[error("reward program `{program}` did not answer record {record} (id {id}) within timeout_s = {timeout_s}")]
    Timeout {
        program: String,
        timeout_s: f64,
        record: String,
        id: u64,
    },
    #[error("reward program `{program}`, answer line {line}: {problem}, for record {record} (id {id}): {text:?}")]
    BadAnswer {
        program: String,
        line: usize,
        problem: String,
        record: String,
        id: u64,
        text: String,
    },
}

/// One response to score.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    /// The prompt's record, whose fields are passed on.
    pub record: &'a serde_json::Value,
    /// The prompt field as recorded.
    pub prompt: &'a str,
    /// The conversation, with a chat template.
    pub messages: Option<&'a serde_json::Value>,
    /// The decoded response.
    pub response: &'a str,
    /// Where the record is, for errors (`prompts.jsonl:3`).
    pub at: String,
}

impl Request<'_> {
    /// The request line: the record's fields, then `id`, `prompt`,
    /// `response` and `messages` over them.
    fn line(&self, id: u64) -> String {
        let mut obj = match self.record {
            serde_json::Value::Object(m) => m.clone(),
            _ => serde_json::Map::new(),
        };
        obj.insert("id".into(), id.into());
        obj.insert("prompt".into(), self.prompt.into());
        obj.insert("response".into(), self.response.into());
        if let Some(m) = self.messages {
            obj.insert("messages".into(), m.clone());
        }
        serde_json::Value::Object(obj).to_string()
    }
}

/// A program's score of one response: the total and, for `scores`
/// answers, its named parts.
#[derive(Debug, Clone, PartialEq)]
pub struct Score {
    pub total: f64,
    pub parts: BTreeMap<String, f64>,
}

/// A running reward program.
pub struct RewardProgram {
    /// The program's path as shown in errors.
    name: String,
    child: Child,
    /// How the program ended, once reaped (by [`RewardProgram::kill`]).
    reaped: Option<std::io::Result<std::process::ExitStatus>>,
    stdin: Option<ChildStdin>,
    lines: Receiver<std::io::Result<Vec<u8>>>,
    /// Answer lines read so far.
    line: usize,
    next_id: u64,
    params: ProgramParams,
}

impl RewardProgram {
    /// Starts `program` (its stderr is forwarded to the log line by line).
    pub fn start(program: &Path, params: &ProgramParams) -> Result<RewardProgram, ProgramError> {
        let name = program.display().to_string();
        let (cmd, rest): (PathBuf, Vec<String>) = match params.interpreter.split_first() {
            Some((first, more)) => {
                let mut rest = more.to_vec();
                rest.push(name.clone());
                (first.into(), rest)
            }
            None => (program.to_path_buf(), Vec::new()),
        };
        let mut command = Command::new(&cmd);
        command
            .args(&rest)
            .args(&params.args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own group, killed whole when it is stopped: the children
            // of a wrapper or a worker pool go with it (one left holding
            // stdin would block the batch's writer past the timeout).
            .process_group(0);
        crate::exec::die_with_the_engine(&mut command);
        let mut child = command.spawn().map_err(|source| ProgramError::Start {
            program: name.clone(),
            command: cmd.display().to_string(),
            source,
        })?;
        let stdout = child.stdout.take().expect("piped");
        let stderr = child.stderr.take().expect("piped");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).split(b'\n') {
                let failed = line.is_err();
                if tx.send(line).is_err() || failed {
                    break;
                }
            }
        });
        let label = name.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                tracing::info!("reward program {label}: {line}");
            }
        });
        Ok(RewardProgram {
            name,
            stdin: child.stdin.take(),
            child,
            reaped: None,
            lines,
            line: 0,
            next_id: 0,
            params: params.clone(),
        })
    }

    /// The score of every request, asked in batches.
    pub fn score(&mut self, requests: &[Request<'_>]) -> Result<Vec<Score>, ProgramError> {
        let mut out = Vec::with_capacity(requests.len());
        for batch in requests.chunks(self.params.batch_size.max(1)) {
            out.extend(self.batch(batch)?);
        }
        Ok(out)
    }

    fn batch(&mut self, batch: &[Request<'_>]) -> Result<Vec<Score>, ProgramError> {
        let first = self.next_id;
        self.next_id += batch.len() as u64;
        let text: String = batch
            .iter()
            .enumerate()
            .map(|(k, r)| r.line(first + k as u64) + "\n")
            .collect();
        // `timeout_s` is at most 1e9 (checked), which any clock can add.
        let deadline = Instant::now() + Duration::from_secs_f64(self.params.timeout_s);
        // The batch is written from its own thread: a program that stops
        // reading must not block the timeout.
        let mut stdin = self.stdin.take();
        let writer = std::thread::spawn(move || {
            if let Some(s) = stdin.as_mut() {
                // A program that exited shows as such when its answer is
                // missing; the broken pipe adds nothing.
                let _ = s.write_all(text.as_bytes()).and_then(|_| s.flush());
            }
            stdin
        });
        let mut scores = Vec::with_capacity(batch.len());
        let mut result = Ok(());
        for (k, request) in batch.iter().enumerate() {
            match self.answer(request, first + k as u64, deadline) {
                Ok(s) => scores.push(s),
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        if result.is_err() {
            // Unblocks the writer if the program stopped reading; a
            // process that escaped the group may still hold stdin, so the
            // writer is waited for a moment only (the stage fails anyway).
            self.kill();
            let until = Instant::now() + Duration::from_secs(2);
            while !writer.is_finished() && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(10));
            }
            if writer.is_finished() {
                self.stdin = writer.join().unwrap_or(None);
            }
            return Err(result.unwrap_err());
        }
        self.stdin = writer.join().unwrap_or(None);
        Ok(scores)
    }

    /// Reads and checks the answer to request `id`.
    fn answer(
        &mut self,
        request: &Request<'_>,
        id: u64,
        deadline: Instant,
    ) -> Result<Score, ProgramError> {
        let left = deadline.saturating_duration_since(Instant::now());
        let bytes = match self.lines.recv_timeout(left) {
            Ok(Ok(bytes)) => bytes,
            Err(RecvTimeoutError::Timeout) => {
                return Err(ProgramError::Timeout {
                    program: self.name.clone(),
                    timeout_s: self.params.timeout_s,
                    record: request.at.clone(),
                    id,
                })
            }
            Ok(Err(_)) | Err(RecvTimeoutError::Disconnected) => {
                return Err(ProgramError::Exited {
                    program: self.name.clone(),
                    status: self.exit_status(),
                    record: request.at.clone(),
                    id,
                })
            }
        };
        self.line += 1;
        let (text, answer) = match String::from_utf8(bytes) {
            Ok(text) => {
                let answer = parse_answer(&text, id);
                (text, answer)
            }
            Err(e) => (
                String::from_utf8_lossy(e.as_bytes()).into_owned(),
                Err("not UTF-8".to_string()),
            ),
        };
        answer.map_err(|problem| ProgramError::BadAnswer {
            program: self.name.clone(),
            line: self.line,
            problem,
            record: request.at.clone(),
            id,
            text,
        })
    }

    /// How the program ended (it closed stdout: give it a moment to exit).
    fn exit_status(&mut self) -> String {
        let until = Instant::now() + Duration::from_secs(2);
        while Instant::now() < until {
            if self.has_exited() {
                if let Some(Ok(status)) = self.kill() {
                    return status.to_string();
                }
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        "closed its stdout".into()
    }

    /// Whether the program has exited (it stays unreaped).
    fn has_exited(&self) -> bool {
        self.reaped.is_some() || crate::exec::exited(self.child.id() as libc::pid_t).unwrap_or(true)
    }

    /// Kills the program's group (what it started goes with it), then
    /// reaps the program, once: the group's id is only signalled while the
    /// unreaped program keeps it from naming another group.
    fn kill(&mut self) -> Option<std::io::Result<std::process::ExitStatus>> {
        if self.reaped.is_none() {
            crate::exec::kill_group(self.child.id() as libc::pid_t);
            self.reaped = Some(self.child.wait());
        }
        self.reaped.as_ref().map(|r| match r {
            Ok(status) => Ok(*status),
            Err(e) => Err(std::io::Error::new(e.kind(), e.to_string())),
        })
    }
}

impl Drop for RewardProgram {
    /// Closes the program's stdin (its end of input), gives it a moment to
    /// exit, then kills its group: what it started goes with it.
    fn drop(&mut self) {
        drop(self.stdin.take());
        let until = Instant::now() + Duration::from_secs(2);
        while !self.has_exited() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(10));
        }
        self.kill();
    }
}

/// Checks one answer line against the id due.
fn parse_answer(text: &str, id: u64) -> Result<Score, String> {
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("not a JSON object ({e})"))?;
    let obj = value.as_object().ok_or("not a JSON object")?;
    match obj.get("id") {
        Some(got) if got.as_u64() == Some(id) => {}
        Some(got) => return Err(format!("answered id {got} where id {id} was due")),
        None => return Err("no `id`".into()),
    }
    let number = |v: &serde_json::Value, what: &str| -> Result<f64, String> {
        // serde_json reads `NaN` / `Infinity` as no JSON at all, so a
        // program that prints them fails above; a string is not a number.
        let x = v
            .as_f64()
            .ok_or_else(|| format!("{what} is not a number: {v}"))?;
        if x.is_finite() {
            Ok(x)
        } else {
            Err(format!("{what} is not finite: {x}"))
        }
    };
    match (obj.get("score"), obj.get("scores")) {
        (Some(s), None) => Ok(Score {
            total: number(s, "`score`")?,
            parts: BTreeMap::new(),
        }),
        (None, Some(serde_json::Value::Object(m))) if !m.is_empty() => {
            let mut parts = BTreeMap::new();
            for (name, v) in m {
                parts.insert(name.clone(), number(v, &format!("`scores.{name}`"))?);
            }
            let total: f64 = parts.values().sum();
            if !total.is_finite() {
                return Err(format!("the sum of `scores` is not finite: {total}"));
            }
            Ok(Score { total, parts })
        }
        (None, Some(_)) => Err("`scores` is not a non-empty object of numbers".into()),
        (Some(_), Some(_)) => Err("give `score` or `scores`, not both".into()),
        (None, None) => Err("no `score` or `scores`".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A shell program in a temporary folder, run with `sh`.
    fn program(dir: &Path, body: &str) -> PathBuf {
        let path = dir.join("reward.sh");
        std::fs::write(&path, body).unwrap();
        path
    }

    fn params(timeout_s: f64) -> ProgramParams {
        ProgramParams {
            interpreter: vec!["sh".into()],
            timeout_s,
            batch_size: 2,
            ..ProgramParams::default()
        }
    }

    fn requests(record: &serde_json::Value, n: usize) -> Vec<Request<'_>> {
        (0..n)
            .map(|i| Request {
                record,
                prompt: "1+1=",
                messages: None,
                response: "2",
                at: format!("prompts.jsonl:{}", i + 1),
            })
            .collect()
    }

    fn run(body: &str, n: usize) -> Result<Vec<Score>, ProgramError> {
        let dir = tempfile::tempdir().unwrap();
        let mut p = RewardProgram::start(&program(dir.path(), body), &params(2.0)).unwrap();
        let record = json!({"prompt": "1+1=", "reference": "2"});
        p.score(&requests(&record, n))
    }

    /// Answers each request with `$1` as the score, keeping the id.
    const ECHO: &str = r#"while read -r line; do
  id=$(printf '%s' "$line" | sed 's/.*"id":\([0-9]*\).*/\1/')
  echo "{\"id\": $id, $1}"
done
"#;

    fn echo(answer: &str) -> String {
        ECHO.replace("$1", answer)
    }

    #[test]
    fn scores_in_batches_with_the_record_fields() {
        let dir = tempfile::tempdir().unwrap();
        // Echoes the reference back as the score when it is "2".
        let body = r#"while read -r line; do
  id=$(printf '%s' "$line" | sed 's/.*"id":\([0-9]*\).*/\1/')
  case "$line" in *'"reference":"2"'*'"response":"2"'*) s=1 ;; *) s=0 ;; esac
  echo "hello from stderr" >&2
  echo "{\"id\": $id, \"scores\": {\"right\": $s, \"fmt\": 0.5}}"
done
"#;
        let mut p = RewardProgram::start(&program(dir.path(), body), &params(5.0)).unwrap();
        let record = json!({"prompt": "1+1=", "reference": "2"});
        let scores = p.score(&requests(&record, 5)).unwrap();
        assert_eq!(scores.len(), 5);
        for s in &scores {
            assert_eq!(s.total, 1.5);
            assert_eq!(s.parts["right"], 1.0);
            assert_eq!(s.parts["fmt"], 0.5);
        }
        // The ids keep counting across calls.
        assert_eq!(p.score(&requests(&record, 1)).unwrap()[0].total, 1.5);
        assert_eq!(p.next_id, 6);
    }

    #[test]
    fn a_program_that_exits_fails_naming_it_and_the_record() {
        let e = run("read -r line; exit 3\n", 2).unwrap_err().to_string();
        assert!(e.contains("reward program `"), "{e}");
        assert!(e.contains("reward.sh"), "{e}");
        assert!(e.contains("exited (exit status: 3)"), "{e}");
        assert!(e.contains("record prompts.jsonl:1 (id 0)"), "{e}");
    }

    #[test]
    fn a_program_that_hangs_fails_after_the_timeout() {
        let t0 = Instant::now();
        let e = run("sleep 30\n", 1).unwrap_err().to_string();
        assert!(t0.elapsed() < Duration::from_secs(10));
        assert!(
            e.contains("did not answer record prompts.jsonl:1 (id 0) within timeout_s = 2"),
            "{e}"
        );
        assert!(e.contains("reward.sh"), "{e}");
    }

    #[test]
    fn the_timeout_holds_when_a_child_of_the_program_keeps_its_stdin() {
        let dir = tempfile::tempdir().unwrap();
        // `sleep` inherits stdin and never reads it: a batch larger than
        // the pipe's buffer cannot be written while it lives.
        let body = "sleep 30\necho never\n";
        let mut p = RewardProgram::start(&program(dir.path(), body), &params(1.0)).unwrap();
        let record = json!({"prompt": "1+1=", "big": "x".repeat(200_000)});
        let t0 = Instant::now();
        let e = p.score(&requests(&record, 1)).unwrap_err().to_string();
        assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
        assert!(e.contains("within timeout_s = 1"), "{e}");
    }

    #[test]
    fn what_the_program_started_ends_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("bg.pid");
        let body = format!(
            "sleep 300 &\necho $! > '{}'\n{}",
            pid_file.display(),
            echo(r#"\"score\": 1"#)
        );
        let mut p = RewardProgram::start(&program(dir.path(), &body), &params(5.0)).unwrap();
        let record = json!({"prompt": "1+1="});
        assert_eq!(p.score(&requests(&record, 1)).unwrap()[0].total, 1.0);
        let bg: libc::pid_t = std::fs::read_to_string(&pid_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        drop(p);
        // SAFETY: signal 0 only checks that the process exists.
        let alive = || unsafe { libc::kill(bg, 0) == 0 };
        let until = Instant::now() + Duration::from_secs(2);
        while alive() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(!alive(), "the program's background sleep outlived it");
    }

    #[test]
    fn an_answer_that_is_not_utf8_is_quoted_as_a_bad_answer() {
        let e = run("read -r line; printf '\\377\\376 {\\n'; sleep 5\n", 1)
            .unwrap_err()
            .to_string();
        assert!(e.contains("answer line 1: not UTF-8"), "{e}");
    }

    #[test]
    fn parts_that_sum_to_infinity_are_refused() {
        let e = parse_answer(r#"{"id": 0, "scores": {"a": 1e308, "b": 1e308}}"#, 0).unwrap_err();
        assert!(e.contains("sum of `scores` is not finite"), "{e}");
    }

    #[test]
    fn an_endless_timeout_is_refused_naming_the_field() {
        let mut p = params(1e20);
        let e = p.check("rewards[0].program").unwrap_err();
        assert_eq!(e.field, "rewards[0].program.timeout_s");
        p.timeout_s = 1e9;
        p.check("rewards[0].program").unwrap();
    }

    #[test]
    fn a_wrong_id_fails_naming_the_line() {
        let body = "read -r a; read -r b; echo '{\"id\": 0, \"score\": 1}'; echo '{\"id\": 7, \"score\": 1}'\nsleep 5\n";
        let e = run(body, 2).unwrap_err().to_string();
        assert!(
            e.contains("answer line 2: answered id 7 where id 1 was due"),
            "{e}"
        );
        assert!(e.contains("record prompts.jsonl:2 (id 1)"), "{e}");
    }

    #[test]
    fn a_non_number_fails() {
        let e = run(&echo(r#"\"score\": \"high\""#), 1)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("answer line 1: `score` is not a number: \"high\""),
            "{e}"
        );
        assert!(e.contains("record prompts.jsonl:1"), "{e}");
        let e = run(&echo(r#"\"scores\": {\"a\": null}"#), 1)
            .unwrap_err()
            .to_string();
        assert!(e.contains("`scores.a` is not a number: null"), "{e}");
    }

    #[test]
    fn nan_and_infinity_fail() {
        let e = run(&echo(r#"\"score\": NaN"#), 1).unwrap_err().to_string();
        assert!(e.contains("answer line 1: not a JSON object"), "{e}");
        assert!(e.contains("NaN"), "{e}");
        let e = run(&echo(r#"\"score\": 1e999"#), 1)
            .unwrap_err()
            .to_string();
        assert!(e.contains("answer line 1:"), "{e}");
        assert!(e.contains("record prompts.jsonl:1"), "{e}");
    }

    #[test]
    fn malformed_answers_fail() {
        let e = run("read -r a; echo 'score: 1'; sleep 5\n", 1)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a JSON object"), "{e}");
        let e = run(&echo(r#"\"value\": 1"#), 1).unwrap_err().to_string();
        assert!(e.contains("no `score` or `scores`"), "{e}");
    }

    #[test]
    fn a_missing_program_fails_to_start() {
        let params = ProgramParams::default();
        let Err(e) = RewardProgram::start(Path::new("/nonexistent/reward"), &params) else {
            panic!("started");
        };
        assert!(e.to_string().contains("cannot start"), "{e}");
    }
}
