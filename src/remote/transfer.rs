//! Moving one blob. A download goes into `downloads/<hash>.part` (a small
//! blob streamed in order and hashed as it arrives, a large one in 8 MiB
//! ranges fetched side by side and hashed once complete) and is adopted into
//! the store only when its blake3 matches; an interrupted one is resumed from
//! the partial file. An upload goes in parts, bounded in concurrency, hashed
//! as it is read and completed only when the local blob is intact (resumed
//! from `uploads/` on S3, GCS and Azure, whose upload ids outlive the
//! process).
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::stream::{FuturesUnordered, StreamExt};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

use crate::cache::{atomic_write, Cache};

use super::error::RemoteError;
use super::store::{head_before_write, too_large, RemoteStore, ResumableUploads};

/// Part size of multipart transfers: S3's minimum is 5 MiB.
pub const PART_SIZE: u64 = 8 << 20;

/// S3's (and GCS's XML API's) most parts in one upload.
const MAX_PARTS: u64 = 10_000;

/// The part size of an upload of `size` bytes: [`PART_SIZE`], or for a
/// blob over 78 GiB (10,000 parts of 8 MiB) the least whole MiB that keeps
/// it within [`MAX_PARTS`]: part 10,001 was refused after 78 GiB sent.
pub fn upload_part_size(size: u64) -> u64 {
    const MIB: u64 = 1 << 20;
    PART_SIZE.max(size.div_ceil(MAX_PARTS).div_ceil(MIB) * MIB)
}

/// The key of blob `hash` on a remote.
pub fn blob_key(hash: &str) -> String {
    format!("objects/{}/{}", &hash[..2], &hash[2..])
}

/// One command's transfers: the progress bar, the concurrency bound, the
/// rate cap and the byte counts.
pub struct Transfer {
    bar: ProgressBar,
    jobs: usize,
    slots: Semaphore,
    max_bytes_per_s: f64,
    started: Instant,
    /// Bytes sent or received by this process.
    pub moved: AtomicU64,
    /// Bytes found already transferred by an interrupted run.
    pub resumed: AtomicU64,
}

impl Transfer {
    pub fn new(jobs: usize, max_mbps: f64, quiet: bool) -> Transfer {
        let bar = if quiet {
            ProgressBar::hidden()
        } else {
            ProgressBar::new(0)
        };
        bar.set_style(
            ProgressStyle::with_template(
                "{msg:20} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
            )
            .expect("a valid template")
            .progress_chars("=> "),
        );
        Transfer {
            bar,
            jobs: jobs.max(1),
            slots: Semaphore::new(jobs.max(1)),
            max_bytes_per_s: max_mbps * 1e6,
            started: Instant::now(),
            moved: AtomicU64::new(0),
            resumed: AtomicU64::new(0),
        }
    }

    pub fn set_message(&self, msg: &str) {
        self.bar.set_message(msg.to_string());
    }

    pub fn add_total(&self, bytes: u64) {
        self.bar.inc_length(bytes);
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }

    /// Prints a line above the bar.
    pub fn say(&self, line: &str) {
        self.bar.suspend(|| eprintln!("{line}"));
    }

    /// Counts `n` bytes read without the rate cap (a check, not a copy).
    pub fn count(&self, n: u64) {
        self.moved.fetch_add(n, Ordering::Relaxed);
        self.bar.inc(n);
    }

    fn note_resumed(&self, bytes: u64) {
        self.resumed.fetch_add(bytes, Ordering::Relaxed);
        self.bar.inc(bytes);
    }

    /// Counts `n` bytes moved, then waits as long as the rate cap asks.
    async fn moved(&self, n: u64) {
        let total = self.moved.fetch_add(n, Ordering::Relaxed) + n;
        self.bar.inc(n);
        if self.max_bytes_per_s > 0.0 {
            let due = Duration::from_secs_f64(total as f64 / self.max_bytes_per_s);
            let elapsed = self.started.elapsed();
            if due > elapsed {
                tokio::time::sleep(due - elapsed).await;
            }
        }
    }
}

