//! oneDNN linear layers with pre-packed weights, for decoding on the CPU
//! (the C++ side and the reason are in `csrc/onednn_linear.cpp`).
//!
//! [`Packed::new`] reorders a weight once; [`Packed::linear`] then computes
//! `x Wᵀ + b` with it. Only valid while the weight does not change: the
//! sampler packs the model at the start of a call and drops the packs at its
//! end; frozen models (PPO's reference and reward model) stay packed for the
//! whole stage. Only no-grad forwards use the packs (no backward).

use std::ffi::{c_char, c_int, CStr};

use tch::{Device, Kind, Tensor};

#[cfg(alignflow_onednn)]
extern "C" {
    fn alignflow_onednn_available() -> c_int;
    fn alignflow_onednn_pack(
        weight: *const std::ffi::c_void,
        rows: i64,
        error: *mut *mut c_char,
    ) -> *mut std::ffi::c_void;
    fn alignflow_onednn_linear(
        x: *const std::ffi::c_void,
        packed: *const std::ffi::c_void,
        bias: *const std::ffi::c_void,
        gelu_tanh: c_int,
        error: *mut *mut c_char,
    ) -> *mut std::ffi::c_void;
    fn alignflow_free_message(message: *mut c_char);
    fn alignflow_grad_enabled() -> c_int;
}

/// Whether this libtorch can run packed linears (built with oneDNN, shim
/// compiled). Checked once.
pub fn available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        #[cfg(alignflow_onednn)]
        {
            // SAFETY: no arguments; the shim catches every C++ exception.
            unsafe { alignflow_onednn_available() == 1 }
        }
        #[cfg(not(alignflow_onednn))]
        false
    })
}

/// Whether autograd records on this thread: packed linears have no
/// backward, so they only run when it does not.
pub fn grad_enabled() -> bool {
    #[cfg(alignflow_onednn)]
    {
        // SAFETY: no arguments, reads a thread-local flag.
        unsafe { alignflow_grad_enabled() == 1 }
    }
    #[cfg(not(alignflow_onednn))]
    true
}

/// Whether a weight can be packed: float32 on the CPU.
pub fn applies_to(weight: &Tensor) -> bool {
    weight.device() == Device::Cpu && weight.kind() == Kind::Float && available()
}

/// What is applied to a linear map's output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PostOp {
    None,
    /// GELU, tanh approximation (GPT-2's MLP); fused into the packed
    /// kernel, a separate op otherwise.
    GeluTanh,
}

/// A weight in oneDNN's blocked layout.
#[derive(Debug)]
pub struct Packed(Tensor);

impl Packed {
    /// Packs `weight` (`[out, in]`) for inputs of about `rows` rows.
    pub fn new(weight: &Tensor, rows: i64) -> anyhow::Result<Packed> {
        let weight = weight.detach().contiguous();
        // SAFETY: `weight` outlives the call; the shim returns a new tensor
        // (owned by the returned `Tensor`) or null with a message.
        call(|error| unsafe { alignflow_onednn_pack(weight.as_ptr().cast(), rows.max(1), error) })
            .map(Packed)
    }

    /// `x Wᵀ + b` for `x` `[rows, in]` -> `[rows, out]`, then `post`.
    pub fn linear(
        &self,
        x: &Tensor,
        bias: Option<&Tensor>,
        post: PostOp,
    ) -> anyhow::Result<Tensor> {
        let x = x.contiguous();
        let bias_ptr = bias.map_or(std::ptr::null(), |b| b.as_ptr().cast());
        let gelu_tanh = c_int::from(post == PostOp::GeluTanh);
        // SAFETY: every tensor outlives the call; as in `new`.
        call(|error| unsafe {
            alignflow_onednn_linear(
                x.as_ptr().cast(),
                self.0.as_ptr().cast(),
                bias_ptr,
                gelu_tanh,
                error,
            )
        })
    }
}

