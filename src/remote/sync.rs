//! `push` and `pull` of stage records with their outputs. A push uploads
//! the blobs first, then the tree listings, and the record last, created
//! only if absent: a record on the remote never names a missing object and
//! two pushes of one stage leave one record. A pull checks the record, then
//! every listing and blob against its id, and writes the local record last.
use std::collections::BTreeSet;
use std::sync::atomic::Ordering;

use futures::stream::{self, TryStreamExt};
use object_store::UpdateVersion;

use crate::cache::{parse_listing, ArtifactKind, Cache, Fingerprint, StageRecord};

use super::client::{record_key, tree_key, Lookup, Remote};
use super::error::RemoteError;
use super::signing::Envelope;
use super::store::{head_before_write, read_all, MAX_LISTING_BYTES, MAX_RECORD_BYTES};
use super::transfer::{download_blob, upload_blob, Transfer};

/// What a push did.
#[derive(Debug, Default)]
pub struct PushReport {
    /// Records this push created.
    pub created: Vec<StageRecord>,
    /// Records the remote already had (pushed before, or by a racing push).
    pub existing: Vec<StageRecord>,
    /// Records the remote had unsigned (or unreadable), replaced by this
    /// push's signed ones: a consumer that trusts only signed records
    /// could not use them.
    pub signed: Vec<StageRecord>,
    /// Records the remote has signed by another key (its name), left as
    /// they are: consumers that trust only this push's key miss them.
    pub signed_by_others: Vec<(StageRecord, String)>,
    pub bytes: u64,
    pub resumed_bytes: u64,
}

/// What pushing one record did.
enum Pushed {
    Created,
    Existing,
    /// An unsigned record replaced by a signed one.
    Signed,
    /// Present, signed by this other key.
    SignedByOther(String),
}

/// A record found on the remote before a push: kept (and what that means
/// for the report), or replaced at the version read.
enum Present {
    Kept(Pushed),
    Replace(Option<UpdateVersion>),
}

/// What a pull did.
#[derive(Debug, Default)]
pub struct PullReport {
    pub pulled: Vec<StageRecord>,
    /// Already in the local cache.
    pub local: usize,
    /// Not on the remote.
    pub absent: usize,
    /// (stage or fingerprint, why) of records refused for want of a trusted
    /// signature.
    pub untrusted: Vec<(String, String)>,
    /// Records that could not be pulled (a corrupt object, ...).
    pub failed: Vec<String>,
    pub bytes: u64,
    pub resumed_bytes: u64,
}

impl Remote {
    /// Pushes `records` (each with its outputs).
    pub fn push(
        &self,
        cache: &Cache,
        records: &[StageRecord],
        quiet: bool,
    ) -> Result<PushReport, RemoteError> {
        self.check_writable()?;
        let t = self.transfer(quiet);
        let mut report = PushReport::default();
        let result = self.runtime.block_on(async {
            for record in records {
                t.set_message(&record.stage);
                match self.push_record(cache, record, &t).await? {
                    Pushed::Created => report.created.push(record.clone()),
                    Pushed::Existing => report.existing.push(record.clone()),
                    Pushed::Signed => report.signed.push(record.clone()),
                    Pushed::SignedByOther(key) => {
                        report.signed_by_others.push((record.clone(), key))
                    }
                }
            }
            Ok(())
        });
        t.finish();
        report.bytes = t.moved.load(Ordering::Relaxed);
        report.resumed_bytes = t.resumed.load(Ordering::Relaxed);
        result.map(|()| report)
    }

    /// Pushes one record that a run just committed (`write_back`).
    pub fn push_quietly(&self, cache: &Cache, record: &StageRecord) -> Result<bool, RemoteError> {
        self.check_writable()?;
        let t = self.transfer(true);
        let pushed = self.guarded(|| self.runtime.block_on(self.push_record(cache, record, &t)))?;
        Ok(matches!(pushed, Pushed::Created | Pushed::Signed))
    }

