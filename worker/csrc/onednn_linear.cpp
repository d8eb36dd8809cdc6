// oneDNN linear layers with pre-packed weights, for decoding on CPU.
//
// libtorch's float32 `linear` goes to MKL's sgemm, which repacks the whole
// weight on every call: for the few rows of a decoding step that packing is
// most of the time. oneDNN's `mkldnn::_linear_pointwise` takes a weight
// reordered once into its blocked layout (what torch.compile's CPU freezing
// uses), about twice as fast on decoding-step shapes. Neither op is in the
// generated C API that tch binds, so they are called through the dispatcher
// here, boxed (no dependence on the kernels' exact C++ signatures).
//
// Every entry point catches C++ exceptions: on failure it returns null and
// sets `*error` to a message the caller frees with `alignflow_free_message`.

#include <ATen/Context.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <ATen/core/stack.h>

#include <cstdlib>
#include <cstring>
#include <exception>
#include <optional>

namespace {

c10::OperatorHandle op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
}

at::Tensor* fail(const std::exception& e, char** error) {
  *error = strdup(e.what());
  return nullptr;
}

}  // namespace

extern "C" {

// 1 when libtorch was built with oneDNN and registers both ops.
int alignflow_onednn_available() {
  try {
    auto& d = c10::Dispatcher::singleton();
    return at::hasMKLDNN() && d.findSchema({"mkldnn::_linear_pointwise", ""}).has_value() &&
                   d.findSchema({"mkldnn::_reorder_linear_weight", ""}).has_value()
               ? 1
               : 0;
  } catch (...) {
    return 0;
  }
}

// `weight`: [out, in] float32 on the CPU. Returns it in oneDNN's layout for
// inputs of about `rows` rows.
at::Tensor* alignflow_onednn_pack(const at::Tensor* weight, int64_t rows, char** error) {
  try {
    static const auto reorder = op("mkldnn::_reorder_linear_weight");
    torch::jit::Stack stack{*weight, rows};
    reorder.callBoxed(&stack);
    return new at::Tensor(stack.at(0).toTensor());
  } catch (const std::exception& e) {
    return fail(e, error);
  }
}

// `x`: [rows, in] float32; `packed` from `alignflow_onednn_pack`; `bias`:
// [out] or null; `gelu_tanh`: 1 to apply GELU (tanh approximation) to the
// result inside the same kernel (a oneDNN post-op), sparing a pass over it.
// Returns x Wᵀ + b (or its GELU), [rows, out].
at::Tensor* alignflow_onednn_linear(const at::Tensor* x, const at::Tensor* packed,
                                    const at::Tensor* bias, int gelu_tanh, char** error) {
  try {
    static const auto linear = op("mkldnn::_linear_pointwise");
    c10::IValue b = bias ? c10::IValue(*bias) : c10::IValue();
    torch::jit::Stack stack{*x,
                            *packed,
                            b,
                            c10::IValue(gelu_tanh ? "gelu" : "none"),
                            c10::IValue(c10::List<std::optional<at::Scalar>>()),
                            gelu_tanh ? c10::IValue("tanh") : c10::IValue()};
    linear.callBoxed(&stack);
    return new at::Tensor(stack.at(0).toTensor());
  } catch (const std::exception& e) {
    return fail(e, error);
  }
}

void alignflow_free_message(char* message) { std::free(message); }

// Whether autograd records on this thread (the packed path has no backward).
int alignflow_grad_enabled() { return at::GradMode::is_enabled() ? 1 : 0; }

}  // extern "C"
