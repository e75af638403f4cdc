#include "lib/comm/mpi_communicator.h"

#include <mpi.h>

#include <climits>
#include <functional>
#include <thread>
#include <vector>

#include "lib/core/error.h"
#include "lib/comm/collective_args.h"
#include "lib/comm/mpi_runtime.h"

namespace qt {

using dist_detail::fail_collective;
using dist_detail::op_label;

struct MpiCommunicator::Impl {
  MpiRuntime runtime;  // first member: destroyed last, after the communicator is freed
  MPI_Comm comm = MPI_COMM_NULL;
  int rank = 0;
  int world = 1;
  CommOptions options;
  std::string broken;                     // why the communicator is unusable; empty while it is fine
  std::vector<MPI_Request> abandoned;     // timed-out requests: MPI forbids freeing a collective's request

  std::string mpi_message(int rc) const {
    char text[MPI_MAX_ERROR_STRING];
    int len = 0;
    if (MPI_Error_string(rc, text, &len) != MPI_SUCCESS) return "MPI error " + std::to_string(rc);
    return std::string(text, len);
  }

  void ensure_usable(const char* collective) const {
    if (!broken.empty())
      fail_collective(rank, "mpi", collective, "communicator is unusable after an earlier failure (" + broken + ")");
  }

  [[noreturn]] void fail_rc(const char* collective, int rc) {
    broken = op_label(rank, "mpi", collective) + ": " + mpi_message(rc);
    fail(ErrorKind::Device, broken);
  }

  // Polls `req` until it completes. A peer that died or never calls the collective shows up as a timeout
  // here instead of a hang (OpenMPI usually ends the whole job first when a rank dies, with its own message).
  void wait_request(MPI_Request& req, const char* collective) {
    using clock = std::chrono::steady_clock;
    const auto start = clock::now();
    auto pause = std::chrono::microseconds(0);
    while (true) {
      int done = 0;
      int rc = MPI_Test(&req, &done, MPI_STATUS_IGNORE);
      if (rc != MPI_SUCCESS) fail_rc(collective, rc);
      if (done) return;
      if (clock::now() - start > options.timeout) {
        abandoned.push_back(req);
        req = MPI_REQUEST_NULL;
        broken = op_label(rank, "mpi", collective) + ": did not complete within " +
                 std::to_string(options.timeout.count()) +
                 " ms (train.collective_timeout_s); another rank may have died, be stuck, or have called a different collective";
        fail(ErrorKind::Device, broken);
      }
      // Spin briefly (collectives between local ranks finish in microseconds), then back off so that a rank
      // waiting for a slow peer does not burn a core that the peer may need.
      if (clock::now() - start > std::chrono::milliseconds(2)) {
        pause = std::min(std::chrono::microseconds(1000), pause + std::chrono::microseconds(50));
        std::this_thread::sleep_for(pause);
      }
    }
  }
};

namespace {

using ImplPtr = std::shared_ptr<MpiCommunicator::Impl>;

// Data movement only: bf16 and fp16 travel as raw 16-bit words (MPI has no such types); reductions on them go
// through float32 (see reduce_dtype).
MPI_Datatype mpi_type(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return MPI_FLOAT;
    case at::kDouble: return MPI_DOUBLE;
    case at::kLong: return MPI_INT64_T;
    case at::kInt: return MPI_INT32_T;
    case at::kByte: return MPI_UINT8_T;
    case at::kBFloat16:
    case at::kHalf: return MPI_UINT16_T;
    default: break;
  }
  fail(ErrorKind::Internal, std::string("no MPI datatype for ") + c10::toString(t));
}

// The dtype a reduction travels in. MPI cannot add 16-bit floats: they are reduced in float32 and rounded once at
// the end, which is also more accurate than rounding after every pairwise sum. uint8 sums go as int32 and wrap
// modulo 256 on arrival (as in NCCL and torch): OpenMPI 4.1's op/avx component saturates 8- and 16-bit integer
// sums instead (open-mpi/ompi#8045, closed as won't fix; seen here with 4.1.4: 200 + 200 gave 255).
at::ScalarType reduce_dtype(at::ScalarType t, ReduceOp op) {
  if (t == at::kBFloat16 || t == at::kHalf) return at::kFloat;
  if (t == at::kByte && op != ReduceOp::Max) return at::kInt;
  return t;
}

// Back from the reduction dtype into `dst`; uint8 keeps the low byte (modulo 256, defined for any int32).
void store_reduced(const at::Tensor& dst, const at::Tensor& src) {
  if (src.is_same(dst)) return;
  dst.copy_(dst.scalar_type() == at::kByte && src.scalar_type() != at::kByte ? src.bitwise_and(255) : src);
}

MPI_Op mpi_op(ReduceOp op) {
  switch (op) {
    case ReduceOp::Sum:
    case ReduceOp::Avg: return MPI_SUM;  // avg = sum, then divided by the world size on arrival
    case ReduceOp::Max: return MPI_MAX;
  }
  return MPI_SUM;
}

int mpi_count(const ImplPtr& impl, const char* collective, int64_t n) {
  if (n > INT_MAX)
    fail_collective(impl->rank, "mpi", collective,
                    std::to_string(n) + " elements exceed one MPI call's int count; split the tensor");
  return static_cast<int>(n);
}

class MpiWork final : public Work {
 public:
  MpiWork(ImplPtr impl, const char* collective, std::function<void()> finish)
      : impl_(std::move(impl)), collective_(collective), finish_(std::move(finish)) {}

