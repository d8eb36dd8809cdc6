//! Is a stored artifact still what its id says? Checked through the hash
//! memo (a stat per file unless something changed), and what is found
//! corrupt is moved out of the store into `quarantine/`, so that no record
//! can be a hit on it and no stage is fed it again.
use std::collections::{BTreeSet, HashSet};
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use super::error::{at, CacheError};
use super::fsutil::ensure_dir;
use super::objects::Objects;
use super::seal::unseal_dirs;
use super::tree::{parse_listing, walk_files, Links};
use super::{ArtifactId, ArtifactKind};

/// What is wrong with stored artifacts.
#[derive(Debug, Default, Clone)]
pub struct Damage {
    /// One line per problem, paths relative to the cache root.
    pub problems: Vec<String>,
    /// Blobs (by hash) whose bytes no longer hash to their name.
    pub corrupt_blobs: BTreeSet<String>,
    /// Trees (by hash) that are not their listing any more: a corrupt
    /// listing, a file that differs, is missing or was added.
    pub corrupt_trees: BTreeSet<String>,
}

impl Damage {
    pub fn is_clean(&self) -> bool {
        self.corrupt_blobs.is_empty() && self.corrupt_trees.is_empty()
    }

    /// The corrupt objects as artifact ids (what records name).
    pub fn ids(&self) -> BTreeSet<ArtifactId> {
        let files = self.corrupt_blobs.iter().map(|h| ArtifactId {
            kind: ArtifactKind::File,
            hash: h.clone(),
        });
        let trees = self.corrupt_trees.iter().map(|h| ArtifactId {
            kind: ArtifactKind::Tree,
            hash: h.clone(),
        });
        files.chain(trees).collect()
    }

    pub fn merge(&mut self, other: Damage) {
        self.problems.extend(other.problems);
        self.corrupt_blobs.extend(other.corrupt_blobs);
        self.corrupt_trees.extend(other.corrupt_trees);
    }
}

impl Objects {
    /// Checks that the artifact `id` in the store still holds the content
    /// its id names. Cheap for an untouched artifact: each file is a stat
    /// against the hash memo; a file whose size, mtime or inode changed is
    /// read again.
    pub fn check_artifact(&self, id: &ArtifactId) -> Result<Damage, CacheError> {
        let mut damage = Damage::default();
        match id.kind {
            ArtifactKind::File => {
                self.check_blob(&id.hash, &mut damage)?;
            }
            ArtifactKind::Tree => self.check_tree(&id.hash, &mut damage)?,
        }
        Ok(damage)
    }

    /// Whether blob `hash` hashes to its name; a missing blob is no damage
    /// here (a record on it is a miss anyway).
    fn check_blob(&self, hash: &str, damage: &mut Damage) -> Result<bool, CacheError> {
        let path = self.blob_path(hash);
        let Ok(meta) = fs::symlink_metadata(&path) else {
            return Ok(true);
        };
        let actual = self.memo_hash(&path, &meta).map_err(at(&path))?;
        if actual == hash {
            return Ok(true);
        }
        damage.problems.push(format!(
            "{}: content hash is {actual} (corrupt)",
            self.rel(&path)
        ));
        damage.corrupt_blobs.insert(hash.to_string());
        Ok(false)
    }

