// LoRA and DoRA on NF4 block linears against transformers + PEFT + bitsandbytes (tests/oracles/gen_lora.py,
// gen_dora.py): the loss and every LoRA gradient; PEFT's initialisation; the "lora" config section; the PEFT adapter
// files both ways; the merged export; generation's stopping and top-p rules.
#include <ATen/ATen.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <random>
#include <limits>
#include <map>
#include <mutex>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <ATen/core/grad_mode.h>
#include <torch/csrc/autograd/function.h>

#include "lib/core/files.h"
#include "lib/core/json.h"
#include "lib/core/safetensors.h"
#include "lib/model/generate.h"
#include "lib/kernels/dropout_hash.h"
#include "lib/kernels/fused_ops.h"
#include "lib/kernels/nf4_dequant.h"
#include "lib/kernels/tuned_gemm.h"
#include "lib/model/block_checkpoint.h"
#include "lib/model/hf_loader.h"
#include "lib/model/lora.h"
#include "lib/model/merge.h"
#include "lib/model/peft_adapter.h"
#include "lib/model/projection_group.h"
#include "lib/model/random_init.h"
#include "lib/model/weight_streaming.h"
#include "lib/quant/nf4.h"
#include "lib/train/adamw.h"
#include "lib/train/exact_match.h"
#include "lib/train/dpo.h"
#include "lib/train/train_stages.h"
#include "tests/catch.h"
#include "tests/test_util.h"

using qt::test::fixture;
using qt::test::rel_err;

using qt::test::error_of;
using qt::test::has;

namespace {

at::Tensor causal_lm_loss(const qt::LlamaModel& model, const at::Tensor& ids, const at::Tensor& labels) {
  at::Tensor logits = model.forward(ids);
  const int64_t V = model.config.vocab_size, S = ids.size(1);
  return at::cross_entropy_loss(logits.narrow(1, 0, S - 1).reshape({-1, V}).to(at::kFloat),
                                labels.narrow(1, 1, S - 1).reshape({-1}));  // ignore_index -100, as the oracle
}

qt::LoadOptions nf4_load() {
  qt::LoadOptions o;
  o.quantize_nf4 = true;
  return o;
}

// The NF4 base of the LoRA fixtures with the all_targets adapter, on `device` in `dtype`, set up by `setup`: its
// loss on the reference batch, then every LoRA gradient (fp32, in lora_parameters' order).
// `after` runs once the backward pass is done, the model still alive.
// The NF4 fixture base with the all-targets PEFT adapter.
qt::LlamaModel fixture_model(const at::Device& device, c10::ScalarType dtype) {
  qt::LoadOptions opt{device, dtype};
  opt.quantize_nf4 = true;
  qt::LlamaModel m = qt::load_llama(fixture("lora/base_nf4"), opt);
  qt::load_peft_adapter(m, fixture("lora/all_targets/adapter"));
  return m;
}

std::vector<at::Tensor> fixture_loss_and_grads(const std::function<void(qt::LlamaModel&)>& setup,
                                               const at::Device& device = at::kCPU,
                                               c10::ScalarType dtype = at::kFloat,
                                               const std::function<void(qt::LlamaModel&)>& after = {}) {
  qt::LlamaModel m = fixture_model(device, dtype);
  setup(m);
  qt::SafetensorsFile ref(fixture("lora/all_targets/reference.safetensors"));
  at::Tensor loss = causal_lm_loss(m, ref.load("input_ids", at::kLong, device), ref.load("labels", at::kLong, device));
  loss.backward();
  std::vector<at::Tensor> out{loss.detach().to(at::kFloat)};
  for (auto& [key, t] : qt::lora_parameters(m)) out.push_back(t.grad().to(at::kFloat).clone());
  if (after) after(m);
  return out;
}

void check_against_peft(const std::string& base_dir, const std::string& name, double loss_bound, double grad_bound,
                        const std::function<void(qt::LlamaModel&)>& setup = {}) {
  INFO(name << " on " << base_dir);
  qt::LlamaModel model = qt::load_llama(fixture("lora/" + base_dir), nf4_load());
  model.for_each_linear([](const std::string& n, qt::Linear& l) {
    INFO(n);
    REQUIRE(l.quantized());
  });
  const qt::PeftAdapterConfig cfg = qt::load_peft_adapter(model, fixture("lora/" + name + "/adapter"));
  if (setup) setup(model);
  qt::SafetensorsFile ref(fixture("lora/" + name + "/reference.safetensors"));
  at::Tensor ids = ref.load("input_ids", at::kLong, at::kCPU);
  at::Tensor labels = ref.load("labels", at::kLong, at::kCPU);
  at::Tensor loss = causal_lm_loss(model, ids, labels);
  loss.backward();
  CHECK(rel_err(loss, ref.view("loss")) < loss_bound);
  auto params = qt::lora_parameters(model);
  int64_t grads = 0;
  for (const auto& info : ref.tensors())
    if (info.name.rfind("grad.", 0) == 0) ++grads;
  CHECK(static_cast<int64_t>(params.size()) == grads);
  for (auto& [key, t] : params) {
    INFO(key);
    REQUIRE(t.requires_grad());
    REQUIRE(t.grad().defined());
    REQUIRE(ref.find("grad." + key) != nullptr);
    CHECK(ref.view("grad." + key).abs().max().item<double>() > 0);  // a zero reference would prove nothing
    CHECK(rel_err(t.grad(), ref.view("grad." + key)) < grad_bound);
  }
  // A and B (and DoRA's magnitude) of every targeted linear of every layer.
  CHECK(static_cast<int64_t>(params.size()) ==
        (cfg.lora.use_dora ? 3 : 2) * static_cast<int64_t>(cfg.lora.targets.size()) * model.config.num_hidden_layers);
}

// check_against_peft under checkpointing with the keep ladder at `keep` (qkv or above): every block's
// recomputation took its q / k / v from the kept tensors and computed no projection output.
void check_keep_against_peft(const std::string& base_dir, const std::string& name, qt::KeepLevel keep) {
  std::shared_ptr<qt::ModelStats> stats;
  int64_t layers = 0;
  check_against_peft(base_dir, name, 1e-5, 1e-4, [&](qt::LlamaModel& m) {
    m.plan.checkpointing = true;
    m.plan.keep = keep;
    stats = m.stats;
    layers = m.config.num_hidden_layers;
  });
  REQUIRE(stats);
  CHECK(layers > 0);
  CHECK(stats->qkv_replays == layers);
  CHECK(stats->outputs_skipped >= (keep == qt::KeepLevel::Residual ? 2 : 1) * layers);  // q / k / v (and o_proj)
}

std::string copy_adapter(const std::string& from, const std::string& scratch) {
  const std::string dir = qt::test::scratch_dir(scratch);
  qt::files::copy_file(qt::files::join(from, qt::kAdapterConfigFile), qt::files::join(dir, qt::kAdapterConfigFile));
  qt::files::copy_file(qt::files::join(from, qt::kAdapterWeightsFile), qt::files::join(dir, qt::kAdapterWeightsFile));
  return dir;
}

// Rewrites the adapter's safetensors through `edit` (name -> tensor map).
void edit_weights(const std::string& dir, const std::function<void(std::map<std::string, at::Tensor>&)>& edit) {
  const std::string path = qt::files::join(dir, qt::kAdapterWeightsFile);
  std::map<std::string, at::Tensor> tensors;
  {
    qt::SafetensorsFile f(path);
    for (const auto& info : f.tensors()) tensors[info.name] = f.view(info.name).clone();
  }
  edit(tensors);
  std::vector<std::pair<std::string, at::Tensor>> out(tensors.begin(), tensors.end());
  qt::save_safetensors(path, out);
}

void edit_config(const std::string& dir, const std::function<void(qt::Json&)>& edit) {
  const std::string path = qt::files::join(dir, qt::kAdapterConfigFile);
  qt::Json j = qt::read_json_file(path, qt::ErrorKind::Checkpoint);
  edit(j);
  qt::write_json_file(path, j);
}

// Linears as a block's q, k, v (or gate, up): NF4 bases quantized from random weights, LoRA A and B random (B
// non-zero), ranks and scales differing from member to member.
std::vector<qt::Linear> group_members(const std::vector<int64_t>& outs, int64_t in, const std::vector<int64_t>& ranks,
                                      const at::Device& device) {
  std::vector<qt::Linear> ls(outs.size());
  for (size_t i = 0; i < outs.size(); ++i) {
    ls[i].nf4 = std::make_shared<qt::Nf4Weight>(qt::quantize_nf4((at::randn({outs[i], in}) * 0.05).to(device)));
    ls[i].lora = std::make_shared<qt::LoraAdapter>();
    ls[i].lora->A = (at::randn({ranks[i], in}) * 0.1).to(device).requires_grad_(true);
    ls[i].lora->B = (at::randn({outs[i], ranks[i]}) * 0.1).to(device).requires_grad_(true);
    ls[i].lora->scale = 0.5 + static_cast<double>(i);
  }
  return ls;
}

// LoRA dropout in plain ops, drawn as the LoRA nodes draw it (qlora_linear.h): on CUDA where the kernels take the
// input, the counter-based mask (lora_dropout_mask, computed on the CPU) of the key the default CUDA generator's seed
// and offset give, the offset advanced by 4; else at::dropout. Differentiable in x.
at::Tensor reference_dropout(const at::Tensor& x, double p) {
  const at::Tensor x2 = x.reshape({-1, x.size(-1)});
  if (!qt::lora_dropout_kernels_take(x2)) return at::dropout(x, p, /*train=*/true);
  at::Generator gen = at::cuda::detail::getDefaultCUDAGenerator(x.get_device());
  std::pair<uint64_t, uint64_t> seed_offset;
  {
    std::lock_guard<std::mutex> lock(gen.mutex());
    seed_offset = at::check_generator<at::CUDAGeneratorImpl>(gen)->philox_engine_inputs(4);
  }
  const qt::DropoutMask m{qt::dropout_hash::key_of(seed_offset.first, seed_offset.second), p};
  const at::Tensor scaled = qt::lora_dropout_mask(x2.size(0), x2.size(1), m).to(at::kFloat) * (1.0 / (1.0 - p));
  return x * scaled.to(x.device()).to(x.scalar_type()).view(x.sizes());
}

// project_group against each member's forward() side by side: output, input gradient, every A and B gradient.
// concat_b: the LoRA B terms inside the base GEMM (input width 1024: a multiple of 1024 for the CUDA kernel's
// strided rows; ranks summing to 13 leave 3 zero columns of padding). dropout > 0: every member's LoRA dropout in
// training, against x W^T + s (reference_dropout(x) A^T) B^T in plain ops from the same seed (each member's mask drawn
// in turn, as PEFT's modules draw them); and the first member alone (the single LoRA node) the same way.
void check_project_group(const at::Device& device, c10::ScalarType dtype, double tol, bool concat_b = false,
                         double dropout = 0) {
  INFO(device << " " << c10::toString(dtype) << (concat_b ? ", LoRA B in the base GEMM" : "")
              << (dropout > 0 ? ", LoRA dropout" : ""));
  const int64_t in = concat_b ? 1024 : 64;
  auto ls = group_members({48, 16, 16}, in, concat_b ? std::vector<int64_t>{4, 4, 5} : std::vector<int64_t>{4, 4, 8},
                          device);
  std::vector<const qt::Linear*> group;
  for (auto& l : ls) {
    group.push_back(&l);
    l.lora->dropout = dropout;
    l.training = dropout > 0;
  }
  const auto opt = at::TensorOptions().dtype(dtype).device(device);
  const at::Tensor x0 = at::randn({2, 5, in}, opt), dy = at::randn({2, 5, 80}, opt);
  // The reference: each member's forward(), or with dropout its sum in plain ops.
  auto plain = [&](const qt::Linear& l, const at::Tensor& x) {
    if (dropout == 0) return l.forward(x);
    const at::Tensor h = reference_dropout(x, dropout);
    return at::linear(x, l.base_weight(dtype)) +
           at::linear(at::linear(h, l.lora->A.to(dtype)), (l.lora->B * l.lora->scale).to(dtype));
  };
  constexpr int64_t kSeed = 7;
  at::manual_seed(kSeed);
  at::Tensor xr = x0.clone().requires_grad_(true);
  std::vector<at::Tensor> parts;
  for (const auto& l : ls) parts.push_back(plain(l, xr));
  at::Tensor yr = at::cat(parts, -1);
  yr.backward(dy);
  std::vector<at::Tensor> ref_grads;
  for (auto& l : ls)
    for (at::Tensor* p : {&l.lora->A, &l.lora->B}) {
      ref_grads.push_back(p->grad().clone());
      p->mutable_grad() = at::Tensor();
    }
  at::Tensor x = x0.clone().requires_grad_(true);
  qt::ModelStats stats;
  qt::Pass pass;
  pass.stats = &stats;
  at::manual_seed(kSeed);
  at::Tensor y = qt::project_group(group, x, pass, concat_b);
  REQUIRE(y.defined());
  CHECK(stats.lora_b_in_gemm_runs == (concat_b ? 1 : 0));
  CHECK(y.grad_fn()->name().find("GroupLoraLinearFn") != std::string::npos);
  y.backward(dy);
  // [dx | dy bd] in one GEMM where the wider weight's columns can be strided (any width on the CPU)
  CHECK(stats.lora_in_grad_gemm_runs == (!x.is_cuda() || concat_b ? 1 : 0));
  CHECK(y.sizes() == yr.sizes());
  CHECK(rel_err(y, yr) < tol);
  CHECK(rel_err(x.grad(), xr.grad()) < tol);
  size_t i = 0;
  for (auto& l : ls)
    for (at::Tensor* p : {&l.lora->A, &l.lora->B}) {
      INFO("gradient " << i);
      REQUIRE(p->grad().defined());
      CHECK(p->grad().scalar_type() == at::kFloat);
      CHECK(p->grad().sizes() == ref_grads[i].sizes());
      CHECK(ref_grads[i].abs().max().item<double>() > 0);
      CHECK(rel_err(p->grad(), ref_grads[i]) < tol);
      ++i;
    }
  if (dropout > 0) {  // the single LoRA node: the first member alone
    qt::Linear& l = ls[0];
    const at::Tensor dy0 = dy.narrow(-1, 0, l.out_features());
    std::vector<at::Tensor> runs[2];  // the plain ops', the node's
    for (bool node : {false, true}) {
      l.lora->A.mutable_grad() = at::Tensor();
      l.lora->B.mutable_grad() = at::Tensor();
      at::Tensor xs = x0.clone().requires_grad_(true);
      at::manual_seed(kSeed);
      at::Tensor ys = node ? l.forward(xs) : plain(l, xs);
      REQUIRE(ys.grad_fn());
      if (node) CHECK(ys.grad_fn()->name().find("LoraLinearFn") != std::string::npos);
      ys.backward(dy0);
      REQUIRE(xs.grad().defined());
      REQUIRE(l.lora->A.grad().defined());
      REQUIRE(l.lora->B.grad().defined());
      runs[node ? 1 : 0] = std::vector<at::Tensor>{ys, xs.grad(), l.lora->A.grad().clone(), l.lora->B.grad().clone()};
    }
    const std::vector<at::Tensor>&want = runs[0], &got = runs[1];
    for (size_t k = 0; k < got.size(); ++k) {
      INFO("single node, tensor " << k);
      CHECK(rel_err(got[k], want[k]) < tol);
    }
    // Dropout does act: without it the output is another (by 7-20% of the output, the base term included, on the
    // masks seen).
    l.training = false;
    CHECK(rel_err(l.forward(x0), want[0]) > 3 * tol);
  }
}

// Bytes the CUDA caching allocator has handed out on `device` now (torch.cuda.memory_allocated).
int64_t cuda_allocated(const at::Device& device) {
  const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(device.index());
  return stats.allocated_bytes[static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE)].current;
}

// down_proj on a packed gate / up output through swiglu_linear (the node keeps gate_up, recomputes the SwiGLU in
// its backward pass) against swiglu_packed then forward(): the output and every gradient bit for bit (the same
// kernels or reference ops), and with output_unused the same gradients. On CUDA the node keeps no [tokens, I]
// tensor: the memory a forward pass leaves allocated grows by less than the SwiGLU output's size, where the two
// nodes' path keeps it.
void check_swiglu_linear(const at::Device& device, c10::ScalarType dtype) {
  INFO(device << " " << c10::toString(dtype));
  const int64_t H = 64, I = 4096, N = 2048;
  auto ls = group_members({H}, I, {8}, device);
  qt::Linear& down = ls[0];
  const auto opt = at::TensorOptions().dtype(dtype).device(device);
  const at::Tensor gu0 = (at::randn({2, N / 2, 2 * I}, opt.dtype(at::kFloat)) * 2).to(dtype);
  const at::Tensor dy = at::randn({2, N / 2, H}, opt);
  auto run = [&](bool fused, bool output_unused, int64_t* kept_bytes) {
    at::Tensor gu = gu0.clone().requires_grad_(true);
    down.lora->A.mutable_grad() = at::Tensor();
    down.lora->B.mutable_grad() = at::Tensor();
    const int64_t before = device.is_cuda() ? cuda_allocated(device) : 0;
    at::Tensor y = fused ? qt::swiglu_linear(down, gu, {}, output_unused) : down.forward(qt::swiglu_packed(gu));
    REQUIRE(y.defined());
    if (kept_bytes) *kept_bytes = cuda_allocated(device) - before;
    if (fused) CHECK(y.grad_fn()->name().find("LoraLinearFn") != std::string::npos);
    y.backward(dy);
    return std::vector<at::Tensor>{y, gu.grad(), down.lora->A.grad().clone(), down.lora->B.grad().clone()};
  };
  int64_t kept_fused = 0, kept_two = 0;
  const auto two = run(false, false, device.is_cuda() ? &kept_two : nullptr);
  const auto fused = run(true, false, device.is_cuda() ? &kept_fused : nullptr);
  const auto unused = run(true, true, nullptr);
  for (size_t i = 0; i < two.size(); ++i) {
    INFO("tensor " << i);
    CHECK(two[i].abs().max().item<double>() > 0);
    CHECK(qt::test::same_bits(fused[i], two[i]));
    if (i > 0) CHECK(qt::test::same_bits(unused[i], two[i]));  // the gradients (its output is not written)
  }
  if (device.is_cuda()) {
    const int64_t swiglu_out = N * I * static_cast<int64_t>(c10::elementSize(dtype));
    INFO("kept by the forward pass: " << kept_fused << " bytes fused, " << kept_two << " in two nodes");
    CHECK(kept_two >= swiglu_out);
    CHECK(kept_fused < swiglu_out / 2);
  }
}

}  // namespace

TEST_CASE("a linear much wider in than out takes its input gradient's LoRA term along K over an NF4 base, not over a "
          "dense one: the same gradients as the plain ops", "[lora]") {
  for (bool nf4 : {true, false}) {
    INFO((nf4 ? "NF4" : "dense") << " base");
    auto ls = group_members({16}, 64, {4}, at::kCPU);  // out 16, in 64
    qt::Linear& l = ls[0];
    if (!nf4) {
      l.weight = l.base_weight(at::kFloat);
      l.nf4.reset();
    }
    const at::Tensor x0 = at::randn({2, 5, 64}), dy = at::randn({2, 5, 16});
    qt::ModelStats stats;
    qt::Pass pass;
    pass.stats = &stats;
    at::Tensor x = x0.clone().requires_grad_(true);
    at::Tensor y = l.forward(x, pass);
    y.backward(dy);
    CHECK(y.grad_fn()->name().find("LoraLinearFn") != std::string::npos);
    CHECK(stats.lora_in_grad_gemm_runs == (nf4 ? 1 : 0));
    const std::vector<at::Tensor> got{y.detach(), x.grad(), l.lora->A.grad().clone(), l.lora->B.grad().clone()};
    l.lora->A.mutable_grad() = at::Tensor();
    l.lora->B.mutable_grad() = at::Tensor();
    // The plain ops: x W^T + s (x A^T) B^T
    at::Tensor xr = x0.clone().requires_grad_(true);
    at::Tensor yr = at::linear(xr, l.base_weight(at::kFloat)) +
                    l.lora->scale * at::linear(at::linear(xr, l.lora->A), l.lora->B);
    yr.backward(dy);
    const std::vector<at::Tensor> want{yr.detach(), xr.grad(), l.lora->A.grad(), l.lora->B.grad()};
    for (size_t i = 0; i < want.size(); ++i) {
      INFO("tensor " << i);
      CHECK(want[i].abs().max().item<double>() > 0);
      CHECK(rel_err(got[i], want[i]) < 1e-5);
    }
  }
}

