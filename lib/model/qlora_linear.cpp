#include "lib/model/qlora_linear.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

#include "lib/core/error.h"
#include "lib/kernels/dropout_hash.h"
#include "lib/kernels/fused_ops.h"
#include "lib/kernels/nf4_gemm.h"
#include "lib/kernels/tuned_gemm.h"

namespace qt {
namespace {

// The NF4 base matmul as an autograd function: saves nothing but a pointer to the (model-owned, frozen)
// Nf4Weight, dequantizes into a scratch buffer in forward and again in backward.
at::Tensor nf4_linear_backward(torch::autograd::AutogradContext* ctx, const at::Tensor& grad) {
  const auto* w = reinterpret_cast<const Nf4Weight*>(ctx->saved_data["w"].toInt());
  auto dtype = static_cast<c10::ScalarType>(ctx->saved_data["dtype"].toInt());
  if (auto* stats = reinterpret_cast<ModelStats*>(ctx->saved_data["stats"].toInt())) ++stats->dequantized_weights;
  at::Tensor W = w->dequantize(dtype);
  return at::matmul(grad.to(dtype), W);
}

// The forward pass's W, its weight, dtype and stats noted for the backward pass.
at::Tensor nf4_forward_weight(torch::autograd::AutogradContext* ctx, int64_t weight_ptr, c10::ScalarType dtype,
                              int64_t stats_ptr) {
  ctx->saved_data["w"] = weight_ptr;
  ctx->saved_data["dtype"] = static_cast<int64_t>(dtype);
  ctx->saved_data["stats"] = stats_ptr;
  if (auto* stats = reinterpret_cast<ModelStats*>(stats_ptr)) ++stats->dequantized_weights;
  return reinterpret_cast<const Nf4Weight*>(weight_ptr)->dequantize(dtype);
}

struct Nf4LinearFn : public torch::autograd::Function<Nf4LinearFn> {
  // stats_ptr: the ModelStats that count the dequantizations (0: none).
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, int64_t weight_ptr,
                            int64_t stats_ptr) {
    return at::matmul(x, nf4_forward_weight(ctx, weight_ptr, x.scalar_type(), stats_ptr).t());
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    return {nf4_linear_backward(ctx, grads[0]), at::Tensor(), at::Tensor()};
  }
};

// The same for DoRA, which also needs the row norms of W + scale B A: taken from the W just dequantized for the
// matmul, so that W is dequantized once in forward (and once in backward) as for plain LoRA, and never kept.
// A and B come in detached; the norm output is not differentiable (DoRA section 4.3, PEFT's detach()).
struct Nf4DoraFn : public torch::autograd::Function<Nf4DoraFn> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                                                int64_t weight_ptr, const at::Tensor& A, const at::Tensor& B,
                                                double scale, int64_t stats_ptr) {
    at::Tensor W = nf4_forward_weight(ctx, weight_ptr, x.scalar_type(), stats_ptr);
    at::Tensor y = at::matmul(x, W.t());
    at::Tensor norm = dora_weight_norm(W, A, B, scale);
    ctx->mark_non_differentiable({norm});
    return {y, norm};
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    return {nf4_linear_backward(ctx, grads[0]), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// The input gradient of a linear much wider in than out (down_proj: 14,336 in, 4,096 out at the 8B shape) takes
// its LoRA term along K of the base GEMM, dx = [dy | dy B_s | 0] [W; A; 0], instead of an addmm over the [N, in]
// product after it: that addmm read and wrote 235 MB a block at 2 x 2048 tokens (3.8 ms a step on an H100), the
// widened dy costs a copy of [N, out]. Not with LoRA dropout (its term is masked before the sum), nor over a dense
// base (its weight exists already: the A rows would cost a copy of it each pass).
bool tall_applies(const Linear& l, double dropout) {
  return dropout == 0 && l.quantized() && l.in_features() >= 2 * l.out_features() && l.out_features() % 8 == 0;
}

// [W; a; 0], [out + extra, in] with extra = r rounded up to 8 rows (16-byte rows of dy widened): the NF4 base
// dequantized in `dtype` (the held one where the linear holds it, made now on first use) with the LoRA A rows
// written now.
at::Tensor tall_weight(const Linear& l, c10::ScalarType dtype, ModelStats* stats, const at::Tensor& a) {
  const int64_t out = l.out_features(), in = l.in_features(), r = a.size(0), rows = out + (r + 7) / 8 * 8;
  const bool held = l.held && l.held->weight.defined() && l.held->weight.scalar_type() == dtype &&
                    l.held->weight.size(0) == rows && l.held->weight.size(1) == in;
  at::Tensor T = held ? l.held->weight : at::empty({rows, in}, a.options().dtype(dtype));
  if (!held) {
    dequantize_group_into({l.nf4.get()}, {T.narrow(0, 0, out)});
    if (stats) ++stats->dequantized_weights;
    if (rows > out + r) T.narrow(0, out + r, rows - out - r).zero_();
    if (l.held) l.held->hold(T);
  }
  if (!held || !l.held->lora_current(a)) {
    T.narrow(0, out, r).copy_(a);
    if (l.held && T.is_same(l.held->weight)) {
      l.held->lora_wrote(a);
      if (stats) ++stats->held_lora_writes;
    }
  }
  return T;
}

// Whether a forward product of this NF4 base takes the fused NF4 GEMM (Pass::nf4_gemm): its 16-bit weight is
// neither held nor kept for the backward pass (so none is written at all), and the kernel takes the operands.
bool nf4_gemm_applies(const Pass& pass, const Linear& l, const at::Tensor& x2) {
  if (!pass.nf4_gemm || pass.keep_dequantized || pass.lora_add_after || !l.quantized() || l.held) return false;
  return kernels::nf4_gemm_unfit(x2, {&l.nf4->data}, /*out (made here, contiguous)=*/{}).empty();
}

// A frozen base plus LoRA, y = x W^T + (dropout(x) A^T)(s B)^T, as one autograd node. The LoRA sums ride on GEMM
// epilogues (the base GEMM accumulating onto the rank-r product, forward and backward; with dropout the input
// gradient's LoRA term is an add after its mask), so neither pass adds an elementwise kernel over [tokens, out] or
// [tokens, in]; W (NF4: dequantized into scratch) is not kept between the passes, nor is the dropout mask (drawn
// again).
struct LoraLinearFn : public torch::autograd::Function<LoraLinearFn> {
  // output_unused: only what the backward saves (t); the output is left unwritten.
  // pass_ptr: the Pass (read in this call only).
  // swiglu_input: x is a gate / up projection output [.., 2 I] and the linear reads silu(gate) * up (down_proj):
  // the node keeps x, and the SwiGLU output too where the pass keeps it (Pass::keep_swiglu), else recomputes that
  // in its backward pass (I elements a token less kept per block, an elementwise pass over 3 I more; the same
  // bits, the same kernels).
  // dropout: LoRA dropout's probability (0: none).
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& A,
                            const at::Tensor& B, double scale, int64_t linear_ptr, bool output_unused,
                            int64_t pass_ptr, bool swiglu_input, double dropout) {
    const auto* l = reinterpret_cast<const Linear*>(linear_ptr);
    const Pass& pass = *reinterpret_cast<const Pass*>(pass_ptr);
    const auto dt = x.scalar_type();
    const at::Tensor h = swiglu_input ? swiglu_packed_values(x) : x;
    at::Tensor x2 = h.reshape({-1, h.size(-1)});
    const auto [a, bs] = lora_factors(pass, {l}, {A, B}, dt);
    at::Tensor state;
    const at::Tensor xd = dropout > 0 ? draw_lora_dropout(x2.contiguous(), dropout, state, pass.dropout_kernels) : x2;
    at::Tensor t = at::empty({xd.size(0), a.size(0)}, xd.options());  // [N, r]
    if (lora_project(t, xd, a, pass.lora_project_kernel))
      pass.count(&ModelStats::lora_gemm_kernel_runs);
    at::Tensor W, y;
    const bool tall = pass.lora_in_grad_gemm && tall_applies(*l, dropout);
    std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
    shape.back() = l->out_features();
    if (output_unused) {
      y = unwritten_output(shape, x2.options());
      pass.count(&ModelStats::outputs_skipped);
    } else if (nf4_gemm_applies(pass, *l, x2)) {
      // The rank-r term first, then the fused NF4 GEMM accumulating onto it: no 16-bit copy of W written.
      y = at::mm(t, bs.t());
      kernels::nf4_linear_into(x2, {&l->nf4->data}, y, /*accumulate=*/true, {}, pass.nf4_gemm_variant);
      pass.count(&ModelStats::nf4_gemm_runs);
    } else {
      W = tall ? tall_weight(*l, dt, pass.stats, a) : frozen_weight(*l, dt, pass.stats);
      // The rank-r term first, then the base GEMM accumulating onto it (beta 1: y read in its epilogue), not an
      // addmm reading and writing y after it: 8-12 us less a linear at 8B 2 x 2048 (scripts/gemm_shapes.py).
      const at::Tensor Wb = W.narrow(0, 0, l->out_features());
      if (pass.lora_add_after) {
        y = kernels::gemm(x2, Wb.t());
        y.addmm_(t, bs.t());
      } else {
        y = at::mm(t, bs.t());
        kernels::gemm_out(y, x2, Wb.t(), /*accumulate=*/true);
        pass.count(&ModelStats::base_onto_lora_runs);
      }
    }
    ctx->save_for_backward({swiglu_input ? x.reshape({-1, x.size(-1)}) : x2, a, bs, t,
                            pass.keep_dequantized ? W : at::Tensor(),
                            swiglu_input && pass.keep_swiglu ? x2 : at::Tensor()});
    ctx->saved_data["linear"] = linear_ptr;
    ctx->saved_data["stats"] = reinterpret_cast<int64_t>(pass.stats);
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["swiglu"] = swiglu_input;
    ctx->saved_data["dropout"] = dropout;
    ctx->saved_data["tall"] = tall;
    ctx->saved_data["add_after"] = pass.lora_add_after;
    ctx->saved_data["lora_gemm"] = pass.lora_grad_kernel_for(std::max(x2.size(1), l->out_features()));
    if (dropout > 0) ctx->saved_data["dropout_state"] = state;
    return output_unused ? y : y.view(shape);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto* l = reinterpret_cast<const Linear*>(ctx->saved_data["linear"].toInt());
    const double scale = ctx->saved_data["scale"].toDouble();
    auto saved = ctx->get_saved_variables();
    const at::Tensor &in2 = saved[0], &a = saved[1], &bs = saved[2], &t = saved[3], &kept = saved[4];
    const bool swiglu_input = ctx->saved_data["swiglu"].toBool();
    auto* stats = reinterpret_cast<ModelStats*>(ctx->saved_data["stats"].toInt());
    // The linear's input: the SwiGLU output kept, or recomputed from gate and up.
    at::Tensor x2 = in2;
    if (swiglu_input && saved[5].defined()) {
      x2 = saved[5];
    } else if (swiglu_input) {
      x2 = swiglu_packed_values(in2);
      if (stats) ++stats->swiglu_recomputed;
    }
    const auto dt = x2.scalar_type();
    const double dropout = ctx->saved_data["dropout"].toDouble();
    const RedrawnDropout drop =
        dropout > 0 ? redraw_lora_dropout(x2.contiguous(), dropout, ctx->saved_data["dropout_state"].toTensor())
                    : RedrawnDropout{};
    at::Tensor dy = grads[0].reshape({-1, grads[0].size(-1)}).to(dt);
    at::Tensor g, dx;  // g: the gradient of t, [N, r]
    if (ctx->needs_input_grad(0) && ctx->saved_data["tall"].toBool()) {
      // dx = [dy | dy bs | 0] [W; a; 0]: the LoRA term along K of the base GEMM, no addmm over [N, in] after it.
      const at::Tensor Wt = kept.defined() ? kept : tall_weight(*l, dt, stats, a);
      const int64_t out = dy.size(1), r = a.size(0);
      at::Tensor dyw = at::empty({dy.size(0), Wt.size(0)}, dy.options());
      copy_rows(dyw.narrow(1, 0, out), dy);
      g = dyw.narrow(1, out, r);
      at::mm_out(g, dy, bs);
      if (Wt.size(0) > out + r) dyw.narrow(1, out + r, Wt.size(0) - out - r).zero_();
      dx = kernels::gemm(dyw, Wt);
      if (stats) ++stats->lora_in_grad_gemm_runs;
    } else {
      g = at::mm(dy, bs);
      if (ctx->needs_input_grad(0)) {
        const at::Tensor W = (kept.defined() ? kept : frozen_weight(*l, dt, stats)).narrow(0, 0, dy.size(1));
        if (dropout > 0) {
          dx = kernels::gemm(dy, W);
          add_lora_dropout_grad(dx, g, a, drop, dropout);
        } else if (ctx->saved_data["add_after"].toBool()) {
          dx = kernels::gemm(dy, W);
          dx.addmm_(g, a);
        } else {  // g a first, the base GEMM accumulating onto it (as the forward pass)
          dx = at::mm(g, a);
          kernels::gemm_out(dx, dy, W, /*accumulate=*/true);
          if (stats) ++stats->base_onto_lora_runs;
        }
      }
    }
    // dA = g^T x, dB = scale dy^T t: one launch where the kernel takes them
    bool ran = false;
    const std::vector<at::Tensor> dAB = lora_grads({{g, dropout > 0 ? drop.h : x2, 1.0, false}, {t, dy, scale, true}},
                                                   ctx->saved_data["lora_gemm"].toBool(), 0, &ran);
    if (ran && stats) ++stats->lora_gemm_kernel_runs;
    const at::Tensor &dA = dAB[0], &dB = dAB[1];
    if (dx.defined() && swiglu_input) dx = swiglu_packed_grad(in2, dx);
    std::vector<int64_t> shape(grads[0].sizes().begin(), grads[0].sizes().end());
    shape.back() = in2.size(1);
    return {dx.defined() ? dx.view(shape) : dx, dA, dB, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor()};
  }
};

}  // namespace

