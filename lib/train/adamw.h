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
  AdamW(std::vector<std::pair<std::string, at::Tensor>> params, AdamWOptions options);
  // One update with learning rate `lr` from the parameters' .grad(); a parameter without a gradient is skipped.
  // found_inf (optional device scalar): where non-zero, the fp32 parameters and their moments stay as they were.
  void step(double lr, const at::Tensor& found_inf = {});
  // One parameter's learning rate as a multiple of step()'s (another learning rate, scheduled alike); default 1.
  void set_lr_scale(const std::string& name, double scale);
  void zero_grad();
  int64_t steps() const { return step_; }

  // State for checkpoints: per parameter name, "exp_avg" and "exp_avg_sq" (fp32), plus the step count.
  std::vector<std::pair<std::string, at::Tensor>> state_tensors() const;
  void load_state(const std::vector<std::pair<std::string, at::Tensor>>& tensors, int64_t step);
  const std::vector<std::pair<std::string, at::Tensor>>& params() const { return params_; }

 private:
  std::vector<std::pair<std::string, at::Tensor>> params_;
  void step_group(const std::vector<size_t>& group, double lr, double bc1, double bc2, const at::Tensor& found_inf);

  std::vector<at::Tensor> exp_avg_, exp_avg_sq_;
  std::vector<double> lr_scale_;
  AdamWOptions options_;
  int64_t step_ = 0;
};

}  // namespace qt
