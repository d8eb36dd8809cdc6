//! The [`Cache`]: objects, trees, stage records, per-fingerprint locks.
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fs::{self, File, OpenOptions, TryLockError};
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use super::atomic::{atomic_write, fsync_dir, temp_owner_pid, temp_sibling};
use super::error::{at, CacheError};
use super::fsutil::{checked_fp, ensure_dir, file_name, read_dir_sorted, valid_fp};
use super::hashcache::HashCache;
use super::tree::{is_hex64, is_lower_hex, listing, parse_listing, walk_files};
use super::{ArtifactId, ArtifactKind, Fingerprint, StageKey};

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
    /// Absolute paths removed (or, for a dry run, that would be removed).
    pub removed: Vec<PathBuf>,
    pub freed_bytes: u64,
    /// File blobs kept.
    pub kept_objects: usize,
}

/// Process-wide, so two handles on one cache never pick the same staging name.
static STAGING_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A cache folder.
pub struct Cache {
    root: PathBuf,
    hashes: HashCache,
}

impl Cache {
    /// Opens (creating if needed) the cache at `root`.
    pub fn open(root: &Path) -> Result<Cache, CacheError> {
        fs::create_dir_all(root).map_err(at(root))?;
        let root = fs::canonicalize(root).map_err(at(root))?;
        for sub in ["objects", "trees", "records", "locks", "tmp"] {
            ensure_dir(&root.join(sub))?;
        }
        let hashes = HashCache::new(
            root.join("hashes.json"),
            root.join("locks").join("hashes.lock"),
        );
        Ok(Cache { root, hashes })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Bytes this handle has read to hash files (inputs, ingested outputs,
    /// `verify`). A cached input costs none.
    pub fn hashed_bytes(&self) -> u64 {
        self.hashes.hashed_bytes()
    }

    /// Id of a file or folder outside the cache (a path input), using the
    /// hash cache unless `rehash`.
    ///
    /// Blocking: reads every changed file (run it on a blocking thread).
    pub fn hash_input(&self, path: &Path, rehash: bool) -> Result<ArtifactId, CacheError> {
        let abs = fs::canonicalize(path).map_err(at(path))?;
        let meta = fs::metadata(&abs).map_err(at(&abs))?;
        if meta.is_file() {
            let hash = self
                .hashes
                .file_hash(&abs, &meta, rehash)
                .map_err(at(&abs))?;
            Ok(ArtifactId {
                kind: ArtifactKind::File,
                hash,
            })
        } else if meta.is_dir() {
            let mut entries = Vec::new();
            for f in walk_files(&abs)? {
                let meta = fs::symlink_metadata(&f.path).map_err(at(&f.path))?;
                let hash = self
                    .hashes
                    .file_hash(&f.path, &meta, rehash)
                    .map_err(at(&f.path))?;
                entries.push((f.rel, hash));
            }
            let (_, hash) = listing(&entries);
            Ok(ArtifactId {
                kind: ArtifactKind::Tree,
                hash,
            })
        } else {
            Err(CacheError::Unsupported {
                path: abs,
                message: "not a regular file or folder".into(),
            })
        }
    }

    /// Persists the hash cache (call after planning or running).
    pub fn flush_hash_cache(&self) -> Result<(), CacheError> {
        self.hashes
            .flush()
            .map_err(at(&self.root.join("hashes.json")))
    }

    /// Moves a finished output (file or folder) into the store; dedups.
    ///
    /// `path` should be in a staging folder of this cache (same filesystem:
    /// blobs are hard-linked, not copied). The source is gone afterwards.
    pub fn ingest(&self, path: &Path) -> Result<ArtifactId, CacheError> {
        let meta = fs::symlink_metadata(path).map_err(at(path))?;
        let ft = meta.file_type();
        if ft.is_file() {
            let hash = self.ingest_blob(path, &meta)?;
            Ok(ArtifactId {
                kind: ArtifactKind::File,
                hash,
            })
        } else if ft.is_dir() {
            // Walk first: a symlink anywhere fails before anything moves.
            let files = walk_files(path)?;
            let mut entries = Vec::with_capacity(files.len());
            for f in files {
                let meta = fs::symlink_metadata(&f.path).map_err(at(&f.path))?;
                let hash = self.ingest_blob(&f.path, &meta)?;
                entries.push((f.rel, hash));
            }
            let (bytes, hash) = listing(&entries);
            self.commit_tree(&hash, &bytes, &entries)?;
            fs::remove_dir_all(path).map_err(at(path))?;
            Ok(ArtifactId {
                kind: ArtifactKind::Tree,
                hash,
            })
        } else if ft.is_symlink() {
            Err(CacheError::Unsupported {
                path: path.to_path_buf(),
                message: "a symbolic link is not an artifact".into(),
            })
        } else {
            Err(CacheError::Unsupported {
                path: path.to_path_buf(),
                message: "not a regular file or folder".into(),
            })
        }
    }

    /// Hashes `src`, then links it into `objects/` under its hash (fsync the
    /// file, link, fsync the folder) unless that blob exists, then drops `src`.
    fn ingest_blob(&self, src: &Path, meta: &fs::Metadata) -> Result<String, CacheError> {
        let file = File::open(src).map_err(at(src))?;
        let hash = self.hashes.hash_reader(&file).map_err(at(src))?;
        let dst = self.blob_path(&hash);
        if fs::symlink_metadata(&dst).is_ok() {
            fs::remove_file(src).map_err(at(src))?;
            return Ok(hash);
        }
        let shard = dst.parent().expect("blob paths have a parent");
        ensure_dir(shard)?;
        if meta.nlink() > 1 {
            // The file has other names (an op hard-linked some input into its
            // output): linking it would make the blob an inode others may write.
            copy_into_store(src, &dst)?;
        } else {
            fs::set_permissions(src, fs::Permissions::from_mode(0o444)).map_err(at(src))?;
            file.sync_all().map_err(at(src))?;
            // A link, not a rename: it never replaces a blob that a racing
            // process committed meanwhile (trees hard-link to that inode).
            match fs::hard_link(src, &dst) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) if e.kind() == io::ErrorKind::CrossesDevices => copy_into_store(src, &dst)?,
                Err(e) => return Err(at(&dst)(e)),
            }
        }
        fsync_dir(shard).map_err(at(shard))?;
        fs::remove_file(src).map_err(at(src))?;
        Ok(hash)
    }

