// NF4 (lib/kernels/nf4_*, lib/quant/nf4.h) against bitsandbytes' own bytes and outputs
// (tests/oracles/gen_nf4.py), on the CPU.
#include <ATen/ATen.h>

#include <cstring>
#include <fstream>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "lib/core/error.h"
#include "lib/core/safetensors.h"
#include "lib/kernels/nf4_dequant.h"
#include "lib/kernels/nf4_format.h"
#include "lib/quant/nf4.h"
#include "tests/catch.h"
#include "tests/test_util.h"

using qt::test::error_of;

namespace {

// Bit patterns, so that -0.0 != 0.0 and NaN payloads count.
using qt::test::same_bits;

std::vector<std::string> nf4_cases() {
  std::ifstream in(qt::test::fixture("nf4/cases.txt"));
  REQUIRE(in.good());
  std::vector<std::string> names;
  for (std::string line; std::getline(in, line);)
    if (!line.empty()) names.push_back(line);
  REQUIRE(!names.empty());
  return names;
}

}  // namespace

TEST_CASE("NF4 code values and the nested dynamic map equal bitsandbytes' quant_map and nested_quant_map", "[nf4]") {
  qt::SafetensorsFile f(qt::test::fixture("nf4/" + nf4_cases()[0] + ".safetensors"));
  CHECK(same_bits(qt::kernels::nf4_code_tensor(), f.view("layer.weight.quant_map")));
  CHECK(same_bits(qt::kernels::dynamic_map_tensor(), f.view("layer.weight.nested_quant_map")));
}

TEST_CASE("quantize_nf4 reproduces bitsandbytes' packed codes and statistics byte for byte", "[nf4]") {
  for (const auto& name : nf4_cases()) {
    SECTION(name) {
      qt::SafetensorsFile f(qt::test::fixture("nf4/" + name + ".safetensors"));
      const at::Tensor input = f.view("input");
      const auto bnb = qt::nf4_from_safetensors(f, "layer");
      const qt::Nf4Weight w = qt::quantize_nf4(input, bnb.blocksize());
      CHECK(w.shape == std::vector<int64_t>(input.sizes().begin(), input.sizes().end()));
      CHECK(w.dtype == input.scalar_type());
      CHECK(same_bits(w.data.packed, f.view("layer.weight")));
      CHECK(same_bits(w.data.nested_absmax, f.view("layer.weight.nested_absmax")));
      CHECK(same_bits(at::tensor({w.data.offset}), at::tensor({bnb.data.offset})));
      CHECK(same_bits(w.data.quant_map, f.view("layer.weight.quant_map")));
      CHECK(same_bits(w.data.nested_map, f.view("layer.weight.nested_quant_map")));
      // Nested absmax codes: identical to bitsandbytes' reference backend (= its CUDA kernel's rounding).
      CHECK(same_bits(w.data.absmax_q, f.view("ref_absmax_q")));
      // bitsandbytes' native CPU kernel's binary search is off by one code for a few values (gen_nf4.py).
      at::Tensor diff = (w.data.absmax_q.to(at::kInt) - f.view("layer.weight.absmax").to(at::kInt)).abs();
      CHECK(diff.max().item<int>() <= 1);
      CHECK(diff.sum().item<int>() <= 4 + diff.numel() / 20);
    }
  }
}

TEST_CASE("dequantizing bitsandbytes' serialized state reproduces dequantize_4bit bit for bit", "[nf4]") {
  for (const auto& name : nf4_cases()) {
    SECTION(name) {
      qt::SafetensorsFile f(qt::test::fixture("nf4/" + name + ".safetensors"));
      const at::Tensor expected = f.view("dequant");
      const qt::Nf4Weight w = qt::nf4_from_safetensors(f, "layer");
      at::Tensor out = w.dequantize();
      CHECK(out.sizes() == expected.sizes());
      CHECK(same_bits(out, expected));
      // Into a caller's poisoned buffer, through the tensor-level kernel entry point (reference on CPU).
      at::Tensor into = at::full({w.numel()}, NAN, at::TensorOptions().dtype(w.dtype));
      w.dequantize_into(into);
      CHECK(same_bits(into, expected));
    }
  }
}

