#include "lib/dist/parallel.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

namespace qt {
namespace {

class DataParallel : public Parallel {
 public:
  DataParallel(Communicator& comm, NamedTensors params) : comm_(comm), params_(std::move(params)) {}
  const NamedTensors& parameters() const override { return params_; }
  int64_t full_rows(const std::string&, const at::Tensor& p) const override { return p.size(0); }
  at::Tensor shard_of(const std::string&, const at::Tensor& full) const override { return full; }
  std::pair<int, int> optimizer_part() const override { return {0, 1}; }
  void reduce_gradients() override {
    if (comm_.world_size() == 1) return;
    for (auto& [n, p] : params_)
      if (p.grad().defined()) comm_.all_reduce(p.mutable_grad());
  }
  at::Tensor clip_grad_norm(double max_norm, const at::Device& device) override {
    return clip_grad_norm_async(params_, max_norm).to(device);
  }
  void gather_lora() override {}
  void release_lora() override {}
  FullyShard* sharded() override { return nullptr; }
  std::string describe() const override {
    return comm_.world_size() > 1 ? "data parallel over " + std::to_string(comm_.world_size()) + " ranks" : "one rank";
  }

 private:
  Communicator& comm_;
  NamedTensors params_;
};

class Sharded : public Parallel {
 public:
  Sharded(LlamaModel& model, Communicator& comm, FullyShardOptions options)
      : comm_(comm), fs_(model, comm, options), params_(fs_.parameters()) {}
  const NamedTensors& parameters() const override { return params_; }
  int64_t full_rows(const std::string& name, const at::Tensor&) const override { return fs_.full_rows(name); }
  at::Tensor shard_of(const std::string& name, const at::Tensor& full) const override {
    return fs_.shard_of(name, full);
  }
  std::pair<int, int> optimizer_part() const override { return {comm_.rank(), comm_.world_size()}; }
  // The block gradients were reduce-scattered block by block; the replicated ones (modules_to_save) are summed.
  void reduce_gradients() override { fs_.reduce_replicated_grads(); }
  at::Tensor clip_grad_norm(double max_norm, const at::Device& device) override {
    return at::scalar_tensor(fs_.clip_grad_norm(max_norm), at::TensorOptions().dtype(at::kFloat).device(device));
  }
  void gather_lora() override { fs_.gather_lora(); }
  void release_lora() override { fs_.release_lora(); }
  FullyShard* sharded() override { return &fs_; }
  std::string describe() const override {
    return "FullyShard: each rank holds " + std::to_string(fs_.sharded_bytes()) +
           " bytes of the sharded parameters (of " + std::to_string(fs_.unsharded_bytes()) + " unsharded) over " +
           std::to_string(comm_.world_size()) + " rank(s)";
  }

 private:
  Communicator& comm_;
  FullyShard fs_;
  NamedTensors params_;
};

}  // namespace

std::unique_ptr<Parallel> make_data_parallel(Communicator& comm, NamedTensors params) {
  return std::make_unique<DataParallel>(comm, std::move(params));
}

std::unique_ptr<Parallel> make_sharded(LlamaModel& model, Communicator& comm, FullyShardOptions options) {
  return std::make_unique<Sharded>(model, comm, options);
}

at::Tensor clip_grad_norm_async(const NamedTensors& params, double max_norm) {
  at::NoGradGuard no_grad;
  std::vector<at::Tensor> grads;
  for (const auto& [name, p] : params)
    if (p.grad().defined()) grads.push_back(p.grad().to(at::kFloat));
  if (grads.empty()) return at::zeros({}, at::kFloat);
  // Per-tensor norms in multi-tensor kernels, then the norm of the norms, and the gradients times
  // min(1, max_norm / (norm + 1e-6)) as torch.nn.utils.clip_grad_norm_ computes it: on the device, without
  // waiting for the norm (a factor of exactly 1 leaves the gradients as they are).
  const at::Tensor norm = at::linalg_vector_norm(at::stack(at::_foreach_norm(grads, 2)), 2);
  if (max_norm > 0) {
    std::vector<at::Tensor> own;
    for (const auto& [name, p] : params)
      if (p.grad().defined()) own.push_back(p.grad());
    const at::Tensor coef = (max_norm / (norm + 1e-6)).clamp_max_(1.0);
    at::_foreach_mul_(own, coef.to(own[0].scalar_type()));
  }
  return norm;
}

double clip_grad_norm(const NamedTensors& params, double max_norm) {
  return clip_grad_norm_async(params, max_norm).item<double>();
}

}  // namespace qt
