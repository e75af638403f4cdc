// The LLaMA model against transformers: logits, loss and every gradient, on small random checkpoints that
// tests/oracles/gen_llama.py saves with save_pretrained (GQA and multi-head, tied and untied, sharded and
// single-file, llama3 / linear / dynamic / yarn rope scaling, 4.x and 5.x config spellings, attention and MLP
// biases, Llama 2 and TinyLlama head ratios, Mistral's sliding window).
#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <torch/csrc/autograd/autograd.h>

#include "lib/core/safetensors.h"
#include "lib/kernels/attention_core.h"
#include "lib/model/hf_loader.h"
#include "lib/model/random_init.h"
#include "tests/catch.h"
#include "tests/test_util.h"

using qt::test::fixture;
using qt::test::rel_err;

namespace {

// The fixture's input through the model with every tensor requiring a gradient: logits, the next-token loss (in
// fp32) after its backward pass, and the input embeddings (their gradient kept).
struct ForwardBackward {
  at::Tensor logits, loss, emb;
};
ForwardBackward forward_backward(qt::LlamaModel& model, std::vector<std::pair<std::string, at::Tensor*>>& named,
                                 qt::SafetensorsFile& ref, at::Device device) {
  for (auto& [n, t] : named) t->set_requires_grad(true);
  if (model.config.tie_word_embeddings) model.lm_head = model.embed_tokens;
  at::Tensor ids = ref.load("input_ids", at::kLong, device);
  at::Tensor labels = ref.load("labels", at::kLong, device);
  at::Tensor emb = model.embed(ids);
  emb.retain_grad();
  at::Tensor logits = model.logits(model.forward_hidden(emb));
  const int64_t V = model.config.vocab_size;
  at::Tensor loss = at::cross_entropy_loss(logits.narrow(1, 0, logits.size(1) - 1).reshape({-1, V}).to(at::kFloat),
                                           labels.narrow(1, 1, labels.size(1) - 1).reshape({-1}));
  loss.backward();
  return {logits, loss, emb};
}

void check_against_transformers(const std::string& name) {
  const std::string dir = fixture("llama/" + name);
  qt::LlamaModel model = qt::load_llama(dir + "/model", {});
  qt::SafetensorsFile ref(dir + "/reference.safetensors");
  auto named = model.named_tensors();
  const auto [logits, loss, emb] = forward_backward(model, named, ref, at::kCPU);

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

TEST_CASE("llama logits and gradients match transformers: linear rope in a 4.x config with the type key", "[llama]") {
  check_against_transformers("linear_rope_v4");
}

TEST_CASE("llama logits and gradients match transformers: dynamic NTK rope beyond max_position_embeddings", "[llama]") {
  check_against_transformers("dynamic_rope");
}

TEST_CASE("llama logits and gradients match transformers: yarn rope with the derived attention factor", "[llama]") {
  check_against_transformers("yarn_rope");
}

TEST_CASE("llama logits and gradients match transformers: yarn rope in a 4.x config with attention_factor", "[llama]") {
  check_against_transformers("yarn_rope_v4");
}

TEST_CASE("llama logits and gradients match transformers: attention_bias and mlp_bias", "[llama]") {
  check_against_transformers("bias");
}

TEST_CASE("llama logits and gradients match transformers: Llama 2 multi-head shape ratios", "[llama]") {
  check_against_transformers("llama2_mha");
}

TEST_CASE("llama logits and gradients match transformers: TinyLlama 8 to 1 GQA ratio", "[llama]") {
  check_against_transformers("tinyllama_gqa");
}

TEST_CASE("llama logits and gradients match transformers: Mistral sliding window shorter than the sequence", "[llama]") {
  check_against_transformers("mistral_window");
}

TEST_CASE("qwen2 logits and gradients match transformers' Qwen2ForCausalLM: q/k/v bias, tied, 5.x config with "
          "use_sliding_window false",
          "[llama][qwen]") {
  check_against_transformers("qwen2_tied");
}

TEST_CASE("qwen2 logits and gradients match transformers' Qwen2ForCausalLM: untied, 8:1 GQA, 4.x config",
          "[llama][qwen]") {
  check_against_transformers("qwen2_v4");
  const qt::LlamaModel model = qt::load_llama(fixture("llama/qwen2_v4/model"), {});
  CHECK(model.config.model_type == "qwen2");
  CHECK(!model.config.sliding_window);
  CHECK(model.layers[0].q_proj.bias.defined());
  CHECK(model.layers[0].v_proj.bias.defined());
  CHECK(!model.layers[0].o_proj.bias.defined());
  CHECK(!model.layers[0].down_proj.bias.defined());
}

TEST_CASE("qwen3 logits and gradients match transformers' Qwen3ForCausalLM: q / k norms, head_dim given, untied, "
          "5.x config",
          "[llama][qwen]") {
  check_against_transformers("qwen3");
}

TEST_CASE("qwen3 logits and gradients match transformers' Qwen3ForCausalLM: tied, 4:1 GQA, 4.x config",
          "[llama][qwen]") {
  check_against_transformers("qwen3_tied_v4");
  const qt::LlamaModel model = qt::load_llama(fixture("llama/qwen3_tied_v4/model"), {});
  CHECK(model.config.qk_norm);
  CHECK(model.layers[1].k_norm.sizes() == at::IntArrayRef({16}));
  CHECK(!model.layers[0].q_proj.bias.defined());
}

TEST_CASE("llama biases stay dense beside NF4 bases", "[llama]") {
  const std::string dir = fixture("llama/bias/model");
  qt::LlamaModel dense = qt::load_llama(dir, {});
  qt::LoadOptions opts;
  opts.quantize_nf4 = true;
  qt::LlamaModel quant = qt::load_llama(dir, opts);
  auto& d = dense.layers[1];
  auto& q = quant.layers[1];
  for (auto [dl, ql] : {std::pair<qt::Linear*, qt::Linear*>{&d.q_proj, &q.q_proj}, {&d.o_proj, &q.o_proj},
                        {&d.up_proj, &q.up_proj}, {&d.down_proj, &q.down_proj}}) {
    REQUIRE(ql->quantized());
    REQUIRE(ql->bias.defined());
    CHECK(ql->bias.scalar_type() == at::kFloat);
    CHECK(at::equal(ql->bias, dl->bias));
  }
  bool named = false;
  for (auto& [n, t] : quant.named_tensors()) named = named || n == "model.layers.0.mlp.gate_proj.bias";
  CHECK(named);
  // The NF4 model's logits stay near the dense ones (quantization error only).
  at::Tensor ids = at::arange(12, at::kLong).view({1, 12});
  CHECK(rel_err(quant.forward(ids), dense.forward(ids)) < 0.2);
}

TEST_CASE("llama sliding window in packed rows equals each document run alone", "[llama]") {
  qt::LlamaModel model = qt::load_llama(fixture("llama/mistral_window/model"), {});
  REQUIRE(model.config.sliding_window);
  REQUIRE(*model.config.sliding_window == 5);
  // One row: a 9-token document, a 7-token document, 2 padding tokens.
  at::Tensor ids = at::arange(18, at::kLong).view({1, 18}) * 7 % model.config.vocab_size;
  qt::Batch batch;
  batch.input_ids = ids;
  batch.positions = at::cat({at::arange(9, at::kLong), at::arange(7, at::kLong), at::zeros({2}, at::kLong)}).view({1, 18});
  batch.doc_ids = at::cat({at::zeros({9}, at::kInt), at::ones({7}, at::kInt), at::full({2}, -1, at::kInt)}).view({1, 18});
  at::Tensor packed = model.forward_hidden(model.embed(ids), batch);
  at::Tensor first = model.forward_hidden(model.embed(ids.narrow(1, 0, 9)));
  at::Tensor second = model.forward_hidden(model.embed(ids.narrow(1, 9, 7)));
  CHECK(rel_err(packed.narrow(1, 0, 9), first) < 1e-5);
  CHECK(rel_err(packed.narrow(1, 9, 7), second) < 1e-5);
  // Without the window the first document's last tokens would differ: the window is really applied.
  qt::LlamaModel wide = qt::load_llama(fixture("llama/mistral_window/model"), {});
  wide.config.sliding_window.reset();
  CHECK(rel_err(wide.forward_hidden(model.embed(ids.narrow(1, 0, 9))), first) > 1e-3);
}

TEST_CASE("llama on CUDA in bf16 matches transformers within bf16 bounds", "[llama][gpu]") {
  REQUIRE(at::hasCUDA());
  for (const char* name : {"gqa_untied", "mha_tied_sharded", "llama3_rope_v4", "linear_rope_v4", "dynamic_rope", "yarn_rope",
                           "yarn_rope_v4", "bias", "llama2_mha", "tinyllama_gqa", "mistral_window", "qwen2_tied",
                           "qwen2_v4", "qwen3", "qwen3_tied_v4"})
  for (auto kernel : {qt::AttentionKernel::Flash, qt::AttentionKernel::Cudnn}) {
    const bool cudnn = kernel == qt::AttentionKernel::Cudnn;
    INFO(name << (cudnn ? ", cuDNN attention first" : ", SDPA's order"));
    const std::string dir = fixture(std::string("llama/") + name);
    qt::LlamaModel model = qt::load_llama(dir + "/model", {at::Device(at::kCUDA, 0), at::kBFloat16});
    model.plan.attention = kernel;
    // The kernel asked for is the one that runs where its constraints hold; cuDNN needs head_dim a multiple of 8
    // and is passed over otherwise (tinyllama_gqa's head_dim 4: seen on an H100, SDPA then ran flash).
    const int64_t backend = model.dense_attention_backend(8, at::Device(at::kCUDA, 0), at::kBFloat16);
    INFO("SDPA backend " << backend);
    if (cudnn) CHECK((backend == static_cast<int64_t>(at::SDPBackend::cudnn_attention)) == (model.config.head_dim % 8 == 0));
    qt::SafetensorsFile ref(dir + "/reference.safetensors");
    auto named = model.named_tensors();
    const auto [logits, loss, emb] = forward_backward(model, named, ref, at::kCUDA);
    CHECK(rel_err(logits, ref.view("logits")) < 2e-2);
    CHECK(rel_err(loss, ref.view("loss")) < 1e-2);
    CHECK(rel_err(emb.grad(), ref.view("grad.inputs_embeds")) < 5e-2);
    for (auto& [n, t] : named) {
      INFO(n);
      REQUIRE(t->grad().defined());
      // bf16 against fp32: the "bias" case's larger attention logits lose more in q / k (8% seen on an H100).
      CHECK(rel_err(t->grad(), ref.view("grad." + n)) < (std::string(name) == "bias" ? 1e-1 : 5e-2));
    }
  }
}

TEST_CASE("input embeddings and lm_head kept on the host give the logits and gradients of tensors on the GPU, bit "
          "for bit", "[llama][gpu]") {
  REQUIRE(at::hasCUDA());
  const std::string dir = fixture("llama/gqa_untied");
  qt::SafetensorsFile ref(dir + "/reference.safetensors");
  at::Tensor ids = ref.load("input_ids", at::kLong, at::kCPU);
  std::vector<at::Tensor> results;
  for (int on_host : {0, 1, 2, 3}) {  // nothing, the embeddings, both; 3: both, loaded straight into the host
    INFO("on the host: " << on_host);
    qt::LoadOptions load{at::Device(at::kCUDA, 0), at::kBFloat16};
    load.embeddings_on_host = load.lm_head_on_host = on_host == 3;
    qt::LlamaModel model = qt::load_llama(dir + "/model", load);
    if (on_host == 3) CHECK((model.embed_tokens.is_pinned() && model.lm_head.is_pinned()));
    model.to_host(/*embeddings=*/on_host >= 1, /*lm_head=*/on_host >= 2);
    CHECK(model.embeddings_on_host() == (on_host >= 1));
    CHECK(model.lm_head_on_host() == (on_host >= 2));
    CHECK(model.embed_tokens.device().is_cuda() == (on_host == 0));
    CHECK(model.device().is_cuda());
    model.layers[0].q_proj.weight.set_requires_grad(true);
    at::Tensor emb = model.embed(ids);  // host ids either way
    REQUIRE(emb.device().is_cuda());
    emb = emb.detach().requires_grad_(true);
    at::Tensor logits = model.logits(model.forward_hidden(emb));
    logits.to(at::kFloat).square().mean().backward();
    results.insert(results.end(), {logits, emb.grad(), model.layers[0].q_proj.weight.grad()});
  }
  for (size_t i = 0; i < 3; ++i) {
    CHECK(at::equal(results[i], results[i + 3]));
    CHECK(at::equal(results[i], results[i + 6]));
    CHECK(at::equal(results[i], results[i + 9]));
  }
  // A random model: drawn on the device and moved to the host at once, the same weights as one kept there.
  const qt::LlamaConfig shape = qt::load_llama(dir + "/model", {}).config;
  qt::LoadOptions load{at::Device(at::kCUDA, 0), at::kBFloat16};
  const qt::LlamaModel on_device = qt::random_llama(shape, load, 5);
  load.embeddings_on_host = load.lm_head_on_host = true;
  const qt::LlamaModel on_host = qt::random_llama(shape, load, 5);
  CHECK((on_host.embed_tokens.is_pinned() && on_host.lm_head.is_pinned()));
  CHECK(at::equal(on_host.embed_tokens, on_device.embed_tokens.cpu()));
  CHECK(at::equal(on_host.lm_head, on_device.lm_head.cpu()));
  CHECK(at::equal(on_host.layers[1].q_proj.weight.cpu(), on_device.layers[1].q_proj.weight.cpu()));
}

TEST_CASE("llama packed rows through flash varlen attention on CUDA equal the dense-mask path", "[llama][gpu]") {
  REQUIRE(at::hasCUDA());
  const at::Device cuda(at::kCUDA, 0);
  for (const char* name : {"gqa_untied", "mistral_window"}) {
    INFO(name);
    const std::string dir = fixture(std::string("llama/") + name + "/model");
    qt::LlamaModel ref = qt::load_llama(dir, {});  // fp32 CPU: the dense block mask through SDPA
    qt::LlamaModel gpu = qt::load_llama(dir, {cuda, at::kBFloat16});
    const int64_t S = 24;
    at::Tensor ids = at::randint(0, ref.config.vocab_size, {2, S}, at::kLong);
    qt::Batch batch;
    batch.input_ids = ids;
    // Row 0: documents of 10 and 9 tokens, then 5 padding tokens; row 1: one document over the whole row.
    batch.positions = at::stack({at::cat({at::arange(10, at::kLong), at::arange(9, at::kLong), at::zeros({5}, at::kLong)}),
                                 at::arange(S, at::kLong)});
    batch.doc_ids = at::stack({at::cat({at::zeros({10}, at::kInt), at::ones({9}, at::kInt), at::full({5}, -1, at::kInt)}),
                               at::full({S}, 2, at::kInt)});
    REQUIRE(gpu.varlen_mask(batch.doc_ids, cuda, at::kBFloat16).cu_seqlens.defined());  // the flash path is taken
    REQUIRE(!ref.varlen_mask(batch.doc_ids, at::kCPU, at::kFloat).cu_seqlens.defined());
    at::Tensor valid = (batch.doc_ids >= 0).unsqueeze(-1);  // padding outputs carry no target
    at::Tensor e_ref = ref.embed(ids).detach().requires_grad_(true);
    at::Tensor h_ref = ref.forward_hidden(e_ref, batch);
    at::Tensor w = at::randn(h_ref.sizes()) * valid;
    (h_ref * w).sum().backward();
    for (bool checkpoint : {false, true}) {
      INFO("grad_checkpointing " << checkpoint);
      gpu.plan.checkpointing = checkpoint;
      at::Tensor e = gpu.embed(ids.to(cuda)).detach().requires_grad_(true);
      at::Tensor h = gpu.forward_hidden(e, batch);
      (h.to(at::kFloat) * w.to(cuda)).sum().backward();
      CHECK(rel_err(h.to(at::kCPU) * valid, h_ref * valid) < 2e-2);
      CHECK(rel_err(e.grad().to(at::kCPU) * valid, e_ref.grad() * valid) < 5e-2);
    }
  }
}

TEST_CASE("llama rows of one whole document each under cuDNN attention equal the flash varlen path", "[llama][gpu]") {
  REQUIRE(at::hasCUDA());
  const at::Device cuda(at::kCUDA, 0);
  const std::string dir = fixture("llama/gqa_untied/model");
  qt::Batch batch;
  const int64_t B = 2, S = 40;
  at::manual_seed(5);
  batch.input_ids = at::randint(0, 64, {B, S}, at::kLong);
  batch.positions = at::arange(S, at::kLong).expand({B, S}).contiguous();
  batch.doc_ids = at::zeros({B, S}, at::kInt);
  std::vector<at::Tensor> out[2];
  for (int cudnn = 0; cudnn < 2; ++cudnn) {
    qt::LlamaModel model = qt::load_llama(dir, {cuda, at::kBFloat16});
    model.plan.attention = cudnn ? qt::AttentionKernel::Cudnn : qt::AttentionKernel::Flash;
    model.plan.checkpointing = true;
    auto named = model.named_tensors();
    for (auto& [n, t] : named) t->set_requires_grad(true);
    at::Tensor e = model.embed(batch.input_ids.to(cuda)).detach().requires_grad_(true);
    at::Tensor h = model.forward_hidden(e, batch);
    at::manual_seed(6);
    (h.to(at::kFloat) * at::randn(h.sizes()).to(cuda)).sum().backward();
    out[cudnn].push_back(h.detach().to(at::kFloat));
    out[cudnn].push_back(e.grad().to(at::kFloat));
    for (auto& [n, t] : named)
      if (t->grad().defined()) out[cudnn].push_back(t->grad().to(at::kFloat));
  }
  REQUIRE(out[0].size() == out[1].size());
  CHECK(out[0].size() > 10);
  for (size_t i = 0; i < out[0].size(); ++i) {
    INFO("tensor " << i);
    CHECK(rel_err(out[1][i], out[0][i]) < 3e-2);
  }
}

TEST_CASE("cuDNN attention admits a bounded set of shapes: seen ones stay, new ones past the bound fall back", "[llama]") {
  qt::LlamaModel model = qt::load_llama(fixture("llama/gqa_untied/model"), {});
  const int64_t bound = static_cast<int64_t>(qt::LlamaModel::kCudnnShapes);
  for (int64_t s = 1; s <= bound; ++s) CHECK(model.cudnn_admits(1, s));
  CHECK(!model.cudnn_admits(1, bound + 1));  // a generation's next length: SDPA's own order
  CHECK(!model.cudnn_admits(2, 1));          // another batch size is another shape
  CHECK(model.cudnn_admits(1, 1));           // the shapes admitted before keep their plans
  CHECK(model.cudnn_admits(1, bound));
  qt::LlamaModel other = qt::load_llama(fixture("llama/gqa_untied/model"), {});
  CHECK(other.cudnn_admits(1, bound + 1));  // per model
}

TEST_CASE("causal_attention (one node over the fused kernel, grouped K/V) equals SDPA in outputs and gradients", "[llama]") {
  at::manual_seed(9);
  for (int64_t kv_heads : {4, 2, 1}) {
    INFO("key/value heads " << kv_heads);
    at::Tensor q = at::randn({2, 4, 11, 16}).requires_grad_(true);
    at::Tensor k = at::randn({2, kv_heads, 11, 16}).requires_grad_(true);
    at::Tensor v = at::randn({2, kv_heads, 11, 16}).requires_grad_(true);
    at::Tensor w = at::randn({2, 4, 11, 16});
    at::Tensor ref = at::scaled_dot_product_attention(q, k, v, std::nullopt, 0.0, true, 0.25, /*enable_gqa=*/kv_heads != 4);
    auto ref_grads = torch::autograd::grad({(ref * w).sum()}, {q, k, v});
    at::Tensor out = qt::causal_attention(q, k, v, 0.25, false, nullptr);
    auto grads = torch::autograd::grad({(out * w).sum()}, {q, k, v});
    CHECK(rel_err(out, ref) < 1e-5);
    for (int i = 0; i < 3; ++i) CHECK(rel_err(grads[i], ref_grads[i]) < 1e-5);
    // A stash in replay mode gives its output back without running the kernel; the backward uses its lse.
    qt::AttentionStash stash;
    {
      at::NoGradGuard no_grad;  // as in a checkpointed block's forward pass
      qt::causal_attention(q, k, v, 0.25, false, &stash);  // record
    }
    REQUIRE(stash.out.defined());
    stash.replay = true;
    REQUIRE(stash.forward_runs == 1);
    at::Tensor again = qt::causal_attention(q, k, v, 0.25, false, &stash);
    CHECK(stash.forward_runs == 1);
    auto replay_grads = torch::autograd::grad({(again * w).sum()}, {q, k, v});
    CHECK(at::equal(again.detach(), out.detach()));
    for (int i = 0; i < 3; ++i) CHECK(rel_err(replay_grads[i], grads[i]) < 1e-6);
  }
}

TEST_CASE("keep_attention replays the attention output in the recomputation: same outputs and gradients, one attention forward per block", "[llama]") {
  for (const char* name : {"gqa_untied", "llama2_mha"}) {
    INFO(name);
    auto run = [&](bool keep, bool checkpoint, int64_t* forwards) {
      qt::LlamaModel model = qt::load_llama(fixture(std::string("llama/") + name + "/model"), {});
      model.plan.checkpointing = checkpoint;
      model.plan.keep = (keep) ? qt::KeepLevel::Attention : qt::KeepLevel::Input;
      auto named = model.named_tensors();
      for (auto& [n, t] : named) t->set_requires_grad(true);
      at::manual_seed(12);
      at::Tensor ids = at::randint(0, model.config.vocab_size, {2, 13}, at::kLong);
      at::Tensor w = at::randn({2, 13, model.config.hidden_size});
      at::Tensor h = model.forward_hidden(model.embed(ids));
      (h * w).sum().backward();
      *forwards = model.stats->attention_forwards;
      std::vector<at::Tensor> out{h.detach()};
      for (auto& [n, t] : named)
        if (t->grad().defined()) out.push_back(t->grad().clone());
      return std::make_pair(out, model.config.num_hidden_layers);
    };
    int64_t plain_runs = -1, kept_runs = -1, unckpt_runs = -1;
    auto [plain, layers] = run(false, true, &plain_runs);
    auto [kept, layers2] = run(true, true, &kept_runs);
    run(true, false, &unckpt_runs);
    CHECK(plain_runs == 0);          // SDPA, recomputed in the backward pass
    CHECK(kept_runs == layers);      // one forward per block: the recomputation replays it
    CHECK(unckpt_runs == 0);         // without checkpointing there is nothing to replay
    REQUIRE(plain.size() == kept.size());
    CHECK(plain.size() > 10);
    for (size_t i = 0; i < plain.size(); ++i) {
      INFO("tensor " << i);
      CHECK(rel_err(kept[i], plain[i]) < 1e-5);
    }
  }
}

TEST_CASE("keep_attention on CUDA (cuDNN and FlashAttention-2, bf16, block inputs offloaded or not) equals the recomputation",
          "[llama][gpu]") {
  REQUIRE(at::hasCUDA());
  const at::Device cuda(at::kCUDA, 0);
  for (auto kernel : {qt::AttentionKernel::Cudnn, qt::AttentionKernel::Flash})
    for (bool offload : {false, true}) {
      INFO((kernel == qt::AttentionKernel::Cudnn ? "cuDNN" : "flash") << (offload ? ", offloaded" : ""));
      std::vector<at::Tensor> out[2];
      int64_t runs[2] = {0, 0};
      int64_t layers = 0;
      for (int keep = 0; keep < 2; ++keep) {
        qt::LlamaModel model = qt::load_llama(fixture("llama/gqa_untied/model"), {cuda, at::kBFloat16});
        model.plan.checkpointing = true;
        model.plan.offload = offload;
        model.plan.attention = kernel;
        model.plan.keep = (keep == 1) ? qt::KeepLevel::Attention : qt::KeepLevel::Input;
        layers = model.config.num_hidden_layers;
        auto named = model.named_tensors();
        for (auto& [n, t] : named) t->set_requires_grad(true);
        at::manual_seed(21);
        at::Tensor ids = at::randint(0, model.config.vocab_size, {2, 40}, at::kLong).to(cuda);
        at::Tensor w = at::randn({2, 40, model.config.hidden_size}).to(cuda);
        at::Tensor h = model.forward_hidden(model.embed(ids));
        (h.to(at::kFloat) * w).sum().backward();
        runs[keep] = model.stats->attention_forwards;
        out[keep].push_back(h.detach().to(at::kFloat));
        for (auto& [n, t] : named)
          if (t->grad().defined()) out[keep].push_back(t->grad().to(at::kFloat));
      }
      CHECK(runs[0] == 0);
      CHECK(runs[1] == layers);
      REQUIRE(out[0].size() == out[1].size());
      for (size_t i = 0; i < out[0].size(); ++i) {
        INFO("tensor " << i);
        CHECK(rel_err(out[1][i], out[0][i]) < 3e-2);
      }
    }
}

TEST_CASE("offloaded block inputs, fetched ahead in the backward pass, give the gradients of inputs kept on the GPU",
          "[llama][gpu]") {
  REQUIRE(at::hasCUDA());
  const at::Device cuda(at::kCUDA, 0);
  for (bool keep : {false, true}) {
    INFO("keep_attention " << keep);
    std::vector<at::Tensor> out[2];
    int64_t prefetched[2] = {0, 0}, layers = 0;
    for (int offload = 0; offload < 2; ++offload) {
      qt::LlamaModel model = qt::load_llama(fixture("llama/gqa_untied/model"), {cuda, at::kBFloat16});
      model.plan.checkpointing = true;
      model.plan.offload = offload == 1;
      model.plan.attention = qt::AttentionKernel::Cudnn;
      model.plan.keep = (keep) ? qt::KeepLevel::Attention : qt::KeepLevel::Input;
      layers = model.config.num_hidden_layers;
      auto named = model.named_tensors();
      for (auto& [n, t] : named) t->set_requires_grad(true);
      for (int step = 0; step < 2; ++step) {  // the second step reuses the pinned buffers of the first
        at::manual_seed(31 + step);
        at::Tensor ids = at::randint(0, model.config.vocab_size, {2, 48}, at::kLong).to(cuda);
        at::Tensor w = at::randn({2, 48, model.config.hidden_size}).to(cuda);
        for (auto& [n, t] : named)
          if (t->grad().defined()) t->mutable_grad() = at::Tensor();
        at::Tensor h = model.forward_hidden(model.embed(ids));
        (h.to(at::kFloat) * w).sum().backward();
        out[offload].push_back(h.detach().to(at::kFloat));
        for (auto& [n, t] : named)
          if (t->grad().defined()) out[offload].push_back(t->grad().to(at::kFloat));
      }
      prefetched[offload] = model.stats->prefetched_offloads.load();
    }
    CHECK(prefetched[0] == 0);
    // Every block but the first one back fetches its input ahead (and its attention output and softmax statistics
    // with keep_attention: three offloaded tensors a block since the tenth session).
    CHECK(prefetched[1] == 2 * (layers - 1) * (keep ? 3 : 1));
    REQUIRE(out[0].size() == out[1].size());
    CHECK(out[0].size() > 20);
    for (size_t i = 0; i < out[0].size(); ++i) {
      INFO("tensor " << i);
      CHECK(rel_err(out[1][i], out[0][i]) < 2e-2);  // bf16, kernels free to reorder sums; a wrong input gives ~1
    }
  }
}

TEST_CASE("llama MLP over chunks of tokens gives the unchunked outputs and gradients", "[llama]") {
  for (bool checkpoint : {false, true}) {
    INFO("grad_checkpointing " << checkpoint);
    int64_t skipped = 0, chunked_passes = 0;
    auto run = [&](int64_t chunk) {
      qt::LlamaModel model = qt::load_llama(fixture("llama/gqa_untied/model"), {});
      model.plan.checkpointing = checkpoint;
      model.plan.mlp_chunk_tokens = chunk;
      const std::shared_ptr<qt::ModelStats> stats = model.stats;
      auto named = model.named_tensors();
      for (auto& [n, t] : named) t->set_requires_grad(true);
      at::manual_seed(11);
      at::Tensor ids = at::randint(0, model.config.vocab_size, {2, 13}, at::kLong);
      at::Tensor w = at::randn({2, 13, model.config.hidden_size});
      at::Tensor h = model.forward_hidden(model.embed(ids));
      (h * w).sum().backward();
      std::vector<at::Tensor> out{h.detach()};
      for (auto& [n, t] : named)
        if (t->grad().defined()) out.push_back(t->grad().clone());  // lm_head takes no part in the hidden states
      skipped += stats->outputs_skipped.load();
      chunked_passes += stats->mlp_chunked_passes.load();
      return out;
    };
    std::vector<at::Tensor> plain = run(0), chunked = run(5);  // 26 tokens: chunks of 5, 5, 5, 5, 5, 1
    // Each block's forward pass runs its MLP in chunks, the checkpointed ones' too (no graph there).
    CHECK(chunked_passes == 2);
    // Under checkpointing each block's recomputation leaves the chunked MLP's output unwritten (its backward
    // recomputes the chunks); the dense base without LoRA computes its down_proj as ever.
    CHECK(skipped == (checkpoint ? 2 : 0));
    REQUIRE(plain.size() == chunked.size());
    CHECK(plain.size() > 20);  // the hidden states and the gradients of every block tensor
    for (size_t i = 0; i < plain.size(); ++i) {
      INFO("tensor " << i);
      CHECK(rel_err(chunked[i], plain[i]) < 1e-5);
    }
  }
}