TEST_CASE("to_bnb_tensors writes back exactly the tensors bitsandbytes saved, JSON state included", "[nf4]") {
  for (const auto& name : nf4_cases()) {
    SECTION(name) {
      qt::SafetensorsFile f(qt::test::fixture("nf4/" + name + ".safetensors"));
      const qt::Nf4Weight w = qt::nf4_from_safetensors(f, "layer");
      const auto written = w.to_bnb_tensors("layer");
      CHECK(written.size() == 6);
      for (const auto& [key, t] : written) {
        INFO(key);
        const at::Tensor ref = f.view(key);
        CHECK(t.sizes() == ref.sizes());
        CHECK(same_bits(t, ref));
      }
    }
  }
}

TEST_CASE("an NF4 weight survives a safetensors round trip in bitsandbytes' layout", "[nf4]") {
  at::manual_seed(7);
  at::Tensor weight = (at::randn({192, 256}) * 0.05).to(at::kBFloat16);
  const qt::Nf4Weight w = qt::quantize_nf4(weight);
  const std::string path = qt::test::scratch_dir("nf4_roundtrip") + "/w.safetensors";
  qt::save_safetensors(path, w.to_bnb_tensors("model.layers.0.mlp.up_proj"));
  qt::SafetensorsFile f(path);
  const qt::Nf4Weight back = qt::nf4_from_safetensors(f, "model.layers.0.mlp.up_proj");
  CHECK(back.shape == w.shape);
  CHECK(back.dtype == w.dtype);
  CHECK(same_bits(at::tensor({back.data.offset}), at::tensor({w.data.offset})));
  CHECK(same_bits(back.dequantize(), w.dequantize()));
  CHECK(same_bits(back.dequantize(at::kFloat), w.dequantize(at::kFloat)));
}

TEST_CASE("NF4 reconstruction error of Gaussian weights is what 4 bits allow", "[nf4]") {
  at::manual_seed(11);
  for (auto dtype : {at::kFloat, at::kBFloat16, at::kHalf}) {
    at::Tensor weight = (at::randn({256, 512}) * 0.02).to(dtype);
    const qt::Nf4Weight w = qt::quantize_nf4(weight);
    at::Tensor back = w.dequantize();
    CHECK(back.scalar_type() == dtype);
    const double err = qt::test::rel_err(back, weight);
    INFO("relative error " << err);
    // NF4 with blocksize 64 on N(0, s^2): about 0.1 relative RMS error (QLoRA paper, section 3). Far above it
    // means a wrong code or scale; far below it means the test compared something trivial.
    CHECK(err < 0.12);
    CHECK(err > 0.05);
  }
}

TEST_CASE("a LLaMA-shaped set of NF4 linears takes at most 0.52 bytes per weight", "[nf4]") {
  // The linears of one block of a narrow LLaMA (hidden 1024, GQA with 4 KV heads of 64, intermediate 2816):
  // q, k, v, o, gate, up, down. The per-weight figure does not depend on the width.
  const int64_t h = 1024, kv = 256, inter = 2816;
  const std::vector<std::vector<int64_t>> shapes = {{h, h},     {kv, h},    {kv, h},   {h, h},
                                                    {inter, h}, {inter, h}, {h, inter}};
  at::manual_seed(3);
  int64_t bytes = 0, numel = 0;
  for (const auto& s : shapes) {
    const qt::Nf4Weight w = qt::quantize_nf4(at::randn(s).mul_(0.02).to(at::kBFloat16));
    bytes += w.bytes();
    numel += w.numel();
    CHECK(w.bytes() > w.numel() / 2);  // the codes alone are half a byte each
  }
  const double per_weight = static_cast<double>(bytes) / static_cast<double>(numel);
  INFO("bytes per weight " << per_weight);
  CHECK(per_weight <= 0.52);
}

