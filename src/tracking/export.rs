//! `alignflow export-tb`: the `metrics` outputs of a pipeline's cached
//! stages written as TensorBoard runs, the same runs `run --tensorboard`
//! streams while the stages run.

use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::cache::Cache;
use crate::engine::{self, Action};
use crate::graph::Dag;
use crate::manifest::Pipeline;

use super::points;
use super::tensorboard::TbRun;

/// One stage exported.
#[derive(Debug, Clone)]
pub struct Exported {
    pub stage: String,
    /// Its run folder.
    pub dir: PathBuf,
    /// Lines of its `metrics.jsonl` written.
    pub points: usize,
}

/// Writes a run under `root` for every stage the cache holds up to date
/// with a `metrics` output (as `alignflow plan` sees them: a stale stage's
/// older curves are not the pipeline's).
pub fn export_tensorboard(
    pipeline: &Pipeline,
    dag: &Dag,
    cache: &Cache,
    root: &Path,
) -> anyhow::Result<Vec<Exported>> {
    let (plan, _) = engine::plan_from_cache(pipeline, dag, cache)?;
    let mut exported = Vec::new();
    for planned in plan.stages.iter().filter(|p| p.action == Action::Cached) {
        let stage = &pipeline.stages[planned.index];
        let Some(fp) = &planned.fingerprint else {
            continue;
        };
        let Some(record) = cache.record(fp)? else {
            continue;
        };
        let Some(id) = record.outputs.get("metrics") else {
            continue;
        };
        let path = cache.artifact_path(id);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("stage `{}`: reading {}", stage.id, path.display()))?;
        let points = points::parse_all(&text);
        let mut run = TbRun::create(root, &stage.id)?;
        run.write(&points)?;
        exported.push(Exported {
            stage: stage.id.clone(),
            dir: run.dir().to_path_buf(),
            points: points.len(),
        });
    }
    Ok(exported)
}
