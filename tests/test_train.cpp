// Training-loop pieces against torch and transformers: AdamW, LR schedules, clipping, checkpointing, config.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/core/AllocatorConfig.h>
#include <c10/cuda/CUDACachingAllocator.h>

#include <map>

#include "lib/core/error.h"
#include "lib/core/files.h"
#include "lib/core/safetensors.h"
#include "lib/model/hf_loader.h"
#include "lib/dist/parallel.h"
#include "lib/kernels/adamw_8bit.h"
#include "lib/train/adamw.h"
#include "lib/train/lr_schedule.h"
#include "lib/train/neftune.h"
#include "lib/model/lora.h"
#include "lib/train/run_config.h"
#include "lib/train/train_stages.h"
#include "lib/train/trainer.h"
#include "tests/catch.h"
#include "tests/test_util.h"

using qt::test::fixture;
using qt::test::rel_err;
using qt::test::error_of;
using qt::test::has;

namespace {
// AdamW over the fixture's steps on `device` (its state there or on the host), with a skipped step (found_inf)
// after the second: the parameter after each step and the final state against torch.optim.AdamW's.
void check_adamw_against_torch(const at::Device& device, bool state_on_host) {
  INFO(device << (state_on_host ? ", state on the host" : ""));
  qt::SafetensorsFile ref(fixture("train/adamw.safetensors"));
  at::Tensor p = ref.load("p0", at::kFloat, device).requires_grad_(true);
  qt::AdamW opt({{"p", p}}, {0.9, 0.95, 1e-8, 0.1}, state_on_host);
  CHECK(opt.state_on_host() == state_on_host);
  for (int i = 0; i < 4; ++i) {
    if (i == 2) {  // an overflowing step (fp16 loss scaling): nothing moves
      p.mutable_grad() = at::full_like(p, NAN);
      const at::Tensor before = p.detach().clone();
      opt.step(3e-3, at::ones({}, at::TensorOptions().device(device)));
      opt.step_skipped();
      CHECK(at::equal(p.detach(), before));
    }
    p.mutable_grad() = ref.load("grad" + std::to_string(i), at::kFloat, device);
    opt.step(3e-3);
    INFO("step " << i + 1);
    CHECK(rel_err(p.cpu(), ref.view("p" + std::to_string(i + 1))) < 1e-6);
  }
  // In place, as in-place ops are: the version counter moved (readers keyed on it see each update).
  CHECK(p._version() >= 4);
  auto state = opt.state_tensors();
  CHECK(state[0].second.device().is_cpu() == (state_on_host || device.is_cpu()));
  CHECK(rel_err(state[0].second.cpu(), ref.view("exp_avg")) < 1e-6);
  CHECK(rel_err(state[1].second.cpu(), ref.view("exp_avg_sq")) < 1e-6);
}
}  // namespace

TEST_CASE("AdamW follows torch.optim.AdamW step for step, its state on the device or on the host", "[train]") {
  check_adamw_against_torch(at::kCPU, false);
  check_adamw_against_torch(at::kCPU, true);
}

TEST_CASE("AdamW on CUDA follows torch.optim.AdamW, its state on the GPU or in pinned host memory", "[train][gpu]") {
  REQUIRE(at::hasCUDA());
  check_adamw_against_torch(at::Device(at::kCUDA, 0), false);
  check_adamw_against_torch(at::Device(at::kCUDA, 0), true);
}

TEST_CASE("AdamW with a parameter's learning rate scaled follows torch.optim.AdamW at that learning rate", "[train]") {
  qt::SafetensorsFile ref(fixture("train/adamw.safetensors"));
  at::Tensor half = ref.load("p0", at::kFloat, at::kCPU).requires_grad_(true);
  at::Tensor full = ref.load("p0", at::kFloat, at::kCPU).requires_grad_(true);
  qt::AdamW opt({{"full", full}, {"half", half}}, {0.9, 0.95, 1e-8, 0.1});
  opt.set_lr_scale("half", 0.5);
  for (int i = 0; i < 4; ++i) {
    at::Tensor g = ref.load("grad" + std::to_string(i), at::kFloat, at::kCPU);
    half.mutable_grad() = g.clone();
    full.mutable_grad() = g.clone();
    opt.step(6e-3);  // the reference ran at 3e-3: "half" follows it, "full" runs at twice that
    INFO("step " << i + 1);
    CHECK(rel_err(half, ref.view("p" + std::to_string(i + 1))) < 1e-6);
    CHECK(rel_err(full, ref.view("p" + std::to_string(i + 1))) > 1e-4);
  }
  CHECK(has(error_of([&] { opt.set_lr_scale("none", 2.0); }), "none"));
}

namespace {
// The nearest code of each element by brute force: x / its block's absmax against every value of the map, the first
// of the least distance (the lower code on a tie); absmax 0 gives code 0.
at::Tensor nearest_codes_by_search(const at::Tensor& x, bool is_signed) {
  const int64_t n = x.numel(), nb = qt::q8_blocks(n);
  const at::Tensor flat = at::constant_pad_nd(x.reshape({-1}), {0, nb * qt::kAdam8bitBlock - n}, 0).view({nb, -1});
  const at::Tensor absmax = flat.abs().amax({1}, true);
  const at::Tensor y = (flat / at::where(absmax == 0, at::ones_like(absmax), absmax)).reshape({-1, 1});
  at::Tensor codes = (qt::dynamic_quant_map(is_signed).unsqueeze(0) - y).abs().argmin(1).view({nb, -1});
  codes = at::where(absmax == 0, at::zeros_like(codes), codes);
  return codes.reshape({-1}).slice(0, 0, n).to(at::kByte).view(x.sizes());
}

// Elements whose rows span `decades` orders of magnitude, one all-zero row when `zero_row`.
at::Tensor spread(int64_t rows, int64_t cols, double decades, bool zero_row = false) {
  at::Tensor x = at::randn({rows, cols}) * at::pow(10.0, at::rand({rows, 1}) * decades - decades / 2);
  if (zero_row) x[1].zero_();
  return x;
}

// codes that differ, and by more than one code.
std::pair<int64_t, int64_t> code_differences(const at::Tensor& a, const at::Tensor& b) {
  const at::Tensor d = (a.cpu().to(at::kInt) - b.cpu().to(at::kInt)).abs();
  return {(d > 0).sum().item<int64_t>(), (d > 1).sum().item<int64_t>()};
}
}  // namespace

