//! The op layer of alignflow, shared by the engine and the worker.
//!
//! Each op is one file here holding one `const` [`OpDecl`] (name, version,
//! ports, params type, placement) and its params struct; [`REGISTRY`] lists
//! them. Data ops run here, in the engine process ([`Placement::Engine`]);
//! tensor ops ([`Placement::Worker`]) are only declared here and run in the
//! `alignflow-worker` process, which implements them under the same file
//! names. The stage contract ([`stage`]), the engine-worker [`protocol`],
//! data records ([`data`]) and text helpers ([`text`]) live here too, so
//! neither side depends on the other.

pub mod chat_format;
pub mod chat_template;
pub mod checkpoint_request;
pub mod data;
pub mod decoding;
pub mod defaults;
pub mod op;
pub mod protocol;
pub mod reward_program;
pub mod rewards;
pub mod stage;
pub mod text;

pub mod ai_feedback;
pub mod baseline_scores;
pub mod best_of_n;
pub mod constitution_import;
pub mod critique_revise;
pub mod dataset_import;
pub mod dataset_split;
mod describe;
pub mod dpo;
pub mod evaluate;
pub mod exec;
pub mod generate;
pub mod lm_pretrain;
pub mod memory;
pub mod pm;
pub mod ppo;
pub mod role_devices;
pub mod sft;
pub mod tokenizer_train;
pub mod training;

pub use ai_feedback::AiFeedbackParams;
pub use baseline_scores::{BaselineRecord, BaselineScoresParams};
pub use best_of_n::BestOfNParams;
pub use chat_format::{ChatFormat, ChatTemplateChoice, Completion, PromptParams};
pub use critique_revise::{
    choose_principles, critique_messages, critique_prompt, cut_at_stop, few_shot_messages,
    few_shot_prefix, revision_messages, revision_prompt, CritiqueReviseParams, PrincipleSampling,
    RevisionRecord, SftRecord, TrailStep, STOP_STRINGS,
};
pub use decoding::DecodingParams;
pub use describe::describe;
pub use dpo::{DpoLoss, DpoParams, DpoReferenceParams};
pub use evaluate::EvaluateParams;
pub use generate::GenerateParams;
pub use lm_pretrain::{Family, PretrainParams};
pub use memory::Dtype;
pub use op::{
    nearest, normalize, BindingError, OpDecl, OpParams, Outputs, ParamError, ParamsDecl, Placement,
    Port,
};
pub use pm::{PmParams, PmPretrainParams, PmTrainParams, PM_TRAIN_SETS};
pub use ppo::{
    PpoAdvantage, PpoKlEstimator, PpoKlMode, PpoLrSchedule, PpoParams, PpoRewardNorm, PpoValueInit,
    PpoValueModel,
};
pub use role_devices::{Role, RoleDevices};
pub use sft::SftParams;
pub use stage::{CancelFlag, Cancelled, NullReporter, Reporter, RunFn, StageContext};
pub use tokenizer_train::corpus_texts;

/// Every registered op, in display order.
pub static REGISTRY: &[&OpDecl] = &[
    &ai_feedback::OP,
    &baseline_scores::OP,
    &best_of_n::OP,
    &constitution_import::OP,
    &critique_revise::OP,
    &dataset_import::OP,
    &dataset_split::OP,
    &dpo::OP,
    &dpo::REFERENCE_OP,
    &evaluate::OP,
    &exec::OP,
    &generate::OP,
    &lm_pretrain::OP,
    &pm::PRETRAIN_OP,
    &pm::TRAIN_OP,
    &ppo::OP,
    &sft::OP,
    &tokenizer_train::OP,
];

/// The op registered under `name`.
pub fn find(name: &str) -> Option<&'static OpDecl> {
    REGISTRY.iter().copied().find(|op| op.name == name)
}
