#include "lib/export/ggml_quants.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <functional>

#include "lib/core/error.h"

// Bit-equality with llama.cpp's quantizer rests on doing its float operations in its order, in IEEE single precision:
// no -ffast-math and no FMA contraction (the x86-64 baseline, which this build and llama.cpp's ggml-base both use,
// has no FMA). Each expression below keeps ggml-quants.c's association; ints take part as floats where it converts.

namespace qt {
namespace {

// Round to nearest, ties to even, through the float add of 1.5 x 2^23 (|v| < 2^22), as ggml's nearest_int.
int nearest_int(float v) {
  const float t = v + 12582912.f;
  int32_t bits;
  std::memcpy(&bits, &t, sizeof bits);
  return (bits & 0x007fffff) - 0x00400000;
}

uint16_t to_f16(float v) { return c10::Half(v).x; }  // round to nearest even, as GGML_FP32_TO_FP16
float from_f16(uint16_t h) { return static_cast<float>(c10::Half(h, c10::Half::from_bits())); }
void put_f16(uint8_t* p, float v) {
  const uint16_t h = to_f16(v);
  std::memcpy(p, &h, 2);
}
float get_f16(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return from_f16(h);
}

// Levels 0..nmax, a scale and a minimum (<= 0) for n values by weighted least squares: the plain fit, then nstep + 1
// inverse scales (rmin + rdelta * is + nmax) / range, each refit in closed form, the least weighted squared error
// kept (ggml's make_qkx2_quants; `mad`: weighted absolute error). Returns the scale; *neg_min = -minimum.
float fit_scale_min(int n, int nmax, const float* x, const float* w, uint8_t* L, float* neg_min, uint8_t* aux,
                    float rmin, float rdelta, int nstep, bool mad = false) {
  const auto cost = [mad](float diff) { return mad ? std::fabs(diff) : diff * diff; };
  float lo = x[0];
  float hi = x[0];
  float sum_w = w[0];
  float sum_x = sum_w * x[0];
  for (int i = 1; i < n; ++i) {
    if (x[i] < lo) lo = x[i];
    if (x[i] > hi) hi = x[i];
    sum_w += w[i];
    sum_x += w[i] * x[i];
  }
  if (lo > 0) lo = 0;
  if (hi == lo) {
    std::memset(L, 0, n);
    *neg_min = -lo;
    return 0.f;
  }
  const float top = static_cast<float>(nmax);
  float iscale = top / (hi - lo);
  float scale = 1 / iscale;
  float best = 0;
  for (int i = 0; i < n; ++i) {
    L[i] = static_cast<uint8_t>(std::max(0, std::min(nmax, nearest_int(iscale * (x[i] - lo)))));
    best += w[i] * cost(scale * L[i] + lo - x[i]);
  }
  for (int is = 0; is <= nstep; ++is) {
    // `lo` is the best fit's minimum so far: later candidates are measured from it, as in ggml.
    iscale = (rmin + rdelta * static_cast<float>(is) + top) / (hi - lo);
    float sum_l = 0, sum_l2 = 0, sum_xl = 0;
    for (int i = 0; i < n; ++i) {
      const int l = std::max(0, std::min(nmax, nearest_int(iscale * (x[i] - lo))));
      aux[i] = static_cast<uint8_t>(l);
      const float fl = static_cast<float>(l);
      sum_l += w[i] * fl;
      sum_l2 += w[i] * fl * fl;
      sum_xl += w[i] * fl * x[i];
    }
    const float det = sum_w * sum_l2 - sum_l * sum_l;
    if (det > 0) {
      float this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
      float this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
      if (this_min > 0) {
        this_min = 0;
        this_scale = sum_xl / sum_l2;
      }
      float err = 0;
      for (int i = 0; i < n; ++i) {
        err += w[i] * cost(this_scale * aux[i] + this_min - x[i]);
      }
      if (err < best) {
        std::memcpy(L, aux, n);
        best = err;
        scale = this_scale;
        lo = this_min;
      }
    }
  }
  *neg_min = -lo;
  return scale;
}

// The value of largest magnitude among n (the first of equal magnitudes; 0 when all are 0).
float signed_max(const float* x, int n) {
  float amax = 0, max = 0;
  for (int i = 0; i < n; ++i)
    if (std::fabs(x[i]) > amax) amax = std::fabs(x[i]), max = x[i];
  return max;
}

// Scale j's and minimum j's 6-bit codes in a k-quant block's 12 scale bytes (ggml's get_scale_min_k4).
void scale_min_k4(int j, const uint8_t* q, uint8_t* s, uint8_t* m) {
  if (j < 4) {
    *s = q[j] & 63;
    *m = q[j + 4] & 63;
  } else {
    *s = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
    *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
  }
}

// The scales and minimums of a q4_K / q5_K super-block: 8 sub-blocks of 32 fitted (weights rms + |x_i|), their
// scales and minimums coded in 6 bits against the largest of each (fp16 d and dmin at head[0..3], the codes at
// head[4..15]), then every value's level 0..nmax recomputed with the coded scale and minimum.
void kquant_head(const float* x, int nmax, float rmin, float rdelta, int nstep, uint8_t* head, uint8_t* L) {
  float scales[8], mins[8], w[32];
  uint8_t aux[32];
  float max_scale = 0, max_min = 0;
  for (int j = 0; j < 8; ++j) {
    const float* xs = x + 32 * j;
    float sum_x2 = 0;
    for (int l = 0; l < 32; ++l) sum_x2 += xs[l] * xs[l];
    const float rms = std::sqrt(sum_x2 / 32);
    for (int l = 0; l < 32; ++l) w[l] = rms + std::fabs(xs[l]);
    scales[j] = fit_scale_min(32, nmax, xs, w, L + 32 * j, &mins[j], aux, rmin, rdelta, nstep);
    if (scales[j] > max_scale) max_scale = scales[j];
    if (mins[j] > max_min) max_min = mins[j];
  }
  const float inv_scale = max_scale > 0 ? 63.f / max_scale : 0.f;
  const float inv_min = max_min > 0 ? 63.f / max_min : 0.f;
  uint8_t* sc = head + 4;
  for (int j = 0; j < 8; ++j) {
    const uint8_t ls = std::min<uint8_t>(63, static_cast<uint8_t>(nearest_int(inv_scale * scales[j])));
    const uint8_t lm = std::min<uint8_t>(63, static_cast<uint8_t>(nearest_int(inv_min * mins[j])));
    if (j < 4) {
      sc[j] = ls;
      sc[j + 4] = lm;
    } else {
      sc[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4);
      sc[j - 4] |= (ls >> 4) << 6;
      sc[j] |= (lm >> 4) << 6;
    }
  }
  put_f16(head, max_scale / 63.f);
  put_f16(head + 2, max_min / 63.f);
  const float d = get_f16(head);
  const float dmin = get_f16(head + 2);
  for (int j = 0; j < 8; ++j) {
    uint8_t s, m;
    scale_min_k4(j, sc, &s, &m);
    const float dj = d * s;
    if (dj == 0) continue;
    const float mj = dmin * m;
    for (int i = 0; i < 32; ++i)
      L[32 * j + i] = static_cast<uint8_t>(std::max(0, std::min(nmax, nearest_int((x[32 * j + i] + mj) / dj))));
  }
}

void q4_k_block(const float* x, uint8_t* y) {
  uint8_t L[kQK_K];
  kquant_head(x, 15, -1.f, 0.1f, 20, y, L);
  uint8_t* q = y + 16;
  for (int j = 0; j < kQK_K; j += 64, q += 32)
    for (int l = 0; l < 32; ++l) q[l] = L[j + l] | (L[j + l + 32] << 4);
}

void q5_k_block(const float* x, uint8_t* y) {
  uint8_t L[kQK_K];
  kquant_head(x, 31, -0.5f, 0.1f, 15, y, L);
  uint8_t* qh = y + 16;
  uint8_t* ql = y + 48;
  std::memset(qh, 0, 32);
  uint8_t m1 = 1, m2 = 2;
  for (int n = 0; n < kQK_K; n += 64, ql += 32, m1 <<= 2, m2 <<= 2) {
    for (int j = 0; j < 32; ++j) {
      int l1 = L[n + j];
      int l2 = L[n + j + 32];
      if (l1 > 15) l1 -= 16, qh[j] |= m1;
      if (l2 > 15) l2 -= 16, qh[j] |= m2;
      ql[j] = static_cast<uint8_t>(l1 | (l2 << 4));
    }
  }
}

// Pack 2-bit levels of a super-block: byte l of each 32-byte quarter holds values l, l + 32, l + 64, l + 96 of its
// 128-value half.
void put_2bit(uint8_t* qs, const uint8_t* L) {
  for (int j = 0; j < kQK_K; j += 128)
    for (int l = 0; l < 32; ++l)
      qs[j / 4 + l] = L[j + l] | (L[j + l + 32] << 2) | (L[j + l + 64] << 4) | (L[j + l + 96] << 6);
}

// q2_K: 16 sub-blocks of 16 fitted with a scale and a minimum (weights |x|, absolute error), both coded in 4 bits
// against the largest of each (fp16 d, dmin), levels 0..3 recomputed with the coded values.
void q2_k_block(const float* x, uint8_t* y) {
  uint8_t L[kQK_K], aux[16];
  float w[16], scales[16], mins[16];
  float max_scale = 0, max_min = 0;
  for (int j = 0; j < 16; ++j) {
    for (int l = 0; l < 16; ++l) w[l] = std::fabs(x[16 * j + l]);
    scales[j] = fit_scale_min(16, 3, x + 16 * j, w, L + 16 * j, &mins[j], aux, -0.5f, 0.1f, 15, /*mad=*/true);
    if (scales[j] > max_scale) max_scale = scales[j];
    if (mins[j] > max_min) max_min = mins[j];
  }
  uint8_t* sc = y;
  std::memset(sc, 0, 16);
  if (max_scale > 0) {
    const float iscale = 15.f / max_scale;
    for (int j = 0; j < 16; ++j) sc[j] = static_cast<uint8_t>(nearest_int(iscale * scales[j]));
  }
  put_f16(y + 80, max_scale > 0 ? max_scale / 15.f : 0.f);
  if (max_min > 0) {
    const float iscale = 15.f / max_min;
    for (int j = 0; j < 16; ++j) sc[j] |= static_cast<uint8_t>(nearest_int(iscale * mins[j]) << 4);
  }
  put_f16(y + 82, max_min > 0 ? max_min / 15.f : 0.f);
  const float d = get_f16(y + 80), dmin = get_f16(y + 82);
  for (int j = 0; j < 16; ++j) {
    const float dj = d * (sc[j] & 0xF);
    if (dj == 0) continue;
    const float mj = dmin * (sc[j] >> 4);
    for (int i = 0; i < 16; ++i)
      L[16 * j + i] = static_cast<uint8_t>(std::max(0, std::min(3, nearest_int((x[16 * j + i] + mj) / dj))));
  }
  put_2bit(y + 16, L);
}

// Levels -4..3 of 16 values and their scale, weights x^2: the scale of the largest magnitude, then up to 5 passes
// moving single levels while the weighted fit improves (make_q3_quants with its rmse refinement). L holds level + 4,
// or 0 for an all-zero block.
float fit_q3(const float* x, int8_t* L) {
  constexpr int n = 16, nmax = 4;
  const float max = signed_max(x, n);
  if (std::fabs(max) < 1e-15f) {
    std::memset(L, 0, n);
    return 0.f;
  }
  const auto level = [](int l) { return std::max(-nmax, std::min(nmax - 1, l)); };
  const float iscale = static_cast<float>(-nmax) / max;
  float sumlx = 0, suml2 = 0;
  for (int i = 0; i < n; ++i) {
    const int l = level(nearest_int(iscale * x[i]));
    L[i] = static_cast<int8_t>(l);
    const float w = x[i] * x[i];
    sumlx += w * x[i] * static_cast<float>(l);
    suml2 += w * static_cast<float>(l) * static_cast<float>(l);
  }
  for (int itry = 0; itry < 5; ++itry) {
    int changed = 0;
    for (int i = 0; i < n; ++i) {
      const float w = x[i] * x[i];
      float slx = sumlx - w * x[i] * static_cast<float>(L[i]);
      if (slx > 0) {
        float sl2 = suml2 - w * static_cast<float>(L[i]) * static_cast<float>(L[i]);
        const int new_l = level(nearest_int(x[i] * sl2 / slx));
        if (new_l != L[i]) {
          slx += w * x[i] * static_cast<float>(new_l);
          sl2 += w * static_cast<float>(new_l) * static_cast<float>(new_l);
          if (sl2 > 0 && slx * slx * suml2 > sumlx * sumlx * sl2) {
            L[i] = static_cast<int8_t>(new_l);
            sumlx = slx;
            suml2 = sl2;
            ++changed;
          }
        }
      }
    }
    if (!changed) break;
  }
  for (int i = 0; i < n; ++i) L[i] = static_cast<int8_t>(L[i] + nmax);
  return suml2 > 0.0f ? sumlx / suml2 : 0.0f;
}

// q3_K: 16 sub-blocks of 16 (fit_q3), their scales coded in 6 bits against the largest magnitude (fp16 d), levels
// -4..3 recomputed with the coded scales; the third bit of each level in hmask, the low two packed as q2_K's.
void q3_k_block(const float* x, uint8_t* y) {
  int8_t L[kQK_K];
  float scales[16];
  float max_scale = 0, amax = 0;
  for (int j = 0; j < 16; ++j) {
    scales[j] = fit_q3(x + 16 * j, L + 16 * j);
    const float a = std::fabs(scales[j]);
    if (a > amax) amax = a, max_scale = scales[j];
  }
  uint8_t* hmask = y;
  uint8_t* sc = y + 96;
  std::memset(sc, 0, 12);
  if (max_scale != 0) {
    const float iscale = -32.f / max_scale;
    for (int j = 0; j < 16; ++j) {
      int8_t l = static_cast<int8_t>(nearest_int(iscale * scales[j]));
      l = static_cast<int8_t>(std::max<int>(-32, std::min<int>(31, l)) + 32);
      if (j < 8)
        sc[j] = l & 0xF;
      else
        sc[j - 8] |= (l & 0xF) << 4;
      l = static_cast<int8_t>(l >> 4);
      sc[j % 4 + 8] |= l << (2 * (j / 4));
    }
    put_f16(y + 108, 1 / iscale);
  } else {
    put_f16(y + 108, 0.f);
  }
  const float d = get_f16(y + 108);
  for (int j = 0; j < 16; ++j) {
    int s = j < 8 ? sc[j] & 0xF : sc[j - 8] >> 4;
    s = (s | (((sc[8 + j % 4] >> (2 * (j / 4))) & 3) << 4)) - 32;
    const float dj = d * static_cast<float>(static_cast<int8_t>(s));
    if (dj == 0) continue;
    for (int i = 0; i < 16; ++i)
      L[16 * j + i] = static_cast<int8_t>(std::max(-4, std::min(3, nearest_int(x[16 * j + i] / dj))) + 4);
  }
  std::memset(hmask, 0, 32);
  uint8_t low[kQK_K];
  for (int j = 0; j < kQK_K; ++j) {
    low[j] = static_cast<uint8_t>(L[j]);
    if (L[j] > 3) {
      hmask[j % 32] |= static_cast<uint8_t>(1 << (j / 32));
      low[j] = static_cast<uint8_t>(L[j] - 4);
    }
  }
  put_2bit(y + 32, low);
}

// Levels -nmax..nmax-1 (stored + nmax) and a scale for n values, weights x^2: the scale of the largest magnitude,
// then 18 nearby inverse scales -(nmax + 0.1 is) / max, the best least-squares fit kept (make_qx_quants, rmse 1).
float fit_symmetric(int n, int nmax, const float* x, int8_t* L) {
  const float max = signed_max(x, n);
  if (std::fabs(max) < 1e-15f) {
    std::memset(L, 0, n);
    return 0.f;
  }
  const auto level = [nmax](float v) { return std::max(-nmax, std::min(nmax - 1, nearest_int(v))); };
  float iscale = static_cast<float>(-nmax) / max;
  float sumlx = 0, suml2 = 0;
  for (int i = 0; i < n; ++i) {
    const int l = level(iscale * x[i]);
    L[i] = static_cast<int8_t>(l + nmax);
    const float w = x[i] * x[i];
    sumlx += w * x[i] * static_cast<float>(l);
    suml2 += w * static_cast<float>(l) * static_cast<float>(l);
  }
  float scale = suml2 != 0 ? sumlx / suml2 : 0.0f;
  float best = scale * sumlx;
  for (int is = -9; is <= 9; ++is) {
    if (is == 0) continue;
    iscale = -(static_cast<float>(nmax) + 0.1f * static_cast<float>(is)) / max;
    sumlx = suml2 = 0;
    for (int i = 0; i < n; ++i) {
      const int l = level(iscale * x[i]);
      const float w = x[i] * x[i];
      sumlx += w * x[i] * static_cast<float>(l);
      suml2 += w * static_cast<float>(l) * static_cast<float>(l);
    }
    if (suml2 > 0 && sumlx * sumlx > best * suml2) {
      for (int i = 0; i < n; ++i) L[i] = static_cast<int8_t>(nmax + level(iscale * x[i]));
      scale = sumlx / suml2;
      best = scale * sumlx;
    }
  }
  return scale;
}

void q6_k_block(const float* x, uint8_t* y) {
  int8_t L[kQK_K];
  float scales[16];
  float max_scale = 0, max_abs_scale = 0;
  for (int ib = 0; ib < 16; ++ib) {
    scales[ib] = fit_symmetric(16, 32, x + 16 * ib, L + 16 * ib);
    const float a = std::fabs(scales[ib]);
    if (a > max_abs_scale) max_abs_scale = a, max_scale = scales[ib];
  }
  uint8_t* ql = y;
  uint8_t* qh = y + 128;
  int8_t* sc = reinterpret_cast<int8_t*>(y + 192);
  if (max_abs_scale < 1e-15f) {
    std::memset(y, 0, kQ6_KBlockBytes);
    return;
  }
  const float iscale = -128.f / max_scale;
  put_f16(y + 208, 1 / iscale);
  for (int ib = 0; ib < 16; ++ib) sc[ib] = static_cast<int8_t>(std::min(127, nearest_int(iscale * scales[ib])));
  const float d = get_f16(y + 208);
  for (int j = 0; j < 16; ++j) {
    const float dj = d * sc[j];
    if (dj == 0) continue;
    for (int i = 0; i < 16; ++i)
      L[16 * j + i] = static_cast<int8_t>(std::max(-32, std::min(31, nearest_int(x[16 * j + i] / dj))) + 32);
  }
  for (int j = 0; j < kQK_K; j += 128, ql += 64, qh += 32) {
    for (int l = 0; l < 32; ++l) {
      const uint8_t a = L[j + l], b = L[j + l + 32], c = L[j + l + 64], e = L[j + l + 96];
      ql[l] = (a & 0xF) | ((c & 0xF) << 4);
      ql[l + 32] = (b & 0xF) | ((e & 0xF) << 4);
      qh[l] = (a >> 4) | ((b >> 4) << 2) | ((c >> 4) << 4) | ((e >> 4) << 6);
    }
  }
}

// Levels of a 32-value block for the legacy types, each as ggml-quants.c's reference computes them. Symmetric (q4_0,
// q5_0): d = the value of largest magnitude / -2^(bits-1), levels trunc(x / d + 2^(bits-1) + 0.5) up to 2^bits - 1;
// writes d. Affine (q4_1, q5_1): d = (max - min) / (2^bits - 1), levels trunc((x - min) / d + 0.5); writes d, min.
template <int kBits>
void symmetric_levels(const float* x, uint8_t* head, uint8_t* q) {
  const float d = signed_max(x, 32) / -static_cast<float>(1 << (kBits - 1));
  const float id = d != 0 ? 1.0f / d : 0.0f;
  put_f16(head, d);
  const float offset = static_cast<float>(1 << (kBits - 1)) + 0.5f;
  for (int j = 0; j < 32; ++j)
    q[j] = static_cast<uint8_t>(std::min((1 << kBits) - 1, static_cast<int>(x[j] * id + offset)));
}

template <int kBits>
void affine_levels(const float* x, uint8_t* head, uint8_t* q) {
  float lo = FLT_MAX, hi = -FLT_MAX;
  for (int j = 0; j < 32; ++j) {
    if (x[j] < lo) lo = x[j];
    if (x[j] > hi) hi = x[j];
  }
  const float d = (hi - lo) / static_cast<float>((1 << kBits) - 1);
  const float id = d != 0 ? 1.0f / d : 0.0f;
  put_f16(head, d);
  put_f16(head + 2, lo);
  for (int j = 0; j < 32; ++j)
    q[j] = static_cast<uint8_t>(std::min((1 << kBits) - 1, static_cast<int>((x[j] - lo) * id + 0.5f)));
}

// Level j's low nibble into qs (the first 16 values low, the last 16 high); for q5 blocks its fifth bit into qh.
void put_nibbles(uint8_t* qs, const uint8_t* q) {
  for (int j = 0; j < 16; ++j) qs[j] = (q[j] & 0x0F) | ((q[j + 16] & 0x0F) << 4);
}
void put_fifth_bits(uint8_t* qh_bytes, const uint8_t* q) {
  uint32_t qh = 0;
  for (int j = 0; j < 32; ++j) qh |= ((q[j] & 0x10u) >> 4) << j;
  std::memcpy(qh_bytes, &qh, 4);
}

void q4_0_block(const float* x, uint8_t* y) {
  uint8_t q[32];
  symmetric_levels<4>(x, y, q);
  put_nibbles(y + 2, q);
}
void q4_1_block(const float* x, uint8_t* y) {
  uint8_t q[32];
  affine_levels<4>(x, y, q);
  put_nibbles(y + 4, q);
}
void q5_0_block(const float* x, uint8_t* y) {
  uint8_t q[32];
  symmetric_levels<5>(x, y, q);
  put_fifth_bits(y + 2, q);
  put_nibbles(y + 6, q);
}
void q5_1_block(const float* x, uint8_t* y) {
  uint8_t q[32];
  affine_levels<5>(x, y, q);
  put_fifth_bits(y + 4, q);
  put_nibbles(y + 8, q);
}

at::Tensor quantize_blocks(const at::Tensor& x, int64_t block, int64_t block_bytes, const char* what,
                           const std::function<void(const float*, uint8_t*)>& one) {
  QT_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.device().is_cpu(), ErrorKind::Internal,
           std::string(what) + ": expects a contiguous fp32 CPU tensor");
  const int64_t n = x.numel();
  QT_CHECK(n % block == 0, ErrorKind::Internal,
           std::string(what) + ": size not a multiple of " + std::to_string(block));
  at::Tensor out = at::empty({n / block * block_bytes}, at::kByte);
  const float* src = x.data_ptr<float>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  at::parallel_for(0, n / block, 64, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) one(src + b * block, dst + b * block_bytes);
  });
  return out;
}

}  // namespace

