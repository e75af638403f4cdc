#include "lib/model/generate.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/grad_mode.h>

#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <string>

#include "lib/core/error.h"
#include "lib/kernels/fused_ops.h"
#include "lib/kernels/tuned_gemm.h"
#include "lib/model/block_checkpoint.h"
#include "lib/model/projection_group.h"
#include "lib/model/rope.h"

namespace qt {

int64_t choose_next_token(const at::Tensor& logits_row, const GenerateOptions& o, at::Generator& gen) {
  at::Tensor logits = logits_row.detach().to(at::kCPU, at::kFloat).reshape({-1});
  // (Greedy decoding of NaN logits printed token 0 every step with exit 0; sampling ended in an internal error.)
  if (!at::isfinite(logits).all().item<bool>())
    fail(ErrorKind::Numeric, "generate: the model's next-token logits hold NaN or infinite values (a broken model "
                             "directory or adapter: its weights, or the NF4 statistics of a pre-quantized one)");
  if (o.temperature == 0) return logits.argmax().item<int64_t>();
  const at::Tensor scaled = logits / o.temperature;
  // A temperature so small (1e-300) that the logits overflow float (softmax: NaN, multinomial: an internal error) is
  // the limit of sampling as the temperature goes to 0: greedy.
  if (!at::isfinite(scaled).all().item<bool>()) return logits.argmax().item<int64_t>();
  at::Tensor probs = at::softmax(scaled, 0);
  if (o.top_p < 1.0) {
    // transformers' TopPLogitsWarper: sort ascending, drop the tokens whose cumulative probability is
    // <= 1 - top_p, always keep the most likely one.
    auto [sorted, order] = probs.sort(/*dim=*/0, /*descending=*/false);
    at::Tensor cum = sorted.cumsum(0);
    at::Tensor drop = cum <= (1.0 - o.top_p);
    drop.index_put_({-1}, false);
    at::Tensor remove = at::zeros_like(drop).scatter_(0, order, drop);
    probs = probs.masked_fill(remove, 0.0);
    probs = probs / probs.sum();
  }
  return at::multinomial(probs, 1, /*replacement=*/false, gen).item<int64_t>();
}

namespace {

// The checks every entry point makes on its options and prompt.
void check_request(const LlamaModel& model, const std::vector<int32_t>& prompt, const GenerateOptions& o) {
  if (prompt.empty()) fail(ErrorKind::Usage, "generate: the prompt encodes to no tokens");
  if (!(o.temperature >= 0)) fail(ErrorKind::Usage, "generate: --temperature must be >= 0");
  if (!(o.top_p > 0 && o.top_p <= 1)) fail(ErrorKind::Usage, "generate: --top-p must be in (0, 1]");
  if (o.max_new_tokens < 0) fail(ErrorKind::Usage, "generate: --max-new-tokens must be >= 0");
  if (o.max_seq_len > 0 && o.max_new_tokens > 0 && static_cast<int64_t>(prompt.size()) >= o.max_seq_len)
    fail(ErrorKind::Usage, "generate: the prompt is " + std::to_string(prompt.size()) + " tokens, and the model's context " +
                               "(config.json's max_position_embeddings) is " + std::to_string(o.max_seq_len) +
                               ": no token can follow it; shorten the prompt");
  for (int32_t id : prompt)
    if (id < 0 || id >= model.config.vocab_size)
      fail(ErrorKind::Model, "generate: the prompt holds token id " + std::to_string(id) + " and the model has " +
                                 std::to_string(model.config.vocab_size) + " embeddings (config.json's vocab_size): " +
                                 "the tokenizer and the model do not belong together");
}

// Greedy decoding's choice for every row of `logits` [B, V] where it lies (argmax, the lowest id on ties, as
// choose_next_token), only the ids copied to the host; empty when sampling. Non-finite logits: choose_next_token's
// error.
std::vector<int64_t> greedy_tokens(const at::Tensor& logits, const GenerateOptions& o) {
  if (o.temperature != 0) return {};
  if (!at::isfinite(logits).all().item<bool>())
    fail(ErrorKind::Numeric, "generate: the model's next-token logits hold NaN or infinite values (a broken model "
                             "directory or adapter: its weights, or the NF4 statistics of a pre-quantized one)");
  const at::Tensor ids = logits.argmax(-1).to(at::kCPU, at::kLong).contiguous();
  return std::vector<int64_t>(ids.data_ptr<int64_t>(), ids.data_ptr<int64_t>() + ids.numel());
}

// Columns a cache needs after prompts of at least `shortest` tokens: the new tokens, at most up to the context
// (max_seq_len), at least one.
int64_t new_columns(const GenerateOptions& o, int64_t shortest) {
  int64_t n = o.max_new_tokens;
  if (o.max_seq_len > 0) n = std::min<int64_t>(n, o.max_seq_len - shortest);
  return std::max<int64_t>(n, 1);
}

bool cache_enabled() {
  const char* v = std::getenv("QT_GENERATE_CACHE");
  return !(v && std::strcmp(v, "0") == 0);
}

// One decoder block over the new columns: as block_forward computes it, with the keys and values of the earlier
// columns from the cache and `mask` [B, 1, S, length + S] saying which columns each new token sees. `column`
// defined (Decoder's fixed shapes, S = 1): the new keys and values go to the cache column it holds ([1] long on the
// device) and attention reads the cache's whole capacity, `mask` [B, 1, 1, capacity].
at::Tensor cached_block(const LlamaModel& m, size_t layer, const at::Tensor& h, const at::Tensor& cos,
                        const at::Tensor& sin, KvCache& c, const at::Tensor& mask, const Pass& pass,
                        const at::Tensor& column = {}) {
  const LlamaConfig& cfg = m.config;
  const LlamaBlock& b = m.layers[layer];
  const int64_t B = h.size(0), S = h.size(1), hd = cfg.head_dim;
  const int64_t Hq = cfg.num_attention_heads, Hkv = cfg.num_key_value_heads;
  const at::Tensor x = rms_norm_fused(h, b.input_layernorm, cfg.rms_norm_eps);
  at::Tensor q, k, v;
  // q, k and v as one projection and RoPE in one launch where project_group takes them, as attention() runs them
  // (one dequantization and one GEMM instead of three each: a decoding step is bound by its launches).
  if (const at::Tensor qkv = project_group({&b.q_proj, &b.k_proj, &b.v_proj}, x, pass); qkv.defined()) {
    const auto rotated = b.q_norm.defined()
                             ? rope_qkv_norm(qkv, cos, sin, Hq, Hkv, QkNorm{b.q_norm, b.k_norm, cfg.rms_norm_eps})
                             : rope_qkv(qkv, cos, sin, Hq, Hkv);
    q = rotated[0], k = rotated[1], v = rotated[2];
  } else {
    q = b.q_proj.forward(x, pass).view({B, S, Hq, hd});
    k = b.k_proj.forward(x, pass).view({B, S, Hkv, hd});
    v = b.v_proj.forward(x, pass).view({B, S, Hkv, hd});
    if (b.q_norm.defined()) {  // Qwen3's per-head norms before RoPE
      q = rms_norm(q, b.q_norm, cfg.rms_norm_eps);
      k = rms_norm(k, b.k_norm, cfg.rms_norm_eps);
    }
    q = rope_fused(q, cos, sin);
    k = rope_fused(k, cos, sin);
  }
  if (column.defined()) {
    c.k[layer].index_copy_(1, column, k);
    c.v[layer].index_copy_(1, column, v);
  } else {
    c.k[layer].narrow(1, c.length, S).copy_(k);
    c.v[layer].narrow(1, c.length, S).copy_(v);
  }
  // [B, heads, columns, hd]. Several new tokens (a prompt): the kv heads repeated for the query heads (as
  // transformers' repeat_kv), so that SDPA takes a fused kernel with the mask rather than the math path's
  // [B, heads, S, columns] scores; one new token a row: the heads grouped as they are, SDPA's enable_gqa.
  const int64_t T = column.defined() ? c.capacity : c.length + S;
  at::Tensor keys = c.k[layer].narrow(1, 0, T).transpose(1, 2);
  at::Tensor values = c.v[layer].narrow(1, 0, T).transpose(1, 2);
  const bool grouped = Hkv != Hq && S == 1;
  if (Hkv != Hq && !grouped) {
    keys = keys.repeat_interleave(Hq / Hkv, 1);
    values = values.repeat_interleave(Hq / Hkv, 1);
  }
  const at::Tensor o = at::scaled_dot_product_attention(q.transpose(1, 2), keys, values, mask, /*dropout_p=*/0.0,
                                                        /*is_causal=*/false, 1.0 / std::sqrt(static_cast<double>(hd)),
                                                        /*enable_gqa=*/grouped);
  const at::Tensor attn = b.o_proj.forward(o.transpose(1, 2).reshape({B, S, cfg.q_size()}), pass);
  const at::Tensor r = h + attn;
  // The MLP in the plan's token chunks where it has them (a long prompt's [tokens, intermediate] activations).
  if (m.plan.mlp_chunk_tokens > 0 && B * S > m.plan.mlp_chunk_tokens)
    return chunked_mlp_residual(m, layer, r, m.plan.mlp_chunk_tokens, pass);
  return r + m.mlp(b, rms_norm_fused(r, b.post_attention_layernorm, cfg.rms_norm_eps), pass);
}

}  // namespace

bool kv_cache_applies(const LlamaModel& model) { return model.config.rope.type != RopeType::Dynamic; }

KvCache make_kv_cache(const LlamaModel& model, int64_t batch, int64_t capacity) {
  QT_CHECK(batch > 0 && capacity > 0, ErrorKind::Internal, "make_kv_cache: empty cache");
  const auto opts = at::TensorOptions().dtype(model.dtype()).device(model.device());
  KvCache c;
  for (size_t i = 0; i < model.layers.size(); ++i) {
    c.k.push_back(at::zeros({batch, capacity, model.config.num_key_value_heads, model.config.head_dim}, opts));
    c.v.push_back(at::zeros({batch, capacity, model.config.num_key_value_heads, model.config.head_dim}, opts));
  }
  c.valid = at::zeros({batch, capacity}, opts.dtype(at::kBool));
  c.capacity = capacity;
  if (!model.base_pass().factors) c.factors = std::make_shared<LoraFactorCache>();
  return c;
}

at::Tensor forward_cached(const LlamaModel& model, KvCache& c, const at::Tensor& ids, const at::Tensor& positions,
                          const at::Tensor& valid) {
  QT_CHECK(kv_cache_applies(model), ErrorKind::Internal, "forward_cached: dynamic RoPE takes the uncached path");
  QT_CHECK(ids.dim() == 2 && positions.sizes() == ids.sizes() && valid.sizes() == ids.sizes() &&
               ids.size(0) == c.valid.size(0) && c.length + ids.size(1) <= c.capacity,
           ErrorKind::Internal, "forward_cached: ids, positions and valid must be [B, S] within the cache");
  at::NoGradGuard no_grad;
  const int64_t S = ids.size(1), T = c.length + S;
  const at::Device device = model.device();
  const auto [cos, sin] = rope_cos_sin(model.inv_freq, to_device_async(positions, device), model.dtype(),
                                       model.config.rope.attention_factor);
  c.valid.narrow(1, c.length, S).copy_(to_device_async(valid.to(at::kBool), device));
  // Column j is visible from new column i (at length + i) where it holds a token, j <= i and, under a sliding window,
  // i - j < window; and a column always from itself (a padding row's softmax is then never empty).
  const auto lopts = at::TensorOptions().dtype(at::kLong).device(device);
  const at::Tensor cols = at::arange(T, lopts).view({1, T});
  const at::Tensor rows = at::arange(c.length, T, lopts).view({S, 1});
  at::Tensor see = cols <= rows;
  if (model.config.sliding_window) see = see & (rows - cols < *model.config.sliding_window);
  const at::Tensor mask =
      ((c.valid.narrow(1, 0, T).unsqueeze(1) & see.unsqueeze(0)) | (cols == rows).unsqueeze(0)).unsqueeze(1);
  // The LoRA factors in the compute dtype made once for the cache's passes (the model's cache where the plan keeps
  // one, else the KvCache's own), not some ten cast, cat and copy kernels a linear at every step.
  Pass pass = model.base_pass();
  if (!pass.factors) pass.factors = c.factors.get();
  if (pass.factors && pass.refresh_factors) pass.factors->refresh(pass.stats);
  at::Tensor h = model.embed(ids);
  for (size_t i = 0; i < model.layers.size(); ++i) {
    if (model.block_hooks) model.block_hooks->before_block(i, /*backward=*/false);
    h = cached_block(model, i, h, cos, sin, c, mask, pass);
    if (model.block_hooks) model.block_hooks->after_block(i, /*backward=*/false);
  }
  c.length = T;
  return rms_norm(h, model.norm, model.config.rms_norm_eps);
}

namespace {

// How CUDA decodes (QT_GENERATE_GRAPHS): by default Decoder's fixed-shape steps, replayed from a CUDA graph a batch
// after the first. On an H100 (thirty-seventh session, warm processes) 100 prompts continued by 32 tokens took 2.7 s
// at 8B and 1.3 s at 1B so, against 2.9 s (8B) through Decoder eagerly ("eager") and 8.9-10.7 s (8B) and 14.9 s (1B)
// through forward_cached ("0", as run on GPUs from the thirty-fourth to the thirty-sixth session, its steps waiting
// on the host's masks). A replayed step: 15.6 ms at 8B (17.2 eager, 56 forward_cached), 3.2 ms at 1B (9.4, 73); a
// batch's capture 0.06-0.16 s.
enum class CudaDecoding { Cached, Eager, Graphs };
CudaDecoding cuda_decoding() {
  const char* v = std::getenv("QT_GENERATE_GRAPHS");
  if (v && std::strcmp(v, "eager") == 0) return CudaDecoding::Eager;
  if (v && std::strcmp(v, "0") == 0) return CudaDecoding::Cached;
  return CudaDecoding::Graphs;
}

std::atomic<bool> graph_capture_failed{false};  // (once: the rest of the process decodes without graphs)

bool lora_dropout_active(const LlamaModel& m) {
  for (const LlamaBlock& b : m.layers)
    for (const Linear* l : {&b.q_proj, &b.k_proj, &b.v_proj, &b.o_proj, &b.gate_proj, &b.up_proj, &b.down_proj})
      if (active_dropout(*l) > 0) return true;
  return false;
}

}  // namespace

struct Decoder::Impl {
  const LlamaModel& model;
  KvCache& cache;
  Pass pass;
  int64_t B = 0;
  at::Tensor inputs;    // [3 B + 1] long on the device: the ids, the positions, valid, and the column to write
  at::Tensor cols;      // [1, capacity] long: 0, 1, ...
  at::Tensor inv_freq;  // RoPE's frequencies on the device
  bool use_graph = false;
  std::unique_ptr<at::cuda::CUDAGraph> graph;
  at::Tensor out;         // the graph's output
  double capture_s = 0;   // the first step and its capture, synchronized (QT_GENERATE_TIMES' account)