    /// Materialises `trees/<hash>/` (built in `tmp/`, renamed into place),
    /// then writes `trees/<hash>.json`, the listing: its presence commits the tree.
    fn commit_tree(
        &self,
        hash: &str,
        bytes: &[u8],
        entries: &[(String, String)],
    ) -> Result<(), CacheError> {
        let trees = self.root.join("trees");
        let dir = trees.join(hash);
        if !dir.is_dir() {
            let tmp = temp_sibling(&self.root.join("tmp").join(format!("tree-{hash}")))
                .map_err(at(&dir))?;
            let result =
                self.materialise(&tmp, entries)
                    .and_then(|()| match fs::rename(&tmp, &dir) {
                        Ok(()) => Ok(()),
                        // Another process materialised the same tree first: keep theirs.
                        Err(_) if dir.is_dir() => {
                            let _ = fs::remove_dir_all(&tmp);
                            Ok(())
                        }
                        Err(e) => Err(at(&dir)(e)),
                    });
            if result.is_err() {
                let _ = fs::remove_dir_all(&tmp);
            }
            result?;
            fsync_dir(&trees).map_err(at(&trees))?;
        }
        let json = trees.join(format!("{hash}.json"));
        if !json.is_file() {
            atomic_write(&json, bytes).map_err(at(&json))?;
        }
        Ok(())
    }