  MPI_Request* request() { return &req_; }

  void wait() override {
    if (done_) return;
    impl_->wait_request(req_, collective_);
    done_ = true;
    if (finish_) finish_();
  }
  void synchronize() override { wait(); }

  ~MpiWork() override {
    // A request that was never waited must still complete before its buffers go (MPI forbids freeing it).
    if (done_ || req_ == MPI_REQUEST_NULL || !impl_->broken.empty()) return;
    try {
      wait();
    } catch (const std::exception&) {
      // Recorded in impl_->broken; the next call on the communicator reports it.
    }
  }

 private:
  ImplPtr impl_;
  const char* collective_;
  std::function<void()> finish_;  // runs after completion: copy back from a float32 buffer, divide for avg
  MPI_Request req_ = MPI_REQUEST_NULL;
  bool done_ = false;
};

std::unique_ptr<MpiWork> start(const ImplPtr& impl, const char* collective, std::function<void()> finish,
                               const std::function<int(MPI_Request*)>& issue) {
  impl->ensure_usable(collective);
  auto work = std::make_unique<MpiWork>(impl, collective, std::move(finish));
  int rc = issue(work->request());
  if (rc != MPI_SUCCESS) impl->fail_rc(collective, rc);
  return work;
}

}  // namespace

MpiCommunicator::MpiCommunicator(const CommOptions& options) : impl_(std::make_shared<Impl>()) {
  impl_->options = options;
  // Our own communicator: our collectives can never match messages of another library using MPI_COMM_WORLD,
  // and its error handler is ours to set.
  if (MPI_Comm_dup(MPI_COMM_WORLD, &impl_->comm) != MPI_SUCCESS)
    fail(ErrorKind::Device, "MPI_Comm_dup(MPI_COMM_WORLD) failed");
  MPI_Comm_set_errhandler(impl_->comm, MPI_ERRORS_RETURN);
  MPI_Comm_rank(impl_->comm, &impl_->rank);
  MPI_Comm_size(impl_->comm, &impl_->world);
}