/// Downloads blob `hash` into the store unless it is there, and adopts it
/// only if its blake3 is `hash`. A large blob comes in `PART_SIZE` ranges,
/// `jobs` at a time, written in place into `downloads/<hash>.part`, the
/// finished ranges noted in `downloads/<hash>.parts.json`; a small one
/// streams in order. Either way an interrupted pull is resumed by the next.
pub async fn download_blob(
    store: &dyn RemoteStore,
    remote: &str,
    cache: &Cache,
    hash: &str,
    t: &Transfer,
) -> Result<(), RemoteError> {
    if cache.has_blob(hash) {
        return Ok(());
    }
    let key = blob_key(hash);
    let store_err = |source| RemoteError::Store {
        remote: remote.to_string(),
        key: key.clone(),
        source,
    };
    let size = {
        let _slot = t.slots.acquire().await.expect("never closed");
        store.head(&key).await.map_err(store_err)?
    }
    .ok_or_else(|| RemoteError::BadRecord {
        remote: remote.to_string(),
        key: key.clone(),
        message: "missing (a record names it)".into(),
    })?;
    t.add_total(size);
    let downloads = cache.downloads_dir()?;
    let part = downloads.join(format!("{hash}.part"));
    let state = downloads.join(format!("{hash}.parts.json"));
    let io = |source| RemoteError::Io {
        path: part.clone(),
        source,
    };
    let open = || {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&part)
    };
    let file = match open() {
        // A part sealed read-only by an adoption that was killed before
        // it removed the part: begin again (every pull of the blob would
        // fail on it otherwise).
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            let _ = fs::remove_file(&state);
            fs::remove_file(&part).map_err(io)?;
            open()
        }
        opened => opened,
    }
    .map_err(io)?;
    // Two pulls of one blob take turns; the second finds it adopted.
    let mut lock = fd_lock::RwLock::new(file);
    let mut file = lock.write().map_err(io)?;
    if cache.has_blob(hash) {
        // Another pull adopted it while this one waited.
        let _ = fs::remove_file(&part);
        return Ok(());
    }
    let actual = if size > PART_SIZE {
        download_ranges(store, &key, &file, &state, size, t)
            .await
            .map_err(|e| e.into_remote(remote, &key))?;
        // Ranges arrive out of order: the file is hashed once complete, on
        // every core (it is in the page cache).
        let mut hasher = blake3::Hasher::new();
        hasher.update_mmap_rayon(&part).map_err(io)?;
        hasher.finalize().to_hex().to_string()
    } else {
        let _slot = t.slots.acquire().await.expect("never closed");
        download_in_order(store, &key, &part, &mut file, size, t)
            .await
            .map_err(|e| e.into_remote(remote, &key))?
    };
    file.sync_all().map_err(io)?;
    let _ = fs::remove_file(&state);
    if actual != hash {
        let _ = fs::remove_file(&part);
        return Err(RemoteError::Corrupt {
            remote: remote.to_string(),
            key,
            expected: hash.to_string(),
            actual,
        });
    }
    // Adopted while the lock is held: a pull waiting for it must find the
    // blob in the store, not a finished `.part` to hash again, or, for a
    // large blob whose range state is gone, to download again into the
    // inode just linked into the store.
    cache.adopt_blob(&part, hash)?;
    drop(file);
    Ok(())
}

/// Appends what `key` holds past the file's length (a prefix an earlier
/// pull left), returning the blake3 of the whole file.
async fn download_in_order(
    store: &dyn RemoteStore,
    key: &str,
    part: &Path,
    file: &mut File,
    size: u64,
    t: &Transfer,
) -> Result<String, PartError> {
    let io = |e| PartError::Io(part.to_path_buf(), e);
    let mut have = file.metadata().map_err(io)?.len();
    if have > size {
        file.set_len(0).map_err(io)?;
        have = 0;
    }
    let mut hasher = blake3::Hasher::new();
    if have > 0 {
        file.seek(SeekFrom::Start(0)).map_err(io)?;
        hasher.update_reader((&mut *file).take(have)).map_err(io)?;
        tracing::info!("{key}: resuming an interrupted download at {have} of {size} bytes");
        t.note_resumed(have);
    }
    file.seek(SeekFrom::Start(have)).map_err(io)?;
    if have < size {
        let mut stream = store.get_from(key, have).await.map_err(PartError::Store)?;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(PartError::Store)?;
            have += chunk.len() as u64;
            if have > size {
                // Not written: a server that sends more than it said would
                // otherwise fill the disk before the hash check.
                return Err(PartError::Store(too_large(format!(
                    "more bytes than the {size} its size says"
                ))));
            }
            file.write_all(&chunk).map_err(io)?;
            hasher.update(&chunk);
            t.moved(chunk.len() as u64).await;
        }
    }
    Ok(hasher.finalize().to_hex().to_string())
}

/// Which ranges of a large download are in its `.part` file.
#[derive(Debug, Serialize, Deserialize)]
struct DownloadState {
    size: u64,
    part_size: u64,
    done: Vec<bool>,
}

