#pragma once
// Causal attention as one autograd node over ATen's fused kernels (CPU: flash-for-CPU; CUDA bf16/fp16: cuDNN's
// or FlashAttention-2's dense kernel), with an optional stash through which activation checkpointing keeps the
// forward pass's output and log-sum-exp and replays them in the recomputation, so that the recomputed block runs
// no attention forward (the backward kernel needs q, k, v, the output and the log-sum-exp, nothing else).
// Grouped K/V (fewer key/value heads) are expanded to every query head inside the node, their gradients summed
// back, except where cuDNN takes them as they are (rows a multiple of 128 tokens, head_dim 64 or 128).
#include <ATen/core/Tensor.h>

#include <cstdint>

namespace qt {

struct AttentionStash {
  bool replay = false;  // false: record the output and log-sum-exp here; true: give them back instead of computing
  int64_t forward_runs = 0;  // forward kernels causal_attention ran with this stash (replays run none)
  at::Tensor out, lse;
  // The CUDA kernels' other outputs, passed back to their backward as autograd would: philox state (unused
  // without dropout) and the cumulative-length tensors (empty for dense rows).
  at::Tensor seed, offset, cum_q, cum_k;
  // keep_qkv (LlamaModel): the rotated q, k, v [B, S, heads, D] recorded beside the output (when keep_qkv is set
  // while recording) and given back in the recomputation, whose q / k / v projection then computes no output.
  bool keep_qkv = false;
  at::Tensor q, k, v;
  // keep_qkv where q and k are normed per head before RoPE (Qwen3): the projection output [B, S, (Hq + 2 Hkv) D]
  // instead, from which the recomputation renorms and rotates q and k (rope_qkv_norm's kept values).
  at::Tensor qkv;
  // keep_residual (LlamaModel): the block's residual stream after attention, h + o_proj(attention), recorded and
  // given back the same way; the recomputation's o_proj then computes no output.
  bool keep_residual = false;
  at::Tensor residual;
  // keep_gate_up (ExecPlan::gate_up_kept_blocks): the MLP's gate / up projection output [.., 2 I], recorded and kept
  // on the device, given back the same way; the recomputation's gate / up projection then computes no output (no
  // GEMM: 4 T H I FLOPs less a block).
  bool keep_gate_up = false;
  at::Tensor gate_up;
};

enum class AttentionBackend { CpuFlash, CudaCudnn, CudaFlash };

// Whether cuDNN takes grouped K / V as they are (its backward sums each group's K / V gradients itself): saves the
// two expansions (and the expanded copies held for the backward pass: 128 MiB a block at 8,192 tokens for the 8B
// shape) and the gradient sums. Only for rows a multiple of 128 tokens long and head_dim 64 or 128, the shapes
// measured in training: there cuDNN's grouped results equal the expanded ones (scripts/cudnn_gqa_probe.py, 240
// shapes on an H200, all equal; the [gpu] test against the float64 oracle). An earlier model-level run at 40
// tokens and head_dim 16 gave wrong K / V gradients that the probe did not reproduce, hence the narrow gate.
// (Rows S tokens long, head_dim D; the execution plan's footprint counts K / V expanded where this is false.)
bool cudnn_grouped_kv(int64_t S, int64_t D);

// True when causal_attention takes these inputs: CPU float / bfloat16, or CUDA bf16 / fp16 with head_dim a
// multiple of 8 and at most 128.
bool causal_attention_supported(const at::Tensor& q);

// q [B, Hq, S, D], k and v [B, Hkv, S, D] (Hq a multiple of Hkv; unit stride in D); causal; scale multiplies q.k.
// prefer_cudnn picks cuDNN over FlashAttention-2 on CUDA. With a stash in replay mode holding an output, that
// output is returned (no kernel runs) and the backward pass uses its log-sum-exp; in record mode the output and
// log-sum-exp are stored into it. Returns [B, Hq, S, D].
at::Tensor causal_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                            bool prefer_cudnn, AttentionStash* stash);


}  // namespace qt