double active_dropout(const Linear& l) { return l.training && l.lora ? l.lora->dropout : 0.0; }

namespace {
at::Generator default_generator(const at::Device& device) {
  return device.is_cuda() ? at::cuda::detail::getDefaultCUDAGenerator(device.index())
                          : at::detail::getDefaultCPUGenerator();
}

// The input of a draw: on CUDA at::native_dropout picks its kernel's vector width from the input's address (and
// size), and the width decides which random number lands on which element, so the draw and the redraw must read
// inputs aligned alike: on 16 bytes, as fresh allocations are.
at::Tensor dropout_input(const at::Tensor& x) {
  at::Tensor c = x.contiguous();
  if (c.is_cuda() && reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 != 0) c = c.clone();
  return c;
}
}  // namespace

namespace {
// The counter-based mask of a draw on CUDA: its key from the default CUDA generator's seed and offset, the offset
// advanced by 4 (the unit of ATen's Philox offsets).
DropoutMask next_hashed_mask(const at::Tensor& x, double p) {
  at::Generator gen = at::cuda::detail::getDefaultCUDAGenerator(x.get_device());
  std::pair<uint64_t, uint64_t> seed_offset;
  {
    std::lock_guard<std::mutex> lock(gen.mutex());
    seed_offset = at::check_generator<at::CUDAGeneratorImpl>(gen)->philox_engine_inputs(4);
  }
  return DropoutMask{dropout_hash::key_of(seed_offset.first, seed_offset.second), p};
}
}  // namespace

