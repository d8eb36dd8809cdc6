//! Reference parity with Hugging Face transformers: tiny random-init
//! checkpoints made by transformers (`tests/parity/make_reference.py`),
//! compared logit for logit, token for token, and round-tripped back.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use alignflow_worker::model::sample::{generate, SamplingConfig};
use alignflow_worker::model::{checkpoint, BuildOptions, Head, LoraConfig, LoraTargets, Model};
use tch::{Device, Kind, Tensor};

/// The fixtures of `make_reference.py`: GPT-2; Llama with GQA, tied and
/// untied; Llama 3.1's `llama3` and `linear` RoPE scaling; Qwen3 (q/k norm,
/// `head_dim` 16 with hidden 32 over 4 heads), plain and with YaRN;
/// Mistral with a 4-key sliding window on every layer and Qwen2 with one
/// on its second; SmolLM3 without RoPE in its second layer; OLMo 2 (norms
/// after each sublayer, q/k norms over the whole projection); Gemma
/// (scaled embeddings, GeGLU, `1 + w` norms), Gemma 2 (norms around each
/// sublayer, soft-capped scores and logits, alternating 4-key windows) and
/// Gemma 3 (q/k norms, local and global RoPE bases); Phi-3 (fused
/// `qkv_proj` and `gate_up_proj`, a window on every layer) and Phi-3.5's
/// LongRoPE on its long and its short factors; and Hub-style configs that
/// leave to their family's defaults what transformers 5 spells out: Gemma
/// saying `gelu`, Gemma 2 without `layer_types` or caps, Gemma 3 with
/// `sliding_window_pattern` and no RoPE bases, SmolLM3 without
/// `no_rope_layers`, RoPE base or `tie_word_embeddings`.
const MODELS: [&str; 21] = [
    "gpt2",
    "llama_gqa_tied",
    "llama_untied",
    "llama31_scaled",
    "llama_linear",
    "qwen3",
    "qwen3_yarn",
    "mistral_window",
    "qwen2_window",
    "smollm3",
    "olmo2",
    "gemma",
    "gemma2",
    "gemma3",
    "phi3_window",
    "phi35_long",
    "phi35_short",
    "gemma_gelu",
    "gemma2_hub",
    "gemma3_hub",
    "smollm3_hub",
];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn python() -> PathBuf {
    repo().join(".venv/bin/python")
}

/// `ALIGNFLOW_TEST_DEVICE` (`cpu` by default; `cuda` on a GPU machine,
/// see `scripts/gpu-check.sh`).
fn device() -> Device {
    match std::env::var("ALIGNFLOW_TEST_DEVICE").as_deref() {
        Ok("cuda") => Device::Cuda(0),
        _ => Device::Cpu,
    }
}

/// Tolerance on logits and log-probs (`ALIGNFLOW_PARITY_TOL`, default 1e-4).
fn tol() -> f64 {
    std::env::var("ALIGNFLOW_PARITY_TOL")
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or(1e-4)
}

/// The fixtures, made once per test binary (or given prebuilt in
/// `ALIGNFLOW_PARITY_FIXTURES`, on machines without transformers).
fn fixtures() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        if let Some(dir) = std::env::var_os("ALIGNFLOW_PARITY_FIXTURES") {
            return PathBuf::from(dir);
        }
        let dir = tempfile::tempdir().expect("temp dir").keep();
        let out = Command::new(python())
            .arg(repo().join("tests/parity/make_reference.py"))
            .arg(&dir)
            .output()
            .expect("the project venv's python runs (make setup)");
        assert!(
            out.status.success(),
            "make_reference.py failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        dir
    })
}

fn reference(model: &str) -> std::collections::BTreeMap<String, Tensor> {
    checkpoint::read_file(
        &fixtures().join(model).join("reference.safetensors"),
        device(),
    )
    .unwrap()
    .into_iter()
    .collect()
}

fn load(model: &str, head: Head) -> Model {
    Model::load(
        &fixtures().join(model),
        &BuildOptions {
            device: device(),
            head,
            lora: None,
            kind: tch::Kind::Float,
        },
    )
    .unwrap()
}

/// torch's generator is one per process and tests run side by side: a test
/// that seeds it and needs its draws to repeat holds this.
static TORCH_RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn torch_rng() -> std::sync::MutexGuard<'static, ()> {
    TORCH_RNG
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn max_diff_on_mask(a: &Tensor, b: &Tensor, mask: &Tensor) -> f64 {
    let real = mask.to_kind(Kind::Bool);
    (a.index(&[Some(real.shallow_clone())]) - b.index(&[Some(real)]))
        .abs()
        .max()
        .double_value(&[])
}

