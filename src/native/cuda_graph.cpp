// CUDA graphs (`at::cuda::CUDAGraph`), which tch 0.26 does not bind. Called from src/train/cuda_graph.rs.
// Also the CUDA streams and events that tch does not bind either: copies of host batches on a side
// stream (src/train/staging.rs), the device's free memory, synchronisation.
// build.rs defines CSP_TCH_CUDA when libtorch has CUDA and CUDA runtime headers of libtorch's own
// CUDA version are at hand (CSP_TCH_TORCH_CUDA_VERSION); otherwise every function reports why this
// build cannot capture.
//
// The recipe is PyTorch's (torch/cuda/graphs.py): warm-up and capture on one side stream per device,
// kept for the whole process; the cache emptied before a capture; the graphs of one trainer sharing
// one memory pool made by graph_pool_handle(). A capture that fails is undone completely: the stream
// leaves capture mode, the caching allocators stop allocating into the pool, and the pool's
// reference is dropped, so that a later eager step runs as if no capture had been tried.
#include "shim.h"

#include <ATen/Context.h>
#include <ATen/core/Tensor.h>

extern "C" {
// Sets whether cuDNN may only use deterministic algorithms; returns the previous setting.
int csp_tch_set_cudnn_deterministic(int on) {
  bool was = at::globalContext().deterministicCuDNN();
  at::globalContext().setDeterministicCuDNN(on != 0);
  return was;
}
}

#ifdef CSP_TCH_CUDA
#include <ATen/autocast_mode.h>
#include <ATen/core/CachingHostAllocator.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/StreamGuard.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda.h>
#include <dlfcn.h>

#include <map>
#include <memory>
#include <mutex>
#include <optional>

// CUDAGraph's fields depend on CUDA_VERSION: headers of another CUDA than libtorch's give an object
// of another layout than the one libtorch's code writes into.
static_assert(CUDA_VERSION / 1000 == CSP_TCH_TORCH_CUDA_VERSION / 1000 && CUDA_VERSION >= CSP_TCH_TORCH_CUDA_VERSION,
              "the CUDA headers are older than, or of another major version than, libtorch's CUDA");

