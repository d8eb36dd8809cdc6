//! Decoder-only transformers on libtorch, loaded from and saved to Hugging
//! Face checkpoint folders (`config.json`, `model.safetensors`,
//! `tokenizer.json`) under Hugging Face parameter names.
//!
//! Names come from the module structure (`&vs / "h" / i / "attn"`), so a
//! checkpoint round-trips with transformers without a renaming table.

mod attention;
pub mod checkpoint;
mod config;
mod gpt2;
mod half_cpu;
mod linear;
mod llama;
mod logprobs;
pub mod onednn;
pub mod recompute;
mod rope;
pub mod sample;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use tch::{nn, Device, Kind, Tensor};

pub use attention::{attention_mask, query_mask, KvCache, Mask};
pub use config::{Arch, ModelConfig, LLAMA_FAMILY};
pub use linear::{without_adapters, Layout, Linear, LoraConfig, LoraTargets};
pub use logprobs::{TokenLogprobs, CHUNK_LOGITS_BYTES};

use gpt2::Gpt2;
use llama::Llama;

#[derive(Debug)]
enum Backbone {
    Gpt2(Gpt2),
    Llama(Llama),
}

/// A causal language model: backbone plus LM head (tied or not).
#[derive(Debug)]
pub struct Transformer {
    pub cfg: ModelConfig,
    backbone: Backbone,
    lm_head: Option<Linear>,
    /// The tied LM head packed for oneDNN while decoding (see
    /// [`Transformer::packed_for_decoding`]).
    tied_head_packed: std::sync::Mutex<Option<onednn::Packed>>,
    /// With gradient checkpointing, each block's trainable tensors (see
    /// [`Model::set_gradient_checkpointing`]).
    recompute: Option<Vec<Vec<Tensor>>>,
}

/// The most float32 weight bytes [`Transformer::packed`] copies into oneDNN
/// packs (1 GiB: models up to about 250M parameters).
pub const PACK_LIMIT_BYTES: i64 = 1 << 30;

/// While alive, the model's no-grad forwards run their linear layers and
/// LM head through oneDNN with pre-packed weights; dropping it unpacks them
/// (unless an outer guard packed them first: that one unpacks).
pub struct Packing<'a> {
    model: &'a Transformer,
    owner: bool,
}

impl Drop for Packing<'_> {
    fn drop(&mut self) {
        if self.owner {
            self.model.linears().for_each(Linear::unpack);
            *self.model.tied_head_packed.lock().expect("pack lock") = None;
        }
    }
}

/// Which positions' final hidden states [`Transformer::hidden_kept`]
/// computes: a reward model needs one position per row, PPO's policy,
/// reference and value models only the response's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    /// `len` positions from `start`, the same in every row.
    Span { start: i64, len: i64 },
    /// Each row's last real token (the mask's last 1).
    LastToken,
}

/// Position ids for a left- or right-padded batch: the running count of
/// real tokens, as transformers' `generate` computes them.
///
/// # Shapes
/// `mask`: `[b, t]` (0/1) -> `[b, t]` int64.
pub fn positions_from_mask(mask: &Tensor) -> Tensor {
    (mask.to_kind(Kind::Int64).cumsum(1, Kind::Int64) - 1).clamp_min(0)
}

impl Transformer {
    /// Creates the variables under `root` (the VarStore's root).
    pub fn new(root: &nn::Path, cfg: &ModelConfig, lora: Option<&LoraConfig>) -> Transformer {
        let lora = lora.map(|l| l.for_arch(cfg.arch));
        let lora = lora.as_ref();
        let backbone = match cfg.arch {
            Arch::Gpt2 => Backbone::Gpt2(Gpt2::new(root / "transformer", cfg, lora)),
            Arch::Llama => Backbone::Llama(Llama::new(root / "model", cfg, lora)),
        };
        let lm_head = (!cfg.tie_word_embeddings).then(|| {
            Linear::new(
                root / "lm_head",
                cfg.hidden_size,
                cfg.vocab_size,
                false,
                Layout::OutIn,
                None,
            )
        });
        Transformer {
            cfg: cfg.clone(),
            backbone,
            lm_head,
            tied_head_packed: std::sync::Mutex::new(None),
            recompute: None,
        }
    }