MpiCommunicator::~MpiCommunicator() {
  // Give timed-out collectives a moment to finish (a late peer may complete them) so MPI_Finalize sees none
  // pending; a peer that never comes leaves them to mpirun, which ends the job.
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(1);
  for (MPI_Request& req : impl_->abandoned) {
    int done = 0;
    while (!done && std::chrono::steady_clock::now() < deadline) {
      if (MPI_Test(&req, &done, MPI_STATUS_IGNORE) != MPI_SUCCESS) break;
      if (!done) std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
  }
  if (impl_->comm != MPI_COMM_NULL) MPI_Comm_free(&impl_->comm);
}

int MpiCommunicator::rank() const { return impl_->rank; }
int MpiCommunicator::world_size() const { return impl_->world; }

std::unique_ptr<Work> MpiCommunicator::all_gather_into_tensor_async(const at::Tensor& out, const at::Tensor& in) {
  const char* name = "all_gather_into_tensor";
  dist_detail::check_gather(*this, out, in);
  const int count = mpi_count(impl_, name, in.numel());
  mpi_count(impl_, name, out.numel());
  const void* send = dist_detail::is_gather_in_place(out, in, impl_->rank) ? MPI_IN_PLACE : in.data_ptr();
  MPI_Datatype type = mpi_type(in.scalar_type());
  MPI_Comm comm = impl_->comm;
  // `in` and `out` ride along in the finish closure so that their storage outlives the request.
  return start(impl_, name, [in, out] {}, [&](MPI_Request* req) {
    return MPI_Iallgather(send, count, type, out.data_ptr(), count, type, comm, req);
  });
}

std::unique_ptr<Work> MpiCommunicator::reduce_scatter_tensor_async(const at::Tensor& out, const at::Tensor& in,
                                                                   ReduceOp op) {
  const char* name = "reduce_scatter_tensor";
  dist_detail::check_reduce_scatter(*this, out, in, op);
  mpi_count(impl_, name, in.numel());
  const int count = mpi_count(impl_, name, out.numel());
  const at::ScalarType rt = reduce_dtype(in.scalar_type(), op);
  at::Tensor send = in.to(rt);
  at::Tensor recv = rt == out.scalar_type() ? out : at::empty(out.sizes(), out.options().dtype(rt));
  const int world = impl_->world;
  auto finish = [out, send, recv, op, world] {
    if (op == ReduceOp::Avg) recv.div_(world);
    store_reduced(out, recv);
  };
  MPI_Datatype type = mpi_type(send.scalar_type());
  MPI_Comm comm = impl_->comm;
  return start(impl_, name, std::move(finish), [&](MPI_Request* req) {
    return MPI_Ireduce_scatter_block(send.data_ptr(), recv.data_ptr(), count, type, mpi_op(op), comm, req);
  });
}

std::unique_ptr<Work> MpiCommunicator::all_reduce_async(const at::Tensor& tensor, ReduceOp op) {
  const char* name = "all_reduce";
  dist_detail::check_all_reduce(*this, tensor, op);
  const int count = mpi_count(impl_, name, tensor.numel());
  at::Tensor buf = tensor.to(reduce_dtype(tensor.scalar_type(), op));
  const int world = impl_->world;
  auto finish = [tensor, buf, op, world] {
    if (op == ReduceOp::Avg) buf.div_(world);
    store_reduced(tensor, buf);
  };
  MPI_Datatype type = mpi_type(buf.scalar_type());
  MPI_Comm comm = impl_->comm;
  return start(impl_, name, std::move(finish), [&](MPI_Request* req) {
    return MPI_Iallreduce(MPI_IN_PLACE, buf.data_ptr(), count, type, mpi_op(op), comm, req);
  });
}

std::unique_ptr<Work> MpiCommunicator::broadcast_async(const at::Tensor& tensor, int root) {
  const char* name = "broadcast";
  dist_detail::check_broadcast(*this, tensor, root);
  const int count = mpi_count(impl_, name, tensor.numel());
  MPI_Datatype type = mpi_type(tensor.scalar_type());
  MPI_Comm comm = impl_->comm;
  return start(impl_, name, [tensor] {}, [&](MPI_Request* req) {
    return MPI_Ibcast(tensor.data_ptr(), count, type, root, comm, req);
  });
}

void MpiCommunicator::barrier() {
  MPI_Comm comm = impl_->comm;
  start(impl_, "barrier", nullptr, [&](MPI_Request* req) { return MPI_Ibarrier(comm, req); })->wait();
}

}  // namespace qt
