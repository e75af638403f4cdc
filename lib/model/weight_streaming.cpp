#include "lib/model/weight_streaming.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <algorithm>

#include "lib/core/error.h"
#include "lib/model/exec_plan.h"

namespace qt {
namespace {
constexpr int64_t kAlign = 512;  // a tensor's offset in a streaming buffer and in its block's host arena

int64_t aligned_bytes(const at::Tensor& t) {
  return (t.numel() * static_cast<int64_t>(t.element_size()) + kAlign - 1) / kAlign * kAlign;
}

// One block's host memory, `bytes` long: pinned at its own size on CUDA (cudaHostAlloc; torch's pinned allocator
// would round each tensor up to a power of two, up to 1.9 times its bytes for 70B's q_proj), plain on the CPU.
at::Tensor host_arena(int64_t bytes, bool cuda) {
  const at::TensorOptions bytes_on_host = at::TensorOptions().dtype(at::kByte);
  if (!cuda) return at::empty({bytes}, bytes_on_host);
  void* ptr = nullptr;
  const cudaError_t e = cudaHostAlloc(&ptr, static_cast<size_t>(std::max<int64_t>(bytes, 1)), cudaHostAllocDefault);
  if (e != cudaSuccess) {
    (void)cudaGetLastError();
    fail(ErrorKind::Device, "block weights streamed from the host: cannot pin " + std::to_string(bytes >> 20) +
                            " MiB of host memory for a block (" + cudaGetErrorString(e) +
                            "); stream fewer blocks (train.memory.streamed_blocks) or use a host with more memory");
  }
  return at::from_blob(ptr, {bytes}, [](void* q) { cudaFreeHost(q); }, bytes_on_host);
}
}  // namespace

StreamedWeights::StreamedWeights(LlamaModel& model, int64_t streamed) : model_(model), device_(model.device()) {
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
  const int64_t layers = static_cast<int64_t>(units_.size());
  if (streamed < 0 || streamed > layers) streamed = layers;
  for (size_t i = 0; i < units_.size(); ++i) {
    units_[i].streamed = streamed_block(static_cast<int64_t>(i), streamed, layers);
    int64_t bytes = 0;
    for (const ShardTensor& t : model.block_shard_tensors(i)) {
      if (t.trainable || !t.slot->defined()) continue;
      if (!units_[i].streamed) {  // resident: on the device (a loader may have put it on the host)
        if (t.slot->device() != device_) *t.slot = t.slot->to(device_);
        continue;
      }
      Entry e;
      e.slot = t.slot;
      e.offset = bytes;
      bytes += aligned_bytes(*t.slot);
      units_[i].entries.push_back(std::move(e));
    }
    if (!units_[i].streamed) continue;
    block_bytes_ = std::max(block_bytes_, bytes);
    // The block's tensors move into one host arena at the offsets they take in a device buffer (on the CPU host
    // and device are one memory: each fetch is still a copy); the loader's copies go.
    const at::Tensor arena = host_arena(bytes, device_.is_cuda());
    for (Entry& e : units_[i].entries) {
      const at::Tensor now = e.slot->contiguous();
      e.host = arena.narrow(0, e.offset, now.numel() * static_cast<int64_t>(now.element_size()))
                   .view(now.scalar_type())
                   .view(now.sizes());
      e.host.copy_(now);
    }
    release(units_[i]);
  }
  for (at::Tensor& b : buffers_) {
    b = at::empty({std::max<int64_t>(block_bytes_, 1)}, at::TensorOptions().dtype(at::kByte).device(device_));
    // Freed at the end behind the side stream's copies too.
    if (side_) c10::cuda::CUDACachingAllocator::recordStream(b.storage().data_ptr(),
                                                             c10::cuda::CUDAStream(c10::cuda::CUDAStream::UNCHECKED, *side_));
  }
  model_.block_hooks = this;
}

StreamedWeights::~StreamedWeights() {
  if (model_.block_hooks == this) model_.block_hooks = nullptr;
}

int StreamedWeights::free_buffer() {
  for (int b = 0; b < 2; ++b)
    if (holder_[b] == SIZE_MAX) return b;
  // Both held: one by a prefetch not yet used gives it up (it is issued again when its block comes).
  for (int b = 0; b < 2; ++b) {
    Unit& h = units_[holder_[b]];
    if (!h.on_device) {
      h.device.clear();
      h.ready.reset();
      h.buffer = -1;
      holder_[b] = SIZE_MAX;
      return b;
    }
  }
  fail(ErrorKind::Internal, "weight streaming: three blocks' weights wanted on the device at once");
}

void StreamedWeights::issue(Unit& u) {
  at::NoGradGuard no_grad;
  u.device.clear();
  const int b = free_buffer();
  holder_[b] = static_cast<size_t>(&u - units_.data());
  u.buffer = b;
  // Each tensor a view of its bytes in the buffer (offsets aligned, so any dtype's view holds).
  auto view = [&](const Entry& e) {
    const int64_t n = e.host.numel() * static_cast<int64_t>(e.host.element_size());
    return buffers_[b].narrow(0, e.offset, n).view(e.host.scalar_type()).view(e.host.sizes());
  };
  if (!device_.is_cuda()) {
    for (const Entry& e : u.entries) u.device.push_back(view(e).copy_(e.host));
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
  // The buffer's last holder was read by compute-stream work issued before now: the side stream waits for it.
  for (const Entry& e : u.entries) {
    at::Tensor d = view(e);
    {
      c10::cuda::CUDAStreamGuard on_side(side);
      d.copy_(e.host, /*non_blocking=*/true);
    }
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
  if (u.buffer >= 0) holder_[u.buffer] = SIZE_MAX;  // its views stay valid until the next copies into it
  u.buffer = -1;
}

void StreamedWeights::prefetch_after(size_t layer, bool backward) {
  const int64_t step = backward ? -1 : 1;
  for (int64_t next = static_cast<int64_t>(layer) + step; next >= 0 && next < static_cast<int64_t>(units_.size());
       next += step) {
    Unit& n = units_[static_cast<size_t>(next)];
    if (!n.streamed) continue;
    if (!n.on_device && n.device.empty()) issue(n);
    return;
  }
}

void StreamedWeights::before_block(size_t layer, bool backward) {
  Unit& u = units_.at(layer);
  if (u.streamed && !u.on_device) finish(u);
  // The next streamed block's copies start now, behind this block and the resident ones before that one: at most
  // two streamed blocks are on the device (this one and the next), none while a resident block runs but the next.
  prefetch_after(layer, backward);
}

void StreamedWeights::after_block(size_t layer, bool backward) {
  (void)backward;
  Unit& u = units_.at(layer);
  if (u.streamed) release(u);
}

int64_t StreamedWeights::streamed_blocks() const {
  return std::count_if(units_.begin(), units_.end(), [](const Unit& u) { return u.streamed; });
}

int64_t StreamedWeights::blocks_on_device() const {
  return std::count_if(units_.begin(), units_.end(), [](const Unit& u) { return u.streamed && u.on_device; });
}

}  // namespace qt
