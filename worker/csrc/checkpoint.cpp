// Activation checkpointing: a function of one tensor whose forward keeps
// no activations and whose backward runs it again, with autograd on.
//
// tch binds no `torch.utils.checkpoint` and no way to define an autograd
// function, so this is a `torch::autograd::Function` around a callback into
// Rust (`run`, with the closure's `data`). Its forward runs the callback
// under no-grad (as every custom function's forward does) and saves only
// its input, the parameters it differentiates and the RNG state; backward
// restores that RNG state (so dropout draws the same masks), runs the
// callback again with grad on and differentiates the result with respect
// to the input and the parameters. Parameters are explicit inputs, not
// gradients accumulated on the side: the output then requires grad when
// only adapters train (the input of a LoRA model's first block does not),
// and `torch::autograd::grad` works through it too.
//
// Every entry point catches C++ exceptions: on failure it returns null and
// sets `*error` to a message the caller frees with `alignflow_free_message`.

#include <ATen/Context.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/Generator.h>
#include <ATen/core/grad_mode.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>

#include <cstring>
#include <exception>
#include <mutex>
#include <stdexcept>
#include <vector>

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Returns a new `at::Tensor` the caller owns, or null if the Rust side
// panicked.
typedef at::Tensor* (*RunFn)(void* data, const at::Tensor* x);
typedef void (*DropFn)(void* data);

// The Rust closure, dropped with the autograd node that holds it (after
// backward, or with a graph that never ran backward).
struct Closure : torch::CustomClassHolder {
  Closure(void* data, RunFn run, DropFn drop) : data_(data), run_(run), drop_(drop) {}
  ~Closure() override { drop_(data_); }
  Closure(const Closure&) = delete;
  Closure& operator=(const Closure&) = delete;

  at::Tensor call(const at::Tensor& x) const {
    at::Tensor* out = run_(data_, &x);
    if (out == nullptr) {
      throw std::runtime_error("the checkpointed function panicked");
    }
    at::Tensor result = std::move(*out);
    delete out;
    return result;
  }

 private:
  void* data_;
  RunFn run_;
  DropFn drop_;
};

at::Tensor rng_state(const at::Tensor& x) {
  auto gen = at::globalContext().defaultGenerator(x.device());
  std::lock_guard<std::mutex> lock(gen.mutex());
  return gen.get_state();
}

void set_rng_state(const at::Tensor& x, const at::Tensor& state) {
  auto gen = at::globalContext().defaultGenerator(x.device());
  std::lock_guard<std::mutex> lock(gen.mutex());
  gen.set_state(state);
}

struct Checkpoint : torch::autograd::Function<Checkpoint> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, at::TensorList params,
                            c10::intrusive_ptr<Closure> closure) {
    ctx->saved_data["rng"] = rng_state(x);
    ctx->saved_data["autocast"] = at::autocast::is_autocast_enabled(x.device().type());
    ctx->saved_data["closure"] = c10::IValue::make_capsule(closure);
    variable_list saved{x};
    saved.insert(saved.end(), params.begin(), params.end());
    ctx->save_for_backward(saved);
    return closure->call(x);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    auto closure = c10::static_intrusive_pointer_cast<Closure>(ctx->saved_data["closure"].toCapsule());
    const at::Tensor& original = saved[0];
    at::Tensor x = original.detach().requires_grad_(original.requires_grad());
    auto device = x.device().type();
    at::Tensor now = rng_state(x);
    set_rng_state(x, ctx->saved_data["rng"].toTensor());
    bool autocast_before = at::autocast::is_autocast_enabled(device);
    at::autocast::set_autocast_enabled(device, ctx->saved_data["autocast"].toBool());
    at::Tensor out;
    try {
      at::AutoGradMode grad(true);
      out = closure->call(x);
    } catch (...) {
      at::autocast::set_autocast_enabled(device, autocast_before);
      set_rng_state(x, now);
      throw;
    }
    at::autocast::set_autocast_enabled(device, autocast_before);
    set_rng_state(x, now);

    // Differentiate with respect to what requires grad; the rest gets none.
    variable_list wrt;
    std::vector<size_t> where;
    for (size_t i = 0; i < saved.size(); ++i) {
      const at::Tensor& t = i == 0 ? x : saved[i];
      if (t.requires_grad()) {
        wrt.push_back(t);
        where.push_back(i);
      }
    }
    // One slot per forward argument: x, each parameter, the closure.
    variable_list result(saved.size() + 1);
    if (!wrt.empty() && out.requires_grad()) {
      auto found = torch::autograd::grad({out}, wrt, {grads[0]}, /*retain_graph=*/false,
                                         /*create_graph=*/false, /*allow_unused=*/true);
      for (size_t j = 0; j < where.size(); ++j) {
        result[where[j]] = found[j];
      }
    }
    return result;
  }
};

at::Tensor* fail(const char* message, char** error) {
  *error = strdup(message);
  return nullptr;
}

}  // namespace

extern "C" {

// `f(x)` with its activations recomputed in backward (see above). `params`:
// the `n` tensors `f` reads that may need gradients. `data` is handed to
// `run` on every call and to `drop` once, whatever happens.
at::Tensor* alignflow_checkpoint(const at::Tensor* x, const at::Tensor* const* params, size_t n,
                                 void* data, RunFn run, DropFn drop, char** error) {
  auto closure = c10::make_intrusive<Closure>(data, run, drop);
  try {
    std::vector<at::Tensor> list;
    list.reserve(n);
    for (size_t i = 0; i < n; ++i) {
      list.push_back(*params[i]);
    }
    at::Tensor out = Checkpoint::apply(*x, at::TensorList(list), std::move(closure));
    return new at::Tensor(std::move(out));
  } catch (const std::exception& e) {
    return fail(e.what(), error);
  }
}

}  // extern "C"
