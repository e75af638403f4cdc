// Public entry of the fused linear cross-entropy: validation, chunk choice, dispatch (CUDA kernel or plain-ATen
// reference) and the autograd function that hands out the gradients computed in the forward pass.
#include "lib/kernels/fused_linear_ce.h"

#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>
#include <string>

#include "lib/core/error.h"
#include "lib/kernels/fused_linear_ce_impl.h"

namespace qt {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int64_t next_pow2(int64_t x) {
  int64_t p = 1;
  while (p < x) p <<= 1;
  return p;
}

void validate(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels,
              const FusedLinearCeOptions& o) {
  const std::string me = "fused_linear_cross_entropy: ";
  QT_CHECK(hidden.defined() && weight.defined() && labels.defined(), ErrorKind::Internal, me + "undefined tensor");
  QT_CHECK(hidden.dim() == 2 && weight.dim() == 2 && labels.dim() == 1, ErrorKind::Internal,
           me + "expects hidden [T, H], weight [V, H], labels [T]");
  QT_CHECK(
      hidden.size(1) == weight.size(1), ErrorKind::Internal,
      me + "hidden size " + std::to_string(hidden.size(1)) + " != weight columns " + std::to_string(weight.size(1)));
  QT_CHECK(labels.size(0) == hidden.size(0), ErrorKind::Internal,
           me + std::to_string(labels.size(0)) + " labels for " + std::to_string(hidden.size(0)) + " tokens");
  QT_CHECK(weight.size(0) > 0, ErrorKind::Internal, me + "empty vocabulary");
  QT_CHECK(at::isFloatingType(hidden.scalar_type()) && hidden.scalar_type() == weight.scalar_type(),
           ErrorKind::Internal, me + "hidden and weight must share one floating dtype");
  QT_CHECK(labels.scalar_type() == at::kLong || labels.scalar_type() == at::kInt, ErrorKind::Internal,
           me + "labels must be int64 or int32");
  QT_CHECK(hidden.device() == weight.device() && (hidden.device() == labels.device() || labels.is_cpu()),
           ErrorKind::Internal, me + "hidden and weight must be on one device, labels on it or on the CPU");
  QT_CHECK(o.label_smoothing >= 0 && o.label_smoothing <= 1, ErrorKind::Config,
           me + "label_smoothing must be in [0, 1]");
  QT_CHECK(o.z_loss >= 0 && o.logit_softcap >= 0 && o.chunk_tokens >= 0 && o.vocab_tile >= 0, ErrorKind::Config,
           me + "z_loss, logit_softcap, chunk_tokens and vocab_tile must be >= 0");
}

void check_labels(const at::Tensor& labels, int64_t vocab, int64_t ignore_index) {
  const at::Tensor bad = labels.ge(vocab).logical_or_(labels.lt(0).logical_and_(labels.ne(ignore_index)));
  if (bad.any().item<bool>()) {  // one device sync; the message names the first offender
    const int64_t at_token = bad.nonzero().select(1, 0)[0].item<int64_t>();
    fail(ErrorKind::Data, "fused_linear_cross_entropy: label " + std::to_string(labels[at_token].item<int64_t>()) +
                              " of token " + std::to_string(at_token) + " is outside [0, " + std::to_string(vocab) +
                              ") and is not the ignore index " + std::to_string(ignore_index));
  }
}

// Inputs (hidden, weight, labels) then non-tensor arguments; backward returns one gradient per argument.
class FusedLinearCeFunction : public torch::autograd::Function<FusedLinearCeFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& hidden, const at::Tensor& weight,
                               const at::Tensor& labels, const FusedLinearCeOptions& options, int64_t chunk,
                               bool want_dh, bool want_dw, const detail::CountedRows& counted) {
    const bool cuda = hidden.is_cuda() && !options.force_reference && detail::fused_linear_ce_cuda_available();
    detail::FusedCeForward f =
        cuda ? detail::fused_linear_ce_cuda(hidden, weight, labels, options, chunk, want_dh, want_dw, counted)
             : detail::fused_linear_ce_reference(hidden, weight, labels, options, chunk, want_dh, want_dw);
    // Summed in double: the per-token losses are O(10) and there may be 1e5 of them.
    at::Tensor loss_sum = f.loss_rows.sum(at::kDouble).to(at::kFloat);
    at::Tensor count = labels.ne(options.ignore_index).sum();
    if (f.dh.defined()) ctx->saved_data["dh"] = f.dh;
    if (f.dw.defined()) ctx->saved_data["dw"] = f.dw;
    ctx->mark_non_differentiable({count});
    return {loss_sum, count};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    // The stored gradients are those of loss_sum (scale 1); the chain rule only scales them. They are scaled
    // in place and handed over (no copy, and AccumulateGrad may adopt them as .grad); so a second backward
    // through the same graph (retain_graph) cannot be served.
    QT_CHECK(!ctx->saved_data.count("done"), ErrorKind::Internal,
             "fused_linear_cross_entropy: backward ran twice through one forward (retain_graph is unsupported)");
    ctx->saved_data["done"] = true;
    const at::Tensor& g = grad_outputs[0];
    variable_list grads(8);
    for (const char* key : {"dh", "dw"}) {
      auto it = ctx->saved_data.find(key);
      if (it == ctx->saved_data.end()) continue;
      at::Tensor d = std::move(it->second).toTensor();
      ctx->saved_data.erase(it);
      if (g.defined()) d.mul_(g);
      grads[key[1] == 'h' ? 0 : 1] = std::move(d);
    }
    return grads;
  }
};