fn rows(t: &Tensor) -> Vec<Vec<i64>> {
    let t = t.to_device(Device::Cpu);
    let (b, _) = t.size2().unwrap();
    (0..b)
        .map(|i| Vec::<i64>::try_from(t.get(i)).unwrap())
        .collect()
}

/// The real (unpadded) tokens of each row of the reference batch.
fn prompts(r: &std::collections::BTreeMap<String, Tensor>) -> Vec<Vec<i64>> {
    let ids = rows(&r["input_ids"]);
    let mask = rows(&r["attention_mask"]);
    ids.into_iter()
        .zip(mask)
        .map(|(i, m)| {
            i.into_iter()
                .zip(m)
                .filter(|(_, m)| *m == 1)
                .map(|(t, _)| t)
                .collect()
        })
        .collect()
}

#[test]
fn logits_equal_transformers_on_a_left_padded_batch() {
    for name in MODELS {
        let r = reference(name);
        let model = load(name, Head::Lm);
        let logits = tch::no_grad(|| {
            model
                .lm
                .forward(&r["input_ids"], &r["attention_mask"], false)
        });
        let diff = max_diff_on_mask(&logits, &r["logits"], &r["attention_mask"]);
        eprintln!("{name}: max |logits - transformers| = {diff:e}");
        assert!(diff < tol(), "{name}: max |logits - transformers| = {diff}");
    }
}

#[test]
fn greedy_generation_equals_transformers_token_for_token() {
    for name in MODELS {
        let r = reference(name);
        let model = load(name, Head::Lm);
        let cfg = SamplingConfig {
            max_new_tokens: 12,
            min_new_tokens: 12,
            temperature: 0.0,
            eos_token_ids: model.lm.cfg.eos_token_id.into_iter().collect(),
            pad_token_id: 0,
            ..Default::default()
        };
        let samples = generate(&model.lm, &prompts(&r), &cfg, device(), |_, _| false);
        let expected = rows(&r["greedy_ids"].narrow(1, 10, 12));
        let expected_lp = rows(
            &(r["greedy_logprobs"].shallow_clone() * 1e6)
                .round()
                .to_kind(Kind::Int64),
        );
        for (i, s) in samples.iter().enumerate() {
            assert_eq!(s.tokens, expected[i], "{name} row {i}");
            for (j, lp) in s.logprobs.iter().enumerate() {
                let want = expected_lp[i][j] as f64 / 1e6;
                assert!(
                    (*lp as f64 - want).abs() < tol(),
                    "{name} row {i} token {j}: {lp} vs {want}"
                );
            }
        }
    }
}

#[test]
fn sampled_logprobs_equal_a_full_forward_pass_and_seeded_sampling_repeats() {
    for name in MODELS {
        let r = reference(name);
        let model = load(name, Head::Lm);
        let cfg = SamplingConfig {
            max_new_tokens: 16,
            temperature: 1.0,
            top_k: 40,
            top_p: 0.95,
            eos_token_ids: Vec::new(),
            pad_token_id: 0,
            ..Default::default()
        };
        let prompts = prompts(&r);
        let samples = generate(&model.lm, &prompts, &cfg, device(), |_, _| false);
        let again = generate(&model.lm, &prompts, &cfg, device(), |_, _| false);
        for (a, b) in samples.iter().zip(&again) {
            assert_eq!(a.tokens, b.tokens, "{name}: seeded sampling repeats");
        }
        let other = generate(
            &model.lm,
            &prompts,
            &SamplingConfig {
                seed: 12,
                ..cfg.clone()
            },
            device(),
            |_, _| false,
        );
        assert!(
            samples
                .iter()
                .zip(&other)
                .any(|(a, b)| a.tokens != b.tokens),
            "{name}: another seed samples otherwise"
        );
        // Full forward on prompt + sample, one row at a time (no padding at all).
        for (p, s) in prompts.iter().zip(&samples) {
            let seq: Vec<i64> = p.iter().chain(&s.tokens).copied().collect();
            let ids = Tensor::from_slice(&seq).unsqueeze(0).to_device(device());
            let mask = ids.ones_like();
            let lp =
                tch::no_grad(|| model.lm.forward(&ids, &mask, false)).log_softmax(-1, Kind::Float);
            for (j, tok) in s.tokens.iter().enumerate() {
                let pos = (p.len() + j - 1) as i64;
                let full = lp.double_value(&[0, pos, *tok]);
                assert!(
                    (full - s.logprobs[j] as f64).abs() < tol(),
                    "{name}: token {j}: {full} vs {}",
                    s.logprobs[j]
                );
            }
        }
    }
}