    /// Packs every linear layer and the LM head for oneDNN until the guard
    /// drops: float32 on the CPU only (a no-op elsewhere). No-grad forwards
    /// then run through the packs: decoding steps of a few rows about twice
    /// as fast, full forwards about 10 % (`csrc/onednn_linear.cpp`). `rows`
    /// is oneDNN's layout hint (8 suits both). The weights must not change
    /// while the guard lives: a sampling call, or a frozen model. The packs
    /// are a second copy of the weights, so models whose linear weights
    /// pass [`PACK_LIMIT_BYTES`] are left as they are.
    pub fn packed(&self, rows: i64) -> Packing<'_> {
        let already = self.tied_head_packed.lock().expect("pack lock").is_some()
            || self.linears().any(Linear::is_packed);
        let bytes: i64 = self
            .linears()
            .map(|l| l.weight.numel() as i64 * 4)
            .sum::<i64>()
            + self.embeddings().numel() as i64 * 4;
        if already || bytes > PACK_LIMIT_BYTES {
            return Packing {
                model: self,
                owner: false,
            };
        }
        self.linears().for_each(|l| l.pack(rows));
        let head = self.embeddings();
        if self.lm_head.is_none() && onednn::applies_to(head) {
            match onednn::Packed::new(head, rows) {
                Ok(p) => *self.tied_head_packed.lock().expect("pack lock") = Some(p),
                Err(e) => tracing::warn!("{e}; the LM head runs libtorch's linear"),
            }
        }
        Packing {
            model: self,
            owner: true,
        }
    }

    /// Every linear layer, the untied LM head included.
    pub(crate) fn linears(&self) -> Box<dyn Iterator<Item = &Linear> + '_> {
        let body: Box<dyn Iterator<Item = &Linear>> = match &self.backbone {
            Backbone::Gpt2(m) => Box::new(m.linears()),
            Backbone::Llama(m) => Box::new(m.linears()),
        };
        Box::new(body.chain(self.lm_head.iter()))
    }

    /// Final hidden states.
    ///
    /// # Shapes
    /// `ids`, `positions`: `[b, t]`; `mask`: `[b, past + t]` (0/1, covering
    /// cached positions too) -> `[b, t, hidden]`.
    pub fn hidden(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        mask: &Tensor,
        cache: Option<&mut KvCache>,
        train: bool,
    ) -> Tensor {
        let q_len = ids.size()[1];
        let attn = attention::Mask::new(mask, q_len);
        self.hidden_masked(ids, positions, &attn, cache, train)
    }

    /// [`Transformer::hidden`] with a ready attention mask (decoding loops
    /// know theirs without re-inspecting the 0/1 mask every step).
    pub fn hidden_masked(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        attn: &attention::Mask,
        cache: Option<&mut KvCache>,
        train: bool,
    ) -> Tensor {
        let blocks = self.recompute.as_deref();
        match &self.backbone {
            Backbone::Gpt2(m) => m.forward(ids, positions, attn, cache, None, train, blocks),
            Backbone::Llama(m) => m.forward(ids, positions, attn, cache, None, train, blocks),
        }
    }

    /// Final hidden states of the positions `keep` names only (no cache):
    /// the last block computes nothing for the others (its keys and values
    /// still cover every position). Equal to [`Transformer::hidden`] at
    /// those positions.
    ///
    /// # Shapes
    /// `ids`, `mask`: `[b, t]` (0/1) -> `[b, q, hidden]` (`q` = `len` of a
    /// span, 1 for [`Keep::LastToken`]).
    pub fn hidden_kept(&self, ids: &Tensor, mask: &Tensor, keep: Keep, train: bool) -> Tensor {
        let positions = positions_from_mask(mask);
        let attn = attention::Mask::new(mask, ids.size()[1]);
        let kept = match keep {
            Keep::Span { start, len } => attention::Queries::span(mask, start, len),
            Keep::LastToken => attention::Queries::one_per_row(mask, &last_token_index(mask)),
        };
        let blocks = self.recompute.as_deref();
        match &self.backbone {
            Backbone::Gpt2(m) => {
                m.forward(ids, &positions, &attn, None, Some(&kept), train, blocks)
            }
            Backbone::Llama(m) => {
                m.forward(ids, &positions, &attn, None, Some(&kept), train, blocks)
            }
        }
    }

    /// Float32 logits, whatever dtype the weights are held in (as
    /// transformers' `logits.float()`).
    ///
    /// # Shapes
    /// `[b, t, hidden]` -> `[b, t, vocab]`.
    pub fn logits(&self, hidden: &Tensor) -> Tensor {
        let logits = self.head(hidden).to_kind(Kind::Float);
        match self.cfg.gemma.final_softcap {
            // Gemma 2: `cap * tanh(logits / cap)`.
            Some(cap) => (logits / cap).tanh() * cap,
            None => logits,
        }
    }

    /// The LM head in the weights' dtype.
    fn head(&self, hidden: &Tensor) -> Tensor {
        match &self.lm_head {
            Some(head) => head.forward(hidden, false),
            None => {
                let packed = self.tied_head_packed.lock().expect("pack lock");
                packed
                    .as_ref()
                    .filter(|_| !onednn::grad_enabled())
                    .and_then(|p| linear::packed_forward(p, hidden, None, onednn::PostOp::None))
                    .unwrap_or_else(|| match half_cpu::widens(self.embeddings()) {
                        true => half_cpu::linear(hidden, self.embeddings(), None, true),
                        false => hidden.linear::<Tensor>(self.embeddings(), None),
                    })
            }
        }
    }

    /// Logits of a padded batch with no cache.
    ///
    /// # Shapes
    /// `ids`, `mask`: `[b, t]` -> `[b, t, vocab]`.
    pub fn forward(&self, ids: &Tensor, mask: &Tensor, train: bool) -> Tensor {
        let positions = positions_from_mask(mask);
        self.logits(&self.hidden(ids, &positions, mask, None, train))
    }

    /// The LM head's weight `[vocab, hidden]` (the embeddings when tied).
    fn head_weight(&self) -> &Tensor {
        match &self.lm_head {
            Some(head) => &head.weight,
            None => self.embeddings(),
        }
    }

    /// The token embedding matrix `[vocab, hidden]`.
    pub fn embeddings(&self) -> &Tensor {
        match &self.backbone {
            Backbone::Gpt2(m) => &m.wte,
            Backbone::Llama(m) => &m.embed_tokens,
        }
    }
}

