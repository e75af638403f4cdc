#pragma once
// A block linear of the QLoRA model: a frozen base (dense, or NF4 dequantized just in time) plus a trainable LoRA or
// DoRA adapter, and the autograd nodes that run it (lib/model/qlora_linear.cpp): the NF4 base matmul, DoRA's norm,
// and the LoRA node whose sums ride on GEMM epilogues. Linears that read one input run as one projection through
// project_group (lib/model/projection_group.h).
#include <ATen/core/Tensor.h>
#include <c10/util/intrusive_ptr.h>

#include <atomic>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <utility>
#include <vector>

#include "lib/kernels/fused_ops.h"
#include "lib/model/pass.h"
#include "lib/quant/nf4.h"

namespace qt {

// Trainable low-rank adapter (Hu et al., LoRA, 2021): y += scale * B(A(dropout(x))).
// With `magnitude` defined it is DoRA (Liu et al., 2024, arXiv:2402.09353) as PEFT computes it
// (peft.tuners.lora.dora.DoraLinearLayer): y = m / ||W + scale B A||_row * (x W^T + scale B A x) (+ bias), the
// norm per output feature taken without gradient (the paper's section 4.3).
struct LoraAdapter {
  at::Tensor A;          // [r, in]   (PEFT: lora_A.weight)
  at::Tensor B;          // [out, r]  (PEFT: lora_B.weight), zero at init so training starts from the base
  at::Tensor magnitude;  // [out]     DoRA only (PEFT: lora_magnitude_vector); undefined for plain LoRA
  double scale = 1.0;    // alpha / r, or alpha / sqrt(r) with rsLoRA
  double dropout = 0.0;

  bool dora() const { return magnitude.defined(); }
};

// A block linear's frozen NF4 base dequantized once and held for the run (the plan's dequantized_blocks): made on
// first use in the compute dtype, then read by every pass instead of dequantizing again. For a projection group
// (q / k / v, gate / up) its first member's holds the group's weight as project_group lays it out.
struct HeldWeight {
  at::Tensor weight;
  // The LoRA factor last written into the weight's extra columns (a group's [W | bd | 0]) or rows (down_proj's
  // [W; a; 0]), and its version then: a pass skips the copy while the factor is that tensor at that version (the
  // factor cache's between optimizer steps, or the one a forward pass made and its backward pass reads).
  std::optional<c10::weak_intrusive_ptr<c10::TensorImpl>> lora_written;
  int64_t lora_version = -1;

  void hold(at::Tensor w) {
    weight = std::move(w);
    lora_written.reset();
  }
  bool lora_current(const at::Tensor& f) const {
    if (!lora_written || lora_version != static_cast<int64_t>(f._version())) return false;
    const c10::intrusive_ptr<c10::TensorImpl> alive = lora_written->lock();
    return alive && alive.get() == f.unsafeGetTensorImpl();
  }
  void lora_wrote(const at::Tensor& f) {
    lora_written.emplace(f.getIntrusivePtr());
    lora_version = static_cast<int64_t>(f._version());
  }
};

// A block linear y = x W^T (+ b) (+ LoRA). The base is either dense (`weight`) or frozen NF4 (`nf4`), never both;
// the bias (attention_bias / mlp_bias) is always dense, even beside an NF4 base.
struct Linear {
  at::Tensor weight;                 // dense base [out, in]; undefined when quantized
  at::Tensor bias;                   // optional dense bias [out]; undefined when the config has none
  std::shared_ptr<Nf4Weight> nf4;    // frozen NF4 base; dequantized just in time, never kept in 16-bit
  std::shared_ptr<LoraAdapter> lora;  // null when the layer is not a LoRA target
  // Non-null: the NF4 base dequantized is held here for the run (the LoRA node and project_group read it; DoRA's
  // path dequantizes as before). Null: dequantized just in time.
  std::shared_ptr<HeldWeight> held;
  bool training = false;              // LoRA dropout is active only while training

