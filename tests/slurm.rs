//! The slurm executor on a real Slurm (munged, slurmctld and slurmd on
//! 127.0.0.1, started per test by `common::slurm`): the same manifest as a
//! local run, stages as jobs, the cache shared with the "nodes".

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::slurm::Slurm;
use common::{stages_with_status, Project};

/// The test profile: fast polling, a short lost-job grace.
const PROFILE: &str = "executor: slurm
slurm:
  partition: debug
  poll_interval: 0.3
  lost_after: 10
  max_attempts: 3
";

fn project_with(manifest: &str) -> Project {
    let p = Project::new();
    p.write("pipe.yaml", manifest);
    p.write("alignflow/profiles/test.yaml", PROFILE);
    p
}

/// `alignflow ARGS` in the project, pointed at the cluster.
fn cmd(p: &Project, slurm: &Slurm, args: &[&str]) -> Command {
    let mut c = p.cmd(args);
    slurm.env(&mut c);
    c
}

/// `alignflow run pipe.yaml` on the cluster (the test profile), then `extra`.
fn run_on_cluster(p: &Project, slurm: &Slurm, extra: &[&str]) -> Command {
    let mut args = vec![
        "run",
        "pipe.yaml",
        "--executor",
        "slurm",
        "--profile",
        "test",
    ];
    args.extend_from_slice(extra);
    cmd(p, slurm, &args)
}

fn output(p: &Project, slurm: &Slurm, args: &[&str]) -> Output {
    cmd(p, slurm, args).output().expect("alignflow runs")
}

fn ok(p: &Project, slurm: &Slurm, args: &[&str]) -> String {
    let out = output(p, slurm, args);
    assert!(
        out.status.success(),
        "alignflow {args:?} failed ({}):\nstdout:\n{}\nstderr:\n{}\nslurm:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        slurm.logs()
    );
    String::from_utf8(out.stdout).unwrap()
}