/// Index of the last real token of each row.
///
/// # Shapes
/// `mask`: `[b, t]` -> `[b]` int64.
pub fn last_token_index(mask: &Tensor) -> Tensor {
    let t = mask.size()[1];
    let pos = Tensor::arange(t, (Kind::Int64, mask.device())).view([1, t]);
    (mask.to_kind(Kind::Int64) * pos).argmax(1, false)
}

/// A scalar reward on the last real token, saved as `score.weight` like
/// transformers' `*ForSequenceClassification` with one label.
#[derive(Debug)]
pub struct RewardHead {
    score: Linear,
}

impl RewardHead {
    pub fn new(root: &nn::Path, hidden: i64) -> RewardHead {
        RewardHead {
            score: Linear::new(root / "score", hidden, 1, false, Layout::OutIn, None),
        }
    }

    /// The reward of hidden states of each row's last real token (from
    /// [`Keep::LastToken`]).
    ///
    /// # Shapes
    /// `last`: `[b, 1, h]` -> `[b]`.
    pub fn forward(&self, last: &Tensor) -> Tensor {
        // A float32 head that trains on a base held in bf16 takes float32.
        let last = last.to_kind(self.score.weight.kind());
        self.score.forward(&last, false).view([-1])
    }
}

/// One value per token (PPO critic), saved as `v_head.summary.*` as TRL does.
#[derive(Debug)]
pub struct ValueHead {
    summary: Linear,
}

impl ValueHead {
    pub fn new(root: &nn::Path, hidden: i64) -> ValueHead {
        ValueHead {
            summary: Linear::new(
                root / "v_head" / "summary",
                hidden,
                1,
                true,
                Layout::OutIn,
                None,
            ),
        }
    }

