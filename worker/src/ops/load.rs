//! How the ops load a stage's model folders: the tokenizer, the model on
//! the stage's device with the head (and LoRA adapters) the op asks for, its
//! EOS token, and the checks that several folders fit together.

use std::path::Path;

use anyhow::Context;
use tch::{Device, Kind};

use alignflow_ops::text::Tokenizer;
use alignflow_ops::training::LoraParams;
use alignflow_ops::{ChatFormat, ChatTemplateChoice, Dtype, Role, RoleDevices, StageContext};

use crate::model::{BuildOptions, Head, LoraConfig, Model, ModelConfig};

/// The kind of a stage's `dtype` on `device`: `auto` is bfloat16 on CUDA
/// (every GPU torch runs on computes in it; Ampere and later natively),
/// float32 on the CPU.
pub(crate) fn weights_kind(dtype: Dtype, device: Device) -> Kind {
    match dtype {
        Dtype::Auto if device.is_cuda() => Kind::BFloat16,
        Dtype::Auto | Dtype::Float32 => Kind::Float,
        Dtype::Bfloat16 => Kind::BFloat16,
        Dtype::Float16 => Kind::Half,
    }
}

/// The device of the stage's `role` model: the one `placement` names,
/// else the stage's device.
pub(crate) fn role_device(
    ctx: &StageContext<'_>,
    placement: &RoleDevices,
    role: Role,
) -> anyhow::Result<Device> {
    match placement.of(role) {
        Some(device) => crate::model::device(device).with_context(|| {
            format!(
                "stage `{}`, field `params.placement.{}`",
                ctx.spec.stage,
                role.name()
            )
        }),
        None => crate::model::device(&ctx.spec.device),
    }
}

/// `dir`'s model with `head` on `device`, without adapters, float32.
pub(crate) fn model(dir: &Path, device: Device, head: Head) -> anyhow::Result<Model> {
    Model::load(dir, &BuildOptions::new(device, head))
}

/// `dir`'s model with `head` on `device`, frozen, its weights in `dtype`:
/// a policy or a judge that only runs forwards.
pub(crate) fn frozen(
    dir: &Path,
    device: Device,
    head: Head,
    dtype: Dtype,
) -> anyhow::Result<Model> {
    let options = BuildOptions {
        kind: weights_kind(dtype, device),
        ..BuildOptions::new(device, head)
    };
    let mut m = Model::load(dir, &options)?;
    m.vs.freeze();
    Ok(m)
}

/// `dir`'s tokenizer and its frozen language model in `dtype` (tokenizer
/// first: a folder without one fails before the weights load).
pub(crate) fn language_model(
    dir: &Path,
    device: Device,
    dtype: Dtype,
) -> anyhow::Result<(Tokenizer, Model)> {
    let tokenizer = Tokenizer::from_dir(dir)?;
    Ok((tokenizer, frozen(dir, device, Head::Lm, dtype)?))
}

/// A model to train, with `params.lora`'s adapters if any; with adapters,
/// the base weights (which do not train) are held in `base` (float32 for
/// every op but `ppo`, whose `dtype` it is).
pub(crate) fn trainable(
    stage: &str,
    dir: &Path,
    device: Device,
    head: Head,
    lora: Option<&LoraParams>,
    seed: u64,
    base: Kind,
) -> anyhow::Result<Model> {
    // Fresh heads and LoRA adapters draw from torch's generator: seed it
    // first, so the stage is a function of its fingerprint (byte-identical
    // reruns).
    tch::manual_seed(seed as i64);
    let model = Model::load(
        dir,
        &BuildOptions {
            lora: lora.map(LoraConfig::from),
            kind: if lora.is_some() { base } else { Kind::Float },
            ..BuildOptions::new(device, head)
        },
    )?;
    if let Some(l) = lora {
        // A name of another family's modules (`query_key_value`) would
        // leave nothing to train but a head, or nothing at all.
        anyhow::ensure!(
            model.trainable().iter().any(|(n, _)| n.contains("lora_")),
            "stage `{stage}`, field `params.lora.targets`: {} names no module of the model in {} (GPT-2: c_attn, c_proj, c_fc; Llama-like: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj; Phi-3: qkv_proj, gate_up_proj)",
            match &l.targets {
                Some(t) => serde_json::to_string(t).unwrap_or_default(),
                None => "the default".into(),
            },
            dir.display()
        );
    }
    Ok(model)
}

/// The EOS token: the tokenizer's, else the model config's.
pub(crate) fn eos_id(tokenizer: &Tokenizer, model: &Model) -> Option<i64> {
    tokenizer
        .eos_id
        .map(i64::from)
        .or(model.lm.cfg.eos_token_id)
}