at::Tensor quantize_q2_k(const at::Tensor& x) { return quantize_blocks(x, kQK_K, kQ2_KBlockBytes, "q2_K", q2_k_block); }
at::Tensor quantize_q3_k(const at::Tensor& x) { return quantize_blocks(x, kQK_K, kQ3_KBlockBytes, "q3_K", q3_k_block); }
at::Tensor quantize_q4_k(const at::Tensor& x) { return quantize_blocks(x, kQK_K, kQ4_KBlockBytes, "q4_K", q4_k_block); }
at::Tensor quantize_q5_k(const at::Tensor& x) { return quantize_blocks(x, kQK_K, kQ5_KBlockBytes, "q5_K", q5_k_block); }
at::Tensor quantize_q6_k(const at::Tensor& x) { return quantize_blocks(x, kQK_K, kQ6_KBlockBytes, "q6_K", q6_k_block); }
at::Tensor quantize_q4_0(const at::Tensor& x) {
  return quantize_blocks(x, kQ5_Block, kQ4_0BlockBytes, "q4_0", q4_0_block);
}
at::Tensor quantize_q4_1(const at::Tensor& x) {
  return quantize_blocks(x, kQ5_Block, kQ4_1BlockBytes, "q4_1", q4_1_block);
}
at::Tensor quantize_q5_0(const at::Tensor& x) {
  return quantize_blocks(x, kQ5_Block, kQ5_0BlockBytes, "q5_0", q5_0_block);
}
at::Tensor quantize_q5_1(const at::Tensor& x) {
  return quantize_blocks(x, kQ5_Block, kQ5_1BlockBytes, "q5_1", q5_1_block);
}

}  // namespace qt
