//! `verify` (rehash everything, check every record, name who uses each
//! corrupt object; `--repair` quarantines them and removes the records
//! built on them) and `gc` (remove what no record reaches, and the
//! leftovers of killed processes).
use std::collections::HashSet;
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::atomic::{temp_owner, temp_sibling, TempOwner};
use super::dependents::{Dependents, Use};
use super::error::{at, CacheError};
use super::fsutil::{file_name, read_dir_sorted};
use super::locks::Locks;
use super::objects::Objects;
use super::records::{read_record_file, Records};
use super::seal::remove_all;
use super::tree::{parse_listing, walk_files, Links};
use super::{ArtifactKind, Damage};

#[derive(Debug, Default)]
pub struct VerifyReport {
    pub objects_checked: usize,
    pub trees_checked: usize,
    pub records_checked: usize,
    /// Human-readable description of each problem (corrupt object, missing output, ...).
    pub problems: Vec<String>,
    /// For each corrupt object, one line per tree and record that uses it.
    pub uses: Vec<String>,
    /// What `--repair` did, one line per record removed or object quarantined.
    pub repaired: Vec<String>,
    /// The corrupt objects found.
    pub damage: Damage,
    /// Records with an output missing from the store (a quarantined object,
    /// say), and their stage: misses that `--repair` removes.
    pub records_missing_outputs: Vec<(PathBuf, String)>,
    /// Record files that are no record of their name (unreadable, or of
    /// another fingerprint), and why: misses that `--repair` removes.
    pub records_unusable: Vec<(PathBuf, String)>,
}

#[derive(Debug, Default)]
pub struct GcReport {
    /// Absolute paths removed (or, for a dry run, that would be removed).
    pub removed: Vec<PathBuf>,
    /// The bytes each of `removed` freed, in the same order.
    pub removed_bytes: Vec<u64>,
    pub freed_bytes: u64,
    /// File blobs kept.
    pub kept_objects: usize,
}

/// The parts of one cache that `verify` and `gc` walk.
pub(super) struct Maintenance<'a> {
    pub root: &'a Path,
    pub objects: &'a Objects,
    pub records: &'a Records,
    pub locks: &'a Locks,
}