TEST_CASE("down_proj on the packed SwiGLU keeps gate_up instead of the SwiGLU output: the same bits", "[lora]") {
  check_swiglu_linear(at::kCPU, at::kFloat);
  // Not taken where the LoRA node does not apply: a bias, or DoRA.
  auto ls = group_members({16}, 64, {4}, at::kCPU);
  ls[0].bias = at::zeros({16});
  CHECK(!qt::swiglu_linear(ls[0], at::randn({3, 128}), {}, false).defined());
}

TEST_CASE("down_proj on the packed SwiGLU on CUDA: the same bits, no [tokens, intermediate] tensor kept",
          "[lora][gpu]") {
  REQUIRE(at::hasCUDA());
  for (auto dtype : {at::kBFloat16, at::kFloat}) check_swiglu_linear(at::Device(at::kCUDA, 0), dtype);
}

TEST_CASE("q, k, v (gate, up) as one projection equal their separate LoRA linears; other linears are refused",
          "[lora]") {
  check_project_group(at::kCPU, at::kFloat, 1e-5);
  check_project_group(at::kCPU, at::kFloat, 1e-5, /*concat_b=*/true);
  check_project_group(at::kCPU, at::kFloat, 1e-5, false, /*dropout=*/0.2);
  check_project_group(at::kCPU, at::kFloat, 1e-5, /*concat_b=*/true, /*dropout=*/0.2);
  auto ls = group_members({16, 16}, 64, {4, 4}, at::kCPU);
  const at::Tensor x = at::randn({3, 64});
  CHECK(qt::project_group({&ls[0], &ls[1]}, x).defined());
  auto refused = [&](const std::function<void(qt::Linear&)>& edit) {
    auto copy = group_members({16, 16}, 64, {4, 4}, at::kCPU);
    edit(copy[1]);
    return !qt::project_group({&copy[0], &copy[1]}, x).defined();
  };
  CHECK(refused([](qt::Linear& l) { l.bias = at::randn({16}); }));
  // (members' LoRA dropout differing: each would need its own node's draws in its own order)
  CHECK(refused([](qt::Linear& l) { l.lora->dropout = 0.1, l.training = true; }));
  CHECK(refused([](qt::Linear& l) { l.lora->magnitude = at::ones({16}); }));
  CHECK(refused([](qt::Linear& l) { l.lora.reset(); }));
  CHECK(refused([](qt::Linear& l) { l.weight = l.base_weight(at::kFloat), l.nf4.reset(); }));
  auto wide = group_members({16, 16}, 128, {4, 4}, at::kCPU);
  CHECK(!qt::project_group({&ls[0], &wide[1]}, x).defined());
  // LoRA dropout outside training is off: the group applies.
  CHECK(!refused([](qt::Linear& l) { l.lora->dropout = 0.1, l.training = false; }));
  auto five = group_members({16, 16, 16, 16, 16}, 64, {4, 4, 4, 4, 4}, at::kCPU);
  CHECK(!qt::project_group({&five[0], &five[1], &five[2], &five[3], &five[4]}, x).defined());
}

TEST_CASE("LoRA on NF4 linears whose shapes are not whole blocks of 64 trains as on their dequantized weights",
          "[lora][nf4]") {
  at::manual_seed(11);
  // [80, 203]: a short last block; q, k, v of 80, 21, 21 rows: 21 x 203 is odd (a padding nibble).
  auto ls = group_members({80, 21, 21}, 203, {4, 4, 2}, at::kCPU);
  const at::Tensor x0 = at::randn({2, 3, 203}), dy = at::randn({2, 3, 122});
  std::vector<at::Tensor> dense_grads, grads;
  at::Tensor xd = x0.clone().requires_grad_(true);
  std::vector<at::Tensor> parts;
  for (auto& l : ls) {
    const at::Tensor W = l.base_weight(at::kFloat);
    CHECK(W.sizes() == at::IntArrayRef({l.out_features(), 203}));
    parts.push_back(at::linear(xd, W) + l.lora->scale * at::linear(at::linear(xd, l.lora->A), l.lora->B));
  }
  at::cat(parts, -1).backward(dy);
  for (auto& l : ls)
    for (at::Tensor* p : {&l.lora->A, &l.lora->B}) {
      dense_grads.push_back(p->grad().clone());
      p->mutable_grad() = at::Tensor();
    }
  for (const bool grouped : {false, true}) {
    INFO((grouped ? "one projection" : "separate linears"));
    at::Tensor x = x0.clone().requires_grad_(true);
    at::Tensor y;
    if (grouped) {
      y = qt::project_group({&ls[0], &ls[1], &ls[2]}, x);
      REQUIRE(y.defined());
    } else {
      std::vector<at::Tensor> ys;
      for (const auto& l : ls) ys.push_back(l.forward(x));
      y = at::cat(ys, -1);
    }
    y.backward(dy);
    CHECK(rel_err(x.grad(), xd.grad()) < 1e-5);
    size_t i = 0;
    for (auto& l : ls)
      for (at::Tensor* p : {&l.lora->A, &l.lora->B}) {
        CHECK(rel_err(p->grad(), dense_grads[i++]) < 1e-5);
        p->mutable_grad() = at::Tensor();
      }
  }
}

TEST_CASE("LoRA on NF4 linears matches PEFT on bitsandbytes' dequantized base: loss and every LoRA gradient", "[lora]") {
  check_against_peft("base_nf4", "all_targets", 1e-5, 1e-4);
}

TEST_CASE("LoRA dropout in training matches PEFT's (the same masks from the same seed), with and without "
          "checkpointing and the keep ladder", "[lora]") {
  qt::SafetensorsFile ref(fixture("lora/dropout_all/reference.safetensors"));
  const int64_t seed = ref.load("seed", at::kLong, at::kCPU).item<int64_t>();
  std::shared_ptr<qt::ModelStats> stats;
  auto dropout = [&](const std::function<void(qt::LlamaModel&)>& more) {
    return [&, more](qt::LlamaModel& m) {
      m.for_each_linear([](const std::string&, qt::Linear& l) { REQUIRE(l.lora); l.lora->dropout = 0.1; });
      m.set_training(true);
      if (more) more(m);
      stats = m.stats;
      at::manual_seed(seed);  // the masks PEFT drew: each linear's in the order the model calls them
    };
  };
  check_against_peft("base_nf4", "dropout_all", 1e-5, 1e-4, dropout({}));
  // ... through the fused nodes: q / k / v and gate / up as one projection each (the B terms in the GEMM).
  REQUIRE(stats);
  CHECK(stats->lora_b_in_gemm_runs > 0);
  // The recomputation draws the masks again from the saved generator state.
  check_against_peft("base_nf4", "dropout_all", 1e-5, 1e-4, dropout([](qt::LlamaModel& m) { m.plan.checkpointing = true; }));
  check_against_peft("base_nf4", "dropout_all", 1e-5, 1e-4, dropout([](qt::LlamaModel& m) {
    m.plan.checkpointing = true;
    m.plan.keep = qt::KeepLevel::Residual;
    m.plan.keep_dequantized = true;
  }));
  // Dropout changes the result: without it the loss differs by many times the bound above (so the reference does
  // exercise PEFT's dropout; the gradients differ by 40-60% with other masks).
  qt::LlamaModel plain = qt::load_llama(fixture("lora/base_nf4"), nf4_load());
  qt::load_peft_adapter(plain, fixture("lora/dropout_all/adapter"));
  const at::Tensor no_dropout = causal_lm_loss(plain, ref.load("input_ids", at::kLong, at::kCPU),
                                               ref.load("labels", at::kLong, at::kCPU));
  CHECK(rel_err(no_dropout, ref.view("loss")) > 1e-4);
}

TEST_CASE("LoRA on a Qwen2 NF4 base (q / k / v biases, tied embeddings) matches PEFT, with and without "
          "checkpointing",
          "[lora][qwen]") {
  check_against_peft("base_qwen2_nf4", "qwen2_all", 1e-5, 1e-4);
  check_against_peft("base_qwen2_nf4", "qwen2_all", 1e-5, 1e-4,
                     [](qt::LlamaModel& m) { m.plan.checkpointing = true; });
  // q / k / v with their biases as one projection (the bias in the base GEMM), replayed from kept tensors.
  check_keep_against_peft("base_qwen2_nf4", "qwen2_all", qt::KeepLevel::Qkv);
}

TEST_CASE("LoRA on a Qwen3 NF4 base (q / k norms before RoPE, head_dim given) matches PEFT, with and without "
          "checkpointing, q / k / v kept by the plan",
          "[lora][qwen]") {
  check_against_peft("base_qwen3_nf4", "qwen3_all", 1e-5, 1e-4);
  // The keep ladder: the projection output kept, renormed and rotated in the recomputation (rope_qkv_norm's kept
  // values), whose q / k / v projection computes no output.
  check_keep_against_peft("base_qwen3_nf4", "qwen3_all", qt::KeepLevel::Residual);
}

TEST_CASE("LoRA under checkpointing matches PEFT with the recomputation's weights kept for the backward pass or "
          "not: keeping saves one dequantization per weight, the recomputation leaves down_proj's out", "[lora]") {
  for (bool keep : {false, true}) {
    INFO("keep_dequantized " << keep);
    int64_t weights = 0, layers = 0;
    std::shared_ptr<qt::ModelStats> stats;
    check_against_peft("base_nf4", "all_targets", 1e-5, 1e-4, [&](qt::LlamaModel& m) {
      m.plan.checkpointing = true;
      m.plan.keep_dequantized = keep;
      stats = m.stats;
      m.for_each_linear([&](const std::string&, qt::Linear&) { ++weights; });
      layers = m.config.num_hidden_layers;
    });
    // Forward, recomputation and backward each dequantize every weight, except the backward where the
    // recomputation's weights were kept, the recomputation of down_proj, whose output is never read (then the
    // backward dequantizes it even when the others were kept), and the first block's q / k / v in the backward pass
    // (no input gradient over frozen embeddings).
    CHECK(weights > 0);
    CHECK(layers > 0);
    REQUIRE(stats);
    CHECK(stats->outputs_skipped == layers);
    CHECK(stats->dequantized_weights == (keep ? 2 * weights : 3 * weights - layers - 3));
  }
}

TEST_CASE("a checkpointed run, its recomputation leaving the unused output out, gives the loss and every LoRA "
          "gradient of the run without checkpointing", "[lora]") {
  std::shared_ptr<qt::ModelStats> stats;
  auto run = [&](bool checkpoint) {
    return fixture_loss_and_grads([&](qt::LlamaModel& m) {
      m.plan.checkpointing = checkpoint;
      stats = m.stats;
    });
  };
  const std::vector<at::Tensor> full = run(false);
  REQUIRE(stats);
  CHECK(stats->outputs_skipped == 0);
  const std::vector<at::Tensor> lean = run(true);
  CHECK(stats->outputs_skipped > 0);
  // The last block without checkpointing, the first with it: the same loss and gradients, one recomputation.
  int64_t layers = 0;
  const std::vector<at::Tensor> partial = fixture_loss_and_grads([&](qt::LlamaModel& m) {
    m.plan.checkpointing = true;
    m.plan.blocks_without_checkpointing = 1;
    layers = m.config.num_hidden_layers;
    stats = m.stats;
  });
  REQUIRE(layers == 2);
  CHECK(stats->outputs_skipped == 1);  // down_proj of the one recomputed block
  REQUIRE(full.size() == lean.size());
  REQUIRE(full.size() == partial.size());
  CHECK(full.size() > 10);
  for (size_t i = 0; i < full.size(); ++i) {
    INFO("tensor " << i);
    CHECK(full[i].abs().max().item<double>() > 0);
    CHECK(rel_err(lean[i], full[i]) < 1e-6);
    CHECK(rel_err(partial[i], full[i]) < 1e-6);
  }
}

// fixture_loss_and_grads on the two-block fixture with checkpointing (the last `whole` blocks without) and the
// environment variable `name` set to `value` for the run (null: unset), restored after; `stats` gets the model's
// counters.
std::vector<at::Tensor> switched_loss_and_grads(const char* name, const char* value, bool checkpointing, int64_t whole,
                                                std::shared_ptr<qt::ModelStats>& stats, const at::Device& device,
                                                c10::ScalarType dtype) {
  const qt::test::ScopedEnv env(name, value);
  return fixture_loss_and_grads(
      [&](qt::LlamaModel& m) {
        REQUIRE(m.config.num_hidden_layers == 2);
        m.plan.checkpointing = checkpointing;
        m.plan.blocks_without_checkpointing = whole;
        stats = m.stats;
      },
      device, dtype);
}

// switched_loss_and_grads with `name` at `on`, then at `off`: both runs' loss and LoRA gradients, the ModelStats counter
// `runs` at least `least` in the first and 0 in the second (the switch took its path).
std::pair<std::vector<at::Tensor>, std::vector<at::Tensor>> switched_pair(const char* name, const char* on,
                                                                         const char* off, bool checkpointing,
                                                                         const at::Device& device,
                                                                         c10::ScalarType dtype,
                                                                         std::atomic<int64_t> qt::ModelStats::*runs,
                                                                         int64_t least) {
  std::shared_ptr<qt::ModelStats> stats;
  std::vector<at::Tensor> first = switched_loss_and_grads(name, on, checkpointing, 0, stats, device, dtype);
  REQUIRE(stats);
  CHECK(((*stats).*runs).load() >= least);
  std::vector<at::Tensor> second = switched_loss_and_grads(name, off, checkpointing, 0, stats, device, dtype);
  CHECK(((*stats).*runs).load() == 0);
  return {std::move(first), std::move(second)};
}

// Two runs' loss and LoRA gradients: as many, not all zero, each within `bound` relative error of the other's (0: bit
// for bit).
void check_same_loss_and_grads(const std::vector<at::Tensor>& a, const std::vector<at::Tensor>& b, double bound) {
  REQUIRE(a.size() == b.size());
  CHECK(a.size() > 10);
  for (size_t i = 0; i < a.size(); ++i) {
    INFO("tensor " << i);
    CHECK(b[i].abs().max().item<double>() > 0);
    if (bound == 0) CHECK(at::equal(a[i], b[i]));
    else CHECK(rel_err(a[i], b[i]) < bound);
  }
}

// The residual adds and RMSNorms fused (each block's attention residual with its MLP's norm; a block's MLP residual
// carried unsummed into the next block's input norm, the last block's into the final norm) against the ops apart
// (QT_FUSED_ADD_NORM=0): the same loss and LoRA gradients bit for bit, without checkpointing (every block carries its
// output on), with the last block without checkpointing (it alone does) and with checkpointing (none does).
void check_fused_add_norm(const at::Device& device, c10::ScalarType dtype) {
  struct Case {
    const char* what;
    bool checkpointing;
    int64_t whole, carried;
  };
  for (const Case& c : {Case{"no checkpointing", false, 0, 2}, Case{"the last block without", true, 1, 1},
                        Case{"checkpointing", true, 0, 0}}) {
    INFO(c.what << " on " << device << " in " << c10::toString(dtype));
    std::shared_ptr<qt::ModelStats> stats;
    const std::vector<at::Tensor> fused =
        switched_loss_and_grads("QT_FUSED_ADD_NORM", nullptr, c.checkpointing, c.whole, stats, device, dtype);
    REQUIRE(stats);
    CHECK(stats->residuals_carried == c.carried);
    const std::vector<at::Tensor> apart =
        switched_loss_and_grads("QT_FUSED_ADD_NORM", "0", c.checkpointing, c.whole, stats, device, dtype);
    CHECK(stats->residuals_carried == 0);
    check_same_loss_and_grads(fused, apart, 0);
  }
}

TEST_CASE("the residual adds fused with the RMSNorms after them give the bits of the ops apart", "[lora]") {
  check_fused_add_norm(at::kCPU, at::kFloat);
}

TEST_CASE("on CUDA the residual adds fused with the RMSNorms after them give the bits of the ops apart",
          "[lora][gpu]") {
  REQUIRE(at::hasCUDA());
  for (auto dtype : {at::kBFloat16, at::kFloat}) check_fused_add_norm(at::Device(at::kCUDA, 0), dtype);
}

// LoRA's rank-r GEMM kernels (lora_project, lora_grads) in the model (QT_LORA_GEMM_KERNELS=1) against ATen's GEMMs on
// CUDA in bf16: the loss and every LoRA gradient within bf16's rounding, with and without checkpointing (the
// recomputation projects again), and the kernels counted in the first run only.
TEST_CASE("on CUDA LoRA's rank-r GEMM kernels give the loss and gradients of ATen's GEMMs", "[lora][gpu]") {
  REQUIRE(at::hasCUDA());
  const at::Device cuda(at::kCUDA, 0);
  for (bool checkpointing : {false, true}) {
    INFO("checkpointing " << checkpointing);
    // per block: q / k / v and gate / up (a projection and one gradient launch each), o_proj and down_proj (the same)
    const auto [kernels, aten] = switched_pair("QT_LORA_GEMM_KERNELS", "1", "0", checkpointing, cuda, at::kBFloat16,
                                               &qt::ModelStats::lora_gemm_kernel_runs, 2 * 8);
    check_same_loss_and_grads(kernels, aten, 2e-2);
    std::shared_ptr<qt::ModelStats> stats;
    // each kernel alone: the forward projections (4 a block) or the gradients' launches (4 a block)
    // ("narrow": the gradients' kernel where a node's operands are at most 4,096 wide: every node of this model)
    for (const char* one : {"project", "grads", "narrow"}) {
      INFO(one);
      const std::vector<at::Tensor> alone =
          switched_loss_and_grads("QT_LORA_GEMM_KERNELS", one, checkpointing, 0, stats, cuda, at::kBFloat16);
      CHECK(stats->lora_gemm_kernel_runs >= 8);
      check_same_loss_and_grads(alone, aten, 2e-2);
    }
  }
}

// QT_LORA_GEMM_KERNELS takes 0, 1, project, grads or narrow; anything else is an error that names it, not a silent default.
TEST_CASE("an unknown QT_LORA_GEMM_KERNELS value is an error naming the variable and its values", "[lora]") {
  std::shared_ptr<qt::ModelStats> stats;
  try {
    switched_loss_and_grads("QT_LORA_GEMM_KERNELS", "yes", false, 0, stats, at::kCPU, at::kFloat);
    FAIL("no error");
  } catch (const qt::Error& e) {
    CHECK(e.kind() == qt::ErrorKind::Usage);
    const std::string what = e.what();
    CHECK(what.find("QT_LORA_GEMM_KERNELS=yes") != std::string::npos);
    CHECK(what.find("0, 1, project, grads or narrow") != std::string::npos);
  }
}

