#pragma once
// Raw launches of the fused block kernels (rms_norm.cu, swiglu.cu, rope.cu, copy_rows.cu, lora_dropout.cu); callers
// pass device pointers and the CUDA stream.
#include <cstdint>

struct CUstream_st;

namespace qt::kernels {

enum class ElemType : int32_t { Float32 = 0, Float16 = 1, BFloat16 = 2 };

// y = weight * cast(x * rstd), rstd[r] = 1 / sqrt(mean(x[r]^2) + eps). x [rows, H] contiguous, y's rows ld_y apart
// (>= H, a multiple of 8: the first columns of a wider matrix); weight [H]; H % 8 == 0.
void rms_norm_forward_launch(const void* x, const void* weight, void* y, float* rstd, int64_t rows, int64_t H,
                             int64_t ld_y, float eps, ElemType type, CUstream_st* stream);
// dx = rstd * (dn - n * mean(dn * n)), n = x * rstd, dn = dy * weight (fp32 inside). dy's rows ld_dy elements apart
// (>= H, a multiple of 8: the first columns of a wider GEMM output), x's and dx's contiguous.
void rms_norm_backward_launch(const void* dy, const void* x, const void* weight, const float* rstd, void* dx,
                              int64_t rows, int64_t H, int64_t ld_dy, ElemType type, CUstream_st* stream);
// x = h + a (rounded as ATen's add), y = rms_norm(x) as rms_norm_forward_launch; h, a, x [rows, H] contiguous, y's
// rows ld_y apart.
void add_rms_norm_forward_launch(const void* h, const void* a, const void* weight, void* x, void* y, float* rstd,
                                 int64_t rows, int64_t H, int64_t ld_y, float eps, ElemType type, CUstream_st* stream);
// dx = dres + cast(the norm's input gradient) (as rms_norm_backward_launch, dy rows ld_dy apart); dres [rows, H]
// contiguous, or null (then rms_norm_backward_launch's dx).
void add_rms_norm_backward_launch(const void* dy, const void* dres, const void* x, const void* weight,
                                  const float* rstd, void* dx, int64_t rows, int64_t H, int64_t ld_dy, ElemType type,
                                  CUstream_st* stream);
// rows x row_bytes copied from src (rows ld_src_bytes apart) to dst (rows ld_dst_bytes apart); every size, stride
// and pointer a multiple of 16 bytes.
void copy_rows_launch(void* dst, int64_t ld_dst_bytes, const void* src, int64_t ld_src_bytes, int64_t rows,
                      int64_t row_bytes, CUstream_st* stream);
// One copy of scaled_copies_launch: dst[r * ld_dst + c] = cast(src[r * ld_src + c] * scale) for r < rows, c < cols.
struct ScaledCopyJob {
  const float* src;
  void* dst;
  int64_t rows, cols, ld_src, ld_dst;
  float scale;
  int64_t first_block;  // the job's first block: the blocks before it, kScaledCopyChunk elements each
};
constexpr int64_t kScaledCopyChunk = 2048;
// n jobs (a device array, first_block ascending from 0; `blocks` in all) in one launch, every dst of `type`.
void scaled_copies_launch(const ScaledCopyJob* jobs, int64_t n, int64_t blocks, ElemType type, CUstream_st* stream);
// out = cast(cast(silu(g)) * u), as ATen's silu then mul round, over `rows` rows of `cols` elements (cols % 8 == 0):
// row r of g and u at r * ld_in, of out at r * ld_out (elements; multiples of 8). Gate and up may be the two halves
// of one [rows, 2 * cols] tensor (u = g + cols, ld_in = 2 * cols). `by_rows`: the kernels on a [rows, runs of 256
// vectors] grid (the default) instead of a grid-stride loop over a flat index, the same values: the rows grid ran
// 1-5% faster on an H100 at 4096 and 8192 x 14336 (bench/bench_elementwise.cpp, 2026-12-06: 2.87-2.92 TB/s of
// 3.01 against 2.78-2.84).
void swiglu_forward_launch(const void* g, const void* u, void* out, int64_t rows, int64_t cols, int64_t ld_in,
                           int64_t ld_out, ElemType type, CUstream_st* stream, bool by_rows = true);
// du = cast(dy * cast(silu(g))); dg = cast(cast(dy * u) * silu'(g)). dg / du rows as g / u (ld_in), dy as out.
void swiglu_backward_launch(const void* dy, const void* g, const void* u, void* dg, void* du, int64_t rows,
                            int64_t cols, int64_t ld_in, int64_t ld_out, ElemType type, CUstream_st* stream,
                            bool by_rows = true);

// LoRA dropout's masks drawn from `key` (dropout_hash.h; element e of the [rows, cols] draw at e = row * cols + col).
// y = x * mask * scale; x rows ld_x apart, y rows ld_y (cols and both strides multiples of 8).
void dropout_apply_launch(const void* x, int64_t ld_x, void* y, int64_t ld_y, int64_t rows, int64_t cols,
                          uint64_t key, uint32_t threshold, float scale, ElemType type, CUstream_st* stream);
// dx += mask * scale * (g a) in fp32, rounded once: dx [rows, cols] (rows ld_dx apart; cols and ld_dx multiples of
// 8, 8-byte aligned), g [rows, rank] (rows ld_g apart), a [rank, cols] (rows ld_a apart).
void dropout_rank_update_launch(void* dx, int64_t ld_dx, const void* g, int64_t ld_g, const void* a, int64_t ld_a,
                                int64_t rows, int64_t cols, int64_t rank, uint64_t key, uint32_t threshold,
                                float scale, ElemType type, CUstream_st* stream);

// RoPE over tokens: x, y [tokens, heads, D], cos / sin [tokens, D], D % 16 == 0; token t's heads start at
// t * x_ld in x and t * y_ld in y (elements, multiples of 8: heads * D when contiguous; q and k can be read out of
// one fused q/k/v projection output and the gradient written back into one). With `inverse`, the transposed
// rotation (the backward: dx from dy): y_j = x_j c_j + (j < D/2 ? x_{j+D/2} s_{j+D/2} : -x_{j-D/2} s_{j-D/2}).
// Forward: y_j = cast(cast(x_j c_j) + cast(r_j s_j)), r = rotate_half(x) = [-x2, x1], as ATen rounds.
void rope_launch(const void* x, const void* cos, const void* sin, void* y, int64_t tokens, int64_t heads, int64_t D,
                 int64_t x_ld, int64_t y_ld, bool inverse, ElemType type, CUstream_st* stream);
// One run of heads for rope_runs_launch: `heads` [D] rows a token, token t's at t * src_ld in src and t * dst_ld in
// dst (elements, multiples of 8; pointers 16-byte aligned), rotated (as rope_launch) or copied as they are.
struct RopeRows {
  const void* src;
  void* dst;
  int64_t src_ld, dst_ld, heads;
  bool rotate;
};
// Up to three runs in one launch, the same cos / sin rows for each: rope_qkv's q, k and v (v copied), forward from
// the projection output into three tensors or backward from three gradients into one.
void rope_runs_launch(const RopeRows* runs, int count, const void* cos, const void* sin, int64_t tokens, int64_t D,
                      bool inverse, ElemType type, CUstream_st* stream);

// Qwen3's q / k: y = rope(weight * cast(x * rstd)) per [D] row, rstd = 1 / sqrt(mean(x^2) + eps), in one pass
// (rows, strides and rounding as rope_launch; weight [D]). D = 16 times a power of two up to 512
// (rope_norm_takes_head_dim).
bool rope_norm_takes_head_dim(int64_t D);
void rope_norm_launch(const void* x, const void* weight, const void* cos, const void* sin, void* y, int64_t tokens,
                      int64_t heads, int64_t D, int64_t x_ld, int64_t y_ld, float eps, ElemType type,
                      CUstream_st* stream);
// Its gradient: dx from dy (dy rows dy_ld apart), x the norm's input; rstd recomputed from x.
void rope_norm_backward_launch(const void* dy, const void* x, const void* weight, const void* cos, const void* sin,
                               void* dx, int64_t tokens, int64_t heads, int64_t D, int64_t dy_ld, int64_t x_ld,
                               int64_t dx_ld, float eps, ElemType type, CUstream_st* stream);

}  // namespace qt::kernels
