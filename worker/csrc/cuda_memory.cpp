// The CUDA caching allocator's peak, as `torch.cuda.max_memory_allocated`
// and `torch.cuda.reset_peak_memory_stats` read and reset it: the bytes of
// live tensors at their highest since the last reset, without the
// allocator's spare reserve or the CUDA context, which `nvidia-smi` counts.
// tch exposes neither. Compiled with the NCCL group, where the CUDA headers
// are (`build.rs`).

#include <c10/cuda/CUDACachingAllocator.h>

#include <cstdint>
#include <cstring>
#include <exception>

namespace {

constexpr auto kAggregate = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);

}  // namespace

extern "C" {

// Peak bytes allocated on GPU `device` since the process began or the last
// reset; -1 with `error` set (strdup'ed) when the allocator cannot say.
int64_t alignflow_cuda_peak_allocated(int device, char** error) {
  try {
    auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(
        static_cast<c10::DeviceIndex>(device));
    return stats.allocated_bytes[kAggregate].peak;
  } catch (const std::exception& e) {
    *error = strdup(e.what());
    return -1;
  }
}

// Starts a new peak on GPU `device` from what is allocated now.
bool alignflow_cuda_reset_peak(int device, char** error) {
  try {
    c10::cuda::CUDACachingAllocator::resetPeakStats(static_cast<c10::DeviceIndex>(device));
    return true;
  } catch (const std::exception& e) {
    *error = strdup(e.what());
    return false;
  }
}

}  // extern "C"