// A linear's rank-r term first and the base GEMM accumulating onto it (the default: o_proj's and down_proj's forward,
// o_proj's input gradient) against the base GEMM first and an addmm after it (QT_LORA_ADD_AFTER=1), each order counted
// (ModelStats::base_onto_lora_runs). In fp32 each order adds the same two sums once: the same loss and LoRA gradients to
// fp32's rounding. In 16 bits one of the two products is rounded before the other is added to it: each order's loss
// and gradients against fp32's on the same device, within 16-bit bounds, and the default's error no larger than the
// addmm-after's beyond the rounding's noise. With and without checkpointing.
void check_lora_add_order(const at::Device& device, c10::ScalarType dtype, double bound) {
  for (bool checkpointing : {false, true}) {
    INFO("checkpointing " << checkpointing << " on " << device << " in " << c10::toString(dtype));
    // per block: o_proj's and down_proj's forward (again in the recomputation) and o_proj's input gradient
    const auto [exact, exact_after] = switched_pair("QT_LORA_ADD_AFTER", nullptr, "1", checkpointing, device,
                                                    at::kFloat, &qt::ModelStats::base_onto_lora_runs, 2 * 3);
    check_same_loss_and_grads(exact, exact_after, 1e-6);
    if (dtype == at::kFloat) continue;
    const auto [onto, after] = switched_pair("QT_LORA_ADD_AFTER", nullptr, "1", checkpointing, device, dtype,
                                             &qt::ModelStats::base_onto_lora_runs, 2 * 3);
    REQUIRE(onto.size() == exact.size());
    REQUIRE(after.size() == exact.size());
    double worst_onto = 0, worst_after = 0;
    for (size_t i = 0; i < onto.size(); ++i) {
      INFO("tensor " << i);
      const double e_onto = rel_err(onto[i], exact[i]), e_after = rel_err(after[i], exact[i]);
      CHECK(e_onto < bound);
      CHECK(e_after < bound);
      worst_onto = std::max(worst_onto, e_onto);
      worst_after = std::max(worst_after, e_after);
    }
    CHECK(worst_onto <= 1.5 * worst_after);
  }
}

TEST_CASE("a linear's base GEMM accumulating onto its rank-r term gives the addmm-after's loss and gradients",
          "[lora]") {
  check_lora_add_order(at::kCPU, at::kBFloat16, 5e-2);
}

TEST_CASE("on CUDA a linear's base GEMM accumulating onto its rank-r term gives the addmm-after's loss and gradients",
          "[lora][gpu]") {
  REQUIRE(at::hasCUDA());
  check_lora_add_order(at::Device(at::kCUDA, 0), at::kBFloat16, 5e-2);
}

// QT_LORA_GEMM_KERNELS=narrow: the gradients' kernel for nodes no wider than kLoraGradNarrowWidth (q / k / v, o_proj),
// not for the intermediate-wide ones (gate / up, down_proj); "grads" for every node, "0" for none.
TEST_CASE("the gradients' kernel on narrow nodes only takes the nodes up to its width", "[lora]") {
  qt::Pass p;
  p.lora_grad_kernel = true;
  p.lora_grad_max_width = qt::kLoraGradNarrowWidth;
  CHECK(p.lora_grad_kernel_for(4096));
  CHECK(p.lora_grad_kernel_for(1024));
  CHECK_FALSE(p.lora_grad_kernel_for(14336));
  CHECK_FALSE(p.lora_grad_kernel_for(4097));
  p.lora_grad_max_width = 0;
  CHECK(p.lora_grad_kernel_for(14336));
  p.lora_grad_kernel = false;
  CHECK_FALSE(p.lora_grad_kernel_for(1024));
}

// The norms writing into the q / k / v and gate / up groups' concatenated inputs (QT_NORM_INTO_CONCAT, on by default)
// against the inputs copied there and q / k / v's B terms added after the base GEMM: the same loss and gradients within
// fp32's rounding (q / k / v's output is one GEMM instead of a GEMM and an addmm), the inputs built in place counted
// (two a block: every block keeps its activations, and with checkpointing the forward pass and the recomputation).
void check_norm_into_concat(const at::Device& device, c10::ScalarType dtype, double bound) {
  for (bool checkpointing : {false, true}) {
    INFO("checkpointing " << checkpointing << " on " << device << " in " << c10::toString(dtype));
    std::shared_ptr<qt::ModelStats> stats;
    const std::vector<at::Tensor> into =
        switched_loss_and_grads("QT_NORM_INTO_CONCAT", nullptr, checkpointing, 0, stats, device, dtype);
    REQUIRE(stats);
    CHECK(stats->concat_inputs_in_place == (checkpointing ? 8 : 4));
    const std::vector<at::Tensor> copied =
        switched_loss_and_grads("QT_NORM_INTO_CONCAT", "0", checkpointing, 0, stats, device, dtype);
    CHECK(stats->concat_inputs_in_place == 0);
    check_same_loss_and_grads(into, copied, bound);
  }
}

TEST_CASE("the norms writing into the LoRA groups' concatenated inputs give the loss and gradients of a copy",
          "[lora]") {
  check_norm_into_concat(at::kCPU, at::kFloat, 1e-5);
}


TEST_CASE("the SwiGLU output kept for down_proj's backward pass or computed again there gives the same bits",
          "[lora]") {
  // Without checkpointing, checkpointed, the last block without, and the MLP in chunks.
  struct Case {
    const char* what;
    bool checkpointing;
    int64_t whole, chunk;
  };
  for (const Case& c : {Case{"no checkpointing", false, 0, 0}, Case{"checkpointing", true, 0, 0},
                        Case{"the last block without", true, 1, 0}, Case{"MLP in chunks of 3 tokens", true, 0, 3}}) {
    INFO(c.what);
    std::shared_ptr<qt::ModelStats> stats;
    int64_t layers = 0;
    auto run = [&](bool keep) {
      return fixture_loss_and_grads([&](qt::LlamaModel& m) {
        m.plan.checkpointing = c.checkpointing;
        m.plan.blocks_without_checkpointing = c.whole;
        m.plan.mlp_chunk_tokens = c.chunk;
        m.plan.keep_swiglu = keep;
        layers = m.config.num_hidden_layers;
        stats = m.stats;
      });
    };
    const std::vector<at::Tensor> recomputed = run(false);
    REQUIRE(stats);
    const int64_t recomputations = stats->swiglu_recomputed;
    const std::vector<at::Tensor> kept = run(true);
    CHECK(stats->swiglu_recomputed == 0);
    // The blocks that keep their activations computed it again; checkpointed blocks keep it whatever the plan says
    // (their recomputation has just made it).
    CHECK(recomputations == (c.checkpointing ? c.whole : layers));
    REQUIRE(kept.size() == recomputed.size());
    CHECK(kept.size() > 10);
    for (size_t i = 0; i < kept.size(); ++i) {
      INFO("tensor " << i);
      CHECK(recomputed[i].abs().max().item<double>() > 0);
      CHECK(at::equal(kept[i], recomputed[i]));
    }
  }
}

// The NF4 + LoRA fixture model under checkpointing with the keep ladder at `keep` (attention and above): the loss
// and every LoRA gradient, and how many recomputations took the kept q, k, v and residual.
struct KeepRun {
  std::vector<at::Tensor> values;
  int64_t qkv_replays = 0, residual_replays = 0, gate_up_replays = 0, dequantized = 0, layers = 0;
  int64_t prefetched = 0;  // offloaded tensors fetched back ahead of their block (ModelStats::prefetched_offloads)
};
// (gate_up_kept: ExecPlan::gate_up_kept_blocks; whole: blocks_without_checkpointing; gate_up_offloaded:
// gate_up_offloaded_blocks.)
KeepRun keep_run(const at::Device& device, c10::ScalarType dtype, qt::KeepLevel keep, bool offload,
                 int64_t gate_up_kept = 0, int64_t whole = 0, int64_t gate_up_offloaded = 0) {
  KeepRun r;
  std::shared_ptr<qt::ModelStats> stats;
  r.values = fixture_loss_and_grads(
      [&](qt::LlamaModel& m) {
        m.plan.checkpointing = true;
        m.plan.keep = keep;
        m.plan.offload = offload;
        m.plan.gate_up_kept_blocks = gate_up_kept;
        m.plan.gate_up_offloaded_blocks = gate_up_offloaded;
        m.plan.blocks_without_checkpointing = whole;
        r.layers = m.config.num_hidden_layers;
        stats = m.stats;
      },
      device, dtype);
  REQUIRE(stats);
  r.qkv_replays = stats->qkv_replays;
  r.residual_replays = stats->residual_replays;
  r.gate_up_replays = stats->gate_up_replays;
  r.dequantized = stats->dequantized_weights;
  r.prefetched = stats->prefetched_offloads;
  return r;
}

void check_keep(const at::Device& device, c10::ScalarType dtype, bool offload, double tol) {
  const KeepRun plain = keep_run(device, dtype, qt::KeepLevel::Attention, offload);
  CHECK(plain.qkv_replays == 0);
  CHECK(plain.residual_replays == 0);
  CHECK(plain.gate_up_replays == 0);
  for (qt::KeepLevel keep : {qt::KeepLevel::Qkv, qt::KeepLevel::Residual}) {
    INFO(device << " " << c10::toString(dtype) << (offload ? ", offloaded" : "") << ", keep " << qt::keep_level_name(keep));
    const KeepRun kept = keep_run(device, dtype, keep, offload);
    CHECK(kept.layers > 0);
    CHECK(kept.qkv_replays == kept.layers);  // every block's recomputation
    CHECK(kept.residual_replays == (keep == qt::KeepLevel::Residual ? kept.layers : 0));
    REQUIRE(plain.values.size() == kept.values.size());
    CHECK(plain.values.size() > 10);
    for (size_t i = 0; i < plain.values.size(); ++i) {
      INFO("tensor " << i);
      CHECK(plain.values[i].abs().max().item<double>() > 0);
      CHECK(rel_err(kept.values[i], plain.values[i]) < tol);
    }
  }
}

TEST_CASE("the keep ladder's qkv and residual: the recomputation takes the kept rotated q, k, v and residual after "
          "attention and gives the loss and LoRA gradients of the full recomputation", "[lora]") {
  check_keep(at::kCPU, at::kFloat, /*offload=*/false, 1e-6);
  // And PEFT's, as every LoRA path here.
  check_against_peft("base_nf4", "all_targets", 1e-5, 1e-4, [](qt::LlamaModel& m) {
    m.plan.checkpointing = true;
    m.plan.keep = qt::KeepLevel::Residual;
  });
}

// Checkpointed blocks keeping their gate / up output (gate_up_kept_blocks on the device, gate_up_offloaded_blocks in
// host memory with offload on CUDA, else on the device too): the loss and every LoRA gradient of the full
// recomputation, at each keep level that takes it, every block or some (the last checkpointed ones, with the last
// block without checkpointing too); the recomputations that took the kept output counted, the gate / up
// dequantizations they no longer run, and with offload on CUDA the offloaded outputs fetched back ahead of their
// blocks (all but the last checkpointed block's, which the backward pass meets first).
void check_gate_up_kept(const at::Device& device, c10::ScalarType dtype, bool offload, double tol) {
  for (qt::KeepLevel keep : {qt::KeepLevel::Attention, qt::KeepLevel::Residual}) {
    const KeepRun plain = keep_run(device, dtype, keep, offload);
    CHECK(plain.gate_up_replays == 0);
    REQUIRE(plain.layers >= 2);
    struct Case {
      int64_t kept, whole, replays, offloaded = 0, prefetched = 0;
    };
    const int64_t L = plain.layers;
    for (const Case& c : {Case{L, 0, L}, Case{1, 0, 1}, Case{L, 1, L - 1}, Case{1, 1, 1}, Case{0, 0, L, L, L - 1},
                          Case{1, 0, L, L - 1, L - 1}, Case{0, 1, 1, 1, L > 2 ? 1 : 0}, Case{0, 0, 1, 1, 1}}) {
      INFO(device << " " << c10::toString(dtype) << (offload ? ", offloaded" : "") << ", keep "
                  << qt::keep_level_name(keep) << ", gate / up kept by " << c.kept << ", offloaded by "
                  << c.offloaded << ", blocks without " << c.whole);
      const KeepRun base = c.whole ? keep_run(device, dtype, keep, offload, 0, c.whole) : plain;
      const KeepRun kept = keep_run(device, dtype, keep, offload, c.kept, c.whole, c.offloaded);
      CHECK(kept.gate_up_replays == c.replays);
      // gate and up: no dequantization in those recomputations (one group, counted per weight).
      CHECK(base.dequantized - kept.dequantized == 2 * c.replays);
      if (offload && device.is_cuda()) CHECK(kept.prefetched - base.prefetched == c.prefetched);
      check_same_loss_and_grads(kept.values, base.values, tol);
    }
  }
}

// Packed rows (two documents a row, the attention output not kept): the kept gate / up output replayed all the same,
// kept on the device or offloaded (to the host with offload on CUDA).
void check_gate_up_kept_packed(const at::Device& device, c10::ScalarType dtype, double tol, bool offload = false) {
  const qt::SafetensorsFile ref(fixture("lora/all_targets/reference.safetensors"));
  const at::Tensor ids = ref.load("input_ids", at::kLong, device);
  const int64_t B = ids.size(0), S = ids.size(1), half = S / 2;
  REQUIRE(half >= 2);
  qt::Batch batch;
  batch.input_ids = ids;
  const at::Tensor pos = at::cat({at::arange(half, at::kLong), at::arange(S - half, at::kLong)});
  const at::Tensor doc = at::cat({at::zeros({half}, at::kInt), at::ones({S - half}, at::kInt)});
  batch.positions = pos.unsqueeze(0).expand({B, S}).contiguous().to(device);
  batch.doc_ids = doc.unsqueeze(0).expand({B, S}).contiguous().to(device);
  int64_t layers = 0, replays = 0;
  auto run = [&](int64_t kept, int64_t offloaded) {
    qt::LlamaModel m = fixture_model(device, dtype);
    m.plan.checkpointing = true;
    m.plan.keep = qt::KeepLevel::Residual;
    m.plan.offload = offload;
    m.plan.gate_up_kept_blocks = kept;
    m.plan.gate_up_offloaded_blocks = offloaded;
    layers = m.config.num_hidden_layers;
    const at::Tensor h = m.forward_hidden(m.embed(ids), batch);
    const at::Tensor w = at::randn(h.sizes(), at::make_generator<at::CPUGeneratorImpl>(11),
                                   at::TensorOptions().dtype(at::kFloat)).to(device);
    (h.to(at::kFloat) * w).sum().backward();
    replays = m.stats->gate_up_replays;
    std::vector<at::Tensor> out;
    for (auto& [key, t] : qt::lora_parameters(m)) out.push_back(t.grad().to(at::kFloat).cpu().clone());
    return out;
  };
  const std::vector<at::Tensor> base = run(0, 0);
  CHECK(replays == 0);
  const std::vector<at::Tensor> kept = run(1000, 0);  // (more than the model has: every checkpointed block)
  CHECK(replays == layers);
  check_same_loss_and_grads(kept, base, tol);
  const std::vector<at::Tensor> offloaded = run(0, 1000);
  CHECK(replays == layers);
  check_same_loss_and_grads(offloaded, base, tol);
}

TEST_CASE("checkpointed blocks keeping their gate / up output give the loss and LoRA gradients of the full "
          "recomputation and run no gate / up projection in it", "[lora]") {
  check_gate_up_kept_packed(at::kCPU, at::kFloat, 1e-6);
  check_gate_up_kept(at::kCPU, at::kFloat, /*offload=*/false, 1e-6);
  // And PEFT's.
  check_against_peft("base_nf4", "all_targets", 1e-5, 1e-4, [](qt::LlamaModel& m) {
    m.plan.checkpointing = true;
    m.plan.keep = qt::KeepLevel::Residual;
    m.plan.gate_up_kept_blocks = m.config.num_hidden_layers;
  });
}

TEST_CASE("the chunked MLP with NF4 LoRA gives the unchunked loss and gradients; its recomputations skip "
          "down_proj's unused output", "[lora]") {
  for (bool checkpoint : {false, true}) {
    INFO("grad_checkpointing " << checkpoint);
    int64_t layers = 0, tokens = 0;
    const qt::SafetensorsFile ref(fixture("lora/all_targets/reference.safetensors"));
    tokens = ref.load("input_ids", at::kLong, at::kCPU).numel();
    std::shared_ptr<qt::ModelStats> stats;
    auto run = [&](int64_t chunk) {
      return fixture_loss_and_grads([&](qt::LlamaModel& m) {
        m.plan.checkpointing = checkpoint;
        m.plan.mlp_chunk_tokens = chunk;
        layers = m.config.num_hidden_layers;
        stats = m.stats;
      });
    };
    const std::vector<at::Tensor> plain = run(0);
    const std::vector<at::Tensor> chunked = run(4);
    REQUIRE(stats);
    const int64_t skipped = stats->outputs_skipped;
    // Each chunk's recomputation in the chunked MLP's backward skips down_proj's output; under checkpointing the
    // block's recomputation skips the chunked MLP's forward as well (one more per block).
    CHECK(layers > 0);
    CHECK(tokens > 4);
    CHECK(skipped == layers * ((tokens + 3) / 4 + (checkpoint ? 1 : 0)));
    REQUIRE(plain.size() == chunked.size());
    CHECK(plain.size() > 10);
    for (size_t i = 0; i < plain.size(); ++i) {
      INFO("tensor " << i);
      CHECK(plain[i].abs().max().item<double>() > 0);
      CHECK(rel_err(chunked[i], plain[i]) < 1e-5);
    }
  }
}

TEST_CASE("under keep_dequantized the LoRA factors in the compute dtype are made once per linear and optimizer "
          "step and follow every update; without it none are kept", "[lora]") {
  // mode 0: kept, refreshed in one batch after each step; 1: kept, each remade in its first use
  // (QT_LORA_FACTOR_REFRESH=0); 2: none kept; 3: as 0, without checkpointing and with every block's weights held
  // (the factors copied into the held [W | B | 0] and [W; A; 0] once a step, not again by the backward pass); 4: as
  // 3 in bf16. In fp32 a single linear's factors are its masters themselves (make() returns them as they are): they
  // are made again, not refreshed.
  for (int mode = 0; mode < 5; ++mode) {
    const bool keep = mode != 2, batched = mode == 0 || mode >= 3, held = mode >= 3, bf16 = mode == 4;
    INFO("mode " << mode);
    const qt::test::ScopedEnv refresh("QT_LORA_FACTOR_REFRESH", mode == 1 ? "0" : nullptr);
    auto load = [&] {
      qt::LoadOptions o = nf4_load();
      if (bf16) o.dtype = at::kBFloat16;
      qt::LlamaModel m = qt::load_llama(fixture("lora/base_nf4"), o);
      qt::load_peft_adapter(m, fixture("lora/all_targets/adapter"));
      m.plan.checkpointing = !held;
      m.plan.keep_dequantized = keep;
      if (held) m.hold_dequantized(m.config.num_hidden_layers);
      return m;
    };
    qt::LlamaModel model = load();
    qt::SafetensorsFile ref(fixture("lora/all_targets/reference.safetensors"));
    const at::Tensor ids = ref.load("input_ids", at::kLong, at::kCPU), labels = ref.load("labels", at::kLong, at::kCPU);
    auto params = qt::lora_parameters(model);
    qt::AdamW opt(params, {0.9, 0.999, 1e-8, 0.0});
    // q/k/v, o, gate/up and down of each block: one LoRA node each.
    const int64_t nodes = 4 * model.config.num_hidden_layers;
    for (int step = 0; step < 3; ++step) {
      INFO("step " << step);
      const int64_t before = model.stats->lora_factor_builds, refreshed = model.stats->lora_factor_refreshes,
                    launches = model.stats->lora_factor_refresh_launches, writes = model.stats->held_lora_writes;
      at::Tensor loss = causal_lm_loss(model, ids, labels);
      loss.backward();  // the recomputation reuses the forward pass's factors
      // Made in the first forward pass; after an optimizer step, written again in place in one batch (or remade).
      const int64_t singles = bf16 ? 0 : nodes / 2;  // o_proj and down_proj in fp32
      CHECK(model.stats->lora_factor_builds - before == (keep && (step == 0 || !batched) ? nodes : batched ? singles : 0));
      CHECK(model.stats->lora_factor_refreshes - refreshed == (batched && step > 0 ? nodes - singles : 0));
      CHECK(model.stats->lora_factor_refresh_launches - launches == (batched && step > 0 ? 1 : 0));
      // q / k / v's and gate / up's B columns, down_proj's A rows: once a block and step (o_proj holds no factor)
      CHECK(model.stats->held_lora_writes - writes == (held ? 3 * model.config.num_hidden_layers : 0));
      // Another model with the same adapter values and nothing cached: the same loss to the bit.
      qt::LlamaModel fresh = load();
      fresh.plan.keep_dequantized = false;
      std::vector<qt::Linear*> ours, theirs;
      model.for_each_linear([&](const std::string&, qt::Linear& l) { ours.push_back(&l); });
      fresh.for_each_linear([&](const std::string&, qt::Linear& l) { theirs.push_back(&l); });
      REQUIRE(ours.size() == theirs.size());
      for (size_t i = 0; i < ours.size(); ++i) {
        theirs[i]->lora->A.detach().copy_(ours[i]->lora->A.detach());
        theirs[i]->lora->B.detach().copy_(ours[i]->lora->B.detach());
      }
      at::NoGradGuard no_grad;
      CHECK(at::equal(causal_lm_loss(fresh, ids, labels), loss.detach()));
      opt.step(1e-2);  // writes A and B in place: the next forward pass makes new factors
      opt.zero_grad();
    }
  }
}

