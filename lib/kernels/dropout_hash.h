#pragma once
// LoRA dropout's masks on CUDA (lora_dropout_apply and lora_dropout_rank_update in fused_ops.h): a counter-based
// draw, so that no mask is ever stored and every pass (the forward, a checkpointed block's recomputation, the
// backward) draws the same one again from a 64-bit key. Element e of a [rows, cols] draw (e = row * cols + col) is
// kept when its 16 bits of splitmix64's output for the counter e / 4 (bits 16 (e % 4) up) are at least
// round(p * 65536): a keep probability of 1 - p within 2^-17. The same functions run on the host (the references,
// the tests) and on the device.
#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define QT_DROPOUT_HD __host__ __device__ __forceinline__
#else
#define QT_DROPOUT_HD inline
#endif

namespace qt::dropout_hash {

constexpr uint64_t kGamma = 0x9E3779B97F4A7C15ull;

// splitmix64's finalizer (Steele, Lea and Flood 2014): a bijection whose outputs over consecutive counters pass
// BigCrush.
QT_DROPOUT_HD uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// The 16-bit uniforms of elements 4 j .. 4 j + 3 of the draw `key`, the first in the lowest bits.
QT_DROPOUT_HD uint64_t bits4(uint64_t key, uint64_t j) { return mix64(key + (j + 1) * kGamma); }

// Whether element i (0..3) of a bits4 word is kept.
QT_DROPOUT_HD bool kept(uint64_t bits, int i, uint32_t threshold) {
  return static_cast<uint32_t>((bits >> (16 * i)) & 0xFFFFu) >= threshold;
}

// A draw's key from the default CUDA generator's seed and offset (distinct offsets, unrelated keys).
inline uint64_t key_of(uint64_t seed, uint64_t offset) { return mix64(seed ^ mix64(offset + kGamma)); }

// The 16-bit threshold of probability p in [0, 1).
inline uint32_t threshold_of(double p) {
  const double t = std::nearbyint(p * 65536.0);
  return t <= 0 ? 0u : t >= 65535 ? 65535u : static_cast<uint32_t>(t);
}

}  // namespace qt::dropout_hash
