//! The content-addressed store (docs/DESIGN.md section 4).
//!
//! Layout under the cache root:
//! - `objects/ab/cdef..`: file blobs named by their blake3 hash, read-only;
//! - `trees/<hash>/`: folder artifacts, materialised with hard links to blobs,
//!   their folders read-only (0555) like the blobs (0444);
//!   `trees/<hash>.json` their listing (sorted relative paths and file hashes);
//! - `records/ab/<fingerprint>.json`: one [`StageRecord`] per fingerprint;
//! - `locks/<fingerprint>.lock`: per-fingerprint locks;
//! - `tmp/`: staging folders (outputs of running stages), `logs/`: run logs,
//!   `checkpoints/<fingerprint>/`: resumable state (removed when the record
//!   commits), `hashes.json`: the hash cache.
//! - `failures/<fingerprint>.json`: why the last run of a fingerprint
//!   failed, until it commits (a hint for `plan` and `show`);
//! - `downloads/<hash>.part`: blobs being pulled from a remote cache, kept
//!   when a pull is interrupted so that the next one resumes them (`gc`
//!   removes those whose blob is stored);
//!   `uploads/`: the state of interrupted multipart uploads to a remote;
//! - `quarantine/<time>-<pid>/`: corrupt objects moved out of the store (by a
//!   stage's input check or `cache verify --repair`), kept for inspection;
//! - `config.json`: a cache shared by a group (`cache init --shared`);
//! - `runs/<run>/`: a Slurm run's `run.json` and `jobs.jsonl`.

// Layers, bottom-up; a module uses only those below it: error, artifact,
// key, atomic, fsutil, seal, tree, hashcache, failures; then objects (and integrity,
// its checks and quarantine, and adopt, objects that arrive verified from a remote), records (uses objects), locks; then
// dependents (who uses an object), maintenance (verify, repair, gc: uses
// all of them) and checkpoints (gc's part for checkpoint folders); store
// (the `Cache` handle) on top.
mod adopt;
mod artifact;
mod atomic;
mod checkpoints;
mod dependents;
mod error;
mod failures;
mod fsutil;
mod hashcache;
mod integrity;
mod key;
mod locks;
mod maintenance;
mod objects;
mod records;
mod seal;
mod shared;
mod store;
mod tree;

pub use artifact::{ArtifactId, ArtifactKind};
pub use atomic::{atomic_write, fsync_dir};
pub use error::CacheError;
pub use failures::FailureNote;
pub use fsutil::mark_young;
pub use integrity::Damage;
pub use key::{Fingerprint, StageKey, STAGE_KEY_SCHEMA};
pub use locks::{GcGuard, StageLock};
pub use maintenance::{GcReport, VerifyReport};
pub use records::{Provenance, StageRecord};
pub use seal::remove_all;
pub use shared::CacheConfig;
pub use store::Cache;
pub use tree::parse_listing;

#[cfg(test)]
mod tests;
