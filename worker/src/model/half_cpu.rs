//! Half-precision weights on a CPU without half-precision kernels.
//!
//! A frozen model held in bfloat16 (`dtype: bfloat16`) halves its memory,
//! but libtorch multiplies bfloat16 at speed on the CPU only through
//! oneDNN, which needs AVX-512 for it; elsewhere a matmul falls back to a
//! reference GEMM. On an AVX2 machine (torch 2.11, 2 threads) a bf16
//! `x Wᵀ` of 256 x 1024 by 1024 x 1024 took 33 ms against 7 ms in float32,
//! and the backward's `g W` 562 ms against 5 ms: a LoRA PPO iteration on a
//! bf16 base ran 11 to 22 times slower than on an AVX-512 machine. There,
//! the linear layers keep their weights in half precision and multiply in
//! float32, widening each weight per call in blocks of at most
//! [`BLOCK_BYTES`] (a large vocabulary's head is never widened whole), in
//! an autograd function that keeps the half-precision weight, not the
//! widened one, for the backward (`csrc/widened_linear.cpp`).

use std::sync::OnceLock;

use tch::{Device, Kind, Tensor};

/// The most float32 bytes of a weight widened at once.
pub const BLOCK_BYTES: i64 = 64 << 20;

#[cfg(alignflow_onednn)]
extern "C" {
    fn alignflow_widened_linear(
        x: *const std::ffi::c_void,
        weight: *const std::ffi::c_void,
        bias: *const std::ffi::c_void,
        out_in: bool,
        block: i64,
        error: *mut *mut std::ffi::c_char,
    ) -> *mut std::ffi::c_void;
}

/// Whether libtorch's CPU kernels compute `kind` natively on this machine,
/// as oneDNN decides it (`ideep::has_bf16_type_support`: AVX-512 core;
/// `has_fp16_type_support`: AVX-512 FP16).
fn native(kind: Kind) -> bool {
    static BF16: OnceLock<bool> = OnceLock::new();
    static FP16: OnceLock<bool> = OnceLock::new();
    match kind {
        Kind::BFloat16 => *BF16.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            {
                std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512bw")
                    && std::arch::is_x86_feature_detected!("avx512vl")
                    && std::arch::is_x86_feature_detected!("avx512dq")
            }
            #[cfg(not(target_arch = "x86_64"))]
            true
        }),
        Kind::Half => *FP16.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            {
                std::arch::is_x86_feature_detected!("avx512fp16")
            }
            #[cfg(not(target_arch = "x86_64"))]
            true
        }),
        _ => true,
    }
}

/// Whether a linear map by `weight` multiplies in float32 here: a frozen
/// half precision weight (trained ones are float32) on a CPU whose kernels
/// lack that precision, in a worker built with the shim.
pub fn widens(weight: &Tensor) -> bool {
    cfg!(alignflow_onednn)
        && weight.device() == Device::Cpu
        && !native(weight.kind())
        && !weight.requires_grad()
}

/// `x Wᵀ + b` with `weight` `[out, in]` (`out_in`) or `x W + b` with it
/// `[in, out]`, computed in float32 with the weight widened in blocks of
/// output features; the result in `x`'s kind, differentiable in `x` (the
/// weight and bias are frozen). Only where [`widens`] holds.
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, out_in: bool) -> Tensor {
    let ins = weight.size()[usize::from(out_in)];
    let block = (BLOCK_BYTES / (4 * ins.max(1))).max(1);
    widened(x, weight, bias, out_in, block)
}

#[cfg(alignflow_onednn)]
fn widened(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, out_in: bool, block: i64) -> Tensor {
    let mut error = std::ptr::null_mut();
    let bias = bias.map_or(std::ptr::null(), |b| b.as_ptr().cast());
    // SAFETY: the tensors outlive the call; the shim catches C++ exceptions
    // and sets `error`, and returns a new tensor this side owns.
    unsafe {
        let out = alignflow_widened_linear(
            x.as_ptr().cast(),
            weight.as_ptr().cast(),
            bias,
            out_in,
            block,
            &mut error,
        );
        if out.is_null() {
            panic!("widened linear: {}", crate::shim::take_message(error));
        }
        Tensor::from_ptr(out.cast())
    }
}

