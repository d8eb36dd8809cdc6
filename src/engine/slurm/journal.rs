//! What a cluster run leaves in `cache/runs/RUN/`: `run.json` (the manifest,
//! overrides, targets and site settings it was started with, for `run
//! --attach RUN`) and `jobs.jsonl` (each submission and how each job
//! ended, appended as it happens, for `--attach` and `alignflow jobs`).

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::cache::atomic_write;

use super::super::profile::SlurmSettings;

/// `run.json`: how the run was started.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunInfo {
    pub run_id: String,
    /// Absolute path of the manifest.
    pub manifest: PathBuf,
    pub sets: Vec<(String, String)>,
    pub targets: Vec<String>,
    pub settings: SlurmSettings,
    /// RFC 3339.
    pub started_at: String,
}

/// One line of `jobs.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum JobLine {
    Submitted {
        stage: String,
        fingerprint: String,
        job_id: String,
        /// 1 for the first submission of the stage in this run.
        attempt: u32,
        /// The job's output (stdout and stderr).
        log: PathBuf,
        /// The length of the stage's events file when the job was
        /// submitted: its own events follow (an engine attaching later
        /// reads them from there, a failure reported meanwhile included).
        #[serde(default)]
        events_from: u64,
        at: String,
    },
    Ended {
        job_id: String,
        state: String,
        reason: String,
        at: String,
    },
}

/// A job of the run as `jobs.jsonl` tells it.
#[derive(Debug, Clone, PartialEq)]
pub struct JobEntry {
    pub stage: String,
    pub fingerprint: String,
    pub job_id: String,
    pub attempt: u32,
    pub log: PathBuf,
    /// Where its events begin in the stage's events file.
    pub events_from: u64,
    /// How it ended (state, reason), when the engine saw it end.
    pub ended: Option<(String, String)>,
}

/// `cache/runs/`.
pub fn runs_dir(cache_root: &Path) -> PathBuf {
    cache_root.join("runs")
}

pub fn run_dir(cache_root: &Path, run_id: &str) -> PathBuf {
    runs_dir(cache_root).join(run_id)
}

impl RunInfo {
    pub fn save(&self, dir: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join("run.json");
        atomic_write(&path, &serde_json::to_vec_pretty(self)?)
            .with_context(|| format!("writing {}", path.display()))
    }

    /// The run `run_id` of the cache at `cache_root`.
    pub fn load(cache_root: &Path, run_id: &str) -> anyhow::Result<RunInfo> {
        let path = run_dir(cache_root, run_id).join("run.json");
        let bytes = std::fs::read(&path).with_context(|| {
            format!(
                "no run `{run_id}` in this cache ({} is missing; `alignflow jobs` lists the runs)",
                path.display()
            )
        })?;
        serde_json::from_slice(&bytes)
            .with_context(|| format!("{}: not a run file", path.display()))
    }
}

/// The appender of `jobs.jsonl`.
pub struct Journal {
    path: PathBuf,
    file: Mutex<File>,
}

impl Journal {
    pub fn open(dir: &Path) -> anyhow::Result<Journal> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join("jobs.jsonl");
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        // A line torn by an engine killed while writing it ends here: the
        // next line starts on a line of its own, or it would be lost too.
        if !ends_with_newline(&mut file)? {
            file.write_all(b"\n")
                .with_context(|| format!("appending to {}", path.display()))?;
        }
        Ok(Journal {
            path,
            file: Mutex::new(file),
        })
    }

    /// Appends a line and syncs it: a run whose engine dies right after a
    /// submission still knows the job.
    pub fn append(&self, line: &JobLine) -> anyhow::Result<()> {
        let mut f = self.file.lock().unwrap_or_else(|e| e.into_inner());
        let text = format!("{}\n", serde_json::to_string(line)?);
        f.write_all(text.as_bytes())
            .and_then(|()| f.sync_data())
            .with_context(|| format!("appending to {}", self.path.display()))
    }
}

