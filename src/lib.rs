//! alignflow: a declarative workflow engine for RLHF and RLAIF pipelines.
//!
//! A YAML manifest ([`manifest`]) declares stages; [`graph`] resolves them
//! into a DAG; [`engine`] plans and runs what is out of date, caching every
//! result by content in [`cache`]. Each stage is an operator from [`ops`] (the `alignflow-ops` crate);
//! tensor operators run in the separate `alignflow-worker` process, which
//! speaks the [`protocol`]. [`report`] renders a pipeline's state as a page.

pub mod cache;
pub mod engine;
pub mod graph;
pub mod manifest;
pub mod remote;
pub mod report;
pub mod schemas;
pub mod tracking;

pub use alignflow_ops as ops;
pub use alignflow_ops::{data, protocol, text};

/// The engine version, recorded in every stage record and lockfile.
pub const ENGINE_VERSION: &str = env!("CARGO_PKG_VERSION");
