//! `cache verify --remote`: every object on the remote rehashed against its
//! name, every listing against its hash and its blobs, every record checked
//! (its fingerprint, its outputs present, its signature when keys are
//! configured).
use std::collections::BTreeSet;
use std::sync::atomic::Ordering;

use futures::stream::{self, StreamExt};

use crate::cache::{parse_listing, ArtifactKind, Fingerprint};

use super::client::Remote;
use super::error::RemoteError;
use super::signing::{trust, Trust};
use super::store::{read_all, MAX_RECORD_BYTES};
use super::transfer::Transfer;

/// What `cache verify --remote` found.
#[derive(Debug, Default)]
pub struct RemoteVerifyReport {
    pub objects_checked: usize,
    pub trees_checked: usize,
    pub records_checked: usize,
    /// One line per problem, naming the key.
    pub problems: Vec<String>,
    pub bytes: u64,
}

impl Remote {
    /// Checks everything on the remote (reads every object).
    pub fn verify(&self, quiet: bool) -> Result<RemoteVerifyReport, RemoteError> {
        let t = self.transfer(quiet);
        let result = self.runtime.block_on(self.verify_async(&t));
        t.finish();
        result.map(|mut r| {
            r.bytes = t.moved.load(Ordering::Relaxed);
            r
        })
    }

    async fn verify_async(&self, t: &Transfer) -> Result<RemoteVerifyReport, RemoteError> {
        let mut report = RemoteVerifyReport::default();
        let list = |prefix: &'static str| async move {
            self.store
                .list(prefix)
                .await
                .map_err(|e| self.store_error(prefix, e))
        };
        let object_keys = list("objects/").await?;
        let mut objects = BTreeSet::new();
        t.set_message("objects");
        let checks: Vec<Option<String>> = stream::iter(object_keys.iter())
            .map(|key| self.check_object(key, t))
            // In order: the results are zipped with the keys below.
            .buffered(self.spec.config.jobs)
            .collect()
            .await;
        for (key, problem) in object_keys.iter().zip(checks) {
            report.objects_checked += 1;
            match problem {
                Some(p) => report.problems.push(p),
                None => {
                    objects.insert(key.trim_start_matches("objects/").replace('/', ""));
                }
            }
        }
        let mut trees = BTreeSet::new();
        t.set_message("trees");
        for key in list("trees/").await? {
            let Some(hash) = key
                .strip_prefix("trees/")
                .and_then(|k| k.strip_suffix(".json"))
            else {
                report.problems.push(format!("{key}: not a tree listing"));
                continue;
            };
            report.trees_checked += 1;
            let listing = match self.fetch_listing(hash).await {
                Ok(l) => l,
                Err(e) => {
                    report.problems.push(e.to_string());
                    continue;
                }
            };
            match parse_listing(&listing) {
                Err(e) => report.problems.push(format!("{key}: {e}")),
                Ok(entries) => {
                    let missing: Vec<&str> = entries
                        .iter()
                        .filter(|(_, b)| !objects.contains(b))
                        .map(|(rel, _)| rel.as_str())
                        .collect();
                    if missing.is_empty() {
                        trees.insert(hash.to_string());
                    } else {
                        report.problems.push(format!(
                            "{key}: blobs of {} missing or corrupt",
                            missing.join(", ")
                        ));
                    }
                }
            }
        }
        t.set_message("records");
        for key in list("records/").await? {
            report.records_checked += 1;
            let Some(fp) = key
                .rsplit('/')
                .next()
                .and_then(|n| n.strip_suffix(".json"))
                .map(|s| Fingerprint(s.to_string()))
            else {
                report.problems.push(format!("{key}: not a record"));
                continue;
            };
            let bytes = match self.store.get_from(&key, 0).await {
                Ok(s) => read_all(s, MAX_RECORD_BYTES)
                    .await
                    .map_err(|e| self.store_error(&key, e))?,
                Err(e) => return Err(self.store_error(&key, e)),
            };
            let (envelope, record) = match self.parse_record(&key, &fp, &bytes) {
                Ok(r) => r,
                Err(e) => {
                    report.problems.push(e.to_string());
                    continue;
                }
            };
            if let Trust::Untrusted(why) = trust(&envelope, &self.trusted) {
                report.problems.push(format!(
                    "{key} (stage `{}`): untrusted: {why}",
                    record.stage
                ));
            }
            for (name, id) in &record.outputs {
                let present = match id.kind {
                    ArtifactKind::File => objects.contains(&id.hash),
                    ArtifactKind::Tree => trees.contains(&id.hash),
                };
                if !present {
                    report.problems.push(format!(
                        "{key} (stage `{}`): output `{name}` ({id}) is missing or corrupt on the remote",
                        record.stage
                    ));
                }
            }
        }
        Ok(report)
    }

    /// Rehashes the object at `key` (`objects/ab/cdef..`): `Some(problem)`.
    async fn check_object(&self, key: &str, t: &Transfer) -> Option<String> {
        let name = key.trim_start_matches("objects/").replace('/', "");
        let mut stream = match self.store.get_from(key, 0).await {
            Ok(s) => s,
            Err(e) => return Some(self.store_error(key, e).to_string()),
        };
        let mut hasher = blake3::Hasher::new();
        while let Some(chunk) = stream.next().await {
            match chunk {
                Ok(c) => {
                    hasher.update(&c);
                    t.count(c.len() as u64);
                }
                Err(e) => return Some(self.store_error(key, e).to_string()),
            }
        }
        let actual = hasher.finalize().to_hex();
        (actual.as_str() != name).then(|| format!("{key}: content hash is {actual} (corrupt)"))
    }
}
