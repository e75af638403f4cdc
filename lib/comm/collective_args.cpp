#include "lib/comm/collective_args.h"

#include "lib/core/error.h"

namespace qt::dist_detail {
namespace {

bool supported(at::ScalarType t) {
  switch (t) {
    case at::kFloat: case at::kDouble: case at::kBFloat16: case at::kHalf:
    case at::kLong: case at::kInt: case at::kByte:
      return true;
    default:
      return false;
  }
}

}  // namespace

std::string op_label(int rank, const char* backend, const char* collective) {
  return "rank " + std::to_string(rank) + ": " + backend + " " + collective;
}

void fail_collective(int rank, const char* backend, const char* collective, const std::string& what) {
  fail(ErrorKind::Device, op_label(rank, backend, collective) + ": " + what);
}

void check_tensor(const Communicator& comm, const char* collective, const char* name, const at::Tensor& t) {
  auto bad = [&](const std::string& what) {
    fail(ErrorKind::Internal, op_label(comm.rank(), comm.backend(), collective) + ": tensor '" + name + "' " + what);
  };
  if (!t.defined()) bad("is undefined");
  if (t.device() != comm.device())
    bad("is on " + t.device().str() + ", the communicator on " + comm.device().str());
  if (!t.is_contiguous()) bad("is not contiguous");
  if (!supported(t.scalar_type())) bad(std::string("has unsupported dtype ") + c10::toString(t.scalar_type()));
}

void check_gather(const Communicator& comm, const at::Tensor& out, const at::Tensor& in) {
  check_tensor(comm, "all_gather_into_tensor", "out", out);
  check_tensor(comm, "all_gather_into_tensor", "in", in);
  const std::string label = op_label(comm.rank(), comm.backend(), "all_gather_into_tensor");
  if (out.scalar_type() != in.scalar_type()) fail(ErrorKind::Internal, label + ": out and in dtypes differ");
  if (out.numel() != in.numel() * comm.world_size())
    fail(ErrorKind::Internal, label + ": out has " + std::to_string(out.numel()) + " elements, expected world size " +
                                  std::to_string(comm.world_size()) + " x " + std::to_string(in.numel()) +
                                  " (pad every shard to the same size)");
}

void check_reduce_scatter(const Communicator& comm, const at::Tensor& out, const at::Tensor& in, ReduceOp op) {
  check_tensor(comm, "reduce_scatter_tensor", "out", out);
  check_tensor(comm, "reduce_scatter_tensor", "in", in);
  const std::string label = op_label(comm.rank(), comm.backend(), "reduce_scatter_tensor");
  if (out.scalar_type() != in.scalar_type()) fail(ErrorKind::Internal, label + ": out and in dtypes differ");
  if (in.numel() != out.numel() * comm.world_size())
    fail(ErrorKind::Internal, label + ": in has " + std::to_string(in.numel()) + " elements, expected world size " +
                                  std::to_string(comm.world_size()) + " x " + std::to_string(out.numel()) +
                                  " (pad to a multiple of the world size)");
  if (op == ReduceOp::Avg && !at::isFloatingType(in.scalar_type()))
    fail(ErrorKind::Internal, label + ": avg needs a floating dtype");
  if (in.numel() > 0 && out.data_ptr() == in.data_ptr())
    fail(ErrorKind::Internal, label + ": out must not alias in");
}

void check_all_reduce(const Communicator& comm, const at::Tensor& t, ReduceOp op) {
  check_tensor(comm, "all_reduce", "tensor", t);
  if (op == ReduceOp::Avg && !at::isFloatingType(t.scalar_type()))
    fail(ErrorKind::Internal, op_label(comm.rank(), comm.backend(), "all_reduce") + ": avg needs a floating dtype");
}

void check_broadcast(const Communicator& comm, const at::Tensor& t, int root) {
  check_tensor(comm, "broadcast", "tensor", t);
  if (root < 0 || root >= comm.world_size())
    fail(ErrorKind::Internal, op_label(comm.rank(), comm.backend(), "broadcast") + ": root " + std::to_string(root) +
                                  " is not a rank of world size " + std::to_string(comm.world_size()));
}

bool is_gather_in_place(const at::Tensor& out, const at::Tensor& in, int rank) {
  const auto* slot = static_cast<const char*>(out.data_ptr()) + static_cast<int64_t>(rank) * in.nbytes();
  return in.numel() > 0 && in.data_ptr() == slot;
}

}  // namespace qt::dist_detail
