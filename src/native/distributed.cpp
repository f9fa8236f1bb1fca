// PyTorch's c10d process groups (what torch.distributed and DistributedDataParallel run on), which
// tch 0.26 does not bind: a TCPStore rendezvous, then Gloo (CPU tensors) or NCCL (CUDA tensors,
// when build.rs found nccl.h and defines CSP_TCH_NCCL). Called from src/train/distributed.rs.
//
// Only c10d's own API is touched, never gloo's inline classes: the gloo headers ProcessGroupGloo.hpp
// includes are vendored (src/native/third_party/gloo, BSD licence) and may be a little newer or older
// than the gloo compiled into libtorch_cpu.so; c10d's classes hold gloo objects only by pointer.
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#ifdef CSP_TCH_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <thread>
#include <stdexcept>
#include <string>
#include <vector>

#include "shim.h"

namespace {
// How often each rank's heartbeat counter in the store goes up.
constexpr auto kHeartbeat = std::chrono::milliseconds(500);

// How much later than the group's timeout NCCL's watchdog gives up on a collective.
constexpr auto kWatchdogMargin = std::chrono::milliseconds(60000);

std::string heartbeat_key(int rank) { return "heartbeat/" + std::to_string(rank); }

struct Group {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::Backend> backend;
  std::chrono::milliseconds timeout;
  // NCCL: a collective runs on the device, in the order of the streams' work, and a training step's
  // collectives are waited for by the stream that uses the sums, not the host, so that the step can
  // be recorded in a CUDA graph; the host waits for the step's end with the timeout
  // (Group::wait_for_device in src/train/distributed.rs).
  bool stream_ordered = false;
  // A thread that counts up this rank's heartbeat in the store, so that after a failed collective
  // the others can tell which rank is gone (its count stopped) from one that is slow.
  std::thread heartbeat;
  std::mutex mutex;
  std::condition_variable wake;
  bool stopping = false;

  void start_heartbeat(int rank) {
    heartbeat = std::thread([this, rank] {
      std::unique_lock<std::mutex> lock(mutex);
      while (!stopping) {
        lock.unlock();
        try {
          store->add(heartbeat_key(rank), 1);
        } catch (...) {
          return;  // the store is gone (its host exited): nothing left to tell
        }
        lock.lock();
        wake.wait_for(lock, kHeartbeat, [this] { return stopping; });
      }
    });
  }

  ~Group() {
    {
      std::lock_guard<std::mutex> lock(mutex);
      stopping = true;
    }
    wake.notify_all();
    if (heartbeat.joinable()) heartbeat.join();
  }
};

// c10d logs a failed store or socket read (a rank that exited) as a warning with a C++ stack trace
// before it throws, and csp-tch reports the failure itself, naming the rank: c10's log keeps only
// errors, unless TORCH_CPP_LOG_LEVEL asks for more (read as PyTorch reads it).
void quiet_c10d_warnings() {
  if (std::getenv("TORCH_CPP_LOG_LEVEL") != nullptr) {
    c10::initLogging();
  } else {
    FLAGS_caffe2_log_level = 2;  // c10's ERROR
  }
}

// Waits for `work`, rethrowing its failure (a peer that died, or the timeout) as an exception.
void finish(const c10::intrusive_ptr<c10d::Work>& work, const Group& group) {
  if (!work->wait(group.timeout)) throw std::runtime_error("timed out");
}

// Waits for `work`, a collective of a training step: on NCCL the current stream waits for it (the
// host goes on), else as finish().
void finish_in_step(const c10::intrusive_ptr<c10d::Work>& work, const Group& group) {
  if (group.stream_ordered) {
    work->wait();
  } else {
    finish(work, group);
  }
}

// Sums `tensor` over the group's ranks in place.
void sum_over_ranks(Group& group, const at::Tensor& tensor) {
  std::vector<at::Tensor> tensors{tensor};
  finish(group.backend->allreduce(tensors), group);
}
}  // namespace