#[test]
fn eos_and_stop_conditions_end_rows() {
    let r = reference("llama_gqa_tied");
    let model = load("llama_gqa_tied", Head::Lm);
    let greedy = SamplingConfig {
        max_new_tokens: 12,
        temperature: 0.0,
        pad_token_id: 0,
        ..Default::default()
    };
    let free = generate(&model.lm, &prompts(&r), &greedy, device(), |_, _| false);
    // Make the third greedy token of row 0 the EOS: the row ends there, EOS included.
    let eos = free[0].tokens[2];
    let cfg = SamplingConfig {
        eos_token_ids: vec![eos],
        ..greedy.clone()
    };
    let out = generate(&model.lm, &prompts(&r), &cfg, device(), |_, _| false);
    let first = free[0].tokens.iter().position(|t| *t == eos).unwrap();
    assert_eq!(out[0].tokens, free[0].tokens[..=first].to_vec());
    assert_eq!(out[0].finish, alignflow_worker::model::sample::Finish::Eos);
    // Several stop ids (Llama 3's EOS and <|eot_id|>): the row ends on the
    // first of any of them, as transformers' generate does with a list.
    let (late, early) = (free[0].tokens[6], free[0].tokens[3]);
    let cfg = SamplingConfig {
        eos_token_ids: vec![late, early],
        ..greedy.clone()
    };
    let out = generate(&model.lm, &prompts(&r), &cfg, device(), |_, _| false);
    let first = free[0]
        .tokens
        .iter()
        .position(|t| *t == late || *t == early)
        .unwrap();
    assert!(first <= 3);
    assert_eq!(out[0].tokens, free[0].tokens[..=first].to_vec());
    // A stop condition after 5 tokens.
    let out = generate(&model.lm, &prompts(&r), &greedy, device(), |_, toks| {
        toks.len() == 5
    });
    assert!(out.iter().all(|s| s.tokens.len() == 5));
}

/// `tests/parity/check_saved.py` on every saved model at once (one
/// transformers import, not one per model): each model's JSON line, in
/// `saved`'s order, and the script's stderr.
fn check_saved(
    saved: &[(&str, tempfile::TempDir)],
    reward: bool,
) -> (Vec<serde_json::Value>, String) {
    let mut cmd = Command::new(python());
    cmd.arg(repo().join("tests/parity/check_saved.py"));
    if reward {
        cmd.arg("--reward");
    }
    for (name, dir) in saved {
        cmd.arg(dir.path())
            .arg(fixtures().join(name).join("reference.safetensors"));
    }
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), saved.len(), "one line per model:\n{stderr}");
    (lines, stderr)
}

#[test]
fn a_saved_checkpoint_loads_in_transformers_with_equal_logits() {
    let saved: Vec<(&str, tempfile::TempDir)> = MODELS
        .iter()
        .map(|name| {
            let mut model = load(name, Head::Lm);
            let dir = tempfile::tempdir().unwrap();
            model.save(dir.path()).unwrap();
            (*name, dir)
        })
        .collect();
    let (reports, stderr) = check_saved(&saved, false);
    for ((name, _), report) in saved.iter().zip(&reports) {
        eprintln!(
            "{name}: saved, in transformers: max_abs_diff {}",
            report["max_abs_diff"]
        );
        assert!(
            report["error"].is_null() && report["ok"] == true,
            "{name}: {report}\n{stderr}"
        );
    }
}

