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
    /// Each GPU's name for `CUDA_VISIBLE_DEVICES`: the engine's own entry
    /// of that variable (an index or a UUID) where it was set, else its
    /// index.
    names: Vec<String>,
    notify: tokio::sync::Notify,
}

/// A stage's held GPU slots: one, or one on each of several GPUs for a
/// stage whose `placement` puts its models on several.
pub(super) struct GpuSlot<'a> {
    slots: &'a GpuSlots,
    /// The GPUs, in the order the stage numbers them (`cuda:0` first).
    pub(super) indices: Vec<usize>,
}

impl GpuSlot<'_> {
    /// The GPUs for `CUDA_VISIBLE_DEVICES`: `2` or `0,3`, in the names the
    /// engine was given (with `CUDA_VISIBLE_DEVICES=2,3`, the engine's
    /// second GPU is `3`, not `1`).
    pub(super) fn visible(&self) -> String {
        let names: Vec<&str> = self
            .indices
            .iter()
            .map(|&i| self.slots.names[i].as_str())
            .collect();
        names.join(",")
    }
}

impl Drop for GpuSlot<'_> {
    fn drop(&mut self) {
        let mut free = self.slots.free.lock().unwrap_or_else(|e| e.into_inner());
        for &i in &self.indices {
            free[i] += 1;
        }
        drop(free);
        self.slots.notify.notify_waiters();
    }
}

impl GpuSlots {
    /// GPUs the NVIDIA driver lists, narrowed by `CUDA_VISIBLE_DEVICES`.
    pub(super) fn detect(per_gpu: usize) -> GpuSlots {
        let listed = std::fs::read_dir("/proc/driver/nvidia/gpus")
            .map(|d| d.count())
            .unwrap_or(0);
        let names: Vec<String> = match std::env::var("CUDA_VISIBLE_DEVICES") {
            Ok(v) => v
                .split(',')
                .map(|n| n.trim().to_string())
                .filter(|n| !n.is_empty())
                .take(listed)
                .collect(),
            Err(_) => (0..listed).map(|i| i.to_string()).collect(),
        };
        GpuSlots::named(names, per_gpu)
    }

    /// No GPU to hand out: a cluster node, where the scheduler gave the job
    /// its devices.
    pub(super) fn none() -> GpuSlots {
        GpuSlots::of(0, 1)
    }

    /// `count` GPUs of `per_gpu` slots each, named by their index.
    fn of(count: usize, per_gpu: usize) -> GpuSlots {
        GpuSlots::named((0..count).map(|i| i.to_string()).collect(), per_gpu)
    }

