// The NCCL group of a data-parallel stage on GPUs: torch's own
// `ProcessGroupNCCL` (libtorch_cuda.so exports it), constructed here and
// then driven by the same entry points as the Gloo group (`collectives.cpp`:
// all-reduce, broadcast, barrier on `c10d::Backend`), on CUDA tensors.
//
// Compiled only where the CUDA and NCCL headers are (`build.rs`; the
// Makefile installs the few the CUDA runtime wheel lacks). `USE_C10D_NCCL`
// is the define torch's own build sets for ProcessGroupNCCL.hpp to declare
// anything; the headers of the `nvidia-nccl` wheel torch depends on keep
// `Options`' layout the library's.
//
// Timeouts: NCCL's collectives run on a CUDA stream, and `Work::wait`
// blocks the calling thread (and honours its timeout) only with blocking
// wait on (`TORCH_NCCL_BLOCKING_WAIT`, read here at construction; the Rust
// side sets it before any thread starts, unless the user did): a dead or
// stuck peer then fails the others within the group's timeout, as with
// Gloo, instead of hanging a kernel. Each rank uses one GPU (`device_index`), bound to the
// group so that collectives without a tensor (the barrier) use it too;
// every other collective runs on its tensors' device.

#include "collectives.h"

#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>

#include <cstdint>
#include <exception>

using alignflow::Group;
using alignflow::Store;
using alignflow::fail;

extern "C" {

// A NCCL group of `world` ranks meeting at `store`, this one `rank` on the
// GPU `device_index` (of those this process sees). NCCL's communicator is
// set up at the first collective (torch's lazy init), which the caller
// makes at once (a broadcast of the weights), so a missing rank fails
// there, within `timeout_ms`, which also bounds every later collective.
Group* alignflow_dist_group_new_nccl(Store* store, int rank, int world, int device_index,
                                     int64_t timeout_ms, char** error) {
  try {
    auto timeout = std::chrono::milliseconds(timeout_ms);
    auto opts = c10d::ProcessGroupNCCL::Options::create();
    opts->timeout = timeout;
    auto pg = c10::make_intrusive<c10d::ProcessGroupNCCL>(
        c10::static_intrusive_pointer_cast<c10d::Store>(store->store), rank, world, opts);
    pg->setBoundDeviceId(at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(device_index)));
    return new Group{c10::static_intrusive_pointer_cast<c10d::Backend>(std::move(pg)), timeout};
  } catch (const std::exception& e) {
    return fail<Group*>(e.what(), error, nullptr);
  }
}

}  // extern "C"