/// Every id a sampled answer ends on: [`eos_id`] first, then the stop ids
/// of the model's `config.json` and `generation_config.json` (as
/// transformers' `generate` stops on any of them).
pub(crate) fn stop_ids(tokenizer: &Tokenizer, model: &Model) -> Vec<i64> {
    let mut ids: Vec<i64> = eos_id(tokenizer, model).into_iter().collect();
    for &id in &model.lm.cfg.stop_token_ids {
        if !ids.contains(&id) {
            ids.push(id);
        }
    }
    ids
}

/// Checks that every `(port, folder)` in `others` shares the policy's
/// tokenizer (`why` says what needs it) and returns the positions all of
/// them have, which must leave room for `max_new_tokens`. Reads configs
/// only, so a mismatch fails before anything heavy loads.
pub(crate) fn shared_positions(
    stage: &str,
    policy_dir: &Path,
    others: &[(&str, &Path)],
    why: &str,
    max_new_tokens: i64,
) -> anyhow::Result<i64> {
    let policy_cfg = ModelConfig::load(policy_dir)?;
    let mut max_positions = policy_cfg.max_positions;
    for &(port, dir) in others {
        let cfg = ModelConfig::load(dir)?;
        anyhow::ensure!(
            same_tokenizer(policy_dir, dir)? && cfg.vocab_size == policy_cfg.vocab_size,
            "stage `{stage}`: input `{port}` has another tokenizer than input `policy` \
             (vocabulary {} vs {}, or different tokenizer.json): {why}",
            cfg.vocab_size,
            policy_cfg.vocab_size
        );
        max_positions = max_positions.min(cfg.max_positions);
    }
    prompt_budget(stage, max_positions, max_new_tokens)?;
    Ok(max_positions)
}

/// Tokens a prompt may keep when `max_new_tokens` follow it within
/// `max_positions`. Checked before anything is sampled: a budget of zero
/// would otherwise fail (or panic in the position embedding) only after
/// the stage's work.
pub(crate) fn prompt_budget(
    stage: &str,
    max_positions: i64,
    max_new_tokens: i64,
) -> anyhow::Result<usize> {
    anyhow::ensure!(
        max_new_tokens < max_positions,
        "stage `{stage}`, field `params.max_new_tokens`: {max_new_tokens} new tokens leave no room for a prompt in the model's {max_positions} positions (at most {})",
        max_positions - 1
    );
    Ok((max_positions - max_new_tokens) as usize)
}

/// Whether two model folders share a tokenizer: equal `tokenizer.json`
/// bytes when both have one (the ops copy it verbatim from their source).
fn same_tokenizer(a: &Path, b: &Path) -> anyhow::Result<bool> {
    let (fa, fb) = (a.join("tokenizer.json"), b.join("tokenizer.json"));
    if !fa.exists() || !fb.exists() {
        return Ok(true);
    }
    let read = |f: &Path| std::fs::read(f).with_context(|| format!("reading {}", f.display()));
    Ok(read(&fa)? == read(&fb)?)
}

/// The stage's chat template, or `None` for the plain `template`: with
/// `choice` auto, the file bound to its `chat_template` input, else the
/// model's own (see [`ChatFormat::for_stage`]).
pub(crate) fn chat_format(
    ctx: &StageContext<'_>,
    choice: ChatTemplateChoice,
    model_dir: &Path,
) -> anyhow::Result<Option<ChatFormat>> {
    let file = ctx.spec.inputs.get("chat_template").map(|f| f.as_path());
    // Every op that takes `chat_template` takes `chat_template_kwargs`
    // beside it (checked by its params).
    let kwargs: std::collections::BTreeMap<String, serde_json::Value> = ctx
        .spec
        .params
        .get("chat_template_kwargs")
        .and_then(|v| serde_json::from_value(v.clone()).ok())
        .unwrap_or_default();
    ChatFormat::for_stage_with(choice, file, model_dir, &kwargs).map_err(|e| {
        anyhow::anyhow!(
            "stage `{}`, field `params.chat_template`: {e:#}",
            ctx.spec.stage
        )
    })
}

#[cfg(test)]
mod tests {
    use tch::{Device, Kind, Tensor};

    use super::*;
    use crate::model::checkpoint::read_file;
    use crate::ops::scoring::response_logprobs;

