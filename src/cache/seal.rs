//! Permissions of the store: committed blobs are 0444 and tree folders 0555,
//! so a stage running as an ordinary user cannot change, add or remove a
//! file of the store through the input paths it is handed. Removing a sealed
//! folder (gc, repair, a staging folder holding a copied tree) unseals it first.
use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// Mode of a committed blob (and of every file of a tree).
pub(crate) const SEALED_FILE: u32 = 0o444;
/// Mode of a committed tree's folders.
pub(crate) const SEALED_DIR: u32 = 0o555;
/// Mode a folder gets back before it is emptied.
const OPEN_DIR: u32 = 0o755;

/// Makes `dir` and every folder under it read-only (files are blobs, sealed
/// when they were committed).
pub(crate) fn seal_dirs(dir: &Path) -> io::Result<()> {
    for sub in dirs_under(dir)? {
        fs::set_permissions(&sub, fs::Permissions::from_mode(SEALED_DIR))?;
    }
    Ok(())
}

/// Restores the sealed modes of a blob or tree whose content is intact (a
/// stage ran `chmod` on it).
pub(crate) fn reseal(path: &Path) -> io::Result<()> {
    let meta = fs::symlink_metadata(path)?;
    if meta.is_file() {
        return fs::set_permissions(path, fs::Permissions::from_mode(SEALED_FILE));
    }
    for sub in dirs_under(path)? {
        for entry in fs::read_dir(&sub)? {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                fs::set_permissions(entry.path(), fs::Permissions::from_mode(SEALED_FILE))?;
            }
        }
    }
    seal_dirs(path)
}

/// Gives every folder under `dir` (and `dir`) write permission back, so that
/// its entries can be removed or it can be renamed by a non-root user.
pub(crate) fn unseal_dirs(dir: &Path) -> io::Result<()> {
    // Parents first: a sealed folder cannot be listed for writing below it,
    // but it can be read, so the walk works either way; chmod needs only
    // ownership.
    for sub in dirs_under(dir)? {
        fs::set_permissions(&sub, fs::Permissions::from_mode(OPEN_DIR))?;
    }
    Ok(())
}

/// Removes a file or a whole folder, unsealing folders first. A missing
/// path is not an error.
pub fn remove_all(path: &Path) -> io::Result<()> {
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if meta.is_dir() {
        // Best effort: as root, or for folders never sealed, removal works anyway.
        let _ = unseal_dirs(path);
        fs::remove_dir_all(path)
    } else {
        fs::remove_file(path)
    }
}

/// `dir` and every folder below it (symlinks not followed).
fn dirs_under(dir: &Path) -> io::Result<Vec<std::path::PathBuf>> {
    let mut out = vec![dir.to_path_buf()];
    let mut i = 0;
    while i < out.len() {
        for entry in fs::read_dir(&out[i])? {
            let entry = entry?;
            if entry.file_type()?.is_dir() {
                out.push(entry.path());
            }
        }
        i += 1;
    }
    Ok(out)
}
