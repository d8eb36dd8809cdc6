//! Site settings: which executor runs the stages and how it talks to the
//! cluster (partition, account, polling, jobs in flight, extra `sbatch`
//! flags). They live in a profile file, never in the manifest, and are never
//! hashed: the same manifest gives the same fingerprints on a laptop and on
//! a cluster.
//!
//! `--profile NAME` reads `NAME.yaml` from `alignflow/profiles/` beside the
//! manifest (the project), then from the user's config folder
//! (`$XDG_CONFIG_HOME/alignflow/profiles/`, else `~/.config/...`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Where stages run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ExecutorKind {
    /// Worker processes on this machine (the default).
    #[default]
    Local,
    /// One Slurm job per stage (`sbatch`), the cache on a shared filesystem.
    Slurm,
}

impl std::str::FromStr for ExecutorKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "local" => Ok(ExecutorKind::Local),
            "slurm" => Ok(ExecutorKind::Slurm),
            other => Err(format!(
                "unknown executor `{other}` (expected `local` or `slurm`)"
            )),
        }
    }
}

/// A profile file (`alignflow/profiles/NAME.yaml`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// `local` or `slurm`.
    #[serde(default)]
    pub executor: ExecutorKind,
    /// How the slurm executor submits and watches jobs.
    #[serde(default)]
    pub slurm: SlurmSettings,
}

/// The slurm executor's site settings.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct SlurmSettings {
    /// `--partition` (the cluster's default when unset).
    pub partition: Option<String>,
    /// `--account` to charge.
    pub account: Option<String>,
    /// Seconds between two `squeue` calls (one call per tick for all of the
    /// run's jobs); quiet ticks back off up to 8 times this.
    pub poll_interval: f64,
    /// Jobs of this run queued or running at once.
    pub max_jobs: usize,
    /// More `sbatch` flags, as given (`--qos=high`, `--constraint=a100`).
    pub sbatch_flags: Vec<String>,
    /// Submissions of one stage in this run (the first one included) before
    /// a lost, timed-out, preempted or cancelled job fails the stage.
    pub max_attempts: u32,
    /// Seconds a job may be missing from `squeue` with no record before it
    /// counts as lost.
    pub lost_after: f64,
    /// Seconds before the time limit the job gets SIGUSR1 (`--signal`), to
    /// checkpoint.
    pub signal_before: u32,
    /// The `alignflow` binary the job runs (default: this one, as it was
    /// when the run started; it must be at the same path on the nodes).
    pub alignflow: Option<PathBuf>,
    /// Seconds an `sbatch`, `squeue` or `scancel` call may take before it
    /// is killed and counts as failed (a controller that accepts and never
    /// answers, a client stalled on a hung filesystem): a killed sbatch is
    /// tried again like one that timed out by itself.
    pub command_timeout: f64,
}

impl Default for SlurmSettings {
    fn default() -> Self {
        SlurmSettings {
            partition: None,
            account: None,
            poll_interval: 5.0,
            max_jobs: 100,
            sbatch_flags: Vec::new(),
            max_attempts: 3,
            lost_after: 60.0,
            signal_before: 120,
            alignflow: None,
            command_timeout: 120.0,
        }
    }
}

impl SlurmSettings {
    pub fn poll(&self) -> Duration {
        Duration::from_secs_f64(self.poll_interval.max(0.05))
    }

    pub fn command_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.command_timeout.max(0.05))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("profile `{name}` not found (looked for {})", .looked.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "))]
    NotFound { name: String, looked: Vec<PathBuf> },
    #[error("{}: {source}", .path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {message}", .path.display())]
    Invalid { path: PathBuf, message: String },
}

/// The files `--profile NAME` may name, in the order they are tried.
pub fn profile_candidates(name: &str, project: &Path) -> Vec<PathBuf> {
    let file = format!("{name}.yaml");
    let mut out = vec![project.join("alignflow").join("profiles").join(&file)];
    let config = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")));
    if let Some(config) = config {
        out.push(config.join("alignflow").join("profiles").join(&file));
    }
    out
}

impl Profile {
    /// The profile `name` for a manifest in folder `project`.
    pub fn find(name: &str, project: &Path) -> Result<(Profile, PathBuf), ProfileError> {
        let looked = profile_candidates(name, project);
        let path = looked
            .iter()
            .find(|p| p.is_file())
            .cloned()
            .ok_or_else(|| ProfileError::NotFound {
                name: name.to_string(),
                looked: looked.clone(),
            })?;
        Ok((Profile::load(&path)?, path))
    }

