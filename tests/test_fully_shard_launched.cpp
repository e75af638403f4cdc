// FullyShard (lib/dist/fully_shard.h) under mpirun -np 2 and 3 ("[fsdp]", run by tests/dist_driver.cpp with one
// intra-op thread per rank). Every rank builds the same small NF4 LLaMA with LoRA from fixed seeds, so each can
// compute the single-process reference (the whole global batch, an unsharded model) itself and compare its
// shards, losses and updates with it.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/grad_mode.h>

#include <chrono>
#include <cmath>

#include "lib/core/error.h"
#include "lib/comm/communicator.h"
#include "lib/model/llama.h"
#include "lib/model/lora.h"
#include "lib/quant/nf4.h"
#include "lib/dist/parallel.h"
#include "lib/train/adamw.h"
#include "lib/dist/fully_shard.h"
#include "tests/catch.h"
#include "tests/test_util.h"

namespace {

using qt::Communicator;

const qt::CommOptions kTestOptions{std::chrono::seconds(60), /*nccl_for_one_rank=*/true};

using qt::test::rel_err;

// A 2-layer NF4 LLaMA (hidden 128, GQA) with LoRA r=6 on every linear, B random so that A gets gradients too.
// Identical on every rank and for every call.
qt::LlamaModel make_model(at::Device device = at::kCPU, bool tied = false) {
  qt::LlamaConfig c = qt::test::tiny_llama_config(61);
  c.rms_norm_eps = 1e-5;
  qt::LlamaModel m(c);
  auto gen = at::make_generator<at::CPUGeneratorImpl>(7);
  auto rnd = [&](std::vector<int64_t> shape, double s) { return at::randn(shape, gen, at::kFloat) * s; };
  m.embed_tokens = rnd({c.vocab_size, c.hidden_size}, 1.0).to(device);
  m.lm_head = rnd({c.vocab_size, c.hidden_size}, 0.1).to(device);
  if (tied) {
    m.config.tie_word_embeddings = true;
    m.lm_head = m.embed_tokens;
  }
  m.norm = (1 + rnd({c.hidden_size}, 0.1)).to(device);
  for (auto& b : m.layers) {
    b.input_layernorm = (1 + rnd({c.hidden_size}, 0.1)).to(device);
    b.post_attention_layernorm = (1 + rnd({c.hidden_size}, 0.1)).to(device);
    auto q = [&](qt::Linear& l, int64_t out, int64_t in) {
      l.nf4 = std::make_shared<qt::Nf4Weight>(qt::quantize_nf4(rnd({out, in}, 0.05)).to(device));
    };
    q(b.q_proj, c.q_size(), c.hidden_size);
    q(b.k_proj, c.kv_size(), c.hidden_size);
    q(b.v_proj, c.kv_size(), c.hidden_size);
    q(b.o_proj, c.hidden_size, c.q_size());
    q(b.gate_proj, c.intermediate_size, c.hidden_size);
    q(b.up_proj, c.intermediate_size, c.hidden_size);
    q(b.down_proj, c.hidden_size, c.intermediate_size);
  }
  qt::LoraConfig lc;
  lc.r = 6;
  lc.alpha = 12;
  qt::attach_lora(m, lc, /*seed=*/11, device);
  m.for_each_linear([&](const std::string&, qt::Linear& l) {
    l.lora->B = rnd({l.out_features(), lc.r}, 0.05).to(device).set_requires_grad(true);
  });
  m.plan.checkpointing = true;
  return m;
}

// Rank r's rows of the global batch (ids and next-token targets), 2 rows of 9 tokens each.
std::pair<at::Tensor, at::Tensor> global_batch(int world) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(123);
  at::Tensor ids = at::randint(0, 61, {2 * world, 10}, gen, at::TensorOptions().dtype(at::kLong));
  return {ids.narrow(1, 0, 9).contiguous(), ids.narrow(1, 1, 9).contiguous()};
}

// As the trainer runs a micro-batch: the embeddings and lm_head gathered around their use when sharded.
at::Tensor loss_sum(const qt::LlamaModel& m, const at::Tensor& ids, const at::Tensor& targets,
                    qt::FullyShard* fs = nullptr) {
  at::Tensor embeds;
  {
    qt::GatherScope g(fs, qt::FullyShard::Root::Embeddings);
    embeds = m.embed(ids);
  }
  at::Tensor hidden = m.forward_hidden(embeds);
  qt::GatherScope g(fs, qt::FullyShard::Root::LmHead);
  at::Tensor logits = m.logits(hidden);
  return at::cross_entropy_loss(logits.reshape({-1, logits.size(-1)}), targets.reshape({-1}), {}, at::Reduction::Sum);
}

}  // namespace

