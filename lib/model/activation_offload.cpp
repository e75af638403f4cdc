#include "lib/model/activation_offload.h"

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <optional>
#include <string>

#include "lib/model/pass.h"

namespace qt {
namespace {

// Pinned host buffers for the offloaded block inputs, allocated at their own size and reused from step to step.
// Not torch's pinned allocator: it rounds every request up to a power of two, so the 8B model's 2.8 GB block
// inputs at 342k tokens would take 4 GiB each, 128 GiB for 32 blocks, the whole host. A free buffer is reused
// for a request of at least half its size; when cudaHostAlloc fails, the free buffers are released and it is
// tried once more. Reuse is ordered by the streams: a buffer returns here when its tensor dies (after the
// backward pass enqueued the copy back on the compute stream), and the next copy into it runs on the side stream
// after an event recorded on the compute stream later than that.
class PinnedPool : public std::enable_shared_from_this<PinnedPool> {
 public:
  ~PinnedPool() { release_free(); }
  // A host tensor with `like`'s sizes and strides (`like` non-overlapping and dense: a contiguous tensor or a
  // permutation of one), so that a copy between the two is one flat transfer and the tensor fetched back has the
  // layout it left with (cuDNN's attention backward reads the output in the layout its forward wrote).
  at::Tensor empty_like(const at::Tensor& like) {
    const size_t bytes = static_cast<size_t>(like.numel()) * like.element_size();
    void* ptr = take(bytes);
    // The deleter holds the pool: a tensor may outlive the model that offloaded it.
    return at::from_blob(ptr, like.sizes(), like.strides(), [pool = shared_from_this(), ptr](void*) { pool->give(ptr); },
                         at::TensorOptions().dtype(like.scalar_type()));
  }

 private:
  void* take(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = free_.lower_bound(bytes);
      if (it != free_.end() && it->first / 2 <= bytes) {
        void* ptr = it->second;
        sizes_[ptr] = it->first;
        free_bytes_ -= it->first;
        note_in_use(it->first);
        free_.erase(it);
        return ptr;
      }
    }
    void* ptr = nullptr;
    cudaError_t e = cudaHostAlloc(&ptr, std::max<size_t>(bytes, 1), cudaHostAllocDefault);
    if (e != cudaSuccess) {
      (void)cudaGetLastError();
      release_free();
      e = cudaHostAlloc(&ptr, std::max<size_t>(bytes, 1), cudaHostAllocDefault);
    }
    if (e != cudaSuccess) {
      (void)cudaGetLastError();
      throw c10::OutOfMemoryError(
          {__func__, __FILE__, static_cast<uint32_t>(__LINE__)},
          "pinned host memory: cannot allocate " + std::to_string(bytes >> 20) + " MiB for an offloaded block input (" +
              cudaGetErrorString(e) + "); the host holds one such buffer per block");
    }
    std::lock_guard<std::mutex> lock(mutex_);
    sizes_[ptr] = bytes;
    note_in_use(bytes);
    return ptr;
  }
  // Back to the free list; the smallest free buffers are released while the free list holds more than the most
  // ever in use at once (sizes that change from step to step would otherwise pile up).
  void give(void* ptr) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = sizes_.find(ptr);
    free_.emplace(it->second, ptr);
    free_bytes_ += it->second;
    in_use_bytes_ -= it->second;
    sizes_.erase(it);
    while (free_bytes_ > peak_in_use_bytes_ && !free_.empty()) {
      (void)cudaFreeHost(free_.begin()->second);
      free_bytes_ -= free_.begin()->first;
      free_.erase(free_.begin());
    }
  }
  void release_free() {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto& [bytes, ptr] : free_) (void)cudaFreeHost(ptr);
    free_.clear();
    free_bytes_ = 0;
  }
  void note_in_use(size_t bytes) {
    in_use_bytes_ += bytes;
    peak_in_use_bytes_ = std::max(peak_in_use_bytes_, in_use_bytes_);
  }
  std::mutex mutex_;
  std::multimap<size_t, void*> free_;    // bytes -> buffer
  std::map<void*, size_t> sizes_;        // buffers in use -> their bytes
  size_t free_bytes_ = 0, in_use_bytes_ = 0, peak_in_use_bytes_ = 0;
};

}  // namespace

