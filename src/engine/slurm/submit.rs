//! Submitting a stage's job: the job script (one command, `alignflow stage
//! exec SPEC.json`) and the `sbatch --parsable` call with the stage's
//! resources and the site's settings.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;

use crate::cache::Fingerprint;
use crate::manifest::Resources;

use super::super::profile::SlurmSettings;

/// A submitted job.
pub struct Submission {
    pub job_id: String,
    /// Its output file (stdout and stderr).
    pub log: PathBuf,
}

/// Writes `job.sh` into the stage's folder: `exec`, so the job's signals
/// (`--signal`, the time limit's SIGTERM, `scancel`) reach `stage exec`.
pub fn write_job_script(
    dir: &Path,
    spec: &Path,
    settings: &SlurmSettings,
    stage: &str,
    fp: &Fingerprint,
) -> anyhow::Result<PathBuf> {
    let exe = match &settings.alignflow {
        Some(p) => p.clone(),
        None => std::env::current_exe().context("locating the alignflow binary")?,
    };
    let script = format!(
        "#!/bin/sh\n# alignflow stage `{}` (fingerprint {})\nexec {} stage exec {}\n",
        stage.replace('\n', " "),
        fp.short(),
        shell_quote(&exe.to_string_lossy()),
        shell_quote(&spec.to_string_lossy()),
    );
    let path = dir.join("job.sh");
    std::fs::write(&path, script).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// `'...'` with embedded quotes escaped, for `sh`.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The `sbatch` flags of a stage's job (the script path comes last).
/// `ranks` is the job's tasks, one per `data_parallel` rank: over 1,
/// `resources` are each rank's (see [`rank_flags`]) but `gpus`, the
/// stage's in all, which the ranks share out (`--gpus-per-task`).
pub fn sbatch_args(
    run_id: &str,
    dir: &Path,
    resources: &Resources,
    ranks: usize,
    settings: &SlurmSettings,
) -> Vec<String> {
    let mut args = vec![
        "--parsable".to_string(),
        format!("--job-name={run_id}"),
        // A file name pattern: a `%` of the folder's own is written `%%`.
        format!(
            "--output={}/slurm-%j.out",
            dir.display().to_string().replace('%', "%%")
        ),
        format!("--chdir={}", dir.display()),
    ];
    if let Some(p) = &settings.partition {
        args.push(format!("--partition={p}"));
    }
    if let Some(a) = &settings.account {
        args.push(format!("--account={a}"));
    }
    if let Some(c) = resources.cpus {
        args.push(format!("--cpus-per-task={c}"));
    }
    if ranks > 1 {
        args.extend(rank_flags(resources, ranks));
    } else if let Some(m) = &resources.mem {
        args.push(format!("--mem={m}"));
    }
    if let Some(g) = resources.gpus.filter(|&g| g > 0) {
        // Fewer GPUs than ranks can only be a CPU stage's `gpus`, which
        // its ranks do not use: asked per node, as written.
        match g as usize / ranks {
            per_task if ranks > 1 && per_task > 0 => {
                args.push(format!("--gpus-per-task={per_task}"))
            }
            _ => args.push(format!("--gres=gpu:{g}")),
        }
    }
    // SIGUSR1 some time before the limit (at most half of it), so the stage
    // can checkpoint before the SIGTERM.
    let mut before = settings.signal_before;
    if let Some(t) = &resources.time {
        args.push(format!("--time={t}"));
        if let Some(limit) = time_limit_seconds(t) {
            before = before.min(limit / 2);
        }
    }
    if before > 0 {
        args.push(format!("--signal=B:USR1@{before}"));
    }
    args.extend(settings.sbatch_flags.iter().cloned());
    args
}

/// The flags that make a data-parallel stage's job one task per rank, as
/// a torchrun or `srun python train.py` job on Slurm is: `--ntasks=N`, each
/// task `--cpus-per-task` CPUs (set by the caller), and `mem` per rank.
/// Slurm's `--mem` is per node and it may put several ranks on one node, so
/// the memory is asked as `--mem-per-cpu`: `mem` over the rank's CPUs.
/// Where the ranks go is Slurm's choice; a site that wants one per node
/// says so in `sbatch_flags` (`--ntasks-per-node=1`).
fn rank_flags(resources: &Resources, ranks: usize) -> Vec<String> {
    let mut flags = vec![format!("--ntasks={ranks}")];
    if let Some(m) = &resources.mem {
        let cpus = resources.cpus.unwrap_or(1).max(1);
        match mem_per_cpu(m, cpus) {
            Some(per_cpu) => flags.push(format!("--mem-per-cpu={per_cpu}")),
            // The manifest check rejects such a size before a run starts.
            None => flags.push(format!("--mem={m}")),
        }
    }
    flags
}

/// A memory size in Slurm's notation (a whole number, an optional K, M, G
/// or T; megabytes without) shared among `cpus`: whole megabytes per CPU,
/// rounded up.
fn mem_per_cpu(mem: &str, cpus: u32) -> Option<String> {
    let (digits, unit) = match mem.char_indices().last()? {
        (i, c) if c.is_ascii_alphabetic() => (&mem[..i], c),
        _ => (mem, 'M'),
    };
    let n: u64 = digits.parse().ok()?;
    let megabytes = match unit {
        'K' => n.div_ceil(1024),
        'M' => n,
        'G' => n * 1024,
        'T' => n * 1024 * 1024,
        _ => return None,
    };
    Some(format!("{}M", megabytes.div_ceil(u64::from(cpus))))
}

/// Seconds of a Slurm time limit (`M`, `M:S`, `H:M:S`, `D-H`, `D-H:M`,
/// `D-H:M:S`).
pub fn time_limit_seconds(t: &str) -> Option<u32> {
    let (days, clock) = match t.split_once('-') {
        Some((d, c)) => (d.parse::<u32>().ok()?, c),
        None => (0, t),
    };
    let parts: Vec<u32> = clock
        .split(':')
        .map(|p| p.parse().ok())
        .collect::<Option<_>>()?;
    let secs = match (t.contains('-'), parts.as_slice()) {
        (false, [m]) => m * 60,
        (false, [m, s]) => m * 60 + s,
        (_, [h, m, s]) => h * 3600 + m * 60 + s,
        (true, [h]) => h * 3600,
        (true, [h, m]) => h * 3600 + m * 60,
        _ => return None,
    };
    Some(days * 86400 + secs)
}

/// `sbatch --parsable ... job.sh`: the job id (`123` or `123;cluster`).
pub async fn sbatch(
    run_id: &str,
    fp: &Fingerprint,
    script: &Path,
    dir: &Path,
    resources: &Resources,
    ranks: usize,
    settings: &SlurmSettings,
) -> anyhow::Result<Submission> {
    let mut args = sbatch_args(run_id, dir, resources, ranks, settings);
    // The stage's job is found by it when sbatch's answer is lost.
    args.push(format!("--comment={}", job_comment(fp)));
    let mut command = tokio::process::Command::new("sbatch");
    // sbatch passes its environment to the job: an engine started inside
    // a job or an allocation (to outlive a logout) would hand on that
    // job's SLURM_* variables, which srun reads as its options
    // (SLURM_MEM_PER_NODE beside the job's own SLURM_MEM_PER_CPU aborts
    // it; SLURM_CPUS_PER_TASK sets the step's cores). SLURM_CONF names
    // the cluster.
    for (name, _) in std::env::vars_os() {
        let slurm_own = name.to_str().is_some_and(|n| n.starts_with("SLURM_"));
        if slurm_own && name != "SLURM_CONF" {
            command.env_remove(&name);
        }
    }
    command.args(&args).arg(script);
    let out = output_within(&mut command, settings.command_timeout())
        .await
        .context("running sbatch (is Slurm's client installed and on PATH?)")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    anyhow::ensure!(
        out.status.success(),
        "sbatch {} failed ({}): {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let job_id = stdout
        .trim()
        .split(';')
        .next()
        .filter(|id| !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit() || b == b'_'))
        .with_context(|| format!("sbatch answered `{}`, not a job id", stdout.trim()))?
        .to_string();
    let log = dir.join(format!("slurm-{job_id}.out"));
    Ok(Submission { job_id, log })
}

/// `command`'s output, the command killed when it has not ended within
/// `limit`: a client call that hangs would stall the stage (or, for
/// `squeue`, every stage) for good.
pub async fn output_within(
    command: &mut tokio::process::Command,
    limit: Duration,
) -> anyhow::Result<std::process::Output> {
    command.kill_on_drop(true);
    match tokio::time::timeout(limit, command.output()).await {
        Ok(out) => Ok(out?),
        Err(_) => anyhow::bail!(
            "no answer within {}s: timed out, and killed",
            limit.as_secs_f64()
        ),
    }
}

/// The comment that tags the jobs of a stage's fingerprint.
pub fn job_comment(fp: &Fingerprint) -> String {
    format!("alignflow:{fp}")
}

/// Whether sbatch failed in talking to the controller (a busy one times
/// out), not on the request: the job may even have been queued.
pub fn transient_failure(message: &str) -> bool {
    const SIGNS: [&str; 6] = [
        "timed out",
        "Unable to contact",
        "temporarily unavailable",
        "Try again",
        "Socket",
        "Connection refused",
    ];
    SIGNS.iter().any(|sign| message.contains(sign))
}

/// The ids of run `run_id`'s jobs tagged with `fp`'s comment that are
/// queued or running.
pub async fn live_jobs_of(
    run_id: &str,
    fp: &Fingerprint,
    limit: Duration,
) -> anyhow::Result<Vec<String>> {
    let mut command = tokio::process::Command::new("squeue");
    command
        .args(["--noheader", "--states=all", "--name", run_id])
        .args(["--format", "%i|%T|%k"]);
    let out = output_within(&mut command, limit)
        .await
        .context("running squeue")?;
    anyhow::ensure!(
        out.status.success(),
        "squeue: {} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let comment = job_comment(fp);
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| {
            let mut parts = line.trim().splitn(3, '|');
            let (id, state, tag) = (parts.next()?, parts.next()?, parts.next()?);
            let live = matches!(
                state.trim(),
                "PENDING" | "CONFIGURING" | "RUNNING" | "REQUEUED" | "RESIZING" | "SUSPENDED"
            );
            (live && tag.trim() == comment).then(|| id.trim().to_string())
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_percent_sign_in_the_job_folder_is_not_a_log_name_pattern() {
        let args = sbatch_args(
            "r",
            Path::new("/scratch/100%/run"),
            &Resources::default(),
            1,
            &SlurmSettings::default(),
        );
        assert!(
            args.contains(&"--output=/scratch/100%%/run/slurm-%j.out".to_string()),
            "{args:?}"
        );
    }

    #[test]
    fn time_limits_in_slurm_notation() {
        assert_eq!(time_limit_seconds("30"), Some(1800));
        assert_eq!(time_limit_seconds("1:30"), Some(90));
        assert_eq!(time_limit_seconds("2:00:00"), Some(7200));
        assert_eq!(time_limit_seconds("1-12"), Some(129600));
        assert_eq!(time_limit_seconds("x"), None);
    }

    #[test]
    fn resources_and_settings_become_flags() {
        let resources = Resources {
            gpus: Some(1),
            cpus: Some(4),
            mem: Some("16G".into()),
            time: Some("10".into()),
        };
        let settings = SlurmSettings {
            partition: Some("gpu".into()),
            account: Some("lab".into()),
            sbatch_flags: vec!["--qos=high".into()],
            ..SlurmSettings::default()
        };
        let args = sbatch_args("af-run", Path::new("/c/tmp/x"), &resources, 1, &settings);
        for want in [
            "--parsable",
            "--job-name=af-run",
            "--partition=gpu",
            "--account=lab",
            "--cpus-per-task=4",
            "--mem=16G",
            "--gres=gpu:1",
            "--time=10",
            "--signal=B:USR1@120",
            "--qos=high",
        ] {
            assert!(
                args.iter().any(|a| a == want),
                "{want} missing from {args:?}"
            );
        }
        assert!(!args.iter().any(|a| a.starts_with("--ntasks")), "{args:?}");
    }

    #[test]
    fn a_data_parallel_job_is_one_task_per_rank_with_each_ranks_resources() {
        let resources = Resources {
            gpus: None,
            cpus: Some(4),
            mem: Some("6G".into()),
            time: None,
        };
        let args = sbatch_args(
            "af-run",
            Path::new("/c/tmp/x"),
            &resources,
            3,
            &SlurmSettings::default(),
        );
        for want in ["--ntasks=3", "--cpus-per-task=4", "--mem-per-cpu=1536M"] {
            assert!(
                args.iter().any(|a| a == want),
                "{want} missing from {args:?}"
            );
        }
        assert!(!args.iter().any(|a| a.starts_with("--mem=")), "{args:?}");
    }

    #[test]
    fn ranks_on_gpus_are_one_task_each_holding_its_share_of_the_gpus() {
        let none = Resources::default();
        assert_eq!(none.gpus_for("cuda", true, 0, 3), 3);
        assert_eq!(none.gpus_for("cuda", true, 0, 1), 1);
        assert_eq!(none.gpus_for("cpu", true, 0, 3), 0);
        // Each rank holds the GPUs its placement names.
        assert_eq!(none.gpus_for("cuda", true, 2, 3), 6);
        assert_eq!(none.gpus_for("cpu", true, 1, 2), 2);
        let two = Resources {
            gpus: Some(2),
            ..Resources::default()
        };
        assert_eq!(
            two.gpus_for("cuda", true, 0, 3),
            2,
            "`gpus` is the user's word"
        );
        let resources = Resources {
            gpus: Some(6),
            cpus: Some(8),
            mem: Some("64G".into()),
            time: None,
        };
        let args = sbatch_args(
            "af-run",
            Path::new("/c/tmp/x"),
            &resources,
            3,
            &SlurmSettings::default(),
        );
        for want in [
            "--ntasks=3",
            "--gpus-per-task=2",
            "--cpus-per-task=8",
            "--mem-per-cpu=8192M",
        ] {
            assert!(
                args.iter().any(|a| a == want),
                "{want} missing from {args:?}"
            );
        }
        assert!(!args.iter().any(|a| a.starts_with("--gres")), "{args:?}");
        // A CPU stage's `gpus` below its ranks is asked per node, as written.
        let one = Resources {
            gpus: Some(1),
            ..Resources::default()
        };
        let args = sbatch_args(
            "af-run",
            Path::new("/c/tmp/x"),
            &one,
            2,
            &SlurmSettings::default(),
        );
        assert!(args.iter().any(|a| a == "--gres=gpu:1"), "{args:?}");
        assert!(
            !args.iter().any(|a| a.starts_with("--gpus-per-task")),
            "{args:?}"
        );
    }

    #[test]
    fn memory_per_cpu_is_whole_megabytes_rounded_up() {
        assert_eq!(mem_per_cpu("16G", 3).as_deref(), Some("5462M"));
        assert_eq!(mem_per_cpu("1000", 1).as_deref(), Some("1000M"));
        assert_eq!(mem_per_cpu("1500M", 2).as_deref(), Some("750M"));
        assert_eq!(mem_per_cpu("1025K", 1).as_deref(), Some("2M"));
        assert_eq!(mem_per_cpu("1T", 1024).as_deref(), Some("1024M"));
        assert_eq!(mem_per_cpu("lots", 1), None);
    }
}
