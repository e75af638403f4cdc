// PEFT's modules_to_save (lm_head and embed_tokens trained in full beside LoRA) against transformers + PEFT
// (tests/oracles/gen_lora.py, cases mts_untied and mts_tied): the loss and the gradient of every trained tensor,
// through the plain logits and through the fused loss the trainer uses; the adapter files both ways; the fp32
// copies and the tied tensor's two roles; bad adapters.
#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include "lib/core/files.h"
#include "lib/core/json.h"
#include "lib/core/safetensors.h"
#include "lib/kernels/fused_linear_ce.h"
#include "lib/model/hf_loader.h"
#include "lib/model/lora.h"
#include "lib/model/merge.h"
#include "lib/model/peft_adapter.h"
#include "tests/catch.h"
#include "tests/test_util.h"

using qt::test::fixture;
using qt::test::rel_err;

using qt::test::error_of;
using qt::test::has;

namespace {

const char* kEmbedKey = "base_model.model.model.embed_tokens.weight";
const char* kHeadKey = "base_model.model.lm_head.weight";

qt::LoadOptions nf4_load() {
  qt::LoadOptions o;
  o.quantize_nf4 = true;
  return o;
}

// The next-token loss (mean over counted labels, ignore -100) as the oracle computes it: from the full logits, or
// through fused_linear_cross_entropy on the hidden state with the lm_head weight the trainer passes it.
at::Tensor causal_lm_loss(const qt::LlamaModel& model, const at::Tensor& ids, const at::Tensor& labels, bool fused) {
  const int64_t S = ids.size(1), H = model.config.hidden_size, V = model.config.vocab_size;
  at::Tensor hidden = model.forward_hidden(model.embed(ids)).narrow(1, 0, S - 1).reshape({-1, H});
  at::Tensor next = labels.narrow(1, 1, S - 1).reshape({-1});
  if (fused) return qt::fused_linear_cross_entropy(hidden, model.lm_head_weight(), next).mean();
  return at::cross_entropy_loss(at::linear(hidden, model.lm_head_weight()).reshape({-1, V}).to(at::kFloat), next);
}

// On CUDA the model computes in bf16 (the trainer's setting) and the bounds are bf16's; the trained copies stay
// fp32 and their gradients arrive in fp32.
void check_against_peft(const std::string& base_dir, const std::string& name, bool fused,
                        at::Device device = at::kCPU) {
  const bool cuda = device.is_cuda();
  INFO(name << " on " << base_dir << (fused ? ", fused loss" : ", plain logits") << (cuda ? ", cuda bf16" : ""));
  qt::LoadOptions opt = nf4_load();
  opt.device = device;
  if (cuda) opt.dtype = at::kBFloat16;
  const double loss_bound = cuda ? 2e-2 : 1e-5, grad_bound = cuda ? 8e-2 : 1e-4;
  qt::LlamaModel model = qt::load_llama(fixture("lora/" + base_dir), opt);
  const qt::PeftAdapterConfig cfg = qt::load_peft_adapter(model, fixture("lora/" + name + "/adapter"));
  // PEFT rewrites a tied model's list to ["embed_tokens", "model.embed_tokens"]: one module once read.
  CHECK(cfg.lora.modules_to_save.size() == (model.config.tie_word_embeddings ? 1u : 2u));
  REQUIRE(model.embed_tokens_trainable.defined());
  REQUIRE(model.lm_head_trainable.defined());
  CHECK(model.embed_tokens_trainable.is_same(model.lm_head_trainable) == model.config.tie_word_embeddings);
  // PEFT's copies were perturbed from the base: the adapter's values are in use, not the base's.
  CHECK(!at::equal(model.embed_tokens_trainable.detach(), model.embed_tokens));
  qt::SafetensorsFile ref(fixture("lora/" + name + "/reference.safetensors"));
  CHECK(model.lm_head_trainable.scalar_type() == at::kFloat);
  CHECK(model.lm_head_trainable.device() == device);
  at::Tensor ids = ref.load("input_ids", at::kLong, device);
  at::Tensor labels = ref.load("labels", at::kLong, device);
  at::Tensor loss = causal_lm_loss(model, ids, labels, fused);
  loss.backward();
  CHECK(rel_err(loss, ref.view("loss")) < loss_bound);
  auto params = qt::lora_parameters(model);
  int64_t grads = 0;
  for (const auto& info : ref.tensors())
    if (info.name.rfind("grad.", 0) == 0) ++grads;
  CHECK(static_cast<int64_t>(params.size()) == grads);
  int64_t modules = 0;
  for (auto& [key, t] : params) {
    INFO(key);
    REQUIRE(t.grad().defined());
    REQUIRE(ref.find("grad." + key) != nullptr);
    CHECK(ref.view("grad." + key).abs().max().item<double>() > 0);
    CHECK(t.grad().device() == device);
    CHECK(rel_err(t.grad(), ref.view("grad." + key)) < grad_bound);
    if (key == kEmbedKey || key == kHeadKey) ++modules;
  }
  CHECK(modules == (model.config.tie_word_embeddings ? 1 : 2));
}

qt::LoraConfig small_lora(std::vector<std::string> modules) {
  qt::LoraConfig c;
  c.r = 4;
  c.alpha = 8;
  c.targets = {"q_proj", "v_proj"};
  c.modules_to_save = std::move(modules);
  return c;
}

}  // namespace

