#include "lib/comm/nccl_communicator.h"

#if QT_WITH_CUDA

#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>
#include <mpi.h>
#include <nccl.h>

#include <condition_variable>
#include <cstring>
#include <mutex>
#include <optional>
#include <thread>
#include <vector>

#include "lib/core/error.h"
#include "lib/comm/collective_args.h"
#include "lib/comm/mpi_runtime.h"
#include "lib/comm/store_rendezvous.h"

namespace qt {

using dist_detail::op_label;
using Clock = std::chrono::steady_clock;

namespace {

ncclDataType_t nccl_type(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return ncclFloat32;
    case at::kDouble: return ncclFloat64;
    case at::kBFloat16: return ncclBfloat16;
    case at::kHalf: return ncclFloat16;
    case at::kLong: return ncclInt64;
    case at::kInt: return ncclInt32;
    case at::kByte: return ncclUint8;
    default: break;
  }
  fail(ErrorKind::Internal, std::string("no NCCL datatype for ") + c10::toString(t));
}

ncclRedOp_t nccl_op(ReduceOp op) {
  switch (op) {
    case ReduceOp::Sum: return ncclSum;
    case ReduceOp::Avg: return ncclAvg;
    case ReduceOp::Max: return ncclMax;
  }
  return ncclSum;
}

std::string nccl_message(ncclComm_t comm, ncclResult_t r) {
  std::string msg = ncclGetErrorString(r);
  if (comm) {
    const char* last = ncclGetLastError(comm);
    if (last && *last) msg += std::string(" (") + last + ")";
  }
  return msg;
}

}  // namespace

struct NcclCommunicator::Impl {
  std::unique_ptr<MpiRuntime> mpi;           // under mpirun: MPI carries the unique id
  std::unique_ptr<StoreRendezvous> store;    // under torchrun: kept so that a serving rank 0 outlives the others' reads
  int rank = 0;
  int world = 1;
  int device_index = 0;
  CommOptions options;
  std::optional<c10::cuda::CUDAStream> stream;  // the communication stream (from torch's pool, which owns it)

  struct InFlight {
    std::shared_ptr<at::cuda::CUDAEvent> done;
    Clock::time_point deadline;
    std::string label;
  };

  // Guards everything below. The issuing thread holds it while it enqueues; the watchdog while it checks.
  std::mutex mu;
  ncclComm_t comm = nullptr;
  std::string broken;  // why the communicator was aborted; empty while it is fine
  std::vector<InFlight> in_flight;
  bool stopping = false;
  std::condition_variable wake;
  std::thread watchdog;

  std::string label(const char* collective) const { return op_label(rank, "nccl", collective); }

  // Caller holds mu. Aborting ends kernels blocked on a dead peer, so that the device does not stay stuck.
  void abort_locked(const std::string& why) {
    if (broken.empty()) broken = why;
    if (comm) {
      ncclCommAbort(comm);
      comm = nullptr;
    }
    in_flight.clear();
  }

  [[noreturn]] void fail_locked(const std::string& why) {
    abort_locked(why);
    fail(ErrorKind::Device, why);
  }

  void ensure_usable_locked(const char* collective) const {
    if (!broken.empty())
      fail(ErrorKind::Device, label(collective) + ": communicator was aborted after an earlier failure (" + broken + ")");
  }

  // Non-blocking communicators return ncclInProgress while work is being set up in the background; NCCL asks
  // that the state be polled to ncclSuccess before the next call. Caller holds mu.
  void settle_locked(const char* collective, ncclResult_t issued) {
    if (issued != ncclSuccess && issued != ncclInProgress)
      fail_locked(label(collective) + ": " + nccl_message(comm, issued));
    const auto deadline = Clock::now() + options.timeout;
    ncclResult_t state = issued;
    while (true) {
      ncclResult_t r = ncclCommGetAsyncError(comm, &state);
      if (r != ncclSuccess) fail_locked(label(collective) + ": ncclCommGetAsyncError: " + nccl_message(comm, r));
      if (state == ncclSuccess) return;
      if (state != ncclInProgress) fail_locked(label(collective) + ": " + nccl_message(comm, state));
      if (Clock::now() > deadline)
        fail_locked(label(collective) + ": not ready within " + std::to_string(options.timeout.count()) +
                    " ms (train.collective_timeout_s); another rank may have died or not reached this call");
      std::this_thread::yield();
    }
  }