// The per-token variant: loss_rows [T] out, the weight frozen; backward scales dh's rows by their incoming gradients.
class FusedLinearCeRowsFunction : public torch::autograd::Function<FusedLinearCeRowsFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& hidden, const at::Tensor& weight,
                               const at::Tensor& labels, const FusedLinearCeOptions& options, int64_t chunk,
                               bool want_dh, const detail::CountedRows& counted) {
    const bool cuda = hidden.is_cuda() && !options.force_reference && detail::fused_linear_ce_cuda_available();
    detail::FusedCeForward f =
        cuda ? detail::fused_linear_ce_cuda(hidden, weight, labels, options, chunk, want_dh, false, counted)
             : detail::fused_linear_ce_reference(hidden, weight, labels, options, chunk, want_dh, false);
    if (f.dh.defined()) ctx->saved_data["dh"] = f.dh;
    return {f.loss_rows};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    QT_CHECK(!ctx->saved_data.count("done"), ErrorKind::Internal,
             "fused_linear_cross_entropy_rows: backward ran twice through one forward (retain_graph is unsupported)");
    ctx->saved_data["done"] = true;
    variable_list grads(7);
    auto it = ctx->saved_data.find("dh");
    if (it == ctx->saved_data.end()) return grads;
    at::Tensor d = std::move(it->second).toTensor();
    ctx->saved_data.erase(it);
    const at::Tensor& g = grad_outputs[0];
    if (g.defined()) {
      d.mul_(g.unsqueeze(1));
    } else {
      d.zero_();
    }
    grads[0] = std::move(d);
    return grads;
  }
};

}  // namespace

at::Tensor FusedLinearCeResult::mean() const { return loss_sum / count.clamp_min(1).to(loss_sum.scalar_type()); }

namespace {

// Liger-Kernel's rule (linkedin/Liger-Kernel, ops/fused_linear_cross_entropy.py): chunk =
// next_pow2(ceil(T / ceil(V / H))), so the [chunk, V] tile is about the [T, H] hidden state's size.
int64_t liger_chunk(int64_t tokens, int64_t hidden, int64_t vocab) {
  return next_pow2(ceil_div(std::max<int64_t>(tokens, 1), ceil_div(vocab, hidden)));
}

}  // namespace

FusedCeSchedule fused_linear_ce_schedule(int64_t tokens, int64_t hidden, int64_t vocab, bool weight_trainable,
                                         const FusedLinearCeOptions& options) {
  if (!weight_trainable) return FusedCeSchedule::TokenChunks;
  if (options.schedule != FusedCeSchedule::Auto) return options.schedule;
  if (options.low_memory) return FusedCeSchedule::VocabTiles;
  // Token chunks pay one read and one write of dW (4VH bytes in bf16) per chunk; vocabulary tiles pay one more
  // logits GEMM (2THV FLOPs). Vocabulary tiles when the first costs more than kSlack times the second, at an
  // H100's ratio of bf16 GEMM rate to memory bandwidth (781 TFLOP/s over 3.0 TB/s, both measured: 260 FLOP/B).
  // kSlack covers what the cost model leaves out (pass 2's tile kernel; dW traffic partly hidden under GEMMs).
  constexpr double kFlopPerByte = 260.0, kSlack = 1.25;
  const double chunks = static_cast<double>(ceil_div(std::max<int64_t>(tokens, 1), liger_chunk(tokens, hidden, vocab)));
  const double dw_traffic = chunks * 4.0 * static_cast<double>(vocab) * hidden * kFlopPerByte;  // in FLOP units
  const double recompute = 2.0 * static_cast<double>(tokens) * hidden * vocab;
  return dw_traffic > kSlack * recompute ? FusedCeSchedule::VocabTiles : FusedCeSchedule::TokenChunks;
}

