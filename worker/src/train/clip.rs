//! Global gradient-norm clipping, like `torch.nn.utils.clip_grad_norm_`
//! with the 2-norm.

use tch::{Kind, Tensor};

/// Scales the gradients of `params` so that their global 2-norm is at most
/// `max_norm`, and returns the norm before clipping (which may be infinite
/// or NaN: callers decide whether to skip the step). Tensors without a
/// gradient are skipped; with none at all the norm is 0.
///
/// Like torch, the gradients are always multiplied by
/// `min(1, max_norm / (norm + 1e-6))`, so there is no host branch on the norm.
///
/// # Shapes
/// Any shapes; the gradients must share one device. Norms are accumulated in
/// f32 even for bf16/f16 gradients (torch uses the gradient's dtype).
pub fn clip_grad_norm(params: &[&Tensor], max_norm: f64) -> f64 {
    let grads: Vec<Tensor> = params
        .iter()
        .map(|p| p.grad())
        .filter(|g| g.defined())
        .collect();
    if grads.is_empty() {
        return 0.0;
    }
    let _guard = tch::no_grad_guard();
    let norms: Vec<Tensor> = grads
        .iter()
        .map(|g| match g.kind() {
            Kind::Float | Kind::Double => g.norm().to_kind(Kind::Float),
            _ => g.to_kind(Kind::Float).norm(),
        })
        .collect();
    let total = Tensor::stack(&norms, 0).norm();
    // A true division, as torch does: tch's `f64 / &Tensor` multiplies by a
    // reciprocal and can differ from torch in the last bit.
    let coef = total
        .full_like(max_norm)
        .g_div(&(&total + 1e-6))
        .clamp_max(1.0);
    for g in &grads {
        let mut g = g.shallow_clone();
        let _ = g.g_mul_(&coef.to_kind(g.kind()));
    }
    total.double_value(&[])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Makes a leaf tensor whose gradient is `grad`.
    fn with_grad(values: &[f32], grad: &[f32]) -> Tensor {
        let t = Tensor::from_slice(values).set_requires_grad(true);
        (&t * Tensor::from_slice(grad)).sum(Kind::Float).backward();
        t
    }

    #[test]
    fn clips_to_max_norm_and_returns_the_pre_clip_norm() {
        // Gradients (3, 4) and (12): global norm sqrt(9 + 16 + 144) = 13.
        let a = with_grad(&[0.0, 0.0], &[3.0, 4.0]);
        let c = with_grad(&[0.0], &[12.0]);
        let no_grad = Tensor::zeros([2], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
        let norm = clip_grad_norm(&[&a, &no_grad, &c], 6.5);
        assert!((norm - 13.0).abs() < 1e-6);
        // Scale 6.5 / (13 + 1e-6); torch 2.11 gives [1.4999998807907104,
        // 1.9999998807907104] and [5.999999523162842].
        let got = [
            a.grad().double_value(&[0]),
            a.grad().double_value(&[1]),
            c.grad().double_value(&[0]),
        ];
        for (g, want) in got
            .iter()
            .zip([1.4999998807907104, 1.9999998807907104, 5.999999523162842])
        {
            assert!((g - want).abs() < 1e-7, "{got:?}");
        }
        assert!(!no_grad.grad().defined());
    }

    #[test]
    fn leaves_small_gradients_alone() {
        let a = with_grad(&[0.0, 0.0], &[0.3, 0.4]);
        let norm = clip_grad_norm(&[&a], 1.0);
        assert!((norm - 0.5).abs() < 1e-6);
        assert_eq!(Vec::<f32>::try_from(a.grad()).unwrap(), vec![0.3, 0.4]);
        assert_eq!(clip_grad_norm(&[], 1.0), 0.0);
    }
}