    /// A tiny random model saved as a Hugging Face folder, in `kind`.
    fn saved(raw: serde_json::Value, kind: Kind) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        tch::manual_seed(9);
        let cfg = ModelConfig::from_json(raw).unwrap();
        let mut m = Model::init(&cfg, &BuildOptions::new(Device::Cpu, Head::Lm));
        // Larger weights than the init's: a peaked distribution, whose
        // log-probs bf16 rounding moves the most.
        tch::no_grad(|| {
            for (_, mut t) in m.vs.variables() {
                if t.dim() == 2 {
                    let _ = t.g_mul_scalar_(5.0);
                }
            }
        });
        m.save_kind = kind;
        m.save(dir.path()).unwrap();
        dir
    }

    /// The tiny Llama of [`configs`], saved in float32.
    fn llama_source() -> tempfile::TempDir {
        let (_, raw) = configs().remove(1);
        saved(raw, Kind::Float)
    }

    /// Rank-2 adapters on `targets` (the family's default without).
    fn small_lora(targets: Option<alignflow_ops::training::LoraTargets>) -> LoraParams {
        LoraParams {
            rank: 2,
            alpha: 4.0,
            dropout: 0.0,
            targets,
        }
    }

    fn configs() -> Vec<(&'static str, serde_json::Value)> {
        vec![
            ("gpt2", ModelConfig::gpt2_json(64, 32, 32, 2, 2, 0, 0.0)),
            (
                "llama",
                ModelConfig::llama_json(64, 32, 32, 2, 4, 2, 48, 0, false),
            ),
        ]
    }

    /// The tolerance of bf16 weights: the response tokens' log-probs of a
    /// bf16-held model are within 0.05 (nats) of float32's on average and
    /// 0.25 at worst (bf16 keeps 8 bits of mantissa: about 0.4 % per weight).
    #[test]
    fn a_bf16_frozen_model_scores_within_tolerance_of_float32() {
        let _rng = crate::testing::torch_rng();
        for (family, raw) in configs() {
            let dir = saved(raw, Kind::Float);
            let f32_model = frozen(dir.path(), Device::Cpu, Head::Lm, Dtype::Auto).unwrap();
            let bf16 = frozen(dir.path(), Device::Cpu, Head::Lm, Dtype::Bfloat16).unwrap();
            for (name, t) in bf16.vs.variables() {
                assert_eq!(t.kind(), Kind::BFloat16, "{family}: `{name}`");
                assert!(!t.requires_grad());
            }
            for (_, t) in f32_model.vs.variables() {
                assert_eq!(
                    t.kind(),
                    Kind::Float,
                    "{family}: auto on the CPU is float32"
                );
            }
            let ids = Tensor::randint(64, [4, 12], (Kind::Int64, Device::Cpu));
            let mask = ids.ones_like();
            let resp = ids.narrow(1, 4, 8);
            let lp = |m: &Model| {
                tch::no_grad(|| response_logprobs(m, &ids, &mask, &resp, 4, 1.0, false, false).logp)
            };
            let (want, got) = (lp(&f32_model), lp(&bf16));
            assert_eq!(got.kind(), Kind::Float);
            let diff = (&got - &want).abs();
            let (mean, max) = (
                diff.mean(Kind::Float).double_value(&[]),
                diff.max().double_value(&[]),
            );
            assert!(
                mean < 0.05 && max < 0.25,
                "{family}: mean {mean}, max {max}"
            );
            // Not trivially equal: the weights were rounded.
            assert!(max > 0.0, "{family}");
            let spread = want.std(true).double_value(&[]);
            assert!(spread > 0.5, "{family}: a peaked model ({spread})");
        }
    }

    #[test]
    fn saved_checkpoints_keep_the_dtype_they_were_loaded_in() {
        let _rng = crate::testing::torch_rng();
        for kind in [Kind::BFloat16, Kind::Float] {
            let (_, raw) = configs().remove(1);
            let src = saved(raw, kind);
            // Trained weights are float32 masters, whatever the checkpoint.
            let mut m =
                trainable("s", src.path(), Device::Cpu, Head::Lm, None, 1, Kind::Float).unwrap();
            assert!(m.trainable().iter().all(|(_, t)| t.kind() == Kind::Float));
            assert_eq!(m.save_kind, kind);
            let out = tempfile::tempdir().unwrap();
            m.save(out.path()).unwrap();
            let tensors = read_file(&out.path().join("model.safetensors"), Device::Cpu).unwrap();
            assert!(tensors.iter().all(|(_, t)| t.kind() == kind), "{kind:?}");
            let config: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(out.path().join("config.json")).unwrap(),
            )
            .unwrap();
            let name = if kind == Kind::Float {
                "float32"
            } else {
                "bfloat16"
            };
            assert_eq!(config["torch_dtype"], name);
            // Asked otherwise, it writes that.
            m.save_kind = Kind::Half;
            m.save(out.path()).unwrap();
            let tensors = read_file(&out.path().join("model.safetensors"), Device::Cpu).unwrap();
            assert!(tensors.iter().all(|(_, t)| t.kind() == Kind::Half));
        }
    }

    #[test]
    fn lora_adapters_train_in_float32_on_a_bf16_base() {
        let _rng = crate::testing::torch_rng();
        let src = llama_source();
        let lora = small_lora(None);
        let m = trainable(
            "s",
            src.path(),
            Device::Cpu,
            Head::Lm,
            Some(&lora),
            1,
            Kind::BFloat16,
        )
        .unwrap();
        for (name, t) in m.vs.variables() {
            let want = if name.contains("lora_") {
                Kind::Float
            } else {
                Kind::BFloat16
            };
            assert_eq!(t.kind(), want, "`{name}`");
        }
        let ids = Tensor::randint(64, [2, 6], (Kind::Int64, Device::Cpu));
        let out = response_logprobs(
            &m,
            &ids,
            &ids.ones_like(),
            &ids.narrow(1, 2, 4),
            2,
            1.0,
            false,
            false,
        );
        out.logp.sum(Kind::Float).backward();
        let trained = m.trainable();
        assert!(!trained.is_empty());
        // PEFT's init has B = 0, so A gets no gradient yet; B does.
        assert!(trained
            .iter()
            .filter(|(n, _)| n.contains("lora_B"))
            .all(|(_, t)| t.grad().abs().max().double_value(&[]) > 0.0));
    }

    /// Targets of another family's names (Falcon's `query_key_value` on a
    /// Llama) are refused naming the field: before, `sft` panicked in
    /// backward and `pm.train` trained its head alone.
    #[test]
    fn lora_targets_that_name_no_module_are_refused() {
        let _rng = crate::testing::torch_rng();
        let src = llama_source();
        let lora = small_lora(Some(alignflow_ops::training::LoraTargets::Modules(vec![
            "query_key_value".into(),
        ])));
        for head in [Head::Lm, Head::Reward] {
            let err = trainable(
                "s",
                src.path(),
                Device::Cpu,
                head,
                Some(&lora),
                1,
                Kind::Float,
            )
            .err()
            .expect("refused");
            let err = format!("{err:#}");
            assert!(
                err.contains("params.lora.targets") && err.contains("query_key_value"),
                "{err}"
            );
        }
    }

    /// A LoRA run on a bf16 base of a float32 checkpoint saves float32
    /// weights as exact as the source: the base as it was stored, a small
    /// update folded in float32 (in bf16 most of a 1e-5 update vanished).
    #[test]
    fn a_lora_export_on_a_bf16_base_keeps_the_float32_base_and_a_small_update() {
        let _rng = crate::testing::torch_rng();
        let src = llama_source();
        let lora = small_lora(None);
        let mut m = trainable(
            "s",
            src.path(),
            Device::Cpu,
            Head::Lm,
            Some(&lora),
            1,
            Kind::BFloat16,
        )
        .unwrap();
        let q = "model.layers.0.self_attn.q_proj";
        let (mut a, mut b) = (Tensor::new(), Tensor::new());
        tch::no_grad(|| {
            for (name, mut t) in m.vs.variables() {
                if name.contains("lora_B") {
                    t.copy_(&(t.randn_like() * 1e-5));
                }
                if name == format!("{q}.lora_A.weight") {
                    a = t.copy();
                }
                if name == format!("{q}.lora_B.weight") {
                    b = t.copy();
                }
            }
        });
        let out = tempfile::tempdir().unwrap();
        m.save(out.path()).unwrap();
        let source = read_file(&src.path().join("model.safetensors"), Device::Cpu).unwrap();
        let saved = read_file(&out.path().join("model.safetensors"), Device::Cpu).unwrap();
        let get = |ts: &[(String, Tensor)], name: &str| {
            ts.iter()
                .find(|(n, _)| n == name)
                .unwrap()
                .1
                .shallow_clone()
        };
        let weight = format!("{q}.weight");
        let want = get(&source, &weight) + b.matmul(&a) * lora.alpha / lora.rank as f64;
        let got = get(&saved, &weight);
        assert_eq!(got.kind(), Kind::Float);
        let err = (&got - &want).abs().max().double_value(&[]);
        assert!(err < 1e-8, "merged q_proj off by {err}");
        // A frozen weight no adapter touches: the source's, bit for bit.
        let k = "model.layers.0.self_attn.k_proj.weight";
        assert!(get(&saved, k).equal(&get(&source, k)));
    }
}
