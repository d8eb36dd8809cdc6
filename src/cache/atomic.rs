//! The one helper for durable writes: temp file in the destination folder,
//! write, fsync, rename, fsync the folder.
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Process-wide counter for unique temporary names (several `Cache` handles
/// and threads may write into one folder at once).
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A fresh `.{name}.tmp.{pid}.{n}` path beside `path`. The pid lets `gc`
/// recognise leftovers of a killed process.
pub(crate) fn temp_sibling(path: &Path) -> io::Result<PathBuf> {
    let dir = parent_of(path)?;
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?
        .to_string_lossy();
    let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    Ok(dir.join(format!(".{name}.tmp.{}.{n}", std::process::id())))
}

/// The pid in a temporary name made by [`temp_sibling`], if it is one.
pub(crate) fn temp_owner_pid(file_name: &str) -> Option<u32> {
    if !file_name.starts_with('.') {
        return None;
    }
    let (rest, _counter) = file_name.rsplit_once('.')?;
    let (rest, pid) = rest.rsplit_once('.')?;
    if !rest.ends_with(".tmp") {
        return None;
    }
    pid.parse().ok()
}

fn parent_of(path: &Path) -> io::Result<&Path> {
    match path.parent() {
        Some(p) if p.as_os_str().is_empty() => Ok(Path::new(".")),
        Some(p) => Ok(p),
        None => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "path has no parent folder",
        )),
    }
}

/// Writes `bytes` to `path` atomically: readers see the old file or the new
/// one, never a partial one, even after `kill -9` or a power cut.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = parent_of(path)?;
    let tmp = temp_sibling(path)?;
    let result = (|| {
        let mut f = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    fsync_dir(dir)
}

/// fsyncs a folder so a rename inside it is durable.
pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_content_and_leaves_no_temp_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.json");
        atomic_write(&p, b"first").unwrap();
        atomic_write(&p, b"second, longer").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"second, longer");
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, vec!["a.json".to_string()]);
    }

    #[test]
    fn temp_names_carry_the_pid() {
        let t = temp_sibling(Path::new("/x/hashes.json")).unwrap();
        let name = t.file_name().unwrap().to_str().unwrap();
        assert_eq!(temp_owner_pid(name), Some(std::process::id()));
        assert_eq!(temp_owner_pid("hashes.json"), None);
        assert_eq!(temp_owner_pid(".hidden"), None);
    }
}
