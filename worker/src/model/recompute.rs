//! Activation checkpointing: `f(x)` whose forward keeps no activations and
//! whose backward recomputes them (the C++ side, an autograd function
//! around a callback into Rust, and the reasons are in
//! `csrc/checkpoint.cpp`). Transformer blocks use it with
//! `gradient_checkpointing`, and the chunked log-probs use it so that no
//! chunk's logits outlive its forward.

use std::ffi::{c_char, c_void, CStr};
use std::mem::ManuallyDrop;
use std::panic::{catch_unwind, AssertUnwindSafe};

use tch::Tensor;

/// The closure as the shim holds it.
type Boxed<'a> = Box<dyn Fn(&Tensor) -> Tensor + 'a>;

#[cfg(alignflow_onednn)]
extern "C" {
    fn alignflow_checkpoint(
        x: *const c_void,
        params: *const *const c_void,
        n: usize,
        data: *mut c_void,
        run: unsafe extern "C" fn(*mut c_void, *const c_void) -> *mut c_void,
        drop: unsafe extern "C" fn(*mut c_void),
        error: *mut *mut c_char,
    ) -> *mut c_void;
    fn alignflow_free_message(message: *mut c_char);
}

/// Whether [`checkpoint`] recomputes (the shim is compiled in); without it
/// `checkpoint` is a plain call.
pub fn available() -> bool {
    cfg!(alignflow_onednn)
}

/// `f(x)`, keeping none of `f`'s activations for backward: backward runs
/// `f` again (with the random state of this call, so dropout repeats) and
/// differentiates it with respect to `x` and `params`. `params` must list
/// every tensor `f` reads that may need a gradient (those that do not
/// require grad are skipped at backward). When autograd does not record,
/// or nothing needs a gradient, this is `f(x)`.
///
/// # Safety
/// Whatever `f` borrows must stay alive until the result's graph is
/// dropped (after its backward): the closure is kept in the graph. Callers
/// borrow only model layers, which outlive every training step, and move
/// shallow clones of everything else into `f`.
pub unsafe fn checkpoint<'a>(
    x: &Tensor,
    params: &[Tensor],
    f: impl Fn(&Tensor) -> Tensor + 'a,
) -> Tensor {
    let needed = x.requires_grad() || params.iter().any(Tensor::requires_grad);
    if !needed || !super::onednn::grad_enabled() || !available() {
        return f(x);
    }
    run(x, params, Box::new(f))
}

#[cfg(alignflow_onednn)]
unsafe fn run(x: &Tensor, params: &[Tensor], f: Boxed<'_>) -> Tensor {
    // The graph owns the closure from here (`drop_closure`); see the
    // safety contract of `checkpoint` for its borrows.
    let f: Boxed<'static> = std::mem::transmute(f);
    let data = Box::into_raw(Box::new(f)).cast::<c_void>();
    let ptrs: Vec<*const c_void> = params.iter().map(|p| p.as_ptr().cast()).collect();
    let mut error: *mut c_char = std::ptr::null_mut();
    let out = alignflow_checkpoint(
        x.as_ptr().cast(),
        ptrs.as_ptr(),
        ptrs.len(),
        data,
        run_closure,
        drop_closure,
        &mut error,
    );
    if out.is_null() {
        let message = CStr::from_ptr(error).to_string_lossy().into_owned();
        alignflow_free_message(error);
        panic!("checkpointed forward: {message}");
    }
    Tensor::from_ptr(out.cast())
}

#[cfg(not(alignflow_onednn))]
unsafe fn run(x: &Tensor, _: &[Tensor], f: Boxed<'_>) -> Tensor {
    f(x)
}

/// The shim's callback: runs the closure on a tensor it lends, returns a
/// new tensor it owns (null after a panic, which the shim raises as a C++
/// error).
unsafe extern "C" fn run_closure(data: *mut c_void, x: *const c_void) -> *mut c_void {
    let f = &*data.cast::<Boxed<'static>>();
    // Borrowed: the shim keeps ownership of `x`.
    let x = ManuallyDrop::new(Tensor::from_ptr(x.cast_mut().cast()));
    match catch_unwind(AssertUnwindSafe(|| f(&x))) {
        Ok(out) => {
            let mut out = ManuallyDrop::new(out);
            out.as_mut_ptr().cast()
        }
        Err(_) => std::ptr::null_mut(),
    }
}