fn spawn(p: &Project, slurm: &Slurm, args: &[&str]) -> Child {
    cmd(p, slurm, args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("alignflow starts")
}

fn wait_until(limit: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits for a child with a limit; kills it past the limit.
fn finish(mut child: Child, limit: Duration) -> Output {
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "alignflow did not finish within {limit:?}:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    child.wait_with_output().unwrap()
}

/// Every record of a cache by fingerprint, without what describes the run
/// rather than the result (times, duration, provenance).
fn records(cache: &Path) -> BTreeMap<String, serde_json::Value> {
    let mut out = BTreeMap::new();
    for path in common::walk(&cache.join("records")) {
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if name.starts_with('.') || !name.ends_with(".json") {
            continue;
        }
        let mut record: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        let obj = record.as_object_mut().unwrap();
        for volatile in ["started_at", "finished_at", "duration_s", "provenance"] {
            obj.remove(volatile);
        }
        out.insert(name, record);
    }
    out
}

/// The one run folder under `cache/runs/`.
fn run_id(p: &Project) -> String {
    let runs: Vec<String> = std::fs::read_dir(p.path("cache/runs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    assert_eq!(runs.len(), 1, "{runs:?}");
    runs[0].clone()
}

/// Lines of `jobs.jsonl` with `"event":"submitted"`.
fn submissions(p: &Project, run: &str) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(p.path(&format!("cache/runs/{run}/jobs.jsonl"))).unwrap();
    text.lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["event"] == "submitted")
        .collect()
}

/// The id of the job of `slurm` in `state`, if one is.
fn job_in_state(slurm: &Slurm, state: &str) -> Option<String> {
    slurm
        .jobs("%i %T")
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some(state))
        .and_then(|l| l.split_whitespace().next().map(String::from))
}

/// The text of a stage's (file) output, trimmed.
fn output_text(p: &Project, stage: &str, output: &str) -> String {
    let out = p.ok(&["show", "pipe.yaml", stage, "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    std::fs::read_to_string(v[output]["path"].as_str().unwrap())
        .unwrap()
        .trim()
        .to_string()
}

fn examples(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join(rel)
}

/// Data ops in the engine's own code and exec commands: no libtorch.
fn data_pipeline() -> String {
    format!(
        r#"version: 1
name: cluster
seed: 3
stages:
  comparisons:
    op: dataset.import
    inputs: {{ source: {} }}
    params: {{ format: hh-rlhf, limit: 60 }}
    resources: {{ cpus: 1, mem: 200M, time: "5" }}
  tokenizer:
    op: tokenizer.train
    inputs: {{ data: "${{stages.comparisons.data}}" }}
    params: {{ vocab_size: 300 }}
  count:
    op: exec
    inputs: {{ data: "${{stages.comparisons.data}}" }}
    outputs: [n]
    params: {{ cmd: 'wc -l < "$ALIGNFLOW_IN_DATA" > "$ALIGNFLOW_OUT/n"' }}
  words:
    op: exec
    inputs: {{ tok: "${{stages.tokenizer.tokenizer}}" }}
    outputs: [n]
    params: {{ cmd: 'ls "$ALIGNFLOW_IN_TOK" | wc -l > "$ALIGNFLOW_OUT/n"' }}
"#,
        examples("hh-rlhf-sample.jsonl").display()
    )
}

#[test]
fn a_slurm_run_commits_what_a_local_run_commits_and_a_rerun_submits_nothing() {
    let slurm = Slurm::start(1);
    let local = project_with(&data_pipeline());
    let out = local.ok(&["run", "pipe.yaml", "--quiet"]);
    assert_eq!(stages_with_status(&out, "ran").len(), 4, "{out}");

    let cluster = project_with(&data_pipeline());
    let out = ok(
        &cluster,
        &slurm,
        &[
            "run",
            "pipe.yaml",
            "--executor",
            "slurm",
            "--profile",
            "test",
        ],
    );
    assert_eq!(stages_with_status(&out, "ran").len(), 4, "{out}");
    assert_eq!(slurm.calls("sbatch"), 4);
    let (a, b) = (
        records(&local.path("cache")),
        records(&cluster.path("cache")),
    );
    assert_eq!(a.len(), 4);
    assert_eq!(
        a, b,
        "the same records (output ids included) locally and on Slurm"
    );
    // The lockfiles agree too: same params, input and output ids.
    assert_eq!(local.read("pipe.lock"), cluster.read("pipe.lock"));
    // Provenance: committed on the node, by a Slurm job.
    let any = common::walk(&cluster.path("cache/records"))
        .into_iter()
        .find(|p| p.extension().is_some_and(|e| e == "json"))
        .unwrap();
    let record: serde_json::Value = serde_json::from_slice(&std::fs::read(any).unwrap()).unwrap();
    assert!(record["provenance"]["slurm_job_id"].is_string(), "{record}");
    assert!(record["provenance"]["host"].is_string(), "{record}");

    let run = run_id(&cluster);
    let listed = ok(&cluster, &slurm, &["jobs", &run]);
    for stage in ["comparisons", "tokenizer", "count", "words"] {
        assert!(listed.contains(stage), "{listed}");
    }
    assert!(listed.contains("COMPLETED"), "{listed}");

    let out = ok(&cluster, &slurm, &["run", "pipe.yaml", "--profile", "test"]);
    assert_eq!(stages_with_status(&out, "cached").len(), 4, "{out}");
    assert_eq!(slurm.calls("sbatch"), 4, "a cached run submits nothing");
}

/// A tensor stage in the worker: a tiny GPT-2 pretrained for a few steps.
fn tensor_pipeline() -> String {
    format!(
        r#"version: 1
name: tensor
seed: 5
stages:
  data:
    op: dataset.import
    inputs: {{ source: {} }}
    params: {{ format: hh-rlhf, limit: 40 }}
  tokenizer:
    op: tokenizer.train
    inputs: {{ data: "${{stages.data.data}}" }}
    params: {{ vocab_size: 300 }}
  base:
    op: lm.pretrain
    inputs: {{ data: "${{stages.data.data}}", tokenizer: "${{stages.tokenizer.tokenizer}}" }}
    params: {{ width: 32, layers: 1, heads: 2, positions: 64, seq_len: 32, batch_size: 4, max_steps: 4, lr: 1.0e-3, warmup_steps: 1 }}
    resources: {{ cpus: 2, mem: 1500M }}
"#,
        examples("hh-rlhf-sample.jsonl").display()
    )
}

#[test]
fn a_tensor_stage_on_slurm_trains_the_same_model_as_locally() {
    let slurm = Slurm::start(1);
    let local = project_with(&tensor_pipeline());
    local.ok(&["run", "pipe.yaml", "--quiet", "--threads", "2"]);
    let cluster = project_with(&tensor_pipeline());
    ok(&cluster, &slurm, &["run", "pipe.yaml", "--profile", "test"]);
    let model = |p: &Project| {
        let v: serde_json::Value =
            serde_json::from_str(&p.ok(&["show", "pipe.yaml", "base", "--json"])).unwrap();
        v["model"]["id"].as_str().unwrap().to_string()
    };
    assert_eq!(
        model(&local),
        model(&cluster),
        "the same weights, byte for byte"
    );
    let records = common::walk(&cluster.path("cache/records"));
    let base = records
        .iter()
        .map(|f| serde_json::from_slice::<serde_json::Value>(&std::fs::read(f).unwrap()).unwrap())
        .find(|r| r["stage"] == "base")
        .unwrap();
    let provenance = &base["provenance"];
    assert!(
        provenance["libtorch"]
            .as_str()
            .is_some_and(|v| v.starts_with("2.")),
        "{base}"
    );
    assert_eq!(provenance["device"], "cpu", "{base}");
}

/// `tests/data_parallel.rs`'s tiny model and its `sft` on two ranks, with
/// one CPU per rank: the profile's `--ntasks-per-node=1` puts the ranks on
/// two nodes. (Locally, `--threads 2` gives each of the two ranks one
/// thread, and `base` two, as its two CPUs do here: the same bits.)
fn data_parallel_pipeline() -> String {
    format!(
        r#"version: 1
name: dp
seed: 3
stages:
  hh:
    op: dataset.import
    inputs: {{ source: {} }}
    params: {{ format: hh-rlhf, limit: 24 }}
  tok:
    op: tokenizer.train
    inputs: {{ data: "${{stages.hh.data}}" }}
    params: {{ vocab_size: 384 }}
  base:
    op: lm.pretrain
    inputs: {{ data: "${{stages.hh.data}}", tokenizer: "${{stages.tok.tokenizer}}" }}
    params: {{ width: 32, layers: 1, heads: 2, positions: 160, seq_len: 48, batch_size: 4, max_steps: 2 }}
    resources: {{ cpus: 2 }}
  sft:
    op: sft
    inputs: {{ model: "${{stages.base.model}}", data: "${{stages.hh.data}}" }}
    params: {{ response_field: chosen, max_len: 96, batch_size: 5, max_steps: 3, lr: 0.001, checkpoint_every: 0, dropout: false, data_parallel: 2 }}
    resources: {{ cpus: 1, mem: 400M }}
"#,
        examples("hh-rlhf-sample.jsonl").display()
    )
}

/// The output lines of every job of every run of `p` for `stage`.
fn job_logs(p: &Project, stage: &str) -> String {
    let mut text = String::new();
    for run in std::fs::read_dir(p.path("cache/runs")).unwrap() {
        let run = run.unwrap().file_name().to_string_lossy().to_string();
        for job in submissions(p, &run) {
            if job["stage"] == stage {
                let log = job["log"].as_str().unwrap();
                text.push_str(&std::fs::read_to_string(log).unwrap_or_default());
            }
        }
    }
    text
}

#[test]
fn a_data_parallel_stage_runs_its_ranks_on_two_nodes_with_srun() {
    let slurm = Slurm::start(2);
    let p = project_with(&data_parallel_pipeline());
    p.write(
        "alignflow/profiles/test.yaml",
        &format!("{PROFILE}  sbatch_flags: [\"--ntasks-per-node=1\"]\n"),
    );

    // Rank 1 kills itself in its second step: the stage fails at once,
    // naming the rank and its node, and caches nothing.
    let start = Instant::now();
    let out = cmd(&p, &slurm, &["run", "pipe.yaml", "--profile", "test"])
        .env("ALIGNFLOW_DIST_TEST_KILL", "1:2")
        .env("ALIGNFLOW_DIST_TIMEOUT_S", "20")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the run should fail:\n{stderr}");
    assert!(
        stderr.contains("stage `sft`") && stderr.contains("rank 1 of 2 on n2: Killed"),
        "{stderr}\n{}",
        job_logs(&p, "sft")
    );
    eprintln!("the killed rank failed the run in {:?}", start.elapsed());

    // Again without the kill: the ranks run on both nodes and train what
    // two local ranks train. `--export=NONE`, as some sites submit, keeps
    // the submitting shell's environment from the job, and through
    // SLURM_EXPORT_ENV from srun's tasks: they get theirs all the same.
    p.write(
        "alignflow/profiles/test.yaml",
        &format!("{PROFILE}  sbatch_flags: [\"--ntasks-per-node=1\", \"--export=NONE\"]\n"),
    );
    ok(&p, &slurm, &["run", "pipe.yaml", "--profile", "test"]);
    let sbatch = slurm.call_lines("sbatch");
    let sft_job = sbatch.iter().find(|l| l.contains("--ntasks=2"));
    assert!(
        sft_job
            .is_some_and(|l| l.contains("--cpus-per-task=1") && l.contains("--mem-per-cpu=400M")),
        "{sbatch:?}"
    );
    let logs = job_logs(&p, "sft");
    assert!(
        logs.contains("starting ranks 1 to 1 with srun") && logs.contains("from node n1"),
        "{logs}"
    );
    assert!(
        logs.contains("rank 1 of 2 joined the data-parallel group on node n2"),
        "{logs}"
    );
    let local = project_with(&data_parallel_pipeline());
    local.ok(&["run", "pipe.yaml", "--quiet", "--threads", "2"]);
    let model = |p: &Project| {
        let v: serde_json::Value =
            serde_json::from_str(&p.ok(&["show", "pipe.yaml", "sft", "--json"])).unwrap();
        v["model"]["id"].as_str().unwrap().to_string()
    };
    assert_eq!(
        model(&local),
        model(&p),
        "two ranks on two nodes train the weights of two local ranks, byte for byte"
    );
    // Nothing of the ranks' own is left beside the checkpoints.
    let left: Vec<PathBuf> = common::walk(&p.path("cache/checkpoints"))
        .into_iter()
        .filter(|f| f.to_string_lossy().contains("data-parallel"))
        .collect();
    assert!(left.is_empty(), "{left:?}");

    // A profile whose sbatch_flags override the job's tasks: the stage
    // fails saying why, instead of waiting for ranks that never start.
    p.write(
        "alignflow/profiles/test.yaml",
        &format!("{PROFILE}  sbatch_flags: [\"--ntasks=1\"]\n"),
    );
    p.write(
        "pipe.yaml",
        &data_parallel_pipeline().replace("max_steps: 3", "max_steps: 4"),
    );
    let out = cmd(&p, &slurm, &["run", "pipe.yaml", "--profile", "test"])
        .env("ALIGNFLOW_DIST_TIMEOUT_S", "20")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the run should fail:\n{stderr}");
    assert!(
        stderr.contains("stage `sft`")
            && stderr.contains("data_parallel: 2 needs a Slurm job of 2 tasks")
            && stderr.contains("has 1 (SLURM_NTASKS)"),
        "{stderr}\n{}",
        job_logs(&p, "sft")
    );

    // Ranks on GPUs take one GPU each: a job asking fewer is refused
    // before it is submitted.
    p.write("alignflow/profiles/test.yaml", PROFILE);
    p.write(
        "pipe.yaml",
        &data_parallel_pipeline()
            .replace("max_steps: 3", "max_steps: 5")
            .replace(
                "    resources: { cpus: 1, mem: 400M }",
                "    device: cuda\n    resources: { gpus: 1, cpus: 1 }",
            ),
    );
    let submitted = slurm.call_lines("sbatch").len();
    let out = cmd(&p, &slurm, &["run", "pipe.yaml", "--profile", "test"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the run should fail:\n{stderr}");
    assert!(
        stderr.contains(
            "stage `sft`: `resources.gpus: 1` but `params.data_parallel: 2` runs one rank per GPU"
        ),
        "{stderr}"
    );
    assert_eq!(
        slurm.call_lines("sbatch").len(),
        submitted,
        "nothing submitted"
    );
}

/// Waits (up to 30 s) until Slurm's job `id` has ended.
fn wait_job_ended(slurm: &Slurm, id: &str) {
    wait_until(Duration::from_secs(30), "the job ends", || {
        slurm.jobs("%i %T").lines().any(|l| {
            let mut f = l.split_whitespace();
            f.next() == Some(id) && !matches!(f.next(), Some("PENDING" | "RUNNING" | "COMPLETING"))
        })
    });
}

/// `KEY=VALUE` words of a line.
fn fields(line: &str) -> BTreeMap<&str, &str> {
    line.split_whitespace()
        .filter_map(|w| w.split_once('='))
        .collect()
}

#[test]
fn gpu_ranks_are_tasks_across_nodes_each_on_its_own_gpu() {
    // Three GPU ranks of one CPU each: the engine asks for a task per rank
    // holding one GPU. The test nodes' GPUs are fake, so the worker stops
    // at CUDA; the job's flags, and the GPU each rank would take, are
    // Slurm's real answer.
    let slurm = Slurm::start(2);
    let p = project_with(&data_parallel_pipeline().replace(
        "data_parallel: 2 }\n    resources: { cpus: 1, mem: 400M }",
        "data_parallel: 3 }\n    device: cuda\n    resources: { cpus: 1, mem: 400M }",
    ));
    let out = output(&p, &slurm, &["run", "pipe.yaml", "--profile", "test"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "no CUDA on the test nodes:\n{stderr}"
    );
    assert!(
        stderr.contains("FAILED  sft") && stderr.contains("CUDA is not available"),
        "{stderr}"
    );
    let sbatch = slurm.call_lines("sbatch");
    let sft_job = sbatch
        .iter()
        .find(|l| l.contains("--ntasks=3"))
        .unwrap_or_else(|| panic!("{sbatch:?}"));
    for want in [
        "--gpus-per-task=1",
        "--cpus-per-task=1",
        "--mem-per-cpu=400M",
    ] {
        assert!(sft_job.contains(want), "{want} missing: {sft_job}");
    }
    assert!(!sft_job.contains("--gres"), "{sft_job}");

    // The same job with a script that prints what each rank sees: the
    // batch step (rank 0) and an srun step laid out as the worker's
    // (`--ntasks=3`, the job's CPUs and GPUs per task, as
    // `dist::srun::SrunRanks::start` runs it).
    let dir = p.path("probe");
    std::fs::create_dir_all(&dir).unwrap();
    let script = dir.join("probe.sh");
    std::fs::write(
        &script,
        "#!/bin/sh\n\
         echo batch node=$SLURMD_NODENAME cvd=$CUDA_VISIBLE_DEVICES\n\
         srun --ntasks=3 --kill-on-bad-exit=1 --wait=0 --cpus-per-task=$SLURM_CPUS_PER_TASK --gpus-per-task=$SLURM_GPUS_PER_TASK \\\n\
           sh -c 'echo task rank=$SLURM_PROCID local=$SLURM_LOCALID node=$SLURMD_NODENAME cvd=$CUDA_VISIBLE_DEVICES'\n",
    )
    .unwrap();
    let log = dir.join("probe.out");
    let flags: Vec<&str> = sft_job
        .split_whitespace()
        .filter(|f| {
            !f.starts_with("--output=") && !f.starts_with("--chdir=") && !f.ends_with(".sh")
        })
        .collect();
    let mut submit = slurm.command("sbatch");
    let submitted = submit
        .args(&flags)
        .arg(format!("--output={}", log.display()))
        .arg(&script)
        .output()
        .unwrap();
    assert!(submitted.status.success(), "{submitted:?}");
    let id = String::from_utf8_lossy(&submitted.stdout)
        .trim()
        .to_string();
    wait_job_ended(&slurm, &id);
    let text = std::fs::read_to_string(&log).unwrap();

    // Each rank's (node, GPU) by the worker's rule: rank 0 holds its
    // node's first, a task the run `slurm_gpu_run` picks of those it sees.
    let gpu = |cvd: &str, run: usize| -> String { cvd.split(',').nth(run).unwrap().to_string() };
    let batch = text.lines().find(|l| l.starts_with("batch ")).expect(&text);
    let batch = fields(batch);
    let mut held: BTreeMap<usize, (String, String)> = BTreeMap::new();
    held.insert(0, (batch["node"].to_string(), gpu(batch["cvd"], 0)));
    let mut task_0 = None;
    for line in text.lines().filter(|l| l.starts_with("task ")) {
        let f = fields(line);
        let rank: usize = f["rank"].parse().unwrap();
        let local: usize = f["local"].parse().unwrap();
        let visible = f["cvd"].split(',').count();
        let run = alignflow_ops::role_devices::slurm_gpu_run(visible, local, 1).expect(line);
        let place = (f["node"].to_string(), gpu(f["cvd"], run));
        match rank {
            // Its place is rank 0's: that task exits at once.
            0 => task_0 = Some(place),
            r => assert!(held.insert(r, place).is_none(), "{text}"),
        }
    }
    assert_eq!(held.len(), 3, "{text}");
    assert_eq!(
        task_0.as_ref(),
        Some(&held[&0]),
        "rank 0 holds task 0's GPU:\n{text}"
    );
    let distinct: BTreeSet<&(String, String)> = held.values().collect();
    assert_eq!(distinct.len(), 3, "every rank on its own GPU:\n{text}");
    let nodes: BTreeSet<&str> = held.values().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        nodes.len(),
        2,
        "two CPUs a node: the ranks span both nodes:\n{text}"
    );
}

/// A stage that checkpoints, then sleeps on its first start (so it can be
/// killed); started again with a checkpoint, it finishes at once and writes
/// the step it resumed from.
const RESUMABLE: &str = r#"version: 1
name: resumable
stages:
  long:
    op: exec
    outputs: [resumed_from]
    resources: { time: "TIME" }
    params:
      cmd: |
        ck="$ALIGNFLOW_CHECKPOINT_DIR/step"
        if [ -f "$ck" ]; then cp "$ck" "$ALIGNFLOW_OUT/resumed_from"; exit 0; fi
        echo 7 > "$ck.tmp" && mv "$ck.tmp" "$ck"
        sleep 300
"#;

fn checkpoint_written(p: &Project) -> bool {
    common::walk(&p.path("cache/checkpoints"))
        .iter()
        .any(|f| f.file_name().is_some_and(|n| n == "step"))
}

#[test]
fn a_job_cancelled_mid_stage_is_resubmitted_and_resumes() {
    let slurm = Slurm::start(1);
    let p = project_with(&RESUMABLE.replace("TIME", "10"));
    let child = spawn(&p, &slurm, &["run", "pipe.yaml", "--profile", "test"]);
    wait_until(Duration::from_secs(30), "the stage's checkpoint", || {
        checkpoint_written(&p)
    });
    let job = job_in_state(&slurm, "RUNNING").expect("a running job");
    let status = slurm.command("scancel").arg(&job).status().unwrap();
    assert!(status.success());
    let out = finish(child, Duration::from_secs(60));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("CANCELLED") && stderr.contains("resubmitting"),
        "{stderr}"
    );
    assert_eq!(output_text(&p, "long", "resumed_from"), "7");
    let jobs = submissions(&p, &run_id(&p));
    assert_eq!(jobs.len(), 2, "{jobs:?}");
    assert_eq!(jobs[1]["attempt"], 2);
}

#[test]
fn a_job_killed_by_its_time_limit_is_resubmitted() {
    let slurm = Slurm::start(1);
    // One minute, Slurm's smallest limit; the job sleeps past it.
    let p = project_with(&RESUMABLE.replace("TIME", "1"));
    let out = ok(&p, &slurm, &["run", "pipe.yaml", "--profile", "test"]);
    assert_eq!(stages_with_status(&out, "ran").len(), 1, "{out}");
    let run = run_id(&p);
    let jobs = submissions(&p, &run);
    assert_eq!(jobs.len(), 2, "{jobs:?}");
    let first = slurm.jobs("%i %T %r");
    assert!(first.contains("TIMEOUT"), "{first}");
    // The first job was warned before its limit (--signal).
    let log = std::fs::read_to_string(jobs[0]["log"].as_str().unwrap()).unwrap();
    assert!(log.contains("SIGUSR1"), "{log}");
}

/// The step of the newest training checkpoint under `cache/checkpoints`.
fn checkpointed_step(p: &Project) -> Option<u64> {
    common::walk(&p.path("cache/checkpoints"))
        .iter()
        .filter(|f| f.file_name().is_some_and(|n| n == "state.json"))
        .filter_map(|f| {
            let v: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(f).ok()?).ok()?;
            v["train"]["step"].as_u64()
        })
        .max()
}

/// SIGUSR1 (what `--signal` sends before the time limit) makes a training
/// stage that never checkpoints on its own save one at its next step; the
/// job cancelled then is resubmitted and resumes there. (Far more steps than
/// the test waits for: the run is interrupted once the resumption shows.)
#[test]
fn sigusr1_checkpoints_a_training_stage_and_the_next_attempt_resumes_there() {
    let slurm = Slurm::start(1);
    let p = project_with(
        &tensor_pipeline().replace("max_steps: 4,", "max_steps: 1000000, checkpoint_every: 0,"),
    );
    let mut child = spawn(&p, &slurm, &["run", "pipe.yaml", "--profile", "test"]);
    let base_job = || {
        let runs = std::fs::read_dir(p.path("cache/runs")).ok()?;
        let run = runs
            .flatten()
            .next()?
            .file_name()
            .to_string_lossy()
            .to_string();
        let jobs = std::fs::read_to_string(p.path(&format!("cache/runs/{run}/jobs.jsonl"))).ok()?;
        jobs.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v["event"] == "submitted" && v["stage"] == "base")
            .and_then(|v| v["job_id"].as_str().map(String::from))
    };
    let mut job = None;
    wait_until(Duration::from_secs(60), "the training job running", || {
        job = base_job().filter(|id| job_in_state(&slurm, "RUNNING").as_ref() == Some(id));
        job.is_some()
    });
    let job = job.unwrap();
    // Once the worker trains (a signal while Slurm launches the batch
    // script fails the launch; `--signal` comes near the end).
    wait_until(Duration::from_secs(60), "training steps", || {
        common::walk(&p.path("cache/tmp")).iter().any(|f| {
            f.file_name().is_some_and(|n| n == "events.jsonl")
                && std::fs::read_to_string(f).is_ok_and(|t| t.contains("\"msg\":\"loss "))
        })
    });
    // As `--signal=B:USR1` does: to the batch shell, `stage exec`.
    let status = slurm
        .command("scancel")
        .args(["--signal=USR1", "--batch", &job])
        .status()
        .unwrap();
    assert!(status.success());
    wait_until(Duration::from_secs(60), "a checkpoint", || {
        checkpointed_step(&p).is_some()
    });
    let step = checkpointed_step(&p).unwrap();
    assert!(step > 0, "{step}");
    let status = slurm.command("scancel").arg(&job).status().unwrap();
    assert!(status.success());
    wait_until(Duration::from_secs(90), "the next attempt resuming", || {
        job_logs(&p, "base").contains("resuming from checkpoint")
    });
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    let stderr = stderr_once(&mut child, "interrupted", Duration::from_secs(30));
    let out = finish(child, Duration::from_secs(60));
    let stderr = stderr.join().unwrap();
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("resubmitting"), "{stderr}");
    let logs = job_logs(&p, "base");
    assert!(logs.contains("checkpoint asked for (SIGUSR1)"), "{logs}");
    let resumed = logs
        .lines()
        .find(|l| l.contains("resuming from checkpoint"))
        .unwrap();
    assert!(resumed.ends_with(&format!("step={step}")), "{resumed}");
}

#[test]
fn a_failing_stage_shows_the_tail_of_its_job_output() {
    let slurm = Slurm::start(1);
    let p = project_with(
        r#"version: 1
name: failing
stages:
  bad:
    op: exec
    outputs: [x]
    params: { cmd: 'echo "first line"; echo "the detail of the failure" >&2; exit 3' }
"#,
    );
    let out = output(&p, &slurm, &["run", "pipe.yaml", "--profile", "test"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("FAILED"), "{stderr}");
    assert!(
        stderr.contains("last lines of the job's output"),
        "{stderr}"
    );
    assert!(stderr.contains("the detail of the failure"), "{stderr}");
    // Its stdout is only in the job's output.
    let tail = &stderr[stderr.find("last lines of the job's output").unwrap()..];
    assert!(tail.contains("first line"), "{stderr}");
    assert_eq!(slurm.calls("sbatch"), 1, "a failure is not resubmitted");
}

const SLEEPER: &str = r#"version: 1
name: sleeper
stages:
  nap:
    op: exec
    outputs: [x]
    params: { cmd: 'sleep SECS; echo done > "$ALIGNFLOW_OUT/x"' }
"#;

#[test]
fn ctrl_c_cancels_the_runs_jobs_and_exits_130() {
    let slurm = Slurm::start(1);
    let p = project_with(&SLEEPER.replace("SECS", "120"));
    let child = spawn(&p, &slurm, &["run", "pipe.yaml", "--profile", "test"]);
    wait_until(Duration::from_secs(30), "a running job", || {
        job_in_state(&slurm, "RUNNING").is_some()
    });
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGINT);
    }
    let out = finish(child, Duration::from_secs(30));
    assert_eq!(
        out.status.code(),
        Some(130),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(slurm.calls("scancel") >= 1);
    wait_until(Duration::from_secs(20), "the job cancelled", || {
        job_in_state(&slurm, "CANCELLED").is_some()
    });
    assert!(job_in_state(&slurm, "RUNNING").is_none());
}

/// A second Ctrl-C exits at once, and the run's jobs still go: the first
/// one's `scancel` (slowed here) is not killed by the second, which reaches
/// the terminal's whole process group, and the exit cancels them itself.
#[test]
fn a_second_ctrl_c_exits_at_once_and_leaves_no_job_running() {
    use std::os::unix::process::CommandExt;
    let slurm = Slurm::start(1);
    let p = project_with(&SLEEPER.replace("SECS", "120"));
    let slow = p.path("slowbin");
    std::fs::create_dir_all(&slow).unwrap();
    p.write(
        "slowbin/scancel",
        "#!/bin/sh\nsleep 2\nPATH=\"${PATH#*:}\" exec scancel \"$@\"\n",
    );
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(slow.join("scancel"), std::fs::Permissions::from_mode(0o755))
            .unwrap();
    }
    let mut c = cmd(&p, &slurm, &["run", "pipe.yaml", "--profile", "test"]);
    c.env("PATH", format!("{}:{}", slow.display(), slurm.path_env()))
        // Its own group, as a shell's foreground job: Ctrl-C reaches all of it.
        .process_group(0)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = c.spawn().unwrap();
    wait_until(Duration::from_secs(30), "a running job", || {
        job_in_state(&slurm, "RUNNING").is_some()
    });
    let mut child = child;
    let group = -(child.id() as libc::pid_t);
    unsafe { libc::kill(group, libc::SIGINT) };
    // The second once the first is being handled (its slow scancel runs).
    let stderr = stderr_once(&mut child, "interrupted", Duration::from_secs(30));
    unsafe { libc::kill(group, libc::SIGINT) };
    let out = finish(child, Duration::from_secs(30));
    let stderr = stderr.join().unwrap();
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    wait_until(Duration::from_secs(20), "no running job", || {
        job_in_state(&slurm, "RUNNING").is_none()
    });
}