    fn materialise(&self, tmp: &Path, entries: &[(String, String)]) -> Result<(), CacheError> {
        fs::create_dir(tmp).map_err(at(tmp))?;
        let mut dirs = BTreeSet::from([tmp.to_path_buf()]);
        for (rel, blob) in entries {
            let dst = tmp.join(rel);
            let parent = dst.parent().expect("tree files have a parent");
            if !dirs.contains(parent) {
                fs::create_dir_all(parent).map_err(at(parent))?;
                let mut p = parent;
                while dirs.insert(p.to_path_buf()) {
                    p = p.parent().expect("inside tmp");
                }
            }
            let src = self.blob_path(blob);
            match fs::hard_link(&src, &dst) {
                Ok(()) => {}
                // Too many links to one blob (say, the empty file): copy it.
                Err(e) if e.raw_os_error() == Some(libc::EMLINK) => {
                    fs::copy(&src, &dst).map_err(at(&dst))?;
                    File::open(&dst)
                        .and_then(|f| f.sync_all())
                        .map_err(at(&dst))?;
                }
                Err(e) => return Err(at(&dst)(e)),
            }
        }
        // Each new name must be durable before the rename publishes the tree.
        for d in &dirs {
            fsync_dir(d).map_err(at(d))?;
        }
        Ok(())
    }

    fn blob_path(&self, hash: &str) -> PathBuf {
        let objects = self.root.join("objects");
        match (hash.get(..2), hash.get(2..)) {
            (Some(shard), Some(rest)) if !rest.is_empty() => objects.join(shard).join(rest),
            _ => objects.join(hash),
        }
    }

    /// Where an artifact lives in the store (a file or a folder).
    pub fn artifact_path(&self, id: &ArtifactId) -> PathBuf {
        match id.kind {
            ArtifactKind::File => self.blob_path(&id.hash),
            ArtifactKind::Tree => self.root.join("trees").join(&id.hash),
        }
    }

    /// Cheap presence check (no rehash).
    pub fn has_artifact(&self, id: &ArtifactId) -> bool {
        match id.kind {
            ArtifactKind::File => {
                fs::symlink_metadata(self.blob_path(&id.hash)).is_ok_and(|m| m.is_file())
            }
            ArtifactKind::Tree => {
                let trees = self.root.join("trees");
                trees.join(format!("{}.json", id.hash)).is_file() && trees.join(&id.hash).is_dir()
            }
        }
    }

    fn record_path(&self, fp: &Fingerprint) -> Result<PathBuf, CacheError> {
        let s = checked_fp(fp)?;
        Ok(self
            .root
            .join("records")
            .join(&s[..2])
            .join(format!("{s}.json")))
    }

