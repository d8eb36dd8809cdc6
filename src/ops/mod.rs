//! Operators: the unit of extension.
//!
//! Each op is one file here declaring its inputs, outputs, params (a struct
//! that deserialises the stage's `params:` block and generates its JSON
//! schema) and implementation version, plus one line in [`registry`].
//! Nothing else in the engine knows what an op does. Tensor ops declare
//! [`Placement::Worker`]: the engine only validates them, and the
//! `alignflow-worker` process runs them.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::protocol::{Metrics, StageSpec};

pub use ai_feedback::AiFeedbackParams;
pub use baseline_scores::{BaselineRecord, BaselineScoresParams};
pub use best_of_n::BestOfNParams;
pub use critique_revise::{
    choose_principles, critique_prompt, cut_at_stop, few_shot_prefix, revision_prompt,
    CritiqueReviseParams, PrincipleSampling, RevisionRecord, SftRecord, TrailStep, STOP_STRINGS,
};
pub use describe::{describe, schema_files, write_schemas};
pub use dpo::{DpoLoss, DpoParams, DpoReferenceParams};
pub use evaluate::EvaluateParams;
pub use generate::GenerateParams;
pub use lm_pretrain::{Family, PretrainParams};
pub use pm_train::{PmPretrainParams, PmTrainParams, PM_TRAIN_SETS};
pub use ppo::{
    PpoAdvantage, PpoKlEstimator, PpoKlMode, PpoLrSchedule, PpoParams, PpoRewardNorm, PpoValueInit,
};
pub use sft::SftParams;
pub use tokenizer_train::corpus_texts;

pub mod ai_feedback;
mod baseline_scores;
pub mod best_of_n;
mod constitution_import;
mod critique_revise;
mod dataset_import;
mod dataset_split;
mod describe;
mod dpo;
pub mod evaluate;
mod exec;
mod generate;
mod lm_pretrain;
mod pm_train;
mod ppo;
mod sft;
mod tokenizer_train;
pub mod training;

/// Every registered op, in display order.
pub fn registry() -> &'static [&'static dyn Op] {
    static OPS: &[&dyn Op] = &[
        &ai_feedback::AiFeedback,
        &baseline_scores::BaselineScores,
        &best_of_n::BestOfN,
        &constitution_import::ConstitutionImport,
        &critique_revise::CritiqueRevise,
        &dataset_import::DatasetImport,
        &dataset_split::DatasetSplit,
        &dpo::Dpo,
        &dpo::DpoReference,
        &evaluate::Evaluate,
        &exec::Exec,
        &generate::Generate,
        &lm_pretrain::LmPretrain,
        &pm_train::PmPretrain,
        &pm_train::PmTrain,
        &ppo::Ppo,
        &sft::Sft,
        &tokenizer_train::TokenizerTrain,
    ];
    OPS
}

/// The op registered under `name`.
pub fn find(name: &str) -> Option<&'static dyn Op> {
    registry().iter().copied().find(|op| op.name() == name)
}

/// Where a stage of this op runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// In the engine process (data ops, `exec`).
    Engine,
    /// In an `alignflow-worker` process (anything that touches libtorch).
    Worker,
}

/// A declared input or output of an op.
#[derive(Debug, Clone, Copy)]
pub struct Port {
    pub name: &'static str,
    pub doc: &'static str,
    /// Inputs only: whether the stage must bind it.
    pub required: bool,
    /// Outputs only: bytes that legitimately differ between identical runs
    /// (timings in a metrics log); `run --locked` does not compare them.
    pub volatile: bool,
}

impl Port {
    /// A required input.
    pub const fn input(name: &'static str, doc: &'static str) -> Port {
        Port {
            name,
            doc,
            required: true,
            volatile: false,
        }
    }
    /// An optional input.
    pub const fn optional(name: &'static str, doc: &'static str) -> Port {
        Port {
            name,
            doc,
            required: false,
            volatile: false,
        }
    }
    /// An output.
    pub const fn output(name: &'static str, doc: &'static str) -> Port {
        Port {
            name,
            doc,
            required: true,
            volatile: false,
        }
    }
    /// An output whose bytes may differ between identical runs.
    pub const fn volatile(name: &'static str, doc: &'static str) -> Port {
        Port {
            name,
            doc,
            required: true,
            volatile: true,
        }
    }
}