    /// # Shapes
    /// `[b, t, h]` -> `[b, t]`.
    pub fn forward(&self, hidden: &Tensor) -> Tensor {
        // A float32 head that trains on a base held in bf16 takes float32.
        let hidden = hidden.to_kind(self.summary.weight.kind());
        self.summary.forward(&hidden, false).squeeze_dim(-1)
    }
}

/// Which head a model folder carries or should carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Head {
    /// Causal LM (`*ForCausalLM`).
    Lm,
    /// Scalar reward (`*ForSequenceClassification`, one label).
    Reward,
    /// Causal LM plus a per-token value head.
    Value,
}

/// A model with its variables, ready to run or train.
pub struct Model {
    pub vs: nn::VarStore,
    pub lm: Transformer,
    pub reward: Option<RewardHead>,
    pub value: Option<ValueHead>,
    /// The folder it came from (tokenizer files are copied from here on save).
    pub source: Option<PathBuf>,
    /// The dtype [`Model::save`] writes floating tensors in: the
    /// checkpoint's own (float32 for a fresh model) unless set otherwise.
    pub save_kind: Kind,
}

/// How to build a model.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    pub device: Device,
    pub head: Head,
    pub lora: Option<LoraConfig>,
    /// The dtype of the weights that do not train: every weight of a
    /// model without adapters (which must then be frozen unless float32),
    /// the base weights under LoRA adapters. Adapters and fresh heads stay
    /// float32.
    pub kind: Kind,
}

impl BuildOptions {
    /// float32 weights on `device` with `head`, no adapters.
    pub fn new(device: Device, head: Head) -> BuildOptions {
        BuildOptions {
            device,
            head,
            lora: None,
            kind: Kind::Float,
        }
    }
}

impl Model {
    /// A freshly initialised model (seed torch first for reproducibility).
    pub fn init(cfg: &ModelConfig, options: &BuildOptions) -> Model {
        let mut vs = nn::VarStore::new(options.device);
        if options.kind != Kind::Float {
            // Every weight is made in the frozen dtype from the start, the
            // trained ones turned back to float32 below: no float32 copy
            // of the whole model first (4 bytes per parameter, at the peak
            // of every load of a bf16 model).
            vs.set_kind(options.kind);
        }
        let root = vs.root();
        let lm = Transformer::new(&root, cfg, options.lora.as_ref());
        let reward =
            (options.head == Head::Reward).then(|| RewardHead::new(&root, cfg.hidden_size));
        if reward.is_some() {
            // A reward model never reads its untied LM head (and saves
            // none): trainable, it would cost two AdamW moments (4.4 GB at
            // Qwen2.5-7B's vocabulary) and an all-reduce of zeros a step.
            for (name, t) in vs.variables() {
                if name.starts_with("lm_head.") {
                    let _ = t.set_requires_grad(false);
                }
            }
        }
        let value = (options.head == Head::Value).then(|| ValueHead::new(&root, cfg.hidden_size));
        if options.kind != Kind::Float {
            hold_trained_weights_in_float32(&vs, options.lora.is_some());
        }
        Model {
            vs,
            lm,
            reward,
            value,
            source: None,
            save_kind: Kind::Float,
        }
    }