impl Maintenance<'_> {
    /// `path` relative to the root, for messages.
    fn rel(&self, path: &Path) -> String {
        path.strip_prefix(self.root)
            .unwrap_or(path)
            .display()
            .to_string()
    }

    /// Rehashes every object and tree, checks every record's outputs, and
    /// names the trees and records that use each corrupt object. With
    /// `repair`, quarantines the corrupt objects and removes the records
    /// that produced them or were built on them.
    ///
    /// Blocking and slow on a big cache (reads every blob).
    pub fn verify(&self, repair: bool) -> Result<VerifyReport, CacheError> {
        let mut report = VerifyReport::default();
        let mut dependents = Dependents::default();
        self.verify_objects(&mut report)?;
        self.verify_trees(&mut report, &mut dependents)?;
        self.verify_records(&mut report, &mut dependents)?;
        self.name_uses(&mut report, &dependents);
        if repair {
            self.repair(&mut report, &dependents)?;
        }
        Ok(report)
    }

    /// One line per use of each corrupt object.
    fn name_uses(&self, report: &mut VerifyReport, dependents: &Dependents) {
        for id in report.damage.ids() {
            let what = match id.kind {
                ArtifactKind::File => self.rel(&self.objects.blob_path(&id.hash)),
                ArtifactKind::Tree => self.rel(&self.objects.tree_dir(&id.hash)),
            };
            for u in dependents.uses(&id) {
                report.uses.push(match u {
                    Use::InTree(tree) => format!("{what}: is a file of tree trees/{tree}"),
                    Use::OutputOf { record, output } => format!(
                        "{what}: output `{output}` of stage `{}` ({})",
                        record.1.stage,
                        self.rel(&record.0)
                    ),
                    Use::InputOf { record, input } => format!(
                        "{what}: input `{input}` of stage `{}` ({})",
                        record.1.stage,
                        self.rel(&record.0)
                    ),
                });
            }
        }
    }

    /// Removes the records on the damage first (a crash halfway leaves
    /// misses, never hits on quarantined objects), then quarantines it.
    fn repair(&self, report: &mut VerifyReport, dependents: &Dependents) -> Result<(), CacheError> {
        let mut removed = HashSet::new();
        // Each record read again before it goes: a run may have replaced it
        // since verify read it (a commit replaces a record that is no hit),
        // and the new one is not the one found on the damage.
        for (path, record) in dependents.records_to_remove(&report.damage) {
            if read_record_file(path).ok().as_ref() != Some(record) {
                continue;
            }
            remove_record(path)?;
            removed.insert(path.clone());
            report.repaired.push(format!(
                "removed record {} (stage `{}`)",
                self.rel(path),
                record.stage
            ));
        }
        // A record on a missing output is a miss already; removing it leaves
        // the cache consistent (its stage reruns either way).
        for (path, stage) in &report.records_missing_outputs {
            let still_missing = read_record_file(path)
                .is_ok_and(|r| r.outputs.values().any(|id| !self.objects.has_artifact(id)));
            if still_missing && removed.insert(path.clone()) {
                remove_record(path)?;
                report.repaired.push(format!(
                    "removed record {} (stage `{stage}`): an output is missing from the store",
                    self.rel(path)
                ));
            }
        }
        // Records that are no record of their name are misses already. Read
        // again first: a run may have replaced one with its own since (a
        // commit replaces a record that is no hit).
        for (path, why) in &report.records_unusable {
            let replaced = read_record_file(path).is_ok_and(|r| {
                path.file_stem().and_then(|s| s.to_str()) == Some(r.fingerprint.0.as_str())
                    && r.key.fingerprint() == r.fingerprint
            });
            if !replaced && removed.insert(path.clone()) {
                remove_record(path)?;
                report
                    .repaired
                    .push(format!("removed record {}: {why}", self.rel(path)));
            }
        }
        for (from, to) in self.objects.quarantine(&report.damage)? {
            report.repaired.push(format!(
                "quarantined {} -> {}",
                self.rel(&from),
                self.rel(&to)
            ));
        }
        Ok(())
    }

    fn verify_objects(&self, report: &mut VerifyReport) -> Result<(), CacheError> {
        let problems = &mut report.problems;
        let objects = self.objects.scan_objects()?;
        for path in &objects.strays {
            problems.push(format!(
                "{}: unexpected entry in objects/ (not a blob name)",
                self.rel(path)
            ));
        }
        for (hash, path) in &objects.blobs {
            report.objects_checked += 1;
            match self.objects.hash_file(path) {
                Ok(actual) if actual == *hash => {}
                Ok(actual) => {
                    problems.push(format!(
                        "{}: content hash is {actual} (corrupt)",
                        self.rel(path)
                    ));
                    report.damage.corrupt_blobs.insert(hash.clone());
                }
                Err(e) => problems.push(format!("{}: cannot read: {e}", self.rel(path))),
            }
        }
        Ok(())
    }

    fn verify_trees(
        &self,
        report: &mut VerifyReport,
        dependents: &mut Dependents,
    ) -> Result<(), CacheError> {
        let problems = &mut report.problems;
        let (listings, dirs) = self.objects.scan_trees()?;
        for path in &listings.strays {
            problems.push(format!("{}: unexpected entry in trees/", self.rel(path)));
        }
        let listed: HashSet<&str> = listings.blobs.iter().map(|(h, _)| h.as_str()).collect();
        for (hash, path) in &dirs {
            if !listed.contains(hash.as_str()) {
                problems.push(format!(
                    "{}: materialised tree without its listing trees/{hash}.json",
                    self.rel(path)
                ));
            }
        }
        for (hash, path) in &listings.blobs {
            report.trees_checked += 1;
            let before = problems.len();
            let corrupt_blobs = &report.damage.corrupt_blobs;
            let holds_corrupt_blob =
                self.verify_tree(hash, path, problems, dependents, corrupt_blobs);
            if problems.len() > before || holds_corrupt_blob {
                report.damage.corrupt_trees.insert(hash.clone());
            }
        }
        Ok(())
    }

    fn verify_records(
        &self,
        report: &mut VerifyReport,
        dependents: &mut Dependents,
    ) -> Result<(), CacheError> {
        let problems = &mut report.problems;
        for path in self.records.files()? {
            report.records_checked += 1;
            let record = match read_record_file(&path) {
                Ok(r) => r,
                Err(CacheError::CorruptRecord { message, .. }) => {
                    problems.push(format!("{}: corrupt record: {message}", self.rel(&path)));
                    report
                        .records_unusable
                        .push((path, format!("corrupt: {message}")));
                    continue;
                }
                Err(e) => {
                    problems.push(e.to_string());
                    continue;
                }
            };
            let fp = &record.fingerprint.0;
            if path.file_stem().and_then(|s| s.to_str()) != Some(fp.as_str()) {
                problems.push(format!(
                    "{}: holds the record of fingerprint {fp}",
                    self.rel(&path)
                ));
                report
                    .records_unusable
                    .push((path, format!("it holds the record of fingerprint {fp}")));
                continue;
            }
            let key_fp = record.key.fingerprint();
            if key_fp != record.fingerprint {
                problems.push(format!(
                    "{}: its key hashes to {key_fp}, not to its fingerprint {fp}",
                    self.rel(&path)
                ));
                report.records_unusable.push((
                    path,
                    format!("its key hashes to {key_fp}, not to its fingerprint"),
                ));
                continue;
            }
            let mut missing = false;
            for (name, id) in &record.outputs {
                if !self.objects.has_artifact(id) {
                    problems.push(format!(
                        "{}: output `{name}` of stage `{}` ({id}) is missing from the store",
                        self.rel(&path),
                        record.stage
                    ));
                    missing = true;
                }
            }
            if missing {
                report
                    .records_missing_outputs
                    .push((path.clone(), record.stage.clone()));
            }
            dependents.add_record(path, record);
        }
        Ok(())
    }

    /// Checks one tree, adding its problems; true when it holds a link to a
    /// blob found corrupt (the same bytes, counted once, under the blob).
    fn verify_tree(
        &self,
        hash: &str,
        json: &Path,
        problems: &mut Vec<String>,
        dependents: &mut Dependents,
        corrupt_blobs: &std::collections::BTreeSet<String>,
    ) -> bool {
        let bytes = match fs::read(json) {
            Ok(b) => b,
            Err(e) => {
                problems.push(format!("{}: cannot read: {e}", self.rel(json)));
                return false;
            }
        };
        let actual = blake3::hash(&bytes).to_hex().to_string();
        if actual != hash {
            problems.push(format!(
                "{}: listing hash is {actual} (corrupt)",
                self.rel(json)
            ));
        }
        let entries = match parse_listing(&bytes) {
            Ok(e) => e,
            Err(e) => {
                problems.push(format!("{}: unreadable listing: {e}", self.rel(json)));
                return false;
            }
        };
        dependents.add_listing(hash, &entries);
        let holds_corrupt_blob = entries.iter().any(|(_, b)| corrupt_blobs.contains(b));
        for (rel, blob) in &entries {
            if !self.objects.has_blob(blob) {
                problems.push(format!(
                    "{}: lists `{rel}` as blob {blob}, missing from objects/",
                    self.rel(json)
                ));
            }
        }
        let dir = self.objects.tree_dir(hash);
        if !dir.is_dir() {
            problems.push(format!(
                "{}: not materialised (folder missing)",
                self.rel(&dir)
            ));
            return holds_corrupt_blob;
        }
        for (rel, blob) in &entries {
            let path = dir.join(rel);
            let meta = match fs::symlink_metadata(&path) {
                Ok(m) => m,
                Err(_) => {
                    problems.push(format!(
                        "{}: missing (listed in {})",
                        self.rel(&path),
                        self.rel(json)
                    ));
                    continue;
                }
            };
            // A hard link to the blob is as good as the blob, which was
            // rehashed above; anything else is rehashed here.
            let blob_meta = fs::symlink_metadata(self.objects.blob_path(blob)).ok();
            if blob_meta.is_some_and(|b| b.ino() == meta.ino() && b.dev() == meta.dev()) {
                continue;
            }
            match self.objects.hash_file(&path) {
                Ok(actual) if actual == *blob => {}
                Ok(actual) => problems.push(format!(
                    "{}: content hash is {actual}, the listing says {blob} (corrupt)",
                    self.rel(&path)
                )),
                Err(e) => problems.push(format!("{}: cannot read: {e}", self.rel(&path))),
            }
        }
        let listed: HashSet<&str> = entries.iter().map(|(r, _)| r.as_str()).collect();
        match walk_files(&dir, Links::Refuse) {
            Ok(files) => {
                for f in files.iter().filter(|f| !listed.contains(f.rel.as_str())) {
                    problems.push(format!(
                        "{}: unexpected file (not in the listing)",
                        self.rel(&f.path)
                    ));
                }
            }
            Err(e) => problems.push(e.to_string()),
        }
        holds_corrupt_blob
    }

    /// Removes objects and trees no record reaches, stale staging folders
    /// and checkpoints nothing can resume from.
    ///
    /// Objects and trees are only collected when no stage lock is held (a
    /// running stage may have ingested outputs it has not recorded yet);
    /// otherwise only stale staging and temporary files go.
    ///
    /// Unreachable objects and trees younger than `min_age` (by their change
    /// time: ingesting or linking one sets it) are kept: on a shared cache a
    /// job on another node may have ingested them and not yet committed its
    /// record, and its lock is not visible from here.
    pub fn gc(&self, dry_run: bool, min_age: Duration) -> Result<GcReport, CacheError> {
        let mut report = GcReport::default();
        let gc_lock = self.locks.try_lock_gc()?;
        if gc_lock.is_some() {
            self.gc_store(dry_run, min_age, &mut report)?;
        } else {
            tracing::warn!(
                "stages are running on this cache: gc keeps every object and tree this time, \
                 and only removes stale staging folders"
            );
        }

        // Leftovers of atomic writes by killed processes.
        let mut temps: Vec<(TempOwner, PathBuf)> = Vec::new();
        // `uploads/`, `downloads/`: a transfer's state file being rewritten
        // when a push or pull was killed.
        let transfers = [self.root.join("uploads"), self.root.join("downloads")];
        for dir in [self.root.to_path_buf()]
            .into_iter()
            .chain(transfers)
            .into_iter()
            .chain(self.records.shards()?)
        {
            for path in read_dir_sorted(&dir)? {
                if let Some(owner) = temp_owner(&file_name(&path)) {
                    temps.push((owner, path));
                }
            }
        }
        remove_dead_temps(&temps, min_age, dry_run, &mut report);

        // On a shared cache (`min_age` over zero) a temporary or staging
        // folder may be another node's, whose pid means nothing here and
        // whose lock this node may not see: only old ones go.
        for path in read_dir_sorted(&self.root.join("tmp"))? {
            if !old_enough(&path, min_age) {
                continue;
            }
            let name = file_name(&path);
            if let Some(owner) = temp_owner(&name) {
                // A tree being materialised.
                if left_behind(owner, &path, min_age) {
                    remove(&path, dry_run, &mut report);
                }
            } else if let Some(_stage_lock) = self.locks.try_lock_staging_owner(&name)? {
                remove(&path, dry_run, &mut report);
            }
        }
        self.gc_checkpoints(dry_run, min_age, &mut report)?;
        self.gc_downloads(dry_run, &mut report)?;
        Ok(report)
    }

    /// Removes what `downloads/` holds for blobs now in the store: a part
    /// a killed adoption left linked to the blob (between the link and the
    /// unlink), or an interrupted download of a blob that arrived another
    /// way; and range states whose part is gone. A part is removed only
    /// while no pull holds its lock. Other parts stay: the next pull of
    /// their blob resumes them.
    fn gc_downloads(&self, dry_run: bool, report: &mut GcReport) -> Result<(), CacheError> {
        let downloads = self.root.join("downloads");
        for path in read_dir_sorted(&downloads)? {
            let name = file_name(&path);
            if let Some(hash) = name.strip_suffix(".parts.json") {
                if !downloads.join(format!("{hash}.part")).exists() {
                    remove(&path, dry_run, report);
                }
                continue;
            }
            let Some(hash) = name.strip_suffix(".part") else {
                continue;
            };
            let blob = self.objects.blob_path(hash);
            let (Ok(part), Ok(stored)) = (fs::symlink_metadata(&path), fs::symlink_metadata(&blob))
            else {
                continue;
            };
            // Read-only is enough for the lock, and for a sealed part.
            let Ok(file) = fs::File::open(&path) else {
                continue;
            };
            let mut lock = fd_lock::RwLock::new(file);
            let Ok(_pulls_wait) = lock.try_write() else {
                continue; // a pull is at it
            };
            let linked = part.dev() == stored.dev() && part.ino() == stored.ino();
            if dry_run {
                count_removed(report, &path, if linked { 0 } else { part.len() });
                continue;
            }
            match fs::remove_file(&path) {
                Ok(()) => count_removed(report, &path, if linked { 0 } else { part.len() }),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => tracing::warn!("{}: cannot remove: {e}", path.display()),
            }
            let _ = fs::remove_file(downloads.join(format!("{hash}.parts.json")));
        }
        Ok(())
    }

    fn gc_store(
        &self,
        dry_run: bool,
        min_age: Duration,
        report: &mut GcReport,
    ) -> Result<(), CacheError> {
        let settled = |path: &Path| old_enough(path, min_age);
        let mut files: HashSet<String> = HashSet::new();
        let mut trees: HashSet<String> = HashSet::new();
        for path in self.records.files()? {
            let record = read_record_file(&path).map_err(|e| match e {
                CacheError::CorruptRecord { path, message } => CacheError::CorruptRecord {
                    path,
                    message: format!(
                        "{message} (gc cannot tell what it keeps, so it stops: remove the record)"
                    ),
                },
                e => e,
            })?;
            for id in record.outputs.values() {
                match id.kind {
                    ArtifactKind::File => files.insert(id.hash.clone()),
                    ArtifactKind::Tree => trees.insert(id.hash.clone()),
                };
            }
        }
        for hash in &trees {
            let json = self.objects.tree_listing_path(hash);
            // A reachable tree without a readable listing is a broken record
            // (`verify` says so); its folder holds its own hard links anyway.
            if let Ok(entries) = fs::read(&json)
                .map_err(|e| e.to_string())
                .and_then(|b| parse_listing(&b))
            {
                files.extend(entries.into_iter().map(|(_, blob)| blob));
            }
        }

        // Trees first: their files are hard links, whose bytes are freed (and
        // counted) with the blob.
        let (listings, dirs) = self.objects.scan_trees()?;
        for (hash, path) in &listings.blobs {
            if !trees.contains(hash) && settled(path) {
                remove(path, dry_run, report);
            }
        }
        for (hash, path) in &dirs {
            // A reused tree's listing is what a stage marks (`mark_reused`).
            let listing = self.objects.tree_listing_path(hash);
            if !trees.contains(hash) && settled(path) && settled(&listing) {
                remove_tree_dir(path, dry_run, report);
            }
        }
        remove_dead_temps(&listings.temps, min_age, dry_run, report);

        let objects = self.objects.scan_objects()?;
        for (hash, path) in &objects.blobs {
            if files.contains(hash) || !settled(path) {
                report.kept_objects += 1;
            } else {
                remove(path, dry_run, report);
            }
        }
        remove_dead_temps(&objects.temps, min_age, dry_run, report);
        Ok(())
    }
}