TEST_CASE("DPO's reference: fresh adapters left out give the base's loss, init_from's swapped in give its; the "
          "trained adapters' bits after the pass", "[lora][dpo]") {
  // 0: factors kept, 1: none kept, 2: every block's weights held with the factors written into them.
  for (int mode = 0; mode < 3; ++mode) {
    for (const bool dora : {false, true}) {
      INFO("mode " << mode << (dora ? ", DoRA" : ""));
      auto load = [&](const char* adapter) {
        qt::LlamaModel m = qt::load_llama(fixture("lora/base_nf4"), nf4_load());
        if (adapter) qt::load_peft_adapter(m, fixture(adapter));
        m.plan.checkpointing = mode != 2;
        m.plan.keep_dequantized = mode != 1;
        if (mode == 2) m.hold_dequantized(m.config.num_hidden_layers);
        return m;
      };
      const char* adapter = dora ? "lora/dora_all/adapter" : "lora/all_targets/adapter";
      qt::LlamaModel model = load(adapter), base = load(nullptr), init = load(adapter);
      qt::SafetensorsFile ref(fixture("lora/all_targets/reference.safetensors"));
      const at::Tensor ids = ref.load("input_ids", at::kLong, at::kCPU), labels = ref.load("labels", at::kLong, at::kCPU);
      at::NoGradGuard no_grad;
      // The trained adapters moved off their directory's values (as training moves them).
      model.for_each_linear([](const std::string&, qt::Linear& l) {
        if (l.lora) l.lora->B.mul_(1.5);
      });
      const at::Tensor adapted = causal_lm_loss(model, ids, labels), want_base = causal_lm_loss(base, ids, labels),
                       want_init = causal_lm_loss(init, ids, labels);
      REQUIRE(std::abs(adapted.item<double>() - want_base.item<double>()) > 1e-3);
      REQUIRE(std::abs(adapted.item<double>() - want_init.item<double>()) > 1e-4);
      qt::ReferenceAdapters fresh(model, ""), from_dir(model, fixture(adapter));
      int64_t builds = 0;
      for (int round = 0; round < 2; ++round) {  // (twice: the factors made again each way)
        if (round == 1) builds = model.stats->lora_factor_builds;
        {
          const qt::ReferenceAdapters::Scope scope(fresh);
          CHECK(std::abs(causal_lm_loss(model, ids, labels).item<double>() - want_base.item<double>()) <=
                1e-6 * std::abs(want_base.item<double>()));
        }
        CHECK(at::equal(causal_lm_loss(model, ids, labels), adapted));
        {
          const qt::ReferenceAdapters::Scope scope(from_dir);
          CHECK(std::abs(causal_lm_loss(model, ids, labels).item<double>() - want_init.item<double>()) <=
                1e-6 * std::abs(want_init.item<double>()));
        }
        CHECK(at::equal(causal_lm_loss(model, ids, labels), adapted));
      }
      // The reference's factors kept apart from the policy's: the second round made none (each pass its own cache).
      CHECK(model.stats->lora_factor_builds == builds);
      // The frozen copies hold no gradient and no dropout.
      bool frozen = true;
      {
        const qt::ReferenceAdapters::Scope scope(from_dir);
        model.for_each_linear([&](const std::string&, qt::Linear& l) {
          if (l.lora)
            frozen = frozen && !l.lora->A.requires_grad() && !l.lora->B.requires_grad() && l.lora->dropout == 0 &&
                     (!l.lora->dora() || !l.lora->magnitude.requires_grad());
        });
      }
      CHECK(frozen);
    }
  }
}

// DPO on the fixture model: two random pairs packed in one row (and a third alone in the next), the policy the
// all-targets adapter with its Bs scaled by 1.5, the reference the adapter as read from its directory (lora.init_from's
// path); the loss (sum over the pairs), the statistics and every LoRA gradient.
std::vector<at::Tensor> dpo_loss_and_grads(const at::Device& device, c10::ScalarType dtype, bool fused,
                                           const std::string& loss_type = "sigmoid", bool fresh_reference = false) {
  qt::LlamaModel m = fixture_model(device, dtype);
  {
    at::NoGradGuard g;
    m.for_each_linear([](const std::string&, qt::Linear& l) {
      if (l.lora) l.lora->B.mul_(1.5);
    });
  }
  qt::ReferenceAdapters reference(m, fresh_reference ? "" : fixture("lora/all_targets/adapter"));
  std::mt19937 rng(5);
  std::vector<qt::Example> pairs;
  for (int i = 0; i < 3; ++i) {
    qt::Example e;
    const int prompt = 4 + static_cast<int>(rng() % 5), chosen = 3 + static_cast<int>(rng() % 6),
              rejected = 3 + static_cast<int>(rng() % 6);
    std::vector<int32_t> p;
    for (int k = 0; k < prompt; ++k) p.push_back(static_cast<int32_t>(rng() % m.config.vocab_size));
    for (const int n : {chosen, rejected}) {
      e.ids.insert(e.ids.end(), p.begin(), p.end());
      e.loss.insert(e.loss.end(), p.size(), 0);
      for (int k = 0; k < n; ++k) {
        e.ids.push_back(static_cast<int32_t>(rng() % m.config.vocab_size));
        e.loss.push_back(1);
      }
      if (e.second == 0) e.second = static_cast<int64_t>(e.ids.size());
    }
    pairs.push_back(e);
  }
  const qt::Batch b = qt::build_batch(pairs, {{0, 1}, {2}}, qt::BatchShape{2, 80, true});
  REQUIRE(b.num_pairs == 3);
  qt::DpoSection cfg;
  cfg.loss_types = {loss_type};
  m.set_training(true);
  const at::Tensor seqs = qt::pair_sequences(b);
  const at::Tensor ref = qt::reference_logps(m, reference, b, seqs, fused, /*training=*/true);
  const at::Tensor hidden = m.forward_hidden(m.embed(b.input_ids), b);
  const qt::DpoTerms terms = qt::dpo_policy_terms(m, hidden, b, seqs, ref, qt::PreferenceObjective{&cfg, nullptr}, fused);
  terms.loss_sum.backward();
  std::vector<at::Tensor> out{terms.sums.to(at::kCPU, at::kFloat)};
  for (auto& [key, t] : qt::lora_parameters(m)) out.push_back(t.grad().to(at::kCPU, at::kFloat).clone());
  return out;
}

TEST_CASE("DPO through the fused loss's per-token rows gives the plain logits' loss, statistics and LoRA gradients",
          "[lora][dpo]") {
  for (const char* loss_type : {"sigmoid", "ipo"}) {
    INFO(loss_type);
    const std::vector<at::Tensor> fused = dpo_loss_and_grads(at::kCPU, at::kFloat, true, loss_type);
    const std::vector<at::Tensor> plain = dpo_loss_and_grads(at::kCPU, at::kFloat, false, loss_type);
    check_same_loss_and_grads(dpo_loss_and_grads(at::kCPU, at::kFloat, true, loss_type, true),
                              dpo_loss_and_grads(at::kCPU, at::kFloat, false, loss_type, true), 1e-5);
    CHECK(fused[0][3].item<double>() > 0);  // some pair's chosen reward leads: policy != reference
    CHECK(std::abs(fused[0][0].item<double>() - std::log(2.0) * 3) > 1e-3);
    check_same_loss_and_grads(fused, plain, 1e-5);
  }
}

TEST_CASE("DPO on CUDA gives the CPU's loss, statistics and LoRA gradients (fp32; bf16 within its rounding)",
          "[lora][dpo][gpu]") {
  REQUIRE(at::hasCUDA());
  const at::Device cuda(at::kCUDA, 0);
  for (const bool fresh : {false, true}) {  // the reference init_from's adapter, or the base (adapters left out)
    INFO("fresh reference " << fresh);
    const std::vector<at::Tensor> cpu = dpo_loss_and_grads(at::kCPU, at::kFloat, true, "sigmoid", fresh);
    check_same_loss_and_grads(dpo_loss_and_grads(cuda, at::kFloat, true, "sigmoid", fresh), cpu, 1e-4);
    check_same_loss_and_grads(dpo_loss_and_grads(cuda, at::kBFloat16, true, "sigmoid", fresh), cpu, 5e-2);
  }
}

TEST_CASE("gate / up LoRA B terms inside the base GEMM match PEFT, with and without "
          "checkpointing and kept weights", "[lora]") {
  for (int mode = 0; mode < 4; ++mode) {
    INFO("mode " << mode);
    std::shared_ptr<qt::ModelStats> stats;
    int64_t layers = 0;
    // mode 3: kept weights with the input gradients' LoRA terms in GEMMs of their own (QT_LORA_GRAD_GEMM=0, the A/B
    // switch)
    std::optional<qt::test::ScopedEnv> own_gemms;
    if (mode == 3) own_gemms.emplace("QT_LORA_GRAD_GEMM", "0");
    check_against_peft("base_nf4", "all_targets", 1e-5, 1e-4, [&](qt::LlamaModel& m) {
      m.plan.checkpointing = mode > 0;
      m.plan.keep_dequantized = mode >= 2;
      layers = m.config.num_hidden_layers;
      stats = m.stats;
    });
    // Every block's gate / up and q / k / v took the path (twice with the recomputation; q / k / v where the norm
    // writes into the concatenated input, Pass::norm_into_concat).
    CHECK(layers > 0);
    REQUIRE(stats);
    own_gemms.reset();
    CHECK(stats->lora_b_in_gemm_runs == (mode > 0 ? 2 : 1) * 2 * layers);
    CHECK(stats->concat_inputs_in_place == (mode > 0 ? 2 : 1) * 2 * layers);
    if (mode == 3) {
      CHECK(stats->lora_in_grad_gemm_runs == 0);
      continue;
    }
    // Every block's input gradients took their LoRA terms in the base GEMMs: q / k / v's and gate / up's [dx | dy B],
    // down_proj's [dy | dy B] [W; A] (intermediate 160 >= 2 x hidden 64); o_proj's not (as wide in as out), nor the
    // first block's q / k / v (their input, the frozen embedding's output, needs no gradient).
    CHECK(stats->lora_in_grad_gemm_runs == 3 * layers - 1);
  }
}

TEST_CASE("rsLoRA scaling on a subset of modules matches PEFT", "[lora]") {
  check_against_peft("base_nf4", "rslora_qv", 1e-5, 1e-4);
}

TEST_CASE("quantize-on-load of the original weights gives PEFT's LoRA loss and gradients", "[lora]") {
  // Our quantizer takes the nearest nested absmax code where bitsandbytes' CPU kernel occasionally does not
  // (gen_nf4.py): count how many weights that touches, then hold the LoRA figures to the same bound.
  qt::LlamaModel ours = qt::load_llama(fixture("lora/base"), nf4_load());
  qt::LlamaModel bnb = qt::load_llama(fixture("lora/base_nf4"), nf4_load());
  int64_t differing = 0, total = 0;
  std::map<std::string, at::Tensor> bnb_w;
  bnb.for_each_linear([&](const std::string& n, qt::Linear& l) { bnb_w[n] = l.base_weight(at::kFloat); });
  ours.for_each_linear([&](const std::string& n, qt::Linear& l) {
    differing += (l.base_weight(at::kFloat) != bnb_w.at(n)).sum().item<int64_t>();
    total += l.base_weight(at::kFloat).numel();
  });
  INFO(differing << " of " << total << " dequantized weights differ from bitsandbytes' CPU quantization");
  CHECK(differing * 100 < total);
  check_against_peft("base", "all_targets", 1e-4, 1e-3);
}

TEST_CASE("attach_lora initialises as PEFT: A uniform within 1/sqrt(in) and B zero so the model is the base", "[lora]") {
  qt::LlamaModel model = qt::load_llama(fixture("lora/base"), nf4_load());
  at::Tensor ids = at::randint(0, model.config.vocab_size, {1, 9}, at::kLong);
  at::Tensor before;
  {
    at::NoGradGuard g;
    before = model.forward(ids);
  }
  qt::LoraConfig cfg;
  cfg.r = 4;
  cfg.alpha = 8;
  cfg.targets = {"q_proj", "down_proj", "gate_proj"};
  const int64_t n = qt::attach_lora(model, cfg, /*seed=*/7);
  CHECK(n == 3 * model.config.num_hidden_layers);
  std::map<std::string, at::Tensor> first;
  model.for_each_linear([&](const std::string& name, qt::Linear& l) {
    INFO(name);
    REQUIRE(static_cast<bool>(l.lora) == cfg.targets_module(name));
    if (!l.lora) return;
    const double bound = 1.0 / std::sqrt(static_cast<double>(l.in_features()));
    CHECK(l.lora->A.sizes() == at::IntArrayRef({4, l.in_features()}));
    CHECK(l.lora->B.sizes() == at::IntArrayRef({l.out_features(), 4}));
    CHECK(l.lora->A.scalar_type() == at::kFloat);
    CHECK(l.lora->A.requires_grad());
    CHECK(l.lora->B.requires_grad());
    CHECK(l.lora->A.abs().max().item<double>() <= bound);
    CHECK(l.lora->A.abs().max().item<double>() > 0.8 * bound);  // uniform over the whole range, not a narrow one
    CHECK(std::abs(l.lora->A.mean().item<double>()) < 0.2 * bound);
    CHECK(l.lora->B.abs().max().item<double>() == 0);
    CHECK(l.lora->scale == 2.0);
    first[name] = l.lora->A.detach().clone();
  });
  {
    at::NoGradGuard g;
    CHECK(at::equal(model.forward(ids), before));
  }
  qt::attach_lora(model, cfg, 7);
  model.for_each_linear([&](const std::string& name, qt::Linear& l) {
    if (l.lora) CHECK(at::equal(l.lora->A, first.at(name)));
  });
  qt::attach_lora(model, cfg, 8);
  model.for_each_linear([&](const std::string& name, qt::Linear& l) {
    if (l.lora) CHECK(!at::equal(l.lora->A, first.at(name)));
  });
  cfg.use_rslora = true;
  CHECK(cfg.scale() == 4.0);  // alpha / sqrt(r) = 8 / 2
  auto params = qt::lora_parameters(model);
  REQUIRE(params.size() == static_cast<size_t>(2 * n));
  CHECK(params[0].first == "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight");
  CHECK(params[1].first == "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight");
  CHECK(params[0].second.is_same(model.layers[0].q_proj.lora->A));  // the model's own tensor, for the optimizer
  qt::detach_lora(model);
  CHECK(qt::lora_parameters(model).empty());
}

TEST_CASE("the lora config section: defaults and clear errors", "[lora]") {
  const qt::LoraConfig d = qt::LoraConfig::from_json(qt::Json::object(), "run.json");
  CHECK(d.r == 16);
  CHECK(d.alpha == 16);
  CHECK(d.dropout == 0.0);
  CHECK(d.targets.size() == 7);
  CHECK(!d.use_rslora);
  CHECK(d.scale() == 1.0);
  const qt::LoraConfig c = qt::LoraConfig::from_json(
      qt::Json::parse(R"({"r": 64, "alpha": 16, "dropout": 0.05, "targets": ["q_proj", "v_proj"], "use_rslora": true})"),
      "run.json");
  CHECK(c.r == 64);
  CHECK(c.dropout == 0.05);
  CHECK(c.targets == std::vector<std::string>{"q_proj", "v_proj"});
  CHECK(c.scale() == 2.0);
  CHECK(!c.targets_module("model.layers.3.mlp.up_proj"));
  CHECK(c.targets_module("model.layers.3.self_attn.v_proj"));

  struct Bad {
    const char* json;
    std::vector<std::string> needles;
  };
  const std::vector<Bad> cases = {
      {R"({"alpah": 8})", {"run.json", "lora.alpah", "did you mean 'lora.alpha'"}},
      {R"({"r": 0})", {"lora.r", "positive"}},
      {R"({"r": 4.5})", {"lora.r", "integer"}},
      {R"({"alpha": -1})", {"lora.alpha", "positive"}},
      {R"({"dropout": 1.0})", {"lora.dropout", "[0, 1)"}},
      {R"({"targets": []})", {"lora.targets", "at least one"}},
      {R"({"targets": ["q_prj"]})", {"lora.targets", "q_prj", "did you mean 'q_proj'"}},
      {R"({"targets": ["q_proj", "q_proj"]})", {"lora.targets", "twice"}},
      {R"({"use_rslora": "yes"})", {"lora.use_rslora", "true or false"}},
  };
  for (const auto& b : cases) {
    INFO(b.json);
    qt::ErrorKind kind{};
    const std::string msg = error_of([&] { qt::LoraConfig::from_json(qt::Json::parse(b.json), "run.json"); }, &kind);
    CHECK(kind == qt::ErrorKind::Config);
    for (const auto& n : b.needles) {
      INFO(msg);
      CHECK(has(msg, n));
    }
  }
}

TEST_CASE("an adapter we save reloads identically and reads as PEFT writes it", "[lora]") {
  qt::LlamaModel model = qt::load_llama(fixture("lora/base"), nf4_load());
  qt::LoraConfig cfg;
  cfg.r = 8;
  cfg.alpha = 32;
  cfg.dropout = 0.1;
  cfg.targets = {"q_proj", "k_proj", "up_proj"};
  qt::attach_lora(model, cfg, 3);
  for (auto& [k, t] : qt::lora_parameters(model)) {
    at::NoGradGuard g;
    t.normal_();  // B non-zero too
  }
  const std::string dir = qt::files::join(qt::test::scratch_dir("lora_save"), "adapter");  // created by the save
  qt::save_peft_adapter(model, cfg, dir, "/models/base");

  const qt::Json j = qt::read_json_file(qt::files::join(dir, qt::kAdapterConfigFile), qt::ErrorKind::Checkpoint);
  CHECK(j["peft_type"] == "LORA");
  CHECK(j["task_type"] == "CAUSAL_LM");
  CHECK(j["r"] == 8);
  CHECK(j["lora_alpha"] == 32);
  CHECK(j["lora_dropout"] == 0.1);
  CHECK(j["bias"] == "none");
  CHECK(j["use_rslora"] == false);
  CHECK(j["fan_in_fan_out"] == false);
  CHECK(j["base_model_name_or_path"] == "/models/base");
  CHECK(j["target_modules"] == qt::Json::parse(R"(["q_proj", "k_proj", "up_proj"])"));
  {
    qt::SafetensorsFile f(qt::files::join(dir, qt::kAdapterWeightsFile));
    CHECK(f.tensors().size() == 3 * 2 * static_cast<size_t>(model.config.num_hidden_layers));
    CHECK(f.metadata().at("format") == "pt");
    CHECK(f.info("base_model.model.model.layers.1.mlp.up_proj.lora_B.weight").shape ==
          std::vector<int64_t>{model.config.intermediate_size, 8});
    CHECK(f.info("base_model.model.model.layers.1.mlp.up_proj.lora_B.weight").dtype == "F32");
  }

  qt::LlamaModel again = qt::load_llama(fixture("lora/base"), nf4_load());
  const qt::PeftAdapterConfig back = qt::load_peft_adapter(again, dir);
  CHECK(back.base_model_name_or_path == "/models/base");
  CHECK(back.lora.r == 8);
  CHECK(back.lora.alpha == 32);
  CHECK(back.lora.dropout == 0.1);
  CHECK(back.lora.targets == cfg.targets);
  auto a = qt::lora_parameters(model), b = qt::lora_parameters(again);
  REQUIRE(a.size() == b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    INFO(a[i].first);
    CHECK(a[i].first == b[i].first);
    CHECK(at::equal(a[i].second, b[i].second));
  }
  again.for_each_linear([&](const std::string&, qt::Linear& l) {
    if (l.lora) CHECK(l.lora->scale == 4.0);
  });

  SECTION("bf16 tensors load as their fp32 values") {
    const std::string d16 = copy_adapter(dir, "lora_bf16");
    edit_weights(d16, [](auto& t) {
      for (auto& [k, v] : t) v = v.to(at::kBFloat16);
    });
    qt::LlamaModel m = qt::load_llama(fixture("lora/base"), nf4_load());
    qt::load_peft_adapter(m, d16);
    auto c = qt::lora_parameters(m);
    REQUIRE(c.size() == a.size());
    for (size_t i = 0; i < a.size(); ++i) {
      CHECK(c[i].second.scalar_type() == at::kFloat);
      CHECK(at::equal(c[i].second, a[i].second.detach().to(at::kBFloat16).to(at::kFloat)));
    }
  }
}