TEST_CASE("NF4 refuses bad shapes and inconsistent bitsandbytes states with errors naming the key", "[nf4]") {
  SECTION("an empty weight") {
    const std::string msg = error_of([] { qt::quantize_nf4(at::randn({0, 3})); });
    CHECK(msg.find("[0, 3]") != std::string::npos);
    CHECK(msg.find("empty") != std::string::npos);
  }
  SECTION("integer weight") {
    CHECK(error_of([] { qt::quantize_nf4(at::ones({64}, at::kInt)); }).find("dtype") != std::string::npos);
  }
  at::manual_seed(5);
  const qt::Nf4Weight w = qt::quantize_nf4(at::randn({128, 128}).to(at::kBFloat16));
  std::map<std::string, at::Tensor> good;
  for (auto& [k, t] : w.to_bnb_tensors("p")) good[k] = t;
  const std::string state_key = "p.weight.quant_state.bitsandbytes__nf4";
  auto with_state = [&](const std::string& json) {
    auto m = good;
    at::Tensor t = at::empty({static_cast<int64_t>(json.size())}, at::kByte);
    std::memcpy(t.data_ptr(), json.data(), json.size());
    m[state_key] = t;
    return m;
  };
  auto json_of = [&]() {
    const at::Tensor& t = good.at(state_key);
    return std::string(reinterpret_cast<const char*>(t.data_ptr<uint8_t>()), t.numel());
  };
  CHECK(error_of([&] { qt::nf4_from_bnb_tensors(good, "p", "x.safetensors"); }).empty());
  SECTION("unknown quant_type") {
    std::string json = json_of();
    json.replace(json.find("\"nf4\""), 5, "\"int3\"");
    const std::string msg = error_of([&] { qt::nf4_from_bnb_tensors(with_state(json), "p", "x.safetensors"); });
    CHECK(msg.find("x.safetensors") != std::string::npos);
    CHECK(msg.find("quant_type") != std::string::npos);
  }
  SECTION("fp4 state key") {
    auto m = good;
    m["p.weight.quant_state.bitsandbytes__fp4"] = m.at(state_key);
    m.erase(state_key);
    const std::string msg = error_of([&] { qt::nf4_from_bnb_tensors(m, "p", "x.safetensors"); });
    CHECK(msg.find("bitsandbytes__fp4") != std::string::npos);
  }
  SECTION("absmax of the wrong length") {
    auto m = good;
    m["p.weight.absmax"] = m.at("p.weight.absmax").slice(0, 1);
    const std::string msg = error_of([&] { qt::nf4_from_bnb_tensors(m, "p", "x.safetensors"); });
    CHECK(msg.find("p.weight.absmax") != std::string::npos);
  }
  SECTION("nested_absmax of the wrong dtype") {
    auto m = good;
    m["p.weight.nested_absmax"] = m.at("p.weight.nested_absmax").to(at::kHalf);
    const std::string msg = error_of([&] { qt::nf4_from_bnb_tensors(m, "p", "x.safetensors"); });
    CHECK(msg.find("p.weight.nested_absmax") != std::string::npos);
  }
  SECTION("shape disagreeing with the packed codes") {
    std::string json = json_of();
    json.replace(json.find("[128, 128]"), 10, "[128, 256]");
    const std::string msg = error_of([&] { qt::nf4_from_bnb_tensors(with_state(json), "p", "x.safetensors"); });
    CHECK(msg.find("p.weight") != std::string::npos);
  }
  SECTION("missing nested_quant_map") {
    auto m = good;
    m.erase("p.weight.nested_quant_map");
    const std::string msg = error_of([&] { qt::nf4_from_bnb_tensors(m, "p", "x.safetensors"); });
    CHECK(msg.find("p.weight.nested_quant_map") != std::string::npos);
  }
}

TEST_CASE("grouped NF4 dequantization on the CPU equals one weight at a time", "[nf4]") {
  at::manual_seed(9);
  const qt::Nf4Weight a = qt::quantize_nf4(at::randn({128, 64}).to(at::kBFloat16));
  const qt::Nf4Weight b = qt::quantize_nf4(at::randn({64, 64}).to(at::kBFloat16));
  std::vector<at::Tensor> outs = {at::full({128, 64}, NAN, at::kBFloat16), at::full({64, 64}, NAN, at::kBFloat16)};
  qt::dequantize_group_into({&a, &b}, outs);
  CHECK(same_bits(outs[0], a.dequantize()));
  CHECK(same_bits(outs[1], b.dequantize()));
  CHECK(same_bits(outs[0].reshape({-1}), qt::kernels::nf4_dequant_ref(a.data, at::kBFloat16)));
  // Into the first columns of a wider matrix (the layout of the LoRA B terms in the base GEMM): the other columns
  // untouched.
  const at::Tensor wide = at::full({192, 72}, NAN, at::kBFloat16);
  qt::dequantize_group_into({&a, &b},
                            {wide.narrow(0, 0, 128).narrow(1, 0, 64), wide.narrow(0, 128, 64).narrow(1, 0, 64)});
  CHECK(same_bits(wide.narrow(0, 0, 128).narrow(1, 0, 64).contiguous(), a.dequantize()));
  CHECK(same_bits(wide.narrow(0, 128, 64).narrow(1, 0, 64).contiguous(), b.dequantize()));
  CHECK(wide.narrow(1, 64, 8).isnan().all().item<bool>());
}