#[cfg(not(alignflow_onednn))]
fn widened(_: &Tensor, _: &Tensor, _: Option<&Tensor>, _: bool, _: i64) -> Tensor {
    unreachable!("`widens` is false without the shim")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_widened_linear_is_the_float32_map_of_the_half_precision_weights() {
        let _rng = crate::testing::torch_rng();
        tch::manual_seed(3);
        let x = Tensor::randn([2, 3, 40], (Kind::Float, Device::Cpu)).to_kind(Kind::BFloat16);
        let w = Tensor::randn([24, 40], (Kind::Float, Device::Cpu)).to_kind(Kind::BFloat16);
        let b = Tensor::randn([24], (Kind::Float, Device::Cpu)).to_kind(Kind::BFloat16);
        let want = x
            .to_kind(Kind::Float)
            .linear(&w.to_kind(Kind::Float), Some(&b.to_kind(Kind::Float)))
            .to_kind(Kind::BFloat16);
        let got = linear(&x, &w, Some(&b), true);
        assert_eq!(got.kind(), Kind::BFloat16);
        assert!(got.equal(&want));
        // `[in, out]` (GPT-2's Conv1D), the same map.
        let got = linear(&x, &w.transpose(0, 1).contiguous(), Some(&b), false);
        assert!(got.equal(&want));
        // Libtorch's own bf16 kernel agrees within bf16's rounding.
        let native = x.linear(&w, Some(&b));
        let diff = (native.to_kind(Kind::Float) - want.to_kind(Kind::Float))
            .abs()
            .max()
            .double_value(&[]);
        let scale = want.to_kind(Kind::Float).abs().max().double_value(&[]);
        assert!(diff <= scale * 1e-2, "{diff} of {scale}");
    }

    #[test]
    fn a_weight_past_the_block_size_is_widened_in_blocks_to_the_same_map() {
        let _rng = crate::testing::torch_rng();
        tch::manual_seed(4);
        // 4096 inputs: a block holds 4096 output features, so 9000 take 3.
        let ins = 4096;
        let outs = 9000;
        assert!(outs * ins * 4 > 2 * BLOCK_BYTES);
        let x = Tensor::randn([3, ins], (Kind::Float, Device::Cpu)).to_kind(Kind::BFloat16);
        let w =
            (Tensor::randn([outs, ins], (Kind::Float, Device::Cpu)) * 0.02).to_kind(Kind::BFloat16);
        let want = x
            .to_kind(Kind::Float)
            .linear::<Tensor>(&w.to_kind(Kind::Float), None)
            .to_kind(Kind::BFloat16);
        let got = linear(&x, &w, None, true);
        assert_eq!(got.size(), [3, outs]);
        assert!(got.equal(&want));
    }

    #[test]
    fn only_half_weights_on_cpus_without_their_kernels_widen() {
        let w = Tensor::zeros([2, 2], (Kind::Float, Device::Cpu));
        assert!(!widens(&w));
        // bf16 widens exactly where oneDNN lacks it (AVX2 machines).
        let h = w.to_kind(Kind::BFloat16);
        assert_eq!(widens(&h), !native(Kind::BFloat16));
        // A weight that trains would get no gradient through the function.
        assert!(!widens(&h.set_requires_grad(true)));
    }

    #[test]
    fn the_input_gradient_is_the_float32_one_in_blocks_and_both_layouts() {
        let _rng = crate::testing::torch_rng();
        tch::manual_seed(5);
        let x = Tensor::randn([4, 40], (Kind::Float, Device::Cpu));
        let w = Tensor::randn([24, 40], (Kind::Float, Device::Cpu)).to_kind(Kind::BFloat16);
        let g = Tensor::randn([4, 24], (Kind::Float, Device::Cpu));
        let grad_of = |f: &dyn Fn(&Tensor) -> Tensor| {
            let x = x.detach().set_requires_grad(true);
            (f(&x) * &g).sum(Kind::Float).backward();
            x.grad()
        };
        let want = grad_of(&|x| x.linear::<Tensor>(&w.to_kind(Kind::Float), None));
        // Two blocks of 12 output features, both layouts. Two sums of 12
        // and one of 24 round differently: bounded relative to the scale.
        let scale = want.abs().max().double_value(&[]);
        let off = |got: &Tensor| (got - &want).abs().max().double_value(&[]);
        let got = grad_of(&|x| widened(x, &w, None, true, 12));
        assert!(off(&got) <= 1e-5 * scale, "{} of {scale}", off(&got));
        let w_in_out = w.transpose(0, 1).contiguous();
        let got = grad_of(&|x| widened(x, &w_in_out, None, false, 12));
        assert!(off(&got) <= 1e-5 * scale, "{} of {scale}", off(&got));
        // A bf16 input gets a bf16 gradient.
        let xb = x.to_kind(Kind::BFloat16).set_requires_grad(true);
        let y = widened(&xb, &w, None, true, 12);
        assert_eq!(y.kind(), Kind::BFloat16);
        y.sum(Kind::Float).backward();
        assert_eq!(xb.grad().kind(), Kind::BFloat16);
    }
}
