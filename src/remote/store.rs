//! The remote store behind one small trait, [`RemoteStore`], and its one
//! implementation on the `object_store` crate (S3 and S3-compatible
//! servers, GCS, Azure, HTTP, a local or shared folder).
//!
//! Keys are the local cache's layout: `objects/ab/cdef..`,
//! `trees/<hash>.json`, `records/ab/<fingerprint>.json`.
use std::str::FromStr;
use std::sync::Arc;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::{FutureExt, StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::local::LocalFileSystem;
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path as StorePath;
use object_store::{
    GetOptions, GetRange, ObjectStore, PutMode, PutOptions, PutPayload, UpdateVersion,
};

use super::config::{is_secret_key, redact, RemoteSpec};
use super::error::RemoteError;

pub type StoreResult<T> = Result<T, object_store::Error>;

/// What alignflow needs of a remote store.
pub trait RemoteStore: Send + Sync {
    /// The URL, without credentials.
    fn describe(&self) -> &str;
    /// Where writes land: the URL and every store option that is not a
    /// credential (the endpoint above all, from the URL, the config or the
    /// environment). What an interrupted upload's state is keyed by.
    fn identity(&self) -> &str;
    /// The size of `key`, or `None` when it is absent.
    fn head<'a>(&'a self, key: &'a str) -> BoxFuture<'a, StoreResult<Option<u64>>>;
    /// The bytes of `key` from `offset` on, as they arrive.
    fn get_from<'a>(
        &'a self,
        key: &'a str,
        offset: u64,
    ) -> BoxFuture<'a, StoreResult<BoxStream<'static, StoreResult<Bytes>>>>;
    /// The bytes `range` of `key`, as they arrive.
    fn get_range<'a>(
        &'a self,
        key: &'a str,
        range: std::ops::Range<u64>,
    ) -> BoxFuture<'a, StoreResult<BoxStream<'static, StoreResult<Bytes>>>>;
    /// Writes `key` (replacing it).
    fn put<'a>(&'a self, key: &'a str, bytes: Bytes) -> BoxFuture<'a, StoreResult<()>>;
    /// Writes `key` only if it does not exist (`If-None-Match: *`); `false`
    /// when it already did.
    fn put_new<'a>(&'a self, key: &'a str, bytes: Bytes) -> BoxFuture<'a, StoreResult<bool>>;
    /// The bytes of `key` (refused past `limit`) and its version, or `None`
    /// when it is absent.
    fn get_versioned<'a>(
        &'a self,
        key: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, StoreResult<Option<(Vec<u8>, UpdateVersion)>>>;
    /// Replaces `key` only if it is still at `version` (`If-Match`); `false`
    /// when it changed since. `NotImplemented` where the store has no
    /// conditional replace (a folder, `conditional_put: disabled`).
    fn put_if_version<'a>(
        &'a self,
        key: &'a str,
        bytes: Bytes,
        version: UpdateVersion,
    ) -> BoxFuture<'a, StoreResult<bool>>;
    /// Every key under `prefix` (relative to the remote's root).
    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, StoreResult<Vec<String>>>;
    /// Multipart uploads whose id outlives this process (S3, GCS, Azure),
    /// so an interrupted upload resumes; `None` for a folder.
    fn resumable(&self) -> Option<&dyn ResumableUploads>;
    /// A multipart upload of `key` that this process finishes or abandons.
    fn upload<'a>(
        &'a self,
        key: &'a str,
    ) -> BoxFuture<'a, StoreResult<Box<dyn object_store::MultipartUpload>>>;
}

/// Multipart uploads addressed by an id that can be kept on disk.
pub trait ResumableUploads: Send + Sync {
    fn create<'a>(&'a self, key: &'a str) -> BoxFuture<'a, StoreResult<String>>;
    /// Uploads part `index` (from 0); returns its id for `complete`.
    fn put_part<'a>(
        &'a self,
        key: &'a str,
        upload: &'a str,
        index: usize,
        bytes: Bytes,
    ) -> BoxFuture<'a, StoreResult<String>>;
    fn complete<'a>(
        &'a self,
        key: &'a str,
        upload: &'a str,
        parts: Vec<String>,
    ) -> BoxFuture<'a, StoreResult<()>>;
}

