#pragma once
// AdamW (Loshchilov & Hutter, "Decoupled Weight Decay Regularization", 2019) over the trainable tensors, with
// fp32 moments, as torch.optim.AdamW computes it (bias-corrected moments, decoupled decay lr * wd * p).
#include <ATen/core/Tensor.h>

#include <string>
#include <utility>
#include <vector>

namespace qt {

struct AdamWOptions {
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.0;
};

class AdamW {
 public:
  // state_on_host: the moments live in (pinned) host memory and the update runs there, on the CPU's fused kernel:
  // each step copies the fp32 parameters and their gradients in and the parameters back (12 bytes an element over
  // PCIe) and frees 8 bytes an element of device memory (the execution plan's leanest rung, issue 26).
  AdamW(std::vector<std::pair<std::string, at::Tensor>> params, AdamWOptions options, bool state_on_host = false);
  // One update with learning rate `lr` from the parameters' .grad(); a parameter without a gradient is skipped.
  // found_inf (optional device scalar): where non-zero, the fp32 parameters and their moments stay as they were.
  void step(double lr, const at::Tensor& found_inf = {});
  // The last step() found found_inf set (read back by the caller): its count is taken back, as torch's fused
  // AdamW subtracts found_inf from its step tensors, so the bias corrections stay torch's.
  void step_skipped() { --step_; }
  // One parameter's learning rate as a multiple of step()'s (another learning rate, scheduled alike); default 1.
  void set_lr_scale(const std::string& name, double scale);
  void zero_grad();
  int64_t steps() const { return step_; }

  // State for checkpoints: per parameter name, "exp_avg" and "exp_avg_sq" (fp32), plus the step count.
  std::vector<std::pair<std::string, at::Tensor>> state_tensors() const;
  void load_state(const std::vector<std::pair<std::string, at::Tensor>>& tensors, int64_t step);
  const std::vector<std::pair<std::string, at::Tensor>>& params() const { return params_; }
  bool state_on_host() const { return on_host_; }

 private:
  std::vector<std::pair<std::string, at::Tensor>> params_;
  void step_group(const std::vector<size_t>& group, double lr, double bc1, double bc2, const at::Tensor& found_inf);
  // The group's update on host copies of its fp32 parameters and gradients (state_on_host).
  void step_group_on_host(const std::vector<size_t>& group, double lr, const at::Tensor& found_inf);

  std::vector<at::Tensor> exp_avg_, exp_avg_sq_;
  std::vector<double> lr_scale_;
  std::vector<at::Tensor> host_param_, host_grad_;  // state_on_host: pinned staging, made at the first step
  AdamWOptions options_;
  bool on_host_ = false;
  int64_t step_ = 0;
};

}  // namespace qt
