#pragma once
// Frozen block weights streamed from the host (plan.weights_on_host; issue 26): every decoder block's frozen
// tensors (NF4 codes and statistics, or dense bases; norms; biases) live in pinned host memory, and each block's are
// copied to the GPU just before it runs, the next block's on a side stream while this one computes (forward: the
// following block; the backward pass, which recomputes each checkpointed block: the preceding one), and dropped
// after it. The GPU then holds two blocks' weights instead of all of them, which lets a model larger than the card
// train where compute hides the copies (70B at 1 x 8192: about 111 GB a step over PCIe against about 5.6 s of
// compute on an H200). LoRA tensors, the embeddings, the final norm and lm_head stay where they are.
//
// The model's block hooks (BlockHooks, as FullyShard's): the forward pass and each block's recomputation call them,
// so checkpointing of every block is required (a block kept whole would need its weights in its backward pass,
// which calls no hook). On the CPU the same code runs with host copies of the tensors.
#include <ATen/core/Tensor.h>
#include <c10/core/Stream.h>

#include <memory>
#include <optional>
#include <vector>

#include "lib/model/llama.h"

namespace qt {

class StreamedWeights : public BlockHooks {
 public:
  // Moves every block's frozen tensors to (pinned) host memory (those already there are kept as they are) and
  // installs itself as the model's block hooks. Throws qt::Error(Config) without checkpointing of every block, or
  // when the model has block hooks already (FullyShard).
  explicit StreamedWeights(LlamaModel& model);
  ~StreamedWeights() override;
  StreamedWeights(const StreamedWeights&) = delete;
  StreamedWeights& operator=(const StreamedWeights&) = delete;

  void before_block(size_t layer, bool backward) override;
  void after_block(size_t layer, bool backward) override;

  // Bytes of one block's frozen tensors (the most of any block), and how many blocks are on the device now.
  int64_t block_bytes() const { return block_bytes_; }
  int64_t blocks_on_device() const;
  // Copies made so far (each block fetched once in the forward pass and once for its recomputation).
  int64_t fetches() const { return fetches_; }

 private:
  struct Entry {
    at::Tensor* slot = nullptr;
    at::Tensor host;
  };
  struct Unit {
    std::vector<Entry> entries;
    std::vector<at::Tensor> device;  // the copies (issued or ready), one per entry
    bool on_device = false;          // the slots hold the device copies
    std::shared_ptr<void> ready;     // CUDA: the side stream's event after the copies (null: none pending)
  };
  void issue(Unit& u);   // the copies of u, on the side stream (CUDA) or now (CPU)
  void finish(Unit& u);  // the compute stream waits for them; the slots take the device copies
  void release(Unit& u);

  LlamaModel& model_;
  at::Device device_;
  std::optional<c10::Stream> side_;  // CUDA: the copies' stream (one of the pool's, taken at construction)
  std::vector<Unit> units_;
  int64_t block_bytes_ = 0;
  int64_t fetches_ = 0;
};

}  // namespace qt