    /// Loads a Hugging Face folder. Head and adapter weights absent from the
    /// checkpoint keep their initialisation (and are listed in the log);
    /// any other missing weight is an error.
    pub fn load(dir: &Path, options: &BuildOptions) -> anyhow::Result<Model> {
        let cfg = ModelConfig::load(dir)?;
        let mut model = Model::init(&cfg, options);
        // Read tensor by tensor: the load holds the variables and one
        // stored tensor at a time.
        let stored = checkpoint::MappedFolder::open(dir)?;
        let prefix = format!("{}.", cfg.backbone_prefix());
        let mut fresh = Vec::new();
        tch::no_grad(|| -> anyhow::Result<()> {
            for (name, mut var) in model.vs.variables() {
                // Checkpoints of the bare backbone (`GPT2Model`) have no prefix.
                let found = [Some(name.as_str()), name.strip_prefix(&prefix)]
                    .into_iter()
                    .flatten()
                    .find(|n| stored.shape(n).is_some());
                match found {
                    Some(stored_name) => {
                        let shape = stored.shape(stored_name).unwrap_or_default();
                        anyhow::ensure!(
                            shape == var.size().as_slice(),
                            "{}: `{name}` has shape {:?} in the checkpoint but the config makes it {:?}",
                            dir.display(),
                            shape,
                            var.size()
                        );
                        var.copy_(&stored.tensor(stored_name)?);
                    }
                    // A `*ForSequenceClassification` folder has no LM head
                    // (nothing reads a reward model's logits).
                    None if name.contains("lora_")
                        || name.starts_with("score.")
                        || name.starts_with("v_head.")
                        || (options.head == Head::Reward && name.starts_with("lm_head.")) =>
                    {
                        fresh.push(name)
                    }
                    None => anyhow::bail!("{}: the checkpoint has no `{name}`", dir.display()),
                }
            }
            Ok(())
        })?;
        if !fresh.is_empty() {
            fresh.sort();
            tracing::info!(
                "newly initialised (not in {}): {}",
                dir.display(),
                fresh.join(", ")
            );
        }
        if options.lora.is_some() {
            freeze_all_but_lora(&model.vs);
        }
        model.source = Some(dir.to_path_buf());
        model.save_kind = stored.float_kind();
        Ok(model)
    }

    /// A model on `base`'s own weights (shared, not copied: one copy in
    /// memory) with fresh LoRA adapters and `head`: only the adapters and
    /// the head train. PPO's LoRA critic is the policy's base with its own
    /// adapters and a value head. (Seed torch first for reproducibility.)
    pub fn sharing_base(base: &Model, lora: &LoraConfig, head: Head) -> Model {
        let base_kind = base
            .vs
            .variables()
            .into_iter()
            .find(|(n, _)| !n.contains("lora_"))
            .map_or(Kind::Float, |(_, t)| t.kind());
        let options = BuildOptions {
            device: base.vs.device(),
            head,
            lora: Some(lora.clone()),
            kind: base_kind,
        };
        let mut model = Model::init(&base.lm.cfg, &options);
        let shared = base.vs.variables();
        tch::no_grad(|| {
            for (name, mut t) in model.vs.variables() {
                if let Some(b) = shared.get(&name).filter(|_| !name.contains("lora_")) {
                    t.set_data(b);
                }
            }
        });
        freeze_all_but_lora(&model.vs);
        for (name, t) in model.vs.variables() {
            if name.starts_with("v_head.") || name.starts_with("score.") {
                let _ = t.set_requires_grad(true);
            }
        }
        model.source = base.source.clone();
        model.save_kind = base.save_kind;
        model
    }

    /// The reward head's score of each row of a padded batch, on its last
    /// real token (the model must carry the reward head).
    ///
    /// # Shapes
    /// `ids`, `mask`: `[b, t]` -> `[b]`.
    pub fn scores(&self, ids: &Tensor, mask: &Tensor, train: bool) -> Tensor {
        let head = self
            .reward
            .as_ref()
            .expect("preference models are built with the reward head");
        head.forward(&self.lm.hidden_kept(ids, mask, Keep::LastToken, train))
    }

    /// Turns activation checkpointing of every transformer block on or off:
    /// on, a block's activations are recomputed in backward instead of
    /// kept (see [`recompute`]). Set after the model's trainable tensors
    /// are final (LoRA freezing included).
    pub fn set_gradient_checkpointing(&mut self, on: bool) {
        self.lm.recompute = on.then(|| {
            let block = match self.lm.cfg.arch {
                Arch::Gpt2 => "transformer.h",
                Arch::Llama => "model.layers",
            };
            let vars = self.vs.variables();
            (0..self.lm.cfg.num_layers)
                .map(|i| {
                    let prefix = format!("{block}.{i}.");
                    vars.iter()
                        .filter(|(n, t)| n.starts_with(&prefix) && t.requires_grad())
                        .map(|(_, t)| t.shallow_clone())
                        .collect()
                })
                .collect()
        });
    }

    /// Trainable tensors by name (sorted, so optimizers see a stable order).
    pub fn trainable(&self) -> Vec<(String, Tensor)> {
        let mut vars: Vec<(String, Tensor)> = self
            .vs
            .variables()
            .into_iter()
            .filter(|(_, t)| t.requires_grad())
            .collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        vars
    }