/// Runs a shim entry point and takes ownership of what it returns.
#[cfg(alignflow_onednn)]
fn call(f: impl FnOnce(*mut *mut c_char) -> *mut std::ffi::c_void) -> anyhow::Result<Tensor> {
    let mut error: *mut c_char = std::ptr::null_mut();
    let out = f(&mut error);
    if out.is_null() {
        // SAFETY: on failure the shim sets a NUL-terminated malloc'd message.
        let message = unsafe {
            let m = CStr::from_ptr(error).to_string_lossy().into_owned();
            alignflow_free_message(error);
            m
        };
        anyhow::bail!("oneDNN linear: {message}");
    }
    // SAFETY: a fresh `at::Tensor*` that nothing else owns.
    Ok(unsafe { Tensor::from_ptr(out.cast()) })
}

#[cfg(not(alignflow_onednn))]
fn call(_: impl FnOnce(*mut *mut c_char) -> *mut std::ffi::c_void) -> anyhow::Result<Tensor> {
    anyhow::bail!("oneDNN linear: not compiled in (no torch headers at build time)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packed_linear_equals_libtorch_linear() {
        let _rng = crate::testing::torch_rng();
        assert!(
            available(),
            "this libtorch has oneDNN: the shim must find it"
        );
        tch::manual_seed(0);
        let w = Tensor::randn([96, 64], (Kind::Float, Device::Cpu));
        let b = Tensor::randn([96], (Kind::Float, Device::Cpu));
        for rows in [1, 8, 300] {
            let x = Tensor::randn([rows, 64], (Kind::Float, Device::Cpu));
            let packed = Packed::new(&w, 8).unwrap();
            let got = packed.linear(&x, Some(&b), PostOp::None).unwrap();
            let want = x.linear(&w, Some(&b));
            assert_eq!(got.size(), [rows, 96]);
            let diff = (&got - &want).abs().max().double_value(&[]);
            assert!(diff < 1e-4, "rows {rows}: max difference {diff}");
            let gelu = packed.linear(&x, Some(&b), PostOp::GeluTanh).unwrap();
            let diff = (&gelu - want.gelu("tanh")).abs().max().double_value(&[]);
            assert!(
                diff < 1e-4,
                "rows {rows}, fused GELU: max difference {diff}"
            );
            let no_bias = packed.linear(&x, None, PostOp::None).unwrap();
            let diff = (&no_bias - x.linear::<Tensor>(&w, None))
                .abs()
                .max()
                .double_value(&[]);
            assert!(diff < 1e-4, "rows {rows}, no bias: max difference {diff}");
        }
        // A shape error comes back as an error, not an abort.
        let packed = Packed::new(&w, 8).unwrap();
        let err = packed
            .linear(
                &Tensor::ones([2, 65], (Kind::Float, Device::Cpu)),
                None,
                PostOp::None,
            )
            .unwrap_err();
        assert!(err.to_string().starts_with("oneDNN linear:"), "{err}");
    }

    #[test]
    fn packs_serve_only_no_grad_forwards_so_a_packed_layer_still_trains() {
        let _rng = crate::testing::torch_rng();
        use crate::model::{Layout, Linear};
        tch::manual_seed(1);
        let vs = tch::nn::VarStore::new(Device::Cpu);
        let layer = Linear::new(vs.root() / "l", 16, 8, true, Layout::InOut, None);
        let x = Tensor::randn([4, 16], (Kind::Float, Device::Cpu));
        let plain = tch::no_grad(|| layer.forward(&x, false));
        layer.pack(8);
        assert!(layer.is_packed());
        assert!(grad_enabled() && tch::no_grad(|| !grad_enabled()));
        let packed = tch::no_grad(|| layer.forward(&x, false));
        let diff = (&packed - &plain).abs().max().double_value(&[]);
        assert!(diff < 1e-5, "max difference {diff}");
        // With autograd on, the same layer takes libtorch's path: a graph.
        let y = layer.forward(&x, false);
        assert!(y.requires_grad());
        y.sum(Kind::Float).backward();
        assert!(layer.weight.grad().defined());
        layer.unpack();
        assert!(!layer.is_packed());
    }
}
