//! Content-addressed artifacts: file blobs under `objects/`, folder trees
//! under `trees/`; hashing inputs, ingesting outputs, finding both again.
use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::atomic::{atomic_write, fsync_dir, temp_owner, temp_sibling, TempOwner};
use super::error::{at, CacheError};
use super::fsutil::{ensure_dir, file_name, mark_young, read_dir_sorted};
use super::hashcache::HashCache;
use super::seal::{remove_all, seal_dirs, SEALED_FILE};
use super::tree::{is_hex64, is_lower_hex, listing, walk_files, Links};
use super::{ArtifactId, ArtifactKind};

/// The blobs and trees of one cache root, and the hash cache of its inputs.
pub(super) struct Objects {
    root: PathBuf,
    hashes: HashCache,
}

/// Entries of a store folder, sorted by name.
#[derive(Default)]
pub(super) struct Scan {
    /// (hash, path) of well-named entries.
    pub blobs: Vec<(String, PathBuf)>,
    /// Temporary files and their owner's pid.
    pub temps: Vec<(TempOwner, PathBuf)>,
    /// Anything else.
    pub strays: Vec<PathBuf>,
}

impl Objects {
    /// The objects of the cache at `root` (an existing, canonical folder).
    pub fn new(root: PathBuf) -> Objects {
        let hashes = HashCache::new(
            root.join("hashes.json"),
            root.join("locks").join("hashes.lock"),
        );
        Objects { root, hashes }
    }

