//! Did a stage change its inputs? Before it runs, the engine notes a cheap
//! fingerprint of every file and folder it is handed (size, mtime in ns,
//! inode, mode, and for a folder the same for everything under it); after it
//! ends, successful or not, it compares. Stat fields catch what permissions
//! cannot stop (a stage running as root writing into the store): a change
//! fails the stage before its record is committed.
use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// What is compared of one file or folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stat {
    is_dir: bool,
    size: u64,
    mtime_ns: i128,
    ino: u64,
    mode: u32,
}

impl Stat {
    fn of(meta: &fs::Metadata) -> Stat {
        Stat {
            is_dir: meta.is_dir(),
            // A folder's size is the filesystem's business, not its content.
            size: if meta.is_dir() { 0 } else { meta.len() },
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
            ino: meta.ino(),
            mode: meta.mode() & 0o7777,
        }
    }
}

/// The fingerprints of one stage's inputs, taken before it ran.
pub(super) struct InputSnapshot {
    /// (input name, path handed to the stage, stat of each entry under it by
    /// relative path, "" for the path itself).
    inputs: Vec<(String, PathBuf, BTreeMap<String, Stat>)>,
}

/// One input entry that changed while the stage ran.
#[derive(Debug, Clone)]
pub(super) struct InputChange {
    pub input: String,
    /// The file or folder that changed (under the input's path).
    pub path: PathBuf,
    pub what: String,
}

impl fmt::Display for InputChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}`: {} {}", self.input, self.path.display(), self.what)
    }
}

impl InputSnapshot {
    /// Notes the state of each (name, path). Blocking: one stat per file.
    pub fn take(inputs: &[(String, PathBuf)]) -> io::Result<InputSnapshot> {
        let inputs = inputs
            .iter()
            .map(|(name, path)| Ok((name.clone(), path.clone(), stat_tree(path)?)))
            .collect::<io::Result<_>>()?;
        Ok(InputSnapshot { inputs })
    }

    /// What changed since [`Self::take`], per input, in path order.
    pub fn changes(&self) -> Vec<InputChange> {
        let mut changes = Vec::new();
        for (name, root, before) in &self.inputs {
            let after = stat_tree(root).unwrap_or_default();
            let change = |rel: &str, what: String| InputChange {
                input: name.clone(),
                path: if rel.is_empty() {
                    root.clone()
                } else {
                    root.join(rel)
                },
                what,
            };
            for (rel, old) in before {
                match after.get(rel) {
                    None => changes.push(change(rel, "was removed".into())),
                    Some(new) if new != old => changes.push(change(rel, describe(old, new))),
                    Some(_) => {}
                }
            }
            for rel in after.keys().filter(|rel| !before.contains_key(*rel)) {
                changes.push(change(rel, "was added".into()));
            }
        }
        changes
    }
}

/// How an entry changed, in words.
fn describe(old: &Stat, new: &Stat) -> String {
    let mut what = Vec::new();
    if old.is_dir != new.is_dir {
        what.push("was replaced by another kind of file".to_string());
    }
    if old.size != new.size {
        what.push(format!("size {} -> {}", old.size, new.size));
    }
    if old.ino != new.ino {
        what.push("was replaced (new inode)".to_string());
    }
    if old.mtime_ns != new.mtime_ns && old.size == new.size && old.ino == new.ino {
        what.push("was written (mtime changed)".to_string());
    }
    if old.mode != new.mode {
        what.push(format!("mode {:o} -> {:o}", old.mode, new.mode));
    }
    if what.is_empty() {
        what.push("changed".to_string());
    }
    what.join(", ")
}

/// The stat of `root` ("") and of everything under it by relative path;
/// a link is its target's stat (a snapshot folder's links stand for the
/// blobs they point at, and an input given as a link to a folder or file
/// for what it points at: what the stage reads).
fn stat_tree(root: &Path) -> io::Result<BTreeMap<String, Stat>> {
    let mut out = BTreeMap::new();
    let meta = fs::metadata(root)?;
    out.insert(String::new(), Stat::of(&meta));
    if !meta.is_dir() {
        return Ok(out);
    }
    let mut stack = vec![(root.to_path_buf(), String::new())];
    while let Some((dir, prefix)) = stack.pop() {
        for entry in fs::read_dir(&dir)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let rel = if prefix.is_empty() {
                name
            } else {
                format!("{prefix}/{name}")
            };
            let mut meta = entry.metadata()?;
            if meta.file_type().is_symlink() {
                if let Ok(target) = fs::metadata(entry.path()) {
                    meta = target;
                }
            }
            if meta.is_dir() {
                stack.push((entry.path(), rel.clone()));
            }
            out.insert(rel, Stat::of(&meta));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn unchanged_inputs_have_no_changes() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("f"), "x").unwrap();
        fs::create_dir(dir.path().join("d")).unwrap();
        fs::write(dir.path().join("d/g"), "y").unwrap();
        let snap = InputSnapshot::take(&[
            ("f".into(), dir.path().join("f")),
            ("d".into(), dir.path().join("d")),
        ])
        .unwrap();
        assert!(snap.changes().is_empty());
    }

    #[test]
    fn writes_additions_removals_and_chmods_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("d");
        fs::create_dir_all(d.join("sub")).unwrap();
        fs::write(d.join("sub/a"), "a").unwrap();
        fs::write(d.join("b"), "b").unwrap();
        fs::write(d.join("c"), "c").unwrap();
        let snap = InputSnapshot::take(&[("data".into(), d.clone())]).unwrap();
        fs::write(d.join("sub/a"), "aa").unwrap();
        fs::remove_file(d.join("b")).unwrap();
        fs::write(d.join("new"), "n").unwrap();
        fs::set_permissions(d.join("c"), fs::Permissions::from_mode(0o600)).unwrap();
        let changes: Vec<String> = snap
            .changes()
            .iter()
            .filter(|c| c.path != d)
            .map(|c| c.to_string())
            .collect();
        let text = changes.join("\n");
        assert!(text.contains("sub/a size 1 -> 2"), "{text}");
        assert!(text.contains("/b was removed"), "{text}");
        assert!(text.contains("/new was added"), "{text}");
        assert!(text.contains("/c mode"), "{text}");
        assert!(changes.iter().all(|c| c.starts_with("`data`: ")), "{text}");
    }
}
