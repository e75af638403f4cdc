#pragma once
// How the ranks share a training step, behind one interface (the trainer has no sharding branches): the parameters
// the optimizer steps, their gradients reduced over the ranks, the global gradient norm, the whole tensors gathered
// around the uses that need them (embeddings, lm_head, saving the adapter), and the rows of a parameter for
// optimizer state saved at another world size.
//   DataParallel: every rank holds the whole model; the gradients are all-reduced after the step's last backward.
//   Sharded: FullyShard (fully_shard.h) holds 1/N of every block; its hooks reduce-scatter the block gradients
//            during the backward pass.
#include <ATen/core/Tensor.h>

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "lib/comm/communicator.h"
#include "lib/dist/fully_shard.h"
#include "lib/model/llama.h"

namespace qt {

using NamedTensors = std::vector<std::pair<std::string, at::Tensor>>;

class Parallel {
 public:
  virtual ~Parallel() = default;
  // What the optimizer steps on this rank (PEFT's names; sharded: this rank's padded rows).
  virtual const NamedTensors& parameters() const = 0;
  // The rows of parameter `name` unsharded, and this rank's part of a whole tensor of that shape.
  virtual int64_t full_rows(const std::string& name, const at::Tensor& p) const = 0;
  virtual at::Tensor shard_of(const std::string& name, const at::Tensor& full) const = 0;
  // Which part of a checkpoint's optimizer state this rank's tensors are, {index, parts}: {0, 1} where every rank
  // holds whole tensors (rank 0 saves them), {rank, world} when sharded (each rank saves its own).
  virtual std::pair<int, int> optimizer_part() const = 0;
  // After the step's last backward pass: every parameter's gradient summed over the ranks (collective).
  virtual void reduce_gradients() = 0;
  // The global L2 norm of the gradients before clipping to max_norm (<= 0: none), as a scalar on `device`;
  // data parallel: without waiting for the GPU (collective when sharded).
  virtual at::Tensor clip_grad_norm(double max_norm, const at::Device& device) = 0;
  // The LoRA weights whole in the model around a save (collective; no-op when replicated).
  virtual void gather_lora() = 0;
  virtual void release_lora() = 0;
  // FullyShard when sharded (evaluation's discarded forwards, GatherScope around the embeddings / lm_head), else
  // null.
  virtual FullyShard* sharded() = 0;
  // One line for the log.
  virtual std::string describe() const = 0;
};

// `full_params`: the tensors trained in full (full fine-tuning), else the LoRA parameters (and modules_to_save).
std::unique_ptr<Parallel> make_data_parallel(Communicator& comm, NamedTensors params);
// Shards the model's blocks in place (LoRA attached and loaded before).
std::unique_ptr<Parallel> make_sharded(LlamaModel& model, Communicator& comm, FullyShardOptions options);

// Global L2 norm of the gradients (fp32), and scales them down to max_norm when above it (max_norm <= 0: no
// clipping). Returns the norm before clipping.
double clip_grad_norm(const NamedTensors& params, double max_norm);
// The same without waiting for the GPU: the norm as a scalar tensor on the gradients' device.
at::Tensor clip_grad_norm_async(const NamedTensors& params, double max_norm);

}  // namespace qt