    fn check_tree(&self, hash: &str, damage: &mut Damage) -> Result<(), CacheError> {
        let json = self.tree_listing_path(hash);
        let dir = self.tree_dir(hash);
        let corrupt = |damage: &mut Damage, problem: String| {
            damage.problems.push(problem);
            damage.corrupt_trees.insert(hash.to_string());
        };
        let bytes = match fs::read(&json) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(at(&json)(e)),
        };
        if blake3::hash(&bytes).to_hex().as_str() != hash {
            corrupt(damage, format!("{}: listing is corrupt", self.rel(&json)));
            return Ok(());
        }
        let entries = match parse_listing(&bytes) {
            Ok(e) => e,
            Err(e) => {
                corrupt(
                    damage,
                    format!("{}: unreadable listing: {e}", self.rel(&json)),
                );
                return Ok(());
            }
        };
        for (rel, blob) in &entries {
            let path = dir.join(rel);
            let Ok(meta) = fs::symlink_metadata(&path) else {
                corrupt(
                    damage,
                    format!("{}: missing from its tree", self.rel(&path)),
                );
                continue;
            };
            // A hard link to the blob is the blob: check (and memoise) it
            // once, under the blob's own path.
            let blob_path = self.blob_path(blob);
            let is_blob = fs::symlink_metadata(&blob_path)
                .is_ok_and(|b| b.ino() == meta.ino() && b.dev() == meta.dev());
            if is_blob {
                if !self.check_blob(blob, damage)? {
                    corrupt(
                        damage,
                        format!("{}: a link to the corrupt blob {blob}", self.rel(&path)),
                    );
                }
                continue;
            }
            let actual = self.memo_hash(&path, &meta).map_err(at(&path))?;
            if actual != *blob {
                corrupt(
                    damage,
                    format!(
                        "{}: content hash is {actual}, the listing says {blob} (corrupt)",
                        self.rel(&path)
                    ),
                );
            }
        }
        let listed: HashSet<&str> = entries.iter().map(|(r, _)| r.as_str()).collect();
        for f in walk_files(&dir, Links::Refuse)? {
            if !listed.contains(f.rel.as_str()) {
                corrupt(
                    damage,
                    format!(
                        "{}: unexpected file (not in the listing)",
                        self.rel(&f.path)
                    ),
                );
            }
        }
        Ok(())
    }

    /// Moves the damaged blobs and trees out of the store into
    /// `quarantine/<time>-<pid>/` (same relative paths), where they can be
    /// inspected; returns (from, to) for each move. Records on them become
    /// misses: their stages run again.
    pub fn quarantine(&self, damage: &Damage) -> Result<Vec<(PathBuf, PathBuf)>, CacheError> {
        let stamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let dest_root = self
            .root()
            .join("quarantine")
            .join(format!("{stamp}-{}", std::process::id()));
        let mut sources: Vec<PathBuf> = Vec::new();
        for hash in &damage.corrupt_trees {
            sources.push(self.tree_dir(hash));
            sources.push(self.tree_listing_path(hash));
        }
        for hash in &damage.corrupt_blobs {
            sources.push(self.blob_path(hash));
        }
        let mut moved = Vec::new();
        for src in sources {
            let Ok(meta) = fs::symlink_metadata(&src) else {
                continue; // Already gone (another run quarantined it).
            };
            let rel = src.strip_prefix(self.root()).unwrap_or(&src);
            let dst = dest_root.join(rel);
            create_parents(self.root(), &dst)?;
            if meta.is_dir() {
                // Renaming a folder rewrites its `..`: it needs write permission.
                unseal_dirs(&src).map_err(at(&src))?;
            }
            match fs::rename(&src, &dst) {
                Ok(()) => moved.push((src, dst)),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(at(&src)(e)),
            }
        }
        Ok(moved)
    }

    /// `path` relative to the cache root, for messages.
    pub fn rel(&self, path: &Path) -> String {
        path.strip_prefix(self.root())
            .unwrap_or(path)
            .display()
            .to_string()
    }
}

/// Creates the folders between `root` and `path`'s parent.
fn create_parents(root: &Path, path: &Path) -> Result<(), CacheError> {
    let parent = path.parent().expect("quarantine paths have a parent");
    let mut missing = Vec::new();
    let mut p = parent;
    while !p.is_dir() && p != root {
        missing.push(p.to_path_buf());
        p = p.parent().expect("under the root");
    }
    for dir in missing.iter().rev() {
        ensure_dir(dir)?;
    }
    Ok(())
}