/// Fetches the ranges of `key` that `state` does not list as done, `jobs`
/// at a time, each written in place and made durable before it is noted.
async fn download_ranges(
    store: &dyn RemoteStore,
    key: &str,
    file: &File,
    state_path: &Path,
    size: u64,
    t: &Transfer,
) -> Result<(), PartError> {
    let io = |e| PartError::Io(state_path.to_path_buf(), e);
    let n = size.div_ceil(PART_SIZE) as usize;
    let previous: Option<DownloadState> = fs::read(state_path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .filter(|s: &DownloadState| {
            s.size == size && s.part_size == PART_SIZE && s.done.len() == n
        });
    let state = match previous {
        Some(s) => {
            let done = s.done.iter().filter(|d| **d).count();
            tracing::info!(
                "{key}: resuming an interrupted download, {done} of {n} parts already here"
            );
            s
        }
        None => {
            file.set_len(size).map_err(io)?;
            DownloadState {
                size,
                part_size: PART_SIZE,
                done: vec![false; n],
            }
        }
    };
    let range = |i: usize| {
        let start = i as u64 * PART_SIZE;
        start..(start + PART_SIZE).min(size)
    };
    for (i, _) in state.done.iter().enumerate().filter(|(_, d)| **d) {
        t.note_resumed(range(i).end - range(i).start);
    }
    let save = |s: &DownloadState| {
        atomic_write(state_path, &serde_json::to_vec(s).expect("serialises")).map_err(io)
    };
    save(&state)?;
    let todo: Vec<usize> = (0..n).filter(|i| !state.done[*i]).collect();
    let state = Mutex::new(state);
    let mut running = FuturesUnordered::new();
    let note = |index: usize| -> Result<(), PartError> {
        let mut s = state.lock().expect("not poisoned");
        s.done[index] = true;
        save(&s)
    };
    for index in todo {
        running.push(async move {
            let _slot = t.slots.acquire().await.expect("never closed");
            let r = range(index);
            let mut stream = store
                .get_range(key, r.clone())
                .await
                .map_err(PartError::Store)?;
            let mut offset = r.start;
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(PartError::Store)?;
                if offset + chunk.len() as u64 > r.end {
                    // Past its range it would overwrite the next one's bytes.
                    return Err(PartError::Store(too_large(format!(
                        "range {r:?} sent past its end"
                    ))));
                }
                file.write_all_at(&chunk, offset).map_err(io)?;
                offset += chunk.len() as u64;
                t.moved(chunk.len() as u64).await;
            }
            if offset != r.end {
                return Err(PartError::Io(
                    state_path.to_path_buf(),
                    std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        format!("{key}: range {r:?} ended at {offset}"),
                    ),
                ));
            }
            // Not synced range by range: a range noted done but lost in a
            // crash fails the final hash check, and the blob is fetched again.
            Ok(index)
        });
        while running.len() >= t.jobs {
            let Some(done) = running.next().await else {
                break;
            };
            note(done?)?;
        }
    }
    while let Some(done) = running.next().await {
        note(done?)?;
    }
    Ok(())
}

/// The state of a resumable upload, in `uploads/`.
#[derive(Debug, Serialize, Deserialize)]
struct UploadState {
    upload: String,
    size: u64,
    part_size: u64,
    /// Each part once uploaded.
    parts: Vec<Option<SentPart>>,
}

/// A part the server has: its id for `complete`, and the blake3 of the
/// bytes sent, so a resumed upload checks that the parts sent before the
/// interruption are the blob's bytes now (the blob may have been corrupt
/// then, and repaired since).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SentPart {
    id: String,
    blake3: String,
}

