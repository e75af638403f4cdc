#pragma once
// Raw launches of the fused block kernels (fused_ops.cu); callers pass device pointers and the CUDA stream.
#include <cstdint>

struct CUstream_st;

namespace qt::kernels {

enum class ElemType : int32_t { Float32 = 0, Float16 = 1, BFloat16 = 2 };

// y = weight * cast(x * rstd), rstd[r] = 1 / sqrt(mean(x[r]^2) + eps). x, y [rows, H]; weight [H]; H % 8 == 0.
void rms_norm_forward_launch(const void* x, const void* weight, void* y, float* rstd, int64_t rows, int64_t H,
                             float eps, ElemType type, CUstream_st* stream);
// dx = rstd * (dn - n * mean(dn * n)), n = x * rstd, dn = dy * weight (fp32 inside).
void rms_norm_backward_launch(const void* dy, const void* x, const void* weight, const float* rstd, void* dx,
                              int64_t rows, int64_t H, ElemType type, CUstream_st* stream);
// out = cast(cast(silu(g)) * u), as ATen's silu then mul round.
void swiglu_forward_launch(const void* g, const void* u, void* out, int64_t n, ElemType type, CUstream_st* stream);
// du = cast(dy * cast(silu(g))); dg = cast(cast(dy * u) * silu'(g)).
void swiglu_backward_launch(const void* dy, const void* g, const void* u, void* dg, void* du, int64_t n,
                            ElemType type, CUstream_st* stream);

// RoPE over tokens: x, y [tokens, heads, D], cos / sin [tokens, D], D % 16 == 0. With `inverse`, the transposed
// rotation (the backward: dx from dy): y_j = x_j c_j + (j < D/2 ? x_{j+D/2} s_{j+D/2} : -x_{j-D/2} s_{j-D/2}).
// Forward: y_j = cast(cast(x_j c_j) + cast(r_j s_j)), r = rotate_half(x) = [-x2, x1], as ATen rounds.
void rope_launch(const void* x, const void* cos, const void* sin, void* y, int64_t tokens, int64_t heads, int64_t D,
                 bool inverse, ElemType type, CUstream_st* stream);

}  // namespace qt::kernels
