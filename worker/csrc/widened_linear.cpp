// A linear map whose frozen weight is held in half precision and multiplied
// in float32, for CPUs whose libtorch kernels lack that precision (the why
// is in worker/src/model/half_cpu.rs).
//
// An autograd function, because the plain composition (widen, then
// `linear`) makes autograd keep every widened float32 weight until the
// backward: 4 bytes per parameter for a LoRA update on a bf16 base, which
// is what holding the base in bf16 was meant to save. This one keeps the
// half-precision weight and widens it again in backward, one block of
// output features at a time (forward too), so that no more than `block`
// rows (or columns) are ever widened at once. The weight and bias are
// frozen: only the input gets a gradient.
//
// The entry point catches C++ exceptions: on failure it returns null and
// sets `*error` to a message the caller frees with `alignflow_free_message`.

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include <cstring>
#include <exception>
#include <optional>
#include <vector>

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Output features [start, start + len) of `weight`, widened, as an
// `[len, in]` matrix whatever the layout (`out_in`: `[out, in]`, else GPT-2's
// `[in, out]`).
at::Tensor rows_of(const at::Tensor& weight, bool out_in, int64_t start, int64_t len) {
  if (out_in) {
    return weight.narrow(0, start, len).to(at::kFloat);
  }
  return weight.narrow(1, start, len).to(at::kFloat).t();
}

int64_t outputs(const at::Tensor& weight, bool out_in) { return weight.size(out_in ? 0 : 1); }

struct WidenedLinear : torch::autograd::Function<WidenedLinear> {
  // `bias`: none or one tensor (an undefined tensor has no device, which
  // autograd asks every tensor argument for).
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            at::TensorList bias, bool out_in, int64_t block) {
    ctx->save_for_backward({weight});
    ctx->saved_data["out_in"] = out_in;
    ctx->saved_data["block"] = block;
    ctx->saved_data["kind"] = static_cast<int64_t>(x.scalar_type());
    at::Tensor x32 = x.to(at::kFloat);
    int64_t outs = outputs(weight, out_in);
    std::vector<at::Tensor> parts;
    for (int64_t start = 0; start < outs; start += block) {
      int64_t len = std::min(block, outs - start);
      std::optional<at::Tensor> b;
      if (!bias.empty()) {
        b = bias[0].narrow(0, start, len).to(at::kFloat);
      }
      parts.push_back(at::linear(x32, rows_of(weight, out_in, start, len), b));
    }
    at::Tensor y = parts.size() == 1 ? parts[0] : at::cat(parts, -1);
    return y.to(x.scalar_type());
  }

  // The input's gradient, `g W` over the blocks of output features.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor& weight = ctx->get_saved_variables()[0];
    bool out_in = ctx->saved_data["out_in"].toBool();
    int64_t block = ctx->saved_data["block"].toInt();
    auto kind = static_cast<at::ScalarType>(ctx->saved_data["kind"].toInt());
    at::Tensor g = grads[0].to(at::kFloat);
    int64_t outs = outputs(weight, out_in);
    at::Tensor gx;
    for (int64_t start = 0; start < outs; start += block) {
      int64_t len = std::min(block, outs - start);
      at::Tensor part = at::matmul(g.narrow(-1, start, len), rows_of(weight, out_in, start, len));
      gx = gx.defined() ? gx.add_(part) : part;
    }
    // One slot per forward argument (x, weight, each bias, out_in, block):
    // only x's is defined, and autograd drops the undefined ones past the
    // count.
    return {gx.to(kind), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor* fail(const char* message, char** error) {
  *error = strdup(message);
  return nullptr;
}

}  // namespace

extern "C" {

// `x Wᵀ + b` (`out_in`; else `x W + b`) in float32 with `weight` widened
// `block` output features at a time; `bias` may be null. The result is in
// `x`'s dtype.
at::Tensor* alignflow_widened_linear(const at::Tensor* x, const at::Tensor* weight,
                                     const at::Tensor* bias, bool out_in, int64_t block,
                                     char** error) {
  try {
    std::vector<at::Tensor> b;
    if (bias != nullptr) {
      b.push_back(*bias);
    }
    at::Tensor out = WidenedLinear::apply(*x, *weight, at::TensorList(b), out_in, block);
    return new at::Tensor(std::move(out));
  } catch (const std::exception& e) {
    return fail(e.what(), error);
  }
}

}  // extern "C"
