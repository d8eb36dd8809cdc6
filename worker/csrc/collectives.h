// What `collectives.cpp` (the store, the Gloo group, the collectives) and
// `nccl.cpp` (the NCCL group) share: the handles Rust holds, and how a
// call fails or waits.
#pragma once

#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <chrono>
#include <cstring>
#include <stdexcept>

namespace alignflow {

struct Store {
  c10::intrusive_ptr<c10d::TCPStore> store;
};

// A group of ranks on either backend: the collectives are virtual on
// `c10d::Backend`, so one set of entry points drives Gloo and NCCL.
struct Group {
  c10::intrusive_ptr<c10d::Backend> pg;
  std::chrono::milliseconds timeout;
};

template <typename T>
T fail(const char* message, char** error, T result) {
  *error = strdup(message);
  return result;
}

// Waits for `work` within the group's timeout; a timeout or a peer's
// failure throws. (NCCL honours the timeout on the calling thread only with
// blocking wait, which `nccl.cpp` turns on.)
inline void finish(const Group& g, const c10::intrusive_ptr<c10d::Work>& work) {
  if (!work->wait(g.timeout)) {
    throw std::runtime_error("collective did not complete within the timeout");
  }
}

}  // namespace alignflow