TEST_CASE("FullyShard keeps 1/N of each block per rank and gathers the exact unsharded tensors", "[.fsdp]") {
  auto comm = qt::make_communicator(qt::read_launch_env(), at::kCPU, kTestOptions);
  const int N = comm->world_size();
  REQUIRE(N > 1);
  qt::LlamaModel ref = make_model();
  qt::LlamaModel m = make_model();
  qt::FullyShard fs(m, *comm);
  // Between blocks the model holds no block tensor: its block parameters are the shards, about 1/N.
  CHECK(fs.gathered_bytes() == 0);
  CHECK(!m.layers[0].q_proj.nf4->data.packed.defined());
  CHECK(!m.layers[1].input_layernorm.defined());
  const double ratio = static_cast<double>(fs.sharded_bytes()) * N / static_cast<double>(fs.unsharded_bytes());
  INFO("sharded bytes per rank " << fs.sharded_bytes() << " of " << fs.unsharded_bytes());
  CHECK(ratio >= 1.0);
  CHECK(ratio < 1.02);  // padding to whole rows only
  for (size_t i = 0; i < m.layers.size(); ++i) {
    fs.before_block(i, false);
    const auto& a = ref.layers[i];
    const auto& b = m.layers[i];
    CHECK(at::equal(a.input_layernorm, b.input_layernorm));
    CHECK(at::equal(a.post_attention_layernorm, b.post_attention_layernorm));
    for (auto [la, lb] : {std::pair{&a.q_proj, &b.q_proj}, {&a.v_proj, &b.v_proj}, {&a.down_proj, &b.down_proj}}) {
      CHECK(at::equal(la->nf4->data.packed, lb->nf4->data.packed));
      CHECK(at::equal(la->nf4->data.absmax_q, lb->nf4->data.absmax_q));
      CHECK(at::equal(la->nf4->data.nested_absmax, lb->nf4->data.nested_absmax));
      CHECK(at::equal(la->nf4->data.quant_map, lb->nf4->data.quant_map));
      CHECK(at::equal(la->lora->A, lb->lora->A));
      CHECK(at::equal(la->lora->B, lb->lora->B));
      CHECK(at::equal(la->base_weight(at::kFloat), lb->base_weight(at::kFloat)));
    }
    CHECK(fs.gathered_bytes() > 0);
    fs.after_block(i, false);
    CHECK(fs.gathered_bytes() == 0);
  }
}

// The single-process reference against FullyShard over `comm`, each rank on its rows of the global batch.
static void check_against_one_process(Communicator& comm_ref, at::Device device, bool shard_embeddings = false,
                                      bool tied = false) {
  Communicator* comm = &comm_ref;
  const int N = comm->world_size(), rank = comm->rank();
  auto [ids_cpu, targets_cpu] = global_batch(N);
  at::Tensor ids = ids_cpu.to(device), targets = targets_cpu.to(device);
  const double count = static_cast<double>(targets.numel());
  const qt::AdamWOptions ao{0.9, 0.999, 1e-8, 0.01};

  // One process, the whole global batch, nothing sharded.
  qt::LlamaModel ref = make_model(device, tied);
  ref.plan.checkpointing = false;
  auto ref_params = qt::lora_parameters(ref);
  at::Tensor ref_loss = loss_sum(ref, ids, targets) / count;
  ref_loss.backward();
  std::vector<at::Tensor> ref_grads;
  for (const auto& [n, p] : ref_params) ref_grads.push_back(p.grad().clone());
  const double ref_norm = qt::clip_grad_norm(ref_params, 0.5);
  qt::AdamW ref_opt(ref_params, ao);
  ref_opt.step(1e-2);

  // Sharded: this rank's rows only; the loss normalised by the global count, as the trainer does.
  qt::LlamaModel m = make_model(device, tied);
  qt::FullyShardOptions so;
  so.shard_embeddings = shard_embeddings;
  qt::FullyShard fs(m, *comm, so);
  auto params = fs.parameters();
  REQUIRE(params.size() == ref_params.size());
  at::Tensor local = loss_sum(m, ids.narrow(0, 2 * rank, 2), targets.narrow(0, 2 * rank, 2), &fs) / count;
  local.backward();
  CHECK(fs.gathered_bytes() == 0);  // the backward pass freed every block again
  at::Tensor total = local.detach().reshape({1}).clone();
  comm->all_reduce(total);
  CHECK(std::abs(total.item<double>() - ref_loss.item<double>()) <= 1e-5 * std::abs(ref_loss.item<double>()));
  for (size_t k = 0; k < params.size(); ++k) {
    INFO(params[k].first);
    REQUIRE(params[k].first == ref_params[k].first);
    REQUIRE(params[k].second.grad().defined());
    CHECK(rel_err(params[k].second.grad(), fs.shard_of(params[k].first, ref_grads[k])) < 1e-4);
  }
  const double norm = fs.clip_grad_norm(0.5);
  CHECK(std::abs(norm - ref_norm) <= 1e-5 * ref_norm);
  qt::AdamW opt(params, ao);
  opt.step(1e-2);
  for (size_t k = 0; k < params.size(); ++k) {
    INFO(params[k].first);
    at::Tensor want = fs.shard_of(params[k].first, ref_params[k].second.detach());
    CHECK(rel_err(params[k].second, want) < 1e-5);
  }
  // The gathered adapter (what rank 0 exports) is the single-process one; released again afterwards.
  fs.gather_lora();
  size_t k = 0;
  m.for_each_linear([&](const std::string& name, qt::Linear& l) {
    INFO(name);
    CHECK(rel_err(l.lora->A, ref_params[k++].second) < 1e-5);
    CHECK(rel_err(l.lora->B, ref_params[k++].second) < 1e-5);
  });
  fs.release_lora();
  CHECK(fs.gathered_bytes() == 0);
  // Held-out style forwards without autograd gather and free too (and match the reference).
  {
    at::NoGradGuard no_grad;
    CHECK(rel_err(loss_sum(m, ids, targets, &fs), loss_sum(ref, ids, targets)) < 1e-5);
    CHECK(fs.gathered_bytes() == 0);
  }
}