/// Whether `file` is empty or ends with a newline.
fn ends_with_newline(file: &mut File) -> anyhow::Result<bool> {
    use std::io::{Read, Seek, SeekFrom};
    if file.metadata()?.len() == 0 {
        return Ok(true);
    }
    file.seek(SeekFrom::End(-1))?;
    let mut last = [0u8];
    file.read_exact(&mut last)?;
    Ok(last[0] == b'\n')
}

/// Every job of a run, in submission order (a torn last line is skipped).
pub fn read_jobs(dir: &Path) -> anyhow::Result<Vec<JobEntry>> {
    let path = dir.join("jobs.jsonl");
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let mut jobs: Vec<JobEntry> = Vec::new();
    let mut ended: BTreeMap<String, (String, String)> = BTreeMap::new();
    for line in text.lines() {
        match serde_json::from_str::<JobLine>(line) {
            Ok(JobLine::Submitted {
                stage,
                fingerprint,
                job_id,
                attempt,
                log,
                events_from,
                ..
            }) => jobs.push(JobEntry {
                stage,
                fingerprint,
                job_id,
                attempt,
                log,
                events_from,
                ended: None,
            }),
            Ok(JobLine::Ended {
                job_id,
                state,
                reason,
                ..
            }) => {
                ended.insert(job_id, (state, reason));
            }
            Err(_) => tracing::warn!("{}: skipped an unreadable line", path.display()),
        }
    }
    for job in &mut jobs {
        job.ended = ended.remove(&job.job_id);
    }
    Ok(jobs)
}

/// The runs of the cache, oldest first (by start time).
pub fn list_runs(cache_root: &Path) -> anyhow::Result<Vec<RunInfo>> {
    let dir = runs_dir(cache_root);
    let mut runs = Vec::new();
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(runs),
        Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
    };
    for entry in entries {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if let Ok(info) = RunInfo::load(cache_root, &name) {
            runs.push(info);
        }
    }
    runs.sort_by(|a, b| a.started_at.cmp(&b.started_at));
    Ok(runs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_pair_with_how_they_ended() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(dir.path()).unwrap();
        let submitted = |job: &str, attempt| JobLine::Submitted {
            stage: "a".into(),
            fingerprint: "f".into(),
            job_id: job.into(),
            attempt,
            log: "x.out".into(),
            events_from: 0,
            at: "t".into(),
        };
        journal.append(&submitted("1", 1)).unwrap();
        journal
            .append(&JobLine::Ended {
                job_id: "1".into(),
                state: "TIMEOUT".into(),
                reason: "TimeLimit".into(),
                at: "t".into(),
            })
            .unwrap();
        journal.append(&submitted("2", 2)).unwrap();
        let jobs = read_jobs(dir.path()).unwrap();
        assert_eq!(jobs.len(), 2);
        assert_eq!(jobs[0].ended, Some(("TIMEOUT".into(), "TimeLimit".into())));
        assert_eq!((jobs[1].attempt, jobs[1].ended.clone()), (2, None));
    }

    #[test]
    fn a_line_after_a_torn_one_starts_a_line_of_its_own() {
        let dir = tempfile::tempdir().unwrap();
        // An engine killed while writing its second line.
        let first = serde_json::json!({"event": "submitted", "stage": "a", "fingerprint": "f",
            "job_id": "1", "attempt": 1, "log": "x.out", "at": "t"});
        std::fs::write(
            dir.path().join("jobs.jsonl"),
            format!("{first}\n{{\"event\": \"ended\", \"job_"),
        )
        .unwrap();
        let journal = Journal::open(dir.path()).unwrap();
        journal
            .append(&JobLine::Submitted {
                stage: "b".into(),
                fingerprint: "g".into(),
                job_id: "2".into(),
                attempt: 1,
                log: "y.out".into(),
                events_from: 0,
                at: "t".into(),
            })
            .unwrap();
        let jobs = read_jobs(dir.path()).unwrap();
        let ids: Vec<&str> = jobs.iter().map(|j| j.job_id.as_str()).collect();
        assert_eq!(ids, ["1", "2"]);
    }
}
