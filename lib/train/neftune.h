#pragma once
// NEFTune (Jain et al., 2023, "NEFTune: Noisy Embeddings Improve Instruction Finetuning"), as transformers'
// neftune_post_forward_hook applies it in training: uniform noise in [-m, m] added to the input embeddings,
// m = alpha / sqrt(seq_len * hidden), drawn from the default generator of the embeddings' device (so a resumed run
// draws what the straight run drew: the generator states are in the checkpoint).
#include <ATen/core/Tensor.h>

namespace qt {

// embeds [B, S, H]; alpha <= 0 returns embeds unchanged.
at::Tensor neftune_noise(const at::Tensor& embeds, double alpha);

}  // namespace qt
