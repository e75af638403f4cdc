#pragma once
// AdamW (Loshchilov & Hutter, "Decoupled Weight Decay Regularization", 2019) over the trainable tensors, with
// fp32 moments, as torch.optim.AdamW computes it (bias-corrected moments, decoupled decay lr * wd * p); or with
// 8-bit blockwise moments (optim.name "adamw_8bit", lib/kernels/adamw_8bit.h: bitsandbytes' AdamW8bit) for every
// tensor of at least 4,096 elements, the smaller ones keeping fp32 moments as bitsandbytes' do.
#include <ATen/core/Tensor.h>

#include <string>
#include <utility>
#include <vector>

#include "lib/kernels/adamw_8bit.h"

namespace qt {

struct AdamWOptions {
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.0;
  bool eight_bit = false;  // 8-bit moments (adamw_8bit.h) for tensors of kAdam8bitMinElements or more
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

  // State for checkpoints: per parameter name, "exp_avg" and "exp_avg_sq" (fp32), or for 8-bit moments
  // "exp_avg.q8" / "exp_avg_sq.q8" (uint8 codes, the parameter's shape) with "exp_avg.absmax" / "exp_avg_sq.absmax"
  // (fp32, one a block); plus the step count.
  std::vector<std::pair<std::string, at::Tensor>> state_tensors() const;
  // Takes either form for any parameter: fp32 moments are quantized for 8-bit ones, 8-bit moments dequantized for
  // fp32 ones (a run resumed with another optim.name).
  void load_state(const std::vector<std::pair<std::string, at::Tensor>>& tensors, int64_t step);
  const std::vector<std::pair<std::string, at::Tensor>>& params() const { return params_; }
  bool state_on_host() const { return on_host_; }
  // Parameters whose moments are 8-bit.
  int64_t eight_bit_tensors() const;

 private:
  std::vector<std::pair<std::string, at::Tensor>> params_;
  void step_group(const std::vector<size_t>& group, double lr, double bc1, double bc2, const at::Tensor& found_inf);
  // The group's update on host copies of its fp32 parameters and gradients (state_on_host).
  void step_group_on_host(const std::vector<size_t>& group, double lr, const at::Tensor& found_inf);

  // The 8-bit parameters' group update (adamw_8bit_step) on `ps` (the parameters, or their host staging copies).
  void step_eight_bit(const std::vector<size_t>& idx, const std::vector<at::Tensor>& ps,
                      const std::vector<at::Tensor>& gs, double lr, const at::Tensor& found_inf);

  std::vector<at::Tensor> exp_avg_, exp_avg_sq_;  // fp32 moments (undefined for 8-bit ones)
  std::vector<bool> q8_;
  std::vector<BlockwiseQ8> m8_, v8_;  // 8-bit moments (where q8_)
  std::vector<double> lr_scale_;
  std::vector<at::Tensor> host_param_, host_grad_;  // state_on_host: pinned staging, made at the first step
  AdamWOptions options_;
  bool on_host_ = false;
  int64_t step_ = 0;
};

}  // namespace qt