/// A [`RemoteStore`] on an `object_store` backend.
pub struct ObjectRemote {
    url: String,
    identity: String,
    store: Arc<dyn ObjectStore>,
    multipart: Option<Arc<dyn MultipartStore>>,
    /// Where the remote's keys live inside the bucket (empty: at its root),
    /// decoded from the URL once: a `team cache` prefix is the key prefix
    /// `team cache/`, not `team%20cache/` (encoded again as `team%2520cache`
    /// by the key's parsing, whose listings then matched nothing).
    prefix: StorePath,
}

impl ObjectRemote {
    /// Opens the store a remote names (no request is made yet).
    pub fn open(spec: &RemoteSpec) -> Result<ObjectRemote, RemoteError> {
        let shown = redact(&spec.config.url);
        let bad_url = |message: String| RemoteError::Url {
            url: shown.clone(),
            message,
        };
        let url = url::Url::parse(&spec.config.url).map_err(|e| bad_url(e.to_string()))?;
        let mut options: Vec<(String, String)> = url
            .query_pairs()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        if let Some((k, _)) = options.iter().find(|(k, _)| is_secret_key(k)) {
            return Err(bad_url(format!(
                "`{k}` in a URL would leak into logs and shell history: set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, or `credentials_env` in the config"
            )));
        }
        options.extend(
            spec.config
                .options
                .iter()
                .map(|(k, v)| (k.clone(), v.clone())),
        );
        // Before the credentials join the options.
        let mut identity = {
            let mut bare = url.clone();
            bare.set_query(None);
            redact(bare.as_str())
        };
        let sorted: std::collections::BTreeMap<_, _> =
            options.iter().map(|(k, v)| (k, v)).collect();
        for (k, v) in sorted {
            identity.push_str(&format!(" {k}={v}"));
        }
        for (key, var) in &spec.config.credentials_env {
            let value = std::env::var(var).map_err(|_| RemoteError::Config {
                path: spec.source.clone().unwrap_or_default(),
                message: format!(
                    "remote `{}`, field `credentials_env.{key}`: the environment variable `{var}` is not set",
                    spec.name
                ),
            })?;
            options.push((key.clone(), value));
        }
        let prefix = |url_path: &str| {
            StorePath::from_url_path(url_path).map_err(|e| bad_url(format!("the key prefix: {e}")))
        };
        match url.scheme() {
            "s3" | "s3a" => {
                let mut bare = url.clone();
                bare.set_query(None);
                let retry = object_store::RetryConfig {
                    max_retries: spec.config.retries,
                    ..Default::default()
                };
                let mut builder =
                    s3_builder_from_env(std::env::vars(), !spec.config.credentials_env.is_empty())
                        .with_url(bare.as_str())
                        .with_retry(retry);
                let mut allow_http_set = false;
                for (k, v) in &options {
                    let key = AmazonS3ConfigKey::from_str(k)
                        .map_err(|_| bad_url(format!("unknown S3 option `{k}`")))?;
                    allow_http_set |= matches!(
                        key,
                        AmazonS3ConfigKey::Client(object_store::ClientConfigKey::AllowHttp)
                    );
                    if matches!(key, AmazonS3ConfigKey::Endpoint)
                        && v.starts_with("http://")
                        && !allow_http_set
                    {
                        // An explicit http:// endpoint (a server on the LAN or
                        // loopback) is what the user asked for.
                        builder = builder.with_allow_http(true);
                    }
                    builder = builder.with_config(key, v);
                }
                // AWS_ENDPOINT (and the like) from the environment count too.
                if let Some(endpoint) = builder.get_config_value(&AmazonS3ConfigKey::Endpoint) {
                    identity.push_str(&format!(" (endpoint {endpoint})"));
                }
                let s3 = Arc::new(builder.build().map_err(|e| bad_url(e.to_string()))?);
                Ok(ObjectRemote {
                    url: shown.clone(),
                    identity,
                    store: s3.clone(),
                    multipart: Some(s3),
                    prefix: prefix(url.path())?,
                })
            }
            "file" => {
                let dir = url
                    .to_file_path()
                    .map_err(|()| bad_url("not a local path".into()))?;
                std::fs::create_dir_all(&dir).map_err(|source| RemoteError::Io {
                    path: dir.clone(),
                    source,
                })?;
                let local =
                    LocalFileSystem::new_with_prefix(&dir).map_err(|e| bad_url(e.to_string()))?;
                Ok(ObjectRemote {
                    url: shown.clone(),
                    identity,
                    store: Arc::new(local),
                    multipart: None,
                    prefix: StorePath::default(),
                })
            }
            _ => {
                let (store, path) = object_store::parse_url_opts(&url, options)
                    .map_err(|e| bad_url(e.to_string()))?;
                Ok(ObjectRemote {
                    url: shown.clone(),
                    identity,
                    store: Arc::from(store),
                    multipart: None,
                    prefix: path,
                })
            }
        }
    }