  void watch() {
    c10::cuda::set_device(static_cast<c10::DeviceIndex>(device_index));
    std::unique_lock<std::mutex> lock(mu);
    while (!stopping) {
      wake.wait_for(lock, std::chrono::milliseconds(100));
      if (stopping || !comm) continue;
      ncclResult_t state = ncclSuccess;
      ncclResult_t r = ncclCommGetAsyncError(comm, &state);
      if (r != ncclSuccess || (state != ncclSuccess && state != ncclInProgress)) {
        abort_locked("rank " + std::to_string(rank) + ": nccl: asynchronous error: " +
                     nccl_message(comm, r != ncclSuccess ? r : state));
        continue;
      }
      const auto now = Clock::now();
      std::vector<InFlight> still;
      for (auto& w : in_flight) {
        if (w.done->query()) continue;
        if (now > w.deadline) {
          abort_locked(w.label + ": did not complete within " + std::to_string(options.timeout.count()) +
                       " ms (train.collective_timeout_s); another rank may have died, be stuck, or have called a different collective");
          still.clear();
          break;
        }
        still.push_back(std::move(w));
      }
      if (comm) in_flight = std::move(still);
    }
  }
};

namespace {

using ImplPtr = std::shared_ptr<NcclCommunicator::Impl>;

// The collective's tensors are held until the caller's stream has waited for it (wait, synchronize, or the Work's
// end), then freed in that stream's order: no record_stream, under which the caching allocator could hand their
// memory out again only once it saw the communication stream's later work complete, so that under a budget the
// blocks of the CPU's run-ahead were allocated anew until the device was full (the offloaded activations showed it:
// lib/model/activation_offload.cpp).
class NcclWork final : public Work {
 public:
  NcclWork(ImplPtr impl, std::shared_ptr<at::cuda::CUDAEvent> done, std::string label, std::vector<at::Tensor> tensors,
           c10::cuda::CUDAStream caller)
      : impl_(std::move(impl)),
        done_(std::move(done)),
        label_(std::move(label)),
        tensors_(std::move(tensors)),
        caller_(caller) {}

  ~NcclWork() override {
    try {
      release();
    } catch (...) {  // (a CUDA error here is reported by the communicator's next call)
    }
  }

  void wait() override {
    check();
    done_->block(at::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(impl_->device_index)));
    release();
  }

