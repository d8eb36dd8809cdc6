//! Stage records: `records/ab/<fingerprint>.json`, what a finished stage
//! produced; reading, committing and listing them.
use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::atomic::atomic_write;
use super::error::{at, CacheError};
use super::fsutil::{checked_fp, ensure_dir, file_name, read_dir_sorted};
use super::objects::Objects;
use super::{ArtifactId, Fingerprint, StageKey};

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

/// The `records/` folder of one cache root.
pub(super) struct Records {
    dir: PathBuf,
}

impl Records {
    pub fn new(root: &Path) -> Records {
        Records {
            dir: root.join("records"),
        }
    }

    fn path(&self, fp: &Fingerprint) -> Result<PathBuf, CacheError> {
        let s = checked_fp(fp)?;
        Ok(self.dir.join(&s[..2]).join(format!("{s}.json")))
    }

    /// The record for `fp`, if one was committed.
    pub fn get(&self, fp: &Fingerprint) -> Result<Option<StageRecord>, CacheError> {
        let path = self.path(fp)?;
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(at(&path)(e)),
        };
        let record = parse_record(&path, &bytes)?;
        if record.fingerprint != *fp {
            return Err(CacheError::CorruptRecord {
                path,
                message: format!("it holds fingerprint {}", record.fingerprint),
            });
        }
        Ok(Some(record))
    }

    /// A record whose outputs are all present: a cache hit.
    pub fn hit(
        &self,
        fp: &Fingerprint,
        objects: &Objects,
    ) -> Result<Option<StageRecord>, CacheError> {
        match self.get(fp) {
            Ok(Some(record)) => {
                if let Some((name, id)) = record
                    .outputs
                    .iter()
                    .find(|(_, id)| !objects.has_artifact(id))
                {
                    tracing::debug!(fingerprint = %fp.short(), "output `{name}` ({}) is missing: a miss", id.short());
                    return Ok(None);
                }
                Ok(Some(record))
            }
            Ok(None) => Ok(None),
            Err(CacheError::CorruptRecord { path, message }) => {
                tracing::warn!(
                    "{}: corrupt record ({message}), treated as a miss",
                    path.display()
                );
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Commits a record (atomically, after its outputs were ingested).
    ///
    /// Fails if an output is not in the store, so a record never points at
    /// missing outputs.
    pub fn write(&self, record: &StageRecord, objects: &Objects) -> Result<(), CacheError> {
        let path = self.path(&record.fingerprint)?;
        for (name, id) in &record.outputs {
            if !objects.has_artifact(id) {
                return Err(CacheError::Io {
                    path: objects.artifact_path(id),
                    source: io::Error::new(
                        io::ErrorKind::NotFound,
                        format!("output `{name}` ({id}) of stage `{}` is not in the store; ingest it first", record.stage),
                    ),
                });
            }
        }
        ensure_dir(path.parent().expect("records have a parent"))?;
        let bytes = serde_json::to_vec_pretty(record).expect("records serialise");
        atomic_write(&path, &bytes).map_err(at(&path))
    }

    /// Every committed record (a corrupt one is skipped with a warning).
    pub fn all(&self) -> Result<Vec<StageRecord>, CacheError> {
        let mut out = Vec::new();
        for path in self.files()? {
            match read_record_file(&path) {
                Ok(r) => out.push(r),
                Err(CacheError::CorruptRecord { path, message }) => {
                    tracing::warn!("{}: corrupt record ({message}), skipped", path.display());
                }
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// The `records/ab/` folders, sorted.
    pub fn shards(&self) -> Result<Vec<PathBuf>, CacheError> {
        Ok(read_dir_sorted(&self.dir)?
            .into_iter()
            .filter(|p| p.is_dir())
            .collect())
    }

    /// `records/ab/<fp>.json` files, sorted (temporary files left out).
    pub fn files(&self) -> Result<Vec<PathBuf>, CacheError> {
        let mut out = Vec::new();
        for shard in self.shards()? {
            for path in read_dir_sorted(&shard)? {
                let name = file_name(&path);
                if !name.starts_with('.') && name.ends_with(".json") {
                    out.push(path);
                }
            }
        }
        Ok(out)
    }
}

fn parse_record(path: &Path, bytes: &[u8]) -> Result<StageRecord, CacheError> {
    serde_json::from_slice(bytes).map_err(|e| CacheError::CorruptRecord {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

pub(super) fn read_record_file(path: &Path) -> Result<StageRecord, CacheError> {
    let bytes = fs::read(path).map_err(at(path))?;
    parse_record(path, &bytes)
}