  bool quantized() const { return static_cast<bool>(nf4); }
  int64_t out_features() const;
  int64_t in_features() const;
  // The base weight in `dtype` (dequantized when NF4): for export and tests, not for the forward pass.
  at::Tensor base_weight(c10::ScalarType dtype) const;
  at::Tensor forward(const at::Tensor& x, const Pass& pass = {}) const;

 private:
  at::Tensor dora_forward(const at::Tensor& x, const Pass& pass) const;
};

// The LoRA node's case, the fast path everywhere it applies: a frozen base (NF4, or dense without gradient), a
// plain LoRA adapter with fp32 masters (no DoRA), LoRA dropout or none. project_group takes such linears with an NF4
// base and no bias.
bool lora_node_applies(const Linear& l);

// LoRA dropout in the LoRA nodes (y = x W^T + s (dropout(x) A^T) B^T, as PEFT computes it). The mask is never kept
// for the backward pass: the draw's record is, and the backward pass draws the same mask again from it.
//   - On CUDA where the kernels take the input (fused_ops.h: lora_dropout_kernels_take), a counter-based mask
//     (lib/kernels/dropout_hash.h) whose key comes from the default CUDA generator's seed and offset (the offset
//     advanced by 4 a draw, so a checkpointed block's recomputation, which puts the generator's state back, draws the
//     same masks): no mask stored, the dropped input written once a pass, and the input gradient's LoRA term added
//     under its mask in one kernel. The record: the key, an int64 CPU tensor [1].
//   - Elsewhere (the CPU) at::dropout's mask, so that PEFT's masks and the unfused path's come from the same seed.
//     The record: the default generator's state before the draw (put back after the backward pass's draw).
// The probability in training, else 0.
double active_dropout(const Linear& l);
// dropout(x) in training (x [rows, cols]), `state` the draw's record; `kernels`: the counter-based masks where the
// kernels take x (Pass::dropout_kernels).
at::Tensor draw_lora_dropout(const at::Tensor& x, double p, at::Tensor& state, bool kernels = true);
// The same draw again from its record: dropout(x), and what its gradient needs (at::dropout's mask: on CUDA the bool
// mask of native_dropout, on the CPU the scaled noise; the counter-based mask: its key).
struct RedrawnDropout {
  at::Tensor h, factor;
  bool hashed = false;
  DropoutMask mask;
};
RedrawnDropout redraw_lora_dropout(const at::Tensor& x, double p, const at::Tensor& state);
// dx += dropout'(g a): the input gradient's LoRA term under the draw's mask (g [rows, r], a [r, cols]).
void add_lora_dropout_grad(const at::Tensor& dx, const at::Tensor& g, const at::Tensor& a, const RedrawnDropout& r,
                           double p);

// A stand-in for an output nobody reads (a recomputation's, whose value is kept elsewhere): `sizes` over one
// element (stride 0), so that its graph exists without the [tokens, features] bytes.
at::Tensor unwritten_output(at::IntArrayRef sizes, const at::TensorOptions& options);

// The linear's forward pass where its output is not read (a recomputation that takes the value from elsewhere):
// the LoRA node computes only what its backward saves; forward() where that node does not apply or there is a bias.
at::Tensor linear_output_unused(const Linear& l, const at::Tensor& x, const Pass& pass);

// l(silu(gate) * up) from one gate / up projection output [.., 2 I] (down_proj after the packed SwiGLU), as one
// LoRA node that keeps gate_up and recomputes the SwiGLU in its backward pass instead of keeping its [.., I] output
// (swiglu_packed then l.forward keep both). Undefined where the LoRA node does not apply (or there is a bias).
at::Tensor swiglu_linear(const Linear& l, const at::Tensor& gate_up, const Pass& pass, bool output_unused);

// The 16-bit base weight [out, in] of a frozen linear for a pass: the held one where the linear holds it (made now on
// first use), else dequantized now (NF4) or cast. `stats` counts the dequantizations that run.
at::Tensor frozen_weight(const Linear& l, c10::ScalarType dtype, ModelStats* stats);

// y = x W^T with W dequantized from NF4 into a scratch buffer in the forward pass and again in the backward
// pass (the QLoRA recipe: no 16-bit copy of W lives between them). Gradient flows to x only.
// `stats`, when given, counts the dequantizations.
at::Tensor nf4_linear(const at::Tensor& x, const std::shared_ptr<Nf4Weight>& w, ModelStats* stats = nullptr);

// DoRA's weight norm: the L2 norm of each row (output feature) of W + scale * B A, in fp32, without gradient.
// Computed over blocks of rows so that W + scale * B A never exists whole; W may be any floating dtype.
// PEFT: DoraLinearLayer.get_weight_norm (torch.linalg.norm(weight + scaling * lora_weight, dim=1)).
at::Tensor dora_weight_norm(const at::Tensor& W, const at::Tensor& A, const at::Tensor& B, double scale);

// nf4_linear that also returns dora_weight_norm(W, A, B, scale) of the same just-in-time dequantized W (one
// dequantization serves both). The norm carries no gradient; A and B are read detached.
std::pair<at::Tensor, at::Tensor> nf4_linear_dora_norm(const at::Tensor& x, const std::shared_ptr<Nf4Weight>& w,
                                                       const at::Tensor& A, const at::Tensor& B, double scale,
                                                       ModelStats* stats = nullptr);


// The LoRA factors as the GEMMs take them, for a linear or a group of linears reading one input: a = the As
// stacked [sum r, in] and bd = the scaled Bs on the diagonal of [sum out, sum r], in the activations' dtype.
// They change only when the optimizer (or a load) writes A or B, so under keep_dequantized they are made once per
// version of the fp32 masters and reused by every forward pass until then (the forward, the recomputation, the
// next micro-batch): a step of the 8B shape would otherwise run some 2,000 small cast / copy kernels for them.
// One cache per model; one entry per linear (or group), checked against the masters' identity and version
// counters.
class LoraFactorCache {
 public:
  // ab: A0, B0, A1, B1, ... (fp32 masters of ls, in order).
  std::pair<at::Tensor, at::Tensor> get(const std::vector<const Linear*>& ls, at::TensorList ab, at::ScalarType dt,
                                        ModelStats* stats);
  // The factors made now, nothing kept.
  static std::pair<at::Tensor, at::Tensor> make(const std::vector<const Linear*>& ls, at::TensorList ab,
                                                at::ScalarType dt);
  // Every entry whose masters changed in value only (an optimizer step; the same tensors, shapes, dtype and
  // scales) has its factors written again in place, all of them in one scaled_copies launch, instead of some ten
  // cast, cat, fill and copy kernels an entry in its first get() after the step (600 a step of the 8B shape). Called
  // at the start of a forward pass (QT_LORA_FACTOR_REFRESH=0: not, for A/B); get() makes what it leaves.
  void refresh(ModelStats* stats);

 private:
  struct Entry {
    std::vector<const Linear*> linears;
    std::vector<c10::weak_intrusive_ptr<c10::TensorImpl>> sources;
    std::vector<int64_t> versions;
    std::vector<double> scales;
    at::ScalarType dtype = at::kFloat;
    at::Tensor a, b;
  };
  static bool fresh(const Entry& e, const std::vector<const Linear*>& ls, at::TensorList ab, at::ScalarType dt);
  std::mutex mutex_;
  std::map<std::vector<const void*>, Entry> entries_;
};

// The factors of `ls` for a pass: from its cache when it has one, else made now.
std::pair<at::Tensor, at::Tensor> lora_factors(const Pass& pass, const std::vector<const Linear*>& ls,
                                               at::TensorList ab, at::ScalarType dt);

}  // namespace qt