    /// Writes `key` under `mode`'s condition; `false` when the condition
    /// failed (the key exists, or changed since the version read).
    async fn put_conditionally(&self, key: &str, bytes: Bytes, mode: PutMode) -> StoreResult<bool> {
        let options = PutOptions {
            mode,
            ..Default::default()
        };
        match self
            .store
            .put_opts(&self.path(key), PutPayload::from(bytes), options)
            .await
        {
            Ok(_) => Ok(true),
            Err(
                object_store::Error::AlreadyExists { .. }
                | object_store::Error::Precondition { .. },
            ) => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn path(&self, key: &str) -> StorePath {
        let key_parts = key.split('/').map(object_store::path::PathPart::from);
        self.prefix.parts().chain(key_parts).collect()
    }
}

impl RemoteStore for ObjectRemote {
    fn describe(&self) -> &str {
        &self.url
    }

    fn identity(&self) -> &str {
        &self.identity
    }

    fn head<'a>(&'a self, key: &'a str) -> BoxFuture<'a, StoreResult<Option<u64>>> {
        async move {
            match self.store.head(&self.path(key)).await {
                Ok(meta) => Ok(Some(meta.size)),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(e),
            }
        }
        .boxed()
    }

    fn get_from<'a>(
        &'a self,
        key: &'a str,
        offset: u64,
    ) -> BoxFuture<'a, StoreResult<BoxStream<'static, StoreResult<Bytes>>>> {
        async move {
            let options = GetOptions {
                range: (offset > 0).then_some(GetRange::Offset(offset)),
                ..Default::default()
            };
            Ok(self
                .store
                .get_opts(&self.path(key), options)
                .await?
                .into_stream())
        }
        .boxed()
    }

    fn get_range<'a>(
        &'a self,
        key: &'a str,
        range: std::ops::Range<u64>,
    ) -> BoxFuture<'a, StoreResult<BoxStream<'static, StoreResult<Bytes>>>> {
        async move {
            let options = GetOptions {
                range: Some(GetRange::Bounded(range)),
                ..Default::default()
            };
            Ok(self
                .store
                .get_opts(&self.path(key), options)
                .await?
                .into_stream())
        }
        .boxed()
    }

    fn put<'a>(&'a self, key: &'a str, bytes: Bytes) -> BoxFuture<'a, StoreResult<()>> {
        async move {
            self.store
                .put(&self.path(key), PutPayload::from(bytes))
                .await?;
            Ok(())
        }
        .boxed()
    }

    fn put_new<'a>(&'a self, key: &'a str, bytes: Bytes) -> BoxFuture<'a, StoreResult<bool>> {
        self.put_conditionally(key, bytes, PutMode::Create).boxed()
    }

    fn get_versioned<'a>(
        &'a self,
        key: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, StoreResult<Option<(Vec<u8>, UpdateVersion)>>> {
        async move {
            let got = match self.store.get(&self.path(key)).await {
                Ok(got) => got,
                Err(object_store::Error::NotFound { .. }) => return Ok(None),
                Err(e) => return Err(e),
            };
            let version = UpdateVersion {
                e_tag: got.meta.e_tag.clone(),
                version: got.meta.version.clone(),
            };
            let bytes = read_all(got.into_stream(), limit).await?;
            Ok(Some((bytes, version)))
        }
        .boxed()
    }