    pub fn load(path: &Path) -> Result<Profile, ProfileError> {
        let text = std::fs::read_to_string(path).map_err(|source| ProfileError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let de = serde_yaml::Deserializer::from_str(&text);
        let profile: Profile =
            serde_path_to_error::deserialize(de).map_err(|e| ProfileError::Invalid {
                path: path.to_path_buf(),
                message: match e.path().to_string().as_str() {
                    "." => e.inner().to_string(),
                    field => format!("field `{field}`: {}", e.inner()),
                },
            })?;
        let s = &profile.slurm;
        let bad = if s.max_jobs == 0 {
            Some("slurm.max_jobs must be at least 1")
        } else if s.max_attempts == 0 {
            Some("slurm.max_attempts must be at least 1")
        } else if s.poll_interval.is_nan() || s.poll_interval <= 0.0 {
            Some("slurm.poll_interval must be a positive number of seconds")
        } else if s.command_timeout.is_nan() || s.command_timeout <= 0.0 {
            Some("slurm.command_timeout must be a positive number of seconds")
        } else {
            None
        };
        if let Some(message) = bad {
            return Err(ProfileError::Invalid {
                path: path.to_path_buf(),
                message: message.into(),
            });
        }
        for (i, flag) in s.sbatch_flags.iter().enumerate() {
            if let Some(why) = engine_owned_flag(flag) {
                return Err(ProfileError::Invalid {
                    path: path.to_path_buf(),
                    message: format!("field `slurm.sbatch_flags[{i}]`: `{flag}` {why}"),
                });
            }
        }
        Ok(profile)
    }
}

/// Why an sbatch flag is the engine's to set, if it is. The engine finds,
/// follows and cancels a run's jobs by name on the local cluster, and
/// reads each job's output and answer itself: a flag that renames the job,
/// sends it to another cluster, moves its output, makes an array of it or
/// makes sbatch wait for it would leave the engine blind to the job (and
/// resubmitting, as for a lost one, jobs it could not cancel).
fn engine_owned_flag(flag: &str) -> Option<&'static str> {
    let name = flag.split('=').next().unwrap_or(flag);
    // `-Jname`: a short option with its value attached.
    let short = |o: &str| name == o || (name.starts_with(o) && !name.starts_with("--"));
    if name == "--job-name" || short("-J") {
        Some("is the engine's: every job of a run is named after the run, which `squeue` and `scancel` look for")
    } else if name == "--clusters" || short("-M") {
        Some("sends the job to another cluster, where the engine's `squeue` and `scancel` do not look: run the engine where the cluster is local")
    } else if ["--output", "--error", "--chdir"].contains(&name)
        || short("-o")
        || short("-e")
        || short("-D")
    {
        Some("is the engine's: it reads each job's output from the run's folder")
    } else if name == "--array" || short("-a") {
        Some("makes an array of the stage's job: a stage is one job")
    } else if name == "--wait" || short("-W") {
        Some("makes sbatch wait for the job's end, which the engine follows itself")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_that_hide_a_job_from_the_engine_are_refused_naming_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.yaml");
        for (flag, says) in [
            ("--job-name=mine", "named after the run"),
            ("-Jmine", "named after the run"),
            ("-M", "another cluster"),
            ("--clusters=other", "another cluster"),
            ("--output=/tmp/x", "reads each job's output"),
            ("-o", "reads each job's output"),
            ("--array=0-3", "a stage is one job"),
            ("--wait", "follows itself"),
        ] {
            std::fs::write(
                &path,
                format!(
                    "executor: slurm\nslurm: {{ sbatch_flags: [\"--qos=high\", \"{flag}\"] }}\n"
                ),
            )
            .unwrap();
            let err = Profile::load(&path).unwrap_err().to_string();
            assert!(
                err.contains("p.yaml")
                    && err.contains("slurm.sbatch_flags[1]")
                    && err.contains(says),
                "{flag}: {err}"
            );
        }
        for fine in [
            "--qos=high",
            "--constraint=a100",
            "--mail-type=END",
            "--exclusive",
            "--export=NONE",
        ] {
            std::fs::write(
                &path,
                format!("executor: slurm\nslurm: {{ sbatch_flags: [\"{fine}\"] }}\n"),
            )
            .unwrap();
            assert!(Profile::load(&path).is_ok(), "{fine}");
        }
    }

    #[test]
    fn a_profile_names_its_bad_field() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.yaml");
        std::fs::write(&path, "executor: slurm\nslurm: { partiton: gpu }\n").unwrap();
        let err = Profile::load(&path).unwrap_err().to_string();
        assert!(err.contains("p.yaml") && err.contains("partiton"), "{err}");
        std::fs::write(
            &path,
            "executor: slurm\nslurm: { partition: gpu, max_jobs: 4 }\n",
        )
        .unwrap();
        let p = Profile::load(&path).unwrap();
        assert_eq!(p.executor, ExecutorKind::Slurm);
        assert_eq!(p.slurm.partition.as_deref(), Some("gpu"));
        assert_eq!(p.slurm.max_jobs, 4);
        assert_eq!(p.slurm.max_attempts, 3);
    }

    #[test]
    fn the_project_profile_comes_before_the_users() {
        let dir = tempfile::tempdir().unwrap();
        let found = profile_candidates("hpc", dir.path());
        assert_eq!(found[0], dir.path().join("alignflow/profiles/hpc.yaml"));
        let err = Profile::find("hpc", dir.path()).unwrap_err().to_string();
        assert!(err.contains("profile `hpc` not found"), "{err}");
    }
}
