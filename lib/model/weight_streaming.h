#pragma once
// Frozen block weights streamed from the host (plan.streamed_blocks; issue 26): the streamed decoder blocks' frozen
// tensors (NF4 codes and statistics, or dense bases; norms; biases) live in pinned host memory, and each such block's
// are copied to the GPU before it runs, on a side stream while the blocks before it compute (the next streamed
// block in the pass's order is fetched as soon as a block starts: forward, the following ones; the backward pass,
// which recomputes each checkpointed block, the preceding ones), and dropped after it. The GPU then holds the
// resident blocks and two streamed ones instead of all of them, which lets a model larger than the card train where
// compute hides the copies (70B at 1 x 8192: about 111 GB a step over PCIe against about 5.6 s of compute on an
// H200); streaming only some blocks (spread evenly: exec_plan.h's streamed_block()) gives each fetch the compute of
// several blocks to hide behind. LoRA tensors, the embeddings, the final norm and lm_head stay where they are.
// The copies land in two fixed device buffers, taken in turn (a streamed block's tensors are views into one), so
// that streaming neither allocates nor fragments the caching allocator's segments: a run at the edge of its budget
// otherwise pays for the allocator's frees and retries (measured: 12-23% slower, docs/PERFORMANCE.md).
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
  // Moves the frozen tensors of `streamed` blocks (streamed_block()'s; all of them when < 0 or >= the model's) to
  // (pinned) host memory (those already there are kept as they are), the other blocks' to the model's device, and
  // installs itself as the model's block hooks. Throws qt::Error(Config) without checkpointing of every block, or
  // when the model has block hooks already (FullyShard).
  explicit StreamedWeights(LlamaModel& model, int64_t streamed = -1);
  ~StreamedWeights() override;
  StreamedWeights(const StreamedWeights&) = delete;
  StreamedWeights& operator=(const StreamedWeights&) = delete;

  void before_block(size_t layer, bool backward) override;
  void after_block(size_t layer, bool backward) override;

  // Bytes of one streamed block's frozen tensors (the most of any), the streamed blocks, and how many of them are on
  // the device now.
  int64_t block_bytes() const { return block_bytes_; }
  int64_t streamed_blocks() const;
  int64_t blocks_on_device() const;
  // Copies made so far (each streamed block fetched once in the forward pass and once for its recomputation).
  int64_t fetches() const { return fetches_; }

 private:
  struct Entry {
    at::Tensor* slot = nullptr;
    at::Tensor host;     // a view of its block's host arena (pinned at its own size on CUDA)
    int64_t offset = 0;  // its bytes' place in a buffer
  };
  struct Unit {
    bool streamed = false;           // else resident: its tensors stay on the device, no hook work
    std::vector<Entry> entries;
    std::vector<at::Tensor> device;  // the copies (issued or ready), one per entry
    bool on_device = false;          // the slots hold the device copies
    std::shared_ptr<void> ready;     // CUDA: the side stream's event after the copies (null: none pending)
    int buffer = -1;                 // the buffer its copies are in while issued or on the device
  };
  int free_buffer();  // a buffer no block holds (a pending prefetch gives its buffer up if it must)
  void issue(Unit& u);   // the copies of u, on the side stream (CUDA) or now (CPU)
  void finish(Unit& u);  // the compute stream waits for them; the slots take the device copies
  void release(Unit& u);
  void prefetch_after(size_t layer, bool backward);  // issues the next streamed block in the pass's order

  LlamaModel& model_;
  at::Device device_;
  std::optional<c10::Stream> side_;  // CUDA: the copies' stream (one of the pool's, taken at construction)
  std::vector<Unit> units_;
  at::Tensor buffers_[2];    // uint8, the largest streamed block's bytes each
  size_t holder_[2] = {SIZE_MAX, SIZE_MAX};  // the unit in each buffer
  int64_t block_bytes_ = 0;
  int64_t fetches_ = 0;
};

}  // namespace qt
