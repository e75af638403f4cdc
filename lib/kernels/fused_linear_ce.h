#pragma once
// Fused lm_head + cross-entropy: loss over [T, V] logits without ever holding them.
//
// Tokens are processed in chunks: each chunk's logits tile [chunk, V] is one GEMM, then one pass per row
// computes max, sum-exp (fp32), the loss, and overwrites the tile with dLoss/dlogits; two more GEMMs turn
// that into dL/dhidden (rows of the chunk) and accumulate dL/dW. The gradients are thus produced in the
// forward pass (the idea of llm.c's fused_classifier and of Liger-Kernel's fused linear cross-entropy);
// backward only scales them by grad_output. Extra memory: one tile plus dh (plus dW when trainable).
#include <ATen/ATen.h>

#include <cstdint>

namespace qt {

struct FusedLinearCeOptions {
  // Tokens per logits tile. 0: automatic (fused_linear_ce_chunk_tokens below), bounded so the tile is about
  // the size of the hidden state when the weight is trainable, <= 192 MiB when it is frozen.
  int64_t chunk_tokens = 0;
  // Automatic chunk divided by 4: less memory, more passes over dW (slower when the weight is trainable).
  bool low_memory = false;
  int64_t ignore_index = -100;
  // Same definition as torch.nn.functional.cross_entropy(label_smoothing=eps):
  // loss = (1 - eps) * (lse - z_y) + eps * (lse - mean_j z_j).
  double label_smoothing = 0.0;
  // PaLM's auxiliary z-loss (Chowdhery et al. 2022, sec. 5): adds z_loss * lse^2 per counted token.
  double z_loss = 0.0;
  // Gemma 2's final-logit soft-capping: z = cap * tanh(x / cap); 0 disables.
  double logit_softcap = 0.0;
  // Check labels are in [0, V) or ignore_index (one device sync per call on CUDA); a bad label is a
  // qt::Error of kind Data. Unchecked, a bad label makes its row's loss NaN on CUDA.
  bool check_labels = true;
  // CUDA, trainable weight: run the dW GEMM (memory-bound at small chunks) on a side stream, concurrently with
  // the dh GEMM (compute-bound). No extra memory beyond the side stream's cuBLAS workspace.
  bool overlap_dw = true;
  // Run the plain-ATen reference even for CUDA tensors (tests, debugging).
  bool force_reference = false;
};

struct FusedLinearCeResult {
  at::Tensor loss_sum;  // fp32 scalar: sum of the loss over counted tokens; differentiable
  at::Tensor count;     // int64 scalar: number of tokens whose label is not ignore_index
  // loss_sum / max(count, 1), differentiable, for logging or single-step training.
  at::Tensor mean() const;
};

// hidden [T, H] (any strides), weight [V, H] of the same floating dtype, labels [T] (int64 or int32).
// Gradients flow to hidden when it requires grad and to weight only when weight.requires_grad().
// On CUDA with bf16/fp16/fp32 the custom kernel runs; elsewhere the plain-ATen reference, in fp32.
FusedLinearCeResult fused_linear_cross_entropy(const at::Tensor& hidden, const at::Tensor& weight,
                                               const at::Tensor& labels, const FusedLinearCeOptions& options = {});

// The chunk the automatic setting picks (exposed for the bench and the memory test).
int64_t fused_linear_ce_chunk_tokens(int64_t tokens, int64_t hidden, int64_t vocab, bool weight_trainable,
                                     const FusedLinearCeOptions& options, int64_t element_size);

}  // namespace qt
