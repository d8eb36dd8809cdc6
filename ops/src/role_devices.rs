//! `placement`: the device of each model of a stage that holds several
//! (`ppo`, `evaluate`, `best_of_n`), by role. A role left out runs on the
//! stage's device. GPUs are named as the stage sees them: `cuda:0` is the
//! stage's first GPU, `cuda:1` its second, so the same manifest means the
//! same layout whichever GPUs the engine (or Slurm) hands the stage.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::op::ParamError;

/// Devices by role: `cpu`, `cuda` (the stage's first GPU) or `cuda:N`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RoleDevices {
    /// The sampled (and, in `ppo`, trained) policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// The frozen reference policy (`ppo`'s KL anchor, `evaluate`'s
    /// `reference`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    /// The reward sources that are models: the preference model and the
    /// feedback model (direct RLAIF, `evaluate`'s judges).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reward: Option<String>,
    /// `ppo`'s value model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}

/// A role of [`RoleDevices`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Policy,
    Reference,
    Reward,
    Value,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Policy => "policy",
            Role::Reference => "reference",
            Role::Reward => "reward",
            Role::Value => "value",
        }
    }
}

const ROLES: [Role; 4] = [Role::Policy, Role::Reference, Role::Reward, Role::Value];

impl RoleDevices {
    /// For `skip_serializing_if`: no placement leaves the normalised
    /// params (and the fingerprints) as they were before it existed.
    pub fn is_empty(&self) -> bool {
        ROLES.iter().all(|&r| self.of(r).is_none())
    }

    /// The device placed for `role`, if one is.
    pub fn of(&self, role: Role) -> Option<&str> {
        match role {
            Role::Policy => self.policy.as_deref(),
            Role::Reference => self.reference.as_deref(),
            Role::Reward => self.reward.as_deref(),
            Role::Value => self.value.as_deref(),
        }
    }

    /// Checks each device string, and that only the op's `roles` are
    /// placed (`field`: the param's name, for the error).
    pub fn check(&self, field: &str, roles: &[Role]) -> Result<(), ParamError> {
        for role in ROLES {
            let Some(device) = self.of(role) else {
                continue;
            };
            let at = format!("{field}.{}", role.name());
            if !roles.contains(&role) {
                let names: Vec<&str> = roles.iter().map(|r| r.name()).collect();
                return Err(ParamError::invalid(
                    &at,
                    format!(
                        "this op has no `{}` model to place (its roles: {})",
                        role.name(),
                        names.join(", ")
                    ),
                ));
            }
            if gpu_index(device).is_none() && device != "cpu" {
                return Err(ParamError::invalid(
                    &at,
                    format!("`{device}` is not a device: use `cpu`, `cuda` or `cuda:N`"),
                ));
            }
        }
        Ok(())
    }

    /// GPUs the placement needs the stage to have: one more than the
    /// highest GPU index it names (0 when it names none).
    pub fn gpus(&self) -> usize {
        ROLES
            .iter()
            .filter_map(|&r| self.of(r).and_then(gpu_index))
            .map(|i| i + 1)
            .max()
            .unwrap_or(0)
    }

    /// Data-parallel rank `rank`'s copy of the placement, where each rank
    /// holds `per_rank` of the stage's GPUs, in order: the rank's `cuda:i`
    /// is the stage's `cuda:(rank * per_rank + i)`. The CPU, and a string
    /// that is not a device (the op names it), stay as they are.
    pub fn for_rank(&self, rank: usize, per_rank: usize) -> RoleDevices {
        let shift = |device: &Option<String>| {
            device.as_ref().map(|d| match gpu_index(d) {
                Some(i) => format!("cuda:{}", rank * per_rank + i),
                None => d.clone(),
            })
        };
        RoleDevices {
            policy: shift(&self.policy),
            reference: shift(&self.reference),
            reward: shift(&self.reward),
            value: shift(&self.value),
        }
    }
}

/// The stage-relative index of a GPU device string (`cuda` is `cuda:0`).
pub fn gpu_index(device: &str) -> Option<usize> {
    match device {
        "cuda" => Some(0),
        other => other.strip_prefix("cuda:")?.parse().ok(),
    }
}

/// The stage's GPUs each data-parallel rank (or the one process) holds:
/// those the stage's `placement` names (`placed`; each rank holds its own
/// copy of every model, see [`RoleDevices::for_rank`]), at least one for a
/// rank on a GPU (`on_gpu`), none for one whose models are all on the CPU.
pub fn gpus_per_rank(placed: usize, on_gpu: bool) -> usize {
    match on_gpu {
        true => placed.max(1),
        false => placed,
    }
}