TEST_CASE("modules_to_save, untied: loss and the gradients of lm_head, embed_tokens and LoRA equal PEFT's", "[lora][mts]") {
  check_against_peft("base_nf4", "mts_untied", /*fused=*/false);
  check_against_peft("base_nf4", "mts_untied", /*fused=*/true);
}

TEST_CASE("modules_to_save, tied: one tensor in both roles gets PEFT's (ensure_weight_tying) gradient", "[lora][mts]") {
  check_against_peft("base_tied_nf4", "mts_tied", /*fused=*/false);
  check_against_peft("base_tied_nf4", "mts_tied", /*fused=*/true);
}

TEST_CASE("modules_to_save on CUDA in bf16 (fp32 copies cast per use, the fused loss's weight gradient) matches PEFT",
          "[lora][mts][gpu]") {
  REQUIRE(at::hasCUDA());
  const at::Device cuda(at::kCUDA, 0);
  for (bool fused : {false, true}) {
    check_against_peft("base_nf4", "mts_untied", fused, cuda);
    check_against_peft("base_tied_nf4", "mts_tied", fused, cuda);
  }
}

TEST_CASE("attach_modules_to_save makes fp32 trainable copies; tied embeddings share one", "[lora][mts]") {
  for (const char* base : {"base", "base_tied"}) {
    INFO(base);
    qt::LlamaModel model = qt::load_llama(fixture(std::string("lora/") + base), nf4_load());
    const bool tied = model.config.tie_word_embeddings;
    REQUIRE(tied == (std::string(base) == "base_tied"));
    for (const auto& modules : std::vector<std::vector<std::string>>{{"lm_head"}, {"embed_tokens"}, {"lm_head", "embed_tokens"}}) {
      qt::attach_modules_to_save(model, small_lora(modules), at::kCPU);
      const bool head = tied || std::find(modules.begin(), modules.end(), "lm_head") != modules.end();
      const bool embed = tied || std::find(modules.begin(), modules.end(), "embed_tokens") != modules.end();
      REQUIRE(model.lm_head_trainable.defined() == head);
      REQUIRE(model.embed_tokens_trainable.defined() == embed);
      if (head) {
        CHECK(model.lm_head_trainable.scalar_type() == at::kFloat);
        CHECK(model.lm_head_trainable.requires_grad());
        CHECK(at::equal(model.lm_head_trainable.detach(), model.lm_head));
        CHECK(model.lm_head_trainable.data_ptr() != model.lm_head.data_ptr());  // a copy: the base stays frozen
      }
      if (embed) CHECK(at::equal(model.embed_tokens_trainable.detach(), model.embed_tokens));
      if (tied) CHECK(model.lm_head_trainable.is_same(model.embed_tokens_trainable));
      // The trainer's parameter list holds each trained tensor once.
      int64_t listed = 0;
      for (const auto& [k, t] : qt::lora_parameters(model)) listed += (k == kEmbedKey || k == kHeadKey);
      CHECK(listed == (tied ? 1 : static_cast<int64_t>(modules.size())));
    }
    // Under no_grad the weights the forward pass uses carry no graph.
    {
      at::NoGradGuard g;
      CHECK(!model.lm_head_weight().requires_grad());
    }
    CHECK(model.lm_head_weight().requires_grad());
    qt::detach_lora(model);
    CHECK(!model.lm_head_trainable.defined());
    CHECK(!model.embed_tokens_trainable.defined());
  }
}