/// What every operator declares and does.
pub trait Op: Send + Sync {
    /// Registered name (`dataset.import`).
    fn name(&self) -> &'static str;
    /// Implementation version: bump it when outputs could change for the
    /// same inputs and params; it enters every stage fingerprint.
    fn version(&self) -> u32;
    /// One line for `alignflow ops`.
    fn summary(&self) -> &'static str;
    fn inputs(&self) -> &'static [Port];
    /// Declared outputs. Empty with [`Op::outputs_from_stage`]: the stage's
    /// `outputs:` list names them.
    fn outputs(&self) -> &'static [Port];
    /// Whether the stage's `outputs:` list declares the outputs (`exec`).
    fn outputs_from_stage(&self) -> bool {
        false
    }
    fn placement(&self) -> Placement {
        Placement::Engine
    }
    /// JSON schema of the `params:` block.
    fn params_schema(&self) -> schemars::Schema;
    /// Validates `params` and returns them normalised (defaults filled in,
    /// numbers in canonical form): what enters the fingerprint.
    fn normalize_params(&self, params: &serde_json::Value)
        -> Result<serde_json::Value, ParamError>;
    /// Rules on which optional inputs may be bound together, given the
    /// normalised params ("exactly one reward source"). Checked when the
    /// manifest loads (so `validate` and `plan` report them) and again by
    /// the worker before anything loads.
    fn check_bindings(
        &self,
        _bound: &dyn Fn(&str) -> bool,
        _params: &serde_json::Value,
    ) -> Result<(), BindingError> {
        Ok(())
    }
    /// Runs the stage. Only called for [`Placement::Engine`] ops in the
    /// engine; the worker has its own implementations of tensor ops.
    fn run(&self, ctx: &StageContext<'_>) -> anyhow::Result<Metrics>;
}

/// Inputs bound in a combination the op cannot run with.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("field `{field}`: {message}")]
pub struct BindingError {
    /// `inputs.NAME`, `params.NAME`, or `inputs` for the block.
    pub field: String,
    pub message: String,
}

impl BindingError {
    pub fn new(field: &str, message: impl Into<String>) -> BindingError {
        BindingError {
            field: field.to_string(),
            message: message.into(),
        }
    }
}

/// A params block that does not fit an op's schema.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct ParamError {
    /// Dotted path of the offending field inside `params` (empty: the block).
    pub field: String,
    pub message: String,
    /// Nearest valid field name for a misspelt one.
    pub suggestion: Option<String>,
}

/// [`normalize_with`], then `check` on the parsed params: the rules a
/// schema cannot express (combinations, ranges).
pub fn normalize_checked<P>(
    params: &serde_json::Value,
    check: impl FnOnce(&P) -> Result<(), ParamError>,
) -> Result<serde_json::Value, ParamError>
where
    P: DeserializeOwned + Serialize + schemars::JsonSchema,
{
    let value = normalize_with::<P>(params)?;
    let parsed: P = serde_json::from_value(value.clone()).expect("normalised params parse");
    check(&parsed)?;
    Ok(value)
}

/// Deserialises `params` into `P` and serialises it back: validation and
/// normalisation in one step, from the same struct that makes the schema.
/// `P` should use `#[serde(deny_unknown_fields)]`.
pub fn normalize_with<P>(params: &serde_json::Value) -> Result<serde_json::Value, ParamError>
where
    P: DeserializeOwned + Serialize + schemars::JsonSchema,
{
    let params = if params.is_null() {
        serde_json::Value::Object(Default::default())
    } else {
        params.clone()
    };
    // Structs that flatten shared params cannot use `deny_unknown_fields`:
    // check top-level names against the schema, which lists them all.
    if let Some(given) = params.as_object() {
        let schema = schemars::schema_for!(P);
        if let Some(known) = schema.get("properties").and_then(|p| p.as_object()) {
            if let Some(unknown) = given.keys().find(|k| !known.contains_key(*k)) {
                // Reported like serde does (at the parent), so the manifest
                // points at the misspelt key itself.
                return Err(ParamError {
                    field: String::new(),
                    message: format!("unknown field `{unknown}`"),
                    suggestion: nearest(unknown, known.keys().map(String::as_str)),
                });
            }
        }
    }
    let parsed: P = serde_path_to_error::deserialize(&params).map_err(|err| {
        let field = err.path().to_string();
        let field = if field == "." { String::new() } else { field };
        let message = err.inner().to_string();
        let suggestion = unknown_field(&message).and_then(|name| {
            let schema = schemars::schema_for!(P);
            let known: Vec<String> = schema
                .get("properties")
                .and_then(|p| p.as_object())
                .map(|p| p.keys().cloned().collect())
                .unwrap_or_default();
            nearest(name, known.iter().map(String::as_str))
        });
        ParamError {
            field,
            message,
            suggestion,
        }
    })?;
    Ok(serde_json::to_value(parsed).expect("params serialise"))
}

/// The name in serde's "unknown field `x`, expected ..." message.
fn unknown_field(message: &str) -> Option<&str> {
    let rest = message.strip_prefix("unknown field `")?;
    rest.split('`').next()
}

/// The candidate closest to `name`, if close enough to be a likely typo.
pub fn nearest<'a>(name: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<String> {
    candidates
        .into_iter()
        .map(|c| (strsim::damerau_levenshtein(name, c), c))
        .filter(|(d, c)| *d <= 2.max(c.len() / 3))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c.to_string())
}

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
