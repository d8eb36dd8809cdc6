//! Objects that arrive from elsewhere (a remote cache), already checked
//! against their ids: a downloaded blob is linked into `objects/`, a tree is
//! committed from its listing once every blob it names is present.
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::atomic::fsync_dir;
use super::error::{at, CacheError};
use super::fsutil::ensure_dir;
use super::objects::{copy_into_store, Objects};
use super::seal::SEALED_FILE;
use super::tree::{is_hex64, parse_listing};

impl Objects {
    /// `downloads/`: partial downloads, kept across an interrupted pull so
    /// that the next one resumes them (outside `tmp/`, which `gc` clears).
    pub fn downloads_dir(&self) -> Result<PathBuf, CacheError> {
        let dir = self.root().join("downloads");
        ensure_dir(&dir)?;
        Ok(dir)
    }

    /// Moves the file `src` (under this cache root), whose blake3 the caller
    /// computed while writing it, into `objects/` as blob `hash`.
    pub fn adopt_blob(&self, src: &Path, hash: &str) -> Result<(), CacheError> {
        if !is_hex64(hash) {
            return Err(CacheError::Unsupported {
                path: src.to_path_buf(),
                message: format!("`{hash}` is not a blob hash"),
            });
        }
        let dst = self.blob_path(hash);
        if self.has_blob(hash) {
            fs::remove_file(src).map_err(at(src))?;
            return Ok(());
        }
        let shard = dst.parent().expect("blob paths have a parent");
        ensure_dir(shard)?;
        match fs::set_permissions(src, fs::Permissions::from_mode(SEALED_FILE)) {
            Ok(()) => {}
            // Another user's file (a pull of theirs left it, on a shared
            // cache): only its owner may seal it, so the store gets a
            // copy of this user's, checked against the hash.
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                copy_into_store(src, &dst, hash)?;
                fsync_dir(shard).map_err(at(shard))?;
                fs::remove_file(src).map_err(at(src))?;
                return Ok(());
            }
            Err(e) => return Err(at(src)(e)),
        }
        File::open(src)
            .and_then(|f| f.sync_all())
            .map_err(at(src))?;
        // A link, never a rename over an existing blob (see `ingest_blob`).
        match fs::hard_link(src, &dst) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) if e.kind() == io::ErrorKind::CrossesDevices => {
                copy_into_store(src, &dst, hash)?
            }
            Err(e) => return Err(at(&dst)(e)),
        }
        fsync_dir(shard).map_err(at(shard))?;
        fs::remove_file(src).map_err(at(src))?;
        if let Ok(meta) = fs::symlink_metadata(&dst) {
            self.remember_hash(&dst, &meta, hash);
        }
        Ok(())
    }

    /// Commits tree `hash` from its listing `bytes`, which must hash to
    /// `hash` and name only blobs already in the store.
    pub fn adopt_tree(&self, hash: &str, bytes: &[u8]) -> Result<(), CacheError> {
        let json = self.tree_listing_path(hash);
        let bad = |message: String| CacheError::Unsupported {
            path: json.clone(),
            message,
        };
        let actual = blake3::hash(bytes).to_hex();
        if actual.as_str() != hash {
            return Err(bad(format!("listing hashes to {actual}, not {hash}")));
        }
        let entries = parse_listing(bytes).map_err(bad)?;
        if let Some((rel, blob)) = entries.iter().find(|(_, b)| !self.has_blob(b)) {
            return Err(bad(format!(
                "`{rel}` needs blob {blob}, which is not in the store"
            )));
        }
        self.commit_tree(hash, bytes, &entries)
    }

    /// The listing of stored tree `hash` (`trees/<hash>.json`).
    pub fn tree_listing(&self, hash: &str) -> Result<Vec<u8>, CacheError> {
        let json = self.tree_listing_path(hash);
        fs::read(&json).map_err(at(&json))
    }

    /// The blobs tree `hash`'s listing names (sorted, deduplicated).
    pub fn tree_blobs(&self, hash: &str) -> Result<Vec<String>, CacheError> {
        let json = self.tree_listing_path(hash);
        let bytes = fs::read(&json).map_err(at(&json))?;
        let entries = parse_listing(&bytes).map_err(|message| CacheError::Unsupported {
            path: json.clone(),
            message,
        })?;
        let mut blobs: Vec<String> = entries.into_iter().map(|(_, b)| b).collect();
        blobs.sort();
        blobs.dedup();
        Ok(blobs)
    }
}