    /// The record for `fp`, if one was committed.
    pub fn record(&self, fp: &Fingerprint) -> Result<Option<StageRecord>, CacheError> {
        let path = self.record_path(fp)?;
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
    pub fn hit(&self, fp: &Fingerprint) -> Result<Option<StageRecord>, CacheError> {
        match self.record(fp) {
            Ok(Some(record)) => {
                if let Some((name, id)) =
                    record.outputs.iter().find(|(_, id)| !self.has_artifact(id))
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
    pub fn write_record(&self, record: &StageRecord) -> Result<(), CacheError> {
        let path = self.record_path(&record.fingerprint)?;
        for (name, id) in &record.outputs {
            if !self.has_artifact(id) {
                return Err(CacheError::Io {
                    path: self.artifact_path(id),
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
    pub fn records(&self) -> Result<Vec<StageRecord>, CacheError> {
        let mut out = Vec::new();
        for path in self.record_files()? {
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

    /// `records/ab/<fp>.json` files, sorted (temporary files left out).
    fn record_files(&self) -> Result<Vec<PathBuf>, CacheError> {
        let mut out = Vec::new();
        let records = self.root.join("records");
        for shard in read_dir_sorted(&records)? {
            if !shard.is_dir() {
                continue;
            }
            for path in read_dir_sorted(&shard)? {
                let name = file_name(&path);
                if !name.starts_with('.') && name.ends_with(".json") {
                    out.push(path);
                }
            }
        }
        Ok(out)
    }

    fn lock_file(&self, name: &str) -> Result<File, CacheError> {
        let path = self.root.join("locks").join(name);
        OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(at(&path))
    }

    fn gc_shared_lock(&self) -> Result<File, CacheError> {
        let gc = self.lock_file(GC_LOCK)?;
        gc.lock_shared()
            .map_err(at(&self.root.join("locks").join(GC_LOCK)))?;
        Ok(gc)
    }

    /// Blocks until this process holds the lock for `fp`.
    pub fn lock_stage(&self, fp: &Fingerprint) -> Result<StageLock, CacheError> {
        let name = format!("{}.lock", checked_fp(fp)?);
        let gc = self.gc_shared_lock()?;
        let file = self.lock_file(&name)?;
        file.lock()
            .map_err(at(&self.root.join("locks").join(&name)))?;
        Ok(StageLock { file, gc })
    }

    /// The lock for `fp` if nobody else holds it.
    pub fn try_lock_stage(&self, fp: &Fingerprint) -> Result<Option<StageLock>, CacheError> {
        let name = format!("{}.lock", checked_fp(fp)?);
        let gc = self.gc_shared_lock()?;
        let file = self.lock_file(&name)?;
        match file.try_lock() {
            Ok(()) => Ok(Some(StageLock { file, gc })),
            Err(TryLockError::WouldBlock) => Ok(None),
            Err(TryLockError::Error(e)) => Err(at(&self.root.join("locks").join(&name))(e)),
        }
    }

    /// A fresh empty staging folder under `tmp/` for a run of `fp`.
    ///
    /// Take the stage lock first: `gc` removes staging folders whose
    /// fingerprint is not locked.
    pub fn staging_dir(&self, fp: &Fingerprint) -> Result<PathBuf, CacheError> {
        let s = checked_fp(fp)?;
        let tmp = self.root.join("tmp");
        fs::create_dir_all(&tmp).map_err(at(&tmp))?;
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

    /// The checkpoint folder of `fp` (created).
    pub fn checkpoint_dir(&self, fp: &Fingerprint) -> Result<PathBuf, CacheError> {
        let dir = self.root.join("checkpoints").join(checked_fp(fp)?);
        fs::create_dir_all(&dir).map_err(at(&dir))?;
        Ok(dir)
    }

    /// The folder for run logs (created).
    pub fn logs_dir(&self) -> Result<PathBuf, CacheError> {
        let dir = self.root.join("logs");
        fs::create_dir_all(&dir).map_err(at(&dir))?;
        Ok(dir)
    }

    /// `path` relative to the root, for messages.
    fn rel(&self, path: &Path) -> String {
        path.strip_prefix(&self.root)
            .unwrap_or(path)
            .display()
            .to_string()
    }

    fn scan_objects(&self) -> Result<Scan, CacheError> {
        let mut scan = Scan::default();
        for shard in read_dir_sorted(&self.root.join("objects"))? {
            let shard_name = file_name(&shard);
            let is_shard = shard_name.len() == 2 && is_lower_hex(&shard_name);
            if !is_shard || !shard.is_dir() {
                scan.strays.push(shard);
                continue;
            }
            for path in read_dir_sorted(&shard)? {
                let name = file_name(&path);
                let hash = format!("{shard_name}{name}");
                if let Some(pid) = temp_owner_pid(&name) {
                    scan.temps.push((pid, path));
                } else if is_hex64(&hash) && path.is_file() {
                    scan.blobs.push((hash, path));
                } else {
                    scan.strays.push(path);
                }
            }
        }
        Ok(scan)
    }

    /// `blobs`: listings (`<hash>.json`), `dirs`: materialised trees.
    fn scan_trees(&self) -> Result<(Scan, Vec<(String, PathBuf)>), CacheError> {
        let mut scan = Scan::default();
        let mut dirs = Vec::new();
        for path in read_dir_sorted(&self.root.join("trees"))? {
            let name = file_name(&path);
            if let Some(pid) = temp_owner_pid(&name) {
                scan.temps.push((pid, path));
            } else if let Some(hash) = name
                .strip_suffix(".json")
                .filter(|h| is_hex64(h) && path.is_file())
            {
                scan.blobs.push((hash.to_string(), path));
            } else if is_hex64(&name) && path.is_dir() {
                dirs.push((name, path));
            } else {
                scan.strays.push(path);
            }
        }
        Ok((scan, dirs))
    }

    /// Rehashes every object and tree, checks every record's outputs.
    ///
    /// Blocking and slow on a big cache (reads every blob).
    pub fn verify(&self) -> Result<VerifyReport, CacheError> {
        let mut report = VerifyReport::default();
        let problems = &mut report.problems;

        let objects = self.scan_objects()?;
        for path in &objects.strays {
            problems.push(format!(
                "{}: unexpected entry in objects/ (not a blob name)",
                self.rel(path)
            ));
        }
        for (hash, path) in &objects.blobs {
            report.objects_checked += 1;
            match File::open(path).and_then(|f| self.hashes.hash_reader(f)) {
                Ok(actual) if actual == *hash => {}
                Ok(actual) => problems.push(format!(
                    "{}: content hash is {actual} (corrupt)",
                    self.rel(path)
                )),
                Err(e) => problems.push(format!("{}: cannot read: {e}", self.rel(path))),
            }
        }

        let (listings, dirs) = self.scan_trees()?;
        for path in &listings.strays {
            problems.push(format!("{}: unexpected entry in trees/", self.rel(path)));
        }
        let listed: HashSet<&str> = listings.blobs.iter().map(|(h, _)| h.as_str()).collect();
        for (hash, path) in &dirs {
            if !listed.contains(hash.as_str()) {
                problems.push(format!(
                    "{}: materialised tree without its listing trees/{hash}.json",
                    self.rel(path)
                ));
            }
        }
        for (hash, path) in &listings.blobs {
            report.trees_checked += 1;
            self.verify_tree(hash, path, problems);
        }

        for path in self.record_files()? {
            report.records_checked += 1;
            let record = match read_record_file(&path) {
                Ok(r) => r,
                Err(CacheError::CorruptRecord { message, .. }) => {
                    problems.push(format!("{}: corrupt record: {message}", self.rel(&path)));
                    continue;
                }
                Err(e) => {
                    problems.push(e.to_string());
                    continue;
                }
            };
            let fp = &record.fingerprint.0;
            if path.file_stem().and_then(|s| s.to_str()) != Some(fp.as_str()) {
                problems.push(format!(
                    "{}: holds the record of fingerprint {fp}",
                    self.rel(&path)
                ));
            }
            let key_fp = record.key.fingerprint();
            if key_fp != record.fingerprint {
                problems.push(format!(
                    "{}: its key hashes to {key_fp}, not to its fingerprint {fp}",
                    self.rel(&path)
                ));
            }
            for (name, id) in &record.outputs {
                if !self.has_artifact(id) {
                    problems.push(format!(
                        "{}: output `{name}` of stage `{}` ({id}) is missing from the store",
                        self.rel(&path),
                        record.stage
                    ));
                }
            }
        }
        Ok(report)
    }

    fn verify_tree(&self, hash: &str, json: &Path, problems: &mut Vec<String>) {
        let bytes = match fs::read(json) {
            Ok(b) => b,
            Err(e) => return problems.push(format!("{}: cannot read: {e}", self.rel(json))),
        };
        let actual = blake3::hash(&bytes).to_hex().to_string();
        if actual != hash {
            problems.push(format!(
                "{}: listing hash is {actual} (corrupt)",
                self.rel(json)
            ));
        }
        let entries = match parse_listing(&bytes) {
            Ok(e) => e,
            Err(e) => return problems.push(format!("{}: unreadable listing: {e}", self.rel(json))),
        };
        for (rel, blob) in &entries {
            if !fs::symlink_metadata(self.blob_path(blob)).is_ok_and(|m| m.is_file()) {
                problems.push(format!(
                    "{}: lists `{rel}` as blob {blob}, missing from objects/",
                    self.rel(json)
                ));
            }
        }
        let dir = self.root.join("trees").join(hash);
        if !dir.is_dir() {
            return problems.push(format!(
                "{}: not materialised (folder missing)",
                self.rel(&dir)
            ));
        }
        for (rel, blob) in &entries {
            let path = dir.join(rel);
            let meta = match fs::symlink_metadata(&path) {
                Ok(m) => m,
                Err(_) => {
                    problems.push(format!(
                        "{}: missing (listed in {})",
                        self.rel(&path),
                        self.rel(json)
                    ));
                    continue;
                }
            };
            // A hard link to the blob is as good as the blob, which was
            // rehashed above; anything else is rehashed here.
            let blob_meta = fs::symlink_metadata(self.blob_path(blob)).ok();
            if blob_meta.is_some_and(|b| b.ino() == meta.ino() && b.dev() == meta.dev()) {
                continue;
            }
            match File::open(&path).and_then(|f| self.hashes.hash_reader(f)) {
                Ok(actual) if actual == *blob => {}
                Ok(actual) => problems.push(format!(
                    "{}: content hash is {actual}, the listing says {blob} (corrupt)",
                    self.rel(&path)
                )),
                Err(e) => problems.push(format!("{}: cannot read: {e}", self.rel(&path))),
            }
        }
        let listed: HashSet<&str> = entries.iter().map(|(r, _)| r.as_str()).collect();
        match walk_files(&dir) {
            Ok(files) => {
                for f in files.iter().filter(|f| !listed.contains(f.rel.as_str())) {
                    problems.push(format!(
                        "{}: unexpected file (not in the listing)",
                        self.rel(&f.path)
                    ));
                }
            }
            Err(e) => problems.push(e.to_string()),
        }
    }

    /// Removes objects and trees no record reaches, and stale staging folders.
    ///
    /// Objects and trees are only collected when no stage lock is held (a
    /// running stage may have ingested outputs it has not recorded yet);
    /// otherwise only stale staging and temporary files go.
    pub fn gc(&self, dry_run: bool) -> Result<GcReport, CacheError> {
        let mut report = GcReport::default();
        let gc_lock = self.lock_file(GC_LOCK)?;
        let exclusive = match gc_lock.try_lock() {
            Ok(()) => true,
            Err(TryLockError::WouldBlock) => false,
            Err(TryLockError::Error(e)) => {
                return Err(at(&self.root.join("locks").join(GC_LOCK))(e))
            }
        };
        if exclusive {
            self.gc_store(dry_run, &mut report)?;
        } else {
            tracing::warn!(
                "stages are running on this cache: gc keeps every object and tree this time, \
                 and only removes stale staging folders"
            );
        }

        // Leftovers of atomic writes by killed processes.
        let mut temps: Vec<(u32, PathBuf)> = Vec::new();
        for dir in std::iter::once(self.root.clone()).chain(
            read_dir_sorted(&self.root.join("records"))?
                .into_iter()
                .filter(|p| p.is_dir()),
        ) {
            for path in read_dir_sorted(&dir)? {
                if let Some(pid) = temp_owner_pid(&file_name(&path)) {
                    temps.push((pid, path));
                }
            }
        }
        for (pid, path) in temps {
            if !pid_alive(pid) {
                remove(&path, dry_run, &mut report);
            }
        }

        for path in read_dir_sorted(&self.root.join("tmp"))? {
            let name = file_name(&path);
            if let Some(pid) = temp_owner_pid(&name) {
                // A tree being materialised.
                if !pid_alive(pid) {
                    remove(&path, dry_run, &mut report);
                }
            } else if let Some(fp) = staging_fingerprint(&name) {
                // Locked directly, not through `try_lock_stage`: that would
                // wait for the gc lock we may hold.
                let lock = self.lock_file(&format!("{fp}.lock"))?;
                if lock.try_lock().is_ok() {
                    remove(&path, dry_run, &mut report);
                }
            }
        }
        Ok(report)
    }

    fn gc_store(&self, dry_run: bool, report: &mut GcReport) -> Result<(), CacheError> {
        let mut files: HashSet<String> = HashSet::new();
        let mut trees: HashSet<String> = HashSet::new();
        for path in self.record_files()? {
            let record = read_record_file(&path).map_err(|e| match e {
                CacheError::CorruptRecord { path, message } => CacheError::CorruptRecord {
                    path,
                    message: format!(
                        "{message} (gc cannot tell what it keeps, so it stops: remove the record)"
                    ),
                },
                e => e,
            })?;
            for id in record.outputs.values() {
                match id.kind {
                    ArtifactKind::File => files.insert(id.hash.clone()),
                    ArtifactKind::Tree => trees.insert(id.hash.clone()),
                };
            }
        }
        for hash in &trees {
            let json = self.root.join("trees").join(format!("{hash}.json"));
            // A reachable tree without a readable listing is a broken record
            // (`verify` says so); its folder holds its own hard links anyway.
            if let Ok(entries) = fs::read(&json)
                .map_err(|e| e.to_string())
                .and_then(|b| parse_listing(&b))
            {
                files.extend(entries.into_iter().map(|(_, blob)| blob));
            }
        }

        // Trees first: their files are hard links, whose bytes are freed (and
        // counted) with the blob.
        let (listings, dirs) = self.scan_trees()?;
        for (hash, path) in listings.blobs.iter().chain(&dirs) {
            if !trees.contains(hash) {
                remove(path, dry_run, report);
            }
        }
        for (pid, path) in &listings.temps {
            if !pid_alive(*pid) {
                remove(path, dry_run, report);
            }
        }

        let objects = self.scan_objects()?;
        for (hash, path) in &objects.blobs {
            if files.contains(hash) {
                report.kept_objects += 1;
            } else {
                remove(path, dry_run, report);
            }
        }
        for (pid, path) in &objects.temps {
            if !pid_alive(*pid) {
                remove(path, dry_run, report);
            }
        }
        Ok(())
    }
}

const GC_LOCK: &str = "gc.lock";

/// Entries of a store folder, sorted by name.
#[derive(Default)]
struct Scan {
    /// (hash, path) of well-named entries.
    blobs: Vec<(String, PathBuf)>,
    /// Temporary files and their owner's pid.
    temps: Vec<(u32, PathBuf)>,
    /// Anything else.
    strays: Vec<PathBuf>,
}

/// Removes a file or folder for `gc` (or only lists it, for a dry run).
/// Failures are warnings: one stubborn folder must not stop the collection.
fn remove(path: &Path, dry_run: bool, report: &mut GcReport) {
    let Ok(meta) = fs::symlink_metadata(path) else {
        return;
    };
    let bytes = if meta.is_dir() {
        dir_size(path)
    } else {
        meta.len()
    };
    if !dry_run {
        let result = if meta.is_dir() {
            fs::remove_dir_all(path)
        } else {
            fs::remove_file(path)
        };
        match result {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!("{}: cannot remove: {e}", path.display());
                return;
            }
        }
    }
    report.removed.push(path.to_path_buf());
    report.freed_bytes += bytes;
}

/// Bytes that removing a folder frees: files with no other hard link.
fn dir_size(dir: &Path) -> u64 {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) if m.nlink() <= 1 => m.len(),
            _ => 0,
        })
        .sum()
}

/// Whether process `pid` exists (on this machine).
fn pid_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: signal 0 only checks that the process exists; it sends nothing.
    if unsafe { libc::kill(pid, 0) } == 0 {
        return true;
    }
    io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
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

fn parse_record(path: &Path, bytes: &[u8]) -> Result<StageRecord, CacheError> {
    serde_json::from_slice(bytes).map_err(|e| CacheError::CorruptRecord {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

fn read_record_file(path: &Path) -> Result<StageRecord, CacheError> {
    let bytes = fs::read(path).map_err(at(path))?;
    parse_record(path, &bytes)
}

/// Copies `src` to a temporary file beside `dst`, makes it read-only and
/// durable, then links it to `dst` (unless a racing process did).
fn copy_into_store(src: &Path, dst: &Path) -> Result<(), CacheError> {
    let tmp = temp_sibling(dst).map_err(at(dst))?;
    let result = (|| {
        fs::copy(src, &tmp)?;
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o444))?;
        File::open(&tmp)?.sync_all()?;
        match fs::hard_link(&tmp, dst) {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => Err(e),
            _ => Ok(()),
        }
    })();
    let _ = fs::remove_file(&tmp);
    result.map_err(at(dst))
}