/// What scancel says of an ended job and of one the controller does not
/// know: nothing (success), or the words the engine takes as "ended"
/// (quiet), not as a failure to warn about (`says_job_ended`).
#[test]
fn scancel_says_ended_and_unknown_jobs_in_the_words_the_engine_reads() {
    let slurm = Slurm::start(1);
    let p = project_with(&SLEEPER.replace("SECS", "0"));
    ok(&p, &slurm, &["run", "pipe.yaml", "--profile", "test"]);
    let job = submissions(&p, &run_id(&p))[0]["job_id"]
        .as_str()
        .unwrap()
        .to_string();
    wait_job_ended(&slurm, &job);
    let ended = slurm.command("scancel").arg(&job).output().unwrap();
    let said = String::from_utf8_lossy(&ended.stderr);
    assert!(
        ended.status.success() || said.contains("already completing or completed"),
        "{said}"
    );
    // 22.05 accepts an unknown id silently; others say "Invalid job id".
    let unknown = slurm.command("scancel").arg("999999").output().unwrap();
    let said = String::from_utf8_lossy(&unknown.stderr);
    assert!(
        unknown.status.success() || said.contains("Invalid job id"),
        "{said}"
    );
}

/// A job Slurm accepts but will never start (its time limit exceeds the
/// partition's): the stage fails at once, saying what to change, and the
/// job leaves the queue.
#[test]
fn a_job_that_can_never_start_fails_its_stage_and_leaves_the_queue() {
    let slurm = Slurm::start(1);
    let p = project_with(&SLEEPER.replace("SECS", "1").replace(
        "    outputs: [x]\n",
        "    outputs: [x]\n    resources: { time: \"10\" }\n",
    ));
    p.write(
        "alignflow/profiles/test.yaml",
        &PROFILE.replace("partition: debug", "partition: short"),
    );
    // Not waited for: a hang runs into `finish`'s limit and fails below.
    let out = finish(
        spawn(&p, &slurm, &["run", "pipe.yaml", "--profile", "test"]),
        Duration::from_secs(60),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("PartitionTimeLimit") && stderr.contains("lower `resources.time`"),
        "{stderr}"
    );
    wait_until(Duration::from_secs(20), "the job cancelled", || {
        job_in_state(&slurm, "PENDING").is_none()
    });
}

