#pragma once
// Fused elementwise parts of a LLaMA block, forward and backward, each beside its plain-ATen reference:
//   - RMSNorm (transformers' LlamaRMSNorm: normalise in fp32, cast to the input dtype, scale by the weight):
//     one kernel reads a row once for its statistics and once to write, saving 1/rms per row for the backward;
//     the ATen composition runs ~6 kernels over fp32 copies of the row.
//   - SwiGLU, silu(gate) * up: one kernel forward, one for both input gradients; saves only gate and up (ATen's
//     composition also keeps silu(gate), one more [tokens, intermediate] tensor per block).
//   - RoPE (rotate_half form, as transformers' apply_rotary_pos_emb) on [B, S, heads, head_dim], the layout the
//     projections produce and flash attention takes: one kernel, no cat, no broadcast copies; the backward is
//     the inverse rotation and needs only cos and sin (nothing of x is kept).
//   - LoRA dropout without a stored mask (counter-based masks drawn again in every pass): the dropped input, and the
//     input gradient's rank-r term added under its mask.
// On CUDA (fp32 / fp16 / bf16, rows of a multiple of 8 elements, contiguous) the kernels run; elsewhere, and
// when the RMSNorm weight itself needs a gradient (full fine-tuning), the reference runs.
#include <ATen/core/Tensor.h>

#include <array>
#include <cstdint>
#include <vector>

