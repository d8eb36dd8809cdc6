//! Folder helpers of the store: durable folder creation, sorted listings,
//! ctime marks, and fingerprints as safe path components.
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use super::atomic::fsync_dir;
use super::error::{at, CacheError};
use super::Fingerprint;

/// Creates `dir` if needed (its parent must exist) and makes the new name
/// durable.
pub(crate) fn ensure_dir(dir: &Path) -> Result<(), CacheError> {
    match fs::create_dir(dir) {
        Ok(()) => {
            let parent = dir.parent().expect("cache folders have a parent");
            fsync_dir(parent).map_err(at(parent))
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(()),
        Err(e) => Err(at(dir)(e)),
    }
}

/// Changes `path`'s ctime, not its bytes or mode: a chmod to its own mode.
/// gc of a shared cache judges unreachable objects and staging folders by
/// ctime, so this keeps them for another minimum age.
pub fn mark_young(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mode = fs::symlink_metadata(path)?.permissions().mode() & 0o7777;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
}

pub(crate) fn read_dir_sorted(dir: &Path) -> Result<Vec<PathBuf>, CacheError> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(at(dir)(e)),
    };
    let mut out = entries
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(at(dir))?;
    out.sort();
    Ok(out)
}

pub(crate) fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

pub(crate) fn valid_fp(s: &str) -> bool {
    s.len() >= 2 && s.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// The fingerprint as a path component; refuses anything that could escape.
pub(crate) fn checked_fp(fp: &Fingerprint) -> Result<&str, CacheError> {
    if valid_fp(&fp.0) {
        Ok(&fp.0)
    } else {
        Err(CacheError::Unsupported {
            path: PathBuf::from(&fp.0),
            message: "bad fingerprint (expected hex digits)".into(),
        })
    }
}