TEST_CASE("8-bit AdamW: bitsandbytes' quantization maps, and codes the nearest values of each block", "[train]") {
  qt::SafetensorsFile ref(fixture("train/adamw_8bit.safetensors"));
  CHECK(at::equal(qt::dynamic_quant_map(true), ref.load("qmap1", at::kFloat, at::kCPU)));
  CHECK(at::equal(qt::dynamic_quant_map(false), ref.load("qmap2", at::kFloat, at::kCPU)));
  at::manual_seed(5);
  // 7 x 185 elements: blocks across rows, a short last block, an all-zero stretch, values over 8 decades.
  for (const bool is_signed : {true, false}) {
    INFO((is_signed ? "signed" : "unsigned"));
    at::Tensor x = spread(7, 185, 8.0, /*zero_row=*/true);
    x.narrow(1, 0, 185).select(0, 1).zero_();
    x.view({-1}).narrow(0, 256, 256).zero_();  // block 1 all zero
    if (!is_signed) x = x.abs();
    const qt::BlockwiseQ8 q = qt::quantize_blockwise(x, is_signed);
    REQUIRE(q.codes.sizes() == x.sizes());
    REQUIRE(q.absmax.numel() == qt::q8_blocks(x.numel()));
    CHECK(at::equal(q.codes, nearest_codes_by_search(x, is_signed)));
    CHECK(q.absmax[1].item<float>() == 0.0f);
    // Dequantized: each element within half the map's widest gap of its block's absmax (or, signed, the gap from the
    // map's least value to -1), a positive block maximum exact.
    const at::Tensor back = qt::dequantize_blockwise(q, is_signed);
    const at::Tensor flat_err = at::constant_pad_nd((back - x).abs().reshape({-1}),
                                                    {0, q.absmax.numel() * 256 - x.numel()}, 0).view({-1, 256});
    const at::Tensor map = qt::dynamic_quant_map(is_signed);
    const double half_gap = std::max(0.5 * (map.slice(0, 1) - map.slice(0, 0, 255)).max().item<double>(),
                                     1.0 + map[0].item<double>());
    CHECK((flat_err.amax({1}) <= q.absmax * (half_gap + 1e-6)).all().item<bool>());  // (and the product's rounding)
    CHECK(at::equal(back.max(), x.max()));
  }
}