    /// Blobs, listings, then the record: created if absent, or, with a
    /// signing key, replacing an unsigned record if it is still the one
    /// read (`If-Match`).
    async fn push_record(
        &self,
        cache: &Cache,
        record: &StageRecord,
        t: &Transfer,
    ) -> Result<Pushed, RemoteError> {
        let key = record_key(&record.fingerprint);
        let mut replace = None;
        if head_before_write(&*self.store, &key)
            .await
            .map_err(|e| self.write_error(&key, e))?
            .is_some()
        {
            match self.present_record(&key).await? {
                Present::Kept(pushed) => return Ok(pushed),
                Present::Replace(version) => replace = Some(version),
            }
        }
        let mut blobs = BTreeSet::new();
        let mut trees = Vec::new();
        for id in record.outputs.values() {
            match id.kind {
                ArtifactKind::File => {
                    blobs.insert(id.hash.clone());
                }
                ArtifactKind::Tree => {
                    blobs.extend(cache.tree_blobs(&id.hash)?);
                    trees.push(id.hash.clone());
                }
            }
        }
        let name = self.spec.name.as_str();
        stream::iter(blobs.iter().map(Ok::<_, RemoteError>))
            .try_for_each_concurrent(self.spec.config.jobs, |hash| async move {
                upload_blob(&*self.store, name, cache, hash, t)
                    .await
                    .map(|_| ())
                    .map_err(|e| self.denied(e))
            })
            .await?;
        for hash in &trees {
            let key = tree_key(hash);
            let listing: bytes::Bytes = cache.tree_listing(hash)?.into();
            match self.store.put_new(&key, listing.clone()).await {
                Ok(_) => {}
                // Content-addressed: without conditional writes (`conditional_put:
                // disabled`) a plain put writes the same bytes.
                Err(object_store::Error::NotImplemented) => self
                    .store
                    .put(&key, listing)
                    .await
                    .map_err(|e| self.write_error(&key, e))?,
                Err(e) => return Err(self.write_error(&key, e)),
            }
        }
        if let Some(version) = replace {
            return self.replace_unsigned(&key, record, version).await;
        }
        let created = match self.store.put_new(&key, self.envelope(record)).await {
            Ok(created) => created,
            // A server without conditional writes (`conditional_put:
            // disabled`): the head above is the best it allows.
            Err(object_store::Error::NotImplemented) => {
                tracing::warn!(
                    "remote `{name}` does not support create-if-absent writes: a racing push may replace this record"
                );
                self.store
                    .put(&key, self.envelope(record))
                    .await
                    .map_err(|e| self.write_error(&key, e))?;
                true
            }
            Err(e) => return Err(self.write_error(&key, e)),
        };
        Ok(if created {
            Pushed::Created
        } else {
            Pushed::Existing
        })
    }

    /// What to do with the record the remote has at `key`. Without a
    /// signing key it stands. With one: a record this key signed stands, so
    /// does one another key signed (its consumers trust that key), and an
    /// unsigned or unreadable one is replaced, at the version read.
    async fn present_record(&self, key: &str) -> Result<Present, RemoteError> {
        let Some(signer) = &self.signer else {
            return Ok(Present::Kept(Pushed::Existing));
        };
        let (bytes, version) = match self.store.get_versioned(key, MAX_RECORD_BYTES).await {
            Ok(Some(got)) => got,
            // Gone since the HEAD (a cleanup): created again below.
            Ok(None) => return Ok(Present::Replace(None)),
            // An identity that may write but not read: it cannot judge.
            Err(object_store::Error::PermissionDenied { .. }) => {
                return Ok(Present::Kept(Pushed::Existing))
            }
            Err(e) => return Err(self.store_error(key, e)),
        };
        let envelope = serde_json::from_slice::<Envelope>(&bytes).ok();
        Ok(match envelope {
            Some(e) if signer.signed(&e) => Present::Kept(Pushed::Existing),
            Some(Envelope {
                signature: Some(sig),
                ..
            }) => Present::Kept(Pushed::SignedByOther(sig.key)),
            _ => Present::Replace(Some(version)),
        })
    }

    /// Writes this push's signed record over the unsigned one read at
    /// `version` (`None`: it was gone, so create it).
    async fn replace_unsigned(
        &self,
        key: &str,
        record: &StageRecord,
        version: Option<UpdateVersion>,
    ) -> Result<Pushed, RemoteError> {
        let envelope = self.envelope(record);
        let replaced = match version {
            None => self.store.put_new(key, envelope).await,
            Some(version) => match self
                .store
                .put_if_version(key, envelope.clone(), version)
                .await
            {
                // No conditional replace here (a folder, or `conditional_put:
                // disabled`): a plain write, which a racing push may undo.
                Err(object_store::Error::NotImplemented) => {
                    tracing::warn!(
                        "remote `{}` has no conditional replace: a racing push may undo the signed record of {key}",
                        self.spec.name
                    );
                    self.store.put(key, envelope).await.map(|()| true)
                }
                other => other,
            },
        };
        match replaced {
            Ok(true) => Ok(Pushed::Signed),
            // Changed since it was read: another push got there first.
            Ok(false) => Ok(Pushed::Existing),
            Err(e) => Err(self.write_error(key, e)),
        }
    }

    /// A store error on write, named as a permission problem when it is one.
    fn denied(&self, err: RemoteError) -> RemoteError {
        match err {
            RemoteError::Store { key, source, .. } => self.write_error(&key, source),
            other => other,
        }
    }

    /// Every fingerprint with a record on the remote.
    pub fn list_records(&self) -> Result<Vec<Fingerprint>, RemoteError> {
        let keys = self
            .runtime
            .block_on(self.store.list("records/"))
            .map_err(|e| self.store_error("records/", e))?;
        Ok(keys
            .iter()
            .filter_map(|k| k.rsplit('/').next()?.strip_suffix(".json"))
            .filter(|fp| fp.len() == 64)
            .map(|fp| Fingerprint(fp.to_string()))
            .collect())
    }

