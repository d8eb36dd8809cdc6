//! What a stage is fed from the cache, and what it may do to it. Before a
//! stage runs, each input it reads from the store is checked against its id
//! (a stat per file through the hash memo; a read only when something
//! changed), so corruption is never passed on; `exec` stages get private
//! copies of their file inputs; and every input path is watched, so a stage
//! that changed one fails, and a store object it damaged is quarantined.
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use crate::cache::{ArtifactKind, Cache, StageKey};
use crate::manifest::{Input, Stage};
use crate::ops::OpDecl;
use crate::protocol::StageSpec;

use super::input_guard::{InputChange, InputSnapshot};
use super::private_inputs::privatise;

/// Fails when an input the stage reads from the store is not what its id
/// names; the corrupt object is quarantined, so the next run recomputes it
/// (its producer's record becomes a miss). Blocking.
pub(super) fn check_store_inputs(
    cache: &Cache,
    stage: &Stage,
    key: &StageKey,
) -> anyhow::Result<()> {
    for (name, input) in &stage.inputs {
        let Input::Stage {
            stage: upstream,
            output,
            ..
        } = input
        else {
            continue;
        };
        let id = &key.inputs[name];
        let damage = cache.check_artifact(id)?;
        if damage.is_clean() {
            continue;
        }
        cache.quarantine(&damage)?;
        anyhow::bail!(
            "stage `{}`: input `{name}` (output `{output}` of stage `{upstream}`, {id}) is corrupt \
             in the cache, so the stage was not run: {}; the corrupt object was moved to \
             quarantine/ and the next run recomputes `{upstream}`",
            stage.id,
            damage.problems.join("; ")
        );
    }
    Ok(())
}

/// Gives an `exec` stage private read-only copies of its file inputs from
/// the store (in `staging`), then notes the state of every input path the
/// stage is handed, except those private copies (what happens to them
/// concerns the stage alone). Blocking.
pub(super) fn guard_inputs(
    stage: &Stage,
    op: &'static OpDecl,
    key: &StageKey,
    spec: &mut StageSpec,
    staging: &Path,
) -> anyhow::Result<InputSnapshot> {
    let private = if op.name == crate::ops::exec::OP.name {
        let store_files: Vec<String> = stage
            .inputs
            .iter()
            .filter(|(name, input)| {
                matches!(input, Input::Stage { .. }) && key.inputs[*name].kind == ArtifactKind::File
            })
            .map(|(name, _)| name.clone())
            .collect();
        privatise(&mut spec.inputs, &store_files, staging)?
    } else {
        BTreeSet::new()
    };
    let watched: Vec<(String, PathBuf)> = spec
        .inputs
        .iter()
        .filter(|(name, _)| !private.contains(*name))
        .map(|(name, path)| (name.clone(), path.clone()))
        .collect();
    Ok(InputSnapshot::take(&watched)?)
}

/// The error of a stage that changed its inputs; each store object it
/// touched is rehashed: quarantined if its content changed, its read-only
/// modes restored if not. Blocking.
pub(super) fn changed_inputs(
    cache: &Cache,
    stage: &Stage,
    key: &StageKey,
    changes: &[InputChange],
) -> anyhow::Error {
    let mut lines: Vec<String> = changes.iter().map(|c| format!("  {c}")).collect();
    let names: BTreeSet<&str> = changes.iter().map(|c| c.input.as_str()).collect();
    for name in names {
        let Some(Input::Stage {
            stage: upstream,
            output,
            ..
        }) = stage.inputs.get(name)
        else {
            lines.push(format!(
                "  `{name}` is a path outside the cache: check it before running again"
            ));
            continue;
        };
        let id = &key.inputs[name];
        let what = format!("`{name}` (output `{output}` of stage `{upstream}`, {id})");
        lines.push(match cache.check_artifact(id) {
            Ok(damage) if damage.is_clean() => match cache.reseal(id) {
                Ok(()) => format!(
                    "  {what}: its content in the cache is intact (read-only modes restored)"
                ),
                Err(e) => format!("  {what}: its content in the cache is intact, but: {e}"),
            },
            Ok(damage) => match cache.quarantine(&damage) {
                Ok(_) => format!(
                    "  {what}: the stage corrupted it in the cache ({}); it was moved to \
                     quarantine/ and the next run recomputes `{upstream}`",
                    damage.problems.join("; ")
                ),
                Err(e) => format!(
                    "  {what}: the stage corrupted it in the cache and it could not be \
                     quarantined ({e}): run `alignflow cache verify --repair`"
                ),
            },
            Err(e) => format!("  {what}: cannot check it: {e}: run `alignflow cache verify`"),
        });
    }
    anyhow::anyhow!(
        "stage `{}` changed its inputs while it ran, so its outputs were not recorded:\n{}",
        stage.id,
        lines.join("\n")
    )
}
