#pragma once
// Collectives on CPU tensors over OpenMPI (launch with mpirun). mpi.h stays in the .cpp (pimpl).
#include <memory>

#include "lib/comm/communicator.h"

namespace qt {

class MpiCommunicator final : public Communicator {
 public:
  // Initializes MPI if nobody has (see MpiRuntime), then works on a duplicate of MPI_COMM_WORLD whose error
  // handler returns codes instead of aborting, so that a failure becomes a qt::Error naming the collective.
  explicit MpiCommunicator(const CommOptions& options = {});
  ~MpiCommunicator() override;

  int rank() const override;
  int world_size() const override;
  at::Device device() const override { return at::kCPU; }
  const char* backend() const override { return "mpi"; }

  std::unique_ptr<Work> all_gather_into_tensor_async(const at::Tensor& out, const at::Tensor& in) override;
  std::unique_ptr<Work> reduce_scatter_tensor_async(const at::Tensor& out, const at::Tensor& in,
                                                    ReduceOp op) override;
  std::unique_ptr<Work> all_reduce_async(const at::Tensor& tensor, ReduceOp op) override;
  std::unique_ptr<Work> broadcast_async(const at::Tensor& tensor, int root) override;
  void barrier() override;

  struct Impl;

 private:
  std::shared_ptr<Impl> impl_;
};

}  // namespace qt
