//! What the worker's benches share: docs/DESIGN.md section 6's fixed model config
//! and the measurement helpers (median, device sync, peak RSS).
#![allow(dead_code)]

use tch::Device;

/// GPT-2 architecture, float32, random init with seed 0.
pub const VOCAB: i64 = 4096;
pub const POSITIONS: i64 = 256;
pub const WIDTH: i64 = 256;
pub const LAYERS: i64 = 4;
pub const HEADS: i64 = 4;
/// Sampling and PPO rollouts: 8 prompts of 32 tokens, 96 new tokens.
pub const BATCH: i64 = 8;
pub const PROMPT: i64 = 32;
pub const NEW_TOKENS: i64 = 96;
/// Mixed-length sampling: 16 prompts of `PROMPT` tokens, 4 samples each,
/// `BATCH` rows decoding at once, up to 224 new tokens (prompt and answer
/// fill the 256 positions).
pub const MIXED_PROMPTS: i64 = 16;
pub const MIXED_SAMPLES: i64 = 4;
pub const MIXED_MAX_NEW: i64 = 224;

/// The length row `j` of the mixed workload ends at: 8 to 224 tokens, each
/// length once every 217 rows (97 is prime to 217); `benches/peer_hf.py`
/// computes the same.
pub fn mixed_length(j: usize) -> usize {
    8 + (j * 97 + 31) % 217
}

/// The share of a static batch's row-steps spent on rows that have
/// finished: rows in batches of `batch`, each decoding until its longest
/// row ends.
pub fn static_idle_fraction(lengths: &[usize], batch: usize) -> f64 {
    let (mut total, mut used) = (0usize, 0usize);
    for chunk in lengths.chunks(batch) {
        total += chunk.len() * chunk.iter().max().copied().unwrap_or(0);
        used += chunk.iter().sum::<usize>();
    }
    1.0 - used as f64 / total.max(1) as f64
}

/// Waits for the device's queued work (a no-op on the CPU), so clocks
/// measure the work and not its launch.
pub fn sync(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

pub fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Peak resident set of this process (VmHWM), MiB.
pub fn vm_hwm_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map(|kb| (kb / 1024.0 * 10.0).round() / 10.0)
        .unwrap_or(f64::NAN)
}

/// A word-level `tokenizer.json`: word `t<i>` is token `i`, split on spaces,
/// no special tokens (so no EOS).
pub fn tokenizer_json(vocab_size: i64) -> serde_json::Value {
    let vocab: serde_json::Map<String, serde_json::Value> = (0..vocab_size)
        .map(|i| (format!("t{i}"), serde_json::json!(i)))
        .collect();
    serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [],
        "normalizer": null,
        "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "t0"}
    })
}

/// GPU memory this process holds (`nvidia-smi`: the caching allocator's
/// reserve plus the CUDA context), MiB; `None` where it cannot be read.
/// libtorch's allocator keeps what it reserved, so after a run this is the
/// run's peak reserve; tch exposes no `max_memory_allocated`.
pub fn cuda_mem_mib() -> Option<f64> {
    let out = std::process::Command::new("nvidia-smi")
        .args([
            "--query-compute-apps=pid,used_memory",
            "--format=csv,noheader,nounits",
        ])
        .output()
        .ok()?;
    let me = std::process::id().to_string();
    String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
        let (pid, mib) = l.split_once(',')?;
        (pid.trim() == me).then(|| mib.trim().parse().ok())?
    })
}