    /// Saves as a Hugging Face folder: `config.json` (architectures set for
    /// the head), `model.safetensors` (tied weights once, adapters merged),
    /// and the tokenizer files of the source folder.
    pub fn save(&mut self, dir: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut tensors: BTreeMap<String, Tensor> = self
            .vs
            .variables()
            .into_iter()
            .filter(|(n, _)| !n.contains("lora_"))
            // transformers' `*ForSequenceClassification` has no LM head and
            // reports an untied one as an unexpected key.
            .filter(|(n, _)| self.reward.is_none() || !n.starts_with("lm_head."))
            .collect();
        // Frozen weights held narrower than the file's kind (a LoRA run's
        // bf16 base of a float32 checkpoint) are unchanged since loading:
        // written from the source folder, exactly, not rounded to bf16.
        let narrower = |t: &Tensor| {
            t.is_floating_point()
                && !t.requires_grad()
                && t.kind().elt_size_in_bytes() < self.save_kind.elt_size_in_bytes()
        };
        let stored = match &self.source {
            Some(src) if tensors.values().any(narrower) => {
                Some(checkpoint::MappedFolder::open(src)?)
            }
            _ => None,
        };
        let prefix = format!("{}.", self.lm.cfg.backbone_prefix());
        let stored_name = |name: &str| {
            let stored = stored.as_ref()?;
            [Some(name), name.strip_prefix(&prefix)]
                .into_iter()
                .flatten()
                .find(|n| stored.shape(n).is_some())
                .map(str::to_string)
        };
        let mut exact = BTreeMap::new();
        for (name, t) in &tensors {
            if narrower(t) {
                if let Some(found) = stored_name(name) {
                    exact.insert(name.clone(), found);
                }
            }
        }
        // Adapters are folded in float32, into the exact base where the
        // source has it (see [`Linear::merged_weight`]).
        for linear in self.lm.linears().filter(|l| l.has_lora()) {
            let name = linear.weight_name();
            let Some(held) = tensors.get(name) else {
                continue;
            };
            let base = match (exact.remove(name), &stored) {
                (Some(found), Some(stored)) => stored.tensor(&found)?,
                _ => held.shallow_clone(),
            };
            if let Some(merged) = linear.merged_weight(&base) {
                tensors.insert(name.to_string(), merged);
            }
        }
        // Each tensor is converted to the saved dtype as it is written.
        checkpoint::write_file_exact(
            &dir.join("model.safetensors"),
            &tensors,
            Some(self.save_kind),
            stored.as_ref().map(|s| (s, &exact)),
        )?;
        let mut config = self.lm.cfg.raw.clone();
        // transformers' class names, as `architectures` lists them (tools
        // such as vLLM pick the model class from it).
        let (causal, classifier) = match (self.lm.cfg.arch, config["model_type"].as_str()) {
            (Arch::Gpt2, _) => ("GPT2LMHeadModel", "GPT2ForSequenceClassification"),
            (_, Some("qwen2")) => ("Qwen2ForCausalLM", "Qwen2ForSequenceClassification"),
            (_, Some("qwen3")) => ("Qwen3ForCausalLM", "Qwen3ForSequenceClassification"),
            (_, Some("mistral")) => ("MistralForCausalLM", "MistralForSequenceClassification"),
            (_, Some("smollm3")) => ("SmolLM3ForCausalLM", "SmolLM3ForSequenceClassification"),
            (_, Some("olmo2")) => ("Olmo2ForCausalLM", "Olmo2ForSequenceClassification"),
            (_, Some("gemma")) => ("GemmaForCausalLM", "GemmaForSequenceClassification"),
            (_, Some("gemma2")) => ("Gemma2ForCausalLM", "Gemma2ForSequenceClassification"),
            (_, Some("gemma3_text")) => {
                ("Gemma3ForCausalLM", "Gemma3TextForSequenceClassification")
            }
            (_, Some("phi3")) => ("Phi3ForCausalLM", "Phi3ForSequenceClassification"),
            _ => ("LlamaForCausalLM", "LlamaForSequenceClassification"),
        };
        let arch = match (self.reward.is_some(), self.value.is_some()) {
            (true, _) => {
                config["num_labels"] = 1.into();
                config["id2label"] = serde_json::json!({"0": "LABEL_0"});
                config["label2id"] = serde_json::json!({"LABEL_0": 0});
                config["pad_token_id"] = self.reward_pad_id().into();
                classifier
            }
            _ => causal,
        };
        config["architectures"] = serde_json::json!([arch]);
        config["torch_dtype"] = checkpoint::dtype_name(self.save_kind).into();
        std::fs::write(
            dir.join("config.json"),
            serde_json::to_string_pretty(&config)? + "\n",
        )?;
        if let Some(src) = &self.source {
            copy_tokenizer(src, dir)?;
        }
        Ok(())
    }
}