/// A stage whose job waits for the file `go` in the project (at most five
/// minutes; without it the job fails).
const GATED: &str = r#"version: 1
name: gated
stages:
  nap:
    op: exec
    outputs: [x]
    params: { cmd: 'touch started; for i in $(seq 3000); do [ -f go ] && break; sleep 0.1; done; [ -f go ] && echo done > "$ALIGNFLOW_OUT/x"' }
"#;

/// Whether the engine has journaled a submitted job in `p`'s run (a line
/// being written is not one yet).
fn journaled(p: &Project) -> bool {
    std::fs::read_dir(p.path("cache/runs"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|run| std::fs::read_to_string(run.path().join("jobs.jsonl")).ok())
        .any(|text| {
            text.lines().any(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .is_ok_and(|v| v["event"] == "submitted")
            })
        })
}

/// Reads `child`'s stderr on a thread; returns once a line contains
/// `pattern` (killing the child and failing after `limit`), with a handle
/// to all of its stderr.
fn stderr_once(
    child: &mut Child,
    pattern: &str,
    limit: Duration,
) -> std::thread::JoinHandle<String> {
    let pipe = child.stderr.take().unwrap();
    let (tx, lines) = std::sync::mpsc::channel();
    let all = std::thread::spawn(move || {
        let mut all = String::new();
        for line in std::io::BufRead::lines(std::io::BufReader::new(pipe)) {
            let line = line.unwrap();
            all.push_str(&line);
            all.push('\n');
            let _ = tx.send(line);
        }
        all
    });
    let start = Instant::now();
    loop {
        match lines.recv_timeout(limit.saturating_sub(start.elapsed())) {
            Ok(line) if line.contains(pattern) => return all,
            Ok(_) => {}
            Err(_) => {
                let _ = child.kill();
                panic!("no `{pattern}` on stderr:\n{}", all.join().unwrap());
            }
        }
    }
}