// No record_stream: the caching allocator makes a block freed under record_stream wait for the side stream's
// event, which it sees complete only once the GPU has caught up with the CPU (a few blocks behind), so under a
// budget every block of the run-ahead was allocated anew until the device was full, then the allocator synchronized
// and released its whole cache (8B 1 x 8192 at 9 GiB, H200: 6 such retries and 70 frees a step). Instead a tensor
// the side stream reads or writes is held here and freed on the compute stream after it waits for the copy: an
// offloaded tensor once the next block's forward pass has been queued (its copy has had a block of compute to finish,
// so the wait costs nothing), a fetched one once the compute stream waited for it (take).
struct ActivationOffload::Impl {
  struct Copy {
    at::Tensor host, device;
    std::shared_ptr<at::cuda::CUDAEvent> done;
    std::optional<c10::cuda::CUDAStream> compute;  // the stream `device` was allocated on
  };
  struct Leaving {  // a tensor copied to the host: freed after `compute` (its stream) waits for `copied`
    at::Tensor src;
    std::shared_ptr<at::cuda::CUDAEvent> copied;
    c10::cuda::CUDAStream compute;
    int64_t block;  // the number of blocks noted before it (and its lag)
  };
  ModelStats* stats = nullptr;
  std::shared_ptr<PinnedPool> pool = std::make_shared<PinnedPool>();
  std::mutex mutex;
  std::map<c10::DeviceIndex, c10::cuda::CUDAStream> streams;  // the side stream of each device
  std::map<int64_t, std::vector<at::Tensor>> offloaded;       // layer -> host tensors of the last forward pass
  std::map<const void*, Copy> started;                        // host data -> its copy on the GPU
  std::vector<Leaving> leaving;
  int64_t noted = 0;

  ~Impl() {
    try {
      settle(INT64_MAX);
      for (auto& [ptr, c] : started) wait_for(c);
    } catch (...) {  // (a CUDA error: the step that hit it has reported it)
    }
  }
  // The stream each tensor was allocated on waits for the copies of the tensors offloaded before block `before`,
  // which are then freed (their memory reused in that stream's order, after the copy). Called with the mutex held.
  // Every wait is queued before any tensor is let go, so a CUDA error part way leaves the list whole.
  void settle(int64_t before) {
    for (const Leaving& l : leaving)
      if (l.block < before) l.copied->block(l.compute);
    leaving.erase(std::remove_if(leaving.begin(), leaving.end(), [&](const Leaving& l) { return l.block < before; }),
                  leaving.end());
  }
  // A fetched copy dropped without being taken: its stream waits for it before its memory is reused.
  static void wait_for(Copy& c) {
    if (c.done && c.device.defined() && c.compute) c.done->block(*c.compute);
  }

  c10::cuda::CUDAStream side(c10::DeviceIndex device) {
    std::lock_guard<std::mutex> lock(mutex);
    auto it = streams.find(device);
    if (it == streams.end()) it = streams.emplace(device, c10::cuda::getStreamFromPool(false, device)).first;
    return it->second;
  }
  at::Tensor fetch(const at::Tensor& host, const at::Device& device) {
    at::cuda::CUDAEvent copied;
    copied.record(side(device.index()));
    copied.block(c10::cuda::getCurrentCUDAStream(device.index()));
    return host.to(device, /*non_blocking=*/true);
  }
};

ActivationOffload::ActivationOffload(ModelStats* stats) : impl_(std::make_unique<Impl>()) { impl_->stats = stats; }
ActivationOffload::~ActivationOffload() = default;

