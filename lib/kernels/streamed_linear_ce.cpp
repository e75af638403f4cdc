#include "lib/kernels/streamed_linear_ce.h"

#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>
#include <array>
#include <optional>
#include <string>

#include "lib/core/error.h"

namespace qt {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The weight's vocabulary slices on the compute device, in order. On CUDA with the weight on the host, slice i is
// copied into staging buffer i % 2 on a side stream while slice i - 1's GEMMs run: the copy waits until the
// compute stream has finished with the buffer's previous slice (and, for the first two, with whatever held the
// buffers' memory before), the compute stream until the copy is done.
class SliceStream {
 public:
  SliceStream(const at::Tensor& weight, at::Device device, int64_t slice) : weight_(weight), slice_(slice) {
    staged_ = device.is_cuda() && !weight.is_cuda();
    if (!staged_) return;
    compute_.emplace(c10::cuda::getCurrentCUDAStream(device.index()));
    side_.emplace(c10::cuda::getStreamFromPool(false, device.index()));
    for (auto& b : buffers_) b = at::empty({std::min(slice, weight.size(0)), weight.size(1)}, weight.options().device(device));
    // The buffers come from the compute stream's pool: their memory may still be read by work queued there before
    // (the previous pass's last slice, freed when its SliceStream ended). The side stream writes them only after it.
    at::cuda::CUDAEvent allocated;
    allocated.record(*compute_);
    allocated.block(*side_);
  }

  int64_t count() const { return (weight_.size(0) + slice_ - 1) / slice_; }
  int64_t begin(int64_t i) const { return i * slice_; }
  int64_t rows(int64_t i) const { return std::min(slice_, weight_.size(0) - i * slice_); }

  // Slice i on the device, usable on the current stream; issues slice i + 1's copy.
  at::Tensor get(int64_t i) {
    if (!staged_) return weight_.narrow(0, begin(i), rows(i));
    if (i == 0) issue(0);
    if (i + 1 < count()) issue(i + 1);
    const size_t k = static_cast<size_t>(i % 2);
    copied_[k].block(*compute_);
    return buffers_[k].narrow(0, 0, rows(i));
  }
  // The compute stream's work on slice i is queued: its buffer may be refilled after it.
  void done(int64_t i) {
    if (staged_) used_[static_cast<size_t>(i % 2)].record(*compute_);
  }

 private:
  void issue(int64_t i) {
    const size_t k = static_cast<size_t>(i % 2);
    c10::cuda::CUDAStreamGuard guard(*side_);
    if (i >= 2) used_[k].block(*side_);
    buffers_[k].narrow(0, 0, rows(i)).copy_(weight_.narrow(0, begin(i), rows(i)), /*non_blocking=*/true);
    copied_[k].record(*side_);
  }