TEST_CASE("8-bit AdamW's step equals its plain-ATen reference and follows bitsandbytes' AdamW8bit", "[train]") {
  at::manual_seed(9);
  {  // the CPU loop against the reference, from moments already quantized, with and without decay
    for (const double wd : {0.0, 0.1}) {
      INFO("weight decay " << wd);
      const at::Tensor p0 = at::randn({37, 300}), g = spread(37, 300, 4.0);
      const at::Tensor m = spread(37, 300, 6.0) * 1e-2, v = spread(37, 300, 6.0).square() * 1e-4;
      qt::Adam8bitTensor a{p0.clone(), g, qt::quantize_blockwise(m, true), qt::quantize_blockwise(v, false)};
      qt::Adam8bitTensor b{p0.clone(), g, qt::quantize_blockwise(m, true), qt::quantize_blockwise(v, false)};
      qt::Adam8bitStep st;
      st.lr = 1e-3;
      st.beta2 = 0.95;
      st.weight_decay = wd;
      st.step = 3;
      qt::adamw_8bit_step({a}, st);
      qt::adamw_8bit_step_reference({b}, st);
      CHECK(rel_err(a.p - p0, b.p - p0) < 1e-5);  // of the update (ATen's vectorized ops round otherwise)
      CHECK(rel_err(a.m.absmax, b.m.absmax) < 1e-6);
      CHECK(rel_err(a.v.absmax, b.v.absmax) < 1e-6);
      // Codes equal but where the two roundings of a moment fall on either side of a midpoint between two codes.
      const auto [dm, dm2] = code_differences(a.m.codes, b.m.codes);
      const auto [dv, dv2] = code_differences(a.v.codes, b.v.codes);
      CHECK(dm <= 11);  // 0.1% of 11,100
      CHECK(dv <= 11);
      CHECK(dm2 + dv2 == 0);
      CHECK(rel_err(a.p, p0) > 1e-5);  // it moved
    }
  }
  // qt::AdamW with 8-bit moments over bitsandbytes' trajectory (lr 3e-3, betas 0.9 / 0.95, wd 0.1), and fp32 AdamW
  // beside it (quantizing the moments moves the parameters by 0.6-1% of their movement in four steps).
  qt::SafetensorsFile ref(fixture("train/adamw_8bit.safetensors"));
  const at::Tensor big0 = ref.load("big0", at::kFloat, at::kCPU);
  at::Tensor big = big0.clone(), small = ref.load("small0", at::kFloat, at::kCPU), wide = big0.clone();
  qt::AdamWOptions o{0.9, 0.95, 1e-8, 0.1, /*eight_bit=*/true};
  qt::AdamW opt({{"big", big}, {"small", small}}, o);
  qt::AdamW fp32({{"wide", wide}}, {0.9, 0.95, 1e-8, 0.1});
  CHECK(opt.eight_bit_tensors() == 1);  // 35 elements keep fp32 moments
  CHECK(fp32.eight_bit_tensors() == 0);
  for (int i = 0; i < 4; ++i) {
    if (i == 2) {  // an overflowing step: nothing moves
      big.mutable_grad() = at::full_like(big, NAN);
      small.mutable_grad() = at::full_like(small, NAN);
      const at::Tensor before = big.clone();
      const auto state = opt.state_tensors();
      std::vector<at::Tensor> saved;
      for (const auto& [n, t] : state) saved.push_back(t.clone());
      opt.step(3e-3, at::ones({}));
      opt.step_skipped();
      CHECK(at::equal(big, before));
      for (size_t k = 0; k < state.size(); ++k) CHECK(at::equal(opt.state_tensors()[k].second, saved[k]));
    }
    const std::string k = std::to_string(i);
    big.mutable_grad() = ref.load("big_grad" + k, at::kFloat, at::kCPU);
    wide.mutable_grad() = ref.load("big_grad" + k, at::kFloat, at::kCPU);
    small.mutable_grad() = ref.load("small_grad" + k, at::kFloat, at::kCPU);
    opt.step(3e-3);
    fp32.step(3e-3);
    INFO("step " << i + 1);
    const at::Tensor moved = ref.load("big" + std::to_string(i + 1), at::kFloat, at::kCPU) - big0;
    const at::Tensor nearest = ref.load("big_nearest" + std::to_string(i + 1), at::kFloat, at::kCPU) - big0;
    // Against the oracle's update with each code the nearest value (the same ops as bitsandbytes', which with its
    // table quantizer swapped in reproduce bitsandbytes' trajectory bit for bit): to fp32 rounding. Against
    // bitsandbytes itself: its CPU table is coarser than the map below about 1e-4 of a block's absmax, so the
    // moments part by a code here and there (0.2-0.3% of the movement).
    const double off = rel_err(big - big0, nearest), bnb_off = rel_err(big - big0, moved);
    const double fp32_off = rel_err(wide - big0, nearest);
    INFO("8-bit: " << off << " of the nearest-code oracle's movement, " << bnb_off << " of bitsandbytes'; fp32 AdamW: "
                   << fp32_off);
    CHECK(off < 1e-5);
    CHECK(bnb_off < 5e-3);
    if (i > 0) CHECK(fp32_off > 100 * off);  // 8-bit moments, not fp32 ones (the first step's are exact in both)
    CHECK(rel_err(small, ref.load("small" + std::to_string(i + 1), at::kFloat, at::kCPU)) < 1e-6);
  }
  const auto state = opt.state_tensors();
  std::map<std::string, at::Tensor> by_name(state.begin(), state.end());
  REQUIRE(by_name.count("big.exp_avg.q8"));
  REQUIRE(by_name.count("small.exp_avg"));
  CHECK(by_name["big.exp_avg.q8"].scalar_type() == at::kByte);
  CHECK(by_name["big.exp_avg.absmax"].numel() == 44);
  // The moments, dequantized, within two codes of bitsandbytes'.
  for (const bool second : {false, true}) {
    const std::string s = second ? "big.exp_avg_sq" : "big.exp_avg";
    const at::Tensor ours = qt::dequantize_blockwise({by_name[s + ".q8"], by_name[s + ".absmax"]}, !second);
    const at::Tensor theirs = qt::dequantize_blockwise(
        {ref.load(second ? "state2" : "state1", at::kByte, at::kCPU).view(ours.sizes()),
         ref.load(second ? "absmax2" : "absmax1", at::kFloat, at::kCPU)}, !second);
    INFO(s << ": " << rel_err(ours, theirs));
    CHECK(rel_err(ours, theirs) < 1e-2);
    CHECK(rel_err(by_name[s + ".absmax"], ref.load(second ? "absmax2" : "absmax1", at::kFloat, at::kCPU)) < 1e-2);
  }
}

TEST_CASE("8-bit AdamW's state round-trips: resumed bit for bit, and converted to and from fp32 moments", "[train]") {
  at::manual_seed(13);
  const at::Tensor p0 = at::randn({64, 100});
  std::vector<at::Tensor> grads;
  for (int i = 0; i < 4; ++i) grads.push_back(spread(64, 100, 3.0));
  auto run = [&](qt::AdamW& opt, at::Tensor& p, int from, int to) {
    for (int i = from; i < to; ++i) {
      p.mutable_grad() = grads[i].clone();
      opt.step(1e-3);
    }
  };
  qt::AdamWOptions q8{0.9, 0.999, 1e-8, 0.0, true}, fp32{0.9, 0.999, 1e-8, 0.0, false};
  at::Tensor a = p0.clone();
  qt::AdamW straight({{"w", a}}, q8);
  run(straight, a, 0, 4);
  // Two steps, the state saved and loaded into a fresh optimizer, two more: the straight run's bits.
  at::Tensor b = p0.clone();
  qt::AdamW first({{"w", b}}, q8);
  run(first, b, 0, 2);
  std::vector<std::pair<std::string, at::Tensor>> saved;
  for (const auto& [n, t] : first.state_tensors()) saved.emplace_back(n, t.clone());
  at::Tensor c = b.clone();
  qt::AdamW second({{"w", c}}, q8);
  second.load_state(saved, first.steps());
  run(second, c, 2, 4);
  CHECK(at::equal(c, a));
  // The same 8-bit state into fp32 moments (dequantized) and back (quantized): codes within one of the saved ones
  // (a block whose largest magnitude is negative dequantizes it to -0.993 of its absmax, the map's least value, and
  // quantizing scales the block by that: absmax within 1%).
  at::Tensor d = b.clone();
  qt::AdamW wide({{"w", d}}, fp32);
  wide.load_state(saved, 2);
  const auto fp = wide.state_tensors();
  REQUIRE(fp[0].first == "w.exp_avg");
  at::Tensor e = b.clone();
  qt::AdamW narrow({{"w", e}}, q8);
  narrow.load_state(fp, 2);
  const auto back = narrow.state_tensors();
  for (size_t k = 0; k < back.size(); ++k) {
    INFO(back[k].first);
    if (back[k].first.find(".q8") != std::string::npos) CHECK(code_differences(back[k].second, saved[k].second).second == 0);
    else CHECK(rel_err(back[k].second, saved[k].second) < 1e-2);
  }
  // Missing or misshapen state is named.
  CHECK(has(error_of([&] { narrow.load_state({}, 2); }), "'w.exp_avg' is missing"));
  CHECK(has(error_of([&] { narrow.load_state({{"w.exp_avg.q8", at::zeros({3}, at::kByte)},
                                              {"w.exp_avg.absmax", at::zeros({1})}}, 2); }), "another shape"));
}