/// Two runs of one pipeline on one cache: the second submits no job while
/// the first's job holds the stage (its job would wait in its allocation),
/// and finds the stage committed.
#[test]
fn a_second_run_waits_for_the_first_runs_job_without_submitting_its_own() {
    let slurm = Slurm::start(1);
    let p = project_with(GATED);
    let first = spawn(&p, &slurm, &["run", "pipe.yaml", "--profile", "test"]);
    // The command runs: its node holds the stage's lock.
    wait_until(Duration::from_secs(30), "the first run's command", || {
        p.path("started").exists()
    });
    let mut second = spawn(&p, &slurm, &["run", "pipe.yaml", "--profile", "test"]);
    let stderr = stderr_once(
        &mut second,
        "another run's job holds it",
        Duration::from_secs(60),
    );
    p.write("go", "");
    let first = finish(first, Duration::from_secs(120));
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let out = finish(second, Duration::from_secs(120));
    let stderr = stderr.join().unwrap();
    assert!(out.status.success(), "{stderr}");
    assert_eq!(
        stages_with_status(&String::from_utf8_lossy(&out.stdout), "cached"),
        common::set(&["nap"]),
        "{stderr}"
    );
    assert_eq!(slurm.calls("sbatch"), 1, "{stderr}");
}

/// Starts the run of `p` (GATED) and SIGKILLs its engine once its job runs
/// and is journaled (the job can be RUNNING before the engine, having read
/// sbatch's answer, has written it down); the job goes on. The run's id.
fn engine_killed_with_its_job_running(p: &Project, slurm: &Slurm) -> String {
    let mut child = spawn(p, slurm, &["run", "pipe.yaml", "--profile", "test"]);
    wait_until(Duration::from_secs(30), "a running, journaled job", || {
        job_in_state(slurm, "RUNNING").is_some() && journaled(p)
    });
    child.kill().unwrap();
    child.wait().unwrap();
    run_id(p)
}