namespace {
using c10::MempoolId_t;

// A memory pool that the graphs of one trainer share (they never run at the same time).
struct Pool {
  MempoolId_t id;
};

// A graph, the pool it records into, and while it is being captured, the guard that makes the
// capture stream current and autocast's cache setting to restore.
struct Graph {
  at::cuda::CUDAGraph graph;
  c10::DeviceIndex device = 0;
  MempoolId_t pool{0, 0};
  std::optional<c10::StreamGuard> capture_stream;
  bool autocast_cache = true;
};

// The CUDA runtime's own functions, looked up in the libcudart that libtorch_cuda loaded: csp-tch
// then needs no CUDA library of its own at link time (c10's inline CUDA helpers would).
template <typename F>
F* cudart(const char* name) {
  return reinterpret_cast<F*>(dlsym(RTLD_DEFAULT, name));
}

// A stream from the pool, one per device and per purpose (`streams`), kept for the whole process.
using StreamPerDevice = std::map<c10::DeviceIndex, c10::cuda::CUDAStream>;
c10::cuda::CUDAStream kept_stream(StreamPerDevice& streams, c10::DeviceIndex device) {
  static std::mutex mutex;
  std::lock_guard<std::mutex> lock(mutex);
  auto found = streams.find(device);
  if (found == streams.end()) {
    found = streams.emplace(device, c10::cuda::getStreamFromPool(false, device)).first;
  }
  return found->second;
}

// The side stream that warm-up and capture run on: the caching allocator reuses a freed block
// only on the stream it was allocated on.
c10::Stream capture_stream(c10::DeviceIndex device) {
  static StreamPerDevice streams;
  return kept_stream(streams, device).unwrap();
}

// The side stream that staged batches are copied on.
c10::cuda::CUDAStream copy_stream(c10::DeviceIndex device) {
  static StreamPerDevice streams;
  return kept_stream(streams, device);
}

// Waits for everything queued on `device`; an asynchronous CUDA error surfaces here as an exception.
void synchronize(c10::DeviceIndex device) {
  c10::DeviceGuard guard(c10::Device(c10::DeviceType::CUDA, device));
  c10::cuda::device_synchronize();
}

// An event and the device it belongs to.
struct Event {
  cudaEvent_t event = nullptr;
  c10::DeviceIndex device = 0;
};

// Throws the CUDA runtime's error `status` of `call`, if it is one.
void check(cudaError_t status, const char* call) {
  TORCH_CHECK(status == cudaSuccess, call, " failed with CUDA error ", static_cast<int>(status));
}

// The runtime functions a staged batch calls each step, looked up once.
void stream_wait(cudaStream_t stream, const Event& e) {
  static auto wait = cudart<cudaError_t(cudaStream_t, cudaEvent_t, unsigned int)>("cudaStreamWaitEvent");
  TORCH_CHECK(wait != nullptr, "cudaStreamWaitEvent is not loaded");
  check(wait(stream, e.event, 0), "cudaStreamWaitEvent");
}

void record_on(cudaStream_t stream, const Event& e) {
  static auto record = cudart<cudaError_t(cudaEvent_t, cudaStream_t)>("cudaEventRecord");
  TORCH_CHECK(record != nullptr, "cudaEventRecord is not loaded");
  check(record(e.event, stream), "cudaEventRecord");
}

// Runs `f`, ignoring what it throws: used while undoing a failed capture, which must go on.
template <typename F>
void quietly(F f) {
  try {
    f();
  } catch (...) {
  }
}

// Stops the host allocator recording into `id` (libtorch 2.11 may lack the call): whether it was.
template <typename A>
auto end_host_recording(A* a, MempoolId_t id, int) -> decltype(a->end_allocate_to_pool(id), bool()) {
  try {
    a->end_allocate_to_pool(id);
    return true;
  } catch (...) {
    return false;
  }
}
template <typename A>
bool end_host_recording(A*, MempoolId_t, long) {
  return false;
}

template <typename A>
auto release_host_pool(A* a, MempoolId_t id, int) -> decltype(a->release_pool(id), void()) {
  quietly([&] { a->release_pool(id); });
}
template <typename A>
void release_host_pool(A*, MempoolId_t, long) {}

// Leaves capture: back to the stream that was current, autocast's cache as it was.
void leave_capture(Graph& g) {
  g.capture_stream.reset();
  at::autocast::set_autocast_cache_enabled(g.autocast_cache);
}

// Undoes a capture that failed: ends the stream's capture if it is still open, stops the caching
// allocators recording into the pool, and drops the reference to the pool that the capture took
// (CUDAGraph::reset drops it only for a capture that ended). `begun`: capture_begin had returned.
void abandon_capture(Graph& g, bool begun) {
  auto stream = c10::cuda::CUDAStream(c10::cuda::CUDAStream::UNCHECKED, capture_stream(g.device));
  auto is_capturing = cudart<cudaError_t(cudaStream_t, cudaStreamCaptureStatus*)>("cudaStreamIsCapturing");
  auto end_capture = cudart<cudaError_t(cudaStream_t, cudaGraph_t*)>("cudaStreamEndCapture");
  auto destroy = cudart<cudaError_t(cudaGraph_t)>("cudaGraphDestroy");
  auto clear_error = cudart<cudaError_t()>("cudaGetLastError");
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  if (is_capturing && end_capture && is_capturing(stream.stream(), &status) == cudaSuccess &&
      status != cudaStreamCaptureStatusNone) {
    cudaGraph_t partial = nullptr;
    if (end_capture(stream.stream(), &partial) == cudaSuccess && partial && destroy) destroy(partial);
  }
  if (clear_error) clear_error();
  bool device_recording = false;
  try {
    c10::cuda::CUDACachingAllocator::endAllocateToPool(g.device, g.pool);
    device_recording = true;
  } catch (...) {
  }
  auto* host = at::getHostAllocator(at::kCUDA);
  bool host_recording = end_host_recording(host, g.pool, 0);
  bool ended = false;
  quietly([&] {
    g.graph.pool();  // throws unless capture_end got as far as marking the capture ended
    ended = true;
  });
  if (begun ? !ended : device_recording) {
    quietly([&] { c10::cuda::CUDACachingAllocator::releasePool(g.device, g.pool); });
  }
  if (begun ? !ended : host_recording) release_host_pool(host, g.pool, 0);
  leave_capture(g);
}
}  // namespace

