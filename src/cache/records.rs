//! Stage records: `records/ab/<fingerprint>.json`, what a finished stage
//! produced; reading, committing and listing them.
use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::atomic::{atomic_write, fsync_dir, temp_sibling};
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
    /// Where and with what it ran (absent in records of older engines).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provenance: Option<Provenance>,
}

/// Where a stage ran: not part of its result, kept to explain it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Provenance {
    /// The machine that ran the stage and committed the record.
    pub host: String,
    /// `cpu`, `cuda:N` (a slot of the local engine) or `cuda` (GPUs a
    /// cluster scheduler gave the job).
    pub device: String,
    /// The engine's version (the `alignflow` crate).
    pub engine: String,
    /// The libtorch version the worker linked, for tensor stages, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub libtorch: Option<String>,
    /// The Slurm job that ran it (`SLURM_JOB_ID`), on a cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slurm_job_id: Option<String>,
}

impl Provenance {
    /// This process's host and Slurm job, on `device`, with `libtorch`.
    pub fn here(device: String, libtorch: Option<String>) -> Provenance {
        let mut name = [0u8; 256];
        // SAFETY: the buffer is valid for its length; gethostname NUL-terminates
        // a name that fits.
        let host = if unsafe { libc::gethostname(name.as_mut_ptr().cast(), name.len()) } == 0 {
            let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
            String::from_utf8_lossy(&name[..end]).into_owned()
        } else {
            "unknown".into()
        };
        Provenance {
            host,
            device,
            engine: crate::ENGINE_VERSION.to_string(),
            libtorch,
            slurm_job_id: std::env::var("SLURM_JOB_ID").ok(),
        }
    }
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

    pub fn path(&self, fp: &Fingerprint) -> Result<PathBuf, CacheError> {
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
        self.check_outputs(record, objects)?;
        ensure_dir(path.parent().expect("records have a parent"))?;
        let bytes = serde_json::to_vec_pretty(record).expect("records serialise");
        atomic_write(&path, &bytes).map_err(at(&path))
    }

    /// Commits a record unless one exists: the first of two runs (two
    /// cluster nodes) finishing the same fingerprint wins, and the loser's
    /// record is dropped whole, never mixed in. The record is written to a
    /// temporary file, then published with `link()`, which fails when the
    /// name exists (`renameat2(RENAME_NOREPLACE)` where the filesystem
    /// refuses hard links). An existing record that is no hit (corrupt, or
    /// an output gone) is replaced, atomically: it would otherwise make
    /// its stage rerun and fail to commit on every run. So is one that
    /// lacks an output this record has (an `exec` stage declared another
    /// output since: the same command, more of what it wrote kept).
    /// Returns whether this record was committed.
    pub fn commit(&self, record: &StageRecord, objects: &Objects) -> Result<bool, CacheError> {
        let path = self.path(&record.fingerprint)?;
        self.check_outputs(record, objects)?;
        let dir = path.parent().expect("records have a parent");
        ensure_dir(dir)?;
        let bytes = serde_json::to_vec_pretty(record).expect("records serialise");
        let tmp = temp_sibling(&path).map_err(at(&path))?;
        let published = (|| {
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&tmp)?;
            io::Write::write_all(&mut f, &bytes)?;
            f.sync_all()?;
            drop(f);
            let published = match fs::hard_link(&tmp, &path) {
                Ok(()) => true,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => false,
                Err(e) if matches!(e.raw_os_error(), Some(libc::EPERM | libc::EOPNOTSUPP)) => {
                    rename_no_replace(&tmp, &path)?
                }
                Err(e) => return Err(e),
            };
            let covers = |old: &StageRecord| {
                record
                    .outputs
                    .keys()
                    .all(|name| old.outputs.contains_key(name))
            };
            if published
                || matches!(self.hit(&record.fingerprint, objects), Ok(Some(old)) if covers(&old))
            {
                return Ok(published);
            }
            tracing::warn!(
                "{}: replacing a record that is no hit (corrupt, an output is gone, or it \
                 lacks an output the stage declares now)",
                path.display()
            );
            fs::rename(&tmp, &path)?;
            Ok(true)
        })();
        let _ = fs::remove_file(&tmp);
        let published = published.map_err(at(&path))?;
        fsync_dir(dir).map_err(at(dir))?;
        Ok(published)
    }

    fn check_outputs(&self, record: &StageRecord, objects: &Objects) -> Result<(), CacheError> {
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
        Ok(())
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

/// `renameat2(from, to, RENAME_NOREPLACE)`: false when `to` exists.
fn rename_no_replace(from: &Path, to: &Path) -> io::Result<bool> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(io::Error::other);
    let (from, to) = (c(from)?, c(to)?);
    // SAFETY: two valid NUL-terminated paths, relative to the working folder.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    match rc {
        0 => Ok(true),
        _ => match io::Error::last_os_error() {
            e if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
            e => Err(e),
        },
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