#[test]
fn attach_adopts_the_jobs_of_a_run_whose_engine_died() {
    let slurm = Slurm::start(1);
    // The job runs until the attached engine has adopted it: with a fixed
    // sleep it could end and commit its record before `run --attach`
    // looked (on a slow machine), and the stage would be cached, not adopted.
    let p = project_with(GATED);
    let run = engine_killed_with_its_job_running(&p, &slurm);
    let mut attach = spawn(&p, &slurm, &["run", "--attach", &run]);
    let stderr = stderr_once(&mut attach, "adopt", Duration::from_secs(120));
    p.write("go", "");
    let out = finish(attach, Duration::from_secs(120));
    let stderr = stderr.join().unwrap();
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("adopt"), "{stderr}");
    assert_eq!(
        stages_with_status(&String::from_utf8_lossy(&out.stdout), "ran"),
        common::set(&["nap"])
    );
    assert_eq!(
        slurm.calls("sbatch"),
        1,
        "the job was adopted, not submitted again"
    );
    let out = ok(&p, &slurm, &["run", "pipe.yaml", "--profile", "test"]);
    assert_eq!(stages_with_status(&out, "cached"), common::set(&["nap"]));
}

/// A helper process, started in a process group of its own, stopped with
/// all of that group when the test ends, failed or not (`flock CMD` leaves
/// CMD running, holding the lock and the test's output, if only flock goes).
struct KilledOnDrop(Child);

impl Drop for KilledOnDrop {
    fn drop(&mut self) {
        // SAFETY: signals the group this test started, by its id.
        unsafe { libc::kill(-(self.0.id() as libc::pid_t), libc::SIGKILL) };
        let _ = self.0.wait();
    }
}

/// An engine's lock that outlived it (a login node lost with the cache on
/// NFSv3 keeps its lock on the server; here another process holds it)
/// refuses `--attach`, and `--attach --take-over` adopts the run anyway.
#[test]
fn take_over_adopts_a_run_whose_dead_engine_left_its_lock() {
    use std::os::unix::process::CommandExt;
    let slurm = Slurm::start(1);
    let p = project_with(GATED);
    let run = engine_killed_with_its_job_running(&p, &slurm);
    let lock = p.path(&format!("cache/runs/{run}/engine.lock"));
    // Waiting for the lock: the killed engine's may take a moment to go.
    let _stale = KilledOnDrop(
        Command::new("flock")
            .args(["--timeout", "10"])
            .arg(&lock)
            .args(["sleep", "600"])
            .process_group(0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("flock starts"),
    );
    wait_until(Duration::from_secs(10), "the stale lock", || {
        !Command::new("flock")
            .arg("--nonblock")
            .arg(&lock)
            .arg("true")
            .status()
            .unwrap()
            .success()
    });
    let out = output(&p, &slurm, &["run", "--attach", &run]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("alignflow run --attach {run} --take-over")),
        "{stderr}"
    );
    let mut attach = spawn(&p, &slurm, &["run", "--attach", &run, "--take-over"]);
    let stderr = stderr_once(&mut attach, "adopt", Duration::from_secs(120));
    // The taken-over run has an engine's lock again: a second attach is
    // refused while this one follows the job.
    let second = output(&p, &slurm, &["run", "--attach", &run]);
    let second_err = String::from_utf8_lossy(&second.stderr);
    assert!(
        second_err.contains(&format!("has a live engine (pid {}", attach.id())),
        "{second_err}"
    );
    p.write("go", "");
    let out = finish(attach, Duration::from_secs(120));
    let stderr = stderr.join().unwrap();
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("taking run"), "{stderr}");
    assert_eq!(
        stages_with_status(&String::from_utf8_lossy(&out.stdout), "ran"),
        common::set(&["nap"])
    );
    assert_eq!(slurm.calls("sbatch"), 1, "adopted, not submitted again");
}

/// `--attach` to a run whose engine is alive is refused (two engines would
/// each retry and cancel its jobs), and leaves the run alone.
#[test]
fn attach_refuses_a_run_whose_engine_is_alive() {
    let slurm = Slurm::start(1);
    let p = project_with(GATED);
    let child = spawn(&p, &slurm, &["run", "pipe.yaml", "--profile", "test"]);
    wait_until(Duration::from_secs(30), "a running, journaled job", || {
        job_in_state(&slurm, "RUNNING").is_some() && journaled(&p)
    });
    let run = run_id(&p);
    let out = output(&p, &slurm, &["run", "--attach", &run]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("run {run} has a live engine (pid {}", child.id())),
        "{stderr}"
    );
    // `--take-over` is for an engine known dead: a live one of this host
    // keeps its run.
    let out = output(&p, &slurm, &["run", "--attach", &run, "--take-over"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("pid {} on this host, is alive", child.id())),
        "{stderr}"
    );
    assert!(job_in_state(&slurm, "RUNNING").is_some(), "the job runs on");
    p.write("go", "");
    let out = finish(child, Duration::from_secs(120));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(slurm.calls("sbatch"), 1);
}

/// An `exec` stage with `checkpoint_signal: true` gets the job's SIGUSR1
/// (its command traps it and finishes); without the param the signal would
/// stay with `stage exec` and the command would wait out its loop.
#[test]
fn an_exec_command_that_asks_for_it_gets_the_checkpoint_signal() {
    let slurm = Slurm::start(1);
    let p = project_with(
        r#"version: 1
name: trapping
stages:
  nap:
    op: exec
    outputs: [x]
    params:
      checkpoint_signal: true
      cmd: 'trap "touch asked" USR1; touch started; for i in $(seq 600); do [ -f asked ] && break; sleep 0.1; done; [ -f asked ] && echo done > "$ALIGNFLOW_OUT/x"'
"#,
    );
    let child = spawn(&p, &slurm, &["run", "pipe.yaml", "--profile", "test"]);
    wait_until(Duration::from_secs(60), "the command running", || {
        p.path("started").exists()
    });
    let job = job_in_state(&slurm, "RUNNING").expect("the job runs");
    let status = slurm
        .command("scancel")
        .args(["--signal=USR1", "--batch", &job])
        .status()
        .unwrap();
    assert!(status.success());
    let out = finish(child, Duration::from_secs(90));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(p.path("asked").exists());
    assert_eq!(slurm.calls("sbatch"), 1, "{stderr}");
}