    /// Pulls the records of `fps` that the local cache lacks.
    pub fn pull(
        &self,
        cache: &Cache,
        fps: &[Fingerprint],
        quiet: bool,
    ) -> Result<PullReport, RemoteError> {
        let t = self.transfer(quiet);
        let mut report = PullReport::default();
        let result: Result<(), RemoteError> = self.runtime.block_on(async {
            for fp in fps {
                if cache.hit(fp)?.is_some() {
                    report.local += 1;
                    continue;
                }
                let found = match self.lookup_async(fp).await {
                    // One malformed record (another engine's, a stray key)
                    // is that record's failure, not the whole pull's.
                    Err(e @ RemoteError::BadRecord { .. }) => {
                        let line = format!("record {}: {e}", fp.short());
                        t.say(&format!("error: {line}"));
                        report.failed.push(line);
                        continue;
                    }
                    found => found?,
                };
                match found {
                    Lookup::Absent => report.absent += 1,
                    Lookup::Untrusted(why) => {
                        t.say(&format!("ignored record {}: {why}", fp.short()));
                        report.untrusted.push((fp.short().to_string(), why));
                    }
                    Lookup::Found(record) => {
                        t.set_message(&record.stage);
                        match self.pull_record(cache, &record, &t).await {
                            Ok(local) => report.pulled.push(local),
                            Err(e) => {
                                let line =
                                    format!("stage `{}` ({}): {e}", record.stage, fp.short());
                                t.say(&format!("error: {line}"));
                                report.failed.push(line);
                            }
                        }
                    }
                }
            }
            Ok(())
        });
        t.finish();
        report.bytes = t.moved.load(Ordering::Relaxed);
        report.resumed_bytes = t.resumed.load(Ordering::Relaxed);
        result.map(|()| report)
    }

    /// Pulls `fp` if the remote has a trusted record of it: `Some(record)`
    /// once it is committed locally, `None` on a miss.
    pub fn pull_one(
        &self,
        cache: &Cache,
        fp: &Fingerprint,
    ) -> Result<Option<StageRecord>, RemoteError> {
        let t = self.transfer(true);
        self.guarded(|| {
            self.runtime.block_on(async {
                match self.lookup_async(fp).await? {
                    Lookup::Found(record) => Ok(Some(self.pull_record(cache, &record, &t).await?)),
                    Lookup::Untrusted(why) => {
                        tracing::warn!(
                            "remote `{}`: record {} ignored: {why}",
                            self.spec.name,
                            fp.short()
                        );
                        Ok(None)
                    }
                    Lookup::Absent => Ok(None),
                }
            })
        })
    }

    /// Downloads a checked record's listings and blobs, adopts them, then
    /// commits the local record, unless a run committed one meanwhile:
    /// returns the record the local cache now holds. `gc` is held off
    /// throughout, so nothing adopted is collected before the record
    /// reaches it.
    async fn pull_record(
        &self,
        cache: &Cache,
        record: &StageRecord,
        t: &Transfer,
    ) -> Result<StageRecord, RemoteError> {
        let _gc = cache.hold_off_gc()?;
        let mut blobs = BTreeSet::new();
        let mut trees = Vec::new();
        for id in record.outputs.values() {
            if cache.has_artifact(id) {
                continue;
            }
            match id.kind {
                ArtifactKind::File => {
                    blobs.insert(id.hash.clone());
                }
                ArtifactKind::Tree => {
                    let listing = self.fetch_listing(&id.hash).await?;
                    let entries =
                        parse_listing(&listing).map_err(|message| RemoteError::BadRecord {
                            remote: self.spec.name.clone(),
                            key: tree_key(&id.hash),
                            message,
                        })?;
                    blobs.extend(entries.into_iter().map(|(_, b)| b));
                    trees.push((id.hash.clone(), listing));
                }
            }
        }
        let name = self.spec.name.as_str();
        stream::iter(blobs.iter().map(Ok::<_, RemoteError>))
            .try_for_each_concurrent(self.spec.config.jobs, |hash| {
                download_blob(&*self.store, name, cache, hash, t)
            })
            .await?;
        for (hash, listing) in &trees {
            cache.adopt_tree(hash, listing)?;
        }
        // Create-if-absent, as a run commits: a record a run committed
        // meanwhile stands (what was built on it may differ from ours).
        if cache.commit_record(record)? {
            return Ok(record.clone());
        }
        Ok(cache
            .record(&record.fingerprint)?
            .unwrap_or_else(|| record.clone()))
    }

    /// Tree `hash`'s listing from the remote, checked against its hash.
    pub(super) async fn fetch_listing(&self, hash: &str) -> Result<Vec<u8>, RemoteError> {
        let key = tree_key(hash);
        let stream = self
            .store
            .get_from(&key, 0)
            .await
            .map_err(|e| self.store_error(&key, e))?;
        let bytes = read_all(stream, MAX_LISTING_BYTES)
            .await
            .map_err(|e| self.store_error(&key, e))?;
        let actual = blake3::hash(&bytes).to_hex().to_string();
        if actual != hash {
            return Err(RemoteError::Corrupt {
                remote: self.spec.name.clone(),
                key,
                expected: hash.to_string(),
                actual,
            });
        }
        Ok(bytes)
    }
}