impl Model {
    /// The `pad_token_id` a saved reward model names. transformers'
    /// `*ForSequenceClassification` scores a row's last token that is not
    /// this id, and a preference model reads its reward at the EOS it
    /// appends: a pad id equal to that EOS (Qwen2.5's config, which names
    /// no pad, would fall back to `<|im_end|>`) has transformers score the
    /// token before it. So: the tokenizer's own pad token when it is
    /// another token than EOS (Qwen's `<|endoftext|>`), else the config's,
    /// else EOS, warned about.
    fn reward_pad_id(&self) -> i64 {
        let tokenizer = self
            .source
            .as_deref()
            .filter(|src| src.join("tokenizer.json").exists())
            .and_then(|src| alignflow_ops::text::Tokenizer::from_dir(src).ok());
        let eos = tokenizer
            .as_ref()
            .and_then(|t| t.eos_id)
            .map(i64::from)
            .or(self.lm.cfg.eos_token_id);
        let candidates = [
            tokenizer.as_ref().and_then(|t| t.pad_id).map(i64::from),
            self.lm.cfg.pad_token_id,
        ];
        if let Some(pad) = candidates.into_iter().flatten().find(|&p| Some(p) != eos) {
            return pad;
        }
        let pad = self.lm.cfg.pad_id();
        if Some(pad) == eos {
            tracing::warn!(
                "the saved reward model's pad_token_id is its EOS ({pad}), the token its reward is read at: transformers' ForSequenceClassification scores the last token that is not the pad, the one before an appended EOS; give the tokenizer a pad token of its own (tokenizer_config.json `pad_token`) for the scores to agree"
            );
        }
        pad
    }
}

/// Bytes of `model`'s tensors: those it holds alone, and those whose
/// storage it shares with `other` (see [`Model::sharing_base`]).
pub fn storage_bytes(model: &Model, other: &Model) -> (i64, i64) {
    let theirs: std::collections::HashSet<usize> = other
        .vs
        .variables()
        .values()
        .map(|t| t.data_ptr() as usize)
        .collect();
    let (mut own, mut shared) = (0, 0);
    for t in model.vs.variables().values() {
        let bytes = t.numel() as i64 * t.kind().elt_size_in_bytes() as i64;
        if theirs.contains(&(t.data_ptr() as usize)) {
            shared += bytes;
        } else {
            own += bytes;
        }
    }
    (own, shared)
}

/// Copies the tokenizer files of a model folder, if any: the tokenizer,
/// its chat template (transformers 5 keeps it in `chat_template.jinja`) and
/// the generation config (Llama 3's stop ids).
pub fn copy_tokenizer(from: &Path, to: &Path) -> anyhow::Result<()> {
    for name in [
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "chat_template.jinja",
        "generation_config.json",
    ] {
        let src = from.join(name);
        if src.exists() {
            std::fs::copy(&src, to.join(name))
                .with_context(|| format!("copying {}", src.display()))?;
        }
    }
    Ok(())
}

/// Turns the weights that train back to float32 in a model made in a
/// frozen dtype (see [`BuildOptions::kind`]): the adapters, and with
/// adapters (`lora`) the heads too, which train beside them.
fn hold_trained_weights_in_float32(vs: &nn::VarStore, lora: bool) {
    tch::no_grad(|| {
        for (name, mut t) in vs.variables() {
            let trained = name.contains("lora_")
                || (lora && (name.starts_with("score.") || name.starts_with("v_head.")));
            if trained && t.is_floating_point() {
                t.set_data(&t.to_kind(Kind::Float));
            }
        }
    });
}