TEST_CASE("bad adapters are checkpoint errors naming the file and the key", "[lora]") {
  const std::string peft = fixture("lora/all_targets/adapter");
  const std::string key = "base_model.model.model.layers.1.mlp.down_proj.lora_A.weight";
  struct Case {
    std::string name;
    std::function<void(const std::string&)> edit;
    std::vector<std::string> needles;
  };
  const std::vector<Case> cases = {
      {"missing tensor", [&](const std::string& d) { edit_weights(d, [&](auto& t) { t.erase(key); }); },
       {"adapter_model.safetensors", key, "missing"}},
      {"unexpected tensor",
       [&](const std::string& d) { edit_weights(d, [&](auto& t) { t["base_model.model.lm_head.lora_A.weight"] = at::ones({8, 64}); }); },
       {"adapter_model.safetensors", "base_model.model.lm_head.lora_A.weight", "unexpected"}},
      {"wrong shape", [&](const std::string& d) { edit_weights(d, [&](auto& t) { t[key] = at::ones({8, 7}); }); },
       {"adapter_model.safetensors", key, "[8, 7]", "[8, 160]"}},
      {"rank differs from the config", [&](const std::string& d) { edit_config(d, [](auto& j) { j["r"] = 4; }); },
       {"adapter_model.safetensors", "shape", "r=4"}},
      {"integer tensor", [&](const std::string& d) { edit_weights(d, [&](auto& t) { t[key] = t[key].to(at::kInt); }); },
       {key, "floating-point"}},
      {"not LoRA", [&](const std::string& d) { edit_config(d, [](auto& j) { j["peft_type"] = "IA3"; }); },
       {"adapter_config.json", "peft_type", "IA3"}},
      {"DoRA without magnitudes", [&](const std::string& d) { edit_config(d, [](auto& j) { j["use_dora"] = true; }); },
       {"adapter_model.safetensors", "lora_magnitude_vector", "missing", "use_dora"}},
      {"rank pattern", [&](const std::string& d) { edit_config(d, [](auto& j) { j["rank_pattern"] = {{"q_proj", 4}}; }); },
       {"adapter_config.json", "rank_pattern"}},
      {"unknown target", [&](const std::string& d) { edit_config(d, [](auto& j) { j["target_modules"] = {"q_proj", "lm_head"}; }); },
       {"adapter_config.json", "'target_modules'", "lm_head"}},
      {"bad dropout", [&](const std::string& d) { edit_config(d, [](auto& j) { j["lora_dropout"] = 1.5; }); },
       {"adapter_config.json", "'lora_dropout'", "[0, 1)"}},
      {"no r", [&](const std::string& d) { edit_config(d, [](auto& j) { j.erase("r"); }); },
       {"adapter_config.json", "'r'", "missing"}},
      {"no weights", [&](const std::string& d) { qt::files::remove_tree(qt::files::join(d, qt::kAdapterWeightsFile)); },
       {"adapter_model.safetensors", "not found"}},
      {"no config", [&](const std::string& d) { qt::files::remove_tree(qt::files::join(d, qt::kAdapterConfigFile)); },
       {"adapter_config.json", "not found"}},
      {"truncated weights",
       [&](const std::string& d) {
         const std::string path = qt::files::join(d, qt::kAdapterWeightsFile);
         const std::string bytes = qt::files::read_file(path);
         std::ofstream(path, std::ios::binary | std::ios::trunc) << bytes.substr(0, bytes.size() - 100);
       },
       {"adapter_model.safetensors", "truncated"}},
  };
  for (const auto& c : cases) {
    INFO(c.name);
    const std::string dir = copy_adapter(peft, "lora_bad");
    c.edit(dir);
    qt::LlamaModel model = qt::load_llama(fixture("lora/base_nf4"), nf4_load());
    qt::ErrorKind kind{};
    const std::string msg = error_of([&] { qt::load_peft_adapter(model, dir); }, &kind);
    INFO(msg);
    CHECK(kind == qt::ErrorKind::Checkpoint);
    for (const auto& n : c.needles) CHECK(has(msg, n));
  }
}

TEST_CASE("an adapter is never saved empty or inconsistent with its config", "[lora]") {
  qt::LlamaModel model = qt::load_llama(fixture("lora/base_nf4"), nf4_load());
  qt::LoraConfig cfg;
  const std::string dir = qt::test::scratch_dir("lora_empty");
  qt::ErrorKind kind{};
  std::string msg = error_of([&] { qt::save_peft_adapter(model, cfg, dir, ""); }, &kind);
  CHECK(kind == qt::ErrorKind::Checkpoint);
  CHECK(has(msg, "no adapter attached"));
  CHECK(!qt::files::exists(qt::files::join(dir, qt::kAdapterConfigFile)));
  qt::attach_lora(model, cfg, 1);
  qt::LoraConfig other = cfg;
  other.r = 8;
  msg = error_of([&] { qt::save_peft_adapter(model, other, dir, ""); }, &kind);
  CHECK(kind == qt::ErrorKind::Checkpoint);
  CHECK(has(msg, "r=8"));
  {
    at::NoGradGuard g;
    model.layers[1].v_proj.lora->B[0][0] = NAN;
  }
  msg = error_of([&] { qt::save_peft_adapter(model, cfg, dir, ""); }, &kind);
  CHECK(kind == qt::ErrorKind::Numeric);
  CHECK(has(msg, "model.layers.1.self_attn.v_proj"));
  CHECK(!qt::files::exists(qt::files::join(dir, qt::kAdapterWeightsFile)));
}

TEST_CASE("an export of an adapter that fails part-way leaves nothing in its output directory", "[lora]") {
  qt::LlamaModel model = qt::load_llama(fixture("lora/base_nf4"), nf4_load());
  qt::LoraConfig cfg;
  cfg.r = 1;
  cfg.targets = {"v_proj"};
  qt::attach_lora(model, cfg, 1);
  const std::string root = qt::test::scratch_dir("lora_export_full");
  const std::string dir = qt::files::join(root, "adapter");
  qt::save_peft_adapter(model, cfg, dir, "");
  REQUIRE(qt::files::file_size(qt::files::join(dir, qt::kAdapterWeightsFile)) < 4096);
  // The weights fit under the limit and adapter_config.json (a long base name) does not, as on a disk that fills
  // between the two: `export` left adapter_model.safetensors without adapter_config.json, beside a .tmp.
  const std::string base(6000, 'b');
  const std::string made = qt::files::join(root, "new"), empty = qt::files::join(root, "empty");
  qt::files::make_dirs(empty);
  std::string msg_new, msg_empty;
  {
    qt::test::FileSizeLimit limit(4096);
    msg_new = error_of([&] { qt::copy_peft_adapter(dir, made, base); });
    msg_empty = error_of([&] { qt::copy_peft_adapter(dir, empty, base); });
  }
  INFO(msg_new);
  CHECK(has(msg_new, "adapter_config.json.tmp: write failed: File too large"));
  CHECK(!qt::files::exists(made));
  INFO(msg_empty);
  CHECK(has(msg_empty, "File too large"));
  CHECK(qt::files::list_dir(empty).empty());
  qt::copy_peft_adapter(dir, empty, base);
  CHECK(qt::files::list_dir(empty) == std::vector<std::string>{qt::kAdapterConfigFile, qt::kAdapterWeightsFile});
}

TEST_CASE("a merged export is sharded and loads back as the adapted model", "[lora]") {
  qt::LlamaModel model = qt::load_llama(fixture("lora/base_nf4"), nf4_load());
  qt::load_peft_adapter(model, fixture("lora/all_targets/adapter"));
  const std::string out = qt::files::join(qt::test::scratch_dir("lora_merge"), "merged");
  const qt::MergedExportStats s = qt::save_merged_model(model, fixture("lora/base_nf4"), out, at::kFloat,
                                                        /*max_shard_bytes=*/64 * 1024);
  CHECK(s.merged == 7 * model.config.num_hidden_layers);
  CHECK(s.shards > 1);
  CHECK(qt::files::exists(qt::files::join(out, "model.safetensors.index.json")));
  CHECK(!qt::files::exists(out + ".tmp-export"));
  const qt::Json cfg = qt::read_json_file(qt::files::join(out, "config.json"), qt::ErrorKind::Model);
  CHECK(!cfg.contains("quantization_config"));
  CHECK(cfg["dtype"] == "float32");

  qt::LlamaModel merged = qt::load_llama(out, {});
  std::map<std::string, at::Tensor> want;
  model.for_each_linear([&](const std::string& n, qt::Linear& l) {
    want[n] = qt::merged_weight(l);
    // W + scale * B A, spelled out: the base as training saw it (dequantized NF4) plus the low-rank update.
    at::Tensor spelled = l.base_weight(at::kFloat) + l.lora->scale * at::matmul(l.lora->B, l.lora->A).detach();
    CHECK(rel_err(want[n], spelled) < 1e-6);
  });
  merged.for_each_linear([&](const std::string& n, qt::Linear& l) {
    INFO(n);
    CHECK(!l.quantized());
    CHECK(!l.lora);
    CHECK(at::equal(l.weight, want.at(n)));
  });
  qt::SafetensorsFile ref(fixture("lora/all_targets/reference.safetensors"));
  at::Tensor ids = ref.load("input_ids", at::kLong, at::kCPU);
  at::NoGradGuard g;
  CHECK(rel_err(merged.forward(ids), model.forward(ids)) < 1e-5);
  CHECK(rel_err(merged.forward(ids), ref.view("logits")) < 1e-4);

  const std::string again = qt::files::join(qt::files::parent(out), "again");
  qt::files::make_dirs(again);
  qt::files::copy_file(qt::files::join(out, "config.json"), qt::files::join(again, "config.json"));
  qt::ErrorKind kind{};
  CHECK(has(error_of([&] { qt::save_merged_model(model, fixture("lora/base_nf4"), again, at::kBFloat16); }, &kind),
            "not empty"));
  CHECK(kind == qt::ErrorKind::Usage);
}

// ---- DoRA (lora.use_dora): PEFT's weight-decomposed LoRA -------------------------------------------------------

TEST_CASE("DoRA on NF4 linears matches PEFT on bitsandbytes' dequantized base: loss and the gradients of A, B and m",
          "[lora][dora]") {
  for (const char* name : {"dora_all", "dora_rslora_mlp"}) {
    {
      qt::LlamaModel model = qt::load_llama(fixture("lora/base_nf4"), nf4_load());
      const qt::PeftAdapterConfig cfg = qt::load_peft_adapter(model, fixture(std::string("lora/") + name + "/adapter"));
      CHECK(cfg.lora.use_dora);
      int64_t magnitudes = 0;
      for (const auto& [key, t] : qt::lora_parameters(model))
        if (key.size() > 22 && key.compare(key.size() - 22, 22, ".lora_magnitude_vector") == 0) ++magnitudes;
      CHECK(magnitudes == static_cast<int64_t>(cfg.lora.targets.size()) * model.config.num_hidden_layers);
    }
    check_against_peft("base_nf4", name, 1e-5, 1e-4);
  }
}

TEST_CASE("DoRA with per-block activation checkpointing gives the same loss and gradients", "[lora][dora]") {
  qt::SafetensorsFile ref(fixture("lora/dora_all/reference.safetensors"));
  at::Tensor ids = ref.load("input_ids", at::kLong, at::kCPU);
  at::Tensor labels = ref.load("labels", at::kLong, at::kCPU);
  std::vector<std::vector<at::Tensor>> grads(2);
  std::vector<double> losses;
  for (bool ckpt : {false, true}) {
    qt::LlamaModel model = qt::load_llama(fixture("lora/base_nf4"), nf4_load());
    qt::load_peft_adapter(model, fixture("lora/dora_all/adapter"));
    model.plan.checkpointing = ckpt;
    at::Tensor loss = causal_lm_loss(model, ids, labels);
    loss.backward();
    losses.push_back(loss.item<double>());
    for (auto& [k, t] : qt::lora_parameters(model)) grads[ckpt].push_back(t.grad().clone());
  }
  CHECK(losses[0] == losses[1]);
  REQUIRE(grads[0].size() == grads[1].size());
  for (size_t i = 0; i < grads[0].size(); ++i) CHECK(rel_err(grads[1][i], grads[0][i]) < 1e-6);
}

TEST_CASE("attach_lora with use_dora initialises the magnitude as PEFT: the row norms of the dequantized base",
          "[lora][dora]") {
  qt::LlamaModel model = qt::load_llama(fixture("lora/base_nf4"), nf4_load());
  at::Tensor ids = at::randint(0, model.config.vocab_size, {2, 11}, at::kLong);
  at::Tensor before;
  {
    at::NoGradGuard g;
    before = model.forward(ids);
  }
  qt::LoraConfig cfg;
  cfg.r = 8;
  cfg.alpha = 16;
  cfg.use_dora = true;
  const int64_t n = qt::attach_lora(model, cfg, /*seed=*/11);
  qt::SafetensorsFile ref(fixture("lora/dora_all/reference.safetensors"));
  int64_t checked = 0;
  model.for_each_linear([&](const std::string& name, qt::Linear& l) {
    INFO(name);
    REQUIRE(l.lora);
    REQUIRE(l.lora->dora());
    CHECK(l.lora->magnitude.sizes() == at::IntArrayRef({l.out_features()}));
    CHECK(l.lora->magnitude.scalar_type() == at::kFloat);
    CHECK(l.lora->magnitude.requires_grad());
    const std::string key = "init." + qt::peft_dora_key(name);
    REQUIRE(ref.find(key) != nullptr);
    CHECK(rel_err(l.lora->magnitude, ref.view(key)) < 1e-6);
    ++checked;
  });
  CHECK(checked == n);
  {  // m / ||W + s B A|| = 1 with B = 0: the model starts as the base
    at::NoGradGuard g;
    CHECK(rel_err(model.forward(ids), before) < 1e-6);
  }
  auto params = qt::lora_parameters(model);
  REQUIRE(params.size() == static_cast<size_t>(3 * n));
  CHECK(params[2].first == "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector");
  CHECK(params[2].second.is_same(model.layers[0].q_proj.lora->magnitude));

  const qt::LoraConfig parsed = qt::LoraConfig::from_json(qt::Json::parse(R"({"use_dora": true})"), "run.json");
  CHECK(parsed.use_dora);
  CHECK(!qt::LoraConfig::from_json(qt::Json::object(), "run.json").use_dora);
  qt::ErrorKind kind{};
  const std::string msg =
      error_of([&] { qt::LoraConfig::from_json(qt::Json::parse(R"({"use_dora": 1})"), "run.json"); }, &kind);
  CHECK(kind == qt::ErrorKind::Config);
  CHECK(has(msg, "lora.use_dora"));
  CHECK(has(error_of([&] { qt::LoraConfig::from_json(qt::Json::parse(R"({"use_droa": true})"), "run.json"); }),
            "did you mean 'lora.use_dora'"));
}

TEST_CASE("a DoRA linear matches PEFT in training with LoRA dropout and in eval, NF4 or dense base, with a bias",
          "[lora][dora]") {
  qt::SafetensorsFile f(fixture("dora/linear.safetensors"));
  std::map<std::string, at::Tensor> all;
  for (const auto& info : f.tensors()) all[info.name] = f.load(info.name, info.scalar_type, at::kCPU);
  const at::Tensor x0 = all.at("x"), grad_out = all.at("grad_out");
  for (const bool nf4 : {true, false}) {
    qt::Linear l;
    if (nf4) l.nf4 = std::make_shared<qt::Nf4Weight>(qt::nf4_from_bnb_tensors(all, "proj", "linear.safetensors"));
    else l.weight = all.at("dense_weight");
    if (nf4) REQUIRE(at::equal(l.base_weight(at::kFloat), all.at("dense_weight")));
    l.bias = all.at("bias");
    l.lora = std::make_shared<qt::LoraAdapter>();
    l.lora->A = all.at("lora_A").clone().requires_grad_(true);
    l.lora->B = all.at("lora_B").clone().requires_grad_(true);
    l.lora->magnitude = all.at("magnitude").clone().requires_grad_(true);
    l.lora->scale = all.at("scale").item<double>();
    l.lora->dropout = all.at("dropout").item<double>();
    for (const char* mode : {"train", "eval"}) {
      INFO((nf4 ? "nf4 " : "dense ") << mode);
      l.training = std::string(mode) == "train";
      for (at::Tensor* p : {&l.lora->A, &l.lora->B, &l.lora->magnitude})
        if (p->grad().defined()) p->mutable_grad().zero_();
      at::Tensor x = x0.clone().requires_grad_(true);
      at::manual_seed(all.at("seed").item<int64_t>());  // the dropout mask PEFT drew
      at::Tensor y = l.forward(x);
      y.backward(grad_out);
      const std::string m = mode;
      CHECK(rel_err(y, all.at(m + ".y")) < 1e-5);
      CHECK(rel_err(x.grad(), all.at(m + ".grad.x")) < 1e-5);
      CHECK(rel_err(l.lora->A.grad(), all.at(m + ".grad.lora_A")) < 1e-4);
      CHECK(rel_err(l.lora->B.grad(), all.at(m + ".grad.lora_B")) < 1e-4);
      CHECK(rel_err(l.lora->magnitude.grad(), all.at(m + ".grad.magnitude")) < 1e-4);
    }
  }
  // Dropout changes the output (so the training reference does exercise PEFT's dropout branch).
  CHECK(rel_err(all.at("train.y"), all.at("eval.y")) > 1e-2);
}

