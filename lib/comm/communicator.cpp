#include "lib/comm/communicator.h"

#include <cstring>
#include <sstream>
#include <vector>

#include "lib/core/error.h"
#include "lib/comm/collective_args.h"
#include "lib/comm/mpi_communicator.h"
#include "lib/comm/mpi_runtime.h"
#include "lib/comm/nccl_communicator.h"

namespace qt {

const char* reduce_op_name(ReduceOp op) {
  switch (op) {
    case ReduceOp::Sum: return "sum";
    case ReduceOp::Avg: return "avg";
    case ReduceOp::Max: return "max";
  }
  return "?";
}

void Communicator::all_gather_into_tensor(const at::Tensor& out, const at::Tensor& in) {
  all_gather_into_tensor_async(out, in)->wait();
}
void Communicator::reduce_scatter_tensor(const at::Tensor& out, const at::Tensor& in, ReduceOp op) {
  reduce_scatter_tensor_async(out, in, op)->wait();
}
void Communicator::all_reduce(const at::Tensor& tensor, ReduceOp op) { all_reduce_async(tensor, op)->wait(); }
void Communicator::broadcast(const at::Tensor& tensor, int root) { broadcast_async(tensor, root)->wait(); }

namespace {

class DoneWork final : public Work {
 public:
  void wait() override {}
  void synchronize() override {}
};

// World size 1 without a launcher: every collective is the identity, and needs no MPI (a plain `qlora-train` run
// must not depend on an MPI runtime being startable) and, on a GPU, no NCCL (CommOptions::nccl_for_one_rank).
class SingleRankCommunicator final : public Communicator {
 public:
  explicit SingleRankCommunicator(at::Device device) : device_(device) {}
  int rank() const override { return 0; }
  int world_size() const override { return 1; }
  at::Device device() const override { return device_; }
  const char* backend() const override { return "single"; }

  std::unique_ptr<Work> all_gather_into_tensor_async(const at::Tensor& out, const at::Tensor& in) override {
    dist_detail::check_gather(*this, out, in);
    if (!dist_detail::is_gather_in_place(out, in, 0)) out.view_as(in).copy_(in);
    return std::make_unique<DoneWork>();
  }
  std::unique_ptr<Work> reduce_scatter_tensor_async(const at::Tensor& out, const at::Tensor& in,
                                                    ReduceOp op) override {
    dist_detail::check_reduce_scatter(*this, out, in, op);
    out.copy_(in.view_as(out));
    return std::make_unique<DoneWork>();
  }
  std::unique_ptr<Work> all_reduce_async(const at::Tensor& tensor, ReduceOp op) override {
    dist_detail::check_all_reduce(*this, tensor, op);
    return std::make_unique<DoneWork>();
  }
  std::unique_ptr<Work> broadcast_async(const at::Tensor& tensor, int root) override {
    dist_detail::check_broadcast(*this, tensor, root);
    return std::make_unique<DoneWork>();
  }
  void barrier() override {}

 private:
  at::Device device_;
};

// FNV-1a, 64-bit: stable across processes and builds, unlike std::hash.
int64_t fingerprint_hash(const std::string& s) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char c : s) {
    h ^= c;
    h *= 1099511628211ull;
  }
  return static_cast<int64_t>(h);
}

}  // namespace

std::unique_ptr<Communicator> make_communicator(const LaunchEnv& env, at::Device device, const CommOptions& options) {
  const std::string who = "rank " + std::to_string(env.rank) + " (launcher " + launcher_name(env.launcher) + ")";
  if (device.is_cuda()) {
    if (device.has_index() && device.index() != env.local_rank)
      fail(ErrorKind::Usage, who + ": one process per GPU: local rank " + std::to_string(env.local_rank) +
                                 " must use cuda:" + std::to_string(env.local_rank) + ", not " + device.str());
#if QT_WITH_CUDA
    if (env.world_size == 1 && env.launcher == Launcher::None && !options.nccl_for_one_rank)
      return std::make_unique<SingleRankCommunicator>(device.has_index() ? device : at::Device(at::kCUDA, 0));
    return std::make_unique<NcclCommunicator>(env, options);
#else
    fail(ErrorKind::Usage, who + ": this build has no CUDA support; run on the CPU");
#endif
  }
  if (!device.is_cpu()) fail(ErrorKind::Usage, who + ": no communicator for device " + device.str());
  if (env.launcher == Launcher::Mpirun) {
    auto comm = std::make_unique<MpiCommunicator>(options);
    check_mpi_world(env);
    return comm;
  }
  if (env.world_size == 1) return std::make_unique<SingleRankCommunicator>(at::kCPU);
  if (env.launcher == Launcher::Torchrun)
    fail(ErrorKind::Usage, who + ": CPU collectives need mpirun (world size " + std::to_string(env.world_size) +
                               " under torchrun works on GPUs only): use `mpirun -np " +
                               std::to_string(env.world_size) + " qlora-train ...`");
  fail(ErrorKind::Usage, who + ": world size " + std::to_string(env.world_size) + " without a launcher");
}

void check_same_across_ranks(Communicator& comm, const std::string& fingerprint, const std::string& what) {
  const auto opts = at::TensorOptions().dtype(at::kLong).device(comm.device());
  at::Tensor mine = at::full({1}, fingerprint_hash(fingerprint), opts);
  at::Tensor all = at::empty({comm.world_size()}, opts);
  comm.all_gather_into_tensor(all, mine);
  std::vector<int64_t> hashes(comm.world_size());
  at::Tensor host = all.to(at::kCPU);
  std::memcpy(hashes.data(), host.data_ptr<int64_t>(), hashes.size() * sizeof(int64_t));
  std::ostringstream differ;
  int n = 0;
  for (int r = 1; r < comm.world_size(); ++r)
    if (hashes[r] != hashes[0]) differ << (n++ ? ", " : "") << r;
  // Every rank sees the same hashes and throws the same error: none is left waiting in a later collective.
  if (n > 0)
    fail(ErrorKind::Config, "rank " + std::to_string(comm.rank()) + ": the " + what + " differs across ranks: rank" +
                                (n > 1 ? "s " : " ") + differ.str() + (n > 1 ? " differ" : " differs") +
                                " from rank 0 (every rank must start with the same " + what + ")");
}

std::vector<double> min_across_ranks(Communicator& comm, const std::vector<double>& values) {
  const int64_t n = static_cast<int64_t>(values.size());
  if (n == 0) return {};
  at::Tensor mine = at::tensor(at::ArrayRef<double>(values), at::kDouble).to(comm.device());
  at::Tensor all = at::empty({comm.world_size() * n}, mine.options());
  comm.all_gather_into_tensor(all, mine);
  at::Tensor least = std::get<0>(all.view({comm.world_size(), n}).min(0)).to(at::kCPU).contiguous();
  return std::vector<double>(least.data_ptr<double>(), least.data_ptr<double>() + n);
}

}  // namespace qt