  void synchronize() override {
    const auto deadline = Clock::now() + impl_->options.timeout;
    while (!done_->query()) {
      check();
      if (Clock::now() > deadline) {
        std::lock_guard<std::mutex> lock(impl_->mu);
        impl_->fail_locked(label_ + ": did not complete within " + std::to_string(impl_->options.timeout.count()) +
                           " ms");
      }
      std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
    check();
    tensors_.clear();  // the collective is complete
  }

 private:
  // The stream the tensors were taken on waits for the collective before their memory can be handed out again.
  void release() {
    if (tensors_.empty()) return;
    done_->block(caller_);
    tensors_.clear();
  }
  void check() {
    std::lock_guard<std::mutex> lock(impl_->mu);
    if (!impl_->broken.empty()) fail(ErrorKind::Device, label_ + ": failed: " + impl_->broken);
  }

  ImplPtr impl_;
  std::shared_ptr<at::cuda::CUDAEvent> done_;
  std::string label_;
  std::vector<at::Tensor> tensors_;
  c10::cuda::CUDAStream caller_;
};

// Orders the communication stream after the caller's current stream, runs `issue` on it, and records the
// completion event that Work and the watchdog watch.
template <typename Issue>
std::unique_ptr<Work> launch(const ImplPtr& impl, const char* collective, std::initializer_list<at::Tensor> tensors,
                             int64_t count, Issue issue) {
  const auto dev = static_cast<c10::DeviceIndex>(impl->device_index);
  c10::cuda::CUDAGuard guard(dev);
  c10::cuda::CUDAStream comm_stream = *impl->stream;
  const c10::cuda::CUDAStream caller = at::cuda::getCurrentCUDAStream(dev);
  at::cuda::CUDAEvent ready(cudaEventDisableTiming);
  ready.record(caller);
  ready.block(comm_stream);
  // The caller may drop its tensors before the collective ran: the Work holds them (see NcclWork).
  std::vector<at::Tensor> held;
  for (const at::Tensor& t : tensors)
    if (t.numel() > 0) held.push_back(t);

  auto done = std::make_shared<at::cuda::CUDAEvent>(cudaEventDisableTiming);
  std::string label = impl->label(collective);
  {
    std::lock_guard<std::mutex> lock(impl->mu);
    impl->ensure_usable_locked(collective);
    // Empty tensors have null data pointers, which NCCL's argument checks may reject: nothing to move, no call
    // (every rank skips alike, since sizes agree across ranks).
    try {
      if (count > 0) impl->settle_locked(collective, issue(impl->comm, comm_stream.stream()));
    } catch (...) {
      // The collective may be queued all the same (NCCL's in-progress state): its tensors are freed behind it.
      try {
        done->record(comm_stream);
        done->block(caller);
      } catch (...) {
      }
      throw;
    }
    done->record(comm_stream);
    impl->in_flight.push_back({done, Clock::now() + impl->options.timeout, label});
  }
  return std::make_unique<NcclWork>(impl, std::move(done), std::move(label), std::move(held), caller);
}

ncclUniqueId exchange_unique_id(NcclCommunicator::Impl& impl, const LaunchEnv& env) {
  ncclUniqueId id{};
  auto make_id = [&] {
    ncclResult_t r = ncclGetUniqueId(&id);
    if (r != ncclSuccess) fail(ErrorKind::Device, impl.label("ncclGetUniqueId") + ": " + ncclGetErrorString(r));
  };
  if (env.world_size == 1) {
    make_id();
  } else if (env.launcher == Launcher::Mpirun) {
    impl.mpi = std::make_unique<MpiRuntime>();
    check_mpi_world(env);
    if (env.rank == 0) make_id();
    MPI_Request req = MPI_REQUEST_NULL;
    if (MPI_Ibcast(&id, sizeof(id), MPI_BYTE, 0, MPI_COMM_WORLD, &req) != MPI_SUCCESS)
      fail(ErrorKind::Device, impl.label("unique id broadcast (MPI_Ibcast)") + ": failed");
    const auto deadline = Clock::now() + impl.options.timeout;
    int done = 0;
    while (!done) {
      MPI_Test(&req, &done, MPI_STATUS_IGNORE);
      if (!done && Clock::now() > deadline)
        fail(ErrorKind::Device, impl.label("unique id broadcast (MPI_Ibcast)") + ": rank 0 did not send it within " +
                                    std::to_string(impl.options.timeout.count()) + " ms");
      if (!done) std::this_thread::sleep_for(std::chrono::microseconds(100));
    }
  } else if (env.launcher == Launcher::Torchrun) {
    impl.store = std::make_unique<StoreRendezvous>(env, impl.options.timeout);
    if (env.rank == 0) make_id();
    // Every rank creates its communicators in the same order, so a per-rank counter in the store numbers them
    // alike on all ranks: a second communicator never reads the first one's id.
    const std::string raw(reinterpret_cast<const char*>(&id), sizeof(id));
    const int64_t seq = impl.store->add("nccl_comm_count/rank" + std::to_string(env.rank), 1);
    std::string got = impl.store->broadcast("nccl_unique_id/" + std::to_string(seq), raw);
    if (got.size() != sizeof(id))
      fail(ErrorKind::Device, impl.label("unique id exchange") + ": got " + std::to_string(got.size()) +
                                  " bytes from the store, expected " + std::to_string(sizeof(id)));
    std::memcpy(&id, got.data(), sizeof(id));
  } else {
    fail(ErrorKind::Usage, "rank " + std::to_string(env.rank) + ": world size " + std::to_string(env.world_size) +
                               " without a launcher: start with torchrun or mpirun");
  }
  return id;
}

}  // namespace

NcclCommunicator::NcclCommunicator(const LaunchEnv& env, const CommOptions& options)
    : impl_(std::make_shared<Impl>()) {
  Impl& impl = *impl_;
  impl.rank = env.rank;
  impl.world = env.world_size;
  impl.device_index = env.local_rank;
  impl.options = options;
  const int gpus = static_cast<int>(c10::cuda::device_count());
  if (env.local_rank >= gpus)
    fail(ErrorKind::Usage, "rank " + std::to_string(env.rank) + " has local rank " + std::to_string(env.local_rank) +
                               " but this host has " + std::to_string(gpus) +
                               " GPU(s): start at most one process per GPU (launcher " + launcher_name(env.launcher) +
                               ")");
  const auto dev = static_cast<c10::DeviceIndex>(impl.device_index);
  c10::cuda::CUDAGuard guard(dev);
  impl.stream = c10::cuda::getStreamFromPool(/*isHighPriority=*/true, dev);

  ncclUniqueId id = exchange_unique_id(impl, env);
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;  // so that a missing peer shows as a timeout below, not a hang inside NCCL
  {
    std::lock_guard<std::mutex> lock(impl.mu);
    ncclResult_t r = ncclCommInitRankConfig(&impl.comm, impl.world, id, impl.rank, &config);
    if (r != ncclSuccess && r != ncclInProgress) {
      std::string why = impl.label("ncclCommInitRankConfig") + ": " + nccl_message(impl.comm, r);
      if (impl.comm) ncclCommAbort(impl.comm);
      impl.comm = nullptr;
      fail(ErrorKind::Device, why);
    }
    impl.settle_locked("ncclCommInitRankConfig", r);
  }
  impl.watchdog = std::thread([p = impl_.get()] { p->watch(); });
}

