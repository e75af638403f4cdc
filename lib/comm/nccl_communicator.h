#pragma once
// Collectives on CUDA tensors over NCCL: one process per GPU, the device being cuda:<local rank>. Built only
// with QT_WITH_CUDA (make_communicator refuses CUDA otherwise). nccl.h and the CUDA headers stay in the .cpp.
//
// Rendezvous: world size 1 needs none; under mpirun rank 0's ncclUniqueId goes out by MPI broadcast; under
// torchrun through the TCPStore (StoreRendezvous). Each collective runs on the communicator's own stream,
// ordered after the caller's current stream; Work::wait() orders the current stream after it.
//
// Failures: the communicator is non-blocking (ncclConfig_t::blocking = 0), so initialization and enqueueing
// are polled against CommOptions::timeout; a watchdog thread polls ncclCommGetAsyncError and the completion of
// every collective in flight, and aborts the communicator (ncclCommAbort) when one fails or runs past the
// timeout: the kernels stuck waiting for a dead peer end, and the next call throws qt::Error(Device) naming the
// rank and the collective.
#include <memory>

#include "lib/comm/communicator.h"

namespace qt {

class NcclCommunicator final : public Communicator {
 public:
  // Throws qt::Error(Usage) when this host has no GPU for the local rank.
  NcclCommunicator(const LaunchEnv& env, const CommOptions& options = {});
  ~NcclCommunicator() override;

  int rank() const override;
  int world_size() const override;
  at::Device device() const override;
  const char* backend() const override { return "nccl"; }

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
