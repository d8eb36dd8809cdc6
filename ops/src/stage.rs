//! The stage contract: what a running op sees (its spec, a reporter for
//! progress and curves, a cancel flag) and what it returns.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde::de::DeserializeOwned;

use crate::protocol::{Metrics, StageSpec};

/// An op's implementation: in the engine for [`crate::Placement::Engine`]
/// ops, in the worker's table for tensor ops.
pub type RunFn = fn(&StageContext<'_>) -> anyhow::Result<Metrics>;

/// Progress and curve points from a running stage.
pub trait Reporter: Send + Sync {
    /// `pos` of `len` units done in the current phase.
    fn progress(&self, pos: u64, len: Option<u64>, msg: &str);
    /// One point of a training curve.
    fn metric(&self, values: &BTreeMap<String, f64>);
}

/// A reporter that drops everything (tests, quiet runs).
pub struct NullReporter;

impl Reporter for NullReporter {
    fn progress(&self, _: u64, _: Option<u64>, _: &str) {}
    fn metric(&self, _: &BTreeMap<String, f64>) {}
}

/// Cooperative cancellation (Ctrl-C, fail-fast): ops poll it between units
/// of work and return [`Cancelled`] when it is set.
#[derive(Debug, Clone, Default)]
pub struct CancelFlag(Arc<AtomicBool>);

impl CancelFlag {
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
    /// `Err(Cancelled)` once cancelled, for `?` in op loops.
    pub fn check(&self) -> Result<(), Cancelled> {
        if self.is_cancelled() {
            Err(Cancelled)
        } else {
            Ok(())
        }
    }
}

/// The error an op returns when it stopped because it was cancelled.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("cancelled")]
pub struct Cancelled;

/// What a running op sees.
pub struct StageContext<'a> {
    pub spec: &'a StageSpec,
    pub reporter: &'a dyn Reporter,
    pub cancel: &'a CancelFlag,
}

impl StageContext<'_> {
    /// Typed params (already validated by the engine).
    pub fn params<P: DeserializeOwned>(&self) -> anyhow::Result<P> {
        Ok(serde_json::from_value(self.spec.params.clone())?)
    }

    /// Path of a bound input, or an error naming it.
    pub fn input(&self, name: &str) -> anyhow::Result<&Path> {
        self.spec
            .inputs
            .get(name)
            .map(|p| p.as_path())
            .ok_or_else(|| {
                anyhow::anyhow!("stage `{}`: input `{name}` is not bound", self.spec.stage)
            })
    }

    /// Where to write output `name`.
    pub fn output(&self, name: &str) -> std::path::PathBuf {
        self.spec.out_dir.join(name)
    }
}
