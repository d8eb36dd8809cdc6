//! Remembers input hashes by (path, size, mtime, inode) so unchanged large
//! inputs are not rehashed on every plan. Content still decides: any change
//! of those stat fields rehashes.
//!
//! A file modified shortly before it was hashed gets no entry (git's "racy
//! clean" problem): a rewrite of the same size right after the hash could
//! keep its mtime, timestamps being as coarse as the kernel's clock tick
//! (milliseconds) or the filesystem's (up to 2 s), and the stale hash would
//! then be trusted. Such a file is hashed again next time, until it has
//! been still for [`SETTLE`].
use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use super::atomic::atomic_write;

/// Bump when the file format or the meaning of a hash changes: old files are
/// then ignored (they are only a cache).
const HASH_CACHE_VERSION: u32 = 1;

/// How long before its hashing a file must have last changed for its hash
/// to be remembered: the coarsest timestamp granularity of a common
/// filesystem (FAT's 2 s; ext4, XFS and btrfs keep the kernel's tick).
const SETTLE: std::time::Duration = std::time::Duration::from_secs(2);

/// Read size for hashing: big enough for blake3's SIMD paths to reach full
/// speed (about 1 GiB/s and more on one core).
const READ_BUF: usize = 1 << 20;

/// The stat fields that must all match for a remembered hash to be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct FileStat {
    pub size: u64,
    /// Not the ctime: hard-linking or chmod-ing an input would then rehash it.
    pub mtime_ns: i64,
    pub ino: u64,
}