  Impl(const LlamaModel& m, KvCache& c, bool allow_graph) : model(m), cache(c), pass(m.base_pass()) {
    QT_CHECK(kv_cache_applies(m), ErrorKind::Internal, "Decoder: dynamic RoPE takes the uncached path");
    B = c.valid.size(0);
    const at::Device device = m.device();
    inputs = at::zeros({3 * B + 1}, at::TensorOptions().dtype(at::kLong).device(device));
    cols = at::arange(c.capacity, inputs.options()).view({1, c.capacity});
    inv_freq = m.inv_freq.to(device);
    if (!pass.factors) pass.factors = c.factors.get();
    // (made current here, outside any capture: the steps read the factors as they are)
    if (pass.factors && pass.refresh_factors) pass.factors->refresh(pass.stats);
    use_graph = allow_graph && device.is_cuda() && cuda_decoding() == CudaDecoding::Graphs && !graph_capture_failed &&
                !m.block_hooks && !m.embeddings_on_host() && !lora_dropout_active(m);
  }

  // The step on what `inputs` holds (no host synchronization: CUDA graphs capture it).
  at::Tensor run() {
    const int64_t C = cache.capacity;
    const at::Tensor ids = inputs.narrow(0, 0, B).view({B, 1});
    const at::Tensor positions = inputs.narrow(0, B, B).view({B, 1});
    const at::Tensor valid = inputs.narrow(0, 2 * B, B).view({B, 1}).ne(0);
    const at::Tensor column = inputs.narrow(0, 3 * B, 1);
    const auto [cos, sin] = rope_cos_sin(inv_freq, positions, model.dtype(), model.config.rope.attention_factor);
    cache.valid.index_copy_(1, column, valid);
    // As forward_cached's mask: the written columns up to the new one (within the window), and the new one always.
    at::Tensor see = cols <= column;
    if (model.config.sliding_window) see = see & (column - cols < *model.config.sliding_window);
    const at::Tensor mask = ((cache.valid & see) | (cols == column)).view({B, 1, 1, C});
    at::Tensor h = model.embed(ids);
    for (size_t i = 0; i < model.layers.size(); ++i) {
      if (model.block_hooks) model.block_hooks->before_block(i, /*backward=*/false);
      h = cached_block(model, i, h, cos, sin, cache, mask, pass, column);
      if (model.block_hooks) model.block_hooks->after_block(i, /*backward=*/false);
    }
    return rms_norm(h, model.norm, model.config.rms_norm_eps);
  }