TEST_CASE("8-bit AdamW on CUDA: the kernel gives the CPU loop's bits, fp32 and bf16 parameters", "[train][gpu]") {
  REQUIRE(at::hasCUDA());
  at::manual_seed(17);
  const at::Device cuda(at::kCUDA, 0);
  // Tensors of several block counts (a short last block each), fp32 and bf16, in one step.
  std::vector<at::Tensor> ps{at::randn({37, 300}), at::randn({4096, 16}), at::randn({5000}),
                             at::randn({64, 100}).to(at::kBFloat16)};
  for (const bool host : {false, true}) {
    INFO((host ? "state on the host" : "state on the GPU"));
    std::vector<std::pair<std::string, at::Tensor>> on_cpu, on_gpu;
    for (size_t i = 0; i < ps.size(); ++i) {
      on_cpu.emplace_back("p" + std::to_string(i), ps[i].clone());
      on_gpu.emplace_back("p" + std::to_string(i), ps[i].to(cuda));
    }
    if (host) {  // the host path takes fp32 parameters
      on_cpu.pop_back();
      on_gpu.pop_back();
    }
    qt::AdamWOptions o{0.9, 0.95, 1e-8, 0.05, true};
    qt::AdamW a(on_cpu, o), b(on_gpu, o, host);
    for (int step = 0; step < 3; ++step) {
      for (size_t i = 0; i < on_cpu.size(); ++i) {
        const at::Tensor g = spread(1, on_cpu[i].second.numel(), 4.0).view(on_cpu[i].second.sizes())
                                 .to(on_cpu[i].second.scalar_type());
        on_cpu[i].second.mutable_grad() = g;
        on_gpu[i].second.mutable_grad() = g.to(cuda);
      }
      if (step == 1) {  // a skipped step on the GPU changes nothing
        const at::Tensor before = on_gpu[0].second.clone();
        b.step(2e-3, at::ones({}, at::TensorOptions().device(cuda)));
        b.step_skipped();
        CHECK(at::equal(on_gpu[0].second, before));
      }
      a.step(2e-3);
      b.step(2e-3);
    }
    for (size_t i = 0; i < on_cpu.size(); ++i) {
      INFO(on_cpu[i].first);
      CHECK(at::equal(on_gpu[i].second.cpu(), on_cpu[i].second));
    }
    const auto sa = a.state_tensors(), sb = b.state_tensors();
    REQUIRE(sa.size() == sb.size());
    for (size_t k = 0; k < sa.size(); ++k) {
      INFO(sa[k].first);
      CHECK(at::equal(sb[k].second.cpu(), sa[k].second));
    }
  }
}

TEST_CASE("NEFTune adds uniform noise of magnitude alpha / sqrt(seq * hidden), none at alpha 0", "[train]") {
  at::manual_seed(3);
  const at::Tensor e = at::randn({4, 50, 64});
  CHECK(qt::neftune_noise(e, 0.0).is_same(e));
  const double alpha = 5.0, m = alpha / std::sqrt(50.0 * 64.0);
  const at::Tensor noise = qt::neftune_noise(e, alpha) - e;
  const double max_abs = noise.abs().max().item<double>();
  CHECK(max_abs <= m * (1 + 1e-5));
  CHECK(max_abs > 0.99 * m);                                       // 12,800 draws reach the edges
  CHECK(std::abs(noise.mean().item<double>()) < 0.05 * m);         // centred
  CHECK(std::abs(noise.pow(2).mean().item<double>() - m * m / 3) < 0.05 * m * m);  // uniform's variance m^2 / 3
  // A gradient passes through unchanged (the noise is a constant).
  at::Tensor x = e.clone().requires_grad_(true);
  qt::neftune_noise(x, alpha).sum().backward();
  CHECK(at::equal(x.grad(), at::ones_like(e)));
}

TEST_CASE("LR schedules equal transformers' schedules with warmup", "[train]") {
  qt::Json ref = qt::read_json_file(fixture("train/schedules.json"), qt::ErrorKind::Internal);
  for (const char* name : {"constant", "linear", "cosine"}) {
    qt::LrSchedule s{qt::parse_lr_schedule(name, "test", "schedule"), 2e-4, 3, 20, 0.0};
    for (int64_t step = 0; step < 20; ++step) {
      INFO(name << " step " << step);
      CHECK(std::abs(s.at(step) - ref[name][step].get<double>()) < 1e-12);
    }
  }
  // Warmup, stable, decay (get_wsd_schedule): 3 warmup steps, 5 decaying at the end of 20.
  for (const char* decay : {"cosine", "linear", "1-sqrt"}) {
    for (const double floor : {0.0, 0.1}) {
      const std::string name = std::string("wsd_") + decay + (floor > 0 ? "_min" : "");
      if (!ref.contains(name)) continue;
      qt::LrSchedule s{qt::LrScheduleType::Wsd, 2e-4, 3, 20, floor};
      s.decay_steps = 5;
      s.decay = qt::parse_wsd_decay(decay, "test", "decay_type");
      for (int64_t step = 0; step < 20; ++step) {
        INFO(name << " step " << step);
        CHECK(std::abs(s.at(step) - ref[name][step].get<double>()) < 1e-12);
      }
    }
  }
  for (const char* name : {"wsd_cosine", "wsd_linear", "wsd_1-sqrt", "wsd_cosine_min"}) CHECK(ref.contains(name));
  CHECK(std::abs(ref["wsd_cosine"][10].get<double>() - 2e-4) < 1e-15);  // (the stable steps at lr)
}