at::Tensor ActivationOffload::to_host(const at::Tensor& h, int64_t lag) {
  const c10::cuda::CUDAStream side = impl_->side(h.get_device());
  const c10::cuda::CUDAStream current = c10::cuda::getCurrentCUDAStream(h.get_device());
  const at::Tensor src = h.is_non_overlapping_and_dense() ? h : h.contiguous();
  at::Tensor host = impl_->pool->empty_like(src);
  at::cuda::CUDAEvent ready;
  ready.record(current);
  ready.block(side);
  {
    c10::cuda::CUDAStreamGuard guard(side);
    host.copy_(src, /*non_blocking=*/true);
  }
  auto copied = std::make_shared<at::cuda::CUDAEvent>();
  copied->record(side);
  std::lock_guard<std::mutex> lock(impl_->mutex);
  // (src comes from the compute stream's pool: the block's forward pass made it, or contiguous() just now.)
  impl_->leaving.push_back({src, std::move(copied), current, impl_->noted + std::max<int64_t>(0, lag)});
  return host;
}

// The end of a block's forward pass: the tensors the block before it offloaded are freed behind their copies.
void ActivationOffload::note(int64_t layer, std::vector<at::Tensor> hosts) {
  std::lock_guard<std::mutex> lock(impl_->mutex);
  impl_->offloaded[layer] = std::move(hosts);
  ++impl_->noted;
  impl_->settle(impl_->noted - 1);
}

// The copies run on the side stream after the compute stream's work so far: the GPU memory comes from the compute
// stream's pool.
void ActivationOffload::start(int64_t layer, const at::Device& device) {
  std::vector<at::Tensor> hosts;
  {
    std::lock_guard<std::mutex> lock(impl_->mutex);
    // The backward pass has begun: whatever the forward pass offloaded last is freed behind its copy.
    impl_->settle(INT64_MAX);
    auto it = impl_->offloaded.find(layer);
    if (it == impl_->offloaded.end()) return;
    hosts = std::move(it->second);
    impl_->offloaded.erase(it);
  }
  const c10::cuda::CUDAStream side = impl_->side(device.index());
  const c10::cuda::CUDAStream compute = c10::cuda::getCurrentCUDAStream(device.index());
  at::cuda::CUDAEvent ready;
  ready.record(compute);
  ready.block(side);
  for (const at::Tensor& host : hosts) {
    Impl::Copy c{host, at::empty_strided(host.sizes(), host.strides(), host.options().device(device)),
                 std::make_shared<at::cuda::CUDAEvent>(), compute};
    {
      c10::cuda::CUDAStreamGuard guard(side);
      c.device.copy_(host, /*non_blocking=*/true);
    }
    // (No record_stream: the copy is used, and so freed, only after the compute stream waits for it, see take.)
    c.done->record(side);
    std::lock_guard<std::mutex> lock(impl_->mutex);
    Impl::Copy& slot = impl_->started[host.data_ptr()];
    Impl::wait_for(slot);
    slot = std::move(c);
  }
}

// A prefetched copy is used only by the backward node whose host tensor it came from; anything else fetches now.
at::Tensor ActivationOffload::take(const at::Tensor& host, const at::Device& device) {
  std::optional<Impl::Copy> c;
  {
    std::lock_guard<std::mutex> lock(impl_->mutex);
    impl_->settle(INT64_MAX);  // (the backward pass has begun, as in start)
    auto it = impl_->started.find(host.data_ptr());
    if (it != impl_->started.end() && it->second.host.is_same(host)) {
      c = std::move(it->second);
      impl_->started.erase(it);
    }
  }
  if (!c) return impl_->fetch(host, device);
  if (impl_->stats) ++impl_->stats->prefetched_offloads;
  const c10::cuda::CUDAStream current = c10::cuda::getCurrentCUDAStream(device.index());
  c->done->block(current);
  if (c->compute && *c->compute != current) c->done->block(*c->compute);  // (the pool its memory returns to)
  return c->device;
}

}  // namespace qt
