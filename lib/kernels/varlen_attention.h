#pragma once
// Causal attention over packed sequences in the variable-length ("varlen") layout: all tokens of a micro-batch
// in one [total_tokens, heads, head_dim] tensor, document boundaries given by cumulative lengths. On CUDA with
// bf16/fp16 this is FlashAttention-2 through ATen (at::_flash_attention_forward / _flash_attention_backward with
// cum_seq_q = cum_seq_k = cu_seqlens), so no [S, S] mask is ever built (../shared/ARCHITECTURE.md, "Packed
// sequences"). Everywhere else (CPU, fp32, head_dim not a multiple of 8 or > 256) the plain-ATen reference runs:
// one SDPA with a dense block-diagonal causal mask (O(total_tokens^2) memory; a reference, not a fast path).
#include <ATen/ATen.h>

#include <cstdint>

namespace qt {

// q [T, Hq, D]; k, v [T, Hkv, D] with Hq a multiple of Hkv (GQA: query head h reads key/value head
// h / (Hq / Hkv), as HF's repeat_kv); cu_seqlens int32 [n_docs + 1], cu_seqlens[0] = 0,
// cu_seqlens[n_docs] = T, on q's device; max_seqlen = the longest document (host value: no sync).
// Token i of a document sees tokens j <= i of the same document; with window > 0 only the last `window`
// of them (i - j < window, itself included: HF's `sliding_window` convention, flash window_size_left =
// window - 1). window <= 0: no window. scale multiplies q.k (usually 1/sqrt(D)). Returns [T, Hq, D] in q's
// dtype; differentiable in q, k, v.
at::Tensor varlen_causal_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                   const at::Tensor& cu_seqlens, int64_t max_seqlen, double scale,
                                   int64_t window = -1);

// The same contract in plain ATen (autograd through ATen ops); used on CPU and for other dtypes, and as the
// oracle of the flash path in tests.
at::Tensor varlen_causal_attention_reference(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                             const at::Tensor& cu_seqlens, int64_t max_seqlen, double scale,
                                             int64_t window = -1);

// True when varlen_causal_attention takes the flash path for these inputs.
bool varlen_attention_uses_flash(const at::Tensor& q);

// The varlen layout of a qt::Batch's rows (doc_ids [B, S] int32, -1 for padding; see lib/core/batch.h).
//
// Choice: NO GATHER. Every token of the [B, S] grid stays, in row-major order, so the varlen tensors are plain
// views of [B, S, H, D] activations (x.reshape({B * S, H, D})) and token_index is the identity arange. Each
// padding token (doc -1) becomes its own 1-token document: it attends only to itself, exactly as the dense
// mask of LlamaModel::forward_hidden does today (its output is finite and never reaches the loss, whose
// targets are -100 there). A document never crosses a row boundary, even when two rows share a doc id.
// Documents must be contiguous runs within a row (the packer makes them so): a non-negative id that reappears
// after a different id in the same row is an error.
struct VarlenLayout {
  at::Tensor cu_seqlens;   // int32 [n_docs + 1] on doc_ids' device
  int64_t max_seqlen = 0;  // longest document (host value)
  int64_t num_docs = 0;    // documents, each padding token counted as one
  at::Tensor token_index;  // int64 [B * S] on doc_ids' device: varlen row t is flattened grid token
                           // token_index[t] (identity under the no-gather choice above)
};
// Reads doc_ids on the host (one device-to-host copy of B * S int32 when doc_ids is on the GPU).
VarlenLayout cu_seqlens_from_doc_ids(const at::Tensor& doc_ids);

}  // namespace qt