    /// The cache root (canonical).
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
            for f in walk_files(&abs, Links::FollowToFiles)? {
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

    /// The blake3 hex of the store file at `path` (canonical), through the
    /// hash memo: read only when its size, mtime or inode changed since the
    /// store (or a check) last hashed it.
    pub fn memo_hash(&self, path: &Path, meta: &fs::Metadata) -> io::Result<String> {
        self.hashes.file_hash(path, meta, false)
    }

    /// Notes that the store file at `path` hashes to `hash` (the caller
    /// just hashed what it wrote there).
    pub fn remember_hash(&self, path: &Path, meta: &fs::Metadata, hash: &str) {
        self.hashes.remember(path, meta, hash);
    }

    /// The blake3 hex of the file at `path` (counted in `hashed_bytes`).
    pub fn hash_file(&self, path: &Path) -> io::Result<String> {
        File::open(path).and_then(|f| self.hashes.hash_reader(f))
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
            let files = walk_files(path, Links::Refuse)?;
            let mut entries = Vec::with_capacity(files.len());
            for f in files {
                let meta = fs::symlink_metadata(&f.path).map_err(at(&f.path))?;
                let hash = self.ingest_blob(&f.path, &meta)?;
                entries.push((f.rel, hash));
            }
            let (bytes, hash) = listing(&entries);
            self.commit_tree(&hash, &bytes, &entries)?;
            // A stage may have copied a sealed tree into its output.
            remove_all(path).map_err(at(path))?;
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
        let file_id = ArtifactId {
            kind: ArtifactKind::File,
            hash: hash.clone(),
        };
        if fs::symlink_metadata(&dst).is_ok() && !self.quarantined_if_damaged(&file_id)? {
            match mark_reused(&dst) {
                // A gc removed it meanwhile: stored anew below.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                _ => {
                    fs::remove_file(src).map_err(at(src))?;
                    return Ok(hash);
                }
            }
        }
        let shard = dst.parent().expect("blob paths have a parent");
        ensure_dir(shard)?;
        if meta.nlink() > 1 {
            // The file has other names (an op hard-linked some input into its
            // output): linking it would make the blob an inode others may write.
            copy_into_store(src, &dst, &hash)?;
        } else {
            fs::set_permissions(src, fs::Permissions::from_mode(SEALED_FILE)).map_err(at(src))?;
            file.sync_all().map_err(at(src))?;
            // A link, not a rename: it never replaces a blob that a racing
            // process committed meanwhile (trees hard-link to that inode).
            match fs::hard_link(src, &dst) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                // Another filesystem, or one that refuses the link (NFS
                // exports without hard links): the bytes are copied.
                Err(e) if matches!(e.raw_os_error(), Some(libc::EXDEV | libc::EPERM)) => {
                    copy_into_store(src, &dst, &hash)?
                }
                Err(e) => return Err(at(&dst)(e)),
            }
        }
        fsync_dir(shard).map_err(at(shard))?;
        fs::remove_file(src).map_err(at(src))?;
        // The hash is known: a later check of this blob before a stage reads
        // it costs a stat, not a read.
        if let Ok(meta) = fs::symlink_metadata(&dst) {
            self.hashes.remember(&dst, &meta, &hash);
        }
        Ok(hash)
    }

    /// Materialises `trees/<hash>/` (built in `tmp/`, renamed into place),
    /// then writes `trees/<hash>.json`, the listing: its presence commits the tree.
    pub(super) fn commit_tree(
        &self,
        hash: &str,
        bytes: &[u8],
        entries: &[(String, String)],
    ) -> Result<(), CacheError> {
        let trees = self.root.join("trees");
        let dir = self.tree_dir(hash);
        let json = self.tree_listing_path(hash);
        let tree_id = ArtifactId {
            kind: ArtifactKind::Tree,
            hash: hash.to_string(),
        };
        if json.is_file() {
            self.quarantined_if_damaged(&tree_id)?;
        }
        // A tree stored before is reused: its listing's change time (which
        // gc reads for the folder too) keeps it until the record is in.
        let listed = json.is_file()
            && !matches!(mark_reused(&json), Err(e) if e.kind() == io::ErrorKind::NotFound);
        if !dir.is_dir() {
            let tmp = temp_sibling(&self.root.join("tmp").join(format!("tree-{hash}")))
                .map_err(at(&dir))?;
            let result =
                self.materialise(&tmp, entries)
                    .and_then(|()| match fs::rename(&tmp, &dir) {
                        // Sealed once in place: renaming a folder needs
                        // write permission on it (its `..` entry changes).
                        Ok(()) => seal_dirs(&dir).map_err(at(&dir)),
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
        // Listed when it began, the listing may have been moved away since
        // (a quarantine, another node's gc): written again, or the record
        // about to name the tree would find no tree.
        if !listed || !json.is_file() {
            atomic_write(&json, bytes).map_err(at(&json))?;
        }
        Ok(())
    }

    /// Checks a stored artifact that an output is about to reuse (a stat
    /// per file through the hash memo unless it changed) and moves it to
    /// `quarantine/` if it is not what its id says, so that the output is
    /// stored anew: reused as it was, the damage would surface only at the
    /// next stage's input check, and cost this stage a rerun.
    fn quarantined_if_damaged(&self, id: &ArtifactId) -> Result<bool, CacheError> {
        let damage = self.check_artifact(id)?;
        if damage.is_clean() {
            return Ok(false);
        }
        for problem in &damage.problems {
            tracing::warn!("{problem}: quarantined, the new output is stored instead");
        }
        self.quarantine(&damage)?;
        Ok(true)
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
                // Too many links to one blob (say, the empty file), a blob of
                // another user on a shared cache that `fs.protected_hardlinks`
                // forbids linking (EPERM), another filesystem: copy it.
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EMLINK | libc::EPERM | libc::EXDEV)
                    ) =>
                {
                    fs::copy(&src, &dst).map_err(at(&dst))?;
                    fs::set_permissions(&dst, fs::Permissions::from_mode(SEALED_FILE))
                        .map_err(at(&dst))?;
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

    pub fn blob_path(&self, hash: &str) -> PathBuf {
        let objects = self.root.join("objects");
        match (hash.get(..2), hash.get(2..)) {
            (Some(shard), Some(rest)) if !rest.is_empty() => objects.join(shard).join(rest),
            _ => objects.join(hash),
        }
    }

    /// `trees/<hash>/`, the materialised folder.
    pub fn tree_dir(&self, hash: &str) -> PathBuf {
        self.root.join("trees").join(hash)
    }

    /// `trees/<hash>.json`, the listing that commits the tree.
    pub fn tree_listing_path(&self, hash: &str) -> PathBuf {
        self.root.join("trees").join(format!("{hash}.json"))
    }

    /// Where an artifact lives in the store (a file or a folder).
    pub fn artifact_path(&self, id: &ArtifactId) -> PathBuf {
        match id.kind {
            ArtifactKind::File => self.blob_path(&id.hash),
            ArtifactKind::Tree => self.tree_dir(&id.hash),
        }
    }

    /// Whether blob `hash` is in `objects/` (no rehash).
    pub fn has_blob(&self, hash: &str) -> bool {
        fs::symlink_metadata(self.blob_path(hash)).is_ok_and(|m| m.is_file())
    }

    /// Cheap presence check (no rehash).
    pub fn has_artifact(&self, id: &ArtifactId) -> bool {
        match id.kind {
            ArtifactKind::File => self.has_blob(&id.hash),
            ArtifactKind::Tree => {
                self.tree_listing_path(&id.hash).is_file() && self.tree_dir(&id.hash).is_dir()
            }
        }
    }

    pub fn scan_objects(&self) -> Result<Scan, CacheError> {
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
                if let Some(owner) = temp_owner(&name) {
                    scan.temps.push((owner, path));
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
    pub fn scan_trees(&self) -> Result<(Scan, Vec<(String, PathBuf)>), CacheError> {
        let mut scan = Scan::default();
        let mut dirs = Vec::new();
        for path in read_dir_sorted(&self.root.join("trees"))? {
            let name = file_name(&path);
            if let Some(owner) = temp_owner(&name) {
                scan.temps.push((owner, path));
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
}

/// Marks a stored object that a stage output is about to reuse as just
/// used: a chmod to its own mode changes its ctime, not its bytes. On a
/// shared cache `gc` keeps unreachable objects changed within its minimum
/// age, and one it found unreachable and old (the record that reaches it
/// not yet committed) would otherwise go under the stage. Fails with
/// `NotFound` if it went meanwhile. Another user's object cannot be
/// marked (only its owner may chmod it) and is reused as it is: copying it
/// to own it would cost a checkpoint's bytes on every reuse, against a race
/// that can only cost a rerun (the record becomes a miss, never wrong).
fn mark_reused(path: &Path) -> io::Result<()> {
    let marked = mark_young(path);
    if let Err(e) = &marked {
        tracing::debug!("{}: reused unmarked ({e})", path.display());
    }
    marked
}

/// Copies `src` to a temporary file beside `dst`, makes it read-only and
/// durable, checks that the copy is blob `hash` (a file with other names
/// may be written through one of them between its hashing and this copy),
/// then links it to `dst`; a blob already there (a racing process's) stays.
pub(super) fn copy_into_store(src: &Path, dst: &Path, hash: &str) -> Result<(), CacheError> {
    let tmp = temp_sibling(dst).map_err(at(dst))?;
    let result = (|| {
        fs::copy(src, &tmp)?;
        fs::set_permissions(&tmp, fs::Permissions::from_mode(SEALED_FILE))?;
        let copy = File::open(&tmp)?;
        let copied = blake3::Hasher::new().update_reader(&copy)?.finalize();
        if copied.to_hex().as_str() != hash {
            return Err(io::Error::other(format!(
                "{} changed while it was stored (it hashed to {hash}, its copy to {copied})",
                src.display()
            )));
        }
        copy.sync_all()?;
        match fs::hard_link(&tmp, dst) {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => Err(e),
            _ => Ok(()),
        }
    })();
    let _ = fs::remove_file(&tmp);
    result.map_err(at(dst))
}