TEST_CASE("a DoRA adapter we save reloads identically, is copied by export and reads as PEFT writes it",
          "[lora][dora]") {
  qt::LlamaModel model = qt::load_llama(fixture("lora/base_nf4"), nf4_load());
  qt::LoraConfig cfg;
  cfg.r = 4;
  cfg.alpha = 8;
  cfg.targets = {"v_proj", "down_proj"};
  cfg.use_dora = true;
  qt::attach_lora(model, cfg, 5);
  for (auto& [k, t] : qt::lora_parameters(model)) {
    at::NoGradGuard g;
    t.mul_(1.5).add_(0.01);
  }
  const std::string dir = qt::files::join(qt::test::scratch_dir("dora_save"), "adapter");
  qt::save_peft_adapter(model, cfg, dir, "");
  const qt::Json j = qt::read_json_file(qt::files::join(dir, qt::kAdapterConfigFile), qt::ErrorKind::Checkpoint);
  CHECK(j["use_dora"] == true);
  {
    qt::SafetensorsFile f(qt::files::join(dir, qt::kAdapterWeightsFile));
    CHECK(f.tensors().size() == 2 * 3 * static_cast<size_t>(model.config.num_hidden_layers));
    CHECK(f.info("base_model.model.model.layers.1.mlp.down_proj.lora_magnitude_vector").shape ==
          std::vector<int64_t>{model.config.hidden_size});
    CHECK(f.info("base_model.model.model.layers.1.mlp.down_proj.lora_magnitude_vector").dtype == "F32");
  }
  const std::string copied = qt::files::join(qt::test::scratch_dir("dora_copy"), "adapter");
  qt::copy_peft_adapter(dir, copied, "", &model.config);
  for (const std::string& from : {dir, copied}) {
    INFO(from);
    qt::LlamaModel again = qt::load_llama(fixture("lora/base_nf4"), nf4_load());
    CHECK(qt::load_peft_adapter(again, from).lora.use_dora);
    auto a = qt::lora_parameters(model), b = qt::lora_parameters(again);
    REQUIRE(a.size() == b.size());
    for (size_t i = 0; i < a.size(); ++i) {
      CHECK(a[i].first == b[i].first);
      CHECK(at::equal(a[i].second, b[i].second));
      CHECK(b[i].second.requires_grad());
    }
  }
  // The model's adapters and the config must agree on DoRA.
  qt::LoraConfig plain = cfg;
  plain.use_dora = false;
  qt::ErrorKind kind{};
  CHECK(has(error_of([&] { qt::save_peft_adapter(model, plain, dir, ""); }, &kind), "DoRA magnitude"));
  CHECK(kind == qt::ErrorKind::Checkpoint);
  {
    at::NoGradGuard g;
    model.layers[0].down_proj.lora->magnitude[3] = NAN;
  }
  CHECK(has(error_of([&] { qt::save_peft_adapter(model, cfg, dir, ""); }, &kind), "model.layers.0.mlp.down_proj"));
  CHECK(kind == qt::ErrorKind::Numeric);
}

TEST_CASE("bad DoRA adapters are checkpoint errors naming the file and the key", "[lora][dora]") {
  const std::string peft = fixture("lora/dora_all/adapter");
  const std::string key = "base_model.model.model.layers.1.mlp.up_proj.lora_magnitude_vector";
  struct Case {
    std::string name;
    std::function<void(const std::string&)> edit;
    std::vector<std::string> needles;
  };
  const std::vector<Case> cases = {
      {"missing magnitude", [&](const std::string& d) { edit_weights(d, [&](auto& t) { t.erase(key); }); },
       {"adapter_model.safetensors", key, "missing", "use_dora"}},
      {"magnitude of the wrong length", [&](const std::string& d) { edit_weights(d, [&](auto& t) { t[key] = at::ones({64}); }); },
       {"adapter_model.safetensors", key, "[64]", "[160]"}},
      {"magnitude as a matrix", [&](const std::string& d) { edit_weights(d, [&](auto& t) { t[key] = at::ones({160, 1}); }); },
       {"adapter_model.safetensors", key, "[160, 1]"}},
      {"integer magnitude", [&](const std::string& d) { edit_weights(d, [&](auto& t) { t[key] = t[key].to(at::kInt); }); },
       {key, "floating-point"}},
      {"magnitudes without use_dora", [&](const std::string& d) { edit_config(d, [](auto& j) { j["use_dora"] = false; }); },
       {"adapter_model.safetensors", "lora_magnitude_vector", "use_dora"}},
      {"use_dora not a boolean", [&](const std::string& d) { edit_config(d, [](auto& j) { j["use_dora"] = "yes"; }); },
       {"adapter_config.json", "use_dora"}},
  };
  for (const auto& c : cases) {
    INFO(c.name);
    const std::string dir = copy_adapter(peft, "dora_bad");
    c.edit(dir);
    for (const bool export_copy : {false, true}) {
      INFO((export_copy ? "export" : "load"));
      qt::LlamaModel model = qt::load_llama(fixture("lora/base_nf4"), nf4_load());
      qt::ErrorKind kind{};
      const std::string out = qt::files::join(qt::test::scratch_dir("dora_bad_out"), "adapter");
      const std::string msg = error_of([&] {
        if (export_copy) qt::copy_peft_adapter(dir, out, "", &model.config);
        else qt::load_peft_adapter(model, dir);
      }, &kind);
      INFO(msg);
      CHECK(kind == qt::ErrorKind::Checkpoint);
      for (const auto& n : c.needles) CHECK(has(msg, n));
    }
  }
}

TEST_CASE("a merged DoRA export holds m / ||W + s B A|| (W + s B A) and gives PEFT's logits", "[lora][dora]") {
  qt::LlamaModel model = qt::load_llama(fixture("lora/base_nf4"), nf4_load());
  qt::load_peft_adapter(model, fixture("lora/dora_all/adapter"));
  const std::string out = qt::files::join(qt::test::scratch_dir("dora_merge"), "merged");
  const qt::MergedExportStats s = qt::save_merged_model(model, fixture("lora/base_nf4"), out, at::kFloat);
  CHECK(s.merged == 7 * model.config.num_hidden_layers);
  qt::LlamaModel merged = qt::load_llama(out, {});
  std::map<std::string, at::Tensor> want;
  model.for_each_linear([&](const std::string& n, qt::Linear& l) {
    at::Tensor V = l.base_weight(at::kFloat) + l.lora->scale * at::matmul(l.lora->B, l.lora->A).detach();
    at::Tensor spelled = (l.lora->magnitude.detach() / V.norm(2, {1})).unsqueeze(1) * V;
    want[n] = qt::merged_weight(l);
    CHECK(rel_err(want[n], spelled) < 1e-6);
    CHECK(rel_err(want[n], V) > 1e-3);  // the magnitude does rescale
  });
  merged.for_each_linear([&](const std::string& n, qt::Linear& l) {
    INFO(n);
    CHECK(!l.lora);
    CHECK(at::equal(l.weight, want.at(n)));
  });
  qt::SafetensorsFile ref(fixture("lora/dora_all/reference.safetensors"));
  at::Tensor ids = ref.load("input_ids", at::kLong, at::kCPU);
  at::NoGradGuard g;
  CHECK(rel_err(merged.forward(ids), model.forward(ids)) < 1e-5);
  CHECK(rel_err(merged.forward(ids), ref.view("logits")) < 1e-4);
}

TEST_CASE("generation stops at a stop id and top-p keeps the nucleus transformers keeps", "[generate]") {
  qt::LlamaModel model = qt::load_llama(fixture("lora/base"), {});
  qt::GenerateOptions o;
  o.max_new_tokens = 6;
  const std::vector<int32_t> prompt = {1, 17, 42};
  const qt::GenerateResult free_run = qt::generate_tokens(model, prompt, o);
  REQUIRE(free_run.tokens.size() == 6);
  CHECK(!free_run.stopped);
  o.stop_ids = {free_run.tokens[2]};
  const qt::GenerateResult stopped = qt::generate_tokens(model, prompt, o);
  CHECK(stopped.stopped);
  CHECK(stopped.tokens == std::vector<int32_t>(free_run.tokens.begin(), free_run.tokens.begin() + 3));
  o.max_seq_len = 5;  // the prompt's 3 plus 2
  o.stop_ids.clear();
  CHECK(qt::generate_tokens(model, prompt, o).tokens.size() == 2);

  // probabilities 0.5, 0.3, 0.15, 0.05: ascending cumulative 0.05, 0.2, 0.5, 1. top_p 0.75 drops cum <= 0.25
  // (ids 3 and 2); 0.9 drops cum <= 0.1 (id 3 only).
  const at::Tensor logits = at::log(at::tensor({0.5, 0.3, 0.15, 0.05}, at::kFloat));
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(5);
  qt::GenerateOptions s;
  s.temperature = 1.0;
  for (double top_p : {0.75, 0.9}) {
    s.top_p = top_p;
    std::vector<int> counts(4, 0);
    for (int i = 0; i < 2000; ++i) ++counts.at(qt::choose_next_token(logits, s, gen));
    INFO("top_p " << top_p << ": " << counts[0] << " " << counts[1] << " " << counts[2] << " " << counts[3]);
    CHECK(counts[3] == 0);
    CHECK((counts[2] == 0) == (top_p == 0.75));
    CHECK(counts[0] > counts[1]);
    CHECK(counts[1] > 0);
  }
  s.temperature = 0;
  CHECK(qt::choose_next_token(at::tensor({1.0f, 3.0f, 3.0f}), s, gen) == 1);  // ties: the lowest id, as torch.argmax
  // Non-finite logits (a broken model): an error, greedy or sampled, not token 0 every step.
  const at::Tensor nan_logits = at::tensor({1.0f, std::numeric_limits<float>::quiet_NaN(), 3.0f});
  CHECK(has(error_of([&] { qt::choose_next_token(nan_logits, s, gen); }), "NaN or infinite"));
  s.temperature = 0.7;
  CHECK(has(error_of([&] { qt::choose_next_token(nan_logits, s, gen); }), "NaN or infinite"));
  s.temperature = 0;
  CHECK(has(error_of([&] { qt::generate_tokens(model, {}, o); }), "prompt"));
}

namespace {

// The cached forward against the whole forward pass: two rows of 11 and 6 tokens (the second left-padded by 5 with
// a token of its own), then 4 tokens a row one at a time; each new column's hidden state is the whole forward's at
// that position. The cache starts poisoned with NaN, so that a column read before it is written shows. `decoder`:
// the tokens one at a time through qt::Decoder, which reads every column of the cache, masked: poisoned with 1e4
// instead (finite, as make_kv_cache's zeros; a column it let through would show), and on CUDA its graph replayed.
void check_cached_forward(const qt::LlamaModel& model, double tol, bool decoder = false) {
  at::NoGradGuard no_grad;
  const int64_t V = model.config.vocab_size, L = 11, extra = 4;
  const std::vector<int64_t> lens{11, 6};
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(11);
  const at::Tensor seqs = at::randint(1, V, {2, L + extra}, gen, at::TensorOptions().dtype(at::kLong));
  qt::KvCache cache = qt::make_kv_cache(model, 2, L + extra);
  for (auto* side : {&cache.k, &cache.v})
    for (at::Tensor& t : *side) t.fill_(decoder ? 1e4 : std::numeric_limits<float>::quiet_NaN());
  at::Tensor ids = at::full({2, L}, 3, at::kLong), pos = at::zeros({2, L}, at::kLong);
  at::Tensor valid = at::zeros({2, L}, at::kBool);
  for (int64_t r = 0; r < 2; ++r) {
    const int64_t pad = L - lens[r];
    ids[r].narrow(0, pad, lens[r]).copy_(seqs[r].narrow(0, 0, lens[r]));
    pos[r].narrow(0, pad, lens[r]).copy_(at::arange(lens[r], at::kLong));
    valid[r].narrow(0, pad, lens[r]).fill_(true);
  }
  const at::Device dev = model.device();
  auto whole = [&](int64_t r, int64_t n) {  // the whole forward pass over row r's first n tokens: [n, H]
    return model.forward_hidden(model.embed(seqs[r].narrow(0, 0, n).unsqueeze(0).to(dev)))[0].to(at::kFloat);
  };
  const at::Tensor prefill = qt::forward_cached(model, cache, ids, pos, valid).to(at::kFloat);
  REQUIRE(cache.length == L);
  for (int64_t r = 0; r < 2; ++r) {
    INFO("row " << r << " prefill");
    const at::Tensor got = prefill[r].narrow(0, L - lens[r], lens[r]);
    CHECK(at::isfinite(got).all().item<bool>());
    CHECK(rel_err(got, whole(r, lens[r])) < tol);
  }
  std::unique_ptr<qt::Decoder> dec = decoder ? std::make_unique<qt::Decoder>(model, cache) : nullptr;
  for (int64_t t = 0; t < extra; ++t) {
    at::Tensor next = at::stack({seqs[0][lens[0] + t], seqs[1][lens[1] + t]}).view({2, 1});
    at::Tensor next_pos = at::tensor(std::vector<int64_t>{lens[0] + t, lens[1] + t}, at::kLong).view({2, 1});
    at::Tensor h;
    if (dec) {
      const at::Tensor ids_host = next.reshape({-1}).to(at::kCPU).contiguous();
      h = dec->step(std::vector<int64_t>(ids_host.data_ptr<int64_t>(), ids_host.data_ptr<int64_t>() + 2),
                    {lens[0] + t, lens[1] + t}, {1, 1})
              .to(at::kFloat);
      CHECK(dec->graphed() == dev.is_cuda());
    } else {
      h = qt::forward_cached(model, cache, next, next_pos, at::ones({2, 1}, at::kBool)).to(at::kFloat);
    }
    for (int64_t r = 0; r < 2; ++r) {
      INFO("row " << r << ", new token " << t << (decoder ? " (Decoder)" : ""));
      CHECK(rel_err(h[r][0], whole(r, lens[r] + t + 1)[lens[r] + t]) < tol);
    }
  }
  CHECK(cache.length == L + extra);
}

}  // namespace

TEST_CASE("the cached forward pass gives the whole forward pass's hidden states, rows left-padded, a token at a time",
          "[generate]") {
  for (const char* name : {"mistral_window", "qwen3", "bias", "qwen2_tied", "gqa_untied"}) {
    INFO(name);
    qt::LlamaModel model = qt::load_llama(fixture(std::string("llama/") + name + "/model"), {});
    REQUIRE(qt::kv_cache_applies(model));
    check_cached_forward(model, 1e-5);
    check_cached_forward(model, 1e-5, /*decoder=*/true);
  }
  // A plan that runs the MLP in chunks of 5 tokens: the prefill's 22 rows of columns go through them.
  {
    qt::LlamaModel model = qt::load_llama(fixture("llama/gqa_untied/model"), {});
    model.plan.mlp_chunk_tokens = 5;
    INFO("MLP in chunks of 5 tokens");
    check_cached_forward(model, 1e-5);
    qt::KvCache cache = qt::make_kv_cache(model, 1, 8);
    const int64_t before = model.stats->mlp_chunked_passes;
    qt::forward_cached(model, cache, at::full({1, 8}, 3, at::kLong), at::arange(8, at::kLong).view({1, 8}),
                       at::ones({1, 8}, at::kBool));
    CHECK(model.stats->mlp_chunked_passes > before);  // (the cached path itself chunked)
  }
  // The window is really crossed: 15 tokens against Mistral's 5.
  REQUIRE(*qt::load_llama(fixture("llama/mistral_window/model"), {}).config.sliding_window == 5);
  // NF4 bases with adapters: q / k / v as one projection (project_group) and RoPE in one call, Qwen3's norms in it;
  // DoRA and Qwen2's biases through the linears one by one.
  for (const auto& [base, adapter] : std::vector<std::pair<std::string, std::string>>{
           {"base_nf4", "all_targets"}, {"base_nf4", "dora_all"}, {"base_qwen3_nf4", "qwen3_all"},
           {"base_qwen2_nf4", "qwen2_all"}}) {
    INFO(base << " + " << adapter);
    qt::LlamaModel model = qt::load_llama(fixture("lora/" + base), nf4_load());
    qt::load_peft_adapter(model, fixture("lora/" + adapter + "/adapter"));
    check_cached_forward(model, 1e-5);
    check_cached_forward(model, 1e-5, /*decoder=*/true);
  }
  // Dynamic RoPE's frequencies follow the longest position: no cache there.
  CHECK(!qt::kv_cache_applies(qt::load_llama(fixture("llama/dynamic_rope/model"), {})));
}

TEST_CASE("generation through the cache, one prompt or several at once, gives the uncached generation's tokens",
          "[generate]") {
  qt::LlamaModel model = qt::load_llama(fixture("lora/base_nf4"), nf4_load());
  qt::load_peft_adapter(model, fixture("lora/all_targets/adapter"));
  const std::vector<std::vector<int32_t>> prompts = {{1, 17, 42, 9, 250, 33, 7}, {1, 5}, {1, 88, 12, 140}, {2, 3, 4}};
  qt::GenerateOptions o;
  o.max_new_tokens = 9;
  std::vector<qt::GenerateResult> want;
  for (const auto& p : prompts) want.push_back(qt::generate_tokens_uncached(model, p, o));
  // A stop id that one row meets early (the first prompt's third token): that row ends there, the others go on.
  o.stop_ids = {want[0].tokens[2]};
  want.clear();
  for (const auto& p : prompts) want.push_back(qt::generate_tokens_uncached(model, p, o));
  REQUIRE(want[0].stopped);
  REQUIRE(want[0].tokens.size() == 3);
  bool full_length = false;
  for (const auto& w : want) full_length = full_length || (!w.stopped && w.tokens.size() == 9);
  REQUIRE(full_length);
  for (int64_t batch_tokens : {int64_t{1}, int64_t{40}, int64_t{8192}}) {  // a prompt a batch, two batches, one
    INFO("batch_tokens " << batch_tokens);
    const std::vector<qt::GenerateResult> got = qt::generate_batch(model, prompts, o, batch_tokens);
    REQUIRE(got.size() == prompts.size());
    for (size_t i = 0; i < prompts.size(); ++i) {
      INFO("prompt " << i);
      CHECK(got[i].tokens == want[i].tokens);
      CHECK(got[i].stopped == want[i].stopped);
    }
  }
  for (size_t i = 0; i < prompts.size(); ++i) CHECK(qt::generate_tokens(model, prompts[i], o).tokens == want[i].tokens);
  // The model's context ends generation as before: 7 prompt tokens and 2 new ones in a context of 9.
  o.stop_ids.clear();
  o.max_seq_len = 9;
  CHECK(qt::generate_tokens(model, prompts[0], o).tokens.size() == 2);
  CHECK(qt::generate_batch(model, prompts, o)[0].tokens.size() == 2);
  CHECK(qt::generate_batch(model, prompts, o)[1].tokens.size() == 7);
  // Sampling draws the same tokens from the same seed (the same logits to float rounding); in a batch each row from
  // its own generator, so that a row's tokens do not depend on the other prompts.
  o.max_seq_len = 0;
  o.temperature = 0.8;
  o.top_p = 0.9;
  o.seed = 3;
  CHECK(qt::generate_tokens(model, prompts[0], o).tokens == qt::generate_tokens_uncached(model, prompts[0], o).tokens);
  const std::vector<qt::GenerateResult> sampled = qt::generate_batch(model, prompts, o);
  for (size_t i = 0; i < prompts.size(); ++i) {
    INFO("sampled prompt " << i);
    CHECK(sampled[i].tokens == qt::generate_tokens_uncached(model, prompts[i], o).tokens);
  }
  // Dynamic RoPE takes the uncached path.
  qt::LlamaModel dynamic = qt::load_llama(fixture("llama/dynamic_rope/model"), {});
  o.temperature = 0;
  o.max_new_tokens = 12;  // past its max_position_embeddings of 10, where the frequencies change
  CHECK(qt::generate_tokens(dynamic, {1, 2, 3}, o).tokens == qt::generate_tokens_uncached(dynamic, {1, 2, 3}, o).tokens);
}

