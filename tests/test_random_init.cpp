// Random-weight models (model.init "random"): the named shapes have the published parameter counts of their
// models, the weights follow transformers' init, and the NF4 path quantizes as it builds.
#include <ATen/ATen.h>

#include "lib/core/error.h"
#include "lib/model/random_init.h"
#include "tests/catch.h"
#include "tests/test_util.h"

using qt::test::rel_err;

TEST_CASE("random init: named shapes have their published parameter counts", "[random_init]") {
  // Parameter counts as the model cards on the Hugging Face hub state them.
  CHECK(qt::shape_config("llama-3.2-1b", "t.json", "model.shape").num_parameters() == 1235814400);
  CHECK(qt::shape_config("llama-3.2-3b", "t.json", "model.shape").num_parameters() == 3212749824);
  CHECK(qt::shape_config("llama-3.1-8b", "t.json", "model.shape").num_parameters() == 8030261248);
  CHECK(qt::shape_config("llama-2-7b", "t.json", "model.shape").num_parameters() == 6738415616);
  CHECK(qt::shape_config("mistral-7b", "t.json", "model.shape").num_parameters() == 7248023552);
  CHECK(qt::shape_config("tinyllama-1.1b", "t.json", "model.shape").num_parameters() == 1100048384);
  // Qwen2.5-7B: 7.62B published (Qwen2.5 report; 7,615,616,512 counted), q / k / v biases included.
  const qt::LlamaConfig qwen25 = qt::shape_config("qwen2.5-7b", "t.json", "model.shape");
  CHECK(qwen25.num_parameters() == 7615616512);
  CHECK(qwen25.linear_has_bias("model.layers.0.self_attn.k_proj"));
  CHECK(!qwen25.linear_has_bias("model.layers.0.self_attn.o_proj"));
  CHECK(!qwen25.linear_has_bias("model.layers.0.mlp.down_proj"));
  // Qwen3-8B: 8.19B published (8,190,735,360 counted), q / k norms included, no bias.
  const qt::LlamaConfig qwen3 = qt::shape_config("qwen3-8b", "t.json", "model.shape");
  CHECK(qwen3.num_parameters() == 8190735360);
  CHECK(qwen3.qk_norm);
  CHECK(!qwen3.linear_has_bias("model.layers.0.self_attn.q_proj"));
  const qt::LlamaConfig c = qt::shape_config("llama-3.1-8b", "t.json", "model.shape");
  CHECK(c.rope.type == qt::RopeType::Llama3);
  CHECK(c.head_dim == 128);
  try {
    qt::shape_config("llama-9b", "run.json", "model.shape");
    FAIL("an unknown shape was accepted");
  } catch (const qt::Error& e) {
    const std::string msg = e.what();
    CHECK(msg.find("run.json") != std::string::npos);
    CHECK(msg.find("model.shape") != std::string::npos);
    CHECK(msg.find("llama-3.1-8b") != std::string::npos);  // the known names are listed
  }
}

TEST_CASE("random init: transformers' distribution, seeded, NF4 on arrival", "[random_init]") {
  qt::LlamaConfig c = qt::test::tiny_llama_config(300);
  c.mlp_bias = true;
  qt::LoadOptions dense{at::kCPU, at::kFloat};
  qt::LlamaModel a = qt::random_llama(c, dense, 7);
  qt::LlamaModel b = qt::random_llama(c, dense, 7);
  qt::LlamaModel other = qt::random_llama(c, dense, 8);
  CHECK(at::equal(a.layers[1].gate_proj.weight, b.layers[1].gate_proj.weight));
  CHECK(!at::equal(a.layers[1].gate_proj.weight, other.layers[1].gate_proj.weight));
  const double std = a.layers[0].down_proj.weight.std().item<double>();
  CHECK(std::abs(std - 0.02) < 0.001);
  CHECK(std::abs(a.embed_tokens.mean().item<double>()) < 0.001);
  CHECK(at::equal(a.layers[0].input_layernorm, at::ones({128})));
  CHECK(a.layers[0].up_proj.bias.defined());
  CHECK(!a.layers[0].q_proj.bias.defined());
  CHECK(!at::equal(a.lm_head, a.embed_tokens));  // untied: two tensors

  qt::LoadOptions nf4 = dense;
  nf4.quantize_nf4 = true;
  qt::LlamaModel q = qt::random_llama(c, nf4, 7);
  REQUIRE(q.layers[0].v_proj.quantized());
  CHECK(!q.layers[0].v_proj.weight.defined());
  // NF4 keeps a normal(0, 0.02) weight within the 4-bit code's error (~10% relative).
  at::Tensor w = q.layers[0].v_proj.base_weight(at::kFloat);
  CHECK(std::abs(w.std().item<double>() - 0.02) < 0.002);
  at::Tensor ids = at::randint(0, c.vocab_size, {2, 16}, at::kLong);
  at::Tensor logits = q.forward(ids);
  CHECK(logits.isfinite().all().item<bool>());
  CHECK(logits.std().item<double>() > 0);
}