/// Whether `path` last changed (its inode: content, links, modes) at least
/// `min_age` ago.
pub(super) fn old_enough(path: &Path, min_age: Duration) -> bool {
    if min_age.is_zero() {
        return true;
    }
    let Some((secs, nanos)) = change_time(path) else {
        return true;
    };
    let changed = std::time::UNIX_EPOCH + Duration::new(secs.max(0) as u64, nanos.min(999_999_999));
    changed.elapsed().is_ok_and(|age| age >= min_age)
}

/// `path`'s change time (seconds, nanoseconds) as its file server has it
/// now: `statx` with `AT_STATX_FORCE_SYNC`, as NFS answers a plain stat
/// from its attribute cache (up to a minute old), which would miss a stage
/// on another node marking the object reused. `None` if it is gone.
fn change_time(path: &Path) -> Option<(i64, u32)> {
    use std::os::unix::ffi::OsStrExt;
    let name = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: a NUL-terminated path and a zeroed buffer of statx's type.
    let mut buf: libc::statx = unsafe { std::mem::zeroed() };
    let rc = unsafe {
        libc::statx(
            libc::AT_FDCWD,
            name.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW | libc::AT_STATX_FORCE_SYNC,
            libc::STATX_CTIME,
            &mut buf,
        )
    };
    if rc == 0 {
        return Some((buf.stx_ctime.tv_sec, buf.stx_ctime.tv_nsec));
    }
    // No statx (an old kernel, a seccomp filter): the plain stat.
    let meta = fs::symlink_metadata(path).ok()?;
    Some((meta.ctime(), meta.ctime_nsec().clamp(0, 999_999_999) as u32))
}