/// A stage whose first job never commits (it marks the project, sleeps,
/// and ends without its output); a later one finishes at once.
const SECOND_ATTEMPT_ONLY: &str = r#"version: 1
name: second
stages:
  nap:
    op: exec
    outputs: [x]
    params: { cmd: 'if [ -f first-attempt ]; then echo done > "$ALIGNFLOW_OUT/x"; else touch first-attempt; sleep 120; fi' }
"#;

/// Starts the run of a project whose stage marks `first-attempt`, with a
/// job called lost 2 s after it leaves squeue; returns once the first job's
/// command runs.
fn run_until_first_attempt(p: &Project, slurm: &Slurm) -> Child {
    p.write(
        "alignflow/profiles/test.yaml",
        &PROFILE.replace("lost_after: 10", "lost_after: 2"),
    );
    let child = spawn(p, slurm, &["run", "pipe.yaml", "--profile", "test"]);
    wait_until(Duration::from_secs(30), "the first job's command", || {
        p.path("first-attempt").exists()
    });
    child
}

#[test]
fn a_job_lost_from_squeue_is_resubmitted() {
    let mut slurm = Slurm::start(1);
    // Only a second job can commit the stage: with a job that just slept
    // (15 s), a slow controller restart could let the lost job commit
    // before the engine called it lost, and nothing would be resubmitted.
    let p = project_with(SECOND_ATTEMPT_ONLY);
    let child = run_until_first_attempt(&p, &slurm);
    slurm.restart_controller_clean();
    let out = finish(child, Duration::from_secs(180));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}\n{}", slurm.logs());
    assert!(stderr.contains("is lost (not in squeue"), "{stderr}");
    let jobs = submissions(&p, &run_id(&p));
    assert_eq!(jobs.len(), 2, "{jobs:?}");
    // The lost job is journaled as ended: `--attach` would not adopt it.
    let journal =
        std::fs::read_to_string(p.path(&format!("cache/runs/{}/jobs.jsonl", run_id(&p)))).unwrap();
    let lost = journal
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|v| v["event"] == "ended" && v["job_id"] == jobs[0]["job_id"]);
    assert_eq!(
        lost.map(|v| v["state"].clone()),
        Some("LOST".into()),
        "{journal}"
    );
}

/// A stage whose first attempt fails once the file `go` exists.
const FAILS_WHEN_TOLD: &str = r#"version: 1
name: told
stages:
  nap:
    op: exec
    outputs: [x]
    params: { cmd: 'if [ -f first-attempt ]; then echo done > "$ALIGNFLOW_OUT/x"; else touch first-attempt; while [ ! -f go ]; do sleep 0.1; done; echo told to fail >&2; exit 3; fi' }
"#;

/// A job that failed where squeue cannot show it (the controller lost its
/// state meanwhile, as a job past `MinJobAge` is gone): the failure its
/// node reported fails the stage; it is not resubmitted as lost.
#[test]
fn a_job_that_failed_out_of_squeues_sight_fails_its_stage() {
    let mut slurm = Slurm::start(1);
    let p = project_with(FAILS_WHEN_TOLD);
    let child = run_until_first_attempt(&p, &slurm);
    slurm.restart_controller_clean_after(|| {
        p.write("go", "");
        wait_until(Duration::from_secs(30), "the node's failure event", || {
            common::walk(&p.path("cache/tmp")).iter().any(|f| {
                f.file_name().is_some_and(|n| n == "events.jsonl")
                    && std::fs::read_to_string(f).is_ok_and(|t| t.contains(r#""event":"failed""#))
            })
        });
    });
    let out = finish(child, Duration::from_secs(120));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("has left squeue") && stderr.contains("exit status 3"),
        "{stderr}"
    );
    assert!(!stderr.contains("resubmitting"), "{stderr}");
    assert_eq!(submissions(&p, &run_id(&p)).len(), 1);
}

/// Two stages that wait for each other (so they run at once) and write
/// what `var` says on their node.
fn side_by_side(var: &str, resources: &str) -> String {
    let var_ref = format!("${var}");
    let stage = |name: &str| {
        format!(
            r#"  {name}:
    op: exec
    outputs: [seen]
    resources: {resources}
    params:
      cmd: |
        touch "$PWD/started-{name}"
        for i in $(seq 100); do [ "$(ls "$PWD" | grep -c '^started-')" -ge 2 ] && break; sleep 0.2; done
        echo "{var_ref}" > "$ALIGNFLOW_OUT/seen"
"#
        )
    };
    format!(
        "version: 1\nname: pair\nstages:\n{}{}",
        stage("left"),
        stage("right")
    )
}

/// What the `seen` outputs of a run say.
fn seen(p: &Project) -> BTreeSet<String> {
    ["left", "right"]
        .iter()
        .map(|s| output_text(p, s, "seen"))
        .collect()
}

#[test]
fn two_gpu_stages_see_different_devices() {
    let slurm = Slurm::start(1);
    let p = project_with(&side_by_side("CUDA_VISIBLE_DEVICES", "{ gpus: 1 }"));
    ok(&p, &slurm, &["run", "pipe.yaml", "--profile", "test"]);
    assert_eq!(seen(&p), common::set(&["0", "1"]));
}

#[test]
fn two_nodes_run_stages_with_one_squeue_call_per_tick() {
    let slurm = Slurm::start(2);
    // Two CPUs each: one stage fills a node.
    let p = project_with(&side_by_side("SLURMD_NODENAME", "{ cpus: 2 }"));
    let start = Instant::now();
    ok(&p, &slurm, &["run", "pipe.yaml", "--profile", "test"]);
    let elapsed = start.elapsed().as_secs_f64();
    assert_eq!(seen(&p), common::set(&["n1", "n2"]));
    // The profile polls every 0.3 s, whatever the number of jobs.
    let calls = slurm.calls("squeue");
    assert!(calls >= 1);
    assert!(
        calls as f64 <= elapsed / 0.3 + 1.0,
        "{calls} squeue calls in {elapsed:.1} s: more than one per 0.3 s tick"
    );
}

#[test]
fn the_cluster_comes_up_quickly() {
    let start = Instant::now();
    let slurm = Slurm::start(1);
    let up = start.elapsed();
    eprintln!("single-node Slurm up in {up:?}");
    // Seconds, with room for a loaded machine (measured: 2 to 4 s idle).
    assert!(up < Duration::from_secs(30), "{up:?}");
    let doctor = slurm
        .env(&mut Command::new(env!("CARGO_BIN_EXE_alignflow")))
        .arg("doctor")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&doctor.stdout);
    assert!(text.contains("partition debug"), "{text}");
    assert!(text.contains("executor   local"), "{text}");
}

