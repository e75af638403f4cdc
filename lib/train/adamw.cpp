#include "lib/train/adamw.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <optional>

#include "lib/core/error.h"

#ifdef QT_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#endif

namespace qt {

namespace {
// A zero fp32 tensor of p's shape: on p's device, or in host memory (pinned where p is on CUDA).
at::Tensor state_like(const at::Tensor& p, bool on_host) {
  if (!on_host) return at::zeros_like(p, p.options().dtype(at::kFloat));
  return at::zeros(p.sizes(), at::TensorOptions().dtype(at::kFloat).pinned_memory(p.is_cuda()));
}
}  // namespace

AdamW::AdamW(std::vector<std::pair<std::string, at::Tensor>> params, AdamWOptions options, bool state_on_host)
    : params_(std::move(params)), options_(options), on_host_(state_on_host) {
  for (const auto& [name, p] : params_) {
    QT_CHECK(!on_host_ || p.scalar_type() == at::kFloat, ErrorKind::Internal,
             "AdamW with its state on the host takes fp32 parameters ('" + name + "' is not)");
    const bool q8 = options_.eight_bit && p.numel() >= kAdam8bitMinElements;
    q8_.push_back(q8);
    exp_avg_.push_back(q8 ? at::Tensor() : state_like(p, on_host_));
    exp_avg_sq_.push_back(q8 ? at::Tensor() : state_like(p, on_host_));
    // 8-bit moments on the host live in plain host memory: only the parameters and gradients cross PCIe.
    const at::TensorOptions where = on_host_ ? at::TensorOptions() : at::TensorOptions().device(p.device());
    m8_.push_back(q8 ? q8_zeros(p.sizes(), where) : BlockwiseQ8{});
    v8_.push_back(q8 ? q8_zeros(p.sizes(), where) : BlockwiseQ8{});
  }
  lr_scale_.assign(params_.size(), 1.0);
}

int64_t AdamW::eight_bit_tensors() const { return std::count(q8_.begin(), q8_.end(), true); }

void AdamW::step_eight_bit(const std::vector<size_t>& idx, const std::vector<at::Tensor>& ps,
                           const std::vector<at::Tensor>& gs, double lr, const at::Tensor& found_inf) {
  std::vector<Adam8bitTensor> ts;
  for (size_t k = 0; k < idx.size(); ++k) {
    const at::Tensor& p = ps[k];
    // The kernel reads the gradient as the parameter's dtype.
    at::Tensor g = gs[k].scalar_type() == p.scalar_type() ? gs[k].contiguous() : gs[k].to(p.scalar_type());
    ts.push_back({p, g, m8_[idx[k]], v8_[idx[k]]});
  }
  if (ts.empty()) return;
  Adam8bitStep s;
  s.lr = lr;
  s.beta1 = options_.beta1;
  s.beta2 = options_.beta2;
  s.eps = options_.eps;
  s.weight_decay = options_.weight_decay;
  s.step = step_;
  adamw_8bit_step(ts, s, found_inf);
}

void AdamW::set_lr_scale(const std::string& name, double scale) {
  for (size_t i = 0; i < params_.size(); ++i)
    if (params_[i].first == name) {
      lr_scale_[i] = scale;
      return;
    }
  fail(ErrorKind::Internal, "AdamW::set_lr_scale: no parameter named " + name);
}

void AdamW::step(double lr, const at::Tensor& found_inf) {
  at::NoGradGuard no_grad;
  ++step_;
  const double bc1 = 1.0 - std::pow(options_.beta1, static_cast<double>(step_));
  const double bc2 = 1.0 - std::pow(options_.beta2, static_cast<double>(step_));
  // One group per learning rate (parameter order kept within each).
  std::map<double, std::vector<size_t>> groups;
  for (size_t i = 0; i < params_.size(); ++i) groups[lr_scale_[i]].push_back(i);
  for (const auto& [scale, group] : groups) {
    if (on_host_) step_group_on_host(group, lr * scale, found_inf);
    else step_group(group, lr * scale, bc1, bc2, found_inf);
  }
}

void AdamW::step_group_on_host(const std::vector<size_t>& group, double lr, const at::Tensor& found_inf) {
  if (host_param_.empty()) {  // pinned staging for the parameters and gradients, made once
    for (const auto& [name, p] : params_) {
      host_param_.push_back(state_like(p, true));
      host_grad_.push_back(state_like(p, true));
    }
  }
  // In: every parameter and its gradient (queued on the current stream, then one wait); the update on the CPU's
  // fused kernel; out: the parameters, queued behind whatever the device runs next.
  std::vector<at::Tensor> ps, gs, ms, vs, ps8, gs8;
  std::vector<size_t> taken, taken8;
  for (size_t i : group) {
    const at::Tensor& p = params_[i].second;
    if (!p.grad().defined()) continue;
    host_param_[i].copy_(p, /*non_blocking=*/true);
    host_grad_[i].copy_(p.grad(), /*non_blocking=*/true);
    if (q8_[i]) {
      ps8.push_back(host_param_[i]);
      gs8.push_back(host_grad_[i]);
      taken8.push_back(i);
      continue;
    }
    ps.push_back(host_param_[i]);
    gs.push_back(host_grad_[i]);
    ms.push_back(exp_avg_[i]);
    vs.push_back(exp_avg_sq_[i]);
    taken.push_back(i);
  }
  if (ps.empty() && ps8.empty()) return;
#ifdef QT_WITH_CUDA
  const size_t first = taken.empty() ? taken8[0] : taken[0];
  if (params_[first].second.is_cuda()) c10::cuda::getCurrentCUDAStream().synchronize();  // the copies landed
#endif
  std::optional<at::Tensor> inf;
  if (found_inf.defined()) inf = found_inf.to(at::kCPU, at::kFloat);
  if (!ps.empty()) {
    const at::Tensor step = at::full({}, static_cast<double>(step_), ps[0].options());
    const std::vector<at::Tensor> steps(ps.size(), step);
    at::_fused_adamw_(ps, gs, ms, vs, /*max_exp_avg_sqs=*/{}, steps, lr, options_.beta1, options_.beta2,
                      options_.weight_decay, options_.eps, /*amsgrad=*/false, /*maximize=*/false,
                      /*grad_scale=*/std::nullopt, inf);
  }
  step_eight_bit(taken8, ps8, gs8, lr, inf ? *inf : at::Tensor());
  taken.insert(taken.end(), taken8.begin(), taken8.end());
  for (size_t i : taken) params_[i].second.copy_(host_param_[i], /*non_blocking=*/true);
}

void AdamW::step_group(const std::vector<size_t>& group, double lr, double bc1, double bc2,
                       const at::Tensor& found_inf) {
  // fp32 parameters (LoRA, DoRA's magnitude, trained embeddings): torch's fused AdamW kernel (the update of
  // torch.optim.AdamW(fused=True), one multi-tensor kernel for every parameter: a step of the 8B shape has 448
  // LoRA tensors, and a handful of launches instead of eight multi-tensor ops keeps the GPU from waiting on the
  // host between them). found_inf (a device scalar, non-zero) makes it leave everything as it was.
  std::vector<at::Tensor> ps, gs, ms, vs, ps8, gs8;
  std::vector<size_t> taken8;
  bool all_fp32 = true;
  for (size_t i : group) {
    const at::Tensor& p = params_[i].second;
    if (!p.grad().defined()) continue;
    if (q8_[i]) {
      ps8.push_back(p);
      gs8.push_back(p.grad());
      taken8.push_back(i);
      continue;
    }
    all_fp32 = all_fp32 && p.scalar_type() == at::kFloat && p.grad().scalar_type() == at::kFloat &&
               p.device() == params_[0].second.device();
    ps.push_back(p);
    gs.push_back(p.grad());
    ms.push_back(exp_avg_[i]);
    vs.push_back(exp_avg_sq_[i]);
  }
  if (!ps8.empty()) {
    step_eight_bit(taken8, ps8, gs8, lr, found_inf);
    for (const at::Tensor& p : ps8) p.unsafeGetTensorImpl()->bump_version();
  }
  if (ps.empty()) return;
  if (all_fp32) {
    // The step count as the kernel reads it (one fp32 scalar on the parameters' device, shared by all).
    const at::Tensor step = at::full({}, static_cast<double>(step_), ps[0].options());
    const std::vector<at::Tensor> steps(ps.size(), step);
    std::optional<at::Tensor> inf;
    if (found_inf.defined()) inf = found_inf.to(ps[0].device(), at::kFloat);
    at::_fused_adamw_(ps, gs, ms, vs, /*max_exp_avg_sqs=*/{}, steps, lr, options_.beta1, options_.beta2,
                      options_.weight_decay, options_.eps, /*amsgrad=*/false, /*maximize=*/false,
                      /*grad_scale=*/std::nullopt, inf);
    // The fused kernel writes the parameters without bumping their version counters, as in-place ops do; readers
    // that key on them (the LoRA nodes' compute-dtype factors, autograd's saved-tensor checks) must see the write.
    for (const at::Tensor& p : ps) p.unsafeGetTensorImpl()->bump_version();
    return;
  }
  for (size_t i : group) {
    at::Tensor p = params_[i].second;
    const at::Tensor& g = p.grad();
    if (!g.defined() || q8_[i]) continue;
    at::Tensor g32 = g.to(at::kFloat);
    // torch.optim.AdamW (single-tensor path): decay first, then the Adam update.
    at::Tensor p32 = p.scalar_type() == at::kFloat ? p : p.to(at::kFloat);
    if (options_.weight_decay != 0) p32.mul_(1.0 - lr * options_.weight_decay);
    exp_avg_[i].lerp_(g32, 1.0 - options_.beta1);
    exp_avg_sq_[i].mul_(options_.beta2).addcmul_(g32, g32, 1.0 - options_.beta2);
    at::Tensor denom = (exp_avg_sq_[i].sqrt() / std::sqrt(bc2)).add_(options_.eps);
    p32.addcdiv_(exp_avg_[i], denom, -lr / bc1);
    if (p.scalar_type() != at::kFloat) p.copy_(p32);
  }
}

void AdamW::zero_grad() {
  for (auto& [name, p] : params_) {
    if (p.grad().defined()) p.mutable_grad() = at::Tensor();
  }
}

std::vector<std::pair<std::string, at::Tensor>> AdamW::state_tensors() const {
  std::vector<std::pair<std::string, at::Tensor>> out;
  for (size_t i = 0; i < params_.size(); ++i) {
    const std::string& name = params_[i].first;
    if (q8_[i]) {
      out.emplace_back(name + ".exp_avg.q8", m8_[i].codes);
      out.emplace_back(name + ".exp_avg.absmax", m8_[i].absmax);
      out.emplace_back(name + ".exp_avg_sq.q8", v8_[i].codes);
      out.emplace_back(name + ".exp_avg_sq.absmax", v8_[i].absmax);
    } else {
      out.emplace_back(name + ".exp_avg", exp_avg_[i]);
      out.emplace_back(name + ".exp_avg_sq", exp_avg_sq_[i]);
    }
  }
  return out;
}

void AdamW::load_state(const std::vector<std::pair<std::string, at::Tensor>>& tensors, int64_t step) {
  std::map<std::string, at::Tensor> by_name(tensors.begin(), tensors.end());
  at::NoGradGuard no_grad;
  for (size_t i = 0; i < params_.size(); ++i) {
    const at::Tensor& p = params_[i].second;
    for (const bool second : {false, true}) {
      const std::string name = params_[i].first + (second ? ".exp_avg_sq" : ".exp_avg");
      auto fp32 = by_name.find(name);
      auto codes = by_name.find(name + ".q8"), absmax = by_name.find(name + ".absmax");
      const bool has_q8 = codes != by_name.end() && absmax != by_name.end();
      if (fp32 == by_name.end() && !has_q8) fail(ErrorKind::Checkpoint, "optimizer state for '" + name + "' is missing");
      if (has_q8 && (codes->second.sizes() != p.sizes() || codes->second.scalar_type() != at::kByte ||
                     absmax->second.numel() != q8_blocks(p.numel())))
        fail(ErrorKind::Checkpoint, "optimizer state for '" + name + "' (8-bit) has another shape");
      if (!has_q8 && fp32->second.sizes() != p.sizes())
        fail(ErrorKind::Checkpoint, "optimizer state for '" + name + "' has another shape");
      if (q8_[i]) {
        BlockwiseQ8& dst = second ? v8_[i] : m8_[i];
        const BlockwiseQ8 src = has_q8 ? BlockwiseQ8{codes->second, absmax->second.reshape({-1})}
                                       : quantize_blockwise(fp32->second.to(at::kFloat), /*is_signed=*/!second);
        dst.codes.copy_(src.codes);
        dst.absmax.copy_(src.absmax);
      } else {
        at::Tensor& dst = second ? exp_avg_sq_[i] : exp_avg_[i];
        dst.copy_(has_q8 ? dequantize_blockwise({codes->second, absmax->second.reshape({-1})}, /*is_signed=*/!second)
                         : fp32->second);
      }
    }
  }
  step_ = step;
}

}  // namespace qt
