#pragma once
// Raw-pointer launcher of the CUDA tile kernel of the fused linear cross-entropy (fused_linear_ce.cu).
// No CUDA header here: the stream travels as void* (a cudaStream_t), so CPU-only code may include this.
#include <cstdint>

namespace qt::kernels {

enum class CeTileDtype { F32, BF16, F16 };

struct CeTileParams {
  int64_t ignore_index = -100;
  float label_smoothing = 0.f;
  float z_loss = 0.f;
  float logit_softcap = 0.f;  // 0: off
  // The launch, not the math: rows of 16-byte vectors at a vocabulary of 16,384 and more on a persistent grid, one
  // CTA an SM looping over the rows with four 16-byte loads in flight a thread (fused_linear_ce.cu); the same bits as
  // the default grid of one CTA a row.
  bool resident = false;
};

// For each of `rows` rows of `logits` (row r at logits + r * ld elements, `vocab` valid columns):
// loss_rows[r] = lse(z) - (1 - eps) z_y - eps mean(z) + z_loss lse^2 with z the (soft-capped) logits,
// 0 when labels[r] == ignore_index, NaN when the label is out of range. With write_grad, the row is overwritten
// in place by d loss_r / d logits (zeros for ignored rows). Math in fp32 whatever the storage dtype.
// lse_rows, when not null, receives each counted row's log-sum-exp of the (soft-capped) logits (what
// ce_slice_grad needs); ignored and bad rows leave it unwritten.
void ce_tile_loss_grad(void* logits, CeTileDtype dtype, int64_t rows, int64_t vocab, int64_t ld, const int64_t* labels,
                       float* loss_rows, bool write_grad, const CeTileParams& params, void* stream,
                       float* lse_rows = nullptr);

// Pass 2 of the vocabulary-tile schedule: `logits` holds columns [col0, col0 + cols) of the full [rows, vocab]
// logits (row r at logits + r * ld); each is overwritten by d loss_r / d logits with the row's log-sum-exp
// from pass 1 (lse_rows). Same formula as ce_tile_loss_grad; zeros for ignored rows and out-of-range labels.
void ce_slice_grad(void* logits, CeTileDtype dtype, int64_t rows, int64_t cols, int64_t ld, int64_t col0, int64_t vocab,
                   const int64_t* labels, const float* lse_rows, const CeTileParams& params, void* stream);

}  // namespace qt::kernels
