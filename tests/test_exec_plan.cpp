// The execution plan's arithmetic (lib/model/exec_plan.h), on the CPU: a budget, a row shape and a model give a
// plan; no budget gives the measured defaults; a smaller budget never gives a plan that needs more; what cannot fit
// is refused with the figure it needs; forced fields are honoured or named when they contradict each other.
#include <cmath>
#include <optional>
#include <string>

#include "lib/core/error.h"
#include "lib/model/exec_plan.h"
#include "lib/model/random_init.h"
#include "tests/catch.h"
#include "tests/test_util.h"

namespace {

constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;

qt::PlanInputs inputs(const std::string& shape, int64_t micro, int64_t seq, bool cuda = true) {
  qt::PlanInputs in;
  in.model = qt::shape_config(shape, "test", "shape");
  in.micro_batch = micro;
  in.seq = seq;
  in.cuda = cuda;
  in.host_bytes = uint64_t{125} << 30;
  const auto& c = in.model;
  const int64_t H = c.hidden_size, I = c.intermediate_size;
  // LoRA r=16 on all seven linears.
  in.lora_params = c.num_hidden_layers * 16 *
                   ((H + c.q_size()) * 2 + (H + c.kv_size()) * 2 + (H + I) * 3);
  in.file = "run.json";
  return in;
}

std::optional<qt::Error> error_of(const qt::PlanInputs& in, const qt::PlanRequest& r, double free_gib = -1) {
  return qt::test::caught([&] { qt::decide_plan(in, r, free_gib); });
}

using qt::test::has;

}  // namespace

TEST_CASE("without a budget the plan is the measured defaults of each bench row", "[plan]") {
  struct Row {
    const char* shape;
    int64_t micro, seq;
    bool offload, keep_dequantized;
    qt::KeepLevel keep;
    int64_t chunk;
  };
  // Offload and q, k, v kept from 4096 tokens a micro-batch, the 16-bit weights kept below 8192, the MLP chunked
  // above 32768 (docs/PERFORMANCE.md measured each on an H200).
  for (const Row& r : {Row{"llama-3.1-8b", 2, 2048, true, true, qt::KeepLevel::Qkv, 0},
                       Row{"llama-3.1-8b", 1, 8192, true, false, qt::KeepLevel::Qkv, 0},
                       Row{"llama-3.2-1b", 4, 2048, true, false, qt::KeepLevel::Qkv, 0},
                       Row{"llama-3.1-8b", 1, 32768, true, false, qt::KeepLevel::Qkv, 0},
                       Row{"llama-3.1-8b", 1, 65536, true, false, qt::KeepLevel::Qkv, 8192},
                       Row{"llama-3.1-8b", 1, 2048, false, true, qt::KeepLevel::Input, 0}}) {
    INFO(r.shape << " " << r.micro << " x " << r.seq);
    const qt::Decision d = qt::decide_plan(inputs(r.shape, r.micro, r.seq), qt::PlanRequest{}, /*free_gib=*/-1);
    CHECK(d.plan.checkpointing);
    CHECK(d.plan.offload == r.offload);
    CHECK(d.plan.keep == r.keep);
    CHECK(d.plan.keep_dequantized == r.keep_dequantized);
    CHECK(d.plan.mlp_chunk_tokens == r.chunk);
    CHECK(d.plan.attention == qt::AttentionKernel::Cudnn);
    CHECK(d.plan.expandable_segments);
    CHECK(!d.plan.embeddings_on_host);
    CHECK(!d.plan.lm_head_on_host);
    CHECK(d.budget_gib < 0);
  }
  // Half the host too small for the kept tensors: the ladder steps down to what it holds.
  qt::PlanInputs small = inputs("llama-3.1-8b", 1, 65536);
  small.host_bytes = uint64_t{100} << 30;  // qkv at 64k tokens: 56 GiB > 50; attention's 32 GiB fits
  CHECK(qt::decide_plan(small, {}).plan.keep == qt::KeepLevel::Attention);
  small.host_bytes = uint64_t{8} << 30;
  CHECK(qt::decide_plan(small, {}).plan.keep == qt::KeepLevel::Input);
  // On the CPU: nothing to offload, nothing on the host, no allocator settings, no budget.
  const qt::Decision cpu = qt::decide_plan(inputs("llama-3.2-1b", 2, 512, /*cuda=*/false), {});
  CHECK(cpu.plan.checkpointing);
  CHECK(!cpu.plan.offload);
  CHECK(!cpu.plan.expandable_segments);
  CHECK(cpu.footprint.terms.front().second == 0.0);  // no CUDA context
}

