//! Checkpoint folders (`checkpoints/<fingerprint>/`): what `gc` collects of
//! them. A stage's own run removes its folder when its record commits
//! ([`super::Cache::retire_checkpoints`]); this collects those left by
//! runs that died between the commit and the removal, by older engines, and
//! the empty folders of stages that failed before writing any.
use std::fs;

use super::fsutil::{file_name, read_dir_sorted, valid_fp};
use super::maintenance::{old_enough, remove, GcReport, Maintenance};
use super::Fingerprint;

/// A file in a checkpoint folder that keeps it after the commit and from
/// `gc` (a stage with `keep_checkpoints: true`).
pub(super) const KEEP_MARKER: &str = ".keep";

impl Maintenance<'_> {
    /// Removes the checkpoint folders nothing can resume from: those of a
    /// committed fingerprint, and empty ones, when no run holds the
    /// fingerprint's lock. A non-empty folder without a record is what an
    /// interrupted stage resumes from, and stays. On a shared cache an
    /// empty one goes only once `min_age` old: the lock of a stage another
    /// node runs may not be seen from here, and its command may not have
    /// written its first checkpoint yet.
    pub(super) fn gc_checkpoints(
        &self,
        dry_run: bool,
        min_age: std::time::Duration,
        report: &mut GcReport,
    ) -> Result<(), super::CacheError> {
        for dir in read_dir_sorted(&self.root.join("checkpoints"))? {
            let fp = file_name(&dir);
            if !valid_fp(&fp) || !dir.is_dir() || dir.join(KEEP_MARKER).exists() {
                continue;
            }
            let committed = matches!(self.records.get(&Fingerprint(fp.clone())), Ok(Some(_)));
            let empty = fs::read_dir(&dir).is_ok_and(|mut d| d.next().is_none());
            if !(committed || (empty && old_enough(&dir, min_age))) {
                continue;
            }
            if let Some(_owner) = self.locks.try_lock_owner(&fp)? {
                remove(&dir, dry_run, report);
            }
        }
        Ok(())
    }
}
