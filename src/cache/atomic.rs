//! The one helper for durable writes: temp file in the destination folder,
//! write, fsync, rename, fsync the folder.
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Process-wide counter for unique temporary names (several `Cache` handles
/// and threads may write into one folder at once).
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A fresh `.{name}.tmp.{pid}-{host}.{n}` path beside `path` (`host` a
/// tag of this machine's name). The pid lets `gc` recognise leftovers of a
/// killed process of its own host; the host tag keeps it from judging
/// another node's (a Slurm job's, committing into the same cache) by a pid
/// that means nothing here.
pub(crate) fn temp_sibling(path: &Path) -> io::Result<PathBuf> {
    let dir = parent_of(path)?;
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?
        .to_string_lossy();
    let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    Ok(dir.join(format!(
        ".{name}.tmp.{}-{}.{n}",
        std::process::id(),
        host_tag()
    )))
}

/// Who wrote a temporary of [`temp_sibling`]'s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TempOwner {
    /// A process of this host (or a name from before host tags).
    Here(u32),
    /// A process of another host.
    Elsewhere,
}

/// The owner of a temporary name made by [`temp_sibling`], if it is one.
pub(crate) fn temp_owner(file_name: &str) -> Option<TempOwner> {
    if !file_name.starts_with('.') {
        return None;
    }
    let (rest, _counter) = file_name.rsplit_once('.')?;
    let (rest, owner) = rest.rsplit_once('.')?;
    if !rest.ends_with(".tmp") {
        return None;
    }
    let (pid, host) = match owner.split_once('-') {
        Some((pid, host)) => (pid, Some(host)),
        None => (owner, None),
    };
    let pid: u32 = pid.parse().ok()?;
    match host {
        Some(host) if host != host_tag() => Some(TempOwner::Elsewhere),
        _ => Some(TempOwner::Here(pid)),
    }
}

/// Eight hex digits of this machine's name (a name may hold dots and
/// dashes, which temporary names use as separators).
fn host_tag() -> &'static str {
    static TAG: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    TAG.get_or_init(|| {
        let host = super::Provenance::here(String::new(), None).host;
        blake3::hash(host.as_bytes()).to_hex()[..8].to_string()
    })
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
    fn temp_names_carry_the_pid_and_the_host() {
        let t = temp_sibling(Path::new("/x/hashes.json")).unwrap();
        let name = t.file_name().unwrap().to_str().unwrap();
        assert_eq!(temp_owner(name), Some(TempOwner::Here(std::process::id())));
        // Another host's (a Slurm job's on another node), whatever its pid.
        let elsewhere = format!(".hashes.json.tmp.{}-0123abcd.7", std::process::id());
        assert_eq!(temp_owner(&elsewhere), Some(TempOwner::Elsewhere));
        // Names from before host tags count as this host's.
        assert_eq!(
            temp_owner(".hashes.json.tmp.42.0"),
            Some(TempOwner::Here(42))
        );
        assert_eq!(temp_owner("hashes.json"), None);
        assert_eq!(temp_owner(".hidden"), None);
    }
}