TEST_CASE("the footprint names its terms; NF4 weights, embeddings and lm_head at their byte sizes", "[plan]") {
  const qt::PlanInputs in = inputs("llama-3.1-8b", 2, 2048);
  const qt::Decision d = qt::decide_plan(in, {});
  double sum = 0, weights = 0, embed = 0, head = 0;
  for (const auto& [name, bytes] : d.footprint.terms) {
    sum += bytes;
    if (name == "base_weights") weights = bytes;
    if (name == "embeddings") embed = bytes;
    if (name == "lm_head") head = bytes;
  }
  CHECK(sum == d.footprint.total());
  // 6.98 B block parameters at 0.5159 bytes (4-bit codes, 8-bit absmax per 64, fp32 per 256 of those).
  CHECK(weights > 3.55e9);
  CHECK(weights < 3.65e9);
  CHECK(embed == 128256.0 * 4096 * 2);
  CHECK(head == embed);
  const qt::Json j = qt::to_json(d);
  CHECK(std::abs(j["predicted_gib"]["total"].get<double>() - d.footprint.total() / kGiB) < 1e-3);
  CHECK(j["keep"] == "qkv");
  CHECK(has(qt::describe(d), "checkpointing, offloaded, keep qkv"));
  // Host placement takes the tensors off the device; tied embeddings are one tensor.
  qt::PlanRequest host;
  host.embeddings_on_host = host.lm_head_on_host = true;
  const qt::Decision h = qt::decide_plan(in, host);
  CHECK(h.plan.embeddings_on_host);
  CHECK(h.plan.lm_head_on_host);
  CHECK(d.footprint.total() - h.footprint.total() > 1.9 * 128256.0 * 4096);
  qt::PlanRequest embed_only;
  embed_only.embeddings_on_host = true;
  const qt::Decision tied = qt::decide_plan(inputs("llama-3.2-1b", 4, 2048), embed_only);
  CHECK(tied.plan.embeddings_on_host);
  CHECK(tied.plan.lm_head_on_host);  // the one tensor moves in both roles
}

TEST_CASE("a budget picks the fastest plan that fits; a smaller budget never needs more; too small is refused",
          "[plan]") {
  for (auto [shape, micro, seq] : {std::tuple{"llama-3.1-8b", 1, 8192}, std::tuple{"llama-3.1-8b", 2, 2048},
                                   std::tuple{"llama-3.2-1b", 4, 2048}}) {
    INFO(shape << " " << micro << " x " << seq);
    const qt::PlanInputs in = inputs(shape, micro, seq);
    const double fastest = qt::decide_plan(in, {}).footprint.total() / kGiB;
    double last = 1e30;
    int refused = 0, leaner = 0;
    for (double budget = fastest + 2; budget > 0.5; budget -= 0.25) {
      qt::PlanRequest r;
      r.gpu_memory_gib = budget;
      const auto e = error_of(in, r);
      if (e) {
        ++refused;
        CHECK(e->kind() == qt::ErrorKind::Config);
        CHECK(has(e->what(), "train.memory.gpu_memory_gib"));
        CHECK(has(e->what(), "needs"));
        CHECK(has(e->what(), "train.micro_batch_size"));
        continue;
      }
      CHECK(refused == 0);  // once refused, every smaller budget is refused too
      const qt::Decision d = qt::decide_plan(in, r);
      CHECK(d.footprint.total() <= budget * kGiB);
      CHECK(d.footprint.total() <= last);
      if (d.footprint.total() < last && last < 1e30) ++leaner;
      last = d.footprint.total();
    }
    CHECK(refused > 0);
    CHECK(leaner >= 2);  // the ladder took several steps down
  }
  // The device's free memory is the budget when none is given, less a margin.
  const qt::PlanInputs in = inputs("llama-3.1-8b", 1, 8192);
  const auto e = error_of(in, {}, /*free_gib=*/4.0);
  REQUIRE(e);
  CHECK(has(e->what(), "free memory (4.00 GiB, its 0.50 GiB context included"));
  // Under 7.5 GiB, 8B at 8k keeps the embeddings on the host and chunks the MLP with lm_head still on the device;
  // under 6.3 the ladder streams lm_head from the host too (8B 1 x 8192 completed so at 6.25 GiB on an H200).
  qt::PlanRequest r;
  r.gpu_memory_gib = 7.5;
  const qt::Decision lean = qt::decide_plan(in, r);
  CHECK(lean.plan.embeddings_on_host);
  CHECK(lean.plan.mlp_chunk_tokens > 0);
  CHECK(!lean.plan.lm_head_on_host);
  r.gpu_memory_gib = 6.3;
  const qt::Decision streamed = qt::decide_plan(in, r);
  CHECK(streamed.plan.lm_head_on_host);
  CHECK(streamed.footprint.total() < lean.footprint.total());
  CHECK(streamed.footprint.total() <= 6.3 * kGiB);
  // Forced to stay on the device, lm_head is not streamed, and 6.3 GiB is refused.
  r.lm_head_on_host = false;
  CHECK(error_of(in, r));
}