TEST_CASE("clip_grad_norm scales gradients to the max norm and reports the norm before", "[train]") {
  at::Tensor a = at::randn({3, 4}).requires_grad_(true), b = at::randn({5}).requires_grad_(true);
  a.mutable_grad() = at::randn({3, 4}) * 10;
  b.mutable_grad() = at::randn({5}) * 10;
  const double expected = std::sqrt(a.grad().pow(2).sum().item<double>() + b.grad().pow(2).sum().item<double>());
  at::Tensor ga = a.grad().clone();
  double norm = qt::clip_grad_norm({{"a", a}, {"b", b}}, 1.0);
  CHECK(std::abs(norm - expected) / expected < 1e-6);
  const double after = std::sqrt(a.grad().pow(2).sum().item<double>() + b.grad().pow(2).sum().item<double>());
  CHECK(std::abs(after - 1.0) < 1e-5);
  CHECK(rel_err(a.grad() * (norm + 1e-6), ga) < 1e-5);
}

TEST_CASE("activation checkpointing gives the gradients of the plain backward pass", "[train]") {
  qt::LlamaModel model = qt::load_llama(fixture("llama/gqa_untied/model"), {});
  at::manual_seed(3);
  std::vector<at::Tensor> params;
  model.for_each_linear([&](const std::string&, qt::Linear& l) {
    auto lora = std::make_shared<qt::LoraAdapter>();
    lora->A = (at::randn({4, l.in_features()}) * 0.1).requires_grad_(true);
    lora->B = (at::randn({l.out_features(), 4}) * 0.1).requires_grad_(true);
    lora->scale = 2.0;
    l.lora = lora;
    params.push_back(lora->A);
    params.push_back(lora->B);
  });
  at::Tensor ids = at::randint(0, model.config.vocab_size, {2, 9}, at::kLong);
  auto grads_with = [&](bool checkpoint) {
    model.plan.checkpointing = checkpoint;
    for (auto& p : params) p.mutable_grad() = at::Tensor();
    at::Tensor logits = model.forward(ids);
    at::Tensor loss = at::cross_entropy_loss(logits.reshape({-1, model.config.vocab_size}), ids.reshape({-1}));
    loss.backward();
    std::vector<at::Tensor> g;
    for (auto& p : params) {
      REQUIRE(p.grad().defined());
      g.push_back(p.grad().clone());
    }
    return std::make_pair(loss.item<double>(), g);
  };
  auto [loss_plain, g_plain] = grads_with(false);
  auto [loss_ckpt, g_ckpt] = grads_with(true);
  CHECK(loss_plain == loss_ckpt);
  for (size_t i = 0; i < params.size(); ++i) {
    INFO("param " << i);
    CHECK(rel_err(g_ckpt[i], g_plain[i]) < 1e-6);
    CHECK(g_plain[i].abs().sum().item<double>() > 0);
  }
}

TEST_CASE("the loss takes the plan's logits tiles over a frozen lm_head: the same loss and input gradient as the "
          "loss's own rule and as the full logits", "[train]") {
  qt::LlamaModel model = qt::load_llama(fixture("llama/gqa_untied/model"), {});
  at::manual_seed(5);
  const int64_t T = 37, H = model.config.hidden_size;
  at::Tensor targets = at::randint(0, model.config.vocab_size, {1, T}, at::kLong);
  targets.index_put_({0, at::indexing::Slice(0, 5)}, -100);
  const at::Tensor h0 = at::randn({1, T, H});
  auto run = [&](bool fused, int64_t chunk) {
    model.plan.loss_chunk_tokens = chunk;
    at::Tensor h = h0.clone().requires_grad_(true);
    at::Tensor loss = qt::loss_sum(model, h, targets, fused);
    loss.backward();
    return std::make_pair(loss.item<double>(), h.grad().clone());
  };
  const auto [full, g_full] = run(false, 0);
  REQUIRE(g_full.abs().sum().item<double>() > 0);
  for (int64_t chunk : {int64_t{0}, int64_t{16}, int64_t{2048}}) {
    INFO("loss_chunk_tokens " << chunk);
    const auto [loss, g] = run(true, chunk);
    CHECK(std::abs(loss - full) / std::abs(full) < 1e-5);
    CHECK(rel_err(g, g_full) < 1e-5);
  }
  model.plan.loss_chunk_tokens = 0;
}

