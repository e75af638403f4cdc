#include "lib/model/llama.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/cuda/CUDAEvent.h>
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/accumulate.h>
#include <cuda_runtime_api.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <map>
#include <mutex>
#include <tuple>

#include "lib/core/error.h"
#include "lib/kernels/attention_core.h"
#include "lib/kernels/nf4_dequant.h"
#include "lib/kernels/fused_ops.h"
#include "lib/kernels/varlen_attention.h"
#include "lib/model/rope.h"

namespace qt {

namespace {

// The NF4 base matmul as an autograd function: saves nothing but a pointer to the (model-owned, frozen)
// Nf4Weight, dequantizes into a scratch buffer in forward and again in backward.
at::Tensor nf4_linear_backward(torch::autograd::AutogradContext* ctx, const at::Tensor& grad) {
  const auto* w = reinterpret_cast<const Nf4Weight*>(ctx->saved_data["w"].toInt());
  auto dtype = static_cast<c10::ScalarType>(ctx->saved_data["dtype"].toInt());
  at::Tensor W = w->dequantize(dtype);
  return at::matmul(grad.to(dtype), W);
}

struct Nf4LinearFn : public torch::autograd::Function<Nf4LinearFn> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, int64_t weight_ptr) {
    const auto* w = reinterpret_cast<const Nf4Weight*>(weight_ptr);
    ctx->saved_data["w"] = weight_ptr;
    ctx->saved_data["dtype"] = static_cast<int64_t>(x.scalar_type());
    at::Tensor W = w->dequantize(x.scalar_type());
    return at::matmul(x, W.t());
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    return {nf4_linear_backward(ctx, grads[0]), at::Tensor()};
  }
};

