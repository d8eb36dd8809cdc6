//! The team cache: stage records and their outputs pushed to and pulled
//! from a remote object store (S3 and S3-compatible servers, GCS, Azure,
//! HTTP, a shared folder), in the local cache's layout, every download
//! checked against its blake3 id, records written last and only if absent,
//! and optionally signed (ed25519) and trusted by key.
//!
//! Layers, bottom-up: error, config (where remotes are configured), store
//! (the `RemoteStore` trait on `object_store`), signing (record envelopes
//! and keys), transfer (one blob up or down: streamed, verified,
//! resumable); client (the `Remote` handle), sync (push, pull) and verify
//! on top.
mod client;
mod config;
mod error;
mod signing;
mod store;
mod sync;
mod transfer;
mod verify;

pub use client::{Lookup, Remote};
pub use config::{
    config_files, default_remote, load_remotes, resolve, Config, RemoteConfig, RemoteSpec,
    PROJECT_CONFIG,
};
pub use error::RemoteError;
pub use signing::{keygen, PublicKey, SecretKey};
pub use store::{ObjectRemote, RemoteStore, ResumableUploads};
pub use sync::{PullReport, PushReport};
pub use transfer::PART_SIZE;
pub use verify::RemoteVerifyReport;
