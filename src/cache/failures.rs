//! Notes of failed stage runs, `failures/<fingerprint>.json`, so that `plan`
//! and `show` can say that a stage's last run failed, and why, instead of
//! "never run". Written when a run of the fingerprint fails, removed when
//! it commits. A note is a hint, never a result: losing one (or `gc`
//! clearing them) costs nothing but the hint.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::atomic::atomic_write;
use super::error::{at, CacheError};
use super::fsutil::{checked_fp, ensure_dir};
use super::key::Fingerprint;

/// The last failed run of a fingerprint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FailureNote {
    pub pipeline: String,
    pub stage: String,
    /// RFC 3339.
    pub at: String,
    /// The error, as the run printed it.
    pub error: String,
    /// The run log, if the run kept one.
    pub log: Option<PathBuf>,
}

/// The `failures/` folder of one cache root.
pub(super) struct Failures {
    dir: PathBuf,
}

impl Failures {
    pub fn new(root: &Path) -> Failures {
        Failures {
            dir: root.join("failures"),
        }
    }

    fn path(&self, fp: &Fingerprint) -> Result<PathBuf, CacheError> {
        Ok(self.dir.join(format!("{}.json", checked_fp(fp)?)))
    }

    pub fn note(&self, fp: &Fingerprint, note: &FailureNote) -> Result<(), CacheError> {
        ensure_dir(&self.dir)?;
        let path = self.path(fp)?;
        let bytes = serde_json::to_vec_pretty(note).expect("failure notes serialise");
        atomic_write(&path, &bytes).map_err(at(&path))
    }

    /// The note of `fp`'s last failed run; an unreadable note is no note.
    pub fn get(&self, fp: &Fingerprint) -> Option<FailureNote> {
        let bytes = std::fs::read(self.path(fp).ok()?).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    pub fn clear(&self, fp: &Fingerprint) -> Result<(), CacheError> {
        let path = self.path(fp)?;
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(at(&path)(e)),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_note_is_kept_until_cleared() {
        let dir = tempfile::tempdir().unwrap();
        let failures = Failures::new(dir.path());
        let fp = Fingerprint("ab".repeat(32));
        assert_eq!(failures.get(&fp), None);
        let note = FailureNote {
            pipeline: "p".into(),
            stage: "s".into(),
            at: "2026-12-06T00:00:00Z".into(),
            error: "exec failed with exit status 3".into(),
            log: None,
        };
        failures.note(&fp, &note).unwrap();
        assert_eq!(failures.get(&fp), Some(note));
        failures.clear(&fp).unwrap();
        assert_eq!(failures.get(&fp), None);
        // Clearing what is not there is fine: most stages never fail.
        failures.clear(&fp).unwrap();
    }
}
