// Rotary position embedding on [tokens, heads, head_dim] rows, forward and inverse (fused_ops.h: rope_fused,
// rope_qkv; reference rope_reference): one thread rotates 8 elements of a row's first half with their partners
// in the second half.
#include "lib/kernels/fused_ops_common.cuh"

namespace qt::kernels {
namespace {

// One thread: 8 consecutive elements of the first half of one (token, head) row and their 8 partners in the
// second half.
template <typename T>
__global__ void __launch_bounds__(kThreads) rope_kernel(const T* __restrict__ x, const T* __restrict__ cos,
                                                        const T* __restrict__ sin, T* __restrict__ y,
                                                        int64_t tokens, int64_t heads, int64_t D, int64_t x_ld,
                                                        int64_t y_ld, bool inverse) {
  const int64_t half = D / 2, per_row = half / kVec;
  const int64_t total = tokens * heads * per_row;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t row = i / per_row, j = (i % per_row) * kVec;  // row = token * heads + head
    const int64_t token = row / heads;
    const int64_t head = row - token * heads;
    const T* xr = x + token * x_ld + head * D;
    const T* cr = cos + token * D;
    const T* sr = sin + token * D;
    float x1[kVec], x2[kVec], c1[kVec], c2[kVec], s1[kVec], s2[kVec], y1[kVec], y2[kVec];
    load8(xr + j, x1);
    load8(xr + half + j, x2);
    load8(cr + j, c1);
    load8(cr + half + j, c2);
    load8(sr + j, s1);
    load8(sr + half + j, s2);
    if (!inverse) {
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        y1[k] = round_t<T>(x1[k] * c1[k]) + round_t<T>(-x2[k] * s1[k]);
        y2[k] = round_t<T>(x2[k] * c2[k]) + round_t<T>(x1[k] * s2[k]);
      }
    } else {
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        y1[k] = x1[k] * c1[k] + x2[k] * s2[k];
        y2[k] = x2[k] * c2[k] - x1[k] * s1[k];
      }
    }
    T* yr = y + token * y_ld + head * D;
    store8(yr + j, y1);
    store8(yr + half + j, y2);
  }
}

}  // namespace

void rope_launch(const void* x, const void* cos, const void* sin, void* y, int64_t tokens, int64_t heads, int64_t D,
                 int64_t x_ld, int64_t y_ld, bool inverse, ElemType type, CUstream_st* stream) {
  QT_CHECK(D % (2 * kVec) == 0 && x_ld % kVec == 0 && y_ld % kVec == 0 && x_ld >= heads * D && y_ld >= heads * D,
           ErrorKind::Internal, "rope kernel: head_dim must be a multiple of 16, token strides multiples of 8 and rows apart");
  const int64_t work = tokens * heads * (D / 2 / kVec);
  if (work == 0) return;
  int64_t blocks = (work + kThreads - 1) / kThreads;
  if (blocks > 132 * 16) blocks = 132 * 16;
  dispatch(type, [&](auto t) {
    using T = decltype(t);
    rope_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        static_cast<const T*>(x), static_cast<const T*>(cos), static_cast<const T*>(sin), static_cast<T*>(y), tokens,
        heads, D, x_ld, y_ld, inverse);
  });
  check_launch("rope");
}

}  // namespace qt::kernels
