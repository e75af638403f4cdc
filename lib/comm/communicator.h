#pragma once
// Collectives between the ranks of one training job: NCCL for CUDA tensors, OpenMPI for CPU tensors.
//
// Semantics follow torch.distributed's *_tensor collectives so that FullyShard reads like FSDP2:
//   all_gather_into_tensor(out, in):  out = cat(in_0, ..., in_{W-1}); every rank's `in` has the same numel
//   reduce_scatter_tensor(out, in):    out_r = op over ranks of in.chunk(W)[r]; in.numel() == W * out.numel()
//   all_reduce(t):                     t = op over ranks of t (in place)
//   broadcast(t, root):                t = t on root (in place)
// Sizes must agree across ranks: padding a shard to the common size is the caller's job (FullyShard pads the
// last shard). A rank cannot see the other ranks' sizes without an extra collective, so a mismatch is not
// diagnosed by the collective itself; it surfaces as a timeout or as garbage (use check_same_across_ranks on
// the shapes during setup). Tensors must be contiguous, of the communicator's device and of a supported dtype:
// float32, float64, bfloat16, float16, int64, int32, uint8 (NF4 bytes). Avg is for floating dtypes only.
//
// Every collective has an *_async form that returns a Work. On CUDA the collective runs on the communicator's
// own stream after the caller's current stream reaches the call, so a gather for the next block can be issued
// early (prefetch) and Work::wait() makes the current stream wait for it without blocking the host. Until
// wait() returns, the caller must not write `in` nor read `out`.
//
// Failures: a collective that fails or does not finish within CommOptions::timeout throws qt::Error(Device)
// whose message names the rank, the backend and the collective. After such an error the communicator is
// broken: every later call throws at once (a collective that half-ran cannot be resumed).
#include <ATen/ATen.h>

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "lib/comm/launch_env.h"

namespace qt {

enum class ReduceOp { Sum, Avg, Max };
const char* reduce_op_name(ReduceOp op);

struct CommOptions {
  // How long one collective (and the rendezvous) may take before it is declared failed. Generous by default:
  // the first gather of a step can wait behind a slow rank's data loading or checkpoint write.
  std::chrono::milliseconds timeout{std::chrono::minutes(10)};
  // One process on a GPU without a launcher runs no NCCL: every collective is the identity there, and NCCL's
  // initialization would take device memory (its module and buffers) that a run on a small card needs. Set to
  // test NCCL itself with one rank.
  bool nccl_for_one_rank = false;
};

// A collective in flight.
class Work {
 public:
  virtual ~Work() = default;
  // CUDA: the caller's current stream waits for the collective (the host does not block).
  // CPU: blocks until the collective completes. Throws qt::Error(Device) on failure or timeout.
  virtual void wait() = 0;
  // Blocks the host until the collective has completed (CUDA: on the device too), or throws on timeout.
  virtual void synchronize() = 0;
};

class Communicator {
 public:
  virtual ~Communicator() = default;
  Communicator() = default;
  Communicator(const Communicator&) = delete;
  Communicator& operator=(const Communicator&) = delete;

  virtual int rank() const = 0;
  virtual int world_size() const = 0;
  virtual at::Device device() const = 0;
  virtual const char* backend() const = 0;  // "nccl", "mpi", "single" (world size 1 without a launcher)

  // CUDA: the tensors come from the pool of the caller's current stream (as any tensor made on it does); the Work
  // holds them until that stream has waited for the collective (wait(), synchronize() or the Work's end), so the
  // caller may drop them at once.
  virtual std::unique_ptr<Work> all_gather_into_tensor_async(const at::Tensor& out, const at::Tensor& in) = 0;
  virtual std::unique_ptr<Work> reduce_scatter_tensor_async(const at::Tensor& out, const at::Tensor& in,
                                                            ReduceOp op) = 0;
  virtual std::unique_ptr<Work> all_reduce_async(const at::Tensor& tensor, ReduceOp op) = 0;
  virtual std::unique_ptr<Work> broadcast_async(const at::Tensor& tensor, int root) = 0;
  // Returns once every rank has entered the barrier. On CUDA, also waits for the work queued so far.
  virtual void barrier() = 0;

  // Blocking forms: issue, then wait() (on CUDA the current stream is ordered after the collective).
  void all_gather_into_tensor(const at::Tensor& out, const at::Tensor& in);
  void reduce_scatter_tensor(const at::Tensor& out, const at::Tensor& in, ReduceOp op = ReduceOp::Sum);
  void all_reduce(const at::Tensor& tensor, ReduceOp op = ReduceOp::Sum);
  void broadcast(const at::Tensor& tensor, int root);
};

// NCCL when `device` is CUDA (one process per GPU: the device is cuda:<local rank>), MPI for CPU under mpirun,
// a single-rank communicator for CPU without a launcher. Throws qt::Error(Usage) for launches that cannot
// work: more processes on a host than GPUs, CPU collectives under torchrun with several ranks (the wheel's
// c10d has no Gloo headers; CPU collectives need mpirun), a CUDA device in a build without CUDA.
std::unique_ptr<Communicator> make_communicator(const LaunchEnv& env, at::Device device,
                                                const CommOptions& options = {});

// All-gathers a 64-bit hash of `fingerprint` (e.g. the serialized config, or shapes) and throws
// qt::Error(Config) on every rank, naming the ranks whose `what` differs from rank 0's, when they differ.
void check_same_across_ranks(Communicator& comm, const std::string& fingerprint, const std::string& what);

// The least of each of `values` over the ranks, the same bits on every rank (all-gathered as float64).
std::vector<double> min_across_ranks(Communicator& comm, const std::vector<double>& values);

}  // namespace qt