  // The first step run on a side stream, then captured there (a capture needs a stream of its own; the side stream's
  // library workspaces made by the first run). Returns the first step's result.
  at::Tensor run_and_capture() {
    c10::cuda::device_synchronize();  // (the inputs' copy, the prefill)
    const auto start = std::chrono::steady_clock::now();
    at::Tensor first;
    c10::cuda::CUDAStream side = c10::cuda::getStreamFromPool();
    {
      c10::cuda::CUDAStreamGuard guard(side);
      first = run();
      side.synchronize();
      try {
        graph = std::make_unique<at::cuda::CUDAGraph>();
        graph->capture_begin({0, 0}, cudaStreamCaptureModeThreadLocal);
        out = run();
        graph->capture_end();
      } catch (const std::exception& e) {
        // (a capture some op broke: end it, and decode without graphs from here on)
        cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
        if (cudaStreamIsCapturing(side.stream(), &status) == cudaSuccess && status != cudaStreamCaptureStatusNone) {
          cudaGraph_t g = nullptr;
          if (cudaStreamEndCapture(side.stream(), &g) == cudaSuccess && g) cudaGraphDestroy(g);
        }
        (void)cudaGetLastError();
        graph_capture_failed = true;
        use_graph = false;
        out = at::Tensor();
        graph.reset();
        std::fprintf(stderr, "warning: generation decodes without CUDA graphs: capturing a decoding step failed (%s)\n",
                     first_line(e.what()).c_str());
      }
    }
    c10::cuda::device_synchronize();
    capture_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    return first;
  }