    /// The GPUs `names` (for `CUDA_VISIBLE_DEVICES`), `per_gpu` slots each.
    fn named(names: Vec<String>, per_gpu: usize) -> GpuSlots {
        GpuSlots {
            free: Mutex::new(vec![per_gpu.max(1); names.len()]),
            names,
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

    /// The GPUs of a stage asking for `device` whose `placement` names
    /// `placed` GPUs (0: none) and which runs on `ranks` data-parallel
    /// ranks (1: one process); `None` means run on the CPU. A placement
    /// takes that many GPUs for each rank (each holds its own copy of every
    /// model), the ones with the most free slots, and ranks on GPUs without
    /// one take one GPU each (at least one on `cuda`/`auto`); `cuda:N` pins
    /// the stage to GPU N alone.
    pub(super) async fn acquire(
        &self,
        device: &str,
        placed: usize,
        ranks: usize,
        cancel: &CancellationToken,
    ) -> Result<Option<GpuSlot<'_>>, Error> {
        let count = self.free.lock().unwrap_or_else(|e| e.into_inner()).len();
        let pinned: Option<usize> = match device {
            "cpu" | "auto" | "cuda" => None,
            other => Some(
                other
                    .strip_prefix("cuda:")
                    .and_then(|n| n.parse().ok())
                    .with_context(|| format!("bad device `{other}`"))?,
            ),
        };
        let wanted = match device {
            "cpu" if placed == 0 => return Ok(None),
            // Ranks on the CPU (Gloo) where no GPU is.
            "auto" if count == 0 && placed == 0 => return Ok(None),
            _ => alignflow_ops::role_devices::gpus_per_rank(placed, device != "cpu") * ranks.max(1),
        };
        if pinned.is_some() && placed > 0 {
            return Err(anyhow::anyhow!(
                "device `{device}` pins the stage to one GPU, but `params.placement` names {placed} of the stage's GPUs: set `device: cuda` (the engine then picks {placed} free GPUs)"
            )
            .into());
        }
        if pinned.is_some() && ranks > 1 {
            return Err(anyhow::anyhow!(
                "device `{device}` pins the stage to one GPU, but `params.data_parallel: {ranks}` runs one rank per GPU: set `device: cuda` (the engine then picks {ranks} free GPUs)"
            )
            .into());
        }
        if count < wanted || pinned.is_some_and(|w| w >= count) {
            let asked = match (placed, ranks) {
                (0, 0 | 1) => format!("device `{device}` requested"),
                (0, n) => format!(
                    "`params.data_parallel: {n}` on device `{device}` takes one GPU per rank,"
                ),
                (n, 0 | 1) => format!("`params.placement` names {n} GPU(s)"),
                (n, r) => format!(
                    "`params.placement` names {n} GPU(s) for each of `params.data_parallel: {r}` ranks ({} in all),",
                    n * r
                ),
            };
            return Err(anyhow::anyhow!("{asked} but {count} GPU(s) are visible").into());
        }
        loop {
            let notified = self.notify.notified();
            {
                let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
                let pick: Option<Vec<usize>> = match pinned {
                    Some(w) => (free[w] > 0).then(|| vec![w]),
                    // The GPUs with the most free slots, in index order.
                    None => {
                        let mut open: Vec<usize> =
                            (0..free.len()).filter(|&i| free[i] > 0).collect();
                        open.sort_by_key(|&i| (std::cmp::Reverse(free[i]), i));
                        open.truncate(wanted);
                        open.sort_unstable();
                        (open.len() == wanted).then_some(open)
                    }
                };
                if let Some(indices) = pick {
                    for &i in &indices {
                        free[i] -= 1;
                    }
                    return Ok(Some(GpuSlot {
                        slots: self,
                        indices,
                    }));
                }
            }
            tokio::select! {
                _ = notified => {}
                _ = cancel.cancelled() => return Err(Error::Cancelled),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn run<T>(f: impl std::future::Future<Output = T>) -> T {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn a_placed_stage_holds_as_many_gpus_as_its_placement_names() {
        run(async {
            let slots = GpuSlots::of(3, 1);
            let cancel = CancellationToken::new();
            let two = slots.acquire("cuda", 2, 1, &cancel).await.unwrap().unwrap();
            assert_eq!(two.indices, vec![0, 1]);
            assert_eq!(two.visible(), "0,1");
            // Roles on the GPUs, the rest on the CPU: still two GPUs.
            let one = slots.acquire("cpu", 1, 1, &cancel).await.unwrap().unwrap();
            assert_eq!(one.indices, vec![2]);
            assert!(slots.acquire("cpu", 0, 1, &cancel).await.unwrap().is_none());
            // Nothing free: the next placed stage waits for the first.
            let waiting = tokio::time::timeout(
                Duration::from_millis(50),
                slots.acquire("cuda", 2, 1, &cancel),
            )
            .await;
            assert!(waiting.is_err(), "it should wait for two free GPUs");
            drop(two);
            let again = slots.acquire("auto", 2, 1, &cancel).await.unwrap().unwrap();
            assert_eq!(again.indices, vec![0, 1]);
            drop((one, again));
            assert_eq!(slots.total(), 3);
        });
    }

    #[test]
    fn placed_ranks_each_hold_the_gpus_their_placement_names() {
        run(async {
            let slots = GpuSlots::of(5, 1);
            let cancel = CancellationToken::new();
            let four = slots.acquire("cuda", 2, 2, &cancel).await.unwrap().unwrap();
            assert_eq!(four.visible(), "0,1,2,3");
            // Ranks on the CPU with a model on a GPU: one GPU per rank, so
            // two, where one is free.
            let waiting = tokio::time::timeout(
                Duration::from_millis(50),
                slots.acquire("cpu", 1, 2, &cancel),
            )
            .await;
            assert!(waiting.is_err(), "it should wait for two free GPUs");
            drop(four);
            let two = slots.acquire("cpu", 1, 2, &cancel).await.unwrap().unwrap();
            assert_eq!(two.indices, vec![0, 1]);
            let few = GpuSlots::of(3, 1);
            let err = match few.acquire("cuda", 2, 2, &cancel).await {
                Err(e) => e.to_string(),
                Ok(_) => panic!("4 GPUs on a machine of 3"),
            };
            assert!(
                err.contains("`params.placement` names 2 GPU(s) for each of `params.data_parallel: 2` ranks (4 in all), but 3 GPU(s) are visible"),
                "{err}"
            );
        });
    }

    #[test]
    fn a_placement_beyond_the_visible_gpus_or_on_a_pinned_device_fails() {
        run(async {
            let slots = GpuSlots::of(2, 1);
            let cancel = CancellationToken::new();
            let message = |r: Result<Option<GpuSlot<'_>>, Error>| match r {
                Err(e) => e.to_string(),
                Ok(_) => panic!("expected an error"),
            };
            let too_many = message(slots.acquire("cuda", 3, 1, &cancel).await);
            assert!(
                too_many.contains("`params.placement` names 3 GPU(s) but 2 GPU(s) are visible"),
                "{too_many}"
            );
            let pinned = message(slots.acquire("cuda:1", 2, 1, &cancel).await);
            assert!(pinned.contains("set `device: cuda`"), "{pinned}");
            let one = slots
                .acquire("cuda:1", 0, 1, &cancel)
                .await
                .unwrap()
                .unwrap();
            assert_eq!(one.indices, vec![1]);
        });
    }

    #[test]
    fn workers_see_the_gpus_by_the_names_the_engine_was_given() {
        run(async {
            // The engine ran with CUDA_VISIBLE_DEVICES=2,3 (or UUIDs).
            let slots = GpuSlots::named(vec!["2".into(), "GPU-5d1e".into()], 1);
            let cancel = CancellationToken::new();
            let both = slots.acquire("cuda", 0, 2, &cancel).await.unwrap().unwrap();
            assert_eq!(both.visible(), "2,GPU-5d1e");
            drop(both);
            let second = slots
                .acquire("cuda:1", 0, 1, &cancel)
                .await
                .unwrap()
                .unwrap();
            assert_eq!(second.visible(), "GPU-5d1e");
        });
    }

    #[test]
    fn data_parallel_ranks_on_gpus_hold_one_gpu_each_and_on_the_cpu_none() {
        run(async {
            let slots = GpuSlots::of(3, 1);
            let cancel = CancellationToken::new();
            let two = slots.acquire("cuda", 0, 2, &cancel).await.unwrap().unwrap();
            assert_eq!(two.indices, vec![0, 1]);
            assert_eq!(two.visible(), "0,1");
            // On the CPU the ranks are Gloo processes: no GPU.
            assert!(slots.acquire("cpu", 0, 2, &cancel).await.unwrap().is_none());
            // Two more ranks wait for the first stage's GPUs.
            let waiting = tokio::time::timeout(
                Duration::from_millis(50),
                slots.acquire("auto", 0, 2, &cancel),
            )
            .await;
            assert!(waiting.is_err(), "it should wait for two free GPUs");
            drop(two);
            let again = slots.acquire("auto", 0, 2, &cancel).await.unwrap().unwrap();
            assert_eq!(again.indices, vec![0, 1]);

            // With no GPU, `auto` runs the ranks on the CPU.
            let none = GpuSlots::of(0, 1);
            assert!(none.acquire("auto", 0, 2, &cancel).await.unwrap().is_none());
            let message = |r: Result<Option<GpuSlot<'_>>, Error>| match r {
                Err(e) => e.to_string(),
                Ok(_) => panic!("expected an error"),
            };
            let short = message(slots.acquire("cuda", 0, 4, &cancel).await);
            assert!(
                short.contains("`params.data_parallel: 4` on device `cuda` takes one GPU per rank, but 3 GPU(s) are visible"),
                "{short}"
            );
            let pinned = message(slots.acquire("cuda:0", 0, 2, &cancel).await);
            assert!(
                pinned.contains("runs one rank per GPU: set `device: cuda`"),
                "{pinned}"
            );
        });
    }
}