at::Tensor draw_lora_dropout(const at::Tensor& x, double p, at::Tensor& state, bool kernels) {
  if (kernels && lora_dropout_kernels_take(x)) {
    const DropoutMask m = next_hashed_mask(x, p);
    state = at::full({1}, static_cast<int64_t>(m.key), at::kLong);
    return lora_dropout_apply(x, m);
  }
  state = default_generator(x.device()).get_state();
  at::NoGradGuard no_grad;
  return at::dropout(dropout_input(x), p, /*train=*/true);
}

RedrawnDropout redraw_lora_dropout(const at::Tensor& x, double p, const at::Tensor& state) {
  RedrawnDropout r;
  if (state.scalar_type() == at::kLong) {  // a counter-based mask's key
    r.hashed = true;
    r.mask = DropoutMask{static_cast<uint64_t>(state.item<int64_t>()), p};
    r.h = lora_dropout_apply(x, r.mask);
    return r;
  }
  // The generator's state as it was, put back however the draw ends (an out-of-memory error included).
  struct Restore {
    at::Generator gen;
    at::Tensor now;
    ~Restore() { gen.set_state(now); }
  } restore{default_generator(x.device()), {}};
  restore.now = restore.gen.get_state();
  restore.gen.set_state(state);
  at::NoGradGuard no_grad;
  if (x.is_cuda()) {
    std::tie(r.h, r.factor) = at::native_dropout(dropout_input(x), p, /*train=*/true);
  } else {  // at::dropout's noise: a draw of x's shape and dtype, whatever its values
    r.factor = at::dropout(at::ones_like(x), p, /*train=*/true);
    r.h = x * r.factor;
  }
  return r;
}

