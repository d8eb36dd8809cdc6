//! The [`Cache`]: objects, trees, stage records, per-fingerprint locks.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{ArtifactId, Fingerprint, StageKey};

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: corrupt record: {message}")]
    CorruptRecord { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    Unsupported { path: PathBuf, message: String },
}

/// What the cache keeps about one finished stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageRecord {
    pub fingerprint: Fingerprint,
    pub key: StageKey,
    pub pipeline: String,
    pub stage: String,
    pub outputs: BTreeMap<String, ArtifactId>,
    pub metrics: BTreeMap<String, serde_json::Value>,
    pub duration_s: f64,
    pub engine_version: String,
    /// RFC 3339.
    pub started_at: String,
    pub finished_at: String,
}

/// An exclusive lock on one fingerprint, released on drop.
pub struct StageLock {
    _private: (),
}

#[derive(Debug, Default)]
pub struct VerifyReport {
    pub objects_checked: usize,
    pub trees_checked: usize,
    pub records_checked: usize,
    /// Human-readable description of each problem (corrupt object, missing output, ...).
    pub problems: Vec<String>,
}

#[derive(Debug, Default)]
pub struct GcReport {
    pub removed: Vec<PathBuf>,
    pub freed_bytes: u64,
    pub kept_objects: usize,
}

/// A cache folder.
pub struct Cache {
    root: PathBuf,
}

impl Cache {
    /// Opens (creating if needed) the cache at `root`.
    pub fn open(root: &Path) -> Result<Cache, CacheError> {
        todo!("{}", root.display())
    }
    pub fn root(&self) -> &Path {
        &self.root
    }
    /// Id of a file or folder outside the cache (a path input), using the
    /// hash cache unless `rehash`.
    pub fn hash_input(&self, path: &Path, rehash: bool) -> Result<ArtifactId, CacheError> {
        todo!("{} {rehash}", path.display())
    }
    /// Persists the hash cache (call after planning or running).
    pub fn flush_hash_cache(&self) -> Result<(), CacheError> {
        todo!()
    }
    /// Moves a finished output (file or folder) into the store; dedups.
    pub fn ingest(&self, path: &Path) -> Result<ArtifactId, CacheError> {
        todo!("{}", path.display())
    }
    /// Where an artifact lives in the store (a file or a folder).
    pub fn artifact_path(&self, id: &ArtifactId) -> PathBuf {
        todo!("{id}")
    }
    /// Cheap presence check (no rehash).
    pub fn has_artifact(&self, id: &ArtifactId) -> bool {
        todo!("{id}")
    }
    /// The record for `fp`, if one was committed.
    pub fn record(&self, fp: &Fingerprint) -> Result<Option<StageRecord>, CacheError> {
        todo!("{fp}")
    }
    /// A record whose outputs are all present: a cache hit.
    pub fn hit(&self, fp: &Fingerprint) -> Result<Option<StageRecord>, CacheError> {
        todo!("{fp}")
    }
    /// Commits a record (atomically, after its outputs were ingested).
    pub fn write_record(&self, record: &StageRecord) -> Result<(), CacheError> {
        todo!("{}", record.stage)
    }
    /// Every committed record.
    pub fn records(&self) -> Result<Vec<StageRecord>, CacheError> {
        todo!()
    }
    /// Blocks until this process holds the lock for `fp`.
    pub fn lock_stage(&self, fp: &Fingerprint) -> Result<StageLock, CacheError> {
        todo!("{fp}")
    }
    /// The lock for `fp` if nobody else holds it.
    pub fn try_lock_stage(&self, fp: &Fingerprint) -> Result<Option<StageLock>, CacheError> {
        todo!("{fp}")
    }
    /// A fresh empty staging folder under `tmp/` for a run of `fp`.
    pub fn staging_dir(&self, fp: &Fingerprint) -> Result<PathBuf, CacheError> {
        todo!("{fp}")
    }
    /// The checkpoint folder of `fp` (created).
    pub fn checkpoint_dir(&self, fp: &Fingerprint) -> Result<PathBuf, CacheError> {
        todo!("{fp}")
    }
    /// The folder for run logs (created).
    pub fn logs_dir(&self) -> Result<PathBuf, CacheError> {
        todo!()
    }
    /// Rehashes every object and tree, checks every record's outputs.
    pub fn verify(&self) -> Result<VerifyReport, CacheError> {
        todo!()
    }
    /// Removes objects and trees no record reaches, and stale staging folders.
    pub fn gc(&self, dry_run: bool) -> Result<GcReport, CacheError> {
        todo!("{dry_run}")
    }
}
