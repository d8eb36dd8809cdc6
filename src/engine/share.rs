//! Which stages `cache push` and `cache pull` of a manifest cover: the
//! plan decides, with the same fingerprints `run` computes.
use std::collections::BTreeSet;

use crate::cache::{Cache, Fingerprint, StageRecord};
use crate::graph::Dag;
use crate::manifest::Pipeline;
use crate::remote::Remote;

use super::plan::{plan, Action, PlanContext, REMOTE_REASON};
use super::Error;

/// The local records of the `targets` (and their ancestors; every stage
/// when empty), and for each stage the cache lacks, why it has none.
pub fn records_to_push(
    pipeline: &Pipeline,
    dag: &Dag,
    cache: &Cache,
    targets: &[String],
) -> Result<(Vec<StageRecord>, Vec<String>), Error> {
    let selected = dag.select(pipeline, targets)?;
    let the_plan = plan(&ctx(pipeline, dag, cache, None), &selected)?;
    let mut records = Vec::new();
    let mut missing = Vec::new();
    for p in &the_plan.stages {
        let id = &pipeline.stages[p.index].id;
        match (&p.action, &p.fingerprint) {
            (Action::Cached, Some(fp)) => match cache.record(fp)? {
                Some(record) => records.push(record),
                None => missing.push(format!("stage `{id}`: no record")),
            },
            _ => missing.push(format!(
                "stage `{id}` is not in the local cache ({}): run it first",
                p.reason
            )),
        }
    }
    Ok((records, missing))
}

/// The fingerprints of `pipeline`'s stages that `remote` holds and the
/// local cache lacks, in run order (each stage's fingerprint comes from its
/// upstream's outputs as the remote records them).
pub fn fingerprints_to_pull(
    pipeline: &Pipeline,
    dag: &Dag,
    cache: &Cache,
    remote: &Remote,
) -> Result<Vec<Fingerprint>, Error> {
    let selected: BTreeSet<usize> = (0..pipeline.stages.len()).collect();
    let the_plan = plan(&ctx(pipeline, dag, cache, Some(remote)), &selected)?;
    Ok(the_plan
        .stages
        .iter()
        .filter(|p| p.reason == REMOTE_REASON)
        .filter_map(|p| p.fingerprint.clone())
        .collect())
}

fn ctx<'a>(
    pipeline: &'a Pipeline,
    dag: &'a Dag,
    cache: &'a Cache,
    remote: Option<&'a Remote>,
) -> PlanContext<'a> {
    PlanContext {
        pipeline,
        dag,
        cache,
        lockfile: None,
        rehash: false,
        locked: false,
        remote,
        // Only a pull reads the remote here: it is the command's job.
        remote_must_answer: remote.is_some(),
    }
}
