#include "lib/model/weight_streaming.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>

#include "lib/core/error.h"

namespace qt {

StreamedWeights::StreamedWeights(LlamaModel& model) : model_(model), device_(model.device()) {
  if (!model.plan.checkpointing || model.plan.blocks_without_checkpointing > 0)
    fail(ErrorKind::Config, "block weights streamed from the host (train.memory.weights \"host\") need every block "
                            "checkpointed (train.memory.checkpointing true, blocks_without_checkpointing 0): a "
                            "block's weights are on the GPU only while it runs or is recomputed");
  if (model.block_hooks)
    fail(ErrorKind::Config, "block weights streamed from the host (train.memory.weights \"host\") do not combine with "
                            "train.shard \"blocks\"");
  at::NoGradGuard no_grad;
  if (device_.is_cuda()) side_ = c10::cuda::getStreamFromPool(/*isHighPriority=*/false, device_.index()).unwrap();
  units_.resize(model.layers.size());
  for (size_t i = 0; i < units_.size(); ++i) {
    int64_t bytes = 0;
    for (const ShardTensor& t : model.block_shard_tensors(i)) {
      if (t.trainable || !t.slot->defined()) continue;
      Entry e;
      e.slot = t.slot;
      const at::Tensor& now = *t.slot;
      // On the CPU host and device are one memory: the tensor stays, and each fetch is a copy of it.
      if (!device_.is_cuda()) e.host = now;
      else e.host = now.is_cuda() ? now.to(at::kCPU).pin_memory() : now.is_pinned() ? now : now.pin_memory();
      bytes += e.host.numel() * static_cast<int64_t>(e.host.element_size());
      units_[i].entries.push_back(std::move(e));
    }
    block_bytes_ = std::max(block_bytes_, bytes);
    release(units_[i]);
  }
  model_.block_hooks = this;
}

StreamedWeights::~StreamedWeights() {
  if (model_.block_hooks == this) model_.block_hooks = nullptr;
}

void StreamedWeights::issue(Unit& u) {
  at::NoGradGuard no_grad;
  u.device.clear();
  if (!device_.is_cuda()) {
    for (const Entry& e : u.entries) u.device.push_back(e.host.clone());
    ++fetches_;
    return;
  }
  c10::cuda::CUDAGuard guard(device_);
  const c10::cuda::CUDAStream compute = c10::cuda::getCurrentCUDAStream(device_.index());
  const c10::cuda::CUDAStream side(c10::cuda::CUDAStream::UNCHECKED, *side_);
  // The buffers come from the compute stream's pool: the side stream starts after the compute stream's work so far
  // (memory the allocator hands out again may still be read there), and the buffers are marked as used by it.
  at::cuda::CUDAEvent before;
  before.record(compute);
  before.block(side);
  for (const Entry& e : u.entries) {
    at::Tensor d = at::empty(e.host.sizes(), e.host.options().device(device_).pinned_memory(false));
    {
      c10::cuda::CUDAStreamGuard on_side(side);
      d.copy_(e.host, /*non_blocking=*/true);
    }
    c10::cuda::CUDACachingAllocator::recordStream(d.storage().data_ptr(), side);
    u.device.push_back(std::move(d));
  }
  auto ready = std::make_shared<at::cuda::CUDAEvent>();
  ready->record(side);
  u.ready = ready;
  ++fetches_;
}

void StreamedWeights::finish(Unit& u) {
  if (u.device.empty()) issue(u);
  if (u.ready) {
    c10::cuda::CUDAGuard guard(device_);
    static_cast<at::cuda::CUDAEvent*>(u.ready.get())->block(c10::cuda::getCurrentCUDAStream(device_.index()));
    u.ready.reset();
  }
  for (size_t k = 0; k < u.entries.size(); ++k) *u.entries[k].slot = u.device[k];
  u.device.clear();
  u.on_device = true;
}

void StreamedWeights::release(Unit& u) {
  // The host copy stands in the slot between uses: whatever reads a block's tensors outside its run (an export, the
  // adapter's save) reads the same values, from the host.
  for (Entry& e : u.entries) *e.slot = e.host;
  u.on_device = false;
}

void StreamedWeights::before_block(size_t layer, bool backward) {
  Unit& u = units_.at(layer);
  if (!u.on_device) finish(u);
  const int64_t next = static_cast<int64_t>(layer) + (backward ? -1 : 1);
  if (next >= 0 && next < static_cast<int64_t>(units_.size())) {
    Unit& n = units_[static_cast<size_t>(next)];
    if (!n.on_device && n.device.empty()) issue(n);
  }
}

void StreamedWeights::after_block(size_t layer, bool backward) {
  (void)backward;
  release(units_.at(layer));
}

int64_t StreamedWeights::blocks_on_device() const {
  return std::count_if(units_.begin(), units_.end(), [](const Unit& u) { return u.on_device; });
}

}  // namespace qt
