//! Folder artifacts: walking a folder into sorted relative paths, and the
//! canonical listing whose blake3 hash is the tree id.
use std::fs;
use std::path::{Path, PathBuf};

use super::error::{at, CacheError};

/// One file of a folder: its relative path ('/' separators) and where it is.
pub(crate) struct TreeFile {
    pub rel: String,
    pub path: PathBuf,
}

/// What a walk does with a symbolic link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Links {
    /// An error: stage outputs and the store hold no links.
    Refuse,
    /// A link to a file stands for that file (its content is hashed): a
    /// Hugging Face snapshot folder is links into `blobs/`. Links to
    /// folders are still refused (they can loop).
    FollowToFiles,
}

/// Every regular file under `root`, sorted by relative path. Empty folders
/// are not part of a tree; special files are unsupported, and so are
/// symlinks unless `links` follows them.
pub(crate) fn walk_files(root: &Path, links: Links) -> Result<Vec<TreeFile>, CacheError> {
    let mut out = Vec::new();
    let mut stack = vec![(root.to_path_buf(), String::new())];
    while let Some((dir, prefix)) = stack.pop() {
        let entries = fs::read_dir(&dir).map_err(at(&dir))?;
        for entry in entries {
            let entry = entry.map_err(at(&dir))?;
            let path = entry.path();
            let Ok(name) = entry.file_name().into_string() else {
                return Err(CacheError::Unsupported {
                    path,
                    message: "file name is not UTF-8".into(),
                });
            };
            let rel = if prefix.is_empty() {
                name
            } else {
                format!("{prefix}/{name}")
            };
            let ft = entry.file_type().map_err(at(&path))?;
            if ft.is_symlink() {
                let target = match links {
                    Links::FollowToFiles => fs::canonicalize(&path).ok().filter(|t| t.is_file()),
                    Links::Refuse => None,
                };
                let Some(target) = target else {
                    let message = match links {
                        Links::Refuse => "symbolic links are not supported inside an artifact",
                        Links::FollowToFiles => {
                            "a symbolic link to a folder, or a broken one, is not followed"
                        }
                    };
                    return Err(CacheError::Unsupported {
                        path,
                        message: message.into(),
                    });
                };
                out.push(TreeFile { rel, path: target });
            } else if ft.is_dir() {
                stack.push((path, rel));
            } else if ft.is_file() {
                out.push(TreeFile { rel, path });
            } else {
                return Err(CacheError::Unsupported {
                    path,
                    message: "not a regular file or folder (sockets, fifos and devices are not artifacts)".into(),
                });
            }
        }
    }
    out.sort_by(|a, b| a.rel.cmp(&b.rel));
    Ok(out)
}

/// The canonical listing `[["rel/path","<blob hex>"],...]` (entries sorted by
/// path) and its blake3 hex, the tree hash.
pub(crate) fn listing(entries: &[(String, String)]) -> (Vec<u8>, String) {
    let bytes = serde_json::to_vec(entries).expect("a listing serialises");
    let hash = blake3::hash(&bytes).to_hex().to_string();
    (bytes, hash)
}

/// Parses a tree listing (`[["rel/path","<blob hex>"],...]`), checking its
/// hashes and relative paths.
pub fn parse_listing(bytes: &[u8]) -> Result<Vec<(String, String)>, String> {
    let entries: Vec<(String, String)> =
        serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    for (rel, hash) in &entries {
        if !is_hex64(hash) {
            return Err(format!("`{rel}` has a bad blob hash `{hash}`"));
        }
        if rel.is_empty()
            || rel.starts_with('/')
            || rel
                .split('/')
                .any(|c| c.is_empty() || c == "." || c == "..")
        {
            return Err(format!("bad relative path `{rel}`"));
        }
    }
    Ok(entries)
}

pub(crate) fn is_hex64(s: &str) -> bool {
    s.len() == 64 && is_lower_hex(s)
}

/// Only the digits a blake3 hex string uses.
pub(crate) fn is_lower_hex(s: &str) -> bool {
    s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}