/// An engine started inside a job or an allocation has that job's SLURM_*
/// variables: they stay out of the jobs it submits, where srun would read
/// them as its options.
#[test]
fn the_engines_own_slurm_variables_stay_out_of_its_jobs() {
    let slurm = Slurm::start(1);
    let p = project_with(
        r#"version: 1
name: env
stages:
  env:
    op: exec
    outputs: [vars]
    params: { cmd: 'echo "mem=$${SLURM_MEM_PER_NODE:-unset} cpus=$${SLURM_CPUS_PER_TASK:-unset} conf=$${SLURM_CONF:+set}" > "$ALIGNFLOW_OUT/vars"' }
"#,
    );
    let out = run_on_cluster(&p, &slurm, &[])
        .env("SLURM_MEM_PER_NODE", "1000")
        .env("SLURM_CPUS_PER_TASK", "7")
        .env("SLURM_JOB_ID", "424242")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        output_text(&p, "env", "vars"),
        "mem=unset cpus=unset conf=set"
    );
}

/// sbatch may time out talking to a busy controller after it queued the
/// job: the engine follows the job the controller queued (found by the
/// stage's comment) instead of failing the stage with a job running
/// untracked, or queuing a second; and when none was queued, it tries
/// again.
#[test]
fn a_job_queued_though_sbatch_failed_is_followed() {
    let slurm = Slurm::start(1);
    let p = project_with(&data_pipeline());
    let flaky = p.path("flakybin");
    std::fs::create_dir_all(&flaky).unwrap();
    // Fails once, after passing the request on (`queued`) or not (`lost`).
    let fail_once = |mode: &str| {
        let marker = p.path(&format!("failed-{mode}"));
        let forward = if mode == "queued" {
            "  sbatch \"$@\" > /dev/null\n"
        } else {
            ""
        };
        p.write(
            "flakybin/sbatch",
            &format!(
                "#!/bin/sh\nPATH=\"${{PATH#*:}}\"\nif [ ! -e {0} ]; then\n  touch {0}\n{forward}  echo 'sbatch: error: Batch job submission failed: Socket timed out on send/recv operation' >&2\n  exit 1\nfi\nexec sbatch \"$@\"\n",
                marker.display()
            ),
        );
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(flaky.join("sbatch"), std::fs::Permissions::from_mode(0o755))
            .unwrap();
    };
    let run = |target: &str| {
        let out = run_on_cluster(&p, &slurm, &["--target", target])
            .env("PATH", format!("{}:{}", flaky.display(), slurm.path_env()))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(out.status.success(), "{stderr}");
        let ran = stages_with_status(&String::from_utf8_lossy(&out.stdout), "ran");
        assert_eq!(ran, common::set(&[target]));
        stderr
    };
    fail_once("queued");
    let stderr = run("comparisons");
    assert!(
        stderr.contains("but the controller queued its job"),
        "{stderr}"
    );
    assert_eq!(slurm.calls("sbatch"), 1, "one job, not a second");
    fail_once("lost");
    let stderr = run("count");
    assert!(stderr.contains("trying again in 10s"), "{stderr}");
    assert_eq!(slurm.calls("sbatch"), 2);
}

/// The same, with the engine dead while the job failed: `run --attach`
/// reads the adopted job's events from its submission on, so the failure
/// its node reported fails the stage instead of a resubmission.
#[test]
fn attach_fails_a_stage_whose_job_failed_while_no_engine_followed_it() {
    let mut slurm = Slurm::start(1);
    let p = project_with(FAILS_WHEN_TOLD);
    p.write(
        "alignflow/profiles/test.yaml",
        &PROFILE.replace("lost_after: 10", "lost_after: 2"),
    );
    let run = engine_killed_with_its_job_running(&p, &slurm);
    slurm.restart_controller_clean_after(|| {
        p.write("go", "");
        wait_until(Duration::from_secs(30), "the node's failure event", || {
            common::walk(&p.path("cache/tmp")).iter().any(|f| {
                f.file_name().is_some_and(|n| n == "events.jsonl")
                    && std::fs::read_to_string(f).is_ok_and(|t| t.contains(r#""event":"failed""#))
            })
        });
    });
    let out = output(&p, &slurm, &["run", "--attach", &run]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("exit status 3"), "{stderr}");
    assert!(!stderr.contains("resubmitting"), "{stderr}");
    assert_eq!(submissions(&p, &run).len(), 1);
}

/// An sbatch that queues the job and then never answers (a controller
/// that accepted the request and hung) is killed after
/// `command_timeout`, and the job it queued is followed: the stage does
/// not wait for good.
#[test]
fn a_hung_sbatch_is_killed_and_the_job_it_queued_followed() {
    let slurm = Slurm::start(1);
    // The job outlives the hung call, as most jobs do.
    let p = project_with(
        "version: 1
name: hung
stages:
  slow:
    op: exec
    outputs: [done]
    params: { cmd: 'sleep 6 && touch \"$ALIGNFLOW_OUT/done\"' }
",
    );
    p.write(
        "alignflow/profiles/test.yaml",
        &format!("{PROFILE}  command_timeout: 2\n"),
    );
    let hung = p.path("hungbin");
    std::fs::create_dir_all(&hung).unwrap();
    let marker = p.path("hung-once");
    p.write(
        "hungbin/sbatch",
        &format!(
            "#!/bin/sh\nPATH=\"${{PATH#*:}}\"\nif [ ! -e {0} ]; then\n  touch {0}\n  sbatch \"$@\" > /dev/null\n  exec sleep 120\nfi\nexec sbatch \"$@\"\n",
            marker.display()
        ),
    );
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(hung.join("sbatch"), std::fs::Permissions::from_mode(0o755)).unwrap();
    let start = Instant::now();
    let out = run_on_cluster(&p, &slurm, &[])
        .env("PATH", format!("{}:{}", hung.display(), slurm.path_env()))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}\n{}", slurm.logs());
    assert!(
        stderr.contains("timed out, and killed")
            && stderr.contains("but the controller queued its job"),
        "{stderr}"
    );
    assert_eq!(slurm.calls("sbatch"), 1, "one job, not a second");
    assert!(
        start.elapsed() < Duration::from_secs(60),
        "{:?}",
        start.elapsed()
    );
}

/// The engine's binary replaced mid-run (a reinstall while a long run
/// goes on): the jobs submitted after it run the binary at the same path,
/// not the path of the process's deleted file (`alignflow (deleted)`).
#[test]
fn jobs_submitted_after_the_binary_is_replaced_still_start() {
    let slurm = Slurm::start(1);
    let p = project_with(
        "version: 1
name: reinstall
stages:
  first:
    op: exec
    outputs: [done]
    params: { cmd: 'cp \"$BIN\" \"$BIN.new\" && mv \"$BIN.new\" \"$BIN\" && touch \"$ALIGNFLOW_OUT/done\"' }
  second:
    op: exec
    inputs: { after: \"${stages.first.done}\" }
    outputs: [done]
    params: { cmd: 'touch \"$ALIGNFLOW_OUT/done\"' }
",
    );
    let bin = p.path("bin/alignflow");
    std::fs::create_dir_all(bin.parent().unwrap()).unwrap();
    std::fs::copy(env!("CARGO_BIN_EXE_alignflow"), &bin).unwrap();
    // The test's usual command, run from the copy.
    let run = run_on_cluster(&p, &slurm, &[]);
    let mut command = Command::new(&bin);
    command
        .args(run.get_args())
        .current_dir(p.path(""))
        .envs(run.get_envs().filter_map(|(k, v)| Some((k, v?))))
        .env("BIN", &bin);
    let out = command.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}\n{}", slurm.logs());
    let ran = stages_with_status(&String::from_utf8_lossy(&out.stdout), "ran");
    assert_eq!(ran, common::set(&["first", "second"]), "{stderr}");
}
