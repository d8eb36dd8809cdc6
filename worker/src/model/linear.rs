//! Linear layers under Hugging Face names, with optional LoRA adapters.
//!
//! GPT-2 stores its projections as `Conv1D` (`weight` is `[in, out]`, y = x W + b);
//! everything else as `nn.Linear` (`weight` is `[out, in]`, y = x Wᵀ + b). The
//! layout is kept as stored so checkpoints round-trip without transposes.

use std::cell::Cell;
use std::sync::Mutex;

use tch::{nn, Kind, Tensor};

use alignflow_ops::training::{LoraParams, LoraTargets as TargetParams, NamedTargets};

use super::config::Arch;
use super::half_cpu;
use super::onednn::{self, Packed, PostOp};

thread_local! {
    /// Whether LoRA adapters are skipped in forward passes on this thread
    /// (see [`without_adapters`]).
    static ADAPTERS_OFF: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` with every LoRA adapter switched off on this thread, so a model
/// with adapters computes its base model exactly (the adapter branch is
/// skipped, not multiplied by zero). PPO uses it for the frozen reference
/// without a second copy of the weights, as PEFT's `disable_adapter()` does.
/// Thread-local, so other threads (parallel tests) are unaffected; restored
/// on return and on panic.
pub fn without_adapters<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            ADAPTERS_OFF.with(|off| off.set(self.0));
        }
    }
    let _restore = Restore(ADAPTERS_OFF.with(|off| off.replace(true)));
    f()
}

/// How a weight is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// `[out, in]` (`nn.Linear`).
    OutIn,
    /// `[in, out]` (GPT-2 `Conv1D`).
    InOut,
}

/// LoRA settings (rank, scaling, dropout, which modules get adapters).
#[derive(Debug, Clone)]
pub struct LoraConfig {
    pub rank: i64,
    pub alpha: f64,
    pub dropout: f64,
    pub targets: LoraTargets,
}

/// Which linear modules get LoRA adapters.
#[derive(Debug, Clone, PartialEq)]
pub enum LoraTargets {
    /// PEFT's default for the architecture: GPT-2 `c_attn`; Llama
    /// `q_proj`, `v_proj` (Phi-3's fused `qkv_proj`).
    Default,
    /// Every linear layer of the transformer blocks (not the LM head).
    AllLinear,
    /// Module names (last path component, e.g. `q_proj`, `c_attn`).
    Modules(Vec<String>),
}

impl LoraConfig {
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }

    /// The module names to adapt in a model of `arch`.
    pub fn modules(&self, arch: Arch) -> Vec<String> {
        let names: &[&str] = match (&self.targets, arch) {
            (LoraTargets::Modules(names), _) => return names.clone(),
            (LoraTargets::Default, Arch::Gpt2) => &["c_attn"],
            (LoraTargets::Default, Arch::Llama) => &["q_proj", "v_proj", "qkv_proj"],
            (LoraTargets::AllLinear, Arch::Gpt2) => &["c_attn", "c_proj", "c_fc"],
            (LoraTargets::AllLinear, Arch::Llama) => &[
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj",
                "qkv_proj",
                "gate_up_proj",
            ],
        };
        names.iter().map(|n| n.to_string()).collect()
    }

    /// The same settings with the targets spelled out for `arch`.
    pub fn for_arch(&self, arch: Arch) -> LoraConfig {
        LoraConfig {
            targets: LoraTargets::Modules(self.modules(arch)),
            ..self.clone()
        }
    }

    /// Whether the module named `name` gets an adapter; the targets must
    /// have been spelled out ([`LoraConfig::for_arch`]).
    fn adapts(&self, name: &str) -> bool {
        match &self.targets {
            LoraTargets::Modules(names) => names.iter().any(|t| t == name),
            other => panic!("LoRA targets {other:?} not resolved for the architecture"),
        }
    }
}

/// A stage's `params.lora` block, as the model builds it.
impl From<&LoraParams> for LoraConfig {
    fn from(p: &LoraParams) -> Self {
        LoraConfig {
            rank: p.rank,
            alpha: p.alpha,
            dropout: p.dropout,
            targets: match &p.targets {
                None => LoraTargets::Default,
                Some(TargetParams::Named(NamedTargets::AllLinear)) => LoraTargets::AllLinear,
                Some(TargetParams::Modules(names)) => LoraTargets::Modules(names.clone()),
            },
        }
    }
}

/// A LoRA adapter: `ΔW = B A · alpha / rank`, with `A` `[r, in]`, `B` `[out, r]`.
#[derive(Debug)]
struct Lora {
    a: Tensor,
    b: Tensor,
    scale: f64,
    dropout: f64,
}

/// A linear map with an optional bias and an optional LoRA adapter.
#[derive(Debug)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    layout: Layout,
    lora: Option<Lora>,
    /// The weight's variable name (`model.layers.0.self_attn.q_proj.weight`).
    weight_name: String,
    /// The weight packed for oneDNN while a decoding call runs (see
    /// [`Linear::pack`]); `None` otherwise.
    packed: Mutex<Option<Packed>>,
}

impl Linear {
    /// Creates `path.weight` (and `path.bias`) with GPT-2/HF-style init
    /// (normal, std 0.02; zero bias). With `lora` targeting this module's
    /// name, also creates `path.lora_A.weight` / `path.lora_B.weight` (PEFT names).
    pub fn new(
        path: nn::Path,
        in_dim: i64,
        out_dim: i64,
        bias: bool,
        layout: Layout,
        lora: Option<&LoraConfig>,
    ) -> Linear {
        let init = nn::Init::Randn {
            mean: 0.0,
            stdev: 0.02,
        };
        let shape = match layout {
            Layout::OutIn => [out_dim, in_dim],
            Layout::InOut => [in_dim, out_dim],
        };
        let weight = path.var("weight", &shape, init);
        let bias = bias.then(|| path.var("bias", &[out_dim], nn::Init::Const(0.0)));
        let weight_name = path
            .components()
            .chain(std::iter::once("weight"))
            .collect::<Vec<_>>()
            .join(".");
        let name = path.components().last().unwrap_or_default().to_string();
        let lora = lora.filter(|l| l.adapts(&name)).map(|l| {
            // PEFT's init: A Kaiming-uniform, B zero, so training starts at the base model.
            let bound = 1.0 / (in_dim as f64).sqrt();
            let a = (&path / "lora_A").var(
                "weight",
                &[l.rank, in_dim],
                nn::Init::Uniform {
                    lo: -bound,
                    up: bound,
                },
            );
            let b = (&path / "lora_B").var("weight", &[out_dim, l.rank], nn::Init::Const(0.0));
            Lora {
                a,
                b,
                scale: l.scale(),
                dropout: l.dropout,
            }
        });
        Linear {
            weight,
            bias,
            layout,
            lora,
            weight_name,
            packed: Mutex::new(None),
        }
    }

    /// The weight's variable name.
    pub fn weight_name(&self) -> &str {
        &self.weight_name
    }

    /// # Shapes
    /// `x`: `[.., in]` -> `[.., out]`.
    pub fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        self.forward_then(x, train, PostOp::None)
    }

    /// `post(forward(x))`, in one kernel where the weight is packed.
    pub fn forward_then(&self, x: &Tensor, train: bool, post: PostOp) -> Tensor {
        let adapter = self.lora.as_ref().filter(|_| !ADAPTERS_OFF.with(Cell::get));
        // The adapter's term joins before the activation: fuse only without one.
        let fused_post = if adapter.is_none() {
            post
        } else {
            PostOp::None
        };
        let packed = match self.packed.lock().expect("pack lock").as_ref() {
            Some(p) if !train && !onednn::grad_enabled() => {
                packed_forward(p, x, self.bias.as_ref(), fused_post).map(|y| (y, fused_post))
            }
            _ => None,
        };
        let (mut y, applied) = match packed {
            Some(done) => done,
            None => (self.plain(x), PostOp::None),
        };
        if let Some(l) = adapter {
            // Adapters train in float32 on a base that may be held in
            // bf16: the adapter's term runs in its own dtype.
            let h = x.to_kind(l.a.kind()).dropout(l.dropout, train);
            let delta = h.linear::<Tensor>(&l.a, None).linear::<Tensor>(&l.b, None) * l.scale;
            y += delta.to_kind(y.kind());
        }
        match (post, applied) {
            (PostOp::GeluTanh, PostOp::None) => y.gelu("tanh"),
            _ => y,
        }
    }

    /// Packs the weight for oneDNN (float32 on the CPU only), for inputs of
    /// about `rows` rows; no-grad forwards use it until [`Linear::unpack`].
    /// Only while the weight does not change.
    pub fn pack(&self, rows: i64) {
        if !onednn::applies_to(&self.weight) {
            return;
        }
        let out_in = match self.layout {
            Layout::OutIn => self.weight.shallow_clone(),
            Layout::InOut => self.weight.transpose(0, 1),
        };
        match Packed::new(&out_in, rows) {
            Ok(p) => *self.packed.lock().expect("pack lock") = Some(p),
            Err(e) => tracing::warn!("{e}; this layer decodes with libtorch's linear"),
        }
    }

    pub fn unpack(&self) {
        *self.packed.lock().expect("pack lock") = None;
    }

    pub fn is_packed(&self) -> bool {
        self.packed.lock().expect("pack lock").is_some()
    }

    /// The base map through libtorch (in float32 where the weight is half
    /// precision on a CPU without such kernels: [`half_cpu`]).
    fn plain(&self, x: &Tensor) -> Tensor {
        if half_cpu::widens(&self.weight) {
            let out_in = self.layout == Layout::OutIn;
            return half_cpu::linear(x, &self.weight, self.bias.as_ref(), out_in);
        }
        match self.layout {
            Layout::OutIn => x.linear(&self.weight, self.bias.as_ref()),
            Layout::InOut => match &self.bias {
                // One fused addmm instead of a matmul and an add.
                Some(b) => {
                    let mut shape = x.size();
                    let last = shape.len() - 1;
                    let x2 = x.reshape([-1, shape[last]]);
                    shape[last] = self.weight.size()[1];
                    b.addmm(&x2, &self.weight).view(shape.as_slice())
                }
                None => x.matmul(&self.weight),
            },
        }
    }

    /// `base` (this layer's weight, or an exact copy of it) with the
    /// adapter folded in, in float32 (for export); `None` without one.
    /// The sum is never taken in a narrower held kind: a bf16 weight
    /// would round away most of a small update (a 1e-5 change of a 0.02
    /// weight is under half its ulp).
    pub fn merged_weight(&self, base: &Tensor) -> Option<Tensor> {
        let l = self.lora.as_ref()?;
        Some(tch::no_grad(|| {
            let delta = l.b.to_kind(Kind::Float).matmul(&l.a.to_kind(Kind::Float)) * l.scale; // [out, in]
            let delta = match self.layout {
                Layout::OutIn => delta,
                Layout::InOut => delta.transpose(0, 1),
            };
            base.to_device(delta.device()).to_kind(Kind::Float) + delta
        }))
    }

    /// Whether this layer carries an adapter.
    pub fn has_lora(&self) -> bool {
        self.lora.is_some()
    }

    /// The number of output features.
    pub fn out_features(&self) -> i64 {
        match self.layout {
            Layout::OutIn => self.weight.size()[0],
            Layout::InOut => self.weight.size()[1],
        }
    }
}

/// `post(x Wᵀ + b)` through a packed weight, for `x` of any rank; `None`
/// (after a warning) if oneDNN refuses, so the caller falls back to libtorch.
pub(super) fn packed_forward(
    p: &Packed,
    x: &Tensor,
    bias: Option<&Tensor>,
    post: PostOp,
) -> Option<Tensor> {
    let mut shape = x.size();
    let last = shape.len() - 1;
    match p.linear(&x.reshape([-1, shape[last]]), bias, post) {
        Ok(y) => {
            shape[last] = y.size()[1];
            Some(y.view(shape.as_slice()))
        }
        Err(e) => {
            tracing::warn!("{e}; falling back to libtorch's linear");
            None
        }
    }
}

/// A LayerNorm (`weight`, `bias`) or RMSNorm (`weight`) under HF names.
#[derive(Debug)]
pub struct Norm {
    weight: Tensor,
    bias: Option<Tensor>,
    eps: f64,
    /// Gemma's RMSNorm scales by `1 + weight`, in float32 before the cast.
    unit_offset: bool,
}

impl Norm {
    pub fn layer_norm(path: nn::Path, dim: i64, eps: f64) -> Norm {
        Norm {
            weight: path.var("weight", &[dim], nn::Init::Const(1.0)),
            bias: Some(path.var("bias", &[dim], nn::Init::Const(0.0))),
            eps,
            unit_offset: false,
        }
    }

    pub fn rms_norm(path: nn::Path, dim: i64, eps: f64) -> Norm {
        Norm {
            weight: path.var("weight", &[dim], nn::Init::Const(1.0)),
            bias: None,
            eps,
            unit_offset: false,
        }
    }

    /// Gemma's RMSNorm: `x / rms(x) * (1 + weight)`, weights starting at 0.
    pub fn gemma_rms_norm(path: nn::Path, dim: i64, eps: f64) -> Norm {
        Norm {
            weight: path.var("weight", &[dim], nn::Init::Const(0.0)),
            bias: None,
            eps,
            unit_offset: true,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let dim = *x.size().last().expect("non-scalar");
        match &self.bias {
            Some(b) => x.layer_norm([dim], Some(&self.weight), Some(b), self.eps, true),
            None => {
                let kind = x.kind();
                let xf = x.to_kind(Kind::Float);
                let var = xf.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Float);
                let normed = xf * (var + self.eps).rsqrt();
                if self.unit_offset {
                    // As GemmaRMSNorm: scale in float32, then cast.
                    (normed * (self.weight.to_kind(Kind::Float) + 1.0)).to_kind(kind)
                } else {
                    // As LlamaRMSNorm: cast back, then scale.
                    &self.weight * normed.to_kind(kind)
                }
            }
        }
    }
}