TEST_CASE("the cached forward pass on CUDA gives the whole forward pass's hidden states in bf16 and fp32",
          "[generate][gpu]") {
  REQUIRE(at::hasCUDA());
  unsetenv("QT_GENERATE_GRAPHS");  // (the default: the decoding steps replayed from a CUDA graph)
  const at::Device cuda(at::kCUDA, 0);
  for (auto dtype : {at::kBFloat16, at::kFloat}) {
    const double tol = dtype == at::kFloat ? 1e-4 : 3e-2;
    for (const char* name : {"mistral_window", "qwen3", "bias", "gqa_untied"}) {
      INFO(name << (dtype == at::kFloat ? " fp32" : " bf16"));
      const qt::LlamaModel model = qt::load_llama(fixture(std::string("llama/") + name + "/model"), {cuda, dtype});
      check_cached_forward(model, tol);
      check_cached_forward(model, tol, /*decoder=*/true);  // (the steps after the first replay a CUDA graph)
    }
    qt::LoadOptions opt{cuda, dtype};
    opt.quantize_nf4 = true;
    qt::LlamaModel model = qt::load_llama(fixture("lora/base_nf4"), opt);
    qt::load_peft_adapter(model, fixture("lora/all_targets/adapter"));
    INFO("NF4 + LoRA");
    check_cached_forward(model, tol);
    check_cached_forward(model, tol, /*decoder=*/true);
  }
  // Generation times no GEMM problem (its shapes change with every batch and step) and keeps none. The control: a
  // forward pass outside generation on a new shape times its problems (while the process's budget of 256 lasts).
  qt::LoadOptions opt{cuda, at::kBFloat16};
  opt.quantize_nf4 = true;
  qt::LlamaModel model = qt::random_llama(qt::test::tiny_llama_config(512), opt, 3);
  qt::attach_lora(model, qt::LoraConfig{}, 4, cuda);
  model.set_training(false);
  const int64_t before = qt::kernels::gemm_tuner_counts().problems_tuned;
  {
    at::NoGradGuard no_grad;
    model.forward_hidden(model.embed(at::full({1, 96}, 7, at::kLong).to(cuda)));
  }
  const int64_t tuned = qt::kernels::gemm_tuner_counts().problems_tuned;
  INFO("problems tuned before the control " << before << ", after " << tuned);
  if (before < 240) CHECK(tuned > before);
  std::vector<std::vector<int32_t>> prompts;
  for (int32_t n : {70, 90, 130}) prompts.push_back(std::vector<int32_t>(n, 7));
  qt::GenerateOptions o;
  o.max_new_tokens = 3;
  qt::generate_batch(model, prompts, o);
  qt::generate_tokens_uncached(model, prompts[0], o);
  CHECK(qt::kernels::gemm_tuner_counts().problems_tuned == tuned);
  // The decoding steps replayed from a CUDA graph (the default) give the steps' tokens run one by one
  // (QT_GENERATE_GRAPHS=eager): the same kernels on the same inputs. forward_cached (=0) gives them too.
  o.max_new_tokens = 8;
  const std::vector<qt::GenerateResult> graphed = qt::generate_batch(model, prompts, o, 128);
  setenv("QT_GENERATE_GRAPHS", "eager", 1);
  const std::vector<qt::GenerateResult> eager = qt::generate_batch(model, prompts, o, 128);
  setenv("QT_GENERATE_GRAPHS", "0", 1);
  const std::vector<qt::GenerateResult> cached = qt::generate_batch(model, prompts, o, 128);
  unsetenv("QT_GENERATE_GRAPHS");
  for (size_t i = 0; i < prompts.size(); ++i) {
    INFO("prompt " << i);
    CHECK(graphed[i].tokens.size() == 8);
    CHECK(graphed[i].tokens == eager[i].tokens);
    CHECK(cached[i].tokens == eager[i].tokens);
  }
}

TEST_CASE("q, k, v as one projection on CUDA equal their separate LoRA linears in bf16 and fp32, with LoRA dropout "
          "too", "[lora][gpu]") {
  REQUIRE(at::hasCUDA());
  check_project_group(at::Device(at::kCUDA, 0), at::kFloat, 1e-5);
  check_project_group(at::Device(at::kCUDA, 0), at::kBFloat16, 1e-2);
  check_project_group(at::Device(at::kCUDA, 0), at::kFloat, 1e-5, /*concat_b=*/true);
  check_project_group(at::Device(at::kCUDA, 0), at::kBFloat16, 1e-2, /*concat_b=*/true);
  // LoRA dropout: the counter-based masks drawn again in the backward pass (the rank-r input gradient under its mask).
  check_project_group(at::Device(at::kCUDA, 0), at::kFloat, 1e-5, false, /*dropout=*/0.2);
  check_project_group(at::Device(at::kCUDA, 0), at::kBFloat16, 1e-2, /*concat_b=*/true, /*dropout=*/0.2);
}

// LoRA dropout's counter-based masks on CUDA under checkpointing: the recomputation, which puts the CUDA generator's
// state back, must draw the forward pass's masks again (its keys from the same seed and offsets), or the gradients
// would be those of other masks; so the loss and every LoRA gradient equal those without checkpointing, with the
// keep ladder's replay too. Another seed gives other gradients (the masks do act).
TEST_CASE("LoRA dropout on CUDA: checkpointing and the keep ladder give the gradients of no checkpointing (the "
          "recomputation draws the same masks)", "[lora][gpu]") {
  REQUIRE(at::hasCUDA());
  const at::Device cuda(at::kCUDA, 0);
  for (auto dtype : {at::kFloat, at::kBFloat16}) {
    const double tol = dtype == at::kFloat ? 1e-5 : 2e-2;
    auto run = [&](int plan, uint64_t seed) {
      return fixture_loss_and_grads(
          [&](qt::LlamaModel& m) {
            m.for_each_linear([](const std::string&, qt::Linear& l) {
              REQUIRE(l.lora);
              l.lora->dropout = 0.1;
            });
            m.set_training(true);
            m.plan.checkpointing = plan > 0;
            if (plan == 2) {
              m.plan.keep = qt::KeepLevel::Residual;
              m.plan.keep_dequantized = true;
            }
            at::manual_seed(seed);
          },
          cuda, dtype);
    };
    const std::vector<at::Tensor> plain = run(0, 11);
    REQUIRE(plain.size() > 10);
    for (int plan : {1, 2}) {
      INFO(c10::toString(dtype) << ", plan " << plan);
      const std::vector<at::Tensor> other = run(plan, 11);
      REQUIRE(other.size() == plain.size());
      for (size_t i = 0; i < plain.size(); ++i) {
        INFO("tensor " << i);
        CHECK(rel_err(other[i], plain[i]) < tol);
      }
    }
    const std::vector<at::Tensor> reseeded = run(0, 12);
    double largest = 0;
    for (size_t i = 1; i < plain.size(); ++i) largest = std::max(largest, rel_err(reseeded[i], plain[i]));
    CHECK(largest > 10 * tol);
  }
}

TEST_CASE("keep_qkv and keep_residual on CUDA (bf16, block inputs offloaded or not) give the gradients of the full "
          "recomputation", "[lora][gpu]") {
  REQUIRE(at::hasCUDA());
  for (bool offload : {false, true}) check_keep(at::Device(at::kCUDA, 0), at::kBFloat16, offload, 2e-2);
}

TEST_CASE("checkpointed blocks keeping their gate / up output on CUDA (bf16, block inputs offloaded or not, the outputs on "
          "the device or offloaded to the host) give the gradients of the full recomputation", "[lora][gpu]") {
  REQUIRE(at::hasCUDA());
  for (bool offload : {false, true}) check_gate_up_kept(at::Device(at::kCUDA, 0), at::kBFloat16, offload, 2e-2);
  for (bool offload : {false, true}) check_gate_up_kept_packed(at::Device(at::kCUDA, 0), at::kBFloat16, 2e-2, offload);
}

TEST_CASE("LoRA and DoRA on NF4 on CUDA in bf16 match PEFT within bf16 bounds, Llama, Qwen2 and Qwen3, with the "
          "plan's checkpointing, offload and keep ladder",
          "[lora][dora][qwen][gpu]") {
  REQUIRE(at::hasCUDA());
  const std::pair<const char*, const char*> cases[] = {
      {"base_nf4", "all_targets"}, {"base_nf4", "dora_all"}, {"base_qwen2_nf4", "qwen2_all"}, {"base_qwen3_nf4", "qwen3_all"}};
  for (const auto& [base, name] : cases) {
    INFO(name);
    qt::LoadOptions opt{at::Device(at::kCUDA, 0), at::kBFloat16};
    opt.quantize_nf4 = true;
    qt::LlamaModel model = qt::load_llama(fixture(std::string("lora/") + base), opt);
    const qt::PeftAdapterConfig cfg = qt::load_peft_adapter(model, fixture(std::string("lora/") + name + "/adapter"));
    qt::SafetensorsFile ref(fixture(std::string("lora/") + name + "/reference.safetensors"));
    at::Tensor ids = ref.load("input_ids", at::kLong, at::kCUDA);
    at::Tensor labels = ref.load("labels", at::kLong, at::kCUDA);
    // 0: no checkpointing; 1: checkpointing; 2: checkpointing, inputs offloaded, q / k / v and the residual kept.
    for (int plan : {0, 1, 2}) {
      INFO("plan " << plan);
      model.plan.checkpointing = plan > 0;
      model.plan.offload = plan == 2;
      model.plan.keep = plan == 2 ? qt::KeepLevel::Residual : qt::KeepLevel::Input;
      model.stats->qkv_replays = 0;
      auto params = qt::lora_parameters(model);
      for (auto& [key, t] : params)
        if (t.grad().defined()) t.mutable_grad().zero_();
      at::Tensor loss = causal_lm_loss(model, ids, labels);
      loss.backward();
      CHECK(rel_err(loss, ref.view("loss")) < 2e-2);
      for (auto& [key, t] : params) {
        INFO(key);
        REQUIRE(t.grad().defined());
        CHECK(t.grad().scalar_type() == at::kFloat);
        CHECK(rel_err(t.grad(), ref.view("grad." + key)) < 8e-2);
      }
      // Plain LoRA: q / k / v ran as one projection, replayed from the kept tensors (biases and norms included).
      if (plan == 2 && !cfg.lora.use_dora) CHECK(model.stats->qkv_replays == model.config.num_hidden_layers);
    }
  }
}

namespace {
// The fixture model under checkpointing with its block weights streamed from the host (StreamedWeights) against
// the same model with them in place: the same loss and LoRA gradients bit for bit; no streamed block's weights on
// the device once the step is done, each streamed block fetched once for its forward pass and once for its
// recomputation, the slots holding the host copies in between; the resident blocks' on the device throughout.
// `streamed`: how many blocks stream (< 0: all).
void check_streamed_weights(const at::Device& device, c10::ScalarType dtype, int64_t streamed = -1) {
  INFO(device << " " << c10::toString(dtype) << ", streamed blocks " << streamed);
  auto checkpointed = [](qt::LlamaModel& m) { m.plan.checkpointing = true; };
  const std::vector<at::Tensor> kept = fixture_loss_and_grads(checkpointed, device, dtype);
  std::unique_ptr<qt::StreamedWeights> streamed_weights;
  int64_t layers = 0;
  const std::vector<at::Tensor> fetched = fixture_loss_and_grads(
      [&](qt::LlamaModel& m) {
        checkpointed(m);
        layers = m.config.num_hidden_layers;
        streamed_weights = std::make_unique<qt::StreamedWeights>(m, streamed);
        CHECK(streamed_weights->block_bytes() > 0);
        CHECK(streamed_weights->blocks_on_device() == 0);
        CHECK(streamed_weights->streamed_blocks() == (streamed < 0 ? layers : streamed));
        if (device.is_cuda()) CHECK(m.layers[layers - 1].q_proj.nf4->data.packed.is_pinned());  // the last streams
      },
      device, dtype,
      [&](qt::LlamaModel& m) {
        const int64_t n = streamed < 0 ? layers : streamed;
        CHECK(streamed_weights->blocks_on_device() == 0);
        CHECK(streamed_weights->fetches() == 2 * n);
        CHECK(m.layers[layers - 1].down_proj.nf4->data.packed.device().is_cpu());
        for (int64_t i = 0; i < layers; ++i)
          if (!qt::streamed_block(i, n, layers)) {
            INFO("resident block " << i);
            CHECK(m.layers[i].down_proj.nf4->data.packed.device() == device);
          }
        streamed_weights.reset();  // before the model goes
      });
  REQUIRE(kept.size() == fetched.size());
  CHECK(kept.size() > 10);
  for (size_t i = 0; i < kept.size(); ++i) {
    INFO("tensor " << i);
    CHECK(kept[i].abs().max().item<double>() > 0);
    CHECK(qt::test::same_bits(fetched[i], kept[i]));
  }
}
}  // namespace

// Two steps' loss and LoRA gradients (the B factors moved between them, as the optimizer moves them: the held
// gate / up buffer carries them in its extra columns) under `setup`, with the model's stats.
std::vector<at::Tensor> two_steps(const std::function<void(qt::LlamaModel&)>& setup, const at::Device& device,
                                  c10::ScalarType dtype, std::shared_ptr<qt::ModelStats>* stats) {
  qt::LlamaModel m = fixture_model(device, dtype);
  setup(m);
  *stats = m.stats;
  qt::SafetensorsFile ref(fixture("lora/all_targets/reference.safetensors"));
  const at::Tensor ids = ref.load("input_ids", at::kLong, device), labels = ref.load("labels", at::kLong, device);
  std::vector<at::Tensor> out;
  for (int step = 0; step < 2; ++step) {
    at::Tensor loss = causal_lm_loss(m, ids, labels);
    loss.backward();
    out.push_back(loss.detach().to(at::kFloat));
    auto params = qt::lora_parameters(m);
    for (auto& [key, t] : params) out.push_back(t.grad().to(at::kFloat).clone());
    at::NoGradGuard no_grad;
    int64_t i = 0;
    for (auto& [key, t] : params) {
      t.mutable_grad().zero_();
      if (key.find("lora_B") != std::string::npos)
        t.add_(at::sin(at::arange(t.numel(), t.options()).view(t.sizes()) + static_cast<double>(++i)) * 0.01);
    }
  }
  return out;
}

void check_held_weights(const at::Device& device, c10::ScalarType dtype, bool checkpointing, bool exact) {
  INFO(device << " " << c10::toString(dtype) << ", checkpointing " << checkpointing);
  std::shared_ptr<qt::ModelStats> plain_stats, held_stats;
  int64_t weights = 0, layers = 0;
  const std::vector<at::Tensor> plain = two_steps(
      [&](qt::LlamaModel& m) {
        m.plan.checkpointing = checkpointing;
        m.for_each_linear([&](const std::string&, qt::Linear&) { ++weights; });
        layers = m.config.num_hidden_layers;
      },
      device, dtype, &plain_stats);
  const std::vector<at::Tensor> held = two_steps(
      [&](qt::LlamaModel& m) {
        m.plan.checkpointing = checkpointing;
        m.plan.dequantized_blocks = layers;
        m.hold_dequantized(layers);
        m.for_each_linear([&](const std::string& n, qt::Linear& l) {
          INFO(n);
          CHECK(l.held);
          CHECK(!l.held->weight.defined());  // made on first use
        });
      },
      device, dtype, &held_stats);
  // Each weight dequantized once for the run, against about twice (three times checkpointed) a step: the forward
  // pass, the backward pass where an input gradient is needed (not the first block's q / k / v), the recomputation.
  REQUIRE(weights > 0);
  CHECK(plain_stats->dequantized_weights >= 2 * (2 * weights - 3));
  CHECK(held_stats->dequantized_weights == weights);
  REQUIRE(plain.size() == held.size());
  CHECK(plain.size() > 20);
  for (size_t i = 0; i < plain.size(); ++i) {
    INFO("tensor " << i);
    CHECK(plain[i].abs().max().item<double>() > 0);
    if (exact) CHECK(qt::test::same_bits(held[i], plain[i]));
    else CHECK(rel_err(held[i], plain[i]) < 2e-2);
  }
  // hold_dequantized(0) lets go of them; a block count holds those blocks only.
  qt::LoadOptions opt{device, dtype};
  opt.quantize_nf4 = true;
  qt::LlamaModel m = qt::load_llama(fixture("lora/base_nf4"), opt);
  m.hold_dequantized(1);
  CHECK(m.layers[0].gate_proj.held);
  CHECK(!m.layers[1].gate_proj.held);
  m.hold_dequantized(0);
  CHECK(!m.layers[0].gate_proj.held);
}

TEST_CASE("blocks holding their weights dequantized give the loss and LoRA gradients of weights dequantized in each "
          "pass, bit for bit, over two steps with the LoRA factors moved; each weight dequantized once",
          "[lora]") {
  check_held_weights(at::kCPU, at::kFloat, false, true);
  check_held_weights(at::kCPU, at::kFloat, true, true);
}

TEST_CASE("blocks holding their weights dequantized on CUDA give the loss and LoRA gradients of weights dequantized "
          "in each pass",
          "[lora][gpu]") {
  REQUIRE(at::hasCUDA());
  check_held_weights(at::Device(at::kCUDA, 0), at::kBFloat16, false, false);
  check_held_weights(at::Device(at::kCUDA, 0), at::kBFloat16, true, false);
}

TEST_CASE("block weights streamed from the host, all blocks or some, give the loss and LoRA gradients of weights in "
          "place, bit for bit; without checkpointing they are refused",
          "[lora]") {
  check_streamed_weights(at::kCPU, at::kFloat);
  check_streamed_weights(at::kCPU, at::kFloat, 1);
  fixture_loss_and_grads([](qt::LlamaModel& m) {
    m.plan.checkpointing = false;
    CHECK(qt::test::has(error_of([&] { qt::StreamedWeights s(m); }), "checkpointed"));
    m.plan.checkpointing = true;
    m.plan.blocks_without_checkpointing = 1;
    CHECK(qt::test::has(error_of([&] { qt::StreamedWeights s(m); }), "checkpointed"));
    m.plan.blocks_without_checkpointing = 0;
  });
}

TEST_CASE("block weights streamed from pinned host memory on CUDA (fetched a block ahead on a side stream) give the "
          "loss and LoRA gradients of weights on the GPU, bit for bit",
          "[lora][gpu]") {
  REQUIRE(at::hasCUDA());
  check_streamed_weights(at::Device(at::kCUDA, 0), at::kBFloat16);
  check_streamed_weights(at::Device(at::kCUDA, 0), at::kBFloat16, 1);
}

namespace {

// A small NF4 model with head_dim 64 (a shape cuDNN takes grouped K / V in; `hidden` / 64 heads, half as many K / V
// heads, 2 `hidden` MLP width), LoRA on every linear with its B drawn
// (every factor gets a gradient), frozen embeddings (the first checkpointed block's node anchored by an empty leaf):
// one row of S tokens, its hidden states against fixed weights. Returns the hidden states and every LoRA gradient;
// `padded`: the forward passes that padded the row (plan.row_multiple).
std::vector<at::Tensor> one_long_row(const at::Device& device, c10::ScalarType dtype, int64_t S,
                                     const std::function<void(qt::LlamaModel&)>& setup, int64_t* padded,
                                     const std::vector<std::string>& targets = qt::lora_target_names(),
                                     int64_t hidden = 256) {
  qt::LlamaConfig c = qt::test::tiny_llama_config(300);
  c.hidden_size = hidden;
  c.intermediate_size = 2 * hidden;
  c.head_dim = 64;
  c.num_attention_heads = hidden / 64;
  c.num_key_value_heads = hidden / 128;
  qt::LoadOptions opt{device, dtype};
  opt.quantize_nf4 = true;
  qt::LlamaModel model = qt::random_llama(c, opt, 3);
  qt::LoraConfig lora;
  lora.r = 8;
  lora.targets = targets;
  qt::attach_lora(model, lora, 4, device);
  at::manual_seed(5);
  model.for_each_linear([&](const std::string&, qt::Linear& l) {
    at::NoGradGuard g;
    if (l.lora) l.lora->B.copy_(at::randn(l.lora->B.sizes()) * 0.05);
  });
  setup(model);
  const at::Tensor ids = at::randint(0, c.vocab_size, {1, S}, at::kLong).to(device);
  const at::Tensor w = at::randn({1, S, c.hidden_size}).to(device);
  at::Tensor h = model.forward_hidden(model.embed(ids));
  REQUIRE(h.size(1) == S);
  (h.to(at::kFloat) * w).sum().backward();
  *padded = model.stats->padded_runs;
  std::vector<at::Tensor> out{h.detach().to(at::kFloat).cpu()};
  model.for_each_linear([&](const std::string& name, qt::Linear& l) {
    if (!l.lora) return;
    INFO(name);
    REQUIRE(l.lora->A.grad().defined());
    out.push_back(l.lora->A.grad().to(at::kFloat).cpu());
    out.push_back(l.lora->B.grad().to(at::kFloat).cpu());
  });
  return out;
}

// one_long_row's hidden states and LoRA gradients for 256 tokens of a model 1,024 wide (the width the CUDA paths
// of the groups' concatenated inputs take) in bf16 on CUDA, with the environment switch `name` at `value` and
// checkpointing on or off; `stats` gets the model's counters.
std::vector<at::Tensor> wide_cuda_row(const char* name, const char* value, bool checkpointing,
                                      std::shared_ptr<qt::ModelStats>& stats) {
  REQUIRE(at::hasCUDA());
  const qt::test::ScopedEnv env(name, value);
  int64_t padded = 0;
  return one_long_row(
      at::Device(at::kCUDA, 0), at::kBFloat16, 256,
      [&](qt::LlamaModel& m) {
        REQUIRE(m.config.num_hidden_layers == 2);
        m.plan.checkpointing = checkpointing;
        stats = m.stats;
      },
      &padded, qt::lora_target_names(), 1024);
}

}  // namespace