/// Removes a record file (already gone is fine).
fn remove_record(path: &Path) -> Result<(), CacheError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(at(path)(e)),
    }
}

/// Removes the temporary files (with their owner's pid) whose owner is gone.
/// Temporaries whose writer is gone: its pid is not alive here, and on a
/// shared cache (`min_age` over zero, where the writer may be another
/// node's process) the file is old too.
fn remove_dead_temps(
    temps: &[(TempOwner, PathBuf)],
    min_age: Duration,
    dry_run: bool,
    report: &mut GcReport,
) {
    for (owner, path) in temps {
        if left_behind(*owner, path, min_age) {
            remove(path, dry_run, report);
        }
    }
}

/// How long another host's temporary stays, whatever `min_age` says: its
/// writer's pid means nothing here, and a cache need not be marked shared
/// for Slurm jobs on other nodes to commit into it.
const ELSEWHERE_MIN_AGE: Duration = Duration::from_secs(24 * 3600);

/// Whether a temporary was left by a process that is gone: one of this
/// host's that no longer runs, or another host's once a day old.
fn left_behind(owner: TempOwner, path: &Path, min_age: Duration) -> bool {
    match owner {
        TempOwner::Here(pid) => !pid_alive(pid) && old_enough(path, min_age),
        TempOwner::Elsewhere => old_enough(path, min_age.max(ELSEWHERE_MIN_AGE)),
    }
}