/// Uploads blob `hash` unless the remote has it; returns whether it did.
/// Nothing is published unless the local blob hashes to `hash`.
pub async fn upload_blob(
    store: &dyn RemoteStore,
    remote: &str,
    cache: &Cache,
    hash: &str,
    t: &Transfer,
) -> Result<bool, RemoteError> {
    let key = blob_key(hash);
    let store_err = |source| RemoteError::Store {
        remote: remote.to_string(),
        key: key.clone(),
        source,
    };
    if head_before_write(store, &key)
        .await
        .map_err(store_err)?
        .is_some()
    {
        return Ok(false);
    }
    let path = cache.blob_path(hash);
    let io = |source| RemoteError::Io {
        path: path.clone(),
        source,
    };
    let size = fs::metadata(&path).map_err(io)?.len();
    t.add_total(size);
    let corrupt = |actual: String| RemoteError::Corrupt {
        remote: format!("(local cache, not pushed to {remote})"),
        key: path.display().to_string(),
        expected: hash.to_string(),
        actual,
    };
    if size <= PART_SIZE {
        let bytes = fs::read(&path).map_err(io)?;
        let actual = blake3::hash(&bytes).to_hex().to_string();
        if actual != hash {
            return Err(corrupt(actual));
        }
        let _slot = t.slots.acquire().await.expect("never closed");
        store
            .put(&key, Bytes::from(bytes))
            .await
            .map_err(store_err)?;
        t.moved(size).await;
        return Ok(true);
    }
    let actual = match store.resumable() {
        Some(parts) => {
            let state = cache
                .uploads_dir()?
                // Keyed by where the upload goes: two remotes that differ
                // only in their endpoint are two servers.
                .join(upload_state_name(store.identity(), hash));
            upload_resumable(parts, &key, &path, size, &state, hash, t)
                .await
                .map_err(|e| e.into_remote(remote, &key))?
        }
        None => upload_streaming(store, &key, &path, hash, t)
            .await
            .map_err(|e| e.into_remote(remote, &key))?,
    };
    match actual {
        Some(actual) => Err(corrupt(actual)),
        None => Ok(true),
    }
}

/// The file, in `uploads/`, of an upload of blob `hash` to the remote of
/// `identity` ([`RemoteStore::identity`]).
fn upload_state_name(identity: &str, hash: &str) -> String {
    format!(
        "{}-{hash}.json",
        &blake3::hash(identity.as_bytes()).to_hex()[..12]
    )
}

/// Errors of the part uploads, before they name the remote.
enum PartError {
    Store(object_store::Error),
    Io(PathBuf, std::io::Error),
}

impl PartError {
    fn into_remote(self, remote: &str, key: &str) -> RemoteError {
        match self {
            PartError::Store(source) => RemoteError::Store {
                remote: remote.to_string(),
                key: key.to_string(),
                source,
            },
            PartError::Io(path, source) => RemoteError::Io { path, source },
        }
    }
}

fn read_part(file: &mut File, path: &Path, len: u64) -> Result<Vec<u8>, PartError> {
    let mut buf = vec![0u8; len as usize];
    file.read_exact(&mut buf)
        .map_err(|e| PartError::Io(path.to_path_buf(), e))?;
    Ok(buf)
}

