//! Tensor op implementations, by op name. The engine-side declaration of each
//! (params, inputs, outputs, version) lives in `alignflow::ops`; this table
//! holds the code that needs libtorch.

use alignflow::ops::StageContext;
use alignflow::protocol::Metrics;

pub mod ai_feedback;
mod best_of_n;
pub mod common;
mod critique_revise;
pub mod dpo;
mod evaluate;
mod generate;
mod lm_pretrain;
pub mod pm;
pub mod ppo;
mod prompts;
pub mod sft;

/// A tensor op's entry point.
pub type RunFn = fn(&StageContext<'_>) -> anyhow::Result<Metrics>;

/// The worker-side implementation of `op`, if it is a tensor op.
pub fn find(op: &str) -> Option<RunFn> {
    let table: &[(&str, RunFn)] = &[
        ("ai_feedback", ai_feedback::run),
        ("baseline_scores", ppo::baseline_scores::run),
        ("best_of_n", best_of_n::run),
        ("critique_revise", critique_revise::run),
        ("dpo", dpo::run),
        ("dpo.reference", dpo::run_reference),
        ("evaluate", evaluate::run),
        ("generate", generate::run),
        ("lm.pretrain", lm_pretrain::run),
        ("pm.pretrain", pm::run_pretrain),
        ("pm.train", pm::run_train),
        ("ppo", ppo::run),
        ("sft", sft::run),
    ];
    table
        .iter()
        .find(|(name, _)| *name == op)
        .map(|(_, run)| *run)
}