TEST_CASE("run config rejects unknown keys with a suggestion and bad values with the key", "[train][config]") {
  const std::string dir = qt::test::scratch_dir("run_config");
  auto parse = [&](const std::string& text, std::vector<std::string> overrides = {}) {
    qt::files::make_dirs(dir);
    std::string path = dir + "/run.json";
    FILE* f = std::fopen(path.c_str(), "w");
    std::fputs(text.c_str(), f);
    std::fclose(f);
    return qt::RunConfig::load(path, overrides);
  };
  auto expect = [&](const std::string& text, std::vector<std::string> needles, std::vector<std::string> overrides = {}) {
    try {
      parse(text, overrides);
      FAIL("expected an error for " << text);
    } catch (const qt::Error& e) {
      INFO(e.what());
      CHECK(e.kind() == qt::ErrorKind::Config);
      for (const auto& n : needles) CHECK(std::string(e.what()).find(n) != std::string::npos);
    }
  };
  const std::string ok = R"({"output_dir": "o", "model": {"path": "m"}, "data": {"train_file": "t.jsonl"}})";
  qt::RunConfig c = parse(ok, {"optim.lr=1e-4", "train.batch_size=4", "model.quant=none"});
  CHECK(c.optim.lr == 1e-4);
  CHECK(c.train.batch_size == 4);
  CHECK(c.model.quant == "none");
  CHECK(!c.train.memory.checkpointing.has_value());  // "auto": the plan's to choose
  expect(R"({"output_dir": "o", "model": {"path": "m"}, "optim": {"weight_decy": 1}})", {"optim.weight_decy", "did you mean 'optim.weight_decay'"});
  expect(R"({"output_dir": "o", "model": {"path": "m"}, "trian": {}})", {"trian", "'train'"});
  expect(R"({"output_dir": "o", "model": {"path": "m"}, "train": {"batch_size": "8"}})", {"train.batch_size", "integer"});
  expect(R"({"output_dir": "o", "model": {"path": "m"}, "train": {"batch_size": 0}})", {"train.batch_size", "> 0"});
  expect(R"({"output_dir": "o", "model": {"path": "m"}, "train": {"batch_size": 1099511627776}})",
         {"train.batch_size", "at most"});
  expect(R"({"output_dir": "o", "model": {"path": "m"}, "train": {"batch_size": 4, "micro_batch_size": 3}})",
         {"train.micro_batch_size", "does not divide train.batch_size 4"});
  expect(R"({"output_dir": "o", "model": {"path": "m"}, "train": {"batch_size": 4, "micro_batch_size": 8}})",
         {"train.micro_batch_size", "more than train.batch_size 4"});
  expect(R"({"output_dir": "o", "model": {"path": ""}})", {"model.path", "is empty"});
  expect(R"({"output_dir": "o", "model": {"path": "m"}, "optim": {"lr": 1e400}})", {"out of range", "1e400"});
  expect(R"({"output_dir": "o", "model": {"path": "m"}, "optim": {"schedule": "cosin"}})", {"optim.schedule", "cosine"});
  // Found by fuzzing (round 8): integers above 2^63 - 1 wrapped ("must be >= 0, got -1" for 2^64 - 1; train.seed
  // 2^63 read as -2^63; mlp_chunk_tokens 2^64 - 1 as -1, auto); "all-linear" beside modules was an "unknown
  // module"; data.max_seq_len had no upper bound (2^63 - 1 overflowed the plan's figures, which then "fitted").
  expect(ok, {"checkpoint.every", "18446744073709551615", "64-bit"}, {"checkpoint.every=18446744073709551615"});
  expect(ok, {"train.seed", "9223372036854775808", "64-bit"}, {"train.seed=9223372036854775808"});
  expect(ok, {"train.steps", "1e+30", "64-bit"}, {"train.steps=1e30"});
  expect(ok, {"train.memory.mlp_chunk_tokens", "18446744073709551615"},
         {"train.memory.mlp_chunk_tokens=18446744073709551615"});
  expect(ok, {"lora.targets", "\"all-linear\"", "alone"}, {R"(lora.targets=["all-linear", "q_proj"])"});
  CHECK(parse(ok, {"lora.targets=all-linear"}).parsed_lora.targets.size() == 7);
  expect(ok, {"data.max_seq_len", "at most 16777216"}, {"data.max_seq_len=9223372036854775807"});
  CHECK(parse(ok, {"data.max_seq_len=16777216"}).parsed_data.max_seq_len == 16777216);
  try {
    parse(ok, {"optim.schedule=cos\xffine"});
    FAIL("expected an error for a --set value that is not UTF-8");
  } catch (const qt::Error& e) {
    INFO(e.what());
    CHECK(e.kind() == qt::ErrorKind::Usage);
    CHECK(std::string(e.what()).find("optim.schedule=...': not valid UTF-8") != std::string::npos);
  }
  expect(R"({"output_dir": "o", "model": {"path": "m"}, "train": {"memory": {"attention": "fa3"}}})",
         {"train.memory.attention", "\"cudnn\" or \"flash\""});
  expect(R"({"output_dir": "o", "model": {"path": "m"}, "train": {"neftune_alpha": -1}})", {"train.neftune_alpha", ">= 0"});
  expect(R"({"output_dir": "o", "model": {"path": "m"}, "train": {"collective_timeout_s": 0}})",
         {"train.collective_timeout_s", "from 1 to 604800"});
  expect(R"({"output_dir": "o", "model": {"path": "m"}, "train": {"collective_timeout_s": 1e300}})",
         {"train.collective_timeout_s", "from 1 to 604800"});
  expect(R"({"output_dir": "o", "model": {"path": "m"}, "optim": {"lr": 1e-4, "embedding_lr": -1}})", {"optim.embedding_lr", "[0, 1)"});
  // A directory given as the run config.
  try {
    qt::RunConfig::load(dir, {});
    FAIL("expected an error for a directory as the run config");
  } catch (const qt::Error& e) {
    CHECK(std::string(e.what()).find("is a directory, not a JSON file") != std::string::npos);
  }
  expect(R"({"output_dir": "o", "model": {"path": "m"}})", {"optim.lr"}, {"optim.lr=2"});
  expect(R"({"model": {"path": "m"}})", {"output_dir", "missing"});
  // train.memory: the plan's fields, each true / false / "auto" (the default) or its named values.
  CHECK(!c.train.memory.gpu_memory_gib);
  CHECK(!c.train.memory.offload);
  CHECK(!c.train.memory.keep);
  const qt::PlanRequest m = parse(ok, {"train.memory.gpu_memory_gib=11.5", "train.memory.offload=true",
                                       "train.memory.keep=qkv", "train.memory.embeddings=host",
                                       "train.memory.checkpointing=auto", "train.memory.mlp_chunk_tokens=4096"})
                                .train.memory;
  CHECK(*m.gpu_memory_gib == 11.5);
  CHECK(*m.offload);
  CHECK(*m.keep == qt::KeepLevel::Qkv);
  CHECK(*m.embeddings_on_host);
  CHECK(!m.checkpointing);
  CHECK(*m.mlp_chunk_tokens == 4096);
  CHECK(!m.lm_head_on_host);
  CHECK(m.replan_on_oom);
  CHECK(!parse(ok, {"train.memory.replan_on_oom=false"}).train.memory.replan_on_oom);
  expect(ok, {"train.memory.replan_on_oom", "true or false"}, {"train.memory.replan_on_oom=\"auto\""});
  expect(ok, {"train.memory.keep", "\"residual\""}, {"train.memory.keep=everything"});
  expect(ok, {"train.memory.offload", "true, false or \"auto\""}, {"train.memory.offload=1"});
  expect(ok, {"train.memory.gpu_memory_gib", "> 0"}, {"train.memory.gpu_memory_gib=-2"});
  expect(ok, {"train.memory.lm_head", "\"host\""}, {"train.memory.lm_head=cpu"});
  expect(ok, {"train.memory.keep_dequantised", "did you mean 'train.memory.keep_dequantized'"},
         {"train.memory.keep_dequantised=true"});
  // The speed keys of earlier versions name where they went.
  expect(ok, {"train.keep_attention", "train.memory.keep"}, {"train.keep_attention=true"});
  expect(ok, {"train.grad_checkpointing", "train.memory.checkpointing"}, {"train.grad_checkpointing=false"});
  expect(ok, {"train.offload_activations", "train.memory.offload"}, {"train.offload_activations=auto"});
  expect(ok, {"train.fuse_lora_swiglu", "no longer a setting"}, {"train.fuse_lora_swiglu=true"});
  expect(ok, {"train.shard", "train.memory.checkpointing"}, {"train.shard=blocks", "train.memory.checkpointing=false"});
  expect("{\"output_dir\": \"o\",\n \"model\": {\"path\": }", {"run.json", "line 2"});
  // The lora and data sections are checked with the rest, before any data or model is read.
  expect(ok, {"lora.targets", "qproj", "q_proj"}, {"lora.targets=[\"qproj\"]"});
  expect(ok, {"key 'lora'", "JSON object", "integer 5"}, {"lora=5"});
  expect(ok, {"data.chat_template", "llama-3"}, {"data.chat_template=llama-3"});
  // HF / PEFT / TRL spellings are answered with the key to use.
  expect(ok, {"lora.lora_alpha", "did you mean lora.alpha?"}, {"lora.lora_alpha=16"});
  expect(ok, {"lora.target_modules", "lora.targets"}, {"lora.target_modules=[\"q_proj\"]"});
  expect(ok, {"lora.lora_dropout", "lora.dropout"}, {"lora.lora_dropout=0.1"});
  expect(ok, {"train.max_steps", "train.steps"}, {"train.max_steps=10"});
  expect(ok, {"train.gradient_accumulation_steps", "train.micro_batch_size"}, {"train.gradient_accumulation_steps=4"});
  expect(ok, {"optim.learning_rate", "optim.lr"}, {"optim.learning_rate=1e-4"});
  expect(ok, {"train.learning_rate", "optim.lr"}, {"train.learning_rate=1e-4"});
  expect(ok, {"data.max_length", "data.max_seq_len"}, {"data.max_length=512"});
  // PEFT's "all-linear" and TrainingArguments' warmup_ratio.
  CHECK(qt::LoraConfig::from_json(parse(ok, {"lora.targets=\"all-linear\""}).lora, "run.json").targets ==
        qt::lora_target_names());
  CHECK(parse(ok, {"optim.warmup_ratio=0.1"}).optim.warmup_ratio == 0.1);
  CHECK(qt::warmup_steps_of(0, 0.1, 30) == 3);  // math.ceil(total * ratio), as transformers
  CHECK(qt::warmup_steps_of(0, 0.1, 35) == 4);
  CHECK(qt::warmup_steps_of(0, 0.05, 100) == 5);
  CHECK(qt::warmup_steps_of(7, 0.0, 100) == 7);
  expect(ok, {"optim.warmup_ratio", "optim.warmup_steps"}, {"optim.warmup_ratio=0.1", "optim.warmup_steps=3"});
  expect(ok, {"optim.warmup_ratio", "[0, 1]"}, {"optim.warmup_ratio=2"});
  // The "wsd" schedule (transformers' "warmup_stable_decay"): its decay a tenth of the run unless decay_steps or
  // decay_ratio say otherwise, within the run with the warmup; its keys refused under other schedules.
  const qt::RunConfig w = parse(ok, {"optim.schedule=wsd", "train.steps=50", "optim.warmup_steps=5"});
  CHECK(qt::lr_schedule_of(w, 50).type == qt::LrScheduleType::Wsd);
  CHECK(qt::lr_schedule_of(w, 50).decay_steps == 5);
  CHECK(qt::lr_schedule_of(w, 55).decay_steps == 6);  // (ceil)
  CHECK(qt::lr_schedule_of(parse(ok, {"optim.schedule=wsd", "optim.decay_ratio=0.3"}), 50).decay_steps == 15);
  const qt::RunConfig w7 = parse(ok, {"optim.schedule=\"warmup_stable_decay\"", "optim.decay_steps=7",
                                      "optim.decay_type=\"1-sqrt\""});
  CHECK(qt::lr_schedule_of(w7, 50).decay_steps == 7);
  CHECK(qt::lr_schedule_of(w7, 50).decay == qt::WsdDecay::OneMinusSqrt);
  CHECK(qt::lr_schedule_of(w7, 50).at(20) == 2e-4);  // (stable)
  CHECK(qt::lr_schedule_of(c, 50).decay_steps == 0);  // (cosine: none)
  // The resolved config reads back (the decay's keys null under other schedules).
  for (const qt::RunConfig* r : std::vector<const qt::RunConfig*>{&w7, &c}) {
    const qt::RunConfig back = qt::RunConfig::from_json(r->to_json(), "resolved.json");
    CHECK(back.optim.schedule == r->optim.schedule);
    CHECK(back.optim.decay_steps == r->optim.decay_steps);
    CHECK(back.optim.decay_type == r->optim.decay_type);
  }
  expect(ok, {"optim.decay_steps", "\"wsd\"", "\"cosine\""}, {"optim.decay_steps=5"});
  expect(ok, {"optim.decay_type", "1-sqrt"}, {"optim.schedule=wsd", "optim.decay_type=sqrt"});
  expect(ok, {"optim.decay_ratio", "optim.decay_steps"}, {"optim.schedule=wsd", "optim.decay_steps=3",
                                                         "optim.decay_ratio=0.2"});
  expect(ok, {"optim.decay_steps", "3 warmup and 9 decay steps", "the run's 10"},
         {"optim.schedule=wsd", "train.steps=10", "optim.warmup_steps=3", "optim.decay_steps=9"});
  expect(ok, {"optim.schedule", "wsd"}, {"optim.schedule=warmup"});
  // DPO's loss: one of TRL's names or a list of them, weighted (RPO: sigmoid + alpha x sft).
  const qt::DpoSection rpo =
      parse(ok, {"dpo.loss_type=[\"sigmoid\", \"sft\"]", "dpo.loss_weights=[1, 0.5]"}).dpo;
  CHECK(rpo.loss_types == std::vector<std::string>{"sigmoid", "sft"});
  CHECK(rpo.loss_weights == std::vector<double>{1.0, 0.5});
  CHECK(rpo.describe() == "sigmoid + 0.5 x sft");
  CHECK(rpo.needs_lengths());
  CHECK(!parse(ok).dpo.needs_lengths());
  CHECK(qt::DpoSection::from_json(rpo.to_json(), "resolved.json").loss_types == rpo.loss_types);
  CHECK(parse(ok, {"dpo.loss_type=nca_pair"}).dpo.to_json()["loss_type"] == "nca_pair");
  expect(ok, {"dpo.loss_weights", "list of 2 numbers"}, {"dpo.loss_type=[\"sigmoid\", \"sft\"]",
                                                          "dpo.loss_weights=[1]"});
  expect(ok, {"dpo.loss_type", "\"aot\"", "not supported"}, {"dpo.loss_type=aot"});
  expect(ok, {"dpo.loss_type", "\"sigmod\"", "sigmoid_norm"}, {"dpo.loss_type=sigmod"});
  expect(ok, {"dpo.loss_type", "listed twice"}, {"dpo.loss_type=[\"sft\", \"sft\"]"});
  expect(ok, {"dpo.label_smoothing", "\"exo_pair\"", "> 0"}, {"dpo.loss_type=exo_pair"});
  expect(ok, {"dpo.label_smoothing", "\"robust\""}, {"dpo.loss_type=hinge", "dpo.label_smoothing=0.1"});
}