  at::Tensor weight_;
  int64_t slice_;
  bool staged_ = false;
  std::optional<c10::cuda::CUDAStream> compute_, side_;
  std::array<at::Tensor, 2> buffers_;
  std::array<at::cuda::CUDAEvent, 2> copied_, used_;
};

// h [T, H] times slice^T, in fp32 (CUDA: the compute dtype's GEMM with an fp32 output; CPU: fp32 operands).
at::Tensor logits_fp32(const at::Tensor& h, const at::Tensor& w) {
  if (h.is_cuda()) return at::mm(h, w.t(), at::kFloat);
  return at::mm(h.to(at::kFloat), w.to(at::kFloat).t());
}

int64_t auto_slice(int64_t tokens, int64_t vocab, int64_t asked) {
  if (asked > 0) return std::min(asked, vocab);
  // The fp32 tile [T, slice] at about 64 MiB, 256 to 8192 rows.
  const int64_t s = std::clamp<int64_t>((int64_t{64} << 20) / (4 * std::max<int64_t>(tokens, 1)), 256, 8192);
  return std::min(s / 128 * 128, vocab);
}

struct StreamedCeFn : public torch::autograd::Function<StreamedCeFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& hidden, const at::Tensor& weight,
                            const at::Tensor& labels, int64_t slice, int64_t ignore_index) {
    const at::Device device = hidden.device();
    const int64_t T = hidden.size(0), V = weight.size(0);
    at::Tensor h = hidden.contiguous();
    at::Tensor y = labels.to(device, at::kLong, /*non_blocking=*/false);
    at::Tensor counted = y != ignore_index;
    at::Tensor y_safe = at::where(counted, y, at::zeros_like(y));
    const auto f32 = h.options().dtype(at::kFloat);
    at::Tensor m = at::full({T}, -std::numeric_limits<float>::infinity(), f32);
    at::Tensor s = at::zeros({T}, f32);
    at::Tensor z_y = at::zeros({T}, f32);
    {
      SliceStream slices(weight, device, slice);
      for (int64_t i = 0; i < slices.count(); ++i) {
        at::Tensor z = logits_fp32(h, slices.get(i));  // [T, n]
        slices.done(i);
        at::Tensor m_new = at::maximum(m, std::get<0>(z.max(1)));
        s = s * at::exp(m - m_new) + at::exp(z - m_new.unsqueeze(1)).sum(1);
        m = m_new;
        // The label's logit where it falls in this slice.
        const int64_t v0 = slices.begin(i), n = slices.rows(i);
        at::Tensor here = (y_safe >= v0) & (y_safe < v0 + n);
        at::Tensor col = at::clamp(y_safe - v0, 0, n - 1).unsqueeze(1);
        z_y = z_y + at::where(here, z.gather(1, col).squeeze(1), at::zeros_like(z_y));
      }
    }
    at::Tensor lse = m + at::log(s);
    at::Tensor w_row = counted.to(at::kFloat);
    at::Tensor loss = ((lse - z_y) * w_row).sum();
    // dL/dh = sum over slices of (softmax - onehot) W_s, rows with an ignored label left at zero.
    at::Tensor dh = at::zeros({T, h.size(1)}, f32);
    if (hidden.requires_grad()) {
      SliceStream slices(weight, device, slice);
      for (int64_t i = 0; i < slices.count(); ++i) {
        at::Tensor w = slices.get(i);
        at::Tensor g = at::exp(logits_fp32(h, w) - lse.unsqueeze(1));
        const int64_t v0 = slices.begin(i), n = slices.rows(i);
        at::Tensor here = (y_safe >= v0) & (y_safe < v0 + n) & counted;
        at::Tensor col = at::clamp(y_safe - v0, 0, n - 1).unsqueeze(1);
        g.scatter_add_(1, col, -here.to(at::kFloat).unsqueeze(1));
        g.mul_(w_row.unsqueeze(1));
        dh.add_(h.is_cuda() ? at::mm(g.to(h.scalar_type()), w, at::kFloat) : at::mm(g, w.to(at::kFloat)));
        slices.done(i);
      }
    }
    ctx->save_for_backward({dh.to(hidden.scalar_type())});
    return loss;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    at::Tensor dh = ctx->get_saved_variables()[0];
    return {dh * grads[0].to(dh.scalar_type()), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

at::Tensor streamed_linear_cross_entropy(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels,
                                         const StreamedLinearCeOptions& options) {
  const std::string me = "streamed_linear_cross_entropy: ";
  QT_CHECK(hidden.dim() == 2 && weight.dim() == 2 && labels.dim() == 1 && hidden.size(1) == weight.size(1) &&
               labels.size(0) == hidden.size(0) && weight.size(0) > 0,
           ErrorKind::Internal, me + "expects hidden [T, H], weight [V, H], labels [T]");
  QT_CHECK(hidden.scalar_type() == weight.scalar_type() && at::isFloatingType(hidden.scalar_type()),
           ErrorKind::Internal, me + "hidden and weight must share one floating dtype");
  QT_CHECK(weight.is_cpu() || weight.device() == hidden.device(), ErrorKind::Internal,
           me + "the weight lives on the host or on hidden's device");
  QT_CHECK(!weight.requires_grad(), ErrorKind::Internal, me + "the weight is frozen (no gradient)");
  if (labels.is_cpu()) {  // checked on the host where they are there (no device sync), as the fused loss does
    at::Tensor y = labels.to(at::kLong);
    at::Tensor bad = (y != options.ignore_index) & ((y < 0) | (y >= weight.size(0)));
    if (bad.any().item<bool>()) {
      const int64_t i = bad.nonzero()[0][0].item<int64_t>();
      fail(ErrorKind::Data, "token " + std::to_string(i) + ": label " + std::to_string(y[i].item<int64_t>()) +
                                " is outside the vocabulary [0, " + std::to_string(weight.size(0)) + ")");
    }
  }
  const int64_t slice = auto_slice(hidden.size(0), weight.size(0), options.vocab_slice);
  return StreamedCeFn::apply(hidden, weight, labels, slice, options.ignore_index);
}

}  // namespace qt
