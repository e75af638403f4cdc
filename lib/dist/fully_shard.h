#pragma once
// FullyShard: FSDP2-style parameter sharding of a LlamaModel's decoder blocks across the ranks of a
// Communicator (Zhao et al., "PyTorch FSDP", 2023; torch.distributed.fsdp.fully_shard).
//
// Each decoder block is one unit. Every tensor of the block (NF4 packed bytes and all their statistics, dense
// base weights when not quantized, biases, both RMSNorm weights, LoRA A and B, DoRA magnitudes) is split along dim 0 into
// ceil(rows / N) rows per rank, the last ranks' shards zero-padded. Only the shards stay allocated:
//   before a block runs    its shards are packed into one flat byte buffer ("copy-in") and all-gathered in
//                          one collective (NF4 bytes travel packed); the unsharded tensors are copied out of
//                          the gathered buffer into the model's fields. The next block's gather is issued
//                          right after (prefetch; on CUDA it runs on the communicator's stream, overlapped with
//                          this block's compute).
//   after its forward      the unsharded tensors are dropped.
//   in the backward pass   (grad checkpointing recomputes the block) it is gathered again; after its
//                          backward the LoRA gradients are reduce-scattered (fp32 sum: the loss is already
//                          divided by the global target count) into the gradients of the LoRA shards,
//                          accumulating over micro-batches, and the block is dropped again.
// The optimizer, gradient clipping (global norm through an all-reduce) and the optimizer state work on the
// LoRA shards only (parameters()); the zero padding rows get zero gradients and stay zero under AdamW.
// Per rank this holds ~1/N of the block parameters plus one or two gathered blocks. Embeddings and lm_head stay
// replicated, or with FullyShardOptions::shard_embeddings are sharded too (each its own unit, gathered by the
// caller around its use through GatherScope; tied weights are one unit); the final norm stays replicated.
// Trained embeddings / lm_head (PEFT's modules_to_save: the model's fp32 *_trainable copies) stay replicated:
// whole on every rank, their gradients summed over the ranks (reduce_replicated_grads), stepped by every rank
// alike; parameters(), clip_grad_norm, full_rows and shard_of treat them as unsharded.
//
// Every method that gathers or reduces is a collective: all ranks call it in the same order (the forward and
// backward passes do, as all ranks run the same number of micro-batches).
#include <ATen/core/Tensor.h>

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "lib/comm/communicator.h"
#include "lib/model/llama.h"

namespace qt {

struct FullyShardOptions {
  bool shard_embeddings = false;  // embed_tokens and lm_head sharded too (else replicated)
};

class FullyShard : public BlockHooks {
 public:
  enum class Root { Embeddings, LmHead };

  // Shards the model's blocks in place (their unsharded tensors are released) and installs itself as the
  // model's block hooks. LoRA adapters must be attached (and loaded, when resuming) before. Requires
  // model.plan.checkpointing. Throws qt::Error(Config) otherwise. While released, a sharded embedding or
  // lm_head is a [0, hidden] tensor of its dtype and device (model.device() and dtype() keep working).
  FullyShard(LlamaModel& model, Communicator& comm, FullyShardOptions options = {});
  ~FullyShard() override;
  FullyShard(const FullyShard&) = delete;
  FullyShard& operator=(const FullyShard&) = delete;

  void before_block(size_t layer, bool backward) override;
  void after_block(size_t layer, bool backward) override;

  // This rank's LoRA shards under PEFT's names (lora_parameters order), [ceil(rows/N), ...] fp32 leaves
  // that require grad: what the optimizer steps.
  std::vector<std::pair<std::string, at::Tensor>> parameters() const;
  // Global L2 norm of the sharded gradients (sum of squares all-reduced) and the replicated ones (counted once),
  // clipped to max_norm as clip_grad_norm does (max_norm <= 0: no clipping). Returns the norm before clipping.
  double clip_grad_norm(double max_norm);
  // Sums the replicated trained tensors' gradients over the ranks (collective; after a step's last backward).
  void reduce_replicated_grads();

  // Gathers the embeddings or lm_head into the model (collective; no-op when they are replicated), and
  // drops them again (local). Nested gathers of one unit are counted.
  void gather_root(Root which);
  void release_root(Root which);

  // Gathers every block's LoRA A and B into the model's adapters (e.g. for save_peft_adapter on rank 0), and
  // drops them again. Both collective.
  void gather_lora();
  void release_lora();

  // The unsharded rows of a sharded parameter, and this rank's padded shard of a full tensor of that
  // parameter's shape (e.g. optimizer state being re-sliced for another world size).
  int64_t full_rows(const std::string& param) const;
  at::Tensor shard_of(const std::string& param, const at::Tensor& full) const;

  // Bytes of block parameters this rank holds between blocks (its shards), and what the blocks hold unsharded.
  int64_t sharded_bytes() const;
  int64_t unsharded_bytes() const;
  // Bytes of block tensors currently gathered in the model (0 between blocks).
  int64_t gathered_bytes() const;

  int world_size() const { return world_; }

 private:
  struct Entry {
    std::string name;   // HF or PEFT name, for errors and parameters()
    at::Tensor* slot;   // the model field that holds the unsharded tensor while gathered
    std::vector<int64_t> shape;
    at::ScalarType dtype;
    int64_t rows = 0, row_numel = 0, chunk = 0;  // chunk: rows per rank (padded)
    bool trainable = false;
    at::Tensor shard;  // [chunk, ...]
    ShardTensor::Released released = ShardTensor::Released::Undefined;  // what the slot holds while released
  };
  struct Unit {
    std::vector<Entry> entries;
    bool gathered = false;
    // An issued gather (prefetch) not yet copied out.
    std::unique_ptr<Work> work;
    at::Tensor send, recv;
    bool pending_lora_only = false;
    int holds = 0;  // root units: nested gather_root calls
  };

  void issue_gather(Unit& u, bool lora_only);
  void finish_gather(Unit& u);
  void gather(size_t layer);
  void release(Unit& u, bool lora_only);
  void add_entry(Unit& u, const ShardTensor& tensor, std::string& fingerprint);
  Unit* root_unit(Root which);
  void reduce_scatter_grads(Unit& u);
  const Entry& entry(const std::string& param) const;

  LlamaModel& model_;
  Communicator& comm_;
  int rank_ = 0, world_ = 1;
  std::vector<Unit> units_;  // the blocks, then the root units (embeddings, then an untied lm_head)
  // Trained embeddings / lm_head (modules_to_save), whole on every rank, under their PEFT names.
  std::vector<std::pair<std::string, at::Tensor>> replicated_;
  const at::Tensor* replicated(const std::string& param) const;
  size_t num_blocks_ = 0;
  int embed_unit_ = -1, head_unit_ = -1;
  bool tied_ = false;
};

// Holds a root unit gathered for a scope (nothing when `fs` is null).
class GatherScope {
 public:
  GatherScope(FullyShard* fs, FullyShard::Root which) : fs_(fs), which_(which) {
    if (fs_) fs_->gather_root(which_);
  }
  ~GatherScope() {
    if (fs_) fs_->release_root(which_);
  }
  GatherScope(const GatherScope&) = delete;
  GatherScope& operator=(const GatherScope&) = delete;

 private:
  FullyShard* fs_;
  FullyShard::Root which_;
};

}  // namespace qt
