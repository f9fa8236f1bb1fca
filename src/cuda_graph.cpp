// CUDA graphs (`at::cuda::CUDAGraph`), which tch 0.26 does not bind. Called from src/cuda_graph.rs.
// build.rs defines CSP_TCH_CUDA when libtorch has CUDA and the CUDA runtime headers are at hand;
// otherwise every function reports that this build cannot capture.
#include "shim.h"

#ifdef CSP_TCH_CUDA
#include <ATen/autocast_mode.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/StreamGuard.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>

#include <memory>
#include <optional>

namespace {
// A graph and, while it is being captured, the side stream it is captured on (CUDA graphs cannot be
// captured on the default stream) and autocast's cache setting to restore.
struct Graph {
  at::cuda::CUDAGraph graph;
  c10::DeviceIndex device = 0;
  // c10's device-generic guards, not c10::cuda's: those are inline code calling the CUDA runtime,
  // which csp-tch would then have to link and find at run time.
  std::optional<c10::StreamGuard> capture_stream;
  bool autocast_cache = true;
};

// Waits for everything queued on `device`.
void synchronize(c10::DeviceIndex device) {
  c10::DeviceGuard guard(c10::Device(c10::DeviceType::CUDA, device));
  c10::cuda::device_synchronize();
}

// Leaves capture: back to the stream that was current, autocast's cache as it was.
void leave_capture(Graph& g) {
  g.capture_stream.reset();
  at::autocast::set_autocast_cache_enabled(g.autocast_cache);
}
}  // namespace

extern "C" {
int csp_tch_cuda_graphs_built() { return 1; }

// A new, empty graph for CUDA device `device`, or null (message in csp_tch_last_error()).
void* csp_tch_graph_new(int device) {
  return csp_tch::guarded<void*>(nullptr, [&]() -> void* {
    auto g = std::make_unique<Graph>();
    g->device = static_cast<c10::DeviceIndex>(device);
    return g.release();
  });
}

void csp_tch_graph_free(void* graph) { delete static_cast<Graph*>(graph); }

// Starts recording everything queued on `graph`'s device into it, on a side stream that becomes the
// current stream until csp_tch_graph_capture_end. Tensors allocated meanwhile come from the graph's
// private memory pool, or from `share_pool_of`'s when that is not null (graphs that never run at the
// same time may share one). Autocast's cache of cast weights is off during capture: the casts must
// be recorded, not remembered. Returns 0, or -1 with the message.
int csp_tch_graph_capture_begin(void* graph, void* share_pool_of) {
  auto& g = *static_cast<Graph*>(graph);
  return csp_tch::guarded(-1, [&] {
    synchronize(g.device);
    g.autocast_cache = at::autocast::is_autocast_cache_enabled();
    at::autocast::set_autocast_cache_enabled(false);
    g.capture_stream.emplace(c10::cuda::getStreamFromPool(false, g.device).unwrap());
    try {
      if (share_pool_of) {
        g.graph.capture_begin(static_cast<Graph*>(share_pool_of)->graph.pool());
      } else {
        g.graph.capture_begin();
      }
    } catch (...) {
      leave_capture(g);
      throw;
    }
    return 0;
  });
}

// Ends the capture begun by csp_tch_graph_capture_begin and makes the graph replayable. Also called
// after a failed recording, to leave capture mode; the error then says why. Returns 0 or -1.
int csp_tch_graph_capture_end(void* graph) {
  auto& g = *static_cast<Graph*>(graph);
  return csp_tch::guarded(-1, [&] {
    try {
      g.graph.capture_end();
    } catch (...) {
      leave_capture(g);
      throw;
    }
    leave_capture(g);
    synchronize(g.device);
    return 0;
  });
}

// Queues the recorded work on the current stream. Returns 0 or -1.
int csp_tch_graph_replay(void* graph) {
  return csp_tch::guarded(-1, [&] {
    static_cast<Graph*>(graph)->graph.replay();
    return 0;
  });
}
}

#else

extern "C" {
int csp_tch_cuda_graphs_built() { return 0; }

void* csp_tch_graph_new(int) {
  csp_tch::last_error() = "this csp-tch was built against a libtorch without CUDA";
  return nullptr;
}

void csp_tch_graph_free(void*) {}

int csp_tch_graph_capture_begin(void*, void*) { return -1; }

int csp_tch_graph_capture_end(void*) { return -1; }

int csp_tch_graph_replay(void*) { return -1; }
}

#endif
