#include "lib/model/projection_group.h"

#include <ATen/ATen.h>
#include <algorithm>
#include <torch/csrc/autograd/custom_function.h>

#include "lib/kernels/fused_ops.h"
#include "lib/kernels/nf4_dequant.h"
#include "lib/kernels/nf4_gemm.h"
#include "lib/kernels/tuned_gemm.h"

namespace qt {
namespace {

// The members' B gradients (lora_grads' jobs), fp32: each member's block of dy^T t ([sum out, sum r]'s diagonal),
// times its scale, over its columns of dy (the off-diagonal blocks are never computed).
std::vector<LoraGrad> member_b_jobs(const std::vector<const Linear*>& ls, const at::Tensor& dy, const at::Tensor& t) {
  std::vector<LoraGrad> jobs;
  for (int64_t i = 0, off = 0, roff = 0; i < static_cast<int64_t>(ls.size()); ++i) {
    const int64_t r = ls[i]->lora->A.size(0), n = ls[i]->out_features();
    jobs.push_back({t.narrow(1, roff, r), dy.narrow(1, off, n), ls[i]->lora->scale, true});
    off += n;
    roff += r;
  }
  return jobs;
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
// term on its epilogue, not one per member summed by autograd. ab: A0, B0, A1, B1, ... (fp32 masters). bias: the
// members' frozen biases side by side (Qwen2's q / k / v), added by the base GEMM (addmm), or undefined. With LoRA
// dropout (every member's the same) each member's A reads its own mask of x (drawn in member order, drawn again in
// the backward pass: qlora_linear.h), so the A products are one GEMM a member.
struct GroupLoraLinearFn : public torch::autograd::Function<GroupLoraLinearFn> {
  // The bases dequantized into [total, in], or with the LoRA B blocks `bd` in `extra` more columns (zero beyond
  // bd's): [total, in + extra] = [W | bd | 0] (concat_b). Where the group holds its weight (the first member's
  // `held`), that buffer, dequantized on first use only (the B columns written when bd is not the tensor, at the
  // version, written there last: HeldWeight::lora_current); `stats` counts the dequantizations that run.
  static at::Tensor weight(const std::vector<const Linear*>& ls, int64_t total, at::ScalarType dt, ModelStats* stats,
                           const at::Tensor& bd = {}, int64_t extra = 0) {
    const int64_t in = ls[0]->in_features();
    HeldWeight* held = ls[0]->held.get();
    at::Tensor W;
    if (held && held->weight.defined() && held->weight.scalar_type() == dt && held->weight.size(0) == total &&
        (extra == 0 ? held->weight.size(1) >= in : held->weight.size(1) == in + extra)) {
      W = held->weight;
    } else {
      W = at::empty({total, in + extra}, at::TensorOptions().dtype(dt).device(ls[0]->nf4->device()));
      std::vector<const Nf4Weight*> ws;
      std::vector<at::Tensor> outs;
      int64_t off = 0;
      for (const Linear* l : ls) {
        ws.push_back(l->nf4.get());
        outs.push_back(W.narrow(0, off, l->out_features()).narrow(1, 0, in));
        off += l->out_features();
      }
      dequantize_group_into(ws, outs);
      if (stats) stats->dequantized_weights += static_cast<int64_t>(ls.size());
      if (held) held->hold(W);
    }
    if (extra > 0) {
      const bool kept = held && W.is_same(held->weight);
      if (!kept || !held->lora_current(bd)) {
        W.narrow(1, in, bd.size(1)).copy_(bd);
        if (extra > bd.size(1)) W.narrow(1, in + bd.size(1), extra - bd.size(1)).zero_();
        if (kept) {
          held->lora_wrote(bd);
          if (stats) ++stats->held_lora_writes;
        }
      }
      return W;
    }
    return W.narrow(1, 0, in);
  }
  // concat_b: the LoRA B terms inside the base GEMM by concatenation along K, y = [x | t | 0] [W | bd | 0]^T,
  // instead of an addmm over y (which reads and writes all of y: 0.94 GB for gate/up at 8k tokens of the 8B
  // shape). Costs a copy of x into the wider input and 1-2% more GEMM FLOPs. The extra columns are bd's padded
  // to 8 (16-byte rows); on CUDA the bases' columns a multiple of the dequantization kernel's strided rows.
  static int64_t concat_columns(const at::Tensor& bd) { return (bd.size(1) + 7) / 8 * 8; }
  static bool concat_applies(const std::vector<const Linear*>& ls, const at::Tensor& x) {
    return !x.is_cuda() || ls[0]->in_features() % kernels::kNf4StridedCols == 0;
  }
  // Whether the group's forward product takes the fused NF4 GEMM (Pass::nf4_gemm; qlora_linear.cpp's
  // nf4_gemm_applies): no 16-bit weight held or kept, no bias, and the kernel takes [x | t] with bd as its tail.
  // Fills `nf4s` with the members' NF4 data where it does.
  static bool nf4_gemm_fits(const Pass& pass, const std::vector<const Linear*>& ls, const at::Tensor& bias,
                            const at::Tensor& xc, const at::Tensor& bd, std::vector<const kernels::Nf4Data*>& nf4s) {
    if (!pass.nf4_gemm || pass.keep_dequantized || bias.defined() || ls[0]->held) return false;
    for (const Linear* l : ls) {
      if (!l->quantized() || l->held) return false;
      nf4s.push_back(&l->nf4->data);
    }
    const int64_t in = ls[0]->in_features();
    if (kernels::nf4_gemm_unfit(xc.narrow(1, 0, in + bd.size(1)), nf4s, /*out (made here)=*/{}, bd).empty()) return true;
    nf4s.clear();
    return false;
  }
  // t = [dropout_0(x) A_0^T | dropout_1(x) A_1^T | ...] into `t` ([N, sum r]): each member's mask drawn in turn
  // (as the members' own nodes would draw them), the draw's record (qlora_linear.h: draw_lora_dropout) pushed to
  // `states`.
  static void dropped_lora_inputs(const std::vector<const Linear*>& ls, const at::Tensor& x2, const at::Tensor& a,
                                  double p, const Pass& pass, at::Tensor t, std::vector<at::Tensor>& states) {
    const at::Tensor xd = x2.contiguous();
    for (int64_t i = 0, roff = 0; i < static_cast<int64_t>(ls.size()); ++i) {
      const int64_t r = ls[i]->lora->A.size(0);
      at::Tensor state;
      if (lora_project(t.narrow(1, roff, r), draw_lora_dropout(xd, p, state, pass.dropout_kernels),
                       a.narrow(0, roff, r), pass.lora_project_kernel))
        pass.count(&ModelStats::lora_gemm_kernel_runs);
      states.push_back(state);
      roff += r;
    }
  }
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                                                at::TensorList ab, const std::vector<int64_t>& linear_ptrs,
                                                bool concat_b, bool output_unused, int64_t pass_ptr,
                                                int64_t bias_ptr, double dropout, bool x_widened) {
    const auto ls = members(linear_ptrs);
    const at::Tensor& bias = *reinterpret_cast<const at::Tensor*>(bias_ptr);  // read in this call only
    const Pass& pass = *reinterpret_cast<const Pass*>(pass_ptr);  // read in this call only
    const auto dt = x.scalar_type();
    const auto [a, bd] = lora_factors(pass, ls, ab, dt);  // [sum r, in], [sum out, sum r]
    const int64_t total = bd.size(0);
    at::Tensor x2 = x.reshape({-1, x.size(-1)});
    concat_b = concat_b && !output_unused && concat_applies(ls, x);
    const bool wide = pass.lora_in_grad_gemm && concat_applies(ls, x);  // the backward's [dx | g] GEMM
    std::vector<at::Tensor> states;  // LoRA dropout: each member's draw's record
    // [N, sum r] into `out`: x A^T, or with dropout each member's dropped input times its A.
    auto lora_inputs = [&](at::Tensor out) {
      if (dropout > 0) dropped_lora_inputs(ls, x2, a, dropout, pass, out, states);
      else if (lora_project(out, x2, a, pass.lora_project_kernel))
        pass.count(&ModelStats::lora_gemm_kernel_runs);
    };
    at::Tensor t, W, y;
    if (output_unused) {  // only what the backward saves (a recomputation whose values are kept elsewhere)
      t = at::empty({x2.size(0), a.size(0)}, x2.options());
      lora_inputs(t);
      // One element, not [tokens, sum out]: 1.9 GB at 8B 1 x 32768 for gate / up (its value is kept elsewhere).
      y = unwritten_output({x2.size(0), total}, x2.options());
      pass.count(&ModelStats::outputs_skipped);
    } else if (concat_b) {
      const int64_t in = x2.size(1), extra = concat_columns(bd), r = bd.size(1);
      at::Tensor xc;
      const bool in_place =
          x_widened && x2.stride(1) == 1 && (x2.size(0) <= 1 || x2.stride(0) == in + extra) &&
          x2.storage().nbytes() >=
              static_cast<size_t>((x2.storage_offset() + x2.size(0) * (in + extra)) * x2.element_size());
      if (in_place) {
        // x already sits in the first columns of [x | spare]: the norm wrote it there. An alias autograd does not
        // track (a view of x's buffer made here would be one made without grad mode of a base autograd records);
        // x's buffer stays alive with x2, saved below beside t.
        xc = at::from_blob(x2.data_ptr(), {x2.size(0), in + extra}, {in + extra, 1}, x2.options());
        pass.count(&ModelStats::concat_inputs_in_place);
      } else {
        xc = at::empty({x2.size(0), in + extra}, x2.options());
        copy_rows(xc.narrow(1, 0, in), x2);
      }
      t = xc.narrow(1, in, r);
      lora_inputs(t);  // [N, sum r], in place in the wider input
      if (extra > r) xc.narrow(1, in + r, extra - r).zero_();
      std::vector<const kernels::Nf4Data*> nf4s;
      if (nf4_gemm_fits(pass, ls, bias, xc, bd, nf4s)) {
        // [x | t] [W | bd]^T in one fused NF4 GEMM: W dequantized in its main loop, the B terms its last columns.
        y = at::empty({x2.size(0), total}, x2.options());
        kernels::nf4_linear_into(xc.narrow(1, 0, in + r), nf4s, y, /*accumulate=*/false, bd, pass.nf4_gemm_variant);
        pass.count(&ModelStats::nf4_gemm_runs);
      } else {
        W = weight(ls, total, dt, pass.stats, bd, extra);  // kept whole where the backward's [dx | g] GEMM reads it
        y = bias.defined() ? at::addmm(bias, xc, W.t()) : kernels::gemm(xc, W.t());
        if (!wide) W = W.narrow(1, 0, in);
      }
      if (!in_place) x2 = xc.narrow(1, 0, in);  // saved below as a view of the wider input, which t keeps alive anyway
      pass.count(&ModelStats::lora_b_in_gemm_runs);
    } else {
      t = at::empty({x2.size(0), a.size(0)}, x2.options());
      lora_inputs(t);  // [N, sum r]
      // [W | bd | 0] where its columns can be strided (the backward's [dx | g] GEMM reads it whole), else [W]
      W = wide ? weight(ls, total, dt, pass.stats, bd, concat_columns(bd)) : weight(ls, total, dt, pass.stats);
      const at::Tensor Wb = W.narrow(1, 0, x2.size(1));
      y = bias.defined() ? at::addmm(bias, x2, Wb.t()) : kernels::gemm(x2, Wb.t());
      y.addmm_(t, bd.t());
    }
    ctx->save_for_backward({x2, a, bd, t, pass.keep_dequantized ? W : at::Tensor()});
    ctx->saved_data["linears"] = linear_ptrs;
    ctx->saved_data["stats"] = reinterpret_cast<int64_t>(pass.stats);
    ctx->saved_data["dropout"] = dropout;
    ctx->saved_data["wide"] = wide;
    int64_t widest = x2.size(1);
    for (const Linear* l : ls) widest = std::max(widest, l->out_features());
    ctx->saved_data["lora_gemm"] = pass.lora_grad_kernel_for(widest);
    if (dropout > 0) ctx->saved_data["dropout_states"] = at::TensorList(states);
    std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
    shape.back() = total;
    return {output_unused ? unwritten_output(shape, x2.options()) : y.view(shape)};
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto ls = members(ctx->saved_data["linears"].toIntVector());
    auto saved = ctx->get_saved_variables();
    const at::Tensor &x2 = saved[0], &a = saved[1], &bd = saved[2], &t = saved[3], &kept = saved[4];
    const auto dt = x2.scalar_type();
    const int64_t total = bd.size(0);
    at::Tensor dy = grads[0].reshape({-1, total}).to(dt);
    const int64_t in = x2.size(1), r = bd.size(1);
    at::Tensor g, dx;  // g: the gradient of t, [N, sum r]
    if (ctx->needs_input_grad(0)) {
      auto* stats = reinterpret_cast<ModelStats*>(ctx->saved_data["stats"].toInt());
      const bool wide = ctx->saved_data["wide"].toBool();
      const int64_t extra = wide ? concat_columns(bd) : 0;
      const at::Tensor W = kept.defined() ? kept : weight(ls, total, dt, stats, bd, extra);
      if (wide && W.size(1) == in + extra) {
        // [dx | g | 0] = dy [W | bd | 0]: g rides on the input gradient's GEMM (N wider by sum r rounded up to 8)
        // instead of its own GEMM reading all of dy again (0.09 ms a block for gate / up at 2 x 2048 tokens)
        const at::Tensor o = kernels::gemm(dy, W);
        dx = o.narrow(1, 0, in);
        g = o.narrow(1, in, r);
        if (stats) ++stats->lora_in_grad_gemm_runs;
      } else {
        g = at::mm(dy, bd);
        dx = kernels::gemm(dy, W.narrow(1, 0, in));
      }
    } else {
      g = at::mm(dy, bd);
    }
    at::Tensor dA;  // [sum r, in]
    std::vector<at::Tensor> dBs;
    const double dropout = ctx->saved_data["dropout"].toDouble();
    const bool lora_gemm = ctx->saved_data["lora_gemm"].toBool();
    bool ran = false;  // the gradients' kernel
    if (dropout > 0) {  // each member's mask drawn again: its A's gradient and its input gradient term
      const auto states = ctx->saved_data["dropout_states"].toTensorVector();
      const at::Tensor xd = x2.contiguous();
      dA = at::empty(a.sizes(), a.options().dtype(at::kFloat));
      for (int64_t i = 0, roff = 0; i < static_cast<int64_t>(ls.size()); ++i) {
        const int64_t r = ls[i]->lora->A.size(0);
        const RedrawnDropout drop = redraw_lora_dropout(xd, dropout, states[static_cast<size_t>(i)]);
        const at::Tensor gi = g.narrow(1, roff, r);
        dA.narrow(0, roff, r).copy_(at::mm(gi.t(), drop.h));
        if (dx.defined()) add_lora_dropout_grad(dx, gi, a.narrow(0, roff, r), drop, dropout);
        roff += r;
      }
      dBs = lora_grads(member_b_jobs(ls, dy, t), lora_gemm, 0, &ran);
    } else {
      if (dx.defined()) dx.addmm_(g, a);
      // dA = g^T x and the members' B gradients: one launch where the kernel takes them
      std::vector<LoraGrad> jobs{{g, x2, 1.0, false}};
      for (LoraGrad& j : member_b_jobs(ls, dy, t)) jobs.push_back(std::move(j));
      dBs = lora_grads(jobs, lora_gemm, 0, &ran);
      dA = dBs.front();
      dBs.erase(dBs.begin());
    }
    auto* stats = reinterpret_cast<ModelStats*>(ctx->saved_data["stats"].toInt());
    if (ran && stats) ++stats->lora_gemm_kernel_runs;
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
    out.emplace_back();  // pass_ptr
    out.emplace_back();  // bias_ptr
    out.emplace_back();  // dropout
    out.emplace_back();  // x_widened
    return out;
  }
};

// The group's LoRA masters (A0, B0, A1, B1, ...), member pointers and biases (every member's, frozen, or none)
// when project_group takes it, else false.
bool group_inputs(const std::vector<const Linear*>& ls, const at::Tensor& x, std::vector<at::Tensor>& ab,
                  std::vector<int64_t>& ptrs, at::Tensor& bias) {
  if (ls.empty() || ls.size() > static_cast<size_t>(kernels::kNf4MaxJobs)) return false;
  const bool biased = ls[0]->bias.defined();
  for (const Linear* l : ls)
    if (!lora_node_applies(*l) || !l->quantized() || l->bias.defined() != biased ||
        active_dropout(*l) != active_dropout(*ls[0]) ||
        (biased && l->bias.requires_grad()) || l->in_features() != ls[0]->in_features() ||
        l->nf4->device() != x.device())
      return false;
  std::vector<at::Tensor> biases;
  for (const Linear* l : ls) {
    ab.push_back(l->lora->A);
    ab.push_back(l->lora->B);
    ptrs.push_back(reinterpret_cast<int64_t>(l));
    if (biased) biases.push_back(l->bias.to(x.scalar_type()));
  }
  if (biased) bias = at::cat(biases);
  return true;
}

}  // namespace

at::Tensor project_group(const std::vector<const Linear*>& ls, const at::Tensor& x, const Pass& pass, bool concat_b,
                         bool output_unused, bool x_widened) {
  std::vector<at::Tensor> ab;
  std::vector<int64_t> ptrs;
  at::Tensor bias;
  if (!group_inputs(ls, x, ab, ptrs, bias)) return {};
  return GroupLoraLinearFn::apply(x, at::TensorList(ab), ptrs, concat_b, output_unused,
                                  reinterpret_cast<int64_t>(&pass), reinterpret_cast<int64_t>(&bias),
                                  active_dropout(*ls[0]), x_widened)[0];
}

int64_t concat_input_spare(const std::vector<const Linear*>& ls, const at::Tensor& x) {
  std::vector<at::Tensor> ab;
  std::vector<int64_t> ptrs;
  at::Tensor bias;
  if (!group_inputs(ls, x, ab, ptrs, bias) || !GroupLoraLinearFn::concat_applies(ls, x)) return 0;
  int64_t r = 0;
  for (const Linear* l : ls) r += l->lora->A.size(0);
  return (r + 7) / 8 * 8;
}

}  // namespace qt