TEST_CASE("an adapter with modules_to_save saves where PEFT does and reloads identically", "[lora][mts]") {
  for (const char* base : {"base", "base_tied"}) {
    INFO(base);
    qt::LlamaModel model = qt::load_llama(fixture(std::string("lora/") + base), nf4_load());
    const bool tied = model.config.tie_word_embeddings;
    const qt::LoraConfig cfg = small_lora({"lm_head", "embed_tokens"});
    qt::attach_lora(model, cfg, 5);
    qt::attach_modules_to_save(model, cfg, at::kCPU);
    for (auto& [k, t] : qt::lora_parameters(model)) {
      at::NoGradGuard g;
      t.add_(at::randn_like(t) * 0.1);
    }
    const std::string dir = qt::files::join(qt::test::scratch_dir(std::string("mts_save_") + base), "adapter");
    qt::save_peft_adapter(model, cfg, dir, "/models/base");
    const qt::Json j = qt::read_json_file(qt::files::join(dir, qt::kAdapterConfigFile), qt::ErrorKind::Checkpoint);
    CHECK(j["modules_to_save"] == qt::Json::parse(R"(["lm_head", "embed_tokens"])"));
    CHECK(j.contains("ensure_weight_tying") == tied);
    {
      qt::SafetensorsFile f(qt::files::join(dir, qt::kAdapterWeightsFile));
      CHECK(f.tensors().size() == 2 * 2 * static_cast<size_t>(model.config.num_hidden_layers) + 2);
      CHECK(at::equal(f.view(kHeadKey), model.lm_head_trainable.detach()));
      CHECK(at::equal(f.view(kEmbedKey), model.embed_tokens_trainable.detach()));
      CHECK(f.info(kHeadKey).dtype == "F32");
    }
    qt::LlamaModel again = qt::load_llama(fixture(std::string("lora/") + base), nf4_load());
    const qt::PeftAdapterConfig back = qt::load_peft_adapter(again, dir);
    CHECK(back.lora.modules_to_save == cfg.modules_to_save);
    CHECK(back.ensure_weight_tying == tied);
    CHECK(back.lora.differences_from(cfg).empty());
    auto a = qt::lora_parameters(model), b = qt::lora_parameters(again);
    REQUIRE(a.size() == b.size());
    for (size_t i = 0; i < a.size(); ++i) {
      INFO(a[i].first);
      CHECK(a[i].first == b[i].first);
      CHECK(at::equal(a[i].second, b[i].second));
      CHECK(b[i].second.requires_grad());
    }
    if (tied) CHECK(again.lm_head_trainable.is_same(again.embed_tokens_trainable));
    at::Tensor ids = at::randint(model.config.vocab_size, {2, 7}, at::kLong);
    at::NoGradGuard g;
    CHECK(at::equal(model.forward(ids), again.forward(ids)));
    // The trained copies are what the forward pass uses: the base tensors give other logits.
    qt::LlamaModel plain = qt::load_llama(fixture(std::string("lora/") + base), nf4_load());
    qt::load_peft_adapter(plain, dir);
    plain.embed_tokens_trainable = plain.lm_head_trainable = at::Tensor();
    CHECK(!at::equal(plain.forward(ids), again.forward(ids)));

    SECTION("export copies them and merge writes the trained tensors") {
      const std::string copy = qt::files::join(qt::test::scratch_dir(std::string("mts_copy_") + base), "adapter");
      qt::copy_peft_adapter(dir, copy, "", &model.config);
      qt::SafetensorsFile f(qt::files::join(copy, qt::kAdapterWeightsFile));
      CHECK(at::equal(f.view(kHeadKey), model.lm_head_trainable.detach()));
      const qt::Json jc = qt::read_json_file(qt::files::join(copy, qt::kAdapterConfigFile), qt::ErrorKind::Checkpoint);
      CHECK(jc["modules_to_save"] == j["modules_to_save"]);
      CHECK(jc.contains("ensure_weight_tying") == tied);
      const std::string merged = qt::files::join(qt::test::scratch_dir(std::string("mts_merged_") + base), "model");
      qt::save_merged_model(again, fixture(std::string("lora/") + base), merged, at::kFloat);
      qt::SafetensorsFile m(qt::files::join(merged, "model.safetensors"));
      CHECK(at::equal(m.view("model.embed_tokens.weight"), again.embed_tokens_trainable.detach()));
      CHECK((m.find("lm_head.weight") != nullptr) == !tied);
      if (!tied) CHECK(at::equal(m.view("lm_head.weight"), again.lm_head_trainable.detach()));
    }
  }
}