namespace qt {

// x [.., H], weight [H] -> [..., H] in x's dtype. Differentiable in x (and, through the reference, in weight). With
// `spare` (a multiple of 8) the output is the first H columns of a [rows, H + spare] buffer whose last columns are the
// caller's to write (a LoRA group's concatenated input [x | x A^T | 0], built in place: project_group's x_widened).
at::Tensor rms_norm_fused(const at::Tensor& x, const at::Tensor& weight, double eps, int64_t spare = 0);
at::Tensor rms_norm_reference(const at::Tensor& x, const at::Tensor& weight, double eps);

// x = h + a and rms_norm_fused(x, weight, eps), returned as {x, the norm}: a block's attention residual and its MLP's
// input norm in one kernel (x's 2 bytes an element read back by the norm, and one launch, saved), the backward in
// one kernel that writes the gradient of h and a (x's own plus the norm's input gradient: autograd's add of the two
// saved). The same bits as the ops apart. Differentiable in h and a; the reference runs where rms_norm_fused's would.
// `spare`: the norm's output as rms_norm_fused's.
std::array<at::Tensor, 2> add_rms_norm_fused(const at::Tensor& h, const at::Tensor& a, const at::Tensor& weight,
                                             double eps, int64_t spare = 0);
std::array<at::Tensor, 2> add_rms_norm_reference(const at::Tensor& h, const at::Tensor& a, const at::Tensor& weight,
                                                 double eps);

// silu(gate) * up, both [..., I] of one dtype. Differentiable in both.
at::Tensor swiglu_fused(const at::Tensor& gate, const at::Tensor& up);
at::Tensor swiglu_reference(const at::Tensor& gate, const at::Tensor& up);
// The same on one fused gate / up projection output [.., 2I] (gate first) -> [.., I]; its gradient comes back as one
// [.., 2I] tensor (no concatenation of two halves).
at::Tensor swiglu_packed(const at::Tensor& gate_up);
// swiglu_packed's two passes as plain functions, outside autograd (a node that keeps gate_up and recomputes the
// SwiGLU in its backward pass instead of keeping it): the values [.., I], and the gradient of gate_up [.., 2I] from
// that of the values. The same kernels (or reference ops) as swiglu_packed, so the same bits.
at::Tensor swiglu_packed_values(const at::Tensor& gate_up);
at::Tensor swiglu_packed_grad(const at::Tensor& gate_up, const at::Tensor& grad);

// dst.copy_(src) for 2-D tensors of one dtype whose rows are contiguous (dst the first columns of a wider matrix,
// say): on CUDA, where sizes, strides and addresses are 16-byte multiples, one kernel of 16-byte vectors (ATen's
// copy_ runs its generic strided kernel there, at half the bandwidth); else copy_.
void copy_rows(const at::Tensor& dst, const at::Tensor& src);

// A host tensor on `device` without waiting for the device: copied into a fresh pinned block (the host allocator
// keeps it until the copy has run) and from there on the current stream, where a plain .to(device) from pageable
// memory waits for all the stream's work so far (the next step's first copies, queued while the step before still
// runs, would stall it). Tensors already there, or not going from the CPU to CUDA, take .to(device).
at::Tensor to_device_async(const at::Tensor& t, const at::Device& device);

// dst = src * scale in fp32, cast to dst's dtype, for many pairs at once: src fp32 and 2-D with contiguous rows,
// dst 2-D of src's shape with contiguous rows (a block of a larger matrix, say). On CUDA, where every dst is of one
// dtype (fp32 / fp16 / bf16) on src's device, one launch for all of them (their table copied to the device ahead of
// it); elsewhere the reference: dst.copy_(scale == 1 ? src : src * scale), one pair at a time.
struct ScaledCopy {
  at::Tensor dst, src;
  double scale = 1.0;
};
void scaled_copies(const std::vector<ScaledCopy>& copies);
void scaled_copies_reference(const std::vector<ScaledCopy>& copies);

// LoRA dropout without a stored mask (lib/kernels/lora_dropout.cu; the masks: lib/kernels/dropout_hash.h): a draw
// is a key and a probability, and every pass draws the same mask again from them. Kept elements are scaled by
// 1 / (1 - p) (in fp32), as at::dropout scales them.
struct DropoutMask {
  uint64_t key = 0;
  double p = 0;
};
// Whether the kernels take x2 [rows, cols]: on CUDA, fp32 / fp16 / bf16, cols a multiple of 8, rows of contiguous
// elements 16-byte aligned, a multiple of 8 elements apart.
bool lora_dropout_kernels_take(const at::Tensor& x2);
// x2 * mask / (1 - p) as a new contiguous [rows, cols] tensor: the kernel where it takes x2, else the reference.
at::Tensor lora_dropout_apply(const at::Tensor& x2, const DropoutMask& m);
at::Tensor lora_dropout_apply_reference(const at::Tensor& x2, const DropoutMask& m);
// dx += mask * (g a) / (1 - p), in place, the product in fp32 and rounded once: dx [rows, cols], g [rows, r],
// a [r, cols], one dtype. The kernel where it takes dx (g a never written), else the reference.
void lora_dropout_rank_update(const at::Tensor& dx, const at::Tensor& g, const at::Tensor& a, const DropoutMask& m);
void lora_dropout_rank_update_reference(const at::Tensor& dx, const at::Tensor& g, const at::Tensor& a,
                                        const DropoutMask& m);
// The mask itself, bool [rows, cols] on the CPU.
at::Tensor lora_dropout_mask(int64_t rows, int64_t cols, const DropoutMask& m);

// LoRA's rank-r GEMMs (lib/kernels/lora_gemm.cu): products that read a [tokens, width] operand once against r <= 128
// rows, which cuBLAS runs at 35-75% of the memory bandwidth (8B 2 x 2048 on an H100: 18 ms of a 237 ms step). The
// kernels run on CUDA where `kernels` is set and they take the operands (fp16 / bf16 on sm_90 or later, r <= 128, rows
// of contiguous elements 16-byte aligned and a multiple of 8 elements apart); elsewhere the references, ATen's GEMMs.
// out = x a^T into `out` ([M, r], x's dtype, rows of contiguous elements: the columns of a wider matrix, say): x [M, K],
// a [r, K]. Returns whether the kernel ran. `cluster` (tests, benchmarks): the CTAs that split a row tile's K, 1, 2, 4
// or 8 (0: picked).
bool lora_project(const at::Tensor& out, const at::Tensor& x, const at::Tensor& a, bool kernels = true,
                  int cluster = 0);
void lora_project_reference(const at::Tensor& out, const at::Tensor& x, const at::Tensor& a);
// alpha g^T x in fp32, [r, N], or its transpose [N, r] (a B gradient: alpha dy^T t): g [M, r], x [M, N].
struct LoraGrad {
  at::Tensor g, x;
  double alpha = 1.0;
  bool transposed = false;
};
// Every job's result, in one launch where the kernel takes them all (up to 4 of one M; r and N multiples of 8), else
// each by its reference (`kernel_ran`, where given, says which). `cluster` (tests): the CTAs that split a column tile's
// tokens, 1, 2, 4 or 8 (0: picked).
std::vector<at::Tensor> lora_grads(const std::vector<LoraGrad>& jobs, bool kernels = true, int cluster = 0,
                                   bool* kernel_ran = nullptr);
std::vector<at::Tensor> lora_grads_reference(const std::vector<LoraGrad>& jobs);

// x [B, S, heads, D], cos / sin [B, S, D] in x's dtype -> [B, S, heads, D]. Differentiable in x.
at::Tensor rope_fused(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);
at::Tensor rope_reference(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);
// One fused q / k / v projection output [B, S, (q_heads + 2 kv_heads) D] -> {rope(q) [B, S, q_heads, D], rope(k)
// [B, S, kv_heads, D], v [B, S, kv_heads, D]}, read out of it in place; the gradient comes back as one tensor of
// qkv's shape, written in place by the inverse rotation (no concatenation).
std::array<at::Tensor, 3> rope_qkv(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                                   int64_t q_heads, int64_t kv_heads);

// rope_qkv's node with its values given: returns q, k, v (rotated, as rope_qkv returned them in an earlier pass)
// without computing anything; the gradient flows back to qkv as rope_qkv's does. For a recomputation whose
// projection output is never computed (its values kept from the forward pass).
std::array<at::Tensor, 3> rope_qkv_replay(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                                          int64_t q_heads, int64_t kv_heads, const at::Tensor& q, const at::Tensor& k,
                                          const at::Tensor& v);

// Qwen3's q / k norms (transformers' Qwen3Attention: q_norm(q_proj(x).view(.., heads, D)), the same for k): frozen
// RMSNorm weights [D] over each head.
struct QkNorm {
  at::Tensor q_weight, k_weight;
  double eps = 1e-6;
};
// rope_qkv with each q and k head RMS-normed first: {rope(q_norm(q)), rope(k_norm(k)), v}, one kernel for the norm
// and the rotation of q (and of k) on CUDA; the backward recomputes 1/rms from qkv's values, which it keeps. With
// `kept`, qkv's values recorded in an earlier pass are used in place of qkv's (qkv is then the node of a
// recomputation's projection that computed no output: rope_qkv_replay's case); the gradient flows to qkv.
std::array<at::Tensor, 3> rope_qkv_norm(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                                        int64_t q_heads, int64_t kv_heads, const QkNorm& norm,
                                        const at::Tensor& kept = {});
// Its plain-ATen reference (differentiable in qkv).
std::array<at::Tensor, 3> rope_qkv_norm_reference(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                                                  int64_t q_heads, int64_t kv_heads, const QkNorm& norm);

// True when the fused kernels take these inputs (a CUDA build, CUDA tensors of a supported shape and dtype).
bool fused_ops_apply(const at::Tensor& x);

}  // namespace qt
