//! Why a stage the lockfile has never seen must run, from what the cache
//! remembers: a new experiment that includes a pipeline, an ad-hoc run, or a
//! matrix instance has no lockfile entry, yet the cache usually holds a run
//! of the same stage to compare with ("params.kl_coef changed 0.05 -> 0.1"
//! instead of "never run").

use std::cell::OnceCell;

use crate::cache::{Cache, StageKey, StageRecord};
use crate::manifest::{Pipeline, Stage};

use super::execute::not_bitwise;
use super::lockfile::{LockedInput, LockedStage};
use super::plan::{describe_changes, explain_changes};

/// The cache's records, read once per plan and only if a stage needs them.
pub(super) struct History<'a> {
    cache: &'a Cache,
    records: OnceCell<Vec<StageRecord>>,
}

impl<'a> History<'a> {
    pub fn new(cache: &'a Cache) -> History<'a> {
        History {
            cache,
            records: OnceCell::new(),
        }
    }

    fn records(&self) -> &[StageRecord] {
        self.records.get_or_init(|| {
            let mut all = self.cache.records().unwrap_or_else(|e| {
                tracing::debug!("cache records unreadable for the plan's reasons: {e}");
                Vec::new()
            });
            // Newest first: the run a user remembers.
            all.sort_by(|a, b| b.finished_at.cmp(&a.finished_at));
            all
        })
    }

    /// Why `stage` (key `key`, not cached) runs, compared with a cached run
    /// of the same stage id: this pipeline's newest, else the one that
    /// differs least (an experiment including another pipeline compares
    /// with that pipeline's run, not with an unrelated pipeline's stage of
    /// the same name that ran last); else with a cached stage that differs
    /// only in its seed. `None` when the cache has neither.
    pub fn reason(&self, pipeline: &Pipeline, stage: &Stage, key: &StageKey) -> Option<String> {
        let records = self.records();
        let same_id = || records.iter().filter(|r| r.stage == stage.id);
        let differences = |r: &StageRecord| explain_changes(pipeline, stage, &as_locked(r), key);
        let closest = same_id()
            .find(|r| r.pipeline == pipeline.name)
            .map(|r| (r, differences(r)))
            .or_else(|| {
                same_id()
                    .map(|r| (r, differences(r)))
                    .min_by_key(|(_, changes)| changes.len())
            });
        if let Some((r, changes)) = closest {
            let diff = describe_changes(changes);
            return Some(format!(
                "{diff} (against the cached run of pipeline `{}`)",
                r.pipeline
            ));
        }
        let twin = records.iter().find(|r| {
            r.key.op == key.op
                && r.key.op_version == key.op_version
                && r.key.params == key.params
                && r.key.inputs == key.inputs
        })?;
        Some(format!(
            "same op, params and inputs as the cached stage `{}` of pipeline `{}`, but a stage's seed derives from the pipeline seed and its own id (`{}`), so it runs with its own seed",
            twin.stage, twin.pipeline, stage.id
        ))
    }
}

/// A record seen as the lockfile entry `explain` compares with.
fn as_locked(r: &StageRecord) -> LockedStage {
    LockedStage {
        op: r.key.op.clone(),
        op_version: r.key.op_version,
        fingerprint: r.fingerprint.clone(),
        seed: r.key.seed,
        params: r.key.params.clone(),
        inputs: r
            .key
            .inputs
            .iter()
            .map(|(name, id)| {
                let input = LockedInput {
                    path: None,
                    stage: None,
                    output: None,
                    id: id.clone(),
                };
                (name.clone(), input)
            })
            .collect(),
        outputs: r.outputs.clone(),
        not_bitwise: not_bitwise(&r.metrics),
    }
}