/// With LoRA only the adapters train: everything else stops requiring grad.
fn freeze_all_but_lora(vs: &nn::VarStore) {
    for (name, t) in vs.variables() {
        if !name.contains("lora_") {
            let _ = t.set_requires_grad(false);
        }
    }
}

/// The device of `auto | cpu | cuda | cuda:N` (the engine pins GPUs with
/// `CUDA_VISIBLE_DEVICES`, so `cuda` means the first visible one).
pub fn device(spec: &str) -> anyhow::Result<Device> {
    Ok(match spec {
        "cpu" => Device::Cpu,
        "auto" => Device::cuda_if_available(),
        "cuda" => {
            anyhow::ensure!(
                tch::Cuda::is_available(),
                "device `cuda` requested but CUDA is not available"
            );
            Device::Cuda(0)
        }
        other => {
            let n: usize = other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .with_context(|| format!("bad device `{other}` (auto, cpu, cuda, cuda:N)"))?;
            anyhow::ensure!(
                tch::Cuda::is_available(),
                "device `{other}` requested but CUDA is not available"
            );
            let visible = tch::Cuda::device_count() as usize;
            anyhow::ensure!(
                n < visible,
                "device `{other}` requested but the stage sees {visible} GPU(s)"
            );
            Device::Cuda(n)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A word-level tokenizer whose EOS is `</s>` (2), with or without a
    /// pad token of its own (`<pad>`, 0).
    fn tokenizer_folder(dir: &Path, pad: Option<&str>) {
        let tokenizer = serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
            "normalizer": null, "pre_tokenizer": {"type": "Whitespace"},
            "post_processor": null, "decoder": null,
            "model": {"type": "WordLevel", "unk_token": "<unk>",
                      "vocab": {"<pad>": 0, "<unk>": 1, "</s>": 2, "a": 3}}
        });
        std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string()).unwrap();
        let mut config = serde_json::json!({"eos_token": "</s>"});
        if let Some(pad) = pad {
            config["pad_token"] = pad.into();
        }
        std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).unwrap();
    }

    fn saved_pad_id(pad: Option<&str>) -> serde_json::Value {
        let (src, out) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        tokenizer_folder(src.path(), pad);
        // config.json names EOS 2 and no pad, as Qwen2.5's does.
        let cfg = ModelConfig::from_json(ModelConfig::llama_json(8, 16, 16, 1, 2, 2, 32, 2, false))
            .unwrap();
        let mut model = Model::init(&cfg, &BuildOptions::new(Device::Cpu, Head::Reward));
        model.source = Some(src.path().to_path_buf());
        model.save(out.path()).unwrap();
        let text = std::fs::read_to_string(out.path().join("config.json")).unwrap();
        serde_json::from_str::<serde_json::Value>(&text).unwrap()["pad_token_id"].clone()
    }

    #[test]
    fn a_reward_model_does_not_train_the_lm_head_it_never_reads() {
        let cfg = ModelConfig::from_json(ModelConfig::llama_json(8, 16, 16, 1, 2, 2, 32, 2, false))
            .unwrap();
        let model = Model::init(&cfg, &BuildOptions::new(Device::Cpu, Head::Reward));
        let names: Vec<String> = model.trainable().into_iter().map(|(n, _)| n).collect();
        assert!(names.iter().any(|n| n.starts_with("score.")), "{names:?}");
        assert!(
            !names.iter().any(|n| n.starts_with("lm_head.")),
            "{names:?}"
        );
        // A language model trains its own.
        let lm = Model::init(&cfg, &BuildOptions::new(Device::Cpu, Head::Lm));
        assert!(lm
            .trainable()
            .iter()
            .any(|(n, _)| n.starts_with("lm_head.")));
    }

    #[test]
    fn a_saved_reward_model_pads_with_a_token_other_than_its_eos() {
        assert_eq!(saved_pad_id(Some("<pad>")), 0);
        // Nothing else to name: EOS, warned about.
        assert_eq!(saved_pad_id(None), 2);
    }
}
