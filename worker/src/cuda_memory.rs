//! The CUDA caching allocator's peak, as `torch.cuda.max_memory_allocated`
//! reads it: the bytes of live tensors at their highest since the process
//! began (or [`reset_peak`]), leaving out the allocator's spare reserve and
//! the CUDA context that `nvidia-smi` also counts. A stage on GPUs reports
//! it in its metrics ([`stage_peaks`]); the benchmarks print it. tch
//! exposes none of this, so it comes through the shim
//! (`csrc/cuda_memory.cpp`), built where the CUDA headers are.

use tch::Device;

/// The metric a stage on GPUs reports: each GPU's peak, MiB, by device.
pub const PEAK_METRIC: &str = "cuda_max_memory_allocated_mib";

#[cfg(alignflow_cuda_memory)]
mod ffi {
    use std::ffi::c_char;

    use crate::shim::take_message;

    extern "C" {
        fn alignflow_cuda_peak_allocated(device: i32, error: *mut *mut c_char) -> i64;
        fn alignflow_cuda_reset_peak(device: i32, error: *mut *mut c_char) -> bool;
    }

    pub fn peak(index: i32) -> anyhow::Result<u64> {
        let mut error = std::ptr::null_mut();
        // SAFETY: `index` is a device this process sees (checked by the
        // caller); the shim catches C++ exceptions and sets `error`.
        let bytes = unsafe { alignflow_cuda_peak_allocated(index, &mut error) };
        match u64::try_from(bytes) {
            Ok(bytes) => Ok(bytes),
            Err(_) => anyhow::bail!("cuda:{index}: {}", unsafe { take_message(error) }),
        }
    }

    pub fn reset(index: i32) -> anyhow::Result<()> {
        let mut error = std::ptr::null_mut();
        // SAFETY: as in `peak`.
        match unsafe { alignflow_cuda_reset_peak(index, &mut error) } {
            true => Ok(()),
            false => anyhow::bail!("cuda:{index}: {}", unsafe { take_message(error) }),
        }
    }
}

#[cfg(not(alignflow_cuda_memory))]
mod ffi {
    const MISSING: &str =
        "this worker was built without the CUDA headers (`make setup` installs them)";

    pub fn peak(_: i32) -> anyhow::Result<u64> {
        anyhow::bail!(MISSING)
    }

    pub fn reset(_: i32) -> anyhow::Result<()> {
        anyhow::bail!(MISSING)
    }
}

/// The GPU index of `device`, which must be one this process sees.
fn index(device: Device) -> anyhow::Result<i32> {
    let Device::Cuda(index) = device else {
        anyhow::bail!("{device:?} is not a GPU: peaks are the CUDA allocator's");
    };
    let seen = if tch::Cuda::is_available() {
        tch::Cuda::device_count()
    } else {
        0
    };
    anyhow::ensure!(
        (index as i64) < seen,
        "cuda:{index} is not a GPU this process sees ({seen})"
    );
    Ok(index as i32)
}

/// Peak bytes allocated on `device` since the process began or the last
/// [`reset_peak`] (`torch.cuda.max_memory_allocated(device)`).
pub fn peak_allocated(device: Device) -> anyhow::Result<u64> {
    ffi::peak(index(device)?)
}

/// [`peak_allocated`] in MiB, to a tenth: what the stage metrics and the
/// benchmarks print.
pub fn peak_mib(device: Device) -> anyhow::Result<f64> {
    let bytes = peak_allocated(device)?;
    Ok((bytes as f64 / (1u64 << 20) as f64 * 10.0).round() / 10.0)
}

/// Starts a new peak on `device` from what is allocated now
/// (`torch.cuda.reset_peak_memory_stats(device)`).
pub fn reset_peak(device: Device) -> anyhow::Result<()> {
    ffi::reset(index(device)?)
}

/// The peak of every GPU this process allocated on, MiB, keyed `cuda:N`;
/// empty on the CPU or where the peaks cannot be read.
pub fn stage_peaks() -> serde_json::Map<String, serde_json::Value> {
    if !tch::Cuda::is_available() {
        return Default::default();
    }
    (0..tch::Cuda::device_count())
        .filter_map(|i| {
            let mib = peak_mib(Device::Cuda(i as usize)).ok()?;
            (mib > 0.0).then(|| (format!("cuda:{i}"), mib.into()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peak_is_a_gpus_and_counts_what_was_allocated_there() {
        assert!(peak_allocated(Device::Cpu)
            .unwrap_err()
            .to_string()
            .contains("not a GPU"));
        if !tch::Cuda::is_available() {
            let err = peak_allocated(Device::Cuda(0)).unwrap_err().to_string();
            assert!(err.contains("not a GPU this process sees (0)"), "{err}");
            assert!(stage_peaks().is_empty());
            return;
        }
        // On a GPU (`scripts/gpu-check.sh` runs the worker's unit tests):
        // 256 MiB of float32 raise the peak by 256 MiB, and a reset after
        // they are freed starts from what is left.
        let gpu = Device::Cuda(0);
        reset_peak(gpu).unwrap();
        let before = peak_allocated(gpu).unwrap();
        let t = tch::Tensor::zeros([64 << 20], (tch::Kind::Float, gpu));
        let during = peak_allocated(gpu).unwrap();
        assert_eq!(during - before, 256 << 20);
        drop(t);
        reset_peak(gpu).unwrap();
        assert_eq!(peak_allocated(gpu).unwrap(), before);
        let mib = peak_mib(gpu).unwrap();
        assert!(
            (mib - before as f64 / (1u64 << 20) as f64).abs() <= 0.05,
            "{mib}"
        );
        assert!(stage_peaks().contains_key("cuda:0"));
    }
}