/// Which run of `per_rank` GPUs a data-parallel rank on a Slurm node takes
/// (the `rank` of [`RoleDevices::for_rank`]) among the `visible` GPUs its
/// process sees, where it is the node's `local_id`-th task
/// (`SLURM_LOCALID`; rank 0, in the job's batch step, is its node's first).
///
/// Slurm gives a job of `--gpus-per-task` each task of a step its own
/// GPUs (`CUDA_VISIBLE_DEVICES` lists them: run 0 is the task's), and the
/// batch step all of its node's, the first task's first; without
/// per-task binding every task sees all of its node's and takes the
/// `local_id`-th run, as torchrun's `LOCAL_RANK` does. Either way no two
/// ranks of a node share a GPU: a task that sees enough GPUs for the
/// node-wide layout takes its local run, one that sees only its own takes
/// the first. `None` when it sees fewer than `per_rank`.
pub fn slurm_gpu_run(visible: usize, local_id: usize, per_rank: usize) -> Option<usize> {
    if visible >= (local_id + 1) * per_rank {
        Some(local_id)
    } else if visible >= per_rank {
        Some(0)
    } else {
        None
    }
}

/// The GPUs a stage's `placement` param (`params["placement"]`) names, 0
/// without one or with an invalid one: what the engine reserves before the
/// op runs (the op checks the param and names what is wrong).
pub fn gpus_named(placement: Option<&serde_json::Value>) -> usize {
    placement
        .and_then(|p| serde_json::from_value::<RoleDevices>(p.clone()).ok())
        .map_or(0, |p| p.gpus())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_are_checked_roles_limited_and_gpus_counted() {
        let p: RoleDevices = serde_json::from_value(serde_json::json!({
            "policy": "cuda:0", "reference": "cuda:2", "reward": "cpu"
        }))
        .unwrap();
        assert_eq!(p.gpus(), 3);
        assert!(p.check("placement", &ROLES).is_ok());
        let err = p
            .check("placement", &[Role::Policy, Role::Reference])
            .unwrap_err();
        assert_eq!(err.field, "placement.reward");
        let bad = RoleDevices {
            value: Some("gpu1".into()),
            ..RoleDevices::default()
        };
        let err = bad.check("placement", &ROLES).unwrap_err();
        assert_eq!(err.field, "placement.value");
        assert!(
            err.message.contains("`gpu1` is not a device"),
            "{}",
            err.message
        );
        assert!(RoleDevices::default().is_empty());
        assert_eq!(RoleDevices::default().gpus(), 0);
        assert_eq!(gpu_index("cuda"), Some(0));
        assert_eq!(gpu_index("cuda:x"), None);
        assert!(
            serde_json::from_value::<RoleDevices>(serde_json::json!({"critic": "cpu"})).is_err()
        );
        assert_eq!(gpus_named(Some(&serde_json::json!({"value": "cuda:1"}))), 2);
        assert_eq!(gpus_named(Some(&serde_json::json!({"value": 3}))), 0);
        assert_eq!(gpus_named(None), 0);
    }

    #[test]
    fn each_rank_takes_its_own_run_of_the_stages_gpus() {
        let p: RoleDevices = serde_json::from_value(serde_json::json!({
            "policy": "cuda", "reference": "cuda:1", "reward": "cpu"
        }))
        .unwrap();
        assert_eq!(p.for_rank(0, 2), {
            let mut same = p.clone();
            same.policy = Some("cuda:0".into());
            same
        });
        let third = p.for_rank(2, 2);
        assert_eq!(third.policy.as_deref(), Some("cuda:4"));
        assert_eq!(third.reference.as_deref(), Some("cuda:5"));
        assert_eq!(third.reward.as_deref(), Some("cpu"));
        assert_eq!(third.value, None);
        // Not a device: left for the op's check to name.
        let bad = RoleDevices {
            value: Some("gpu1".into()),
            ..RoleDevices::default()
        };
        assert_eq!(bad.for_rank(1, 3), bad);
        assert_eq!(gpus_per_rank(2, true), 2);
        assert_eq!(gpus_per_rank(2, false), 2);
        assert_eq!(gpus_per_rank(0, true), 1);
        assert_eq!(gpus_per_rank(0, false), 0);
    }

    #[test]
    fn a_slurm_task_takes_its_local_run_or_the_only_one_it_sees() {
        // Per-task binding: the task sees its own GPU(s) only.
        assert_eq!(slurm_gpu_run(1, 1, 1), Some(0));
        assert_eq!(slurm_gpu_run(2, 3, 2), Some(0));
        // Every task sees its node's GPUs: the local id's run.
        assert_eq!(slurm_gpu_run(4, 1, 1), Some(1));
        assert_eq!(slurm_gpu_run(4, 1, 2), Some(1));
        // Rank 0, in the batch step, sees the node's GPUs and takes the first run.
        assert_eq!(slurm_gpu_run(8, 0, 2), Some(0));
        // Too few for one rank.
        assert_eq!(slurm_gpu_run(1, 0, 2), None);
        assert_eq!(slurm_gpu_run(0, 0, 1), None);
    }
}
