#include "lib/train/adamw.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <cmath>

#include "lib/core/error.h"

namespace qt {

AdamW::AdamW(std::vector<std::pair<std::string, at::Tensor>> params, AdamWOptions options)
    : params_(std::move(params)), options_(options) {
  for (const auto& [name, p] : params_) {
    exp_avg_.push_back(at::zeros_like(p, p.options().dtype(at::kFloat)));
    exp_avg_sq_.push_back(at::zeros_like(p, p.options().dtype(at::kFloat)));
  }
}

void AdamW::step(double lr) {
  at::NoGradGuard no_grad;
  ++step_;
  const double bc1 = 1.0 - std::pow(options_.beta1, static_cast<double>(step_));
  const double bc2 = 1.0 - std::pow(options_.beta2, static_cast<double>(step_));
  for (size_t i = 0; i < params_.size(); ++i) {
    at::Tensor p = params_[i].second;
    const at::Tensor& g = p.grad();
    if (!g.defined()) continue;
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
    out.emplace_back(params_[i].first + ".exp_avg", exp_avg_[i]);
    out.emplace_back(params_[i].first + ".exp_avg_sq", exp_avg_sq_[i]);
  }
  return out;
}

void AdamW::load_state(const std::vector<std::pair<std::string, at::Tensor>>& tensors, int64_t step) {
  std::map<std::string, at::Tensor> by_name(tensors.begin(), tensors.end());
  at::NoGradGuard no_grad;
  for (size_t i = 0; i < params_.size(); ++i) {
    for (auto [suffix, dst] : {std::pair<const char*, at::Tensor*>{".exp_avg", &exp_avg_[i]}, {".exp_avg_sq", &exp_avg_sq_[i]}}) {
      auto it = by_name.find(params_[i].first + suffix);
      if (it == by_name.end()) fail(ErrorKind::Checkpoint, "optimizer state for '" + params_[i].first + suffix + "' is missing");
      if (it->second.sizes() != dst->sizes())
        fail(ErrorKind::Checkpoint, "optimizer state for '" + params_[i].first + suffix + "' has another shape");
      dst->copy_(it->second);
    }
  }
  step_ = step;
}

double clip_grad_norm(const std::vector<std::pair<std::string, at::Tensor>>& params, double max_norm) {
  at::NoGradGuard no_grad;
  std::vector<at::Tensor> sq;
  for (const auto& [name, p] : params)
    if (p.grad().defined()) sq.push_back(p.grad().to(at::kFloat).pow(2).sum());
  if (sq.empty()) return 0.0;
  const double norm = std::sqrt(at::stack(sq).sum().item<double>());
  if (max_norm > 0 && norm > max_norm) {
    const double scale = max_norm / (norm + 1e-6);
    for (const auto& [name, p] : params)
      if (p.grad().defined()) p.grad().mul_(scale);
  }
  return norm;
}

}  // namespace qt
