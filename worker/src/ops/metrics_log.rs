//! A stage's `metrics.jsonl`: one JSON line per training step (or `ppo`
//! iteration), written in the checkpoint folder so that a resumed run
//! continues it, then published as the stage's `metrics` output; and the
//! preference ops' held-out evaluation: its `eval` report and the line they
//! append to the published log.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;

use alignflow_ops::protocol::Metrics;
use alignflow_ops::StageContext;

/// The log being written.
pub struct MetricsLog {
    path: PathBuf,
    file: File,
}

impl MetricsLog {
    /// Opens `dir/metrics.jsonl` for appending. `resumed`: the counter
    /// field of each line (`step`, `iteration`) and the last one the
    /// resumed checkpoint holds; lines past it belong to the interrupted
    /// run and are dropped. Without a resume the log starts empty.
    pub fn open(dir: &Path, resumed: Option<(&str, u64)>) -> anyhow::Result<MetricsLog> {
        let path = dir.join("metrics.jsonl");
        match resumed {
            Some((counter, done)) => truncate(&path, counter, done)?,
            None => {
                let _ = std::fs::remove_file(&path);
            }
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        Ok(MetricsLog { path, file })
    }

    /// Appends one line.
    pub fn write(&mut self, line: &serde_json::Value) -> anyhow::Result<()> {
        writeln!(self.file, "{line}")?;
        Ok(())
    }

    /// Writes out the lines so far: before a checkpoint, which says they
    /// are done.
    pub fn flush(&mut self) -> anyhow::Result<()> {
        self.file.flush()?;
        Ok(())
    }

    /// [`MetricsLog::flush`], and on to the disk.
    pub fn sync(&mut self) -> anyhow::Result<()> {
        self.file.flush()?;
        self.file.sync_data()?;
        Ok(())
    }

    /// Copies the finished log to the stage's `metrics` output.
    pub fn publish(mut self, ctx: &StageContext<'_>) -> anyhow::Result<()> {
        self.flush()?;
        drop(self.file);
        std::fs::create_dir_all(&ctx.spec.out_dir)?;
        std::fs::copy(&self.path, ctx.output("metrics")).context("copying metrics.jsonl")?;
        Ok(())
    }
}

/// Drops the lines whose `counter` is past `done`.
fn truncate(path: &Path, counter: &str, done: u64) -> anyhow::Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v[counter].as_u64())
                .is_some_and(|s| s <= done)
        })
        .collect();
    let mut body = kept.join("\n");
    if !body.is_empty() {
        body.push('\n');
    }
    // A new file renamed over the old: a kill halfway keeps the old one.
    let dir = path.parent().unwrap_or(Path::new("."));
    let written = (|| -> std::io::Result<()> {
        let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
        tmp.write_all(body.as_bytes())?;
        tmp.as_file().sync_all()?;
        tmp.persist(path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    written.with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// A figure as JSON: `null` when it is not finite.
pub fn finite_or_null(v: f64) -> serde_json::Value {
    if v.is_finite() {
        serde_json::json!(v)
    } else {
        serde_json::Value::Null
    }
}

/// Writes the held-out evaluation: `report` as the `eval` output, and its
/// line (`step`: the training's last, `eval_pairs`, then `figures`)
/// appended to the published `metrics` output; reports the line's numbers
/// and adds them (but the step) to `metrics`.
pub fn write_held_out_eval(
    ctx: &StageContext<'_>,
    metrics: &mut Metrics,
    report: &serde_json::Value,
    pairs: usize,
    figures: Vec<(String, serde_json::Value)>,
) -> anyhow::Result<()> {
    std::fs::write(
        ctx.output("eval"),
        serde_json::to_string_pretty(report)? + "\n",
    )
    .context("writing eval")?;
    let mut point = serde_json::Map::new();
    point.insert("step".into(), metrics["steps"].clone());
    point.insert("eval_pairs".into(), pairs.into());
    for (k, v) in figures {
        point.insert(k, v);
    }
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(ctx.output("metrics"))
        .context("appending to metrics")?;
    writeln!(file, "{}", serde_json::Value::Object(point.clone()))?;
    ctx.reporter.metric(
        &point
            .iter()
            .filter_map(|(k, v)| Some((k.clone(), v.as_f64()?)))
            .collect(),
    );
    for (k, v) in point.into_iter().filter(|(k, _)| k != "step") {
        metrics.insert(k, v);
    }
    Ok(())
}