TEST_CASE("modules_to_save: the config section and bad adapters give clear errors", "[lora][mts]") {
  qt::ErrorKind kind{};
  std::string e = error_of([] { qt::LoraConfig::from_json(qt::Json::parse(R"({"modules_to_save": ["lm_haed"]})"), "run.json"); }, &kind);
  CHECK(kind == qt::ErrorKind::Config);
  CHECK(has(e, "run.json"));
  CHECK(has(e, "lora.modules_to_save"));
  CHECK(has(e, "did you mean 'lm_head'"));
  e = error_of([] { qt::LoraConfig::from_json(qt::Json::parse(R"({"modules_to_save": ["lm_head", "lm_head"]})"), "run.json"); });
  CHECK(has(e, "listed twice"));
  e = error_of([] { qt::LoraConfig::from_json(qt::Json::parse(R"({"modules_to_save": [3]})"), "run.json"); });
  CHECK(has(e, "lora.modules_to_save"));
  CHECK(has(e, "expected a list of strings"));
  // One name alone reads as a list of one, as for lora.targets.
  CHECK(qt::LoraConfig::from_json(qt::Json::parse(R"({"modules_to_save": "lm_head"})"), "run.json").modules_to_save ==
        std::vector<std::string>{"lm_head"});
  const qt::LoraConfig c = qt::LoraConfig::from_json(qt::Json::parse(R"({"modules_to_save": ["embed_tokens"]})"), "run.json");
  CHECK(c.modules_to_save == std::vector<std::string>{"embed_tokens"});
  CHECK(has(small_lora({"lm_head"}).differences_from(c).back(), "lora.modules_to_save: config [lm_head], adapter [embed_tokens]"));

  auto copy_to = [](const std::string& from, const std::string& name) {
    const std::string dir = qt::test::scratch_dir(name);
    for (const char* f : {qt::kAdapterConfigFile, qt::kAdapterWeightsFile})
      qt::files::copy_file(qt::files::join(from, f), qt::files::join(dir, f));
    return dir;
  };
  auto edit_config = [](const std::string& dir, const std::function<void(qt::Json&)>& edit) {
    const std::string path = qt::files::join(dir, qt::kAdapterConfigFile);
    qt::Json j = qt::read_json_file(path, qt::ErrorKind::Checkpoint);
    edit(j);
    qt::write_json_file(path, j);
  };
  const std::string tied = fixture("lora/mts_tied/adapter");
  {  // A tied model's adapter saved without ensure_weight_tying (PEFT's untied copies): refused, naming the key.
    const std::string d = copy_to(tied, "mts_bad_untie");
    edit_config(d, [](qt::Json& j) { j["ensure_weight_tying"] = false; });
    qt::LlamaModel m = qt::load_llama(fixture("lora/base_tied_nf4"), nf4_load());
    e = error_of([&] { qt::load_peft_adapter(m, d); }, &kind);
    CHECK(kind == qt::ErrorKind::Checkpoint);
    CHECK(has(e, "adapter_config.json"));
    CHECK(has(e, "ensure_weight_tying"));
  }
  {  // A module PEFT could save but we do not train.
    const std::string d = copy_to(fixture("lora/mts_untied/adapter"), "mts_bad_module");
    edit_config(d, [](qt::Json& j) { j["modules_to_save"] = qt::Json::parse(R"(["lm_head", "score"])"); });
    e = error_of([&] { qt::read_peft_adapter_config(d); }, &kind);
    CHECK(kind == qt::ErrorKind::Checkpoint);
    CHECK(has(e, "modules_to_save"));
    CHECK(has(e, "'score'"));
  }
  {  // Listed but missing, and present but not listed.
    const std::string d = copy_to(fixture("lora/mts_untied/adapter"), "mts_bad_missing");
    edit_config(d, [](qt::Json& j) { j["modules_to_save"] = qt::Json::parse(R"(["lm_head"])"); });
    qt::LlamaModel m = qt::load_llama(fixture("lora/base_nf4"), nf4_load());
    e = error_of([&] { qt::load_peft_adapter(m, d); });
    CHECK(has(e, kEmbedKey));
    CHECK(has(e, "unexpected tensor"));
  }
  {  // The adapter of another vocabulary.
    qt::LlamaModel m = qt::load_llama(fixture("lora/base_nf4"), nf4_load());
    m.config.vocab_size += 1;
    e = error_of([&] { qt::load_peft_adapter(m, fixture("lora/mts_untied/adapter")); }, &kind);
    CHECK(kind == qt::ErrorKind::Checkpoint);
    CHECK(has(e, "vocab_size x hidden_size"));
  }
  {  // Saving refuses a model whose trained copies do not match the config.
    qt::LlamaModel m = qt::load_llama(fixture("lora/base_nf4"), nf4_load());
    qt::attach_lora(m, small_lora({}), 1);
    qt::attach_modules_to_save(m, small_lora({"lm_head"}), at::kCPU);
    e = error_of([&] { qt::save_peft_adapter(m, small_lora({}), qt::test::scratch_dir("mts_bad_save"), ""); }, &kind);
    CHECK(kind == qt::ErrorKind::Checkpoint);
    CHECK(has(e, "lm_head has a trained copy but is not in lora.modules_to_save"));
  }
}