extern "C" {
int csp_tch_nccl_built() {
#ifdef CSP_TCH_NCCL
  return 1;
#else
  return 0;
#endif
}

// Joins the process group `rank` of `world` through the TCPStore at host:port, under the key prefix
// `prefix`. host_store: rank 0 hosts the store (false when torchrun's agent already hosts it).
// backend: 0 Gloo, 1 NCCL (on CUDA device `device`). gloo_host: the address Gloo binds to, or empty
// for its default (this machine's hostname), gloo_interface a network interface (GLOO_SOCKET_IFNAME)
// or empty. Returns the group, or null with the message in csp_tch_last_error().
void* csp_tch_process_group_new(int backend, const char* host, int port, int rank, int world, int host_store,
                                const char* prefix, int64_t timeout_ms, int device, const char* gloo_host,
                                const char* gloo_interface) {
  return csp_tch::guarded<void*>(nullptr, [&]() -> void* {
    quiet_c10d_warnings();
    auto timeout = std::chrono::milliseconds(timeout_ms);
    c10d::TCPStoreOptions options;
    options.port = static_cast<std::uint16_t>(port);
    options.isServer = host_store != 0 && rank == 0;
    options.numWorkers = world;
    options.waitWorkers = false;
    options.timeout = timeout;
    auto tcp = c10::make_intrusive<c10d::TCPStore>(std::string(host), options);
    c10::intrusive_ptr<c10d::Store> store = c10::make_intrusive<c10d::PrefixStore>(std::string(prefix), tcp);
    auto group = std::make_unique<Group>();
    group->store = store;
    group->timeout = timeout;
    if (backend == 0) {
      auto gloo = c10d::ProcessGroupGloo::Options::create(timeout);
      if (std::strlen(gloo_interface) > 0) {
        gloo->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(gloo_interface));
      } else if (std::strlen(gloo_host) > 0) {
        gloo->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname(gloo_host));
      } else {
        gloo->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
      }
      group->backend = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, world, gloo);
    } else {
#ifdef CSP_TCH_NCCL
      auto nccl = c10d::ProcessGroupNCCL::Options::create();
      // NCCL's watchdog ends the process at its own timeout: later than this group's, so that a rank
      // that stopped answering is found by csp-tch's timed waits first and named.
      nccl->timeout = timeout + kWatchdogMargin;
      auto pg = c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, world, nccl);
      // Bind the communicator to this rank's device now, as init_process_group(device_id=...) does.
      auto cuda = at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(device));
      pg->setBoundDeviceId(cuda);
      pg->eagerConnectSingleDevice(cuda);
      group->backend = pg;
      group->stream_ordered = true;
#else
      (void)device;
      throw std::runtime_error("this csp-tch was built without NCCL (no nccl.h beside libtorch); use --dist-backend gloo");
#endif
    }
    group->start_heartbeat(rank);
    return group.release();
  });
}

// After a failed collective: the ranks of `world` whose heartbeat did not move within `wait_ms`
// (written to `silent`, at most `world`); returns their number, or -1 when the store cannot be read
// (the rank hosting it is gone) with the message in csp_tch_last_error().
int csp_tch_process_group_silent_ranks(void* handle, int world, int64_t wait_ms, int* silent) {
  return csp_tch::guarded(-1, [&] {
    auto& group = *static_cast<Group*>(handle);
    std::vector<int64_t> before(world);
    for (int r = 0; r < world; ++r) before[r] = group.store->add(heartbeat_key(r), 0);
    std::this_thread::sleep_for(std::chrono::milliseconds(wait_ms));
    int count = 0;
    for (int r = 0; r < world; ++r) {
      if (group.store->add(heartbeat_key(r), 0) == before[r]) silent[count++] = r;
    }
    return count;
  });
}

void csp_tch_process_group_free(void* group) { delete static_cast<Group*>(group); }

// Sends `tensor` from rank `root` to every rank, in place.
int csp_tch_process_group_broadcast(void* handle, const at::Tensor* tensor, int root) {
  return csp_tch::guarded(-1, [&] {
    auto& group = *static_cast<Group*>(handle);
    std::vector<at::Tensor> tensors{*tensor};
    c10d::BroadcastOptions options;
    options.rootRank = root;
    finish(group.backend->broadcast(tensors, options), group);
    return 0;
  });
}

// Replaces `tensor` by its sum over the ranks, in place. in_step: a training step's collective
// (finish_in_step).
int csp_tch_process_group_allreduce(void* handle, const at::Tensor* tensor, int in_step) {
  return csp_tch::guarded(-1, [&] {
    auto& group = *static_cast<Group*>(handle);
    std::vector<at::Tensor> tensors{*tensor};
    auto work = group.backend->allreduce(tensors);
    in_step == 0 ? finish(work, group) : finish_in_step(work, group);
    return 0;
  });
}