  static std::string first_line(const std::string& s) { return s.substr(0, s.find('\n')); }
};

bool decoder_applies(const LlamaModel& model) {
  return !model.device().is_cuda() || cuda_decoding() != CudaDecoding::Cached;
}

Decoder::Decoder(const LlamaModel& model, KvCache& cache, bool graph)
    : impl_(std::make_unique<Impl>(model, cache, graph)) {}
Decoder::~Decoder() = default;

bool Decoder::graphed() const { return impl_->graph != nullptr; }
double Decoder::capture_seconds() const { return impl_->capture_s; }

at::Tensor Decoder::step(const std::vector<int64_t>& ids, const std::vector<int64_t>& positions,
                         const std::vector<uint8_t>& valid) {
  Impl& d = *impl_;
  QT_CHECK(static_cast<int64_t>(ids.size()) == d.B && positions.size() == ids.size() && valid.size() == ids.size() &&
               d.cache.length < d.cache.capacity,
           ErrorKind::Internal, "Decoder::step: one id, position and valid flag a row, within the cache");
  at::NoGradGuard no_grad;
  const bool cuda = d.inputs.is_cuda();
  at::Tensor host = at::empty({3 * d.B + 1}, at::TensorOptions().dtype(at::kLong).pinned_memory(cuda));
  int64_t* p = host.data_ptr<int64_t>();
  for (int64_t r = 0; r < d.B; ++r) {
    p[r] = ids[r];
    p[d.B + r] = positions[r];
    p[2 * d.B + r] = valid[r] ? 1 : 0;
  }
  p[3 * d.B] = d.cache.length;
  d.inputs.copy_(host, /*non_blocking=*/cuda);  // (the host allocator keeps the pinned block until the copy ran)
  at::Tensor hidden;
  if (!d.use_graph) {
    hidden = d.run();
  } else if (!d.graph) {
    hidden = d.run_and_capture();
  } else {
    d.graph->replay();
    hidden = d.out;
  }
  ++d.cache.length;
  return hidden;
}

std::vector<GenerateResult> generate_batch(const LlamaModel& model, const std::vector<std::vector<int32_t>>& prompts,
                                           const GenerateOptions& o, int64_t batch_tokens) {
  for (const auto& p : prompts) check_request(model, p, o);
  std::vector<GenerateResult> results(prompts.size());
  if (!kv_cache_applies(model) || !cache_enabled()) {
    for (size_t i = 0; i < prompts.size(); ++i) results[i] = generate_tokens_uncached(model, prompts[i], o);
    return results;
  }
  at::NoGradGuard no_grad;
  kernels::GemmTuningPause no_tuning;  // (shapes that change with every batch and step)
  // Prompts of like lengths batched together (shortest first, ties in their order): less padding, and fewer batches
  // (each decoding step reads every weight once, whatever its rows).
  std::vector<size_t> order(prompts.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(),
                   [&](size_t a, size_t b) { return prompts[a].size() < prompts[b].size(); });
  size_t first = 0;
  while (first < prompts.size()) {
    // The next prompts while rows x (longest prompt + new tokens) stays within batch_tokens.
    size_t end = first + 1;
    int64_t longest = static_cast<int64_t>(prompts[order[first]].size());
    while (end < prompts.size()) {
      const int64_t l = std::max<int64_t>(longest, static_cast<int64_t>(prompts[order[end]].size()));
      const int64_t columns = l + new_columns(o, static_cast<int64_t>(prompts[order[first]].size()));
      if (static_cast<int64_t>(end - first + 1) * columns > batch_tokens) break;
      longest = l;
      ++end;
    }
    const int64_t B = static_cast<int64_t>(end - first), L = longest;
    std::vector<int64_t> ids(B * L, 0), pos(B * L, 0);
    std::vector<uint8_t> valid(B * L, 0);
    std::vector<int64_t> length(B);  // each row's tokens so far
    for (int64_t r = 0; r < B; ++r) {
      const auto& p = prompts[order[first + r]];
      const int64_t pad = L - static_cast<int64_t>(p.size());
      for (size_t t = 0; t < p.size(); ++t) {
        ids[r * L + pad + t] = p[t];
        pos[r * L + pad + t] = static_cast<int64_t>(t);
        valid[r * L + pad + t] = 1;
      }
      length[r] = static_cast<int64_t>(p.size());
    }
    KvCache cache = make_kv_cache(model, B, L + new_columns(o, static_cast<int64_t>(prompts[order[first]].size())));
    std::vector<at::Generator> gens;  // sampling: a row's own, as generate_tokens seeds it
    if (o.temperature != 0)
      for (int64_t r = 0; r < B; ++r) gens.push_back(at::make_generator<at::CPUGeneratorImpl>(o.seed));
    auto as_tensor = [&](std::vector<int64_t>& v, int64_t S) { return at::tensor(v, at::kLong).view({B, S}); };
    // QT_GENERATE_TIMES=1: each batch's rows, columns, prefill and decoding time on stderr (the device synchronized
    // around them), for measurements.
    static const bool times = [] {
      const char* v = std::getenv("QT_GENERATE_TIMES");
      return v && *v && std::strcmp(v, "0") != 0;
    }();
    const auto now = [&] {
      if (times && model.device().is_cuda()) c10::cuda::device_synchronize();
      return std::chrono::steady_clock::now();
    };
    const auto t0 = times ? now() : std::chrono::steady_clock::time_point{};
    at::Tensor hidden = forward_cached(model, cache, as_tensor(ids, L), as_tensor(pos, L),
                                       at::tensor(valid, at::kByte).view({B, L}));
    const auto t1 = times ? now() : t0;
    int64_t steps = 0;
    std::vector<bool> done(B, false);
    // (QT_GENERATE_GRAPHS=0 on CUDA: the steps through forward_cached)
    std::optional<Decoder> decoder;
    if (decoder_applies(model)) decoder.emplace(model, cache, o.cuda_graph);
    for (int64_t step = 0; step < o.max_new_tokens; ++step, ++steps) {
      const at::Tensor last = model.logits(hidden.select(1, hidden.size(1) - 1));
      const std::vector<int64_t> greedy = greedy_tokens(last, o);
      const at::Tensor logits = greedy.empty() ? last.to(at::kCPU, at::kFloat) : at::Tensor();  // sampling: the host's
      std::vector<int64_t> next(B, 0), next_pos(B, 0);
      std::vector<uint8_t> next_valid(B, 1);
      bool any = false;
      for (int64_t r = 0; r < B; ++r) {
        GenerateResult& res = results[order[first + r]];
        if (!done[r] && o.max_seq_len > 0 && length[r] >= o.max_seq_len) done[r] = true;
        if (done[r]) {
          next_valid[r] = 0;  // a finished row runs on as padding, unread
          continue;
        }
        const auto t = static_cast<int32_t>(greedy.empty() ? choose_next_token(logits[r], o, gens[r]) : greedy[r]);
        res.tokens.push_back(t);
        next[r] = t;
        next_pos[r] = length[r]++;
        if (std::find(o.stop_ids.begin(), o.stop_ids.end(), t) != o.stop_ids.end()) {
          res.stopped = true;
          done[r] = true;
        } else if (static_cast<int64_t>(res.tokens.size()) == o.max_new_tokens) {
          done[r] = true;
        }
        any = any || !done[r];
      }
      if (!any) break;
      hidden = decoder ? decoder->step(next, next_pos, next_valid)
                       : forward_cached(model, cache, as_tensor(next, 1), as_tensor(next_pos, 1),
                                        at::tensor(next_valid, at::kByte).view({B, 1}));
    }
    if (times) {
      const auto t2 = now();
      char how[96] = "";
      if (decoder && decoder->graphed())
        std::snprintf(how, sizeof how, " (a CUDA graph: the first step and its capture %.3f s)",
                      decoder->capture_seconds());
      else if (decoder)
        std::snprintf(how, sizeof how, " (Decoder)");
      std::fprintf(stderr, "generate: %lld rows x %lld columns: prefill %.3f s, %lld steps %.3f s%s\n",
                   static_cast<long long>(B), static_cast<long long>(L), std::chrono::duration<double>(t1 - t0).count(),
                   static_cast<long long>(steps), std::chrono::duration<double>(t2 - t1).count(), how);
    }
    first = end;
  }
  return results;
}

GenerateResult generate_tokens(const LlamaModel& model, const std::vector<int32_t>& prompt, const GenerateOptions& o) {
  return generate_batch(model, {prompt}, o, std::numeric_limits<int64_t>::max())[0];
}

GenerateResult generate_tokens_uncached(const LlamaModel& model, const std::vector<int32_t>& prompt,
                                        const GenerateOptions& o) {
  check_request(model, prompt, o);
  at::NoGradGuard no_grad;
  kernels::GemmTuningPause no_tuning;
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(o.seed);
  std::vector<int64_t> seq(prompt.begin(), prompt.end());
  GenerateResult r;
  for (int64_t step = 0; step < o.max_new_tokens; ++step) {
    if (o.max_seq_len > 0 && static_cast<int64_t>(seq.size()) >= o.max_seq_len) break;
    at::Tensor ids = at::tensor(seq, at::kLong).unsqueeze(0).to(model.device());
    at::Tensor hidden = model.forward_hidden(model.embed(ids));
    at::Tensor logits = model.logits(hidden.select(1, hidden.size(1) - 1)).squeeze(0);
    const auto next = static_cast<int32_t>(choose_next_token(logits, o, gen));
    seq.push_back(next);
    r.tokens.push_back(next);
    if (std::find(o.stop_ids.begin(), o.stop_ids.end(), next) != o.stop_ids.end()) {
      r.stopped = true;
      break;
    }
  }
  return r;
}

}  // namespace qt