/// Removes a file or folder for `gc` (or only lists it, for a dry run).
/// Failures are warnings: one stubborn folder must not stop the collection.
pub(super) fn remove(path: &Path, dry_run: bool, report: &mut GcReport) {
    let Ok(meta) = fs::symlink_metadata(path) else {
        return;
    };
    let bytes = if meta.is_dir() {
        dir_size(path)
    } else {
        meta.len()
    };
    if !dry_run {
        // Tree folders are sealed read-only: `remove_all` unseals them first.
        match remove_all(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!("{}: cannot remove: {e}", path.display());
                return;
            }
        }
    }
    count_removed(report, path, bytes);
}

/// [`remove`] for a tree's folder: renamed first to a temporary name beside
/// it, so that a gc killed half-way through the removal leaves that
/// temporary (which the next gc reaps), never a partial tree under the
/// tree's own name, which a later commit of the same tree would take as
/// complete.
fn remove_tree_dir(path: &Path, dry_run: bool, report: &mut GcReport) {
    if dry_run {
        return remove(path, dry_run, report);
    }
    let bytes = dir_size(path);
    let doomed = match temp_sibling(path).and_then(|t| fs::rename(path, &t).map(|()| t)) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return,
        Err(e) => {
            tracing::warn!("{}: cannot remove: {e}", path.display());
            return;
        }
    };
    if let Err(e) = remove_all(&doomed) {
        tracing::warn!("{}: cannot remove: {e}", doomed.display());
    }
    count_removed(report, path, bytes);
}

/// Notes in `report` that `path`, which freed `bytes`, is gone.
fn count_removed(report: &mut GcReport, path: &Path, bytes: u64) {
    report.removed.push(path.to_path_buf());
    report.removed_bytes.push(bytes);
    report.freed_bytes += bytes;
}

/// Bytes that removing a folder frees: files with no other hard link.
fn dir_size(dir: &Path) -> u64 {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) if m.nlink() <= 1 => m.len(),
            _ => 0,
        })
        .sum()
}

/// Whether process `pid` exists (on this machine).
fn pid_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: signal 0 only checks that the process exists; it sends nothing.
    if unsafe { libc::kill(pid, 0) } == 0 {
        return true;
    }
    io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}