// Aborts the group's collectives in flight (NCCL's communicator: its kernels then end), after a
// step's end was not reached within the timeout, so that the process can exit.
void csp_tch_process_group_abort(void* handle) {
  csp_tch::guarded(0, [&] {
    static_cast<Group*>(handle)->backend->abort();
    return 0;
  });
}

// Sets `key` to the `len` bytes at `value` in the group's store.
int csp_tch_store_set(void* handle, const char* key, const uint8_t* value, size_t len) {
  return csp_tch::guarded(-1, [&] {
    static_cast<Group*>(handle)->store->set(key, std::vector<uint8_t>(value, value + len));
    return 0;
  });
}

// The value of `key` in the group's store, waiting for it up to the group's timeout: a buffer of
// *len bytes for csp_tch_store_free, or null with the message in csp_tch_last_error().
uint8_t* csp_tch_store_get(void* handle, const char* key, size_t* len) {
  return csp_tch::guarded<uint8_t*>(nullptr, [&] {
    auto value = static_cast<Group*>(handle)->store->get(key);
    auto* out = static_cast<uint8_t*>(std::malloc(value.empty() ? 1 : value.size()));
    if (out == nullptr) throw std::bad_alloc();
    std::memcpy(out, value.data(), value.size());
    *len = value.size();
    return out;
  });
}

void csp_tch_store_free(uint8_t* buffer) { std::free(buffer); }
}

namespace {
// DistributedDataParallel's reducer overlap: a hook on each parameter copies its gradient, times
// 1/world, into its slice of a bucket as soon as the backward pass has it, and a bucket whose
// members are all in is summed over the ranks at once, asynchronously, while the backward pass goes
// on. Buckets are launched strictly in their order (every rank must issue the same collectives in the
// same order), a complete one waiting for those before it. Hooks act only between arm() and finish().
struct OverlappedAllreduce {
  Group* group;
  std::vector<at::Tensor> params;
  std::vector<unsigned> hooks;
  std::vector<int> bucket_of;      // by parameter
  std::vector<at::Tensor> slices;  // by parameter: its part of its bucket's flat buffer
  std::vector<at::Tensor> flats;   // by bucket
  std::vector<int> members;        // by bucket
  double scale;

  // One backward pass's state, under `mutex` (hooks run on libtorch's autograd threads).
  std::mutex mutex;
  bool armed = false;
  std::vector<char> ready;  // by parameter
  std::vector<int> pending;
  std::vector<c10::intrusive_ptr<c10d::Work>> works;
  size_t next = 0;               // the next bucket to launch
  std::vector<int> ready_order;  // parameters in the order their gradients came
  int early = 0;                 // buckets launched while gradients were still to come

  void launch_complete_buckets() {
    while (next < flats.size() && pending[next] == 0) {
      std::vector<at::Tensor> tensors{flats[next]};
      works.push_back(group->backend->allreduce(tensors));
      ++next;
      if (ready_order.size() < params.size()) ++early;
    }
  }

  void on_gradient(int index, const at::Tensor& grad) {
    std::lock_guard<std::mutex> lock(mutex);
    if (!armed || ready[index]) return;
    // The same operations as the averaging after the backward pass (src/train/distributed.rs).
    slices[index].copy_(grad.reshape({-1}) * scale);
    ready[index] = 1;
    ready_order.push_back(index);
    --pending[bucket_of[index]];
    launch_complete_buckets();
  }

  void arm() {
    std::lock_guard<std::mutex> lock(mutex);
    std::fill(ready.begin(), ready.end(), 0);
    pending = members;
    works.clear();
    ready_order.clear();
    next = 0;
    early = 0;
    armed = true;
  }

  // After the backward pass: the parameters that got no gradient count as zeros (as the averaging
  // after the backward pass has it), the buckets not launched yet are, and every sum is waited for.
  // Returns how many buckets were launched before the pass's last gradient came.
  int finish() {
    std::lock_guard<std::mutex> lock(mutex);
    armed = false;
    const int launched_early = early;  // what is launched from here on waited for the pass's end
    for (size_t p = 0; p < params.size(); ++p) {
      if (!ready[p]) {
        slices[p].zero_();
        --pending[bucket_of[p]];
      }
    }
    launch_complete_buckets();
    for (auto& work : works) finish_in_step(work, *group);
    works.clear();
    return launched_early;
  }