    fn put_if_version<'a>(
        &'a self,
        key: &'a str,
        bytes: Bytes,
        version: UpdateVersion,
    ) -> BoxFuture<'a, StoreResult<bool>> {
        self.put_conditionally(key, bytes, PutMode::Update(version))
            .boxed()
    }

    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, StoreResult<Vec<String>>> {
        async move {
            let root = self.path(prefix);
            let metas: Vec<_> = self.store.list(Some(&root)).try_collect().await?;
            Ok(metas
                .into_iter()
                .filter_map(|m| {
                    let relative = m.location.prefix_match(&self.prefix)?;
                    Some(
                        relative
                            .map(|part| part.as_ref().to_string())
                            .collect::<Vec<_>>()
                            .join("/"),
                    )
                })
                .collect())
        }
        .boxed()
    }

    fn resumable(&self) -> Option<&dyn ResumableUploads> {
        self.multipart
            .as_ref()
            .map(|_| self as &dyn ResumableUploads)
    }

    fn upload<'a>(
        &'a self,
        key: &'a str,
    ) -> BoxFuture<'a, StoreResult<Box<dyn object_store::MultipartUpload>>> {
        async move { self.store.put_multipart(&self.path(key)).await }.boxed()
    }
}

impl ResumableUploads for ObjectRemote {
    fn create<'a>(&'a self, key: &'a str) -> BoxFuture<'a, StoreResult<String>> {
        async move {
            let mp = self.multipart.as_ref().expect("resumable() checked");
            mp.create_multipart(&self.path(key)).await
        }
        .boxed()
    }

    fn put_part<'a>(
        &'a self,
        key: &'a str,
        upload: &'a str,
        index: usize,
        bytes: Bytes,
    ) -> BoxFuture<'a, StoreResult<String>> {
        async move {
            let mp = self.multipart.as_ref().expect("resumable() checked");
            let id = upload.to_string();
            let part = mp
                .put_part(&self.path(key), &id, index, PutPayload::from(bytes))
                .await?;
            Ok(part.content_id)
        }
        .boxed()
    }

    fn complete<'a>(
        &'a self,
        key: &'a str,
        upload: &'a str,
        parts: Vec<String>,
    ) -> BoxFuture<'a, StoreResult<()>> {
        async move {
            let mp = self.multipart.as_ref().expect("resumable() checked");
            let parts = parts
                .into_iter()
                .map(|content_id| PartId { content_id })
                .collect();
            mp.complete_multipart(&self.path(key), &upload.to_string(), parts)
                .await?;
            Ok(())
        }
        .boxed()
    }
}

/// `head` before a write. A refusal is an identity that may write but not
/// read (S3 also answers 403, not 404, for a missing key to an identity
/// without ListBucket): the object counts as absent, and the write that
/// follows says whether this identity may write (records and listings are
/// written create-if-absent; a blob again is the same bytes).
pub async fn head_before_write(store: &dyn RemoteStore, key: &str) -> StoreResult<Option<u64>> {
    match store.head(key).await {
        Err(object_store::Error::PermissionDenied { .. }) => {
            tracing::debug!(
                "{key}: HEAD refused (an identity that may not read): written as absent"
            );
            Ok(None)
        }
        other => other,
    }
}

/// The most a record may weigh: its outputs' ids and its metrics, which are
/// kilobytes. What the remote sends is not trusted to be small.
pub const MAX_RECORD_BYTES: usize = 64 << 20;

/// The most a folder's listing may weigh (some ten million files).
pub const MAX_LISTING_BYTES: usize = 1 << 30;

