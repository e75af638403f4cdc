#pragma once
// Activation offload (plan.offload): a checkpointed block's input (and the tensors the keep ladder keeps) go to
// pinned host memory on a side stream, overlapped with the next blocks' compute; in the backward pass the tensors
// the next block back will need are copied to the GPU on the side stream while this block's backward runs, so the
// compute stream does not wait for PCIe (64 MiB a block at 8k tokens, 256 MiB at 32k). One object per model
// (shared by its copies): its pinned buffers, its side stream per device, the copies in flight.
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <vector>

namespace qt {

struct ModelStats;

class ActivationOffload {
 public:
  explicit ActivationOffload(ModelStats* stats = nullptr);
  ~ActivationOffload();
  ActivationOffload(const ActivationOffload&) = delete;
  ActivationOffload& operator=(const ActivationOffload&) = delete;

  // `t` (CUDA) copied into pinned host memory on the side stream after the compute stream's work so far; the GPU
  // copy's memory is reused only after the copy, and the compute stream waits for it at the end of the next block's
  // forward pass (note), or `lag` blocks later: a copy longer than a block's compute (an offloaded gate / up output)
  // is then waited for behind more compute, its memory held that much longer.
  at::Tensor to_host(const at::Tensor& t, int64_t lag = 0);
  // The host tensors `layer`'s forward pass offloaded, to be fetched back together a block ahead.
  void note(int64_t layer, std::vector<at::Tensor> hosts);
  // Starts the copies of `layer`'s host tensors to `device` on the side stream.
  void start(int64_t layer, const at::Device& device);
  // `host` on the GPU, usable on the compute stream: its copy started ahead, or one made now.
  at::Tensor take(const at::Tensor& host, const at::Device& device);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace qt
