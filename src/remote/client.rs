//! The [`Remote`] handle: one remote cache opened for a command, with its
//! own small runtime (the engine's planner and CLI are synchronous; stage
//! tasks call it from blocking threads), its trusted keys and signing key.
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::cache::{Fingerprint, StageRecord};

use super::config::RemoteSpec;
use super::error::RemoteError;
use super::signing::{trust, unsigned, Envelope, PublicKey, SecretKey, Trust};
use super::store::{read_all, ObjectRemote, RemoteStore, MAX_RECORD_BYTES};
use super::transfer::Transfer;

/// A remote cache, opened.
pub struct Remote {
    pub(super) spec: RemoteSpec,
    pub(super) store: Arc<dyn RemoteStore>,
    pub(super) runtime: tokio::runtime::Runtime,
    pub(super) trusted: Vec<PublicKey>,
    pub(super) signer: Option<SecretKey>,
    /// Why the remote stopped answering, once a read-through request
    /// found it so: a run does not pay the client's retries (a minute and
    /// more each) again for every stage, as a build cache is disabled
    /// for the rest of a build after an error.
    pub(super) unreachable: std::sync::OnceLock<String>,
}

impl fmt::Debug for Remote {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Remote({} = {})", self.spec.name, self.store.describe())
    }
}

/// What a remote holds for one fingerprint.
#[derive(Debug)]
pub enum Lookup {
    Absent,
    /// A record exists but is not signed by a trusted key: a miss.
    Untrusted(String),
    Found(StageRecord),
}

/// The key of the record of `fp` on a remote.
pub fn record_key(fp: &Fingerprint) -> String {
    format!("records/{}/{}.json", &fp.0[..2], fp.0)
}

/// The key of tree `hash`'s listing on a remote.
pub fn tree_key(hash: &str) -> String {
    format!("trees/{hash}.json")
}

impl Remote {
    /// Opens `spec` (reads its keys; makes no request).
    pub fn open(spec: RemoteSpec) -> Result<Remote, RemoteError> {
        let store = Arc::new(ObjectRemote::open(&spec)?);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("alignflow-remote")
            .enable_all()
            .build()
            .map_err(|source| RemoteError::Io {
                path: "tokio runtime".into(),
                source,
            })?;
        let file = spec.source.clone().unwrap_or_default();
        let mut trusted = Vec::new();
        for (i, text) in spec.config.trusted_keys.iter().enumerate() {
            trusted.push(
                PublicKey::parse(text).map_err(|message| RemoteError::Config {
                    path: file.clone(),
                    message: format!(
                        "remote `{}`, field `trusted_keys[{i}]`: {message}",
                        spec.name
                    ),
                })?,
            );
        }
        let signer = match &spec.config.signing_key {
            Some(path) => Some(SecretKey::read(path)?),
            None => None,
        };
        Ok(Remote {
            spec,
            store,
            runtime,
            trusted,
            signer,
            unreachable: std::sync::OnceLock::new(),
        })
    }

    /// `request`, unless the remote was found unreachable before; an
    /// unreachable remote found now is remembered (with one warning).
    pub(super) fn guarded<T>(
        &self,
        request: impl FnOnce() -> Result<T, RemoteError>,
    ) -> Result<T, RemoteError> {
        if let Some(why) = self.unreachable.get() {
            return Err(RemoteError::Unreachable {
                remote: self.spec.name.clone(),
                why: why.clone(),
            });
        }
        let result = request();
        if let Err(e) = &result {
            if e.is_unreachable() && self.unreachable.set(e.to_string()).is_ok() {
                tracing::warn!(
                    "remote `{}` does not answer ({e}): not used for the rest of this command",
                    self.spec.name
                );
            }
        }
        result
    }

    /// The name it was given by (a config name, or the URL).
    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// The URL, without credentials.
    pub fn url(&self) -> &str {
        self.store.describe()
    }

    /// Whether `run` pushes what it runs.
    pub fn writes_back(&self) -> bool {
        self.spec.config.write && self.spec.config.write_back
    }

    /// Whether trusted keys are configured (records must be signed).
    pub fn checks_signatures(&self) -> bool {
        !self.trusted.is_empty()
    }

    /// A transfer for one command (progress bar, bounds).
    pub fn transfer(&self, quiet: bool) -> Transfer {
        Transfer::new(self.spec.config.jobs, self.spec.config.max_mbps, quiet)
    }

