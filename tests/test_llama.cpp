// The LLaMA model against transformers: logits, loss and every gradient, on small random checkpoints that
// tests/oracles/gen_llama.py saves with save_pretrained (GQA and multi-head, tied and untied, sharded and
// single-file, llama3 rope scaling, 4.x and 5.x config spellings).
#include <ATen/ATen.h>

#include "lib/core/safetensors.h"
#include "lib/model/hf_loader.h"
#include "tests/catch.h"
#include "tests/test_util.h"

using qt::test::fixture;
using qt::test::rel_err;

namespace {

void check_against_transformers(const std::string& name) {
  const std::string dir = fixture("llama/" + name);
  qt::LlamaModel model = qt::load_llama(dir + "/model", {});
  qt::SafetensorsFile ref(dir + "/reference.safetensors");
  auto named = model.named_tensors();
  for (auto& [n, t] : named) t->set_requires_grad(true);
  if (model.config.tie_word_embeddings) model.lm_head = model.embed_tokens;

  at::Tensor ids = ref.load("input_ids", at::kLong, at::kCPU);
  at::Tensor labels = ref.load("labels", at::kLong, at::kCPU);
  at::Tensor emb = model.embed(ids);
  emb.retain_grad();
  at::Tensor logits = model.logits(model.forward_hidden(emb));
  const int64_t V = model.config.vocab_size;
  at::Tensor loss = at::cross_entropy_loss(logits.narrow(1, 0, logits.size(1) - 1).reshape({-1, V}),
                                           labels.narrow(1, 1, labels.size(1) - 1).reshape({-1}));
  loss.backward();

  INFO(name);
  CHECK(rel_err(logits, ref.view("logits")) < 1e-4);
  CHECK(rel_err(loss, ref.view("loss")) < 1e-5);
  CHECK(rel_err(emb.grad(), ref.view("grad.inputs_embeds")) < 1e-4);
  for (auto& [n, t] : named) {
    INFO(n);
    REQUIRE(t->grad().defined());
    CHECK(rel_err(t->grad(), ref.view("grad." + n)) < 1e-4);
  }
}

}  // namespace

TEST_CASE("llama logits and gradients match transformers: GQA untied single file", "[llama]") {
  check_against_transformers("gqa_untied");
}

TEST_CASE("llama logits and gradients match transformers: multi-head tied sharded", "[llama]") {
  check_against_transformers("mha_tied_sharded");
}

TEST_CASE("llama logits and gradients match transformers: llama3 rope and head_dim in a 4.x config", "[llama]") {
  check_against_transformers("llama3_rope_v4");
}

TEST_CASE("llama on CUDA in bf16 matches transformers within bf16 bounds", "[llama][gpu]") {
  REQUIRE(at::hasCUDA());
  for (const char* name : {"gqa_untied", "mha_tied_sharded", "llama3_rope_v4"}) {
    INFO(name);
    const std::string dir = fixture(std::string("llama/") + name);
    qt::LlamaModel model = qt::load_llama(dir + "/model", {at::Device(at::kCUDA, 0), at::kBFloat16});
    qt::SafetensorsFile ref(dir + "/reference.safetensors");
    auto named = model.named_tensors();
    for (auto& [n, t] : named) t->set_requires_grad(true);
    if (model.config.tie_word_embeddings) model.lm_head = model.embed_tokens;
    at::Tensor ids = ref.load("input_ids", at::kLong, at::kCUDA);
    at::Tensor labels = ref.load("labels", at::kLong, at::kCUDA);
    at::Tensor emb = model.embed(ids);
    emb.retain_grad();
    at::Tensor logits = model.logits(model.forward_hidden(emb));
    const int64_t V = model.config.vocab_size;
    at::Tensor loss = at::cross_entropy_loss(logits.narrow(1, 0, logits.size(1) - 1).reshape({-1, V}).to(at::kFloat),
                                             labels.narrow(1, 1, labels.size(1) - 1).reshape({-1}));
    loss.backward();
    CHECK(rel_err(logits, ref.view("logits")) < 2e-2);
    CHECK(rel_err(loss, ref.view("loss")) < 1e-2);
    CHECK(rel_err(emb.grad(), ref.view("grad.inputs_embeds")) < 5e-2);
    for (auto& [n, t] : named) {
      INFO(n);
      REQUIRE(t->grad().defined());
      CHECK(rel_err(t->grad(), ref.view("grad." + n)) < 5e-2);
    }
  }
}