#[test]
fn a_reward_model_loads_in_transformers_as_sequence_classification() {
    let mut saved = Vec::new();
    let mut ours = Vec::new();
    for name in MODELS {
        let r = reference(name);
        let rng = torch_rng();
        tch::manual_seed(3);
        let mut model = load(name, Head::Reward);
        drop(rng);
        // The score of the last real token only (the last block computes
        // nothing else), as transformers reads it off the full sequence.
        let scores = tch::no_grad(|| model.scores(&r["input_ids"], &r["attention_mask"], false));
        let dir = tempfile::tempdir().unwrap();
        model.save(dir.path()).unwrap();
        // And back into alignflow (an untied model's folder has no LM head).
        let again = Model::load(
            dir.path(),
            &BuildOptions {
                device: device(),
                head: Head::Reward,
                lora: None,
                kind: tch::Kind::Float,
            },
        )
        .unwrap();
        let reloaded = tch::no_grad(|| again.scores(&r["input_ids"], &r["attention_mask"], false));
        assert!(
            reloaded.allclose(&scores, 0.0, 0.0, false),
            "{name}: reloaded rewards"
        );
        ours.push(Vec::<f64>::try_from(scores.to_kind(Kind::Double)).unwrap());
        saved.push((name, dir));
    }
    let (reports, stderr) = check_saved(&saved, true);
    for (((name, _), report), ours) in saved.iter().zip(&reports).zip(&ours) {
        assert!(report["error"].is_null(), "{name}: {report}\n{stderr}");
        let theirs: Vec<f64> = report["scores"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        assert_eq!(theirs.len(), ours.len(), "{name}");
        let max = ours
            .iter()
            .zip(&theirs)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        eprintln!("{name}: max |reward - transformers| = {max:e}");
        assert!(
            max < 1e-4,
            "{name}: rewards {ours:?} vs transformers {theirs:?}"
        );
    }
}

#[test]
fn pickled_checkpoints_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixtures().join("gpt2/config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    std::fs::write(dir.path().join("pytorch_model.bin"), b"not loaded").unwrap();
    let err = Model::load(
        dir.path(),
        &BuildOptions {
            device: Device::Cpu,
            head: Head::Lm,
            lora: None,
            kind: tch::Kind::Float,
        },
    )
    .err()
    .unwrap();
    assert!(format!("{err:#}").contains("pickled checkpoint"), "{err:#}");
}

#[test]
fn merged_lora_logits_equal_the_adapted_model() {
    for name in MODELS {
        let r = reference(name);
        let targets = if name == "gpt2" {
            vec!["c_attn", "c_fc"]
        } else {
            vec!["q_proj", "v_proj", "down_proj"]
        };
        let lora = LoraConfig {
            rank: 4,
            alpha: 8.0,
            dropout: 0.0,
            targets: LoraTargets::Modules(targets.into_iter().map(String::from).collect()),
        };
        // A's initialisation and B below are seeded, so a failure repeats.
        let rng = torch_rng();
        tch::manual_seed(17);
        let mut model = Model::load(
            &fixtures().join(name),
            &BuildOptions {
                device: device(),
                head: Head::Lm,
                lora: Some(lora),
                kind: tch::Kind::Float,
            },
        )
        .unwrap();
        // B starts at zero; give the adapters something to do.
        tch::no_grad(|| {
            for (n, mut t) in model.vs.variables() {
                if n.contains("lora_B") {
                    t.copy_(&(t.randn_like() * 0.1));
                }
            }
        });
        drop(rng);
        let trainable: Vec<String> = model.trainable().into_iter().map(|(n, _)| n).collect();
        assert!(
            !trainable.is_empty() && trainable.iter().all(|n| n.contains("lora_")),
            "{trainable:?}"
        );
        let adapted = tch::no_grad(|| {
            model
                .lm
                .forward(&r["input_ids"], &r["attention_mask"], false)
        });
        let base_diff = max_diff_on_mask(&adapted, &r["logits"], &r["attention_mask"]);
        assert!(base_diff > 1e-3, "{name}: the adapters change the logits");
        // The export: saved with the adapters folded in, loaded back plain.
        let out = tempfile::tempdir().unwrap();
        model.save(out.path()).unwrap();
        let plain = Model::load(
            out.path(),
            &BuildOptions {
                device: device(),
                head: Head::Lm,
                lora: None,
                kind: tch::Kind::Float,
            },
        )
        .unwrap();
        let merged = tch::no_grad(|| {
            plain
                .lm
                .forward(&r["input_ids"], &r["attention_mask"], false)
        });
        // W + s·BA and W, then s·B(A·x), round differently in float32, and
        // the difference grows with the logits: bound it relative to their
        // scale. Measured: at most 1.3e-6 of the largest logit over 20 seeds
        // and every family; a wrong merge (scale, transpose) is off by
        // the adapters' whole effect, over 1e-3 (asserted above).
        let diff = max_diff_on_mask(&merged, &adapted, &r["attention_mask"]);
        let scale = adapted.abs().max().double_value(&[]);
        assert!(
            diff < 1e-5 * scale,
            "{name}: merged vs adapted {diff} (largest logit {scale})"
        );
    }
}

/// The README's families table is true: every `model_type` it lists loads
/// (a fixture of that type above), and every type the loader accepts is
/// listed.
#[test]
fn the_readme_families_table_lists_what_loads() {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let listed: Vec<String> = readme
        .lines()
        .skip_while(|l| !l.starts_with("| model_type |"))
        .skip(2)
        .take_while(|l| l.starts_with('|'))
        .map(|l| {
            l.split('|')
                .nth(1)
                .unwrap()
                .trim()
                .trim_matches('`')
                .to_string()
        })
        .collect();
    let mut supported = vec!["gpt2"];
    supported.extend(alignflow_worker::model::LLAMA_FAMILY);
    let mut listed_sorted = listed.clone();
    listed_sorted.sort();
    supported.sort();
    assert_eq!(listed_sorted, supported, "README families vs the loader");
    for model_type in &listed {
        let fixture = MODELS.iter().find(|name| {
            let config =
                std::fs::read_to_string(fixtures().join(name).join("config.json")).unwrap();
            serde_json::from_str::<serde_json::Value>(&config).unwrap()["model_type"]
                == **model_type
        });
        let name = fixture.unwrap_or_else(|| panic!("no parity fixture of type {model_type}"));
        let model = load(name, Head::Lm);
        assert_eq!(model.lm.cfg.raw["model_type"], **model_type);
    }
}
