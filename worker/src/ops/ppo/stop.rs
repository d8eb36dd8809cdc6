//! The error that stops the stage on a NaN or infinite value.

use crate::train::Checkpoints;

/// Stops the stage when a value it checks is NaN or infinite, naming the
/// checkpoint a rerun resumes from.
pub(super) struct Stop<'a> {
    pub stage: &'a str,
    pub checkpoints: &'a Checkpoints,
}

impl Stop<'_> {
    /// `Ok` if `value` (the `what` of iteration `it`) is finite.
    pub(super) fn unless_finite(&self, it: u64, what: &str, value: f64) -> anyhow::Result<()> {
        if value.is_finite() {
            return Ok(());
        }
        Err(anyhow::anyhow!(
            "stage `{}`: iteration {it}: the {what} is {value} (NaN or inf); stopped, keeping the last good checkpoint{}",
            self.stage,
            match self.checkpoints.latest() {
                Ok(Some(dir)) => format!(" ({})", dir.display()),
                _ => " (none yet)".to_string(),
            }
        ))
    }
}
