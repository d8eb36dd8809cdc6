//! Private copies of an `exec` stage's file inputs. A shell command runs
//! with the engine's rights (often root, which file modes do not stop), so
//! each file input from the store is handed as a read-only copy in the
//! stage's staging folder: a reflink where the filesystem has them (no
//! bytes copied), else a plain copy up to [`COPY_LIMIT`]. Whatever the
//! command does to the copy, the store keeps its object. Folder inputs (and
//! files above the limit on filesystems without reflinks) stay store paths:
//! read-only there, and watched by the input guard.
use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Largest file input copied when the filesystem cannot reflink: below it a
/// copy costs well under a second; above it the store path is handed.
pub(super) const COPY_LIMIT: u64 = 256 << 20;

/// Replaces each path of `store_files` (names of file inputs that come from
/// the store) in `inputs` with a private read-only copy under
/// `staging/inputs/`. Returns the names replaced.
pub(super) fn privatise(
    inputs: &mut BTreeMap<String, PathBuf>,
    store_files: &[String],
    staging: &Path,
) -> io::Result<BTreeSet<String>> {
    let dir = staging.join("inputs");
    let mut replaced = BTreeSet::new();
    for (i, name) in store_files.iter().enumerate() {
        let Some(src) = inputs.get(name) else {
            continue;
        };
        if replaced.is_empty() {
            fs::create_dir_all(&dir)?;
        }
        // Numbered, not named after the input: input names are not file names.
        let dst = dir.join(format!("{i}"));
        if !clone_or_copy(src, &dst)? {
            continue;
        }
        fs::set_permissions(&dst, fs::Permissions::from_mode(0o444))?;
        inputs.insert(name.clone(), dst);
        replaced.insert(name.clone());
    }
    Ok(replaced)
}

/// Makes `dst` a copy of `src`: a reflink, or bytes when `src` is small
/// enough. False when neither is possible cheaply (nothing is left at `dst`).
fn clone_or_copy(src: &Path, dst: &Path) -> io::Result<bool> {
    let from = File::open(src)?;
    let to = File::create(dst)?;
    // SAFETY: FICLONE takes two open file descriptors and shares the
    // source's extents with the destination; it touches no memory of ours.
    let cloned = unsafe { libc::ioctl(to.as_raw_fd(), libc::FICLONE, from.as_raw_fd()) } == 0;
    if cloned {
        return Ok(true);
    }
    drop(to);
    if from.metadata()?.len() > COPY_LIMIT {
        fs::remove_file(dst)?;
        return Ok(false);
    }
    fs::copy(src, dst)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_inputs_become_read_only_copies() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("blob");
        fs::write(&store, "stored").unwrap();
        let staging = dir.path().join("staging");
        fs::create_dir(&staging).unwrap();
        let mut inputs = BTreeMap::from([
            ("x".to_string(), store.clone()),
            ("folder".to_string(), dir.path().to_path_buf()),
        ]);
        let replaced = privatise(&mut inputs, &["x".to_string()], &staging).unwrap();
        assert_eq!(replaced, BTreeSet::from(["x".to_string()]));
        let copy = &inputs["x"];
        assert!(copy.starts_with(&staging));
        assert_eq!(fs::read_to_string(copy).unwrap(), "stored");
        let mode = fs::metadata(copy).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o444);
        assert_eq!(inputs["folder"], dir.path());
    }
}