int64_t fused_linear_ce_chunk_tokens(int64_t tokens, int64_t hidden, int64_t vocab, bool weight_trainable,
                                     const FusedLinearCeOptions& options, int64_t element_size) {
  if (options.chunk_tokens > 0) return options.chunk_tokens;
  int64_t chunk;
  const FusedCeSchedule schedule = fused_linear_ce_schedule(tokens, hidden, vocab, weight_trainable, options);
  if (weight_trainable && schedule == FusedCeSchedule::VocabTiles) {
    // Pass 1's [chunk, V] tile borrows dW's V x H storage before pass 2 writes it: chunk <= H, free of charge.
    return std::clamp<int64_t>(hidden, 1, 16384);
  }
  if (weight_trainable) {
    // Each chunk reads and writes all of dW, so a larger tile would be faster but cost memory.
    chunk = liger_chunk(tokens, hidden, vocab);
    if (options.low_memory) chunk /= 4;
  } else {
    // Frozen: no pass over dW per chunk, and the dh GEMM's output is only [chunk, H], so larger tiles keep the
    // GPU busy. 192 MiB bounds the tile (768 rows at V = 128256 in bf16), rounded down to 64 rows.
    const int64_t budget = int64_t{192} << 20;
    chunk = std::max<int64_t>(64, budget / (vocab * element_size) / 64 * 64);
    if (options.low_memory) chunk /= 4;
  }
  return std::clamp<int64_t>(chunk, 16, 16384);
}

int64_t fused_linear_ce_last_tile_columns(int64_t tokens, int64_t hidden, int64_t vocab) {
  // 4% of the gradients' elements (dW + dh), so that the extra peak stays within 1.05x the gradient bytes,
  // rounded down to 64 columns (16-byte rows in any dtype).
  const int64_t budget = (vocab * hidden + tokens * hidden) / 25;
  const int64_t cols = budget / std::max<int64_t>(tokens, 1) / 64 * 64;
  return std::min(vocab, std::max<int64_t>(64, cols));
}

namespace {

// What both entries do before their autograd function: labels checked, counted and moved, the schedule and chunk.
struct Prepared {
  at::Tensor labels;
  detail::CountedRows counted;
  FusedLinearCeOptions options;
  int64_t chunk = 0;
  bool want_dh = false, want_dw = false;
};

Prepared prepare(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels,
                 const FusedLinearCeOptions& options) {
  validate(hidden, weight, labels, options);
  const int64_t vocab = weight.size(0);
  at::Tensor y = labels.to(at::kLong);
  if (options.check_labels) check_labels(y, vocab, options.ignore_index);
  // Labels from the host: checked, counted and located there, then copied in from pinned memory without
  // waiting, so that the loss costs the host no sync with the GPU (on the device: three).
  detail::CountedRows counted;
  if (y.device() != hidden.device()) {
    const at::Tensor mask = y.ne(options.ignore_index);
    counted.count = mask.sum().item<int64_t>();
    if (counted.count < y.size(0))
      counted.index = mask.nonzero().squeeze(1).pin_memory().to(hidden.device(), /*non_blocking=*/true);
    y = y.pin_memory().to(hidden.device(), /*non_blocking=*/true);
  }
  const bool grad = at::GradMode::is_enabled();
  const bool want_dh = grad && hidden.requires_grad();
  const bool want_dw = grad && weight.requires_grad();
  const bool cuda = hidden.is_cuda() && !options.force_reference && detail::fused_linear_ce_cuda_available();
  const int64_t element_size = cuda ? static_cast<int64_t>(hidden.element_size()) : 4;  // the reference is fp32
  // The schedule is resolved once here; the reference has only token chunks (same function, other order).
  FusedLinearCeOptions o = options;
  o.schedule = cuda ? fused_linear_ce_schedule(hidden.size(0), hidden.size(1), vocab, want_dw, options)
                    : FusedCeSchedule::TokenChunks;
  const int64_t chunk = fused_linear_ce_chunk_tokens(hidden.size(0), hidden.size(1), vocab, want_dw, o, element_size);
  return {y, counted, o, chunk, want_dh, want_dw};
}

}  // namespace

FusedLinearCeResult fused_linear_cross_entropy(const at::Tensor& hidden, const at::Tensor& weight,
                                               const at::Tensor& labels, const FusedLinearCeOptions& options) {
  const Prepared p = prepare(hidden, weight, labels, options);
  variable_list out = FusedLinearCeFunction::apply(hidden, weight, p.labels, p.options, p.chunk, p.want_dh, p.want_dw,
                                                   p.counted);
  return {out[0], out[1]};
}

at::Tensor fused_linear_cross_entropy_rows(const at::Tensor& hidden, const at::Tensor& weight,
                                           const at::Tensor& labels, const FusedLinearCeOptions& options) {
  QT_CHECK(!(at::GradMode::is_enabled() && weight.requires_grad()), ErrorKind::Internal,
           "fused_linear_cross_entropy_rows: the weight must be frozen (its gradient would need each token's scale "
           "before the sum over tokens)");
  const Prepared p = prepare(hidden, weight, labels, options);
  return FusedLinearCeRowsFunction::apply(hidden, weight, p.labels, p.options, p.chunk, p.want_dh, p.counted)[0];
}

}  // namespace qt
