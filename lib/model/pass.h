#pragma once
// How one pass through the model runs its linears and attention, handed down explicitly from the model to the
// nodes (no thread-local switches): a training forward pass, a checkpointed block's recomputation for the backward
// pass that follows at once, or an evaluation pass. The model makes the base pass from its plan
// (LlamaModel::base_pass); block checkpointing derives the recomputation's from it.
#include <atomic>
#include <cstdint>

namespace qt {

class LoraFactorCache;  // lib/model/qlora_linear.h
struct AttentionStash;  // lib/kernels/attention_core.h

// What the model's passes did so far, one object per model (shared by its copies): for tests and logs.
struct ModelStats {
  std::atomic<int64_t> lora_factor_builds{0};   // compute-dtype LoRA factors made and kept (keep_dequantized)
  std::atomic<int64_t> lora_factor_refreshes{0};  // kept factors written again in place (LoraFactorCache::refresh)
  std::atomic<int64_t> lora_factor_refresh_launches{0};  // the refreshes' batches (one launch each on CUDA)
  // LoRA factors copied into held weights' extra columns or rows (HeldWeight::lora_current: not again while current)
  std::atomic<int64_t> held_lora_writes{0};
  std::atomic<int64_t> lora_b_in_gemm_runs{0};  // projections that took the LoRA B terms inside the base GEMM
  // Input gradients that took their LoRA term inside the base GEMM: a group's [dx | dy B] (N wider), down_proj's
  // [dy | dy B] [W; A] (K wider)
  std::atomic<int64_t> lora_in_grad_gemm_runs{0};
  std::atomic<int64_t> outputs_skipped{0};      // outputs a recomputation left unwritten (nobody reads them)
  std::atomic<int64_t> qkv_replays{0};          // recomputations that took their rotated q, k, v from keep "qkv"
  std::atomic<int64_t> residual_replays{0};     // recomputations that took the residual from keep "residual"
  std::atomic<int64_t> gate_up_replays{0};      // recomputations that took the kept gate / up output (no GEMM)
  std::atomic<int64_t> prefetched_offloads{0};  // offloaded tensors the backward took from a copy started ahead
  std::atomic<int64_t> dequantized_weights{0};  // NF4 weights dequantized (forward, recomputation, backward)
  std::atomic<int64_t> attention_forwards{0};   // attention kernels run on a block's stash (not replayed)
  std::atomic<int64_t> swiglu_recomputed{0};    // SwiGLU outputs down_proj's backward pass computed again
  std::atomic<int64_t> mlp_chunked_passes{0};   // MLP halves of a block computed chunk by chunk (their forward)
  std::atomic<int64_t> residuals_carried{0};    // block outputs handed on unsummed to the next norm (fused_add_norm)
  std::atomic<int64_t> padded_runs{0};            // forward passes whose rows were padded for cuDNN (row_multiple)
  // launches of LoRA's rank-r GEMM kernels (Pass::lora_project_kernel, Pass::lora_grad_kernel)
  std::atomic<int64_t> lora_gemm_kernel_runs{0};
  // concatenated inputs [x | x A^T | 0] built where the norm wrote x (project_group's x_widened), no copy of x
  std::atomic<int64_t> concat_inputs_in_place{0};
  // a linear's base GEMM accumulating onto its rank-r term (forward or input gradient; Pass::lora_add_after false)
  std::atomic<int64_t> base_onto_lora_runs{0};
  // forward products through the fused NF4 GEMM (Pass::nf4_gemm: no 16-bit copy of the weight written)
  std::atomic<int64_t> nf4_gemm_runs{0};
};

// LoRA's rank-r GEMM kernels by default (Pass::lora_project_kernel, Pass::lora_grad_kernel): off. They pass their
// [gpu] tests on an H100 and an H200, but cuBLAS's GEMMs were faster in the model, 8B 2 x 2048 on an H200: 17,610 tok/s
// against 17,469 with the gradients' kernel, 17,338 with the projection's, 17,242 with both (docs/PERFORMANCE.md,
// "Eighteenth session": their cp.async loads move 13-23 GB/s an SM where a bandwidth-bound kernel needs 25-36).
constexpr bool kLoraProjectKernelByDefault = false;
constexpr bool kLoraGradKernelByDefault = false;
constexpr int64_t kLoraGradNarrowWidth = 4096;

struct Pass {
  // Non-null: the compute-dtype LoRA factors (the As stacked, the scaled Bs) come from this cache, made once per
  // version of the fp32 masters (plans with keep_dequantized or blocks holding their weights); null: made in each call,
  // nothing held.
  LoraFactorCache* factors = nullptr;
  ModelStats* stats = nullptr;  // null: nothing counted
  // A checkpointed block's recomputation for the backward pass that follows at once: the LoRA nodes keep the 16-bit
  // weights they dequantize for that backward (one dequantization less per linear and step).
  bool keep_dequantized = false;
  // The recomputation rebuilds the graph and what the backward saves; the block's output value is never read. So
  // the block's last linear (down_proj with a plain LoRA adapter) computes only what its backward saves, and a
  // chunked MLP, which recomputes its chunks in its own backward anyway, computes nothing.
  bool output_unused = false;
  // down_proj's node keeps the SwiGLU output it computed for its backward pass instead of recomputing it there from
  // gate and up: a recomputation's always (its backward pass follows at once), a forward pass's where the plan keeps
  // it (ExecPlan::keep_swiglu: blocks that keep their activations).
  bool keep_swiglu = false;
  // The input gradients' LoRA terms inside the base GEMMs (ModelStats::lora_in_grad_gemm_runs); false: their own
  // GEMMs and an addmm after the base GEMM, as before 2026-12-05 (QT_LORA_GRAD_GEMM=0, for A/B measurements).
  bool lora_in_grad_gemm = true;
  // LoRA dropout through the counter-based mask kernels where they take the input (qlora_linear.h); false:
  // at::dropout's masks everywhere, as before 2026-12-05 (QT_LORA_DROPOUT_KERNELS=0, for A/B measurements).
  bool dropout_kernels = true;
  // The kept LoRA factors whose masters an optimizer step changed are written again in one batch at the start of
  // a forward pass (LoraFactorCache::refresh); false: each remade in its first use, as before 2026-12-05
  // (QT_LORA_FACTOR_REFRESH=0, for A/B measurements).
  bool refresh_factors = true;
  // A block's attention residual and its MLP's input norm in one kernel each way (add_rms_norm_fused); false: the add
  // and the norm apart, as before 2026-12-05 (QT_FUSED_ADD_NORM=0, for A/B measurements).
  bool fused_add_norm = true;
  // LoRA's rank-r GEMMs through lora_project's kernel (x A^T, forward) and lora_grads' (the A and B gradients, one
  // launch a node) where they take the operands (fused_ops.h); false: ATen's GEMMs. QT_LORA_GEMM_KERNELS sets them
  // (A/B measurements): 1 both, 0 neither, "project" or "grads" one, "narrow" the gradients' on narrow nodes only
  // (lora_grad_max_width); unset, kLoraProjectKernelByDefault and kLoraGradKernelByDefault.
  bool lora_project_kernel = false;
  bool lora_grad_kernel = false;
  // > 0: the gradients' kernel only for nodes whose operands are all at most this wide (q / k / v and o_proj; not
  // gate / up or down_proj, whose intermediate-wide operands cuBLAS reads faster: bench_lora_gemm on an H100).
  // QT_LORA_GEMM_KERNELS=narrow sets it to kLoraGradNarrowWidth.
  int64_t lora_grad_max_width = 0;
  // Whether a node whose widest operand (input, output or a member's output) is `widest` takes the gradients' kernel.
  bool lora_grad_kernel_for(int64_t widest) const {
    return lora_grad_kernel && (lora_grad_max_width <= 0 || widest <= lora_grad_max_width);
  }
  // A linear's rank-r term (o_proj, down_proj forward; o_proj's input gradient) computed first and the base GEMM
  // accumulating onto it (beta 1); true: the base GEMM first and an addmm over its output after it, as before
  // 2026-12-06 (QT_LORA_ADD_AFTER=1, for A/B measurements).
  bool lora_add_after = false;
  // The norms before q / k / v and gate / up write into the first columns of the groups' concatenated inputs
  // [x | x A^T | 0] (rms_norm_fused's spare columns): gate / up's input not copied there, and q / k / v's LoRA B terms
  // inside the base GEMM too (no addmm over the output); false: as before 2026-12-06 (QT_NORM_INTO_CONCAT=0).
  bool norm_into_concat = true;
  // The forward products of NF4 bases that hold no 16-bit copy (no held weight, none kept for the backward pass)
  // through the fused NF4 GEMM (lib/kernels/nf4_gemm.h: the weight dequantized in its main loop, the LoRA B terms
  // as its last columns) where it takes the operands (a Hopper GPU, bf16); false: dequantized into scratch, then
  // cuBLAS. QT_NF4_GEMM=1 sets it (A/B measurements; off by default: 8B 2 x 2048 at 24 GiB ran 13,756 tok/s with
  // it against 16,217 without on an H100, the kernel at 51-57% of cuBLAS's rate: docs/PERFORMANCE.md).
  bool nf4_gemm = false;
  // The kernel's variant there (Nf4GemmArgs::variant, lib/kernels/sm90/nf4_gemm_sm90.h; 0 its default):
  // QT_NF4_GEMM_VARIANT=N (kernels::nf4_gemm_variant), for A/B measurements of the variants that compute right values.
  int nf4_gemm_variant = 0;
  // The block's attention stash (the keep ladder: record in the forward pass, replay in the recomputation); null:
  // none.
  AttentionStash* stash = nullptr;

  void count(std::atomic<int64_t> ModelStats::*counter) const {
    if (stats) ++(stats->*counter);
  }
};

}  // namespace qt
