//! The remote cache's error type: each variant names the remote and the
//! object or file it is about.
use std::path::PathBuf;

use crate::cache::CacheError;

#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("{}: {message}", .path.display())]
    Config { path: PathBuf, message: String },
    #[error("{}: {source}", .path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("remote `{name}` is not configured ({known}); give a URL (s3://bucket/prefix, file:///folder) or a configured name")]
    UnknownRemote { name: String, known: String },
    #[error("remote URL `{url}`: {message}")]
    Url { url: String, message: String },
    #[error("remote `{remote}` is read-only: {why}")]
    ReadOnly { remote: String, why: String },
    #[error("remote `{remote}`, `{key}`: {source}")]
    Store {
        remote: String,
        key: String,
        source: object_store::Error,
    },
    #[error("remote `{remote}`, `{key}`: content hash is {actual}, expected {expected}: rejected, nothing was stored")]
    Corrupt {
        remote: String,
        key: String,
        expected: String,
        actual: String,
    },
    #[error("remote `{remote}`, `{key}`: {message}")]
    BadRecord {
        remote: String,
        key: String,
        message: String,
    },
    #[error("signing key {}: {message}", .path.display())]
    Key { path: PathBuf, message: String },
    #[error("remote `{remote}` is not used for the rest of this command: an earlier request failed ({why})")]
    Unreachable { remote: String, why: String },
    #[error(transparent)]
    Cache(#[from] CacheError),
}

impl RemoteError {
    /// Whether the remote did not answer as a server (no connection, a
    /// timeout, a server error, each after the client's retries), rather
    /// than answering about the object (absent, refused, changed).
    pub fn is_unreachable(&self) -> bool {
        use object_store::Error as E;
        match self {
            RemoteError::Store { source, .. } => !matches!(
                source,
                E::NotFound { .. }
                    | E::AlreadyExists { .. }
                    | E::Precondition { .. }
                    | E::NotModified { .. }
                    | E::PermissionDenied { .. }
                    | E::Unauthenticated { .. }
                    | E::NotSupported { .. }
                    | E::NotImplemented
            ),
            RemoteError::Unreachable { .. } => true,
            _ => false,
        }
    }
}
