#pragma once
// Fused lm_head + cross-entropy: loss over [T, V] logits without ever holding them.
//
// Tokens are processed in chunks: each chunk's logits tile [chunk, V] is one GEMM, then one pass per row
// computes max, sum-exp (fp32), the loss, and overwrites the tile with dLoss/dlogits; two more GEMMs turn
// that into dL/dhidden (rows of the chunk) and accumulate dL/dW. The gradients are thus produced in the
// forward pass (the idea of llm.c's fused_classifier and of Liger-Kernel's fused linear cross-entropy);
// backward only scales them by grad_output. Extra memory: one tile plus dh (plus dW when trainable).
//
// With a trainable weight there are two schedules (FusedCeSchedule). Token chunks accumulate dW over every
// chunk: each chunk reads and writes all of dW (V x H), which at Liger's chunk size is 32 passes over it.
// Vocabulary tiles take two passes instead: pass 1 is the token-chunk loop without dW (loss, per-row
// log-sum-exp, dh), its tile living in dW's not yet written storage; pass 2 recomputes the logits one vocabulary
// slice at a time for all tokens and writes that slice of dW once (8THV FLOPs instead of 6THV, but dW is
// written once and the only tile outside the gradients is a small one for the last slices).
#include <ATen/ATen.h>

#include <cstdint>

namespace qt {

enum class FusedCeSchedule {
  Auto,         // vocabulary tiles when the cost model below predicts them faster, or when low_memory is set
  TokenChunks,  // one pass; dW accumulated over token chunks
  VocabTiles,   // two passes; dW written once per vocabulary slice (CUDA only: the reference ignores it)
};

struct FusedLinearCeOptions {
  // Tokens per logits tile. 0: automatic (fused_linear_ce_chunk_tokens below), bounded so the tile is about
  // the size of the hidden state when the weight is trainable, <= 192 MiB when it is frozen.
  int64_t chunk_tokens = 0;
  // Trainable weight: vocabulary tiles with a small last tile (extra memory about 4% over the gradients).
  // Frozen weight: the automatic chunk divided by 4.
  bool low_memory = false;
  // How dW is formed when the weight is trainable (see the top of this file).
  FusedCeSchedule schedule = FusedCeSchedule::Auto;
  // Vocabulary tiles: columns per slice of pass 2 while it fits in dW's unwritten rows; 0: automatic (4096).
  int64_t vocab_tile = 0;
  int64_t ignore_index = -100;
  // Same definition as torch.nn.functional.cross_entropy(label_smoothing=eps):
  // loss = (1 - eps) * (lse - z_y) + eps * (lse - mean_j z_j).
  double label_smoothing = 0.0;
  // PaLM's auxiliary z-loss (Chowdhery et al. 2022, sec. 5): adds z_loss * lse^2 per counted token.
  double z_loss = 0.0;
  // Gemma 2's final-logit soft-capping: z = cap * tanh(x / cap); 0 disables.
  double logit_softcap = 0.0;
  // Check labels are in [0, V) or ignore_index (one device sync per call on CUDA unless the labels are on the
  // CPU); a bad label is a qt::Error of kind Data. Unchecked, a bad label makes its row's loss NaN on CUDA.
  bool check_labels = true;
  // CUDA, trainable weight: run the dW GEMM (memory-bound at small chunks) on a side stream, concurrently with
  // the dh GEMM (compute-bound). No extra memory beyond the side stream's cuBLAS workspace.
  bool overlap_dw = true;
  // Run the plain-ATen reference even for CUDA tensors (tests, debugging).
  bool force_reference = false;
  // CUDA: the tile kernel on a persistent grid, one CTA an SM with four loads in flight a thread
  // (kernels::CeTileParams::resident: the same bits). -1: QT_CE_RESIDENT_TILES=1 turns it on (read once; for A/B
  // measurements until a GPU has timed it), else off.
  int resident_tiles = -1;
};

struct FusedLinearCeResult {
  at::Tensor loss_sum;  // fp32 scalar: sum of the loss over counted tokens; differentiable
  at::Tensor count;     // int64 scalar: number of tokens whose label is not ignore_index
  // loss_sum / max(count, 1), differentiable, for logging or single-step training.
  at::Tensor mean() const;
};

// hidden [T, H] (any strides), weight [V, H] of the same floating dtype, labels [T] (int64 or int32) on their
// device or on the CPU (then checked and counted on the host: no device sync).
// Gradients flow to hidden when it requires grad and to weight only when weight.requires_grad().
// On CUDA with bf16/fp16/fp32 the custom kernel runs; elsewhere the plain-ATen reference, in fp32.
FusedLinearCeResult fused_linear_cross_entropy(const at::Tensor& hidden, const at::Tensor& weight,
                                               const at::Tensor& labels, const FusedLinearCeOptions& options = {});

// The per-token losses [T] (fp32, 0 at ignored tokens) of the same computation, differentiable with respect to
// hidden: dh is still made in the forward pass (unit weight a token), and the backward pass scales each row by its
// token's incoming gradient, so that any function of the per-token losses (DPO's per-sequence log-probabilities)
// backpropagates without the logits. The weight must be frozen (no gradient requested of it).
at::Tensor fused_linear_cross_entropy_rows(const at::Tensor& hidden, const at::Tensor& weight,
                                           const at::Tensor& labels, const FusedLinearCeOptions& options = {});

// The schedule `options.schedule` resolves to (the trainable CUDA path; TokenChunks when the weight is frozen).
FusedCeSchedule fused_linear_ce_schedule(int64_t tokens, int64_t hidden, int64_t vocab, bool weight_trainable,
                                         const FusedLinearCeOptions& options);

// The chunk the automatic setting picks (exposed for the bench and the memory test). With vocabulary tiles it is
// the chunk of pass 1, whose tile lives in dW's storage: at most `hidden` tokens.
int64_t fused_linear_ce_chunk_tokens(int64_t tokens, int64_t hidden, int64_t vocab, bool weight_trainable,
                                     const FusedLinearCeOptions& options, int64_t element_size);

// Vocabulary tiles: the columns of the standalone tile that pass 2 uses once dW's unwritten rows are too few
// (about 4% of the gradient bytes, at least 64 columns, at most the vocabulary).
int64_t fused_linear_ce_last_tile_columns(int64_t tokens, int64_t hidden, int64_t vocab);

}  // namespace qt