TEST_CASE("a step at its budget's edge is told what happened and which budget lets the plan lean", "[train]") {
  qt::Decision d;
  d.budget_gib = 8.0;
  d.footprint.terms = {{"kept_activations", 3.0 * (1 << 30)}, {"working_set", 4.5 * (1 << 30)}};
  const std::string m = qt::edge_of_budget_message(3, 2, 1, d);
  for (const char* part : {"step 3:", "gave 2 blocks of its cache back", "retried 1 allocation after",
                           "predicted at 7.50 GiB of a budget of 8.00 GiB",
                           "train.memory.gpu_memory_gib of 7.50 (now 8.00)", "once a run"})
    CHECK(has(m, part));
  const std::string one = qt::edge_of_budget_message(1, 1, 0, qt::Decision{});
  CHECK(has(one, "gave 1 block of its cache back to the driver ("));
  CHECK(!has(one, "retried"));
  CHECK(has(one, "no budget"));
}

TEST_CASE("the allocator's counts see it give cached memory back when an allocation does not fit beside it",
          "[train][gpu]") {
  REQUIRE(at::hasCUDA());
  const at::Device dev(at::kCUDA, 0);
  // Segments of their own size (an earlier test's run may have set expandable segments, which would grow the
  // cached segment instead of giving it back).
  // The allocator started on the device first: setMemoryFraction refuses a device it has not initialized.
  (void)at::empty({1}, at::TensorOptions().device(dev));
  // The settings and the fraction put back however the test ends (setAllocatorSettings resets the keys it is not
  // given, so the whole string is restored).
  struct Restore {
    std::string settings = c10::CachingAllocator::getAllocatorSettings();
    ~Restore() {
      c10::cuda::CUDACachingAllocator::setMemoryFraction(1.0, 0);
      c10::cuda::CUDACachingAllocator::emptyCache();
      c10::CachingAllocator::setAllocatorSettings(settings);
    }
  } restore;
  c10::CachingAllocator::setAllocatorSettings("expandable_segments:False");
  c10::cuda::CUDACachingAllocator::emptyCache();
  const double total = static_cast<double>(at::cuda::getDeviceProperties(0)->totalGlobalMem);
  c10::cuda::CUDACachingAllocator::setMemoryFraction(0.5, 0);
  const auto elements = [&](double share) { return static_cast<int64_t>(share * total) / 2; };
  {
    at::Tensor a = at::empty({elements(0.3)}, at::TensorOptions().dtype(at::kHalf).device(dev));
    a.fill_(1);
  }  // cached, not given back
  const qt::GpuAllocatorCounts before = qt::gpu_allocator_counts(dev);
  REQUIRE(before.device_frees >= 0);
  at::Tensor b = at::empty({elements(0.35)}, at::TensorOptions().dtype(at::kHalf).device(dev));
  b.fill_(2);  // 0.3 cached + 0.35 exceeds the 0.5 allowed: the cached block goes back first
  const qt::GpuAllocatorCounts after = qt::gpu_allocator_counts(dev);
  b.reset();
  CHECK(after.device_frees > before.device_frees);
  CHECK(after.device_allocs > before.device_allocs);
  CHECK(after.alloc_retries >= before.alloc_retries);
  CHECK(qt::gpu_allocator_counts(at::Device(at::kCPU)).device_frees == -1);
}