NcclCommunicator::~NcclCommunicator() {
  Impl& impl = *impl_;
  {
    std::lock_guard<std::mutex> lock(impl.mu);
    impl.stopping = true;
  }
  impl.wake.notify_all();
  if (impl.watchdog.joinable()) impl.watchdog.join();
  std::lock_guard<std::mutex> lock(impl.mu);
  if (!impl.comm) return;
  // Finalize flushes queued collectives; bounded like any collective, then abort if a peer never comes.
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(impl.device_index));
  ncclResult_t r = ncclCommFinalize(impl.comm);
  ncclResult_t state = r;
  const auto deadline = Clock::now() + impl.options.timeout;
  while (r == ncclSuccess || r == ncclInProgress) {
    if (ncclCommGetAsyncError(impl.comm, &state) != ncclSuccess || state != ncclInProgress) break;
    if (Clock::now() > deadline) break;
    std::this_thread::yield();
  }
  if ((r == ncclSuccess || r == ncclInProgress) && state == ncclSuccess)
    ncclCommDestroy(impl.comm);
  else
    ncclCommAbort(impl.comm);
  impl.comm = nullptr;
}

int NcclCommunicator::rank() const { return impl_->rank; }
int NcclCommunicator::world_size() const { return impl_->world; }
at::Device NcclCommunicator::device() const {
  return at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(impl_->device_index));
}

std::unique_ptr<Work> NcclCommunicator::all_gather_into_tensor_async(const at::Tensor& out, const at::Tensor& in) {
  dist_detail::check_gather(*this, out, in);
  return launch(impl_, "all_gather_into_tensor", {out, in}, in.numel(), [&](ncclComm_t comm, cudaStream_t s) {
    return ncclAllGather(in.data_ptr(), out.data_ptr(), in.numel(), nccl_type(in.scalar_type()), comm, s);
  });
}

std::unique_ptr<Work> NcclCommunicator::reduce_scatter_tensor_async(const at::Tensor& out, const at::Tensor& in,
                                                                    ReduceOp op) {
  dist_detail::check_reduce_scatter(*this, out, in, op);
  return launch(impl_, "reduce_scatter_tensor", {out, in}, out.numel(), [&](ncclComm_t comm, cudaStream_t s) {
    return ncclReduceScatter(in.data_ptr(), out.data_ptr(), out.numel(), nccl_type(in.scalar_type()), nccl_op(op),
                             comm, s);
  });
}

std::unique_ptr<Work> NcclCommunicator::all_reduce_async(const at::Tensor& tensor, ReduceOp op) {
  dist_detail::check_all_reduce(*this, tensor, op);
  return launch(impl_, "all_reduce", {tensor}, tensor.numel(), [&](ncclComm_t comm, cudaStream_t s) {
    return ncclAllReduce(tensor.data_ptr(), tensor.data_ptr(), tensor.numel(), nccl_type(tensor.scalar_type()),
                         nccl_op(op), comm, s);
  });
}

std::unique_ptr<Work> NcclCommunicator::broadcast_async(const at::Tensor& tensor, int root) {
  dist_detail::check_broadcast(*this, tensor, root);
  return launch(impl_, "broadcast", {tensor}, tensor.numel(), [&](ncclComm_t comm, cudaStream_t s) {
    return ncclBroadcast(tensor.data_ptr(), tensor.data_ptr(), tensor.numel(), nccl_type(tensor.scalar_type()), root,
                         comm, s);
  });
}

void NcclCommunicator::barrier() {
  // NCCL has no barrier: a one-element all-reduce, waited on by the host, has every rank meet.
  at::Tensor one = at::ones({1}, at::TensorOptions().dtype(at::kFloat).device(device()));
  auto work = launch(impl_, "barrier", {one}, 1, [&](ncclComm_t comm, cudaStream_t s) {
    return ncclAllReduce(one.data_ptr(), one.data_ptr(), 1, ncclFloat32, ncclSum, comm, s);
  });
  work->synchronize();
}

}  // namespace qt

#endif  // QT_WITH_CUDA
