#include "lib/train/neftune.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <cmath>

#include "lib/core/error.h"

namespace qt {

at::Tensor neftune_noise(const at::Tensor& embeds, double alpha) {
  if (alpha <= 0) return embeds;
  QT_CHECK(embeds.dim() == 3, ErrorKind::Internal, "neftune_noise: expected [batch, seq, hidden] embeddings");
  const double magnitude = alpha / std::sqrt(static_cast<double>(embeds.size(1) * embeds.size(2)));
  at::Tensor noise;
  {
    at::NoGradGuard no_grad;
    noise = at::empty_like(embeds).uniform_(-magnitude, magnitude);
  }
  return embeds + noise;
}

}  // namespace qt
