//! A cache shared by a group (a cluster's team on NFS or Lustre):
//! `config.json` at the cache root says so, and `cache init --shared` sets
//! it up.
//!
//! In a shared cache every folder is group-writable and setgid (new files
//! and folders belong to the cache's group), this process creates files with
//! umask 002, and `gc` keeps unreachable objects younger than a day: a job
//! on another node may have ingested them and not yet committed its record.
//! Stored objects stay read-only (0444 / 0555) to everyone.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::atomic::atomic_write;
use super::error::{at, CacheError};

const CONFIG: &str = "config.json";

/// `config.json`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CacheConfig {
    /// Shared by a group: group-writable setgid folders, umask 002.
    #[serde(default)]
    pub shared: bool,
    /// `gc` keeps unreachable objects younger than this many seconds
    /// (default: a day when shared, none otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gc_min_age_s: Option<u64>,
}

impl CacheConfig {
    pub fn load(root: &Path) -> Result<CacheConfig, CacheError> {
        let path = root.join(CONFIG);
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| CacheError::Unsupported {
                path,
                message: format!("not a cache config ({e}); fix or remove it"),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(CacheConfig::default()),
            Err(e) => Err(at(&path)(e)),
        }
    }

    pub fn save(&self, root: &Path) -> Result<(), CacheError> {
        let path = root.join(CONFIG);
        let bytes = serde_json::to_vec_pretty(self).expect("config serialises");
        atomic_write(&path, &bytes).map_err(at(&path))
    }

    /// How young an unreachable object `gc` keeps.
    pub fn gc_min_age(&self) -> Duration {
        match (self.gc_min_age_s, self.shared) {
            (Some(s), _) => Duration::from_secs(s),
            (None, true) => Duration::from_secs(24 * 3600),
            (None, false) => Duration::ZERO,
        }
    }
}

/// Files this process creates from now on are group-writable (umask 002).
pub(super) fn group_umask() {
    // SAFETY: umask only changes the process's file creation mask.
    unsafe {
        libc::umask(0o002);
    }
}

/// Makes every folder of the cache group-writable and setgid (sealed tree
/// folders stay read-only), optionally owned by `group` first. Returns how
/// many folders it changed.
pub(super) fn share_folders(root: &Path, group: Option<&str>) -> Result<usize, CacheError> {
    let gid = match group {
        None => None,
        Some(name) => Some(group_id(name).ok_or_else(|| CacheError::Io {
            path: root.to_path_buf(),
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("no group `{name}` on this machine"),
            ),
        })?),
    };
    let mut changed = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let meta = fs::symlink_metadata(&dir).map_err(at(&dir))?;
        // Stored trees are sealed read-only (0555): not entered, not changed.
        if meta.permissions().mode() & 0o200 == 0 {
            continue;
        }
        if let Some(gid) = gid {
            std::os::unix::fs::lchown(&dir, None, Some(gid)).map_err(at(&dir))?;
        }
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o2775)).map_err(at(&dir))?;
        changed += 1;
        for entry in fs::read_dir(&dir).map_err(at(&dir))? {
            let entry = entry.map_err(at(&dir))?;
            if entry.file_type().map_err(at(&dir))?.is_dir() {
                stack.push(entry.path());
            }
        }
    }
    Ok(changed)
}

fn group_id(name: &str) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: getgrnam takes a NUL-terminated name; the entry is read at once.
    let entry = unsafe { libc::getgrnam(c.as_ptr()) };
    (!entry.is_null()).then(|| unsafe { (*entry).gr_gid })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shared_cache_keeps_young_garbage_for_a_day() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            CacheConfig::load(dir.path()).unwrap().gc_min_age(),
            Duration::ZERO
        );
        let shared = CacheConfig {
            shared: true,
            gc_min_age_s: None,
        };
        shared.save(dir.path()).unwrap();
        let loaded = CacheConfig::load(dir.path()).unwrap();
        assert_eq!(loaded, shared);
        assert_eq!(loaded.gc_min_age(), Duration::from_secs(86400));
    }

    #[test]
    fn shared_folders_are_group_writable_and_setgid() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("records/ab")).unwrap();
        fs::create_dir_all(dir.path().join("trees/x")).unwrap();
        fs::set_permissions(
            dir.path().join("trees/x"),
            fs::Permissions::from_mode(0o555),
        )
        .unwrap();
        share_folders(dir.path(), None).unwrap();
        let mode = |p: &str| {
            fs::metadata(dir.path().join(p))
                .unwrap()
                .permissions()
                .mode()
                & 0o7777
        };
        assert_eq!(mode("records/ab"), 0o2775);
        assert_eq!(mode("trees/x"), 0o555, "a sealed tree stays sealed");
    }
}