  ~OverlappedAllreduce() {
    for (size_t p = 0; p < params.size(); ++p) params[p].remove_hook(hooks[p]);
  }
};
}  // namespace

extern "C" {
// Hooks on the `n` parameters `params` that sum their gradients over `group` while the backward pass
// runs: parameter p's gradient times `scale` goes to elements [offsets[p], offsets[p] + numel) of
// bucket buckets_of[p], one of the `n_buckets` flat buffers `flats`. Returns the hooks, or null with
// the message in csp_tch_last_error().
void* csp_tch_overlapped_allreduce_new(void* group, const at::Tensor* const* params, const int* buckets_of,
                                       const int64_t* offsets, int n, const at::Tensor* const* flats, int n_buckets,
                                       double scale) {
  return csp_tch::guarded<void*>(nullptr, [&]() -> void* {
    auto reducer = std::make_unique<OverlappedAllreduce>();
    reducer->group = static_cast<Group*>(group);
    reducer->scale = scale;
    for (int b = 0; b < n_buckets; ++b) reducer->flats.push_back(*flats[b]);
    reducer->members.assign(n_buckets, 0);
    reducer->ready.assign(n, 0);
    for (int p = 0; p < n; ++p) {
      if (buckets_of[p] < 0 || buckets_of[p] >= n_buckets) throw std::invalid_argument("bucket out of range");
      const at::Tensor& param = *params[p];
      reducer->params.push_back(param);
      reducer->bucket_of.push_back(buckets_of[p]);
      reducer->slices.push_back(reducer->flats[buckets_of[p]].narrow(0, offsets[p], param.numel()));
      ++reducer->members[buckets_of[p]];
    }
    auto* raw = reducer.get();
    for (int p = 0; p < n; ++p) {
      reducer->hooks.push_back(reducer->params[p].register_hook([raw, p](const at::Tensor& grad) {
        raw->on_gradient(p, grad);
      }));
    }
    return reducer.release();
  });
}

// Makes the hooks act in the next backward pass.
void csp_tch_overlapped_allreduce_arm(void* reducer) { static_cast<OverlappedAllreduce*>(reducer)->arm(); }

// After the backward pass: launches what is left, waits for every bucket's sum and writes how many
// had been launched before the pass's last gradient came to *during. Returns 0, or -1 with the message in
// csp_tch_last_error() (a rank gone, the timeout).
int csp_tch_overlapped_allreduce_finish(void* reducer, int* during) {
  return csp_tch::guarded(-1, [&] {
    *during = static_cast<OverlappedAllreduce*>(reducer)->finish();
    return 0;
  });
}

// The parameters, by index, in the order their gradients came in the last backward pass (`out` has
// room for all); returns how many came.
int csp_tch_overlapped_allreduce_ready_order(void* reducer, int* out) {
  auto& r = *static_cast<OverlappedAllreduce*>(reducer);
  std::lock_guard<std::mutex> lock(r.mutex);
  std::copy(r.ready_order.begin(), r.ready_order.end(), out);
  return static_cast<int>(r.ready_order.size());
}

// Removes the hooks.
void csp_tch_overlapped_allreduce_free(void* reducer) { delete static_cast<OverlappedAllreduce*>(reducer); }
}

