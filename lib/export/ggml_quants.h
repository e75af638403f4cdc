#pragma once
// ggml's block quantizations beyond q8_0, for `export --gguf q4_k_m|q4_k_s|q5_k_m|q5_k_s|q6_k|q4_0|q4_1|q5_0|q5_1`:
// the k-quants (super-blocks of 256 values) and the 32-value q4_0 / q4_1 / q5_0 / q5_1 (files of their own, and what
// llama.cpp falls back to for rows not a multiple of 256). Each is the
// reference quantizer llama.cpp's `llama-quantize` runs without an importance matrix (quantize_row_*_ref in
// ggml-quants.c; the layouts are ggml-common.h's block_*), computed in the same float operations in the same order,
// so that the bytes equal its own (tests/e2e/test_gguf.py compares them with llama_model_quantize's). The source is
// fp32; blocks are taken along the flat, contiguous values, so a row must be a whole number of blocks.
#include <ATen/core/Tensor.h>

#include <cstdint>

namespace qt {

// Bytes a block and values a block.
inline constexpr int64_t kQK_K = 256;          // k-quant super-block
inline constexpr int64_t kQ2_KBlockBytes = 84;   // 16 bytes of 4-bit scales / mins, 64 of 2-bit levels, d, dmin
inline constexpr int64_t kQ3_KBlockBytes = 110;  // 32 bytes of third bits, 64 of 2-bit levels, 12 of scales, d
inline constexpr int64_t kQ4_KBlockBytes = 144;  // d, dmin (fp16), 12 bytes of 6-bit scales / mins, 128 of nibbles
inline constexpr int64_t kQ5_KBlockBytes = 176;  // q4_K's, plus 32 bytes of fifth bits
inline constexpr int64_t kQ6_KBlockBytes = 210;  // 128 low nibbles, 64 of high 2 bits, 16 int8 scales, d (fp16)
inline constexpr int64_t kQ5_Block = 32;        // (q4_0 / q4_1 blocks too)
inline constexpr int64_t kQ4_0BlockBytes = 18;  // d (fp16), 16 bytes of nibbles
inline constexpr int64_t kQ4_1BlockBytes = 20;  // d, m (fp16), 16 bytes of nibbles
inline constexpr int64_t kQ5_0BlockBytes = 22;  // d (fp16), 4 bytes of fifth bits, 16 of nibbles
inline constexpr int64_t kQ5_1BlockBytes = 24;  // d, m (fp16), 4 bytes of fifth bits, 16 of nibbles

// `x`: fp32, contiguous, on the CPU, numel a multiple of the block. Returns the blocks as uint8 bytes.
at::Tensor quantize_q2_k(const at::Tensor& x);
at::Tensor quantize_q3_k(const at::Tensor& x);
at::Tensor quantize_q4_k(const at::Tensor& x);
at::Tensor quantize_q5_k(const at::Tensor& x);
at::Tensor quantize_q6_k(const at::Tensor& x);
at::Tensor quantize_q4_0(const at::Tensor& x);
at::Tensor quantize_q4_1(const at::Tensor& x);
at::Tensor quantize_q5_0(const at::Tensor& x);
at::Tensor quantize_q5_1(const at::Tensor& x);

}  // namespace qt
