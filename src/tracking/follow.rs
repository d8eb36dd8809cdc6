//! Following the `metrics.jsonl` a worker appends to while its stage runs:
//! the complete lines written since the last look.
//!
//! The worker keeps the log in the stage's checkpoint folder (so a resumed
//! run continues it) and copies it to the `metrics` output at the end; the
//! engine reads that file rather than the worker's metric events because
//! the events carry only a few of each line's fields.

use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::time::SystemTime;

/// A log being followed.
pub struct Follower {
    path: PathBuf,
    /// Lines from a file older than this belong to an earlier attempt,
    /// which the worker truncates or removes when it starts.
    since: SystemTime,
    offset: u64,
    /// The unfinished last line.
    partial: Vec<u8>,
    /// Complete lines handed out so far.
    lines: usize,
}

impl Follower {
    pub fn new(path: PathBuf, since: SystemTime) -> Follower {
        Follower {
            path,
            since,
            offset: 0,
            partial: Vec::new(),
            lines: 0,
        }
    }

    /// The complete lines written since the last call, each with its index
    /// in the log. A missing or stale file has none yet.
    pub fn poll(&mut self) -> Vec<(usize, String)> {
        let Ok(mut file) = std::fs::File::open(&self.path) else {
            return Vec::new();
        };
        let Ok(meta) = file.metadata() else {
            return Vec::new();
        };
        if meta.modified().is_ok_and(|m| m < self.since) {
            return Vec::new();
        }
        if meta.len() < self.offset {
            // Rewritten under us (a resume truncating it): start over.
            self.offset = 0;
            self.partial.clear();
            self.lines = 0;
        }
        let mut bytes = Vec::new();
        if file.seek(SeekFrom::Start(self.offset)).is_err() || file.read_to_end(&mut bytes).is_err()
        {
            return Vec::new();
        }
        self.offset += bytes.len() as u64;
        self.partial.extend_from_slice(&bytes);
        let Some(end) = self.partial.iter().rposition(|b| *b == b'\n') else {
            return Vec::new();
        };
        let complete: Vec<u8> = self.partial.drain(..=end).collect();
        String::from_utf8_lossy(&complete)
            .lines()
            .map(|line| {
                self.lines += 1;
                (self.lines - 1, line.to_string())
            })
            .collect()
    }

    /// The lines of the finished log at `path` past those handed out: the
    /// published copy of the followed file, with any line appended at the
    /// end (the held-out evaluation).
    pub fn rest_of(&mut self, path: &std::path::Path) -> std::io::Result<Vec<(usize, String)>> {
        let text = std::fs::read_to_string(path)?;
        let rest: Vec<(usize, String)> = text
            .lines()
            .enumerate()
            .skip(self.lines)
            .map(|(i, l)| (i, l.to_string()))
            .collect();
        self.lines += rest.len();
        Ok(rest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn hands_out_complete_lines_once_then_the_rest_of_the_published_copy() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("metrics.jsonl");
        let since = SystemTime::now() - std::time::Duration::from_secs(5);
        let mut f = Follower::new(log.clone(), since);
        assert!(f.poll().is_empty());
        let mut file = std::fs::File::create(&log).unwrap();
        write!(file, "{{\"step\":1}}\n{{\"st").unwrap();
        assert_eq!(f.poll(), vec![(0, "{\"step\":1}".to_string())]);
        writeln!(file, "ep\":2}}").unwrap();
        assert_eq!(f.poll(), vec![(1, "{\"step\":2}".to_string())]);
        assert!(f.poll().is_empty());
        let published = dir.path().join("published.jsonl");
        std::fs::write(&published, "{\"step\":1}\n{\"step\":2}\n{\"eval\":1}\n").unwrap();
        assert_eq!(
            f.rest_of(&published).unwrap(),
            vec![(2, "{\"eval\":1}".to_string())]
        );
    }

    #[test]
    fn a_file_older_than_the_attempt_is_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("metrics.jsonl");
        std::fs::write(&log, "{\"step\":9}\n").unwrap();
        let later = SystemTime::now() + std::time::Duration::from_secs(60);
        assert!(Follower::new(log, later).poll().is_empty());
    }
}
