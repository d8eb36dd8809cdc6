//! GPU slots: which device a tensor stage runs on, and waiting for one.

use std::sync::Mutex;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use super::Error;

/// `--gpu-slots` slots per GPU (one by default: two GPU stages never share
/// a device).
pub(super) struct GpuSlots {
    /// Free slots left on each GPU.
    free: Mutex<Vec<usize>>,
    notify: tokio::sync::Notify,
}

/// A held GPU slot.
pub(super) struct GpuSlot<'a> {
    slots: &'a GpuSlots,
    pub(super) index: usize,
}

impl Drop for GpuSlot<'_> {
    fn drop(&mut self) {
        self.slots.free.lock().unwrap_or_else(|e| e.into_inner())[self.index] += 1;
        self.slots.notify.notify_waiters();
    }
}

impl GpuSlots {
    /// GPUs the NVIDIA driver lists, narrowed by `CUDA_VISIBLE_DEVICES`.
    pub(super) fn detect(per_gpu: usize) -> GpuSlots {
        let listed = std::fs::read_dir("/proc/driver/nvidia/gpus")
            .map(|d| d.count())
            .unwrap_or(0);
        let count = match std::env::var("CUDA_VISIBLE_DEVICES") {
            Ok(v) if v.trim().is_empty() => 0,
            Ok(v) => v.split(',').count().min(listed),
            Err(_) => listed,
        };
        GpuSlots {
            free: Mutex::new(vec![per_gpu.max(1); count]),
            notify: Default::default(),
        }
    }

    /// No GPU to hand out: a cluster node, where the scheduler gave the job
    /// its devices.
    pub(super) fn none() -> GpuSlots {
        GpuSlots {
            free: Mutex::new(Vec::new()),
            notify: Default::default(),
        }
    }

    /// Slots on all GPUs together.
    pub(super) fn total(&self) -> usize {
        self.free
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .sum()
    }

    /// A GPU for a stage asking for `device`; `None` means run on the CPU.
    pub(super) async fn acquire(
        &self,
        device: &str,
        cancel: &CancellationToken,
    ) -> Result<Option<GpuSlot<'_>>, Error> {
        let count = self.free.lock().unwrap_or_else(|e| e.into_inner()).len();
        let wanted: Option<usize> = match device {
            "cpu" => return Ok(None),
            "auto" if count == 0 => return Ok(None),
            "auto" | "cuda" => None,
            other => Some(
                other
                    .strip_prefix("cuda:")
                    .and_then(|n| n.parse().ok())
                    .with_context(|| format!("bad device `{other}`"))?,
            ),
        };
        if count == 0 || wanted.is_some_and(|w| w >= count) {
            return Err(anyhow::anyhow!(
                "device `{device}` requested but {count} GPU(s) are visible"
            )
            .into());
        }
        loop {
            let notified = self.notify.notified();
            {
                let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
                let pick = match wanted {
                    Some(w) => (free[w] > 0).then_some(w),
                    // The GPU with the most free slots.
                    None => (0..free.len())
                        .filter(|&i| free[i] > 0)
                        .max_by_key(|&i| (free[i], std::cmp::Reverse(i))),
                };
                if let Some(index) = pick {
                    free[index] -= 1;
                    return Ok(Some(GpuSlot { slots: self, index }));
                }
            }
            tokio::select! {
                _ = notified => {}
                _ = cancel.cancelled() => return Err(Error::Cancelled),
            }
        }
    }
}