namespace {
// torch.nn.SyncBatchNorm's training step (torch/nn/modules/_functions.py) over NCHW maps: batch
// statistics of every rank's images together, the running statistics updated from them (the
// variance unbiased over all images), and in the backward pass the sums of dy and dy * (x - mean)
// added over the ranks before each rank's input gradient. Weight and bias gradients stay this rank's
// (data-parallel averaging adds them). Statistics in float32 whatever the input's precision; the
// ranks' means and squared deviations combined as batch_norm_gather_stats_with_counts does (Chan's
// pairwise formula), so no variance is taken as a difference of large squares.
struct SyncBatchNorm : public torch::autograd::Function<SyncBatchNorm> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& input, const at::Tensor& weight,
                            const at::Tensor& bias, at::Tensor running_mean, at::Tensor running_var, double momentum,
                            double eps, int64_t group_address, int64_t rank, int64_t world) {
    auto& group = *reinterpret_cast<Group*>(group_address);
    auto x = input.to(at::kFloat);
    const int64_t channels = x.size(1);
    const double local_count = static_cast<double>(x.numel() / channels);
    std::vector<int64_t> dims{0, 2, 3};
    auto local_mean = x.mean(dims);
    auto local_m2 = (x - local_mean.view({1, -1, 1, 1})).square().sum(dims);
    // Row r holds rank r's count, mean and squared deviations: summing gathers them.
    auto gathered = at::zeros({world, 3, channels}, x.options());
    gathered[rank][0].fill_(local_count);
    gathered[rank][1].copy_(local_mean);
    gathered[rank][2].copy_(local_m2);
    sum_over_ranks(group, gathered);
    auto counts = gathered.select(1, 0);  // [world, channels]
    auto count = counts.sum(0);
    auto mean = (counts * gathered.select(1, 1)).sum(0) / count;
    auto m2 = (gathered.select(1, 2) + counts * (gathered.select(1, 1) - mean).square()).sum(0);
    auto var = m2 / count;
    auto invstd = (var + eps).rsqrt();
    const double total = count[0].item<double>();
    {
      at::NoGradGuard no_grad;
      running_mean.mul_(1.0 - momentum).add_(mean.to(running_mean.scalar_type()), momentum);
      running_var.mul_(1.0 - momentum).add_((var * (total / std::max(total - 1.0, 1.0))).to(running_var.scalar_type()),
                                            momentum);
    }
    auto shape = std::vector<int64_t>{1, channels, 1, 1};
    auto out = (x - mean.view(shape)) * (invstd * weight.to(at::kFloat)).view(shape) + bias.to(at::kFloat).view(shape);
    ctx->save_for_backward({x, weight, mean, invstd});
    ctx->saved_data["group"] = group_address;
    ctx->saved_data["total"] = total;
    ctx->saved_data["dtype"] = static_cast<int64_t>(input.scalar_type());
    return out.to(input.scalar_type());
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    auto &x = saved[0], &weight = saved[1], &mean = saved[2], &invstd = saved[3];
    auto& group = *reinterpret_cast<Group*>(ctx->saved_data["group"].toInt());
    const double total = ctx->saved_data["total"].toDouble();
    auto dtype = static_cast<at::ScalarType>(ctx->saved_data["dtype"].toInt());
    auto shape = std::vector<int64_t>{1, x.size(1), 1, 1};
    std::vector<int64_t> dims{0, 2, 3};
    auto dy = grads[0].to(at::kFloat);
    auto xmu = x - mean.view(shape);
    auto sum_dy = dy.sum(dims);
    auto sum_dy_xmu = (dy * xmu).sum(dims);
    auto grad_weight = sum_dy_xmu * invstd;
    auto grad_bias = sum_dy.clone();
    auto sums = at::stack({sum_dy, sum_dy_xmu});
    sum_over_ranks(group, sums);
    auto mean_dy = (sums[0] / total).view(shape);
    auto mean_dy_xmu = (sums[1] / total).view(shape);
    auto scale = invstd.view(shape);
    auto grad_input = (dy - mean_dy - xmu * scale.square() * mean_dy_xmu) * scale * weight.to(at::kFloat).view(shape);
    return {grad_input.to(dtype), grad_weight.to(weight.scalar_type()), grad_bias.to(weight.scalar_type()),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};
}  // namespace

extern "C" {
// A training-mode BatchNorm of `input` (NCHW) with statistics over the images of every rank of
// `group` (this `rank` of `world`), updating the running statistics in place; differentiable.
// Returns the output, or null with the message in csp_tch_last_error().
at::Tensor* csp_tch_sync_batch_norm(void* group, const at::Tensor* input, const at::Tensor* weight,
                                    const at::Tensor* bias, const at::Tensor* running_mean,
                                    const at::Tensor* running_var, double momentum, double eps, int rank, int world) {
  return csp_tch::guarded<at::Tensor*>(nullptr, [&] {
    auto out = SyncBatchNorm::apply(*input, *weight, *bias, *running_mean, *running_var, momentum, eps,
                                    reinterpret_cast<int64_t>(group), static_cast<int64_t>(rank),
                                    static_cast<int64_t>(world));
    return new at::Tensor(std::move(out));
  });
}
}