impl FileStat {
    pub fn of(meta: &fs::Metadata) -> FileStat {
        FileStat {
            size: meta.len(),
            mtime_ns: meta
                .mtime()
                .saturating_mul(1_000_000_000)
                .saturating_add(meta.mtime_nsec()),
            ino: meta.ino(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Entry {
    #[serde(flatten)]
    stat: FileStat,
    /// blake3 hex of the file's bytes.
    hash: String,
}

#[derive(Debug, Default, Deserialize)]
struct OnDisk {
    version: u32,
    /// Canonical absolute path to entry.
    entries: HashMap<String, Entry>,
}

#[derive(Serialize)]
struct OnDiskRef<'a> {
    version: u32,
    entries: &'a HashMap<String, Entry>,
}

#[derive(Default)]
struct State {
    entries: HashMap<String, Entry>,
    /// Entries learnt by this handle since the last flush: only these are
    /// merged into the file, so concurrent processes lose nothing.
    dirty: HashMap<String, Entry>,
}

/// The hash cache of one `Cache` handle, loaded lazily from `hashes.json`.
pub(crate) struct HashCache {
    path: PathBuf,
    lock_path: PathBuf,
    state: Mutex<Option<State>>,
    hashed_bytes: AtomicU64,
}

impl HashCache {
    pub fn new(path: PathBuf, lock_path: PathBuf) -> HashCache {
        HashCache {
            path,
            lock_path,
            state: Mutex::new(None),
            hashed_bytes: AtomicU64::new(0),
        }
    }

    /// Bytes read for hashing by this handle.
    pub fn hashed_bytes(&self) -> u64 {
        self.hashed_bytes.load(Ordering::Relaxed)
    }

    fn with_state<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let mut guard = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let state = guard.get_or_insert_with(|| State {
            entries: read_file(&self.path),
            dirty: HashMap::new(),
        });
        f(state)
    }

    /// Hex hash of the file at the canonical path `abs` whose current
    /// metadata is `meta`; reads the file unless the cache has a hit.
    /// `rehash` ignores hits but still refreshes the entry.
    pub fn file_hash(&self, abs: &Path, meta: &fs::Metadata, rehash: bool) -> io::Result<String> {
        let key = abs.to_string_lossy().into_owned();
        let stat = FileStat::of(meta);
        if !rehash {
            let hit = self.with_state(|s| {
                s.entries
                    .get(&key)
                    .filter(|e| e.stat == stat)
                    .map(|e| e.hash.clone())
            });
            if let Some(hash) = hit {
                return Ok(hash);
            }
        }
        // The mutex is not held while hashing: planners hash inputs in parallel.
        let started = std::time::SystemTime::now();
        let file = File::open(abs)?;
        let before = FileStat::of(&file.metadata()?);
        let hash = self.hash_reader(&file)?;
        let after = FileStat::of(&file.metadata()?);
        // A file written while we read it gets no entry (its hash may mix old
        // and new bytes), nor one written just before (see the module's
        // doc); the next call hashes it again.
        if before == after && settled(after.mtime_ns, started) {
            let entry = Entry {
                stat: after,
                hash: hash.clone(),
            };
            self.with_state(|s| {
                s.entries.insert(key.clone(), entry.clone());
                s.dirty.insert(key, entry);
            });
        }
        Ok(hash)
    }

    /// Remembers that the file at the canonical path `abs`, whose metadata is
    /// `meta`, hashes to `hash` (the store learns its blobs' hashes as it
    /// writes them, so checking an input before a stage reads nothing).
    pub fn remember(&self, abs: &Path, meta: &fs::Metadata, hash: &str) {
        let key = abs.to_string_lossy().into_owned();
        let entry = Entry {
            stat: FileStat::of(meta),
            hash: hash.to_string(),
        };
        self.with_state(|s| {
            s.entries.insert(key.clone(), entry.clone());
            s.dirty.insert(key, entry);
        });
    }

    /// blake3 hex of everything `r` yields, counted in [`Self::hashed_bytes`].
    pub fn hash_reader(&self, mut r: impl Read) -> io::Result<String> {
        let mut hasher = blake3::Hasher::new();
        let mut buf = vec![0u8; READ_BUF];
        loop {
            let n = match r.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            hasher.update(&buf[..n]);
            self.hashed_bytes.fetch_add(n as u64, Ordering::Relaxed);
        }
        Ok(hasher.finalize().to_hex().to_string())
    }

    /// Merges this handle's new entries into `hashes.json` (re-read under a
    /// file lock, then written atomically).
    pub fn flush(&self) -> io::Result<()> {
        let mut guard = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let Some(state) = guard.as_mut() else {
            return Ok(());
        };
        if state.dirty.is_empty() {
            return Ok(());
        }
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&self.lock_path)?;
        lock.lock()?;
        let mut merged = read_file(&self.path);
        merged.extend(state.dirty.drain());
        let bytes = serde_json::to_vec(&OnDiskRef {
            version: HASH_CACHE_VERSION,
            entries: &merged,
        })
        .map_err(io::Error::other)?;
        atomic_write(&self.path, &bytes)?;
        drop(lock);
        state.entries = merged;
        Ok(())
    }
}

/// Whether a file last modified at `mtime_ns` (since the epoch) had been
/// still for [`SETTLE`] when its hashing `started`: a later change could
/// then not carry the same mtime. An mtime in the future never has.
fn settled(mtime_ns: i64, started: std::time::SystemTime) -> bool {
    let Ok(since_epoch) = started.duration_since(std::time::UNIX_EPOCH) else {
        return false;
    };
    let horizon = since_epoch.saturating_sub(SETTLE).as_nanos();
    i128::from(mtime_ns) < horizon as i128
}

/// The entries in `path`; an absent, unreadable or outdated file is an empty
/// cache (at worst, inputs are hashed again).
fn read_file(path: &Path) -> HashMap<String, Entry> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return HashMap::new(),
        Err(e) => {
            tracing::warn!(
                "{}: cannot read the hash cache, starting empty: {e}",
                path.display()
            );
            return HashMap::new();
        }
    };
    match serde_json::from_slice::<OnDisk>(&bytes) {
        Ok(d) if d.version == HASH_CACHE_VERSION => d.entries,
        Ok(_) => HashMap::new(),
        Err(e) => {
            tracing::warn!(
                "{}: corrupt hash cache, starting empty: {e}",
                path.display()
            );
            HashMap::new()
        }
    }
}
