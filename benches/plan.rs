//! Engine benchmark (docs/DESIGN.md section 6): planning a 20-stage manifest whose
//! stages are all cached, with a 1 GiB input file. Measures the whole
//! `alignflow plan` process (start-up included), as a user sees it.
//!
//! Run: `cargo bench --bench plan` (release build). Prints the median and
//! the 90th percentile of 30 runs after one warm-up plan.

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const STAGES: usize = 20;
const INPUT_BYTES: u64 = 1 << 30;
const RUNS: usize = 30;

fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    write_big_input(&dir.path().join("big.bin"))?;
    std::fs::write(dir.path().join("pipeline.yaml"), manifest())?;
    let bin = env!("CARGO_BIN_EXE_alignflow");
    let alignflow = |args: &[&str]| -> anyhow::Result<Duration> {
        let start = Instant::now();
        let out = Command::new(bin)
            .args(args)
            .current_dir(dir.path())
            .output()?;
        let took = start.elapsed();
        anyhow::ensure!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(took)
    };
    let first_run = alignflow(&["run", "pipeline.yaml", "--quiet"])?;
    let first_plan = alignflow(&["plan", "pipeline.yaml"])?;
    let mut times: Vec<Duration> = (0..RUNS)
        .map(|_| alignflow(&["plan", "pipeline.yaml"]))
        .collect::<Result<_, _>>()?;
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!("workload: {STAGES} cached stages, one 1 GiB input, `alignflow plan`, {RUNS} runs");
    println!(
        "first run (hashes the input, runs the stages): {:.1} ms",
        ms(first_run)
    );
    println!("first plan after the run: {:.1} ms", ms(first_plan));
    println!(
        "plan median: {:.2} ms   p90: {:.2} ms   min: {:.2} ms",
        ms(times[RUNS / 2]),
        ms(times[RUNS * 9 / 10]),
        ms(times[0])
    );
    Ok(())
}

/// 1 GiB of non-repeating bytes, written once.
fn write_big_input(path: &Path) -> std::io::Result<()> {
    let mut f = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
    let mut block = vec![0u8; 1 << 20];
    for i in 0..(INPUT_BYTES >> 20) {
        let seed = blake3::hash(&i.to_le_bytes());
        let mut xof = blake3::Hasher::new().update(seed.as_bytes()).finalize_xof();
        xof.fill(&mut block);
        f.write_all(&block)?;
    }
    f.flush()
}

/// A root stage reading the big input, then a chain and fan-out of 19 more.
fn manifest() -> String {
    let mut m = String::from("version: 1\nname: bench\nstages:\n");
    m.push_str("  s0:\n    op: exec\n    inputs: { big: big.bin }\n    outputs: [out]\n    params: { cmd: 'head -c 64 \"$ALIGNFLOW_IN_BIG\" > \"$ALIGNFLOW_OUT/out\"' }\n");
    for i in 1..STAGES {
        let up = if i % 2 == 0 { i - 1 } else { i / 2 };
        m.push_str(&format!(
            "  s{i}:\n    op: exec\n    inputs: {{ x: '${{stages.s{up}.out}}' }}\n    outputs: [out]\n    params: {{ cmd: 'cat \"$ALIGNFLOW_IN_X\" > \"$ALIGNFLOW_OUT/out\"; echo {i} >> \"$ALIGNFLOW_OUT/out\"' }}\n"
        ));
    }
    m
}