void add_lora_dropout_grad(const at::Tensor& dx, const at::Tensor& g, const at::Tensor& a, const RedrawnDropout& r,
                           double p) {
  if (r.hashed) {
    lora_dropout_rank_update(dx, g, a, r.mask);
    return;
  }
  const at::Tensor grad = at::mm(g, a);
  dx.add_(grad.is_cuda() ? at::native_dropout_backward(grad, r.factor, 1.0 / (1.0 - p)) : grad * r.factor);
}

std::pair<at::Tensor, at::Tensor> LoraFactorCache::get(const std::vector<const Linear*>& ls, at::TensorList ab,
                                                       at::ScalarType dt, ModelStats* stats) {
  std::vector<const void*> key;
  for (const Linear* l : ls) key.push_back(l);
  std::lock_guard<std::mutex> lock(mutex_);
  Entry& e = entries_[key];
  if (!fresh(e, ls, ab, dt)) {
    e.a = at::Tensor();  // the old factors go before the new ones are made
    e.b = at::Tensor();
    std::tie(e.a, e.b) = make(ls, ab, dt);
    e.dtype = dt;
    e.linears = ls;
    e.sources.clear();
    e.versions.clear();
    e.scales.clear();
    for (const Linear* l : ls) e.scales.push_back(l->lora->scale);
    for (const at::Tensor& t : ab) {
      e.sources.emplace_back(c10::weak_intrusive_ptr<c10::TensorImpl>(t.getIntrusivePtr()));
      e.versions.push_back(t._version());
    }
    if (stats) ++stats->lora_factor_builds;
  }
  return {e.a, e.b};
}