/// A multipart upload whose id and finished parts are kept in `state`, so
/// that a rerun after an interruption sends only the missing parts.
/// `Some(actual hash)` when the local blob is not `hash` (nothing completed).
async fn upload_resumable(
    parts: &dyn ResumableUploads,
    key: &str,
    path: &Path,
    size: u64,
    state_path: &Path,
    hash: &str,
    t: &Transfer,
) -> Result<Option<String>, PartError> {
    let part_size = upload_part_size(size);
    let n = size.div_ceil(part_size) as usize;
    let previous: Option<UploadState> = fs::read(state_path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .filter(|s: &UploadState| s.size == size && s.part_size == part_size && s.parts.len() == n);
    // A part that fails on a resumed upload may mean the server dropped
    // the upload (an abort rule, a restart): its state is forgotten, so the
    // next push starts over instead of failing on the dead id for ever.
    let resumed = previous.is_some();
    let forget_if_resumed = |e: PartError| {
        if resumed {
            let _ = fs::remove_file(state_path);
        }
        e
    };
    let state = match previous {
        Some(s) => {
            let done = s.parts.iter().filter(|p| p.is_some()).count();
            tracing::info!(
                "{key}: resuming an interrupted upload, {done} of {n} parts already sent"
            );
            s
        }
        None => UploadState {
            upload: parts.create(key).await.map_err(PartError::Store)?,
            size,
            part_size,
            parts: vec![None; n],
        },
    };
    let save = |s: &UploadState| {
        atomic_write(state_path, &serde_json::to_vec(s).expect("serialises"))
            .map_err(|e| PartError::Io(state_path.to_path_buf(), e))
    };
    save(&state)?;
    let upload = state.upload.clone();
    let state = Mutex::new(state);
    let mut file = File::open(path).map_err(|e| PartError::Io(path.to_path_buf(), e))?;
    let mut hasher = blake3::Hasher::new();
    let mut running = FuturesUnordered::new();
    for index in 0..n {
        let len = part_size.min(size - index as u64 * part_size);
        let buf = read_part(&mut file, path, len)?;
        hasher.update(&buf);
        let part_hash = blake3::hash(&buf).to_hex().to_string();
        match &state.lock().expect("not poisoned").parts[index] {
            Some(sent) if sent.blake3 == part_hash => {
                t.note_resumed(len);
                continue;
            }
            // Sending a part number again replaces the server's part.
            Some(_) => tracing::warn!(
                "{key}: part {index} was sent with other bytes before the interruption; sending it again"
            ),
            None => {}
        }
        let upload = &upload;
        running.push(async move {
            // The slot is taken inside the future, which is polled while
            // this loop waits: never a wait on a slot held by itself.
            let _slot = t.slots.acquire().await.expect("never closed");
            let id = parts.put_part(key, upload, index, Bytes::from(buf)).await;
            (index, len, part_hash, id)
        });
        // Bounded: at most `jobs` parts in memory and in flight.
        while running.len() >= t.jobs {
            let Some((index, len, part_hash, id)) = running.next().await else {
                break;
            };
            finish_part(&state, index, len, part_hash, id, t, &save)
                .await
                .map_err(forget_if_resumed)?;
        }
    }
    while let Some((index, len, part_hash, id)) = running.next().await {
        finish_part(&state, index, len, part_hash, id, t, &save)
            .await
            .map_err(forget_if_resumed)?;
    }
    let actual = hasher.finalize().to_hex().to_string();
    if actual != hash {
        let _ = fs::remove_file(state_path);
        return Ok(Some(actual));
    }
    let ids: Vec<String> = state
        .into_inner()
        .expect("not poisoned")
        .parts
        .into_iter()
        .map(|p| p.expect("every part was sent").id)
        .collect();
    let done = parts.complete(key, &upload, ids).await;
    // A failed completion (say, an upload the server expired) starts over
    // next time rather than resuming a dead id.
    let _ = fs::remove_file(state_path);
    done.map_err(PartError::Store)?;
    Ok(None)
}

async fn finish_part(
    state: &Mutex<UploadState>,
    index: usize,
    len: u64,
    blake3: String,
    id: object_store::Result<String>,
    t: &Transfer,
    save: &impl Fn(&UploadState) -> Result<(), PartError>,
) -> Result<(), PartError> {
    let id = id.map_err(PartError::Store)?;
    {
        let mut s = state.lock().expect("not poisoned");
        s.parts[index] = Some(SentPart { id, blake3 });
        save(&s)?;
    }
    t.moved(len).await;
    Ok(())
}

/// A multipart upload finished in this process (a folder remote, where a
/// part cannot outlive it); aborted unless the blob hashes to `hash`.
async fn upload_streaming(
    store: &dyn RemoteStore,
    key: &str,
    path: &Path,
    hash: &str,
    t: &Transfer,
) -> Result<Option<String>, PartError> {
    let size = fs::metadata(path)
        .map_err(|e| PartError::Io(path.to_path_buf(), e))?
        .len();
    let mut upload = store.upload(key).await.map_err(PartError::Store)?;
    let mut file = File::open(path).map_err(|e| PartError::Io(path.to_path_buf(), e))?;
    let mut hasher = blake3::Hasher::new();
    let mut sent = 0;
    let part_size = upload_part_size(size);
    while sent < size {
        let len = part_size.min(size - sent);
        let buf = read_part(&mut file, path, len)?;
        hasher.update(&buf);
        let _slot = t.slots.acquire().await.expect("never closed");
        upload
            .put_part(Bytes::from(buf).into())
            .await
            .map_err(PartError::Store)?;
        t.moved(len).await;
        sent += len;
    }
    let actual = hasher.finalize().to_hex().to_string();
    if actual != hash {
        let _ = upload.abort().await;
        return Ok(Some(actual));
    }
    upload.complete().await.map_err(PartError::Store)?;
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Uploads stay within S3's 10,000 parts at any size up to its 5 TiB
    /// object limit, in 8 MiB parts up to 78 GiB.
    #[test]
    fn uploads_fit_in_ten_thousand_parts() {
        assert_eq!(upload_part_size(1 << 30), PART_SIZE);
        assert_eq!(upload_part_size(MAX_PARTS * PART_SIZE), PART_SIZE);
        for size in [MAX_PARTS * PART_SIZE + 1, 100 << 30, 5 << 40] {
            let part = upload_part_size(size);
            assert!(size.div_ceil(part) <= MAX_PARTS, "{size}: {part}");
            assert_eq!(part % (1 << 20), 0);
        }
        assert_eq!(upload_part_size(100 << 30), 11 << 20);
    }
}
