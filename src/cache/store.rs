//! The [`Cache`]: one handle on a cache folder, tying together its objects,
//! records, locks and maintenance.
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::checkpoints::KEEP_MARKER;
use super::error::{at, CacheError};
use super::failures::{FailureNote, Failures};
use super::fsutil::{checked_fp, ensure_dir};
use super::locks::{GcGuard, Locks, StageLock};
use super::maintenance::{GcReport, Maintenance, VerifyReport};
use super::objects::Objects;
use super::records::{Records, StageRecord};
use super::shared::{group_umask, share_folders, CacheConfig};
use super::{ArtifactId, Damage, Fingerprint};

/// A cache folder.
pub struct Cache {
    root: PathBuf,
    config: CacheConfig,
    objects: Objects,
    records: Records,
    locks: Locks,
    failures: Failures,
}

impl Cache {
    /// Opens (creating if needed) the cache at `root`.
    pub fn open(root: &Path) -> Result<Cache, CacheError> {
        fs::create_dir_all(root).map_err(at(root))?;
        let root = fs::canonicalize(root).map_err(at(root))?;
        let config = CacheConfig::load(&root)?;
        if config.shared {
            group_umask();
        }
        for sub in ["objects", "trees", "records", "locks", "tmp"] {
            ensure_dir(&root.join(sub))?;
        }
        Ok(Cache {
            config,
            objects: Objects::new(root.clone()),
            records: Records::new(&root),
            locks: Locks::new(&root),
            failures: Failures::new(&root),
            root,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Bytes this handle has read to hash files (inputs, ingested outputs,
    /// `verify`). A cached input costs none.
    pub fn hashed_bytes(&self) -> u64 {
        self.objects.hashed_bytes()
    }

    /// Id of a file or folder outside the cache (a path input), using the
    /// hash cache unless `rehash`.
    ///
    /// Blocking: reads every changed file (run it on a blocking thread).
    pub fn hash_input(&self, path: &Path, rehash: bool) -> Result<ArtifactId, CacheError> {
        self.objects.hash_input(path, rehash)
    }

    /// Persists the hash cache (call after planning or running).
    pub fn flush_hash_cache(&self) -> Result<(), CacheError> {
        self.objects.flush_hash_cache()
    }

    /// Moves a finished output (file or folder) into the store; dedups.
    ///
    /// `path` should be in a staging folder of this cache (same filesystem:
    /// blobs are hard-linked, not copied). The source is gone afterwards.
    pub fn ingest(&self, path: &Path) -> Result<ArtifactId, CacheError> {
        self.objects.ingest(path)
    }

    /// Where an artifact lives in the store (a file or a folder).
    pub fn artifact_path(&self, id: &ArtifactId) -> PathBuf {
        self.objects.artifact_path(id)
    }

    /// Whether blob `hash` is in `objects/` (no rehash).
    pub fn has_blob(&self, hash: &str) -> bool {
        self.objects.has_blob(hash)
    }

    /// `objects/ab/cdef..`, where blob `hash` lives.
    pub fn blob_path(&self, hash: &str) -> PathBuf {
        self.objects.blob_path(hash)
    }

    /// The listing of stored tree `hash` (`trees/<hash>.json`).
    pub fn tree_listing(&self, hash: &str) -> Result<Vec<u8>, CacheError> {
        self.objects.tree_listing(hash)
    }

    /// The blobs stored tree `hash` is made of (sorted, deduplicated).
    pub fn tree_blobs(&self, hash: &str) -> Result<Vec<String>, CacheError> {
        self.objects.tree_blobs(hash)
    }

    /// `downloads/` (created): partial downloads from a remote, resumed by
    /// the next pull.
    pub fn downloads_dir(&self) -> Result<PathBuf, CacheError> {
        self.objects.downloads_dir()
    }

    /// `uploads/` (created): the state of interrupted multipart uploads.
    pub fn uploads_dir(&self) -> Result<PathBuf, CacheError> {
        let dir = self.root.join("uploads");
        ensure_dir(&dir)?;
        Ok(dir)
    }

    /// Moves the file `src` (under this cache root), already checked to
    /// hash to `hash`, into `objects/`.
    pub fn adopt_blob(&self, src: &Path, hash: &str) -> Result<(), CacheError> {
        self.objects.adopt_blob(src, hash)
    }

    /// Commits tree `hash` from its listing, once every blob it names is in
    /// the store; refuses a listing that does not hash to `hash`.
    pub fn adopt_tree(&self, hash: &str, listing: &[u8]) -> Result<(), CacheError> {
        self.objects.adopt_tree(hash, listing)
    }

    /// Cheap presence check (no rehash).
    pub fn has_artifact(&self, id: &ArtifactId) -> bool {
        self.objects.has_artifact(id)
    }

    /// The record for `fp`, if one was committed.
    pub fn record(&self, fp: &Fingerprint) -> Result<Option<StageRecord>, CacheError> {
        self.records.get(fp)
    }

    /// A record whose outputs are all present: a cache hit.
    pub fn hit(&self, fp: &Fingerprint) -> Result<Option<StageRecord>, CacheError> {
        self.records.hit(fp, &self.objects)
    }

    /// Commits a record (atomically, after its outputs were ingested).
    ///
    /// Fails if an output is not in the store, so a record never points at
    /// missing outputs.
    pub fn write_record(&self, record: &StageRecord) -> Result<(), CacheError> {
        self.records.write(record, &self.objects)
    }

    /// Commits a record unless the fingerprint already has one (another run
    /// or node finished it first): returns whether this one was committed.
    pub fn commit_record(&self, record: &StageRecord) -> Result<bool, CacheError> {
        self.records.commit(record, &self.objects)
    }

    /// Notes that a run of `fp` failed (see [`FailureNote`]).
    pub fn note_failure(&self, fp: &Fingerprint, note: &FailureNote) -> Result<(), CacheError> {
        self.failures.note(fp, note)
    }

    /// The note of the last failed run of `fp`, if it has not committed since.
    pub fn failure(&self, fp: &Fingerprint) -> Option<FailureNote> {
        self.failures.get(fp)
    }

    /// Forgets `fp`'s failure (its record committed).
    pub fn clear_failure(&self, fp: &Fingerprint) -> Result<(), CacheError> {
        self.failures.clear(fp)
    }

    /// Every committed record (a corrupt one is skipped with a warning).
    pub fn records(&self) -> Result<Vec<StageRecord>, CacheError> {
        self.records.all()
    }

    /// Blocks until this process holds the lock for `fp`.
    pub fn lock_stage(&self, fp: &Fingerprint) -> Result<StageLock, CacheError> {
        self.locks.lock_stage(fp)
    }

    /// Where the record of `fp` is (or would be).
    pub fn record_path(&self, fp: &Fingerprint) -> Result<PathBuf, CacheError> {
        self.records.path(fp)
    }

    /// Keeps `gc` from running until the guard is dropped (blocks while it
    /// runs): for writing objects and then the record that reaches them
    /// without the stage's lock (a pull from a remote).
    /// Blocks until this process holds the cache's lock `name` alone
    /// (released when the file is dropped).
    pub fn hold_named_lock(&self, name: &str) -> Result<std::fs::File, CacheError> {
        self.locks.hold_named(name)
    }

    pub fn hold_off_gc(&self) -> Result<GcGuard, CacheError> {
        self.locks.hold_off_gc()
    }

    /// The lock for `fp` if nobody else holds it.
    pub fn try_lock_stage(&self, fp: &Fingerprint) -> Result<Option<StageLock>, CacheError> {
        self.locks.try_lock_stage(fp)
    }

    /// A fresh empty staging folder under `tmp/` for a run of `fp`.
    ///
    /// Take the stage lock first: `gc` removes staging folders whose
    /// fingerprint is not locked.
    pub fn staging_dir(&self, fp: &Fingerprint) -> Result<PathBuf, CacheError> {
        self.locks.staging_dir(fp)
    }

    /// The checkpoint folder of `fp` (created).
    pub fn checkpoint_dir(&self, fp: &Fingerprint) -> Result<PathBuf, CacheError> {
        let dir = self.root.join("checkpoints").join(checked_fp(fp)?);
        fs::create_dir_all(&dir).map_err(at(&dir))?;
        Ok(dir)
    }

    /// Called once `fp`'s record is committed: a rerun finds the record, so
    /// nothing resumes from its checkpoints any more and they go (they were
    /// most of a busy cache's size). `keep` (the stage's `keep_checkpoints`)
    /// marks them instead, so that `gc` keeps them too.
    pub fn retire_checkpoints(&self, fp: &Fingerprint, keep: bool) -> Result<(), CacheError> {
        let dir = self.root.join("checkpoints").join(checked_fp(fp)?);
        let result = if keep {
            fs::write(dir.join(KEEP_MARKER), b"")
        } else {
            fs::remove_dir_all(&dir)
        };
        match result {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(at(&dir)(e)),
            _ => Ok(()),
        }
    }

    /// The folder for run logs (created).
    pub fn logs_dir(&self) -> Result<PathBuf, CacheError> {
        let dir = self.root.join("logs");
        fs::create_dir_all(&dir).map_err(at(&dir))?;
        Ok(dir)
    }

    fn maintenance(&self) -> Maintenance<'_> {
        Maintenance {
            root: &self.root,
            objects: &self.objects,
            records: &self.records,
            locks: &self.locks,
        }
    }

    /// Rehashes every object and tree, checks every record's outputs.
    ///
    /// Blocking and slow on a big cache (reads every blob).
    pub fn verify(&self) -> Result<VerifyReport, CacheError> {
        self.maintenance().verify(false)
    }

    /// [`Self::verify`], then quarantines each corrupt object (into
    /// `quarantine/`) and removes every record that produced one or was
    /// built on one, directly or downstream: the next run recomputes them.
    pub fn verify_and_repair(&self) -> Result<VerifyReport, CacheError> {
        self.maintenance().verify(true)
    }

    /// Checks that the stored artifact `id` still holds what its id names,
    /// through the hash memo (a stat per file when nothing changed).
    pub fn check_artifact(&self, id: &ArtifactId) -> Result<Damage, CacheError> {
        self.objects.check_artifact(id)
    }

    /// Moves damaged objects out of the store into `quarantine/`: records on
    /// them become misses. Returns (from, to) for each move.
    pub fn quarantine(&self, damage: &Damage) -> Result<Vec<(PathBuf, PathBuf)>, CacheError> {
        self.objects.quarantine(damage)
    }

    /// Restores the read-only modes of a stored artifact whose content is
    /// intact (a stage changed its permissions).
    pub fn reseal(&self, id: &ArtifactId) -> Result<(), CacheError> {
        let path = self.artifact_path(id);
        super::seal::reseal(&path).map_err(at(&path))
    }

    /// Removes objects and trees no record reaches, and stale staging folders.
    ///
    /// Objects and trees are only collected when no stage lock is held (a
    /// running stage may have ingested outputs it has not recorded yet);
    /// otherwise only stale staging and temporary files go.
    ///
    /// Unreachable objects younger than the cache's `gc` age threshold
    /// (a day on a shared cache) are kept; [`Self::gc_min_age`] overrides it.
    pub fn gc(&self, dry_run: bool) -> Result<GcReport, CacheError> {
        self.maintenance().gc(dry_run, self.config.gc_min_age())
    }

    /// How often a running stage marks its staging folder young, so that
    /// a gc of a shared cache on another node, which judges it by age
    /// (the stage's lock may not be seen from there), leaves it: a quarter
    /// of the cache's gc age, at most an hour, at least a second. `None`
    /// on a cache without a gc age (one machine's: gc sees the lock).
    pub fn staging_heartbeat(&self) -> Option<Duration> {
        let age = self.config.gc_min_age();
        (!age.is_zero()).then(|| (age / 4).clamp(Duration::from_secs(1), Duration::from_secs(3600)))
    }

    /// [`Self::gc`], keeping unreachable objects younger than `min_age`.
    pub fn gc_min_age(&self, dry_run: bool, min_age: Duration) -> Result<GcReport, CacheError> {
        self.maintenance().gc(dry_run, min_age)
    }

    /// `cache init --shared`: marks the cache shared by a group (umask 002
    /// for whoever opens it, `gc` keeping young garbage) and makes its
    /// folders group-writable and setgid, owned by `group` when given.
    /// Returns how many folders changed.
    pub fn share(&self, group: Option<&str>) -> Result<usize, CacheError> {
        let config = CacheConfig {
            shared: true,
            ..self.config.clone()
        };
        config.save(&self.root)?;
        group_umask();
        share_folders(&self.root, group)
    }
}