// The same for DoRA, which also needs the row norms of W + scale B A: taken from the W just dequantized for the
// matmul, so that W is dequantized once in forward (and once in backward) as for plain LoRA, and never kept.
// A and B come in detached; the norm output is not differentiable (DoRA section 4.3, PEFT's detach()).
struct Nf4DoraFn : public torch::autograd::Function<Nf4DoraFn> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                                                int64_t weight_ptr, const at::Tensor& A, const at::Tensor& B,
                                                double scale) {
    const auto* w = reinterpret_cast<const Nf4Weight*>(weight_ptr);
    ctx->saved_data["w"] = weight_ptr;
    ctx->saved_data["dtype"] = static_cast<int64_t>(x.scalar_type());
    at::Tensor W = w->dequantize(x.scalar_type());
    at::Tensor y = at::matmul(x, W.t());
    at::Tensor norm = dora_weight_norm(W, A, B, scale);
    ctx->mark_non_differentiable({norm});
    return {y, norm};
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    return {nf4_linear_backward(ctx, grads[0]), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// Activation offload: a checkpointed block input goes to pinned host memory on a side stream (overlapped with
// the next blocks' compute); the caching allocator is told that the side stream still reads the GPU copy, so its
// memory is reused only after the copy. The backward pass waits for the side stream and copies it back.
c10::cuda::CUDAStream offload_stream(c10::DeviceIndex device) {
  static std::mutex mutex;
  static std::map<c10::DeviceIndex, c10::cuda::CUDAStream> streams;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = streams.find(device);
  if (it == streams.end()) it = streams.emplace(device, c10::cuda::getStreamFromPool(false, device)).first;
  return it->second;
}

// Pinned host buffers for the offloaded block inputs, allocated at their own size and reused from step to step.
// Not torch's pinned allocator: it rounds every request up to a power of two, so the 8B model's 2.8 GB block
// inputs at 342k tokens would take 4 GiB each, 128 GiB for 32 blocks, the whole host. A free buffer is reused
// for a request of at least half its size; when cudaHostAlloc fails, the free buffers are released and it is
// tried once more. Reuse is ordered by the streams: a buffer returns here when its tensor dies (after the
// backward pass enqueued the copy back on the compute stream), and the next copy into it runs on the side stream
// after an event recorded on the compute stream later than that.
class PinnedPool {
 public:
  static PinnedPool& instance() {
    static PinnedPool* pool = new PinnedPool();  // never destroyed: tensors may outlive static destruction
    return *pool;
  }
  // A host tensor with `like`'s sizes and strides (`like` non-overlapping and dense: a contiguous tensor or a
  // permutation of one), so that a copy between the two is one flat transfer and the tensor fetched back has the
  // layout it left with (cuDNN's attention backward reads the output in the layout its forward wrote).
  at::Tensor empty_like(const at::Tensor& like) {
    const size_t bytes = static_cast<size_t>(like.numel()) * like.element_size();
    void* ptr = take(bytes);
    return at::from_blob(ptr, like.sizes(), like.strides(), [this, ptr](void*) { give(ptr); },
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

at::Tensor offload_to_host(const at::Tensor& h) {
  const c10::cuda::CUDAStream side = offload_stream(h.get_device());
  const c10::cuda::CUDAStream current = c10::cuda::getCurrentCUDAStream(h.get_device());
  const at::Tensor src = h.is_non_overlapping_and_dense() ? h : h.contiguous();
  at::Tensor host = PinnedPool::instance().empty_like(src);
  at::cuda::CUDAEvent ready;
  ready.record(current);
  ready.block(side);
  {
    c10::cuda::CUDAStreamGuard guard(side);
    host.copy_(src, /*non_blocking=*/true);
  }
  c10::cuda::CUDACachingAllocator::recordStream(src.storage().data_ptr(), side);
  return host;
}

at::Tensor fetch_from_host(const at::Tensor& host, const at::Device& device) {
  at::cuda::CUDAEvent copied;
  copied.record(offload_stream(device.index()));
  copied.block(c10::cuda::getCurrentCUDAStream(device.index()));
  return host.to(device, /*non_blocking=*/true);
}

}  // namespace

// Block inputs (and kept attention outputs) offloaded in the forward pass, by layer; in the backward pass the one
// that the next block to go back through will need is copied to the GPU on the side stream while this block's
// backward runs, so the compute stream does not wait for PCIe (64 MiB a block at 8k tokens, 256 MiB at 32k). A
// prefetched copy is used only by the backward node whose host tensor it came from; anything else fetches as before.
struct LlamaModel::OffloadPrefetch {
  struct Copy {
    at::Tensor host, device;
    std::shared_ptr<at::cuda::CUDAEvent> done;
  };
  std::mutex mutex;
  std::map<int64_t, std::vector<at::Tensor>> offloaded;  // layer -> host tensors of the last forward pass
  std::map<const void*, Copy> started;                  // host data -> its copy on the GPU
  int64_t hits = 0;

  void note(int64_t layer, std::vector<at::Tensor> hosts) {
    std::lock_guard<std::mutex> lock(mutex);
    offloaded[layer] = std::move(hosts);
  }
  // Starts the copies of `layer`'s host tensors to `device` on the side stream (after the compute stream's work
  // so far: the GPU memory comes from the compute stream's pool).
  void start(int64_t layer, const at::Device& device) {
    std::vector<at::Tensor> hosts;
    {
      std::lock_guard<std::mutex> lock(mutex);
      auto it = offloaded.find(layer);
      if (it == offloaded.end()) return;
      hosts = std::move(it->second);
      offloaded.erase(it);
    }
    const c10::cuda::CUDAStream side = offload_stream(device.index());
    at::cuda::CUDAEvent ready;
    ready.record(c10::cuda::getCurrentCUDAStream(device.index()));
    ready.block(side);
    for (const at::Tensor& host : hosts) {
      Copy c{host, at::empty_strided(host.sizes(), host.strides(), host.options().device(device)),
             std::make_shared<at::cuda::CUDAEvent>()};
      {
        c10::cuda::CUDAStreamGuard guard(side);
        c.device.copy_(host, /*non_blocking=*/true);
      }
      c10::cuda::CUDACachingAllocator::recordStream(c.device.storage().data_ptr(), side);
      c.done->record(side);
      std::lock_guard<std::mutex> lock(mutex);
      started[host.data_ptr()] = std::move(c);
    }
  }
  // `host` on the GPU: its prefetched copy once the copy is done (for the compute stream), else a fetch now.
  at::Tensor take(const at::Tensor& host, const at::Device& device) {
    std::optional<Copy> c;
    {
      std::lock_guard<std::mutex> lock(mutex);
      auto it = started.find(host.data_ptr());
      if (it != started.end() && it->second.host.is_same(host)) {
        c = std::move(it->second);
        started.erase(it);
        ++hits;
      }
    }
    if (!c) return fetch_from_host(host, device);
    c->done->block(c10::cuda::getCurrentCUDAStream(device.index()));
    return c->device;
  }
};

namespace {

// LlamaModel::keep_dequantized: the 16-bit copies the LoRA nodes make are kept while they can be reused.
// g_keep_dequantized is set while a checkpointed block recomputes its forward pass for the backward pass that
// follows at once: the nodes keep the weights they dequantize there for their backward instead of dequantizing
// again (one dequantization less per linear and step; the block's 16-bit weights live until its backward has
// used them). g_cache_factors is set for every forward pass of such a model: the compute-dtype LoRA factors are
// made once per version of the fp32 masters (LoraFactorCache) instead of in every pass (0.12 GiB for the 8B shape).
thread_local bool g_keep_dequantized = false;
thread_local bool g_cache_factors = false;
struct KeepDequantizedScope {
  KeepDequantizedScope(bool weights, bool factors) : weights_(g_keep_dequantized), factors_(g_cache_factors) {
    g_keep_dequantized = weights;
    g_cache_factors = factors;
  }
  ~KeepDequantizedScope() {
    g_keep_dequantized = weights_;
    g_cache_factors = factors_;
  }
  KeepDequantizedScope(const KeepDequantizedScope&) = delete;
  KeepDequantizedScope& operator=(const KeepDequantizedScope&) = delete;

 private:
  bool weights_, factors_;
};

// g_output_unused is set while a checkpointed block recomputes its forward pass
// for its backward pass. That pass runs only to rebuild the graph and the tensors its backward saves; the block's
// output value is never read (the backward takes the incoming gradient, not the output). So the last linear
// (down_proj with a plain LoRA adapter) computes only what its backward saves, not its output (no dequantization,
// no base GEMM: 2 x tokens x hidden x intermediate FLOPs a block), and the chunked MLP, which recomputes its chunks
// in its own backward anyway, computes nothing there. The chunked MLP's own recomputation of each chunk does not
// read its output either: down_proj's is skipped there too. torch.utils.checkpoint's non-reentrant form gets the
// same by stopping the recomputation early.
thread_local bool g_output_unused = false;
std::atomic<int64_t> g_outputs_skipped{0};
std::atomic<int64_t> g_qkv_replays{0};
std::atomic<int64_t> g_residual_replays{0};

// `value` in place of `graph`'s value: the gradient goes to graph as it is. For a recomputation that builds a
// tensor's graph for the backward pass but takes its value from the forward pass (keep_residual).
struct KeepValueFn : public torch::autograd::Function<KeepValueFn> {
  static at::Tensor forward(torch::autograd::AutogradContext*, const at::Tensor& graph, const at::Tensor& value) {
    (void)graph;
    return value;
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext*,
                                                 torch::autograd::variable_list grads) {
    return {grads[0], at::Tensor()};
  }
};
// The tensors keep_qkv and keep_residual keep in a stash, with the keys BlockCheckpointFn saves them under.
std::array<std::pair<const char*, at::Tensor*>, 4> kept_extras(AttentionStash& s) {
  return {{{"attn_q", &s.q}, {"attn_k", &s.k}, {"attn_v", &s.v}, {"attn_residual", &s.residual}}};
}

struct OutputUnusedScope {
  explicit OutputUnusedScope(bool on) : before_(g_output_unused) { g_output_unused = on; }
  ~OutputUnusedScope() { g_output_unused = before_; }
  OutputUnusedScope(const OutputUnusedScope&) = delete;
  OutputUnusedScope& operator=(const OutputUnusedScope&) = delete;

 private:
  bool before_;
};

// Per-block activation checkpointing (Chen et al., 2016, "Training Deep Nets with Sublinear Memory Cost"), the
// reentrant form: forward runs the block without recording; backward re-runs it with recording on the saved
// input and back-propagates through that, which also accumulates the gradients of the block's LoRA weights.
// RNG state (LoRA dropout) is saved and restored so that the recomputation draws the same masks.
struct BlockCheckpointFn : public torch::autograd::Function<BlockCheckpointFn> {
  // cos, sin and the mask carry no gradient: they travel in saved_data, not as inputs (the mask may be undefined).
  // aux: cos, sin, the dense mask, cu_seqlens (either mask may be undefined); ints: max_seqlen, window.
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& h, int64_t model_ptr,
                            int64_t layer, const std::vector<at::Tensor>& aux, int64_t max_seqlen, int64_t window) {
    const auto* model = reinterpret_cast<const LlamaModel*>(model_ptr);
    ctx->saved_data["model"] = model_ptr;
    ctx->saved_data["layer"] = layer;
    ctx->saved_data["cpu_rng"] = at::detail::getDefaultCPUGenerator().get_state();
    if (h.is_cuda()) ctx->saved_data["cuda_rng"] = at::cuda::detail::getDefaultCUDAGenerator(h.get_device()).get_state();
    if (model->plan.offload && h.is_cuda()) {
      ctx->saved_data["host"] = offload_to_host(h);
    } else {
      ctx->save_for_backward({h});
    }
    ctx->saved_data["cos"] = aux[0];
    ctx->saved_data["sin"] = aux[1];
    if (aux[2].defined()) ctx->saved_data["mask"] = aux[2];
    if (aux[3].defined()) ctx->saved_data["cu_seqlens"] = aux[3];
    ctx->saved_data["max_seqlen"] = max_seqlen;
    ctx->saved_data["window"] = window;
    // keep_attention: the attention output and log-sum-exp of this pass are kept (the output offloaded with the
    // block input) and replayed in the recomputation.
    AttentionStash stash;
    stash.keep_qkv = model->plan.keeps(KeepLevel::Qkv);
    stash.keep_residual = model->plan.keeps(KeepLevel::Residual);
    std::optional<StashScope> scope;
    if (model->plan.keeps(KeepLevel::Attention)) scope.emplace(&stash);
    at::Tensor out = model->block_forward(static_cast<size_t>(layer), h, aux[0], aux[1],
                                          AttentionMask{aux[2], aux[3], max_seqlen, window});
    scope.reset();
    // The offloaded tensors, fetched back together a block ahead in the backward pass.
    const bool host = ctx->saved_data.count("host") > 0;
    std::vector<at::Tensor> hosts;
    if (host) hosts.push_back(ctx->saved_data["host"].toTensor());
    auto keep = [&](const std::string& key, const at::Tensor& t) {
      if (!host) {
        ctx->saved_data[key] = t;
        return;
      }
      hosts.push_back(offload_to_host(t));
      ctx->saved_data[key + "_host"] = hosts.back();
    };
    if (stash.out.defined()) {
      keep("attn_out", stash.out);
      ctx->saved_data["attn_lse"] = stash.lse;
      ctx->saved_data["attn_seed"] = stash.seed;
      ctx->saved_data["attn_offset"] = stash.offset;
      ctx->saved_data["attn_cum_q"] = stash.cum_q;
      ctx->saved_data["attn_cum_k"] = stash.cum_k;
      // keep_qkv, keep_residual: kept (offloaded) the same way.
      for (auto [key, t] : kept_extras(stash))
        if (t->defined()) keep(key, *t);
    }
    if (host) model->offload_prefetch->note(layer, std::move(hosts));
    return out;
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto* model = reinterpret_cast<const LlamaModel*>(ctx->saved_data["model"].toInt());
    const auto layer = static_cast<size_t>(ctx->saved_data["layer"].toInt());
    if (model->block_hooks) model->block_hooks->before_block(layer, /*backward=*/true);
    at::Tensor x;
    LlamaModel::OffloadPrefetch& prefetch = *model->offload_prefetch;
    if (ctx->saved_data.count("host")) {
      x = prefetch.take(ctx->saved_data["host"].toTensor(), grads[0].device()).requires_grad_(true);
      // The next block back (the layer before this one) copies its input in while this block recomputes.
      if (layer > 0) prefetch.start(static_cast<int64_t>(layer) - 1, grads[0].device());
    } else {
      x = ctx->get_saved_variables()[0].detach().requires_grad_(true);
    }
    at::Tensor out;
    {
      auto cpu_gen = at::detail::getDefaultCPUGenerator();
      at::Tensor cpu_now = cpu_gen.get_state();
      cpu_gen.set_state(ctx->saved_data["cpu_rng"].toTensor());
      std::optional<at::Generator> cuda_gen;
      at::Tensor cuda_now;
      if (x.is_cuda()) {
        cuda_gen = at::cuda::detail::getDefaultCUDAGenerator(x.get_device());
        cuda_now = cuda_gen->get_state();
        cuda_gen->set_state(ctx->saved_data["cuda_rng"].toTensor());
      }
      at::AutoGradMode enable(true);
      auto saved_tensor = [&](const char* key) {
        return ctx->saved_data.count(key) ? ctx->saved_data[key].toTensor() : at::Tensor();
      };
      const AttentionMask mask{saved_tensor("mask"), saved_tensor("cu_seqlens"), ctx->saved_data["max_seqlen"].toInt(),
                               ctx->saved_data["window"].toInt()};
      AttentionStash replay;
      replay.replay = true;
      if (ctx->saved_data.count("attn_out_host")) replay.out = prefetch.take(ctx->saved_data["attn_out_host"].toTensor(), x.device());
      else if (ctx->saved_data.count("attn_out")) replay.out = ctx->saved_data["attn_out"].toTensor();
      std::optional<StashScope> scope;
      for (auto [key, t] : kept_extras(replay)) {
        const std::string host = std::string(key) + "_host";
        if (ctx->saved_data.count(host)) *t = prefetch.take(ctx->saved_data[host].toTensor(), x.device());
        else if (ctx->saved_data.count(key)) *t = ctx->saved_data[key].toTensor();
      }
      if (replay.out.defined()) {
        replay.lse = saved_tensor("attn_lse");
        replay.seed = saved_tensor("attn_seed");
        replay.offset = saved_tensor("attn_offset");
        replay.cum_q = saved_tensor("attn_cum_q");
        replay.cum_k = saved_tensor("attn_cum_k");
        scope.emplace(&replay);
      }
      {
        KeepDequantizedScope keep(model->plan.keep_dequantized, model->plan.keep_dequantized);
        OutputUnusedScope unused(true);
        out = model->block_forward(layer, x, ctx->saved_data["cos"].toTensor(), ctx->saved_data["sin"].toTensor(), mask);
      }
      scope.reset();
      cpu_gen.set_state(cpu_now);
      if (cuda_gen) cuda_gen->set_state(cuda_now);
    }
    torch::autograd::backward({out}, {grads[0]});
    if (model->block_hooks) model->block_hooks->after_block(layer, /*backward=*/true);
    return {x.grad(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// The post-attention half of a block, x + mlp(norm(x)), over chunks of tokens: forward keeps only x; backward
// recomputes each chunk with recording on and back-propagates it before the next, so the MLP's [tokens,
// intermediate] activations and their gradients exist for one chunk at a time (long contexts). One more MLP
// forward per step. Not used with LoRA dropout in the MLP (its masks would differ in the recomputation).
struct ChunkedMlpFn : public torch::autograd::Function<ChunkedMlpFn> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, int64_t model_ptr,
                            int64_t layer, int64_t chunk) {
    const auto* model = reinterpret_cast<const LlamaModel*>(model_ptr);
    ctx->save_for_backward({x});
    ctx->saved_data["model"] = model_ptr;
    ctx->saved_data["layer"] = layer;
    ctx->saved_data["chunk"] = chunk;
    at::Tensor x2 = x.reshape({-1, x.size(-1)});
    at::Tensor out = at::empty_like(x2);
    if (g_output_unused) {  // a checkpointed block's recomputation: the backward below recomputes each chunk
      ++g_outputs_skipped;
      return out.view(x.sizes());
    }
    for (int64_t s = 0; s < x2.size(0); s += chunk) {
      const int64_t n = std::min(chunk, x2.size(0) - s);
      out.narrow(0, s, n).copy_(model->mlp_residual(static_cast<size_t>(layer), x2.narrow(0, s, n)));
    }
    return out.view(x.sizes());
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto* model = reinterpret_cast<const LlamaModel*>(ctx->saved_data["model"].toInt());
    const auto layer = static_cast<size_t>(ctx->saved_data["layer"].toInt());
    const int64_t chunk = ctx->saved_data["chunk"].toInt();
    const at::Tensor x = ctx->get_saved_variables()[0];
    at::Tensor x2 = x.reshape({-1, x.size(-1)});
    at::Tensor dy = grads[0].reshape({-1, x.size(-1)});
    at::Tensor dx = at::empty_like(x2);
    for (int64_t s = 0; s < x2.size(0); s += chunk) {
      const int64_t n = std::min(chunk, x2.size(0) - s);
      at::Tensor xc = x2.narrow(0, s, n).detach().requires_grad_(true);
      at::Tensor yc;
      {
        at::AutoGradMode enable(true);
        OutputUnusedScope unused(true);  // yc's value is not read either: down_proj's is skipped
        yc = model->mlp_residual(layer, xc);
      }
      torch::autograd::backward({yc}, {dy.narrow(0, s, n)});
      dx.narrow(0, s, n).copy_(xc.grad());
    }
    return {dx.view(x.sizes()), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// The LoRA factors as the GEMMs take them, for a linear or a group of linears reading one input: a = the As
// stacked [sum r, in] and bd = the scaled Bs on the diagonal of [sum out, sum r], in the activations' dtype.
// They change only when the optimizer (or a load) writes A or B, so under keep_dequantized (g_cache_factors) they
// are made once per version of the fp32 masters and reused by every forward pass until then (the forward, the
// recomputation, the next micro-batch): a step of the 8B shape would otherwise run some 2,000 small cast / copy
// kernels for them. The cache holds one entry per linear (or group), checked against the masters' identity and
// version counters; without keep_dequantized the factors are made per call and nothing is held.
class LoraFactorCache {
 public:
  static LoraFactorCache& instance() {
    static LoraFactorCache* cache = new LoraFactorCache();  // never destroyed: used from autograd threads
    return *cache;
  }
  std::pair<at::Tensor, at::Tensor> get(const std::vector<const Linear*>& ls, at::TensorList ab, at::ScalarType dt) {
    if (!g_cache_factors) return make(ls, ab, dt);
    std::vector<const void*> key;
    for (const Linear* l : ls) key.push_back(l);
    std::lock_guard<std::mutex> lock(mutex_);
    Entry& e = entries_[key];
    if (!fresh(e, ls, ab, dt)) {
      e.a = at::Tensor();  // the old factors go before the new ones are made
      e.b = at::Tensor();
      std::tie(e.a, e.b) = make(ls, ab, dt);
      e.dtype = dt;
      e.sources.clear();
      e.versions.clear();
      e.scales.clear();
      for (const Linear* l : ls) e.scales.push_back(l->lora->scale);
      for (const at::Tensor& t : ab) {
        e.sources.emplace_back(c10::weak_intrusive_ptr<c10::TensorImpl>(t.getIntrusivePtr()));
        e.versions.push_back(t._version());
      }
      ++made_;
    }
    return {e.a, e.b};
  }
  int64_t made() const { return made_.load(); }

 private:
  struct Entry {
    std::vector<c10::weak_intrusive_ptr<c10::TensorImpl>> sources;
    std::vector<int64_t> versions;
    std::vector<double> scales;
    at::ScalarType dtype = at::kFloat;
    at::Tensor a, b;
  };
  static bool fresh(const Entry& e, const std::vector<const Linear*>& ls, at::TensorList ab, at::ScalarType dt) {
    if (!e.a.defined() || e.dtype != dt || e.sources.size() != ab.size() || e.scales.size() != ls.size()) return false;
    for (size_t i = 0; i < ls.size(); ++i)
      if (e.scales[i] != ls[i]->lora->scale) return false;
    for (size_t i = 0; i < ab.size(); ++i) {
      c10::intrusive_ptr<c10::TensorImpl> alive = e.sources[i].lock();
      if (!alive || alive.get() != ab[i].unsafeGetTensorImpl() || e.versions[i] != ab[i]._version()) return false;
    }
    return true;
  }
  static std::pair<at::Tensor, at::Tensor> make(const std::vector<const Linear*>& ls, at::TensorList ab,
                                                at::ScalarType dt) {
    at::NoGradGuard no_grad;
    if (ls.size() == 1) {
      const double scale = ls[0]->lora->scale;
      return {ab[0].detach().to(dt), (scale == 1.0 ? ab[1].detach() : ab[1].detach() * scale).to(dt)};
    }
    int64_t total = 0, rank = 0;
    std::vector<at::Tensor> as;
    for (size_t i = 0; i < ls.size(); ++i) {
      total += ab[2 * i + 1].size(0);
      rank += ab[2 * i].size(0);
      as.push_back(ab[2 * i].detach());
    }
    at::Tensor a = at::cat(as, 0).to(dt);  // [sum r, in]
    at::Tensor bd = at::zeros({total, rank}, a.options());
    for (int64_t i = 0, off = 0, roff = 0; i < static_cast<int64_t>(ls.size()); ++i) {
      const at::Tensor B = ab[2 * i + 1].detach();
      const double scale = ls[i]->lora->scale;
      bd.narrow(0, off, B.size(0)).narrow(1, roff, B.size(1)).copy_(scale == 1.0 ? B : B * scale);
      off += B.size(0);
      roff += B.size(1);
    }
    return {a, bd};
  }
  std::mutex mutex_;
  std::map<std::vector<const void*>, Entry> entries_;
  std::atomic<int64_t> made_{0};
};

std::atomic<int64_t> g_concat_b_runs{0};

// A frozen base plus LoRA without dropout, y = x W^T + (x A^T)(s B)^T, as one autograd node. The LoRA sums ride
// on GEMM epilogues (addmm_ into the base product, forward and backward), so neither pass adds an elementwise
// kernel over [tokens, out] or [tokens, in]; W (NF4: dequantized into scratch) is not kept between the passes.
struct LoraLinearFn : public torch::autograd::Function<LoraLinearFn> {
  // output_unused: only what the backward saves (t); the output is left unwritten (g_output_unused).
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& A,
                            const at::Tensor& B, double scale, int64_t linear_ptr, bool output_unused) {
    const auto* l = reinterpret_cast<const Linear*>(linear_ptr);
    const auto dt = x.scalar_type();
    at::Tensor x2 = x.reshape({-1, x.size(-1)});
    const auto [a, bs] = LoraFactorCache::instance().get({l}, {A, B}, dt);
    at::Tensor t = at::mm(x2, a.t());  // [N, r]
    at::Tensor W, y;
    if (output_unused) {
      y = at::empty({x2.size(0), l->out_features()}, x2.options());
      ++g_outputs_skipped;
    } else {
      W = l->base_weight(dt);
      y = at::mm(x2, W.t());
      y.addmm_(t, bs.t());
    }
    ctx->save_for_backward({x2, a, bs, t, g_keep_dequantized ? W : at::Tensor()});
    ctx->saved_data["linear"] = linear_ptr;
    ctx->saved_data["scale"] = scale;
    std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
    shape.back() = y.size(1);
    return y.view(shape);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto* l = reinterpret_cast<const Linear*>(ctx->saved_data["linear"].toInt());
    const double scale = ctx->saved_data["scale"].toDouble();
    auto saved = ctx->get_saved_variables();
    const at::Tensor &x2 = saved[0], &a = saved[1], &bs = saved[2], &t = saved[3], &kept = saved[4];
    const auto dt = x2.scalar_type();
    at::Tensor dy = grads[0].reshape({-1, grads[0].size(-1)}).to(dt);
    at::Tensor g = at::mm(dy, bs);  // [N, r]
    at::Tensor dx;
    if (ctx->needs_input_grad(0)) {
      dx = at::mm(dy, kept.defined() ? kept : l->base_weight(dt));
      dx.addmm_(g, a);
    }
    at::Tensor dA = at::mm(g.t(), x2).to(at::kFloat);
    at::Tensor dB = at::mm(dy.t(), t).to(at::kFloat);
    if (scale != 1.0) dB.mul_(scale);
    std::vector<int64_t> shape(grads[0].sizes().begin(), grads[0].sizes().end());
    shape.back() = x2.size(1);
    return {dx.defined() ? dx.view(shape) : dx, dA, dB, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// The members' B gradients out of dy^T t ([sum out, sum r]): its diagonal blocks, each times its scale, fp32.
std::vector<at::Tensor> member_b_grads(const std::vector<const Linear*>& ls, const at::Tensor& dB) {
  std::vector<at::Tensor> out;
  for (int64_t i = 0, off = 0, roff = 0; i < static_cast<int64_t>(ls.size()); ++i) {
    const int64_t r = ls[i]->lora->A.size(0), n = ls[i]->out_features();
    const double scale = ls[i]->lora->scale;
    at::Tensor dBi = dB.narrow(0, off, n).narrow(1, roff, r).to(at::kFloat);
    if (scale != 1.0) dBi.mul_(scale);
    out.push_back(dBi);
    off += n;
    roff += r;
  }
  return out;
}

std::vector<const Linear*> members(const std::vector<int64_t>& ptrs) {
  std::vector<const Linear*> ls;
  for (int64_t p : ptrs) ls.push_back(reinterpret_cast<const Linear*>(p));
  return ls;
}

// Linears that read one input (q, k, v; gate, up), each an NF4 base with a plain LoRA adapter (LoraLinearFn's
// case), as one projection: the bases dequantized in one launch into one [sum out, in] weight and multiplied in
// one GEMM, every LoRA A in one GEMM (x read once), every LoRA B in one GEMM on the base GEMM's epilogue (the B
// blocks, each with its scale, on the diagonal of a [sum out, sum r] matrix). The output is the members' outputs
// side by side, [.., sum out]; its gradient comes back whole, so the input gradient is one GEMM with the LoRA
// term on its epilogue, not one per member summed by autograd. ab: A0, B0, A1, B1, ... (fp32 masters).
struct GroupLoraLinearFn : public torch::autograd::Function<GroupLoraLinearFn> {
  // The bases dequantized into [total, in], or with the LoRA B blocks `bd` in `extra` more columns (zero beyond
  // bd's): [total, in + extra] = [W | bd | 0] (concat_b).
  static at::Tensor weight(const std::vector<const Linear*>& ls, int64_t total, at::ScalarType dt,
                           const at::Tensor& bd = {}, int64_t extra = 0) {
    const int64_t in = ls[0]->in_features();
    at::Tensor W = at::empty({total, in + extra}, at::TensorOptions().dtype(dt).device(ls[0]->nf4->device()));
    std::vector<const Nf4Weight*> ws;
    std::vector<at::Tensor> outs;
    int64_t off = 0;
    for (const Linear* l : ls) {
      ws.push_back(l->nf4.get());
      outs.push_back(W.narrow(0, off, l->out_features()).narrow(1, 0, in));
      off += l->out_features();
    }
    dequantize_group_into(ws, outs);
    if (extra > 0) {
      W.narrow(1, in, bd.size(1)).copy_(bd);
      if (extra > bd.size(1)) W.narrow(1, in + bd.size(1), extra - bd.size(1)).zero_();
    }
    return W;
  }
  // concat_b: the LoRA B terms inside the base GEMM by concatenation along K, y = [x | t | 0] [W | bd | 0]^T,
  // instead of an addmm over y (which reads and writes all of y: 0.94 GB for gate/up at 8k tokens of the 8B
  // shape). Costs a copy of x into the wider input and 1-2% more GEMM FLOPs. The extra columns are bd's padded
  // to 8 (16-byte rows); on CUDA the bases' columns a multiple of the dequantization kernel's strided rows.
  static int64_t concat_columns(const at::Tensor& bd) { return (bd.size(1) + 7) / 8 * 8; }
  static bool concat_applies(const std::vector<const Linear*>& ls, const at::Tensor& x) {
    return !x.is_cuda() || ls[0]->in_features() % kernels::kNf4StridedCols == 0;
  }
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                                                at::TensorList ab, const std::vector<int64_t>& linear_ptrs,
                                                bool concat_b, bool output_unused) {
    const auto ls = members(linear_ptrs);
    const auto dt = x.scalar_type();
    const auto [a, bd] = LoraFactorCache::instance().get(ls, ab, dt);  // [sum r, in], [sum out, sum r]
    const int64_t total = bd.size(0);
    at::Tensor x2 = x.reshape({-1, x.size(-1)});
    concat_b = concat_b && !output_unused && concat_applies(ls, x);
    at::Tensor t, W, y;
    if (output_unused) {  // only what the backward saves (a recomputation whose values are kept elsewhere)
      t = at::mm(x2, a.t());
      y = at::empty({x2.size(0), total}, x2.options());
      ++g_outputs_skipped;
    } else if (concat_b) {
      const int64_t in = x2.size(1), extra = concat_columns(bd), r = bd.size(1);
      at::Tensor xc = at::empty({x2.size(0), in + extra}, x2.options());
      xc.narrow(1, 0, in).copy_(x2);
      t = xc.narrow(1, in, r);
      at::mm_out(t, x2, a.t());  // [N, sum r], in place in the wider input
      if (extra > r) xc.narrow(1, in + r, extra - r).zero_();
      W = weight(ls, total, dt, bd, extra);
      y = at::mm(xc, W.t());
      W = W.narrow(1, 0, in);
      x2 = xc.narrow(1, 0, in);  // saved below as a view of the wider input, which t keeps alive anyway
      ++g_concat_b_runs;
    } else {
      t = at::mm(x2, a.t());  // [N, sum r]
      W = weight(ls, total, dt);
      y = at::mm(x2, W.t());
      y.addmm_(t, bd.t());
    }
    ctx->save_for_backward({x2, a, bd, t, g_keep_dequantized ? W : at::Tensor()});
    ctx->saved_data["linears"] = linear_ptrs;
    std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
    shape.back() = total;
    return {y.view(shape)};
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto ls = members(ctx->saved_data["linears"].toIntVector());
    auto saved = ctx->get_saved_variables();
    const at::Tensor &x2 = saved[0], &a = saved[1], &bd = saved[2], &t = saved[3], &kept = saved[4];
    const auto dt = x2.scalar_type();
    const int64_t total = bd.size(0);
    at::Tensor dy = grads[0].reshape({-1, total}).to(dt);
    at::Tensor g = at::mm(dy, bd);  // the gradient of t, [N, sum r]
    at::Tensor dx;
    if (ctx->needs_input_grad(0)) {
      dx = at::mm(dy, kept.defined() ? kept : weight(ls, total, dt));
      dx.addmm_(g, a);
    }
    at::Tensor dA = at::mm(g.t(), x2).to(at::kFloat);  // [sum r, in]
    // [sum out, sum r]: the diagonal blocks are the members'
    const std::vector<at::Tensor> dBs = member_b_grads(ls, at::mm(dy.t(), t));
    torch::autograd::variable_list out;
    std::vector<int64_t> shape(grads[0].sizes().begin(), grads[0].sizes().end());
    shape.back() = x2.size(1);
    out.push_back(dx.defined() ? dx.view(shape) : dx);
    for (size_t i = 0, roff = 0; i < ls.size(); ++i) {
      const int64_t r = ls[i]->lora->A.size(0);
      out.push_back(dA.narrow(0, static_cast<int64_t>(roff), r));
      out.push_back(dBs[i]);
      roff += static_cast<size_t>(r);
    }
    out.emplace_back();  // linear_ptrs
    out.emplace_back();  // concat_b
    out.emplace_back();  // output_unused
    return out;
  }
};

}  // namespace

int64_t lora_factor_builds() { return LoraFactorCache::instance().made(); }

int64_t lora_b_in_gemm_runs() { return g_concat_b_runs.load(); }

int64_t recomputed_outputs_skipped() { return g_outputs_skipped.load(); }

int64_t qkv_replays() { return g_qkv_replays.load(); }

int64_t residual_replays() { return g_residual_replays.load(); }

at::Tensor nf4_linear(const at::Tensor& x, const std::shared_ptr<Nf4Weight>& w) {
  return Nf4LinearFn::apply(x, reinterpret_cast<int64_t>(w.get()));
}

std::pair<at::Tensor, at::Tensor> nf4_linear_dora_norm(const at::Tensor& x, const std::shared_ptr<Nf4Weight>& w,
                                                       const at::Tensor& A, const at::Tensor& B, double scale) {
  auto out = Nf4DoraFn::apply(x, reinterpret_cast<int64_t>(w.get()), A.detach(), B.detach(), scale);
  return {out[0], out[1]};
}

at::Tensor dora_weight_norm(const at::Tensor& W, const at::Tensor& A, const at::Tensor& B, double scale) {
  at::NoGradGuard no_grad;
  QT_CHECK(W.dim() == 2 && A.dim() == 2 && B.dim() == 2 && A.size(1) == W.size(1) && B.size(0) == W.size(0) &&
               A.size(0) == B.size(1),
           ErrorKind::Internal, "dora_weight_norm: W [out, in], A [r, in] and B [out, r] do not fit");
  const int64_t out = W.size(0), in = W.size(1);
  const at::Tensor a = A.detach().to(W.device(), at::kFloat);
  const at::Tensor b = B.detach().to(W.device(), at::kFloat);
  at::Tensor norm = at::empty({out}, at::TensorOptions().dtype(at::kFloat).device(W.device()));
  // Blocks of about 4M fp32 values (16 MiB): the sum W + scale B A exists one block at a time.
  const int64_t rows = std::max<int64_t>(1, (int64_t{1} << 22) / std::max<int64_t>(in, 1));
  for (int64_t r0 = 0; r0 < out; r0 += rows) {
    const int64_t n = std::min(rows, out - r0);
    at::Tensor sum = at::addmm(W.detach().narrow(0, r0, n).to(at::kFloat), b.narrow(0, r0, n), a, /*beta=*/1.0,
                               /*alpha=*/scale);
    norm.narrow(0, r0, n).copy_(at::linalg_vector_norm(sum, 2, at::IntArrayRef{1}));
  }
  return norm;
}

int64_t Linear::out_features() const { return quantized() ? nf4->shape.at(0) : weight.size(0); }
int64_t Linear::in_features() const { return quantized() ? nf4->shape.at(1) : weight.size(1); }

at::Tensor Linear::base_weight(c10::ScalarType dtype) const {
  return quantized() ? nf4->dequantize(dtype) : weight.to(dtype);
}

namespace {
// LoraLinearFn's case: a frozen base (NF4 or dense without gradient), a plain LoRA adapter with fp32 masters (no
// DoRA, no dropout active).
bool lora_node_applies(const Linear& l) {
  const bool frozen_base = l.quantized() || !l.weight.requires_grad();
  return l.lora && !l.lora->dora() && frozen_base && !(l.training && l.lora->dropout > 0) &&
         l.lora->A.scalar_type() == at::kFloat && l.lora->B.scalar_type() == at::kFloat;
}

// With output_unused, a linear computes what its backward saves, not its output; forward() where LoraLinearFn does
// not apply or there is a bias (then the output is computed and not read).
at::Tensor linear_maybe_unused(const Linear& l, const at::Tensor& x, bool output_unused) {
  if (!output_unused || !lora_node_applies(l) || l.bias.defined()) return l.forward(x);
  return LoraLinearFn::apply(x, l.lora->A, l.lora->B, l.lora->scale, reinterpret_cast<int64_t>(&l),
                             /*output_unused=*/true);
}

// A block's last linear: in its recomputation (g_output_unused) its output is never read.
at::Tensor last_linear(const Linear& l, const at::Tensor& x) { return linear_maybe_unused(l, x, g_output_unused); }
}  // namespace

at::Tensor Linear::forward(const at::Tensor& x) const {
  if (lora && lora->dora()) return dora_forward(x);
  if (lora_node_applies(*this)) {
    at::Tensor y = LoraLinearFn::apply(x, lora->A, lora->B, lora->scale, reinterpret_cast<int64_t>(this),
                                       /*output_unused=*/false);
    return bias.defined() ? y + bias.to(y.scalar_type()) : y;
  }
  at::Tensor y = quantized() ? nf4_linear(x, nf4) : at::linear(x, weight);
  if (bias.defined()) y = y + bias.to(y.scalar_type());
  if (lora) {
    at::Tensor h = (training && lora->dropout > 0) ? at::dropout(x, lora->dropout, /*train=*/true) : x;
    // LoRA weights stay fp32 (the optimizer's master copy); the matmuls run in the activations' dtype. The
    // scale rides on the small B and the sum on the second GEMM's epilogue (addmm: y + t B^T in one kernel),
    // so no elementwise pass over the [tokens, out] output is added.
    const auto dt = h.scalar_type();
    at::Tensor t = at::linear(h, lora->A.to(dt));  // [.., r]
    at::Tensor Bs = lora->scale == 1.0 ? lora->B.to(dt) : (lora->B * lora->scale).to(dt);
    const int64_t out = y.size(-1);
    y = at::addmm(y.reshape({-1, out}), t.reshape({-1, t.size(-1)}), Bs.t()).view(y.sizes());
  }
  return y;
}

namespace {
// LoraLinearFn's case: a frozen NF4 base, a plain LoRA adapter (fp32 masters, no DoRA, no dropout active), no bias.
bool plain_nf4_lora(const Linear& l) {
  return l.quantized() && !l.bias.defined() && l.lora && !l.lora->dora() && !(l.training && l.lora->dropout > 0) &&
         l.lora->A.scalar_type() == at::kFloat && l.lora->B.scalar_type() == at::kFloat;
}

// The group's LoRA masters (A0, B0, A1, B1, ...) and member pointers when project_group takes it, else false.
bool group_inputs(const std::vector<const Linear*>& ls, const at::Tensor& x, std::vector<at::Tensor>& ab,
                  std::vector<int64_t>& ptrs) {
  if (ls.empty() || ls.size() > static_cast<size_t>(kernels::kNf4MaxJobs)) return false;
  for (const Linear* l : ls)
    if (!plain_nf4_lora(*l) || l->in_features() != ls[0]->in_features() || l->nf4->device() != x.device()) return false;
  for (const Linear* l : ls) {
    ab.push_back(l->lora->A);
    ab.push_back(l->lora->B);
    ptrs.push_back(reinterpret_cast<int64_t>(l));
  }
  return true;
}
}  // namespace

at::Tensor project_group(const std::vector<const Linear*>& ls, const at::Tensor& x, bool concat_b, bool output_unused) {
  std::vector<at::Tensor> ab;
  std::vector<int64_t> ptrs;
  if (!group_inputs(ls, x, ab, ptrs)) return {};
  return GroupLoraLinearFn::apply(x, at::TensorList(ab), ptrs, concat_b, output_unused)[0];
}

// PEFT (peft.tuners.lora.variants.DoraLinearVariant.forward, DoraLinearLayer.forward) adds to the base result
//   (m / n - 1) * base + m / n * scale * B A h,    n = ||W + scale B A||_row (no gradient)
// where h = dropout(x) and base = h W^T when dropout is active in training, else h = x and base = x W^T (the base
// result less its bias). Without dropout that sums to m / n * (x W^T + scale B A x) + bias, computed so here; with
// it, x W^T - h W^T + m / n * (h W^T + scale B A h) + bias. As for LoRA, h W^T + scale B A h is one addmm.
at::Tensor Linear::dora_forward(const at::Tensor& x) const {
  const LoraAdapter& a = *lora;
  const bool drop = training && a.dropout > 0;
  const at::Tensor h = drop ? at::dropout(x, a.dropout, /*train=*/true) : x;
  const auto dt = x.scalar_type();
  at::Tensor base_h, norm;
  if (quantized()) {
    std::tie(base_h, norm) = nf4_linear_dora_norm(h, nf4, a.A, a.B, a.scale);
  } else {
    base_h = at::linear(h, weight);
    norm = dora_weight_norm(weight, a.A, a.B, a.scale);
  }
  const at::Tensor ratio = (a.magnitude / norm).to(dt);  // [out]; the gradient reaches m only
  const at::Tensor t = at::linear(h, a.A.to(dt));         // [.., r]
  const at::Tensor Bs = a.scale == 1.0 ? a.B.to(dt) : (a.B * a.scale).to(dt);
  const int64_t out = base_h.size(-1);
  const at::Tensor v = at::addmm(base_h.reshape({-1, out}), t.reshape({-1, t.size(-1)}), Bs.t()).view(base_h.sizes());
  at::Tensor y = ratio * v;
  if (drop) y = y + (quantized() ? nf4_linear(x, nf4) : at::linear(x, weight)) - base_h;
  if (bias.defined()) y = y + bias.to(y.scalar_type());
  return y;
}

void LlamaModel::set_training(bool training) {
  for_each_linear([&](const std::string&, Linear& l) { l.training = training; });
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  return rms_norm_fused(x, weight, eps);  // the plain-ATen reference off CUDA
}

LlamaModel::LlamaModel(LlamaConfig cfg) : config(std::move(cfg)), offload_prefetch(std::make_shared<OffloadPrefetch>()) {
  layers.resize(config.num_hidden_layers);
  inv_freq = rope_inv_freq(config.rope, config.head_dim);
}

int64_t LlamaModel::prefetched_offloads() const {
  std::lock_guard<std::mutex> lock(offload_prefetch->mutex);
  return offload_prefetch->hits;
}

// The final norm's weight: embed_tokens and lm_head may live on the host (to_host).
at::Device LlamaModel::device() const { return norm.device(); }
c10::ScalarType LlamaModel::dtype() const { return norm.scalar_type(); }

bool LlamaModel::embeddings_on_host() const { return embed_tokens.device() != device(); }
bool LlamaModel::lm_head_on_host() const { return lm_head.device() != device(); }

void LlamaModel::to_host(bool embeddings, bool head) {
  const bool tied = config.tie_word_embeddings || lm_head.is_same(embed_tokens);
  QT_CHECK(!tied || embeddings == head, ErrorKind::Internal,
           "to_host: tied embeddings are one tensor, on the host in both roles or in neither");
  QT_CHECK((!embeddings || !embed_tokens_trainable.defined()) && (!head || !lm_head_trainable.defined()),
           ErrorKind::Internal, "to_host: only frozen tensors live on the host (modules_to_save trains them)");
  if (!device().is_cuda()) return;
  if (embeddings && !embeddings_on_host()) embed_tokens = embed_tokens.to(at::kCPU).pin_memory();
  if (head && !lm_head_on_host()) lm_head = tied ? embed_tokens : lm_head.to(at::kCPU).pin_memory();
}

namespace {
at::Tensor compute_weight(const at::Tensor& frozen, const at::Tensor& trainable) {
  if (!trainable.defined()) return frozen;
  at::Tensor w = trainable.to(frozen.scalar_type());
  return at::GradMode::is_enabled() ? w : w.detach();
}
}  // namespace

at::Tensor LlamaModel::embed_weight() const { return compute_weight(embed_tokens, embed_tokens_trainable); }
at::Tensor LlamaModel::lm_head_weight() const { return compute_weight(lm_head, lm_head_trainable); }

at::Tensor LlamaModel::embed(const at::Tensor& input_ids) const {
  if (!embeddings_on_host()) return at::embedding(embed_weight(), input_ids.to(device()));
  // The rows gathered on the host and only they shipped, from pinned memory without waiting (the caching host
  // allocator keeps the staging block until the copy is done): [tokens, H] over PCIe instead of [V, H] on the GPU.
  at::Tensor rows = at::embedding(embed_tokens, input_ids.to(at::kCPU)).pin_memory();
  return rows.to(device(), /*non_blocking=*/true);
}

namespace {
// Puts one SDPA backend first in torch's (process-wide) priority order for the guard's lifetime.
class SdpFirst {
 public:
  explicit SdpFirst(at::SDPBackend first) : saved_(at::globalContext().sDPPriorityOrder()) {
    std::vector<int64_t> order{static_cast<int64_t>(first)};
    for (at::SDPBackend b : saved_)
      if (b != first) order.push_back(static_cast<int64_t>(b));
    at::globalContext().setSDPPriorityOrder(order);
  }
  ~SdpFirst() {
    std::vector<int64_t> order;
    for (at::SDPBackend b : saved_) order.push_back(static_cast<int64_t>(b));
    at::globalContext().setSDPPriorityOrder(order);
  }
  SdpFirst(const SdpFirst&) = delete;
  SdpFirst& operator=(const SdpFirst&) = delete;

 private:
  std::array<at::SDPBackend, at::num_sdp_backends> saved_;
};
}  // namespace

bool LlamaModel::cudnn_admits(int64_t batch, int64_t seq) const {
  std::lock_guard<std::mutex> lock(cudnn_shapes->mutex);
  auto& admitted = cudnn_shapes->admitted;
  const auto shape = std::make_pair(batch, seq);
  if (admitted.count(shape)) return true;
  if (admitted.size() >= kCudnnShapes) return false;
  admitted.insert(shape);
  return true;
}

int64_t LlamaModel::dense_attention_backend(int64_t seq, at::Device device, c10::ScalarType dtype) const {
  const int64_t hd = config.head_dim, Hq = config.num_attention_heads, Hkv = config.num_key_value_heads;
  auto opts = at::TensorOptions().dtype(dtype).device(device);
  // The layout attention() passes: [B, S, heads, D] transposed to [B, heads, S, D].
  at::Tensor q = at::empty({1, seq, Hq, hd}, opts).transpose(1, 2);
  at::Tensor k = at::empty({1, seq, Hkv, hd}, opts).transpose(1, 2);
  std::optional<SdpFirst> first;
  if (plan.attention == AttentionKernel::Cudnn && device.is_cuda()) first.emplace(at::SDPBackend::cudnn_attention);
  return at::_fused_sdp_choice(q, k, k, std::nullopt, 0.0, /*is_causal=*/true, std::nullopt, /*enable_gqa=*/Hkv != Hq);
}

at::Tensor LlamaModel::attention(const LlamaBlock& b, const at::Tensor& x, const at::Tensor& cos,
                                 const at::Tensor& sin, const AttentionMask& mask) const {
  const int64_t B = x.size(0), S = x.size(1), hd = config.head_dim;
  const int64_t Hq = config.num_attention_heads, Hkv = config.num_key_value_heads;
  // [B, S, heads, hd] throughout: the projections' layout, which flash attention takes as it is.
  at::Tensor q, k, v;
  AttentionStash* stash = current_attention_stash();  // set by a checkpointed block under keep_attention
  bool fused_qkv = false;
  // Qwen3's q / k norms sit between the projection and RoPE: the fused projection + RoPE paths do not take them.
  const bool qk_norm = b.q_norm.defined();
  if (stash && stash->replay && stash->q.defined() && !qk_norm) {
    // keep_qkv's recomputation: the projection's node for the backward pass without its output, the rotated q,
    // k, v of the forward pass in place of RoPE's.
    if (at::Tensor qkv = project_group({&b.q_proj, &b.k_proj, &b.v_proj}, x, false, /*output_unused=*/true);
        qkv.defined()) {
      auto kept = rope_qkv_replay(qkv, cos, sin, Hq, Hkv, stash->q, stash->k, stash->v);
      q = kept[0], k = kept[1], v = kept[2];
      ++g_qkv_replays;
    }
  }
  if (!q.defined()) {
    if (at::Tensor qkv = !qk_norm ? project_group({&b.q_proj, &b.k_proj, &b.v_proj}, x) : at::Tensor();
        qkv.defined()) {
      auto rotated = rope_qkv(qkv, cos, sin, Hq, Hkv);
      q = rotated[0], k = rotated[1], v = rotated[2];
      fused_qkv = true;
    } else {
      q = b.q_proj.forward(x).view({B, S, Hq, hd});
      k = b.k_proj.forward(x).view({B, S, Hkv, hd});
      if (qk_norm) {  // transformers' Qwen3Attention: q_norm(q_proj(x).view(hidden_shape)), the same for k
        q = rms_norm(q, b.q_norm, config.rms_norm_eps);
        k = rms_norm(k, b.k_norm, config.rms_norm_eps);
      }
      q = rope_fused(q, cos, sin);
      k = rope_fused(k, cos, sin);
      v = b.v_proj.forward(x).view({B, S, Hkv, hd});
    }
  }
  at::Tensor o;  // [B, S, Hq, hd]
  if (mask.cu_seqlens.defined()) {
    // Packed documents through flash attention's varlen layout: the [B, S] grid flattened, no mask.
    auto flat = [&](const at::Tensor& t, int64_t heads) { return t.reshape({B * S, heads, hd}); };
    o = varlen_causal_attention(flat(q, Hq), flat(k, Hkv), flat(v, Hkv), mask.cu_seqlens, mask.max_seqlen,
                                1.0 / std::sqrt(static_cast<double>(hd)), mask.window)
            .view({B, S, Hq, hd});
  } else {
    const at::Tensor& dense = mask.dense;
    const bool cudnn = plan.attention == AttentionKernel::Cudnn && q.is_cuda() && cudnn_admits(B, S);
    if (stash && !dense.defined() && causal_attention_supported(q.transpose(1, 2))) {
      if (!stash->replay && stash->keep_qkv && fused_qkv) stash->q = q, stash->k = k, stash->v = v;
      o = causal_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                           1.0 / std::sqrt(static_cast<double>(hd)), cudnn, stash)
              .transpose(1, 2);
      // keep_residual's recomputation: block_forward puts the kept residual in place of h + this output.
      return linear_maybe_unused(b.o_proj, o.reshape({B, S, config.q_size()}),
                                 stash->replay && stash->residual.defined());
    }
    std::optional<SdpFirst> first;
    if (cudnn) first.emplace(at::SDPBackend::cudnn_attention);
    o = at::scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dense.defined() ? std::optional<at::Tensor>(dense) : std::nullopt,
                                         /*dropout_p=*/0.0, /*is_causal=*/!dense.defined(), /*scale=*/std::nullopt,
                                         /*enable_gqa=*/Hkv != Hq)
            .transpose(1, 2);
  }
  return b.o_proj.forward(o.reshape({B, S, config.q_size()}));
}

at::Tensor LlamaModel::mlp(const LlamaBlock& b, const at::Tensor& x) const {
  if (at::Tensor gate_up = project_group({&b.gate_proj, &b.up_proj}, x, /*concat_b=*/true); gate_up.defined())
    return last_linear(b.down_proj, swiglu_packed(gate_up));
  return last_linear(b.down_proj, swiglu_fused(b.gate_proj.forward(x), b.up_proj.forward(x)));
}

at::Tensor LlamaModel::forward_hidden(const at::Tensor& inputs_embeds, const at::Tensor& positions) const {
  QT_CHECK(inputs_embeds.dim() == 3 && inputs_embeds.size(2) == config.hidden_size, ErrorKind::Internal,
           "forward_hidden: expected [batch, seq, hidden] embeddings");
  const int64_t B = inputs_embeds.size(0), S = inputs_embeds.size(1);
  const at::Device device = inputs_embeds.device();
  at::Tensor pos = positions.defined()
                       ? positions
                       : at::arange(S, at::TensorOptions().dtype(at::kLong).device(device)).expand({B, S});
  if (!config.sliding_window || S <= *config.sliding_window) return run_blocks(inputs_embeds, pos, AttentionMask{});
  // A window shorter than the rows: each row one document for flash attention's window, else a dense mask.
  AttentionMask varlen = varlen_mask(at::zeros({B, S}, at::TensorOptions().dtype(at::kInt)), device,
                                     inputs_embeds.scalar_type());
  if (varlen.cu_seqlens.defined()) return run_blocks(inputs_embeds, pos, varlen);
  return run_blocks(inputs_embeds, pos, AttentionMask{window_mask(/*mask=*/{}, S, device), {}, 0, -1});
}

AttentionMask LlamaModel::varlen_mask(const at::Tensor& doc_ids, at::Device device, c10::ScalarType dtype) const {
  at::Tensor probe = at::empty({0, 1, config.head_dim}, at::TensorOptions().dtype(dtype).device(device));
  if (!varlen_attention_uses_flash(probe)) return {};
  VarlenLayout layout = cu_seqlens_from_doc_ids(doc_ids.to(at::kInt));
  return AttentionMask{{}, layout.cu_seqlens.to(device), layout.max_seqlen,
                       config.sliding_window ? *config.sliding_window : -1};
}

at::Tensor LlamaModel::window_mask(const at::Tensor& mask, int64_t S, at::Device device) const {
  if (!config.sliding_window || S <= *config.sliding_window) return mask;
  // As transformers' sliding_window_overlay on the causal mask: key j is visible from query i iff
  // i - window < j <= i (token indices, as the cache positions are).
  const int64_t w = *config.sliding_window;
  at::Tensor causal = at::ones({S, S}, at::TensorOptions().dtype(at::kBool).device(device)).tril();
  at::Tensor window = causal.triu(-(w - 1));
  if (!mask.defined()) return window.view({1, 1, S, S});
  // Keep the diagonal that a padding row relies on (it is inside every window).
  return mask & window.view({1, 1, S, S});
}

at::Tensor LlamaModel::run_blocks(const at::Tensor& inputs_embeds, const at::Tensor& positions,
                                  const AttentionMask& mask) const {
  at::Tensor freq = inv_freq;
  if (config.rope.type == RopeType::Dynamic) {
    // transformers' dynamic_rope_update: the frequencies follow the longest position of the batch
    // (max(position_ids) + 1) once it exceeds max_position_embeddings. A fresh computation per call, as a model
    // that has seen no longer sequence before.
    const int64_t seq_len = positions.max().item<int64_t>() + 1;
    if (seq_len > config.max_position_embeddings)
      freq = rope_dynamic_inv_freq(config.rope, config.head_dim, seq_len, config.max_position_embeddings);
  }
  auto [cos, sin] = rope_cos_sin(freq, positions, inputs_embeds.scalar_type(), config.rope.attention_factor);
  at::Tensor h = inputs_embeds;
  const bool checkpoint = plan.checkpointing && at::GradMode::is_enabled();
  // The checkpoint function records a backward node only when its input requires grad; with a frozen
  // embedding it would not, and the LoRA weights inside the blocks would get no gradient.
  if (checkpoint && !h.requires_grad()) h = h.detach().requires_grad_(true);
  QT_CHECK(!block_hooks || checkpoint || !at::GradMode::is_enabled(), ErrorKind::Internal,
           "sharded blocks record for autograd only with checkpointing (their weights are freed after forward)");
  KeepDequantizedScope keep(/*weights=*/false, /*factors=*/plan.keep_dequantized);
  for (size_t i = 0; i < layers.size(); ++i) {
    if (block_hooks) block_hooks->before_block(i, /*backward=*/false);
    h = checkpoint ? BlockCheckpointFn::apply(h, reinterpret_cast<int64_t>(this), static_cast<int64_t>(i),
                                              std::vector<at::Tensor>{cos, sin, mask.dense, mask.cu_seqlens},
                                              mask.max_seqlen, mask.window)
                   : block_forward(i, h, cos, sin, mask);
    if (block_hooks) block_hooks->after_block(i, /*backward=*/false);
  }
  return rms_norm(h, norm, config.rms_norm_eps);
}

at::Tensor LlamaModel::block_forward(size_t layer, const at::Tensor& h, const at::Tensor& cos, const at::Tensor& sin,
                                     const AttentionMask& mask) const {
  const LlamaBlock& b = layers[layer];
  at::Tensor x = h + attention(b, rms_norm(h, b.input_layernorm, config.rms_norm_eps), cos, sin, mask);
  if (AttentionStash* stash = current_attention_stash(); stash && stash->out.defined()) {
    if (stash->replay && stash->residual.defined()) {
      x = KeepValueFn::apply(x, stash->residual.detach());
      ++g_residual_replays;
    } else if (!stash->replay && stash->keep_residual) {
      stash->residual = x;
    }
  }
  auto dropout = [](const Linear& l) { return l.training && l.lora && l.lora->dropout > 0; };
  if (plan.mlp_chunk_tokens > 0 && at::GradMode::is_enabled() && x.numel() / x.size(-1) > plan.mlp_chunk_tokens &&
      !dropout(b.gate_proj) && !dropout(b.up_proj) && !dropout(b.down_proj))
    return ChunkedMlpFn::apply(x, reinterpret_cast<int64_t>(this), static_cast<int64_t>(layer), plan.mlp_chunk_tokens);
  return mlp_residual(layer, x);
}

at::Tensor LlamaModel::mlp_residual(size_t layer, const at::Tensor& x) const {
  const LlamaBlock& b = layers[layer];
  return x + mlp(b, rms_norm(x, b.post_attention_layernorm, config.rms_norm_eps));
}

at::Tensor LlamaModel::forward_hidden(const at::Tensor& inputs_embeds, const Batch& batch) const {
  if (!batch.doc_ids.defined()) return forward_hidden(inputs_embeds, batch.positions);
  // One whole document in every row, no window to apply: plain causal attention, the call cuDNN's kernel takes
  // (it has no varlen path here).
  const int64_t S = inputs_embeds.size(1);
  if (plan.attention == AttentionKernel::Cudnn && inputs_embeds.is_cuda() &&
      (!config.sliding_window || S <= *config.sliding_window) && (batch.doc_ids == 0).all().item<bool>() &&
      cudnn_admits(inputs_embeds.size(0), S))
    return forward_hidden(inputs_embeds, batch.positions.to(inputs_embeds.device()));
  AttentionMask varlen = varlen_mask(batch.doc_ids, inputs_embeds.device(), inputs_embeds.scalar_type());
  if (varlen.cu_seqlens.defined())
    return run_blocks(inputs_embeds, batch.positions.to(inputs_embeds.device()), varlen);
  // Block-diagonal causal mask [B, 1, S, S]: token i sees token j <= i of its own document. Padding (doc -1)
  // sees only itself, so that no softmax row is empty (its outputs carry no target).
  at::Tensor doc = batch.doc_ids.to(inputs_embeds.device());
  at::Tensor same = doc.unsqueeze(2) == doc.unsqueeze(1);
  at::Tensor causal = at::ones({S, S}, at::TensorOptions().dtype(at::kBool).device(doc.device())).tril();
  at::Tensor eye = at::eye(S, at::TensorOptions().dtype(at::kBool).device(doc.device()));
  at::Tensor mask = ((same & causal) & (doc >= 0).unsqueeze(2)) | eye;
  return run_blocks(inputs_embeds, batch.positions.to(inputs_embeds.device()),
                    AttentionMask{window_mask(mask.unsqueeze(1), S, inputs_embeds.device()), {}, 0, -1});
}

// With lm_head on the host, each call copies it over (evaluation and generation; training's loss streams it instead).
at::Tensor LlamaModel::logits(const at::Tensor& hidden) const {
  return at::linear(hidden, lm_head_weight().to(hidden.device()));
}

std::vector<std::pair<std::string, at::Tensor*>> LlamaModel::named_tensors() {
  std::vector<std::pair<std::string, at::Tensor*>> out;
  out.emplace_back("model.embed_tokens.weight", &embed_tokens);
  for (size_t i = 0; i < layers.size(); ++i) {
    auto& b = layers[i];
    const std::string p = "model.layers." + std::to_string(i) + ".";
    out.emplace_back(p + "input_layernorm.weight", &b.input_layernorm);
    out.emplace_back(p + "post_attention_layernorm.weight", &b.post_attention_layernorm);
    if (config.qk_norm) {
      out.emplace_back(p + "self_attn.q_norm.weight", &b.q_norm);
      out.emplace_back(p + "self_attn.k_norm.weight", &b.k_norm);
    }
  }
  for_each_linear([&](const std::string& name, Linear& l) {
    if (!l.quantized()) out.emplace_back(name + ".weight", &l.weight);
    if (config.linear_has_bias(name)) out.emplace_back(name + ".bias", &l.bias);
  });
  out.emplace_back("model.norm.weight", &norm);
  if (!config.tie_word_embeddings) out.emplace_back("lm_head.weight", &lm_head);
  return out;
}

}  // namespace qt
