#pragma once
// lm_head + cross-entropy with a frozen weight that lives in (pinned) host memory: the [V, H] weight never sits on
// the GPU whole. It is streamed through the GPU in vocabulary slices, two passes:
//   pass 1, per slice: logits [T, slice] = h W_s^T in fp32, folded into a running max and sum-exp per row
//           (the online log-sum-exp of Milakov & Gimelshein, 2018), and the label's logit where it falls there;
//   pass 2, per slice again: dL/dlogits = softmax - onehot (rows with an ignored label: 0), dh += that W_s.
// As in the fused loss (fused_linear_ce.h), the gradient with respect to `hidden` is formed in the forward pass and
// backward only scales it. Each slice is copied on a side stream into one of two staging buffers while the
// previous slice's GEMMs run. Device memory: two [slice, H] staging buffers, one [T, slice] fp32 tile, dh.
// PCIe: 2 V H element_size bytes a call (about 2.1 GB at Llama 3.1 8B's lm_head), what a budget that cannot hold
// the weight pays. On the CPU the same arithmetic runs on the weight where it is (the reference the tests use).
#include <ATen/ATen.h>

#include <cstdint>

namespace qt {

struct StreamedLinearCeOptions {
  int64_t vocab_slice = 0;  // rows of the weight per slice; 0: automatic (an fp32 [T, slice] tile of about 64 MiB)
  int64_t ignore_index = -100;
};

// hidden [T, H] on its device (CPU or CUDA), weight [V, H] of hidden's dtype on the CPU (pinned for overlapped
// copies) or on hidden's device, labels [T] (int64 / int32) anywhere; the weight takes no gradient. Returns the fp32
// sum of the loss over tokens whose label is not ignore_index (differentiable with respect to hidden).
at::Tensor streamed_linear_cross_entropy(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels,
                                         const StreamedLinearCeOptions& options = {});

}  // namespace qt