void LoraFactorCache::refresh(ModelStats* stats) {
  std::lock_guard<std::mutex> lock(mutex_);
  std::vector<ScaledCopy> copies;
  std::vector<std::pair<Entry*, std::vector<at::Tensor>>> refreshed;
  for (auto& [key, e] : entries_) {
    if (!e.a.defined() || e.sources.size() != 2 * e.linears.size() || e.scales.size() != e.linears.size()) continue;
    std::vector<at::Tensor> ab;
    bool changed = false, same = true;
    for (size_t i = 0; i < e.sources.size() && same; ++i) {
      c10::intrusive_ptr<c10::TensorImpl> alive = e.sources[i].lock();
      if (!alive) {
        same = false;
        break;
      }
      ab.emplace_back(std::move(alive));
      changed = changed || ab.back()._version() != e.versions[i];
      same = ab.back().scalar_type() == at::kFloat && ab.back().dim() == 2 && ab.back().device() == e.a.device();
    }
    // (a linear's adapter may be left out for a pass: DPO's reference of fresh adapters)
    for (size_t i = 0; i < e.linears.size() && same; ++i)
      same = e.linears[i]->lora && e.scales[i] == e.linears[i]->lora->scale;
    // (fp32 compute: a single linear's factors may be its masters themselves, which make() returns as they are)
    for (size_t i = 0; i < ab.size() && same; ++i) same = !e.a.is_alias_of(ab[i]) && !e.b.is_alias_of(ab[i]);
    if (!same || !changed) continue;
    // The layout make() gives: the As stacked into a's rows, each B scaled on bd's diagonal.
    int64_t off = 0, roff = 0;
    std::vector<ScaledCopy> mine;
    for (size_t i = 0; i < e.linears.size() && same; ++i) {
      const at::Tensor A = ab[2 * i].detach(), B = ab[2 * i + 1].detach();
      const int64_t r = A.size(0);
      same = B.size(1) == r && A.size(1) == e.a.size(1) && roff + r <= e.a.size(0) && off + B.size(0) <= e.b.size(0) &&
             roff + r <= e.b.size(1);
      if (!same) break;
      mine.push_back({e.a.narrow(0, roff, r), A, 1.0});
      mine.push_back({e.b.narrow(0, off, B.size(0)).narrow(1, roff, r), B, e.scales[i]});
      off += B.size(0);
      roff += r;
    }
    if (!same || roff != e.a.size(0) || off != e.b.size(0)) continue;
    copies.insert(copies.end(), mine.begin(), mine.end());
    refreshed.emplace_back(&e, std::move(ab));
  }
  if (copies.empty()) return;
  {
    at::NoGradGuard no_grad;
    scaled_copies(copies);
  }
  for (auto& [e, ab] : refreshed) {
    // (the kernel writes through raw pointers: the factors' versions move as copy_'s would, so that a held weight's
    // copy of them (HeldWeight::lora_current) and autograd's saved-tensor checks see the change)
    e->a.unsafeGetTensorImpl()->bump_version();
    e->b.unsafeGetTensorImpl()->bump_version();
    for (size_t i = 0; i < ab.size(); ++i) e->versions[i] = ab[i]._version();
  }
  if (stats) {
    stats->lora_factor_refreshes += static_cast<int64_t>(refreshed.size());
    ++stats->lora_factor_refresh_launches;
  }
}