/// A byte stream collected (for small objects: records and listings), and
/// refused past `limit` bytes rather than grown without bound.
pub async fn read_all(
    mut stream: BoxStream<'static, StoreResult<Bytes>>,
    limit: usize,
) -> StoreResult<Vec<u8>> {
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        if out.len() + chunk.len() > limit {
            return Err(too_large(format!(
                "larger than the {} MiB it may be",
                limit >> 20
            )));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// A store answer refused for its size.
pub fn too_large(message: String) -> object_store::Error {
    object_store::Error::Generic {
        store: "alignflow",
        source: message.into(),
    }
}

/// `AmazonS3Builder::from_env` over `vars`, but with `credentials_env`
/// naming the identity (`named_credentials`) the shell's own `AWS_*`
/// credentials are left out: a session token of the shell's identity sent
/// beside another identity's keys makes every request fail.
fn s3_builder_from_env(
    vars: impl Iterator<Item = (String, String)>,
    named_credentials: bool,
) -> AmazonS3Builder {
    let mut builder = AmazonS3Builder::new();
    for (name, value) in vars {
        if !name.starts_with("AWS_") {
            continue;
        }
        let Ok(key) = AmazonS3ConfigKey::from_str(&name.to_ascii_lowercase()) else {
            continue;
        };
        let credential = matches!(
            key,
            AmazonS3ConfigKey::AccessKeyId
                | AmazonS3ConfigKey::SecretAccessKey
                | AmazonS3ConfigKey::Token
        );
        if named_credentials && credential {
            continue;
        }
        builder = builder.with_config(key, value);
    }
    builder
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::remote::config::RemoteConfig;

    /// With `credentials_env`, the shell's AWS keys and session token stay
    /// out; without it, they are the identity, as `from_env` reads them.
    #[test]
    fn named_credentials_leave_the_shells_aws_identity_out() {
        let vars = || {
            [
                ("AWS_ACCESS_KEY_ID", "shell-key"),
                ("AWS_SECRET_ACCESS_KEY", "shell-secret"),
                ("AWS_SESSION_TOKEN", "shell-token"),
                ("AWS_REGION", "eu-west-3"),
                ("HOME", "/home/x"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
        };
        let named = s3_builder_from_env(vars(), true);
        assert_eq!(named.get_config_value(&AmazonS3ConfigKey::Token), None);
        assert_eq!(
            named.get_config_value(&AmazonS3ConfigKey::AccessKeyId),
            None
        );
        assert_eq!(
            named
                .get_config_value(&AmazonS3ConfigKey::Region)
                .as_deref(),
            Some("eu-west-3")
        );
        let shell = s3_builder_from_env(vars(), false);
        assert_eq!(
            shell.get_config_value(&AmazonS3ConfigKey::Token).as_deref(),
            Some("shell-token")
        );
    }

    fn open(url: &str, options: &[(&str, &str)], credentials: &[(&str, &str)]) -> ObjectRemote {
        let mut config = RemoteConfig::from_url(url).unwrap();
        for (k, v) in options {
            config.options.insert(k.to_string(), v.to_string());
        }
        for (k, v) in credentials {
            config.credentials_env.insert(k.to_string(), v.to_string());
        }
        ObjectRemote::open(&RemoteSpec {
            name: "team".into(),
            config,
            source: None,
        })
        .unwrap()
    }

    #[test]
    fn a_small_object_larger_than_its_limit_is_refused_before_it_is_held() {
        let chunks = |n: usize| -> BoxStream<'static, StoreResult<Bytes>> {
            futures::stream::iter((0..n).map(|_| Ok(Bytes::from(vec![7u8; 1 << 20])))).boxed()
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        assert_eq!(
            rt.block_on(read_all(chunks(3), 3 << 20)).unwrap().len(),
            3 << 20
        );
        let err = rt.block_on(read_all(chunks(4), 3 << 20)).unwrap_err();
        assert!(err.to_string().contains("larger than the 3 MiB"), "{err}");
    }

    #[test]
    fn two_endpoints_are_two_identities_and_credentials_are_no_part_of_one() {
        let a = open("s3://b/p", &[("endpoint", "http://10.0.0.1:9000")], &[]);
        let b = open("s3://b/p", &[("endpoint", "http://10.0.0.2:9000")], &[]);
        let query = open("s3://b/p?endpoint=http://10.0.0.2:9000", &[], &[]);
        assert_eq!(a.describe(), b.describe());
        assert_ne!(a.identity(), b.identity());
        assert_eq!(b.identity(), query.identity());
        std::env::set_var("ALIGNFLOW_TEST_IDENTITY_SECRET", "very-secret-value");
        let with_key = open(
            "s3://b/p",
            &[("endpoint", "http://10.0.0.1:9000")],
            &[
                ("access_key_id", "ALIGNFLOW_TEST_IDENTITY_SECRET"),
                ("secret_access_key", "ALIGNFLOW_TEST_IDENTITY_SECRET"),
            ],
        );
        assert_eq!(with_key.identity(), a.identity());
        assert!(!with_key.identity().contains("very-secret"));
    }
}