// The norms writing into the groups' concatenated inputs on CUDA, where the inputs' width is a multiple of the
// strided dequantization's 1,024 columns (the fixture's 64 is not: there the inputs are copied): hidden 1,024, bf16,
// against the inputs copied, with and without checkpointing, the inputs built in place counted.
TEST_CASE("on CUDA the norms writing into the LoRA groups' concatenated inputs give the hidden states and gradients "
          "of a copy",
          "[lora][gpu]") {
  for (bool checkpointing : {false, true}) {
    INFO("checkpointing " << checkpointing);
    std::shared_ptr<qt::ModelStats> stats;
    auto run = [&](const char* value) { return wide_cuda_row("QT_NORM_INTO_CONCAT", value, checkpointing, stats); };
    const std::vector<at::Tensor> into = run(nullptr);
    CHECK(stats->concat_inputs_in_place == (checkpointing ? 8 : 4));
    const std::vector<at::Tensor> copied = run("0");
    CHECK(stats->concat_inputs_in_place == 0);
    check_same_loss_and_grads(into, copied, 2e-2);
  }
}

// The forward products through the fused NF4 GEMM (QT_NF4_GEMM=1: the weights dequantized inside the GEMM, the
// groups' LoRA B terms as its last columns) against dequantization then cuBLAS: a model 1,024 wide in bf16 on a Hopper
// GPU (the kernel's), the hidden states and LoRA gradients within bf16's rounding, the fused products counted (the
// q / k / v and gate / up groups, o_proj and down_proj of both blocks in the forward pass), none with the switch off;
// with the kernel's default and with its variant 8 (W decoded into registers, a persistent grid: QT_NF4_GEMM_VARIANT).
TEST_CASE("on a Hopper GPU the fused NF4 GEMM gives the hidden states and LoRA gradients of dequantization then "
          "cuBLAS",
          "[lora][gpu][nf4_gemm]") {
  for (const char* variant : {static_cast<const char*>(nullptr), "8"}) {
    for (bool checkpointing : {false, true}) {
      INFO("variant " << (variant ? variant : "default") << " checkpointing " << checkpointing);
      const qt::test::ScopedEnv pick("QT_NF4_GEMM_VARIANT", variant);
      std::shared_ptr<qt::ModelStats> stats;
      auto run = [&](const char* value) { return wide_cuda_row("QT_NF4_GEMM", value, checkpointing, stats); };
      const std::vector<at::Tensor> fused = run("1");
      CHECK(stats->nf4_gemm_runs >= 8);
      const std::vector<at::Tensor> apart = run(nullptr);
      CHECK(stats->nf4_gemm_runs == 0);
      check_same_loss_and_grads(fused, apart, 2e-2);
    }
  }
}

TEST_CASE("a row padded at its end for cuDNN (plan.row_multiple) gives the hidden states and LoRA gradients of the "
          "row as it is, with checkpointing, the MLP in chunks and the attention output kept",
          "[lora]") {
  for (int variant = 0; variant < 4; ++variant) {
    INFO("variant " << variant);
    auto setup = [&](int64_t multiple) {
      return [=](qt::LlamaModel& m) {
        m.plan.row_multiple = multiple;
        m.plan.checkpointing = variant > 0;
        if (variant >= 2) m.plan.keep = qt::KeepLevel::Attention;
        if (variant == 3) m.plan.mlp_chunk_tokens = 300;
      };
    };
    // 1,030 tokens, at least 64 x 16: padded to 1,040 (a multiple of 16); 1,024 is one already.
    int64_t padded = -1, as_is = -1, whole = -1;
    const std::vector<at::Tensor> a = one_long_row(at::kCPU, at::kFloat, 1030, setup(1), &as_is);
    const std::vector<at::Tensor> b = one_long_row(at::kCPU, at::kFloat, 1030, setup(16), &padded);
    one_long_row(at::kCPU, at::kFloat, 1024, setup(16), &whole);
    CHECK(as_is == 0);
    CHECK(padded == 1);
    CHECK(whole == 0);
    REQUIRE(a.size() == b.size());
    CHECK(a.size() == 29);  // the hidden states, A and B of 14 linears
    for (size_t i = 0; i < a.size(); ++i) {
      INFO("tensor " << i);
      CHECK(a[i].abs().max().item<double>() > 0);
      CHECK(rel_err(b[i], a[i]) < 1e-5);
    }
  }
  CHECK(qt::padded_row_length(1030, 16) == 1040);
  CHECK(qt::padded_row_length(1000, 16) == 1000);  // under 64 x 16 tokens: as it is
  CHECK(qt::padded_row_length(117696, 128) == 117760);
  CHECK(qt::padded_row_length(8192, 128) == 8192);
  CHECK(qt::padded_row_length(8200, 1) == 8200);
}

TEST_CASE("LoRA on the MLP alone, in chunks under checkpointing over frozen embeddings: the first block's MLP gets "
          "its gradients (its chunked node anchored where nothing before it requires grad)",
          "[lora]") {
  const std::vector<std::string> mlp{"gate_proj", "up_proj", "down_proj"};
  int64_t padded = -1;
  auto setup = [](int64_t chunk) {
    return [=](qt::LlamaModel& m) {
      m.plan.checkpointing = true;
      m.plan.mlp_chunk_tokens = chunk;
    };
  };
  const std::vector<at::Tensor> whole = one_long_row(at::kCPU, at::kFloat, 100, setup(0), &padded, mlp);
  const std::vector<at::Tensor> chunked = one_long_row(at::kCPU, at::kFloat, 100, setup(30), &padded, mlp);
  REQUIRE(whole.size() == chunked.size());
  CHECK(whole.size() == 13);  // the hidden states, A and B of 3 linears in 2 blocks
  for (size_t i = 0; i < whole.size(); ++i) {
    INFO("tensor " << i);
    CHECK(whole[i].abs().max().item<double>() > 0);
    CHECK(rel_err(chunked[i], whole[i]) < 1e-5);
  }
}

TEST_CASE("a row padded for cuDNN on CUDA (grouped K / V at 8,320 tokens) gives the hidden states and LoRA gradients "
          "of the row as it is (K / V expanded at 8,200); offloaded, the embedding output is let go after the forward "
          "pass",
          "[lora][gpu]") {
  REQUIRE(at::hasCUDA());
  const at::Device cuda(at::kCUDA, 0);
  auto setup = [](int64_t multiple) {
    return [=](qt::LlamaModel& m) {
      m.plan.row_multiple = multiple;
      m.plan.attention = qt::AttentionKernel::Cudnn;
      m.plan.checkpointing = m.plan.offload = true;
      m.plan.keep = qt::KeepLevel::Attention;
    };
  };
  int64_t padded = -1, as_is = -1;
  const std::vector<at::Tensor> a = one_long_row(cuda, at::kBFloat16, 8200, setup(1), &as_is);
  const std::vector<at::Tensor> b = one_long_row(cuda, at::kBFloat16, 8200, setup(128), &padded);
  CHECK(as_is == 0);
  CHECK(padded == 1);
  REQUIRE(a.size() == b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    INFO("tensor " << i);
    CHECK(a[i].abs().max().item<double>() > 0);
    CHECK(rel_err(b[i], a[i]) < 3e-2);
  }
  // The first block's input offloaded with the others: once the caller lets go of the embedding output, nothing
  // holds it (the leaf made of it until the tenth session held it through the backward pass).
  qt::LlamaConfig c = qt::test::tiny_llama_config(300);
  qt::LoadOptions opt{cuda, at::kBFloat16};
  opt.quantize_nf4 = true;
  qt::LlamaModel model = qt::random_llama(c, opt, 3);
  qt::attach_lora(model, qt::LoraConfig{}, 4, cuda);
  setup(1)(model);
  at::Tensor e = model.embed(at::randint(0, c.vocab_size, {1, 4096}, at::kLong).to(cuda));
  const c10::weak_intrusive_ptr<c10::StorageImpl> weak(e.storage().getWeakStorageImpl());
  at::Tensor h = model.forward_hidden(e);
  e = at::Tensor();
  CHECK(weak.expired());
  h.to(at::kFloat).sum().backward();
  bool graded = false;
  model.for_each_linear([&](const std::string&, qt::Linear& l) { graded = graded || l.lora->B.grad().defined(); });
  CHECK(graded);
}

TEST_CASE("a recomputation's unread outputs hold one element: unwritten_output, and unused_sum's gradient goes to "
          "both sides as a sum's",
          "[lora]") {
  const at::Tensor u = qt::unwritten_output({3, 1000, 64}, at::TensorOptions().dtype(at::kBFloat16));
  CHECK(u.sizes() == at::IntArrayRef({3, 1000, 64}));
  CHECK(u.storage().nbytes() == 2);
  at::manual_seed(9);
  const at::Tensor a = at::randn({4, 5}).requires_grad_(true), b = at::randn({4, 5}).requires_grad_(true);
  const at::Tensor g = at::randn({4, 5});
  const at::Tensor s = qt::unused_sum(a, b);
  CHECK(s.storage().nbytes() == 4);
  s.backward(g);
  CHECK(at::equal(a.grad(), g));
  CHECK(at::equal(b.grad(), g));
  CHECK(qt::test::has(qt::test::error_of([&] { qt::unused_sum(a, at::randn({4, 6})); }), "differ in shape"));
}

namespace {

// Live CPU bytes, counted by an allocator installed for one test (c10::SetCPUAllocator; the one before it is put back).
struct LiveBytes final : c10::Allocator {
  std::atomic<int64_t> live{0};
  std::mutex mu;
  std::map<void*, size_t> sizes;
  static LiveBytes* self;
  static void del(void* p) {
    {
      std::lock_guard<std::mutex> l(self->mu);
      auto it = self->sizes.find(p);
      if (it != self->sizes.end()) self->live -= static_cast<int64_t>(it->second), self->sizes.erase(it);
    }
    c10::free_cpu(p);
  }
  c10::DataPtr allocate(size_t n) override {
    void* p = c10::alloc_cpu(n ? n : 1);
    std::lock_guard<std::mutex> l(mu);
    sizes[p] = n;
    live += static_cast<int64_t>(n);
    return {p, p, &LiveBytes::del, c10::Device(c10::DeviceType::CPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &LiveBytes::del; }
  void copy_data(void* d, const void* s, std::size_t n) const override { std::memcpy(d, s, n); }
};
LiveBytes* LiveBytes::self = nullptr;

}  // namespace

TEST_CASE("with the attention output kept on the device, a checkpointed block's recomputation is let go once its "
          "backward pass is done (it lived to the end of the step: 2 H a token more with each block done)",
          "[lora]") {
  qt::LlamaConfig c = qt::test::tiny_llama_config(300);
  c.num_hidden_layers = 6;
  qt::LoadOptions opt{at::kCPU, at::kFloat};
  opt.quantize_nf4 = true;
  qt::LlamaModel model = qt::random_llama(c, opt, 3);
  qt::attach_lora(model, qt::LoraConfig{}, 4, at::kCPU);
  model.plan.checkpointing = true;
  model.plan.offload = false;
  model.plan.keep = qt::KeepLevel::Attention;
  model.set_training(true);
  const int64_t S = 2048;
  const at::Tensor ids = at::randint(0, c.vocab_size, {1, S}, at::kLong);

  // Never destroyed: tensors made under it (the LoRA gradients) are freed through it after the test.
  static LiveBytes& counter = *new LiveBytes;
  LiveBytes::self = &counter;
  counter.live = 0;
  c10::Allocator* before = c10::GetCPUAllocator();
  c10::SetCPUAllocator(&counter, /*priority=*/255);
  struct Restore {
    c10::Allocator* a;
    ~Restore() { c10::SetCPUAllocator(a, 255); }
  } restore{before};
  // Live bytes as each block's backward pass starts: block L - 1 first, block 0 last.
  struct Hooks : qt::BlockHooks {
    LiveBytes* counter;
    std::vector<int64_t> at_start;
    void before_block(size_t, bool backward) override {
      if (backward) at_start.push_back(counter->live.load());
    }
    void after_block(size_t, bool) override {}
  } hooks;
  hooks.counter = &counter;
  model.block_hooks = &hooks;
  at::Tensor h = model.forward_hidden(model.embed(ids));
  h.sum().backward();
  model.block_hooks = nullptr;
  REQUIRE(hooks.at_start.size() == static_cast<size_t>(c.num_hidden_layers));
  // Each block done lets go of its saved input (and keeps its kept attention output, saved for the step): what is
  // live as a block starts falls from the first block back to the last, by about 1 H a token a block; it grew by
  // about that much a block while each block's recomputed input and its gradient stayed alive.
  const double H = static_cast<double>(S * c.hidden_size * 4);
  for (size_t i = 1; i < hooks.at_start.size(); ++i) {
    INFO("block " << c.num_hidden_layers - 1 - static_cast<int64_t>(i) << ": " << hooks.at_start[i] / H << " H against "
                  << hooks.at_start[i - 1] / H << " H at the block before");
    CHECK(hooks.at_start[i] < hooks.at_start[i - 1]);
  }
}

TEST_CASE("exact match over ranks: each share answers its records (index modulo the ranks), and the shares' counts "
          "sum to the whole's",
          "[generate]") {
  const auto tok = qt::load_tokenizer(fixture("data/llama3"));
  qt::LlamaModel model = qt::random_llama(qt::test::tiny_llama_config(tok->vocab_size()), {at::kCPU, at::kFloat}, 4);
  qt::DataConfig data;
  data.format = qt::RecordFormat::Alpaca;
  data.max_seq_len = 256;
  // The model's own greedy answers (its three examples) become the expected answers of records 0 and 1.
  const qt::ExactMatchResult first = qt::exact_match(model, *tok, data, fixture("data/alpaca_llama3.jsonl"), 3, 2);
  REQUIRE(first.samples.size() == 3);
  const std::string path = qt::test::scratch_dir("exact_match_shares") + "/em.jsonl";
  {
    std::ifstream in(fixture("data/alpaca_llama3.jsonl"));
    std::ofstream out(path);
    std::string line;
    for (size_t i = 0; std::getline(in, line) && i < 3; ++i) {
      qt::Json j = qt::Json::parse(line);
      const std::string& s = first.samples[i];
      j["output"] = i < 2 ? s.substr(1, s.find("' (expected '") - 1) : std::string("not this answer");
      out << j.dump() << "\n";
    }
  }
  const qt::ExactMatchResult whole = qt::exact_match(model, *tok, data, path, 3, 2);
  const qt::ExactMatchResult r0 = qt::exact_match(model, *tok, data, path, 3, 2, 0, 2);
  const qt::ExactMatchResult r1 = qt::exact_match(model, *tok, data, path, 3, 2, 1, 2);
  CHECK(whole.total == 3);
  CHECK(whole.correct == 2);
  CHECK(r0.total == 2);  // records 0 and 2
  CHECK(r0.correct == 1);
  CHECK(r1.total == 1);  // record 1
  CHECK(r1.correct == 1);
}

TEST_CASE("exact match stops an answer at its format's end of turn: ChatML's <|im_end|> beside a base model's EOS, a "
          "custom format's special suffix",
          "[generate]") {
  const auto qwen = qt::load_tokenizer(fixture("data/qwen"));
  const int32_t im_end = qwen->token_to_id("<|im_end|>"), endoftext = qwen->token_to_id("<|endoftext|>");
  REQUIRE(im_end >= 0);
  REQUIRE(endoftext >= 0);
  qt::DataConfig data;
  data.format = qt::RecordFormat::Chat;
  auto has_id = [](const std::vector<int32_t>& ids, int32_t id) {
    return std::find(ids.begin(), ids.end(), id) != ids.end();
  };
  // (Qwen's and SmolLM2's base models end text with <|endoftext|>, their ChatML answers with <|im_end|>; exact match
  // used to stop at EOS and Llama 3's tokens only, so such an answer ran on to max_new_tokens and never matched.)
  for (const char* dir : {"data/qwen", "data/qwen2", "data/qwen3", "data/smollm2"}) {
    INFO(dir);
    const auto tok = qt::load_tokenizer(fixture(dir));
    const int32_t id = tok->token_to_id("<|im_end|>");
    REQUIRE(id >= 0);
    CHECK(has_id(qt::answer_stop_ids(*tok, data), id));
    CHECK(has_id(qt::answer_stop_ids(*tok, data), tok->eos_id()));
  }
  CHECK(!has_id(qt::answer_stop_ids(*qwen, data), endoftext));
  // A base model's directory: EOS <|endoftext|> (Qwen2.5's), the answers still end at <|im_end|>.
  const std::string base = qt::test::scratch_dir("qwen_base_tokenizer");
  {
    std::ifstream in(fixture("data/qwen/tokenizer.json"), std::ios::binary);
    std::ofstream(base + "/tokenizer.json", std::ios::binary) << in.rdbuf();
    qt::Json config = qt::Json::parse(std::ifstream(fixture("data/qwen/tokenizer_config.json")));
    config["eos_token"] = "<|endoftext|>";
    std::ofstream(base + "/tokenizer_config.json") << config.dump();
  }
  const auto base_tok = qt::load_tokenizer(base);
  REQUIRE(base_tok->eos_id() == endoftext);
  CHECK(has_id(qt::answer_stop_ids(*base_tok, data), im_end));
  data.chat_template = qt::ChatTemplateChoice::Custom;
  data.chat_format.assistant_suffix = "<|endoftext|>\n";
  CHECK(has_id(qt::answer_stop_ids(*qwen, data), endoftext));
  const size_t builtin = qt::answer_stop_ids(*qwen, qt::DataConfig{}).size();
  data.chat_format.assistant_suffix = "\n### End\n";  // plain text: no id of its own
  CHECK(qt::answer_stop_ids(*qwen, data).size() == builtin);
}

TEST_CASE("exact match reads ShareGPT conversations and compares answers without their <think> block",
          "[generate]") {
  const auto tok = qt::load_tokenizer(fixture("data/llama3"));
  qt::LlamaModel model = qt::random_llama(qt::test::tiny_llama_config(tok->vocab_size()), {at::kCPU, at::kFloat}, 4);
  qt::DataConfig data;
  data.format = qt::RecordFormat::Chat;
  data.max_seq_len = 256;
  const std::string dir = qt::test::scratch_dir("exact_match_sharegpt");
  const auto write = [&](const std::string& name, const std::vector<std::string>& answers) {
    std::ofstream out(dir + "/" + name);
    for (size_t i = 0; i < answers.size(); ++i)
      out << qt::Json{{"conversations",
                       {{{"from", "human"}, {"value", "question " + std::to_string(i)}},
                        {{"from", "gpt"}, {"value", answers[i]}}}}}
                 .dump()
          << "\n";
    return dir + "/" + name;
  };
  // The model's own greedy answers, then records whose answers are those after a reasoning block (two of three).
  const qt::ExactMatchResult first = qt::exact_match(model, *tok, data, write("a.jsonl", {"x", "y", "z"}), 3, 2);
  REQUIRE(first.samples.size() == 3);
  std::vector<std::string> answers;
  for (size_t i = 0; i < 3; ++i) {
    const std::string& s = first.samples[i];
    answers.push_back(i < 2 ? "<think>\nreasoning " + std::to_string(i) + "\n</think>\n\n" +
                                  s.substr(1, s.find("' (expected '") - 1)
                            : std::string("not this answer"));
  }
  const qt::ExactMatchResult r = qt::exact_match(model, *tok, data, write("b.jsonl", answers), 3, 2);
  INFO(r.samples[0] << " | " << r.samples[1] << " | " << r.samples[2]);
  CHECK(r.total == 3);
  CHECK(r.correct == 2);
}