    /// Refuses to write to a remote configured `write: false`.
    pub fn check_writable(&self) -> Result<(), RemoteError> {
        if self.spec.config.write {
            return Ok(());
        }
        let why = match &self.spec.source {
            Some(file) => format!("`write: false` in {}", file.display()),
            None => "`write=false` in its URL".into(),
        };
        Err(RemoteError::ReadOnly {
            remote: self.spec.name.clone(),
            why,
        })
    }

    /// One request that needs the credentials to read: how long it took.
    pub fn ping(&self) -> Result<Duration, RemoteError> {
        let start = Instant::now();
        let key = "records/alignflow-ping";
        self.runtime
            .block_on(self.store.head(key))
            .map_err(|source| self.store_error(key, source))?;
        Ok(start.elapsed())
    }

    pub(super) fn store_error(&self, key: &str, source: object_store::Error) -> RemoteError {
        RemoteError::Store {
            remote: self.spec.name.clone(),
            key: key.to_string(),
            source,
        }
    }

    /// A failed write: a refusal is named as the read-only identity it is.
    pub(super) fn write_error(&self, key: &str, source: object_store::Error) -> RemoteError {
        if matches!(source, object_store::Error::PermissionDenied { .. }) {
            return RemoteError::ReadOnly {
                remote: self.spec.name.clone(),
                // S3 answers a wrong secret, an expired token or a skewed
                // clock with the same 403: the server's words tell which.
                why: format!(
                    "the server refused `{key}` ({source}): the identity in the environment (AWS_ACCESS_KEY_ID or `credentials_env`) may not write here, or the server does not accept it (a wrong secret, an expired token, a clock off); push needs a writer identity"
                ),
            };
        }
        RemoteError::Store {
            remote: self.spec.name.clone(),
            key: key.to_string(),
            source,
        }
    }

    /// The record of `fp` on the remote, checked: intact, about `fp`, and
    /// signed by a trusted key when keys are configured.
    pub fn lookup(&self, fp: &Fingerprint) -> Result<Lookup, RemoteError> {
        self.guarded(|| self.runtime.block_on(self.lookup_async(fp)))
    }

    pub(super) async fn lookup_async(&self, fp: &Fingerprint) -> Result<Lookup, RemoteError> {
        let key = record_key(fp);
        let stream = match self.store.get_from(&key, 0).await {
            Ok(s) => s,
            Err(object_store::Error::NotFound { .. }) => return Ok(Lookup::Absent),
            Err(e) => return Err(self.store_error(&key, e)),
        };
        let bytes = read_all(stream, MAX_RECORD_BYTES)
            .await
            .map_err(|e| self.store_error(&key, e))?;
        let (envelope, record) = self.parse_record(&key, fp, &bytes)?;
        match trust(&envelope, &self.trusted) {
            Trust::Untrusted(why) => Ok(Lookup::Untrusted(why)),
            Trust::Unchecked | Trust::SignedBy(_) => Ok(Lookup::Found(record)),
        }
    }

    /// A record's envelope and record, checked to be about `fp`: its
    /// fingerprint field and the hash of its key must both be `fp`.
    pub(super) fn parse_record(
        &self,
        key: &str,
        fp: &Fingerprint,
        bytes: &[u8],
    ) -> Result<(Envelope, StageRecord), RemoteError> {
        let bad = |message: String| RemoteError::BadRecord {
            remote: self.spec.name.clone(),
            key: key.to_string(),
            message,
        };
        let envelope: Envelope =
            serde_json::from_slice(bytes).map_err(|e| bad(format!("not a record: {e}")))?;
        let record: StageRecord = serde_json::from_value(envelope.record.clone())
            .map_err(|e| bad(format!("not a record: {e}")))?;
        if record.fingerprint != *fp {
            return Err(bad(format!("it holds fingerprint {}", record.fingerprint)));
        }
        let actual = record.key.fingerprint();
        if actual != *fp {
            return Err(bad(format!("its stage key hashes to {actual}: rejected")));
        }
        Ok((envelope, record))
    }

    /// The envelope this machine publishes for `record` (signed when a
    /// signing key is configured).
    pub(super) fn envelope(&self, record: &StageRecord) -> Bytes {
        let envelope = match &self.signer {
            Some(key) => key.seal(record),
            None => unsigned(record),
        };
        Bytes::from(serde_json::to_vec_pretty(&envelope).expect("envelopes serialise"))
    }
}