extern "C" {
int csp_tch_cuda_graphs_built() { return 1; }

// A memory pool for graphs of CUDA device `device` to share, or null with the message.
void* csp_tch_graph_pool_new(int device) {
  return csp_tch::guarded<void*>(nullptr, [&]() -> void* {
    c10::DeviceGuard guard(c10::Device(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(device)));
    return new Pool{at::cuda::graph_pool_handle()};
  });
}

void csp_tch_graph_pool_free(void* pool) { delete static_cast<Pool*>(pool); }

// A new, empty graph for CUDA device `device`, or null with the message.
void* csp_tch_graph_new(int device) {
  return csp_tch::guarded<void*>(nullptr, [&]() -> void* {
    c10::DeviceGuard guard(c10::Device(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(device)));
    auto g = std::make_unique<Graph>();
    g->device = static_cast<c10::DeviceIndex>(device);
    return g.release();
  });
}

void csp_tch_graph_free(void* graph) { delete static_cast<Graph*>(graph); }

// Makes `device`'s capture stream the current stream, after the work queued so far, for eager
// warm-up steps: a handle for csp_tch_capture_stream_leave, or null with the message.
void* csp_tch_capture_stream_enter(int device) {
  return csp_tch::guarded<void*>(nullptr, [&]() -> void* {
    auto index = static_cast<c10::DeviceIndex>(device);
    synchronize(index);
    return new c10::StreamGuard(capture_stream(index));
  });
}

// Waits for the work queued on the capture stream, then makes the earlier stream current again.
// Returns 0, or -1 with the message (an error of the warm-up step itself).
int csp_tch_capture_stream_leave(void* guard, int device) {
  auto owned = std::unique_ptr<c10::StreamGuard>(static_cast<c10::StreamGuard*>(guard));
  return csp_tch::guarded(-1, [&] {
    synchronize(static_cast<c10::DeviceIndex>(device));
    return 0;
  });
}

// Starts recording everything queued on `graph`'s device into it, on the device's capture stream,
// which stays current until csp_tch_graph_capture_end. Tensors allocated meanwhile come from
// `pool`. Autocast's cache of cast weights is off during capture: the casts must be recorded, not
// remembered. Returns 0, or -1 with the message (and nothing left in capture mode).
int csp_tch_graph_capture_begin(void* graph, void* pool) {
  auto& g = *static_cast<Graph*>(graph);
  g.pool = static_cast<Pool*>(pool)->id;
  return csp_tch::guarded(-1, [&] {
    synchronize(g.device);
    c10::cuda::CUDACachingAllocator::emptyCache();
    g.autocast_cache = at::autocast::is_autocast_cache_enabled();
    at::autocast::set_autocast_cache_enabled(false);
    g.capture_stream.emplace(capture_stream(g.device));
    try {
      g.graph.capture_begin(g.pool);
    } catch (...) {
      abandon_capture(g, false);
      throw;
    }
    return 0;
  });
}

// Ends the capture begun by csp_tch_graph_capture_begin and makes the graph replayable. Also called
// after a failed recording, to undo the capture; the error then says why. Returns 0 or -1.
int csp_tch_graph_capture_end(void* graph) {
  auto& g = *static_cast<Graph*>(graph);
  return csp_tch::guarded(-1, [&] {
    try {
      g.graph.capture_end();
    } catch (...) {
      abandon_capture(g, true);
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

// The free and total memory of `device` in bytes, as cudaMemGetInfo reports them: 0, or -1.
int csp_tch_cuda_mem_info(int device, size_t* free, size_t* total) {
  return csp_tch::guarded(-1, [&] {
    c10::DeviceGuard guard(c10::Device(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(device)));
    auto mem_get_info = cudart<cudaError_t(size_t*, size_t*)>("cudaMemGetInfo");
    TORCH_CHECK(mem_get_info != nullptr, "cudaMemGetInfo is not loaded");
    check(mem_get_info(free, total), "cudaMemGetInfo");
    return 0;
  });
}

// Waits for `device`: 0, or -1 with the message of an asynchronous CUDA error.
int csp_tch_cuda_synchronize(int device) {
  return csp_tch::guarded(-1, [&] {
    synchronize(static_cast<c10::DeviceIndex>(device));
    return 0;
  });
}

// A CUDA event of `device` (no timing), or null with the message. Waiting on one never recorded
// returns at once, on the host and on a stream alike.
void* csp_tch_cuda_event_new(int device) {
  return csp_tch::guarded<void*>(nullptr, [&]() -> void* {
    auto index = static_cast<c10::DeviceIndex>(device);
    c10::DeviceGuard guard(c10::Device(c10::DeviceType::CUDA, index));
    auto create = cudart<cudaError_t(cudaEvent_t*, unsigned int)>("cudaEventCreateWithFlags");
    TORCH_CHECK(create != nullptr, "cudaEventCreateWithFlags is not loaded");
    auto event = std::make_unique<Event>();
    event->device = index;
    check(create(&event->event, cudaEventDisableTiming), "cudaEventCreateWithFlags");
    return event.release();
  });
}

void csp_tch_cuda_event_free(void* event) {
  auto owned = std::unique_ptr<Event>(static_cast<Event*>(event));
  auto destroy = cudart<cudaError_t(cudaEvent_t)>("cudaEventDestroy");
  if (owned && destroy) destroy(owned->event);
}

// Records `event` on its device's current stream (after the work queued there so far): 0 or -1.
int csp_tch_cuda_event_record(void* event) {
  auto& e = *static_cast<Event*>(event);
  return csp_tch::guarded(-1, [&] {
    record_on(c10::cuda::getCurrentCUDAStream(e.device).stream(), e);
    return 0;
  });
}

// Waits on the host until the work before `event`'s last recording is done: 0 or -1.
int csp_tch_cuda_event_synchronize(void* event) {
  auto& e = *static_cast<Event*>(event);
  return csp_tch::guarded(-1, [&] {
    static auto wait = cudart<cudaError_t(cudaEvent_t)>("cudaEventSynchronize");
    TORCH_CHECK(wait != nullptr, "cudaEventSynchronize is not loaded");
    check(wait(e.event), "cudaEventSynchronize");
    return 0;
  });
}

// Whether the work before `event`'s last recording is done: 1, 0 (not yet) or -1 (a CUDA error).
int csp_tch_cuda_event_query(void* event) {
  auto& e = *static_cast<Event*>(event);
  return csp_tch::guarded(-1, [&] {
    static auto query = cudart<cudaError_t(cudaEvent_t)>("cudaEventQuery");
    TORCH_CHECK(query != nullptr, "cudaEventQuery is not loaded");
    const cudaError_t status = query(e.event);
    if (status == cudaErrorNotReady) return 0;
    check(status, "cudaEventQuery");
    return 1;
  });
}

// Makes the current stream of `event`'s device wait (on the device, not the host) for the work
// before its last recording: 0 or -1.
int csp_tch_cuda_stream_wait_event(void* event) {
  auto& e = *static_cast<Event*>(event);
  return csp_tch::guarded(-1, [&] {
    stream_wait(c10::cuda::getCurrentCUDAStream(e.device).stream(), e);
    return 0;
  });
}

// Copies `src` (pinned host memory) into `dst` (on `done`'s device) on that device's copy stream,
// without waiting on the host: the copy starts once the work before `after`'s last recording is
// done, and `done` is recorded after it. Both tensors must outlive the copy (the caller waits on
// `done` before reusing either). Returns 0 or -1.
int csp_tch_copy_on_side_stream(const at::Tensor* dst, const at::Tensor* src, void* after, void* done) {
  auto& d = *static_cast<Event*>(done);
  return csp_tch::guarded(-1, [&] {
    auto stream = copy_stream(d.device);
    stream_wait(stream.stream(), *static_cast<Event*>(after));
    {
      c10::StreamGuard guard(stream.unwrap());
      const_cast<at::Tensor*>(dst)->copy_(*src, /*non_blocking=*/true);
    }
    record_on(stream.stream(), d);
    return 0;
  });
}
}

#else

namespace {
int unavailable() {
  csp_tch::last_error() = "this csp-tch was built without CUDA graphs: " CSP_TCH_NO_GRAPHS_REASON;
  return -1;
}
}  // namespace

extern "C" {
int csp_tch_cuda_graphs_built() { return 0; }
void* csp_tch_graph_pool_new(int) { return unavailable(), nullptr; }
void csp_tch_graph_pool_free(void*) {}
void* csp_tch_graph_new(int) { return unavailable(), nullptr; }
void csp_tch_graph_free(void*) {}
void* csp_tch_capture_stream_enter(int) { return unavailable(), nullptr; }
int csp_tch_capture_stream_leave(void*, int) { return unavailable(); }
int csp_tch_graph_capture_begin(void*, void*) { return unavailable(); }
int csp_tch_graph_capture_end(void*) { return unavailable(); }
int csp_tch_graph_replay(void*) { return unavailable(); }
int csp_tch_cuda_synchronize(int) { return unavailable(); }
int csp_tch_cuda_mem_info(int, size_t*, size_t*) { return unavailable(); }
void* csp_tch_cuda_event_new(int) { return unavailable(), nullptr; }
void csp_tch_cuda_event_free(void*) {}
int csp_tch_cuda_event_record(void*) { return unavailable(); }
int csp_tch_cuda_event_synchronize(void*) { return unavailable(); }
int csp_tch_cuda_event_query(void*) { return unavailable(); }
int csp_tch_cuda_stream_wait_event(void*) { return unavailable(); }
int csp_tch_copy_on_side_stream(const at::Tensor*, const at::Tensor*, void*, void*) { return unavailable(); }
}

#endif