unsafe extern "C" fn drop_closure(data: *mut c_void) {
    drop(Box::from_raw(data.cast::<Boxed<'static>>()));
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn recomputed_gradients_equal_the_plain_backward_even_with_dropout() {
        let _rng = crate::testing::torch_rng();
        tch::manual_seed(3);
        let w = Tensor::randn([8, 8], (Kind::Double, Device::Cpu)).set_requires_grad(true);
        let frozen = Tensor::randn([8], (Kind::Double, Device::Cpu));
        let x0 = Tensor::randn([4, 8], (Kind::Double, Device::Cpu)).set_requires_grad(true);
        let f = |x: &Tensor| (x.matmul(&w).tanh() + &frozen).dropout(0.5, true);
        let grads = |recompute: bool| {
            tch::manual_seed(7);
            let y = if recompute {
                unsafe { checkpoint(&x0, &[w.shallow_clone()], f) }
            } else {
                f(&x0)
            };
            // Draws after the forward must not change the recomputed masks.
            let _ = Tensor::rand([16], (Kind::Float, Device::Cpu));
            (y.square().sum(Kind::Double) * 0.5).backward();
            let (gw, gx) = (w.grad().copy(), x0.grad().copy());
            let _ = w.grad().zero_();
            let _ = x0.grad().zero_();
            (y.detach(), gw, gx)
        };
        let (y1, gw1, gx1) = grads(false);
        let (y2, gw2, gx2) = grads(true);
        assert!(available());
        assert_eq!(y1, y2);
        let diff = |a: &Tensor, b: &Tensor| (a - b).abs().max().double_value(&[]);
        assert!(diff(&gw1, &gw2) < 1e-12, "{}", diff(&gw1, &gw2));
        assert!(diff(&gx1, &gx2) < 1e-12, "{}", diff(&gx1, &gx2));
        assert!(gw1.abs().sum(Kind::Double).double_value(&[]) > 0.0);
    }

    #[test]
    fn only_parameters_need_grad_and_the_output_still_trains_them() {
        let _rng = crate::testing::torch_rng();
        tch::manual_seed(4);
        let w = Tensor::randn([3, 3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let x = Tensor::randn([2, 3], (Kind::Float, Device::Cpu));
        let y = unsafe { checkpoint(&x, &[w.shallow_clone()], |x| x.matmul(&w)) };
        assert!(y.requires_grad());
        y.sum(Kind::Float).backward();
        let want = x
            .sum_dim_intlist(0, false, Kind::Float)
            .unsqueeze(1)
            .expand([3, 3], false);
        assert_eq!(w.grad(), want);
        // No grad mode: a plain call, no graph.
        let y = tch::no_grad(|| unsafe { checkpoint(&x, &[w.shallow_clone()], |x| x.matmul(&w)) });
        assert!(!y.requires_grad());
    }
}

#[cfg(test)]
mod block_tests {
    use tch::{Device, Kind, Tensor};

    use crate::model::{BuildOptions, Head, LoraConfig, Model, ModelConfig};
    use alignflow_ops::training::LoraParams;

    /// Every trainable tensor's gradient of one loss, by name.
    fn gradients(model: &Model, ids: &Tensor, mask: &Tensor, seed: i64) -> Vec<(String, Tensor)> {
        for (_, t) in model.trainable() {
            let mut g = t.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
        tch::manual_seed(seed);
        let logits = model.lm.forward(ids, mask, true);
        let logp = logits.log_softmax(-1, Kind::Float);
        let target = logp.gather(2, &ids.roll([-1], [1]).unsqueeze(-1), false);
        (-(target.squeeze_dim(-1) * mask).sum(Kind::Float)).backward();
        model
            .trainable()
            .into_iter()
            .map(|(n, t)| (n, t.grad().copy()))
            .collect()
    }

    fn check(name: &str, raw: serde_json::Value, lora: Option<&[&str]>) {
        let _rng = crate::testing::torch_rng();
        let cfg = ModelConfig::from_json(raw).unwrap();
        tch::manual_seed(11);
        let lora = lora.map(|targets| {
            LoraConfig::from(&LoraParams {
                rank: 2,
                alpha: 4.0,
                dropout: 0.1,
                targets: Some(alignflow_ops::training::LoraTargets::Modules(
                    targets.iter().map(|s| s.to_string()).collect(),
                )),
            })
        });
        let mut model = Model::init(
            &cfg,
            &BuildOptions {
                lora: lora.clone(),
                ..BuildOptions::new(Device::Cpu, Head::Lm)
            },
        );
        if lora.is_some() {
            // Fresh adapters have B = 0: give them a gradient path through A too.
            for (n, mut t) in model.vs.variables() {
                if n.contains("lora_") {
                    tch::no_grad(|| t.copy_(&(Tensor::randn_like(&t) * 0.1)));
                } else {
                    let _ = t.set_requires_grad(false);
                }
            }
        }
        let ids = Tensor::randint(cfg.vocab_size, [3, 9], (Kind::Int64, Device::Cpu));
        let mask = Tensor::ones([3, 9], (Kind::Int64, Device::Cpu));
        let _ = mask.get(1).narrow(0, 0, 3).fill_(0);
        let plain = gradients(&model, &ids, &mask, 5);
        model.set_gradient_checkpointing(true);
        let recomputed = gradients(&model, &ids, &mask, 5);
        assert_eq!(plain.len(), recomputed.len());
        let mut nonzero = 0;
        for ((n, a), (_, b)) in plain.iter().zip(&recomputed) {
            let diff = (a - b).abs().max().double_value(&[]);
            assert!(diff < 1e-6, "{name}: `{n}` differs by {diff}");
            nonzero += usize::from(a.abs().max().double_value(&[]) > 0.0);
        }
        assert!(nonzero * 2 > plain.len(), "{name}: most gradients are zero");
    }

    #[test]
    fn checkpointed_blocks_give_the_plain_gradients_gpt2_with_dropout() {
        check(
            "gpt2",
            ModelConfig::gpt2_json(50, 16, 16, 2, 2, 0, 0.1),
            None,
        );
    }

    #[test]
    fn checkpointed_blocks_give_the_plain_gradients_llama_and_lora() {
        let raw = ModelConfig::llama_json(50, 16, 16, 2, 4, 2, 24, 0, false);
        check("llama", raw.clone(), None);
        check(
            "llama + lora",
            raw,
            Some(&["q_proj", "v_proj", "down_proj"]),
        );
    }

    #[test]
    fn checkpointed_blocks_give_the_plain_gradients_qwen3() {
        let mut raw = ModelConfig::llama_json(50, 16, 16, 2, 4, 2, 24, 0, true);
        raw["model_type"] = "qwen3".into();
        raw["head_dim"] = 8.into();
        check("qwen3", raw, None);
    }
}
