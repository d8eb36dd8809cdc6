//! Tensor op implementations, by op name. The declaration of each (params,
//! inputs, outputs, version) lives in `alignflow_ops` under the same file
//! name; this table holds the code that needs libtorch.

use alignflow_ops::RunFn;

pub mod ai_feedback;
mod baseline_scores;
mod best_of_n;
mod critique_revise;
pub mod dpo;
mod evaluate;
mod examples;
mod generate;
mod lm_pretrain;
mod load;
pub mod metrics_log;
pub mod pm;
pub mod ppo;
mod prompts;
pub mod rendered;
pub mod rollout;
mod sampling;
pub mod scoring;
pub mod sft;
pub mod training;

/// The worker-side implementation of `op`, if it is a tensor op.
pub fn implementation(op: &str) -> Option<RunFn> {
    let table: &[(&str, RunFn)] = &[
        ("ai_feedback", ai_feedback::run),
        ("baseline_scores", baseline_scores::run),
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

#[cfg(test)]
mod tests {
    use alignflow_ops::{Placement, REGISTRY};

    use super::implementation;

    /// The op layer's registry and this table agree: every op declared to
    /// run in the worker has an implementation here, and nothing else does.
    #[test]
    fn every_worker_op_has_an_implementation_and_only_those() {
        for op in REGISTRY {
            let here = implementation(op.name).is_some();
            match op.placement {
                Placement::Worker => assert!(here, "worker op `{}` has no implementation", op.name),
                Placement::Engine(_) => {
                    assert!(!here, "engine op `{}` is implemented here too", op.name)
                }
            }
        }
    }
}