TEST_CASE("FullyShard on each rank's rows gives one process's loss, gradients and AdamW step", "[.fsdp]") {
  auto comm = qt::make_communicator(qt::read_launch_env(), at::kCPU, kTestOptions);
  check_against_one_process(*comm, at::kCPU);
}

TEST_CASE("FullyShard with sharded embeddings and lm_head (untied and tied) gives one process's step", "[.fsdp]") {
  auto comm = qt::make_communicator(qt::read_launch_env(), at::kCPU, kTestOptions);
  const int N = comm->world_size();
  for (bool tied : {false, true}) {
    INFO("tied " << tied);
    qt::LlamaModel ref = make_model(at::kCPU, tied);
    qt::LlamaModel m = make_model(at::kCPU, tied);
    qt::FullyShardOptions so;
    so.shard_embeddings = true;
    qt::FullyShard fs(m, *comm, so);
    // Released: a [0, hidden] tensor of the right dtype and device; each rank holds ~1/N of everything sharded.
    CHECK(m.embed_tokens.size(0) == 0);
    CHECK(m.embed_tokens.size(1) == ref.embed_tokens.size(1));
    CHECK(m.dtype() == ref.dtype());
    CHECK(m.lm_head.size(0) == 0);
    const int64_t embed_bytes = ref.embed_tokens.nbytes() + (tied ? 0 : ref.lm_head.nbytes());
    qt::LlamaModel other = make_model(at::kCPU, tied);
    qt::FullyShard blocks_only(other, *comm);
    CHECK(fs.unsharded_bytes() == blocks_only.unsharded_bytes() + embed_bytes);
    const double ratio = static_cast<double>(fs.sharded_bytes()) * N / static_cast<double>(fs.unsharded_bytes());
    CHECK(ratio >= 1.0);
    CHECK(ratio < 1.02);
    {
      qt::GatherScope e(&fs, qt::FullyShard::Root::Embeddings);
      CHECK(at::equal(m.embed_tokens, ref.embed_tokens));
      qt::GatherScope h(&fs, qt::FullyShard::Root::LmHead);
      CHECK(at::equal(m.lm_head, ref.lm_head));
    }
    CHECK(m.embed_tokens.size(0) == 0);
    CHECK(m.lm_head.size(0) == 0);
    CHECK(fs.gathered_bytes() == 0);
    check_against_one_process(*comm, at::kCPU, /*shard_embeddings=*/true, tied);
  }
}

TEST_CASE("FullyShard through NCCL (gathers prefetched on the communicator's stream) gives one process's step", "[gpu]") {
  auto comm = qt::make_communicator(qt::read_launch_env(), at::Device(at::kCUDA), kTestOptions);
  REQUIRE(std::string(comm->backend()) == "nccl");
  check_against_one_process(*comm, comm->device());
  comm->barrier();
}

TEST_CASE("FullyShard refuses a model without grad checkpointing", "[.fsdp]") {
  auto comm = qt::make_communicator(qt::read_launch_env(), at::kCPU, kTestOptions);
  qt::LlamaModel m = make_model();
  m.plan.checkpointing = false;
  try {
    qt::FullyShard fs(m, *comm);
    FAIL("no error");
  } catch (const qt::Error& e) {
    CHECK(e.kind() == qt::ErrorKind::Config);
    CHECK(std::string(e.what()).find("train.memory.checkpointing") != std::string::npos);
  }
}