bool LoraFactorCache::fresh(const Entry& e, const std::vector<const Linear*>& ls, at::TensorList ab,
                            at::ScalarType dt) {
  if (!e.a.defined() || e.dtype != dt || e.sources.size() != ab.size() || e.scales.size() != ls.size()) return false;
  for (size_t i = 0; i < ls.size(); ++i)
    if (e.scales[i] != ls[i]->lora->scale) return false;
  for (size_t i = 0; i < ab.size(); ++i) {
    c10::intrusive_ptr<c10::TensorImpl> alive = e.sources[i].lock();
    if (!alive || alive.get() != ab[i].unsafeGetTensorImpl() || e.versions[i] != ab[i]._version()) return false;
  }
  return true;
}

std::pair<at::Tensor, at::Tensor> LoraFactorCache::make(const std::vector<const Linear*>& ls, at::TensorList ab,
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

std::pair<at::Tensor, at::Tensor> lora_factors(const Pass& pass, const std::vector<const Linear*>& ls,
                                               at::TensorList ab, at::ScalarType dt) {
  return pass.factors ? pass.factors->get(ls, ab, dt, pass.stats) : LoraFactorCache::make(ls, ab, dt);
}

at::Tensor nf4_linear(const at::Tensor& x, const std::shared_ptr<Nf4Weight>& w, ModelStats* stats) {
  return Nf4LinearFn::apply(x, reinterpret_cast<int64_t>(w.get()), reinterpret_cast<int64_t>(stats));
}

std::pair<at::Tensor, at::Tensor> nf4_linear_dora_norm(const at::Tensor& x, const std::shared_ptr<Nf4Weight>& w,
                                                       const at::Tensor& A, const at::Tensor& B, double scale,
                                                       ModelStats* stats) {
  auto out = Nf4DoraFn::apply(x, reinterpret_cast<int64_t>(w.get()), A.detach(), B.detach(), scale,
                              reinterpret_cast<int64_t>(stats));
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

at::Tensor frozen_weight(const Linear& l, c10::ScalarType dtype, ModelStats* stats) {
  if (l.held && l.held->weight.defined() && l.held->weight.scalar_type() == dtype &&
      l.held->weight.size(0) >= l.out_features() && l.held->weight.size(1) == l.in_features())
    return l.held->weight.narrow(0, 0, l.out_features());  // (a tall weight's base rows: tall_weight)
  at::Tensor W = l.base_weight(dtype);
  if (l.quantized() && stats) ++stats->dequantized_weights;
  if (l.held && l.quantized()) l.held->hold(W);
  return W;
}

bool lora_node_applies(const Linear& l) {
  const bool frozen_base = l.quantized() || !l.weight.requires_grad();
  return l.lora && !l.lora->dora() && frozen_base && l.lora->A.scalar_type() == at::kFloat &&
         l.lora->B.scalar_type() == at::kFloat;
}

at::Tensor unwritten_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return at::empty({}, options).expand(sizes);
}

at::Tensor linear_output_unused(const Linear& l, const at::Tensor& x, const Pass& pass) {
  if (!lora_node_applies(l) || l.bias.defined()) return l.forward(x, pass);
  return LoraLinearFn::apply(x, l.lora->A, l.lora->B, l.lora->scale, reinterpret_cast<int64_t>(&l),
                             /*output_unused=*/true, reinterpret_cast<int64_t>(&pass), /*swiglu_input=*/false,
                             active_dropout(l));
}

at::Tensor swiglu_linear(const Linear& l, const at::Tensor& gate_up, const Pass& pass, bool output_unused) {
  if (!lora_node_applies(l) || l.bias.defined()) return {};
  return LoraLinearFn::apply(gate_up, l.lora->A, l.lora->B, l.lora->scale, reinterpret_cast<int64_t>(&l),
                             output_unused, reinterpret_cast<int64_t>(&pass), /*swiglu_input=*/true,
                             active_dropout(l));
}

at::Tensor Linear::forward(const at::Tensor& x, const Pass& pass) const {
  if (lora && lora->dora()) return dora_forward(x, pass);
  if (lora_node_applies(*this)) {
    at::Tensor y = LoraLinearFn::apply(x, lora->A, lora->B, lora->scale, reinterpret_cast<int64_t>(this),
                                       /*output_unused=*/false, reinterpret_cast<int64_t>(&pass),
                                       /*swiglu_input=*/false, active_dropout(*this));
    return bias.defined() ? y + bias.to(y.scalar_type()) : y;
  }
  at::Tensor y = quantized() ? nf4_linear(x, nf4, pass.stats) : at::linear(x, weight);
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

// PEFT (peft.tuners.lora.variants.DoraLinearVariant.forward, DoraLinearLayer.forward) adds to the base result
//   (m / n - 1) * base + m / n * scale * B A h,    n = ||W + scale B A||_row (no gradient)
// where h = dropout(x) and base = h W^T when dropout is active in training, else h = x and base = x W^T (the base
// result less its bias). Without dropout that sums to m / n * (x W^T + scale B A x) + bias, computed so here; with
// it, x W^T - h W^T + m / n * (h W^T + scale B A h) + bias. As for LoRA, h W^T + scale B A h is one addmm.
at::Tensor Linear::dora_forward(const at::Tensor& x, const Pass& pass) const {
  const LoraAdapter& a = *lora;
  const bool drop = training && a.dropout > 0;
  const at::Tensor h = drop ? at::dropout(x, a.dropout, /*train=*/true) : x;
  const auto dt = x.scalar_type();
  at::Tensor base_h, norm;
  if (quantized()) {
    std::tie(base_h, norm) = nf4_linear_dora_norm(h, nf4, a.A, a.B, a.scale, pass.stats);
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
  if (drop) y = y + (quantized() ? nf4_linear(x, nf4, pass.stats) : at::linear(x, weight)) - base_h;
  if (bias.defined()) y = y + bias.to(y.scalar_type());
  return y;
}

}  // namespace qt
