//! TensorBoard runs: one folder per stage instance under the tracking
//! folder, holding one event file of scalars.
//!
//! The event-file format (TFRecord framing with masked CRC32C, `Event` and
//! `Summary` protos) comes from `syntaxdot-summary`, which writes scalars
//! and nothing else and flushes after every event, so TensorBoard sees a
//! running stage's points as they come. (`tensorboard-rs` is unmaintained
//! and panics on I/O errors.)

use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use syntaxdot_summary::SummaryWriter;

use super::points::Point;

/// The suffix of the event files alignflow writes: a run folder's earlier
/// file of ours is replaced, anything else in it is left alone.
const OURS: &str = ".alignflow";

/// One stage instance's TensorBoard run.
pub struct TbRun {
    dir: PathBuf,
    writer: SummaryWriter<BufWriter<File>>,
}

impl TbRun {
    /// Starts the run of stage `stage_id` under `root`: `root/STAGE_ID/`,
    /// with a fresh event file replacing the one an earlier run of the
    /// instance left (its steps would otherwise show twice).
    pub fn create(root: &Path, stage_id: &str) -> anyhow::Result<TbRun> {
        let dir = root.join(run_folder(stage_id));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        for entry in std::fs::read_dir(&dir)? {
            let name = entry?.file_name().to_string_lossy().into_owned();
            if name.starts_with("events.out.tfevents.") && name.ends_with(OURS) {
                std::fs::remove_file(dir.join(&name))
                    .with_context(|| format!("replacing {}", dir.join(&name).display()))?;
            }
        }
        let micros = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_micros());
        let path = dir.join(format!("events.out.tfevents.{micros}{OURS}"));
        let file = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        let writer = SummaryWriter::new(BufWriter::new(file))
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(TbRun { dir, writer })
    }

    /// Appends the points' scalars under their field names; each event is
    /// flushed as it is written.
    pub fn write(&mut self, points: &[Point]) -> anyhow::Result<()> {
        for point in points {
            for (name, value) in &point.scalars {
                // TensorBoard's simple values are 32-bit floats.
                self.writer
                    .write_scalar(name.as_str(), point.step, *value as f32)
                    .with_context(|| format!("writing an event in {}", self.dir.display()))?;
            }
        }
        Ok(())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// A stage id as one folder name (a matrix value may hold a `/`).
fn run_folder(stage_id: &str) -> String {
    stage_id.replace(['/', '\\'], "_")
}
