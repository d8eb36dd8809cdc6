//! Locks under `locks/`: one per fingerprint, and `gc.lock`, which running
//! stages share and `gc` takes alone; and the staging folders under `tmp/`
//! that a stage lock protects.
use std::fs::{self, File, OpenOptions, TryLockError};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::error::{at, CacheError};
use super::fsutil::{checked_fp, valid_fp};
use super::Fingerprint;

const GC_LOCK: &str = "gc.lock";

/// Process-wide, so two handles on one cache never pick the same staging name.
static STAGING_COUNTER: AtomicU64 = AtomicU64::new(0);

/// An exclusive lock on one fingerprint, released on drop.
///
/// It also holds a shared lock on `locks/gc.lock`, so `gc` never deletes
/// objects that a running stage has ingested but not yet recorded.
pub struct StageLock {
    file: File,
    gc: File,
}

impl Drop for StageLock {
    fn drop(&mut self) {
        // Closing the files would release the locks too; be explicit.
        let _ = self.file.unlock();
        let _ = self.gc.unlock();
    }
}

/// A shared lock on `locks/gc.lock`, released on drop: `gc` does not run
/// while it is held, so objects adopted under it stay until their record
/// is written.
pub struct GcGuard {
    gc: File,
}

impl Drop for GcGuard {
    fn drop(&mut self) {
        let _ = self.gc.unlock();
    }
}

/// The `locks/` and `tmp/` folders of one cache root.
pub(super) struct Locks {
    locks: PathBuf,
    tmp: PathBuf,
}

impl Locks {
    pub fn new(root: &Path) -> Locks {
        Locks {
            locks: root.join("locks"),
            tmp: root.join("tmp"),
        }
    }

    fn lock_path(&self, name: &str) -> PathBuf {
        self.locks.join(name)
    }

    fn lock_file(&self, name: &str) -> Result<File, CacheError> {
        let path = self.lock_path(name);
        OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(at(&path))
    }

    fn gc_shared_lock(&self) -> Result<File, CacheError> {
        let gc = self.lock_file(GC_LOCK)?;
        gc.lock_shared().map_err(at(&self.lock_path(GC_LOCK)))?;
        Ok(gc)
    }

    /// Blocks until `gc` is not running, and keeps it from starting until
    /// the guard is dropped.
    /// Blocks until this process holds `locks/NAME.lock` alone (released
    /// when the file is dropped): for writers of one file outside the cache
    /// that must take turns.
    pub fn hold_named(&self, name: &str) -> Result<File, CacheError> {
        let name = format!("{name}.lock");
        let file = self.lock_file(&name)?;
        file.lock().map_err(at(&self.lock_path(&name)))?;
        Ok(file)
    }

    pub fn hold_off_gc(&self) -> Result<GcGuard, CacheError> {
        Ok(GcGuard {
            gc: self.gc_shared_lock()?,
        })
    }

    /// The shared gc lock (taken, blocking), the unlocked lock file of `fp`
    /// and its path: what both ways of locking a stage start with.
    fn open_stage_lock(&self, fp: &Fingerprint) -> Result<(File, File, PathBuf), CacheError> {
        let name = format!("{}.lock", checked_fp(fp)?);
        let gc = self.gc_shared_lock()?;
        let file = self.lock_file(&name)?;
        Ok((gc, file, self.lock_path(&name)))
    }

    /// Blocks until this process holds the lock for `fp`.
    pub fn lock_stage(&self, fp: &Fingerprint) -> Result<StageLock, CacheError> {
        let (gc, file, path) = self.open_stage_lock(fp)?;
        file.lock().map_err(at(&path))?;
        Ok(StageLock { file, gc })
    }

    /// The lock for `fp` if nobody else holds it.
    pub fn try_lock_stage(&self, fp: &Fingerprint) -> Result<Option<StageLock>, CacheError> {
        let (gc, file, path) = self.open_stage_lock(fp)?;
        match file.try_lock() {
            Ok(()) => Ok(Some(StageLock { file, gc })),
            Err(TryLockError::WouldBlock) => Ok(None),
            Err(TryLockError::Error(e)) => Err(at(&path)(e)),
        }
    }

    /// `gc.lock` held alone, or `None` while stages are running (they hold
    /// it shared). Held until the returned file is dropped.
    pub fn try_lock_gc(&self) -> Result<Option<File>, CacheError> {
        let gc_lock = self.lock_file(GC_LOCK)?;
        match gc_lock.try_lock() {
            Ok(()) => Ok(Some(gc_lock)),
            Err(TryLockError::WouldBlock) => Ok(None),
            Err(TryLockError::Error(e)) => Err(at(&self.lock_path(GC_LOCK))(e)),
        }
    }

    /// The lock of the stage that owns staging folder `name`, if that is a
    /// staging folder and no running stage holds the lock.
    ///
    /// Locked directly, not through `try_lock_stage`: that would wait for
    /// the gc lock the caller may hold.
    pub fn try_lock_staging_owner(&self, name: &str) -> Result<Option<File>, CacheError> {
        let Some(fp) = staging_fingerprint(name) else {
            return Ok(None);
        };
        self.try_lock_owner(fp)
    }

    /// The lock of fingerprint `fp` (checked hex) if no running stage holds
    /// it; locked directly for the same reason.
    pub fn try_lock_owner(&self, fp: &str) -> Result<Option<File>, CacheError> {
        let lock = self.lock_file(&format!("{fp}.lock"))?;
        Ok(lock.try_lock().is_ok().then_some(lock))
    }

    /// A fresh empty staging folder under `tmp/` for a run of `fp`.
    ///
    /// Take the stage lock first: `gc` removes staging folders whose
    /// fingerprint is not locked.
    pub fn staging_dir(&self, fp: &Fingerprint) -> Result<PathBuf, CacheError> {
        let s = checked_fp(fp)?;
        let tmp = &self.tmp;
        fs::create_dir_all(tmp).map_err(at(tmp))?;
        loop {
            let n = STAGING_COUNTER.fetch_add(1, Ordering::Relaxed);
            let dir = tmp.join(format!("{s}.{}.{n}", std::process::id()));
            match fs::create_dir(&dir) {
                Ok(()) => return Ok(dir),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(at(&dir)(e)),
            }
        }
    }
}

/// The fingerprint of a staging folder name `<fp>.<pid>.<n>`.
fn staging_fingerprint(name: &str) -> Option<&str> {
    let mut parts = name.rsplitn(3, '.');
    let n = parts.next()?;
    let pid = parts.next()?;
    let fp = parts.next()?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    (digits(n) && digits(pid) && valid_fp(fp)).then_some(fp)
}
