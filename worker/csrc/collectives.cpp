// Collectives for data-parallel training: torch's own c10d `TCPStore`
// (rendezvous) and `ProcessGroupGloo` (CPU all-reduce, broadcast, barrier;
// `nccl.cpp` builds the CUDA group the same calls drive), called from Rust
// through a few C functions (see `src/dist/`). tch binds
// no `torch.distributed`; libtorch_cpu.so exports both classes, so this
// file only constructs them and forwards calls: no reduction is written
// here.
//
// Why the gloo headers are vendored (`third_party/gloo/`): the torch wheel
// ships `ProcessGroupGloo.hpp` but not the `gloo/` headers it includes.
// The alternatives were worse: Debian's libgloo-dev is a 2022 snapshot
// whose headers predate what ProcessGroupGloo.hpp's inline code uses, and
// torch's dispatcher op `c10d::allreduce_` still needs a `ProcessGroup`
// holding a Gloo backend, whose constructor and `Options` (a vector of
// `gloo::transport::Device`) are declared in the same header. So the
// headers are copied unchanged from the gloo commit torch 2.11.0 was built
// with: 3135b0b4, identified from libtorch_cpu.so itself (it has
// `GLOO_LOG_LEVEL` and a one-byte `gloo::LogLevel` with UNSET = -1, both
// new in that commit, and neither the `setThreadName` thread names nor the
// shared-memory allreduce of the next commits). Only headers are used: the
// code is torch's, in libtorch_cpu.so; this file touches gloo types only
// through `std::shared_ptr`s, whose layout does not depend on gloo.
//
// Every collective has a timeout (the group's, set at construction and
// passed to `Work::wait`): a rank that dies makes the others fail within
// that time (at once, usually: its sockets close), never hang.
//
// Every entry point catches C++ exceptions: on failure it returns null (or
// false) and sets `*error` to a message the caller frees with
// `alignflow_free_message`.

#include "collectives.h"

#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>

#include <cstdint>
#include <exception>
#include <sstream>
#include <string>
#include <vector>

using alignflow::Group;
using alignflow::Store;
using alignflow::fail;
using alignflow::finish;

extern "C" {

// The rendezvous store. The server (rank 0) listens on `host:port` (port 0:
// a free one, chosen by the OS) and does not wait for the others here (the
// group's construction does); a client connects to it, retrying until
// `timeout_ms`. `*bound_port` is the port listened on or connected to.
Store* alignflow_dist_store_new(const char* host, uint16_t port, bool is_server, int world,
                                int64_t timeout_ms, uint16_t* bound_port, char** error) {
  try {
    c10d::TCPStoreOptions opts;
    opts.port = port;
    opts.isServer = is_server;
    opts.numWorkers = static_cast<size_t>(world);
    opts.waitWorkers = false;
    opts.timeout = std::chrono::milliseconds(timeout_ms);
    auto store = c10::make_intrusive<c10d::TCPStore>(std::string(host), opts);
    *bound_port = store->getPort();
    return new Store{std::move(store)};
  } catch (const std::exception& e) {
    return fail<Store*>(e.what(), error, nullptr);
  }
}

void alignflow_dist_store_free(Store* store) { delete store; }

// A Gloo group of `world` ranks meeting at `store`, this one `rank`, its
// sockets bound to `bind`: an address of this machine the others can reach,
// or with `by_interface` network interfaces by name, comma-separated (as
// torch reads GLOO_SOCKET_IFNAME). Blocks until every rank has joined, at
// most `timeout_ms`, which also bounds every later collective.
Group* alignflow_dist_group_new(Store* store, int rank, int world, const char* bind,
                                int by_interface, int64_t timeout_ms, char** error) {
  try {
    auto timeout = std::chrono::milliseconds(timeout_ms);
    auto opts = c10d::ProcessGroupGloo::Options::create(timeout);
    if (by_interface) {
      std::stringstream names(bind);
      std::string name;
      while (std::getline(names, name, ',')) {
        if (!name.empty()) {
          opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(name));
        }
      }
    } else {
      opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname(std::string(bind)));
    }
    // One thread: collectives are issued one at a time and waited for.
    opts->threads = 1;
    auto pg = c10::make_intrusive<c10d::ProcessGroupGloo>(
        c10::static_intrusive_pointer_cast<c10d::Store>(store->store), rank, world, opts);
    return new Group{c10::static_intrusive_pointer_cast<c10d::Backend>(std::move(pg)), timeout};
  } catch (const std::exception& e) {
    return fail<Group*>(e.what(), error, nullptr);
  }
}

void alignflow_dist_group_free(Group* group) { delete group; }

// Sums `tensor` (contiguous, on the group's device) over the ranks, in place.
bool alignflow_dist_all_reduce_sum(Group* g, at::Tensor* tensor, char** error) {
  try {
    std::vector<at::Tensor> tensors{*tensor};
    c10d::AllreduceOptions opts;
    opts.reduceOp = c10d::ReduceOp::SUM;
    opts.timeout = g->timeout;
    finish(*g, g->pg->allreduce(tensors, opts));
    return true;
  } catch (const std::exception& e) {
    return fail<bool>(e.what(), error, false);
  }
}

// Copies `root`'s `tensor` into every rank's, in place.
bool alignflow_dist_broadcast(Group* g, at::Tensor* tensor, int root, char** error) {
  try {
    std::vector<at::Tensor> tensors{*tensor};
    c10d::BroadcastOptions opts;
    opts.rootRank = root;
    opts.timeout = g->timeout;
    finish(*g, g->pg->broadcast(tensors, opts));
    return true;
  } catch (const std::exception& e) {
    return fail<bool>(e.what(), error, false);
  }
}

// Returns once every rank has called it.
bool alignflow_dist_barrier(Group* g, char** error) {
  try {
    c10d::BarrierOptions opts;
    opts.timeout = g->timeout;
    finish(*g, g->pg->barrier(opts));
    return true;
  } catch (const std::exception& e) {
    return fail<bool>(e.what(), error, false);
  }
}

}  // extern "C"