TEST_CASE("checkpointing auto: without it where the budget allows, with it where not", "[plan]") {
  const qt::PlanInputs in = inputs("llama-3.1-8b", 2, 2048);
  qt::PlanRequest r;
  r.checkpointing_auto = true;
  r.gpu_memory_gib = 80;
  CHECK(!qt::decide_plan(in, r).plan.checkpointing);
  r.gpu_memory_gib = 12;
  CHECK(qt::decide_plan(in, r).plan.checkpointing);
  // Forced off, the plan runs without it whatever the budget.
  qt::PlanRequest off;
  off.checkpointing = false;
  CHECK(!qt::decide_plan(in, off).plan.checkpointing);
  // Between the two: the last blocks without checkpointing, more of them the more the budget holds; each step of
  // the sweep predicts no more than the budget and no less than a smaller budget's plan.
  const double none = qt::decide_plan(in, [] {
                        qt::PlanRequest q;
                        q.checkpointing = false;
                        return q;
                      }()).footprint.total() / kGiB;
  const double all = qt::decide_plan(in, [] {
                       qt::PlanRequest q;
                       q.gpu_memory_gib = 1000;
                       return q;
                     }()).footprint.total() / kGiB;
  REQUIRE(none > all + 1);
  int64_t last_whole = -1, partial = 0;
  for (double b = all; b < none; b += (none - all) / 40) {
    INFO("budget " << b);
    r.gpu_memory_gib = b;
    const qt::Decision d = qt::decide_plan(in, r);
    CHECK(d.plan.checkpointing);
    CHECK(d.footprint.total() <= b * kGiB);
    CHECK(d.plan.blocks_without_checkpointing >= last_whole);
    CHECK(d.plan.blocks_without_checkpointing < in.model.num_hidden_layers);
    last_whole = d.plan.blocks_without_checkpointing;
    if (last_whole > 0) ++partial;
  }
  CHECK(partial > 0);
  CHECK(last_whole == 3 * in.model.num_hidden_layers / 4);
  // Forced: kept as asked; refused without checkpointing, for every block, or with sharded blocks.
  qt::PlanRequest forced;
  forced.blocks_without_checkpointing = 5;
  forced.gpu_memory_gib = 1000;
  const qt::Decision f = qt::decide_plan(in, forced);
  CHECK(f.plan.checkpointing);
  CHECK(f.plan.blocks_without_checkpointing == 5);
  CHECK(has(qt::describe(f), "the last 5 blocks without"));
  forced.checkpointing = false;
  auto e = error_of(in, forced);
  REQUIRE(e);
  CHECK(has(e->what(), "train.memory.blocks_without_checkpointing"));
  forced.checkpointing = true;
  forced.blocks_without_checkpointing = in.model.num_hidden_layers;
  e = error_of(in, forced);
  REQUIRE(e);
  CHECK(has(e->what(), "at most 31"));
  qt::PlanInputs sharded = in;
  sharded.sharded = true;
  sharded.world = 2;
  forced.blocks_without_checkpointing = 1;
  e = error_of(sharded, forced);
  REQUIRE(e);
  CHECK(has(e->what(), "train.shard"));
}

TEST_CASE("forced plan fields are kept; contradictions name both keys", "[plan]") {
  const qt::PlanInputs in = inputs("llama-3.1-8b", 1, 8192);
  qt::PlanRequest forced;
  forced.keep = qt::KeepLevel::Attention;
  forced.keep_dequantized = true;
  forced.attention = qt::AttentionKernel::Flash;
  forced.expandable_segments = false;
  forced.gpu_memory_gib = 10.0;  // tight: the ladder moves what was not forced
  const qt::Decision d = qt::decide_plan(in, forced);
  CHECK(d.plan.keep == qt::KeepLevel::Attention);
  CHECK(d.plan.keep_dequantized);
  CHECK(d.plan.attention == qt::AttentionKernel::Flash);
  CHECK(!d.plan.expandable_segments);

  qt::PlanRequest r;
  r.checkpointing = false;
  r.keep = qt::KeepLevel::Qkv;
  auto e = error_of(in, r);
  REQUIRE(e);
  CHECK(has(e->what(), "train.memory.keep"));
  CHECK(has(e->what(), "train.memory.checkpointing"));
  r = {};
  r.checkpointing = false;
  r.offload = true;
  e = error_of(in, r);
  REQUIRE(e);
  CHECK(has(e->what(), "train.memory.offload"));
  CHECK(has(e->what(), "train.memory.checkpointing"));
  r = {};
  r.keep = qt::KeepLevel::Qkv;
  r.offload = false;
  e = error_of(in, r);
  REQUIRE(e);
  CHECK(has(e->what(), "train.memory.offload"));
  // Tied embeddings: one tensor, one place.
  r = {};
  r.embeddings_on_host = true;
  r.lm_head_on_host = false;
  e = error_of(inputs("llama-3.2-1b", 1, 2048), r);
  REQUIRE(e);
  CHECK(has(e->what(), "train.memory.embeddings"));
  CHECK(has(e->what(), "train.memory.lm_head"));
  // Trained embeddings stay on the device.
  qt::PlanInputs trained = in;
  trained.embeddings_trained = true;
  r = {};
  r.embeddings_on_host = true;
  e = error_of(trained, r);
  REQUIRE(e);
  CHECK(has(e->what(), "lora.modules_to_save"));
  // ... and the budget ladder never moves them.
  r = {};
  r.gpu_memory_gib = 7.0;
  if (!error_of(trained, r)) CHECK(!qt::decide_plan(trained, r).plan.embeddings_on_host);
}
