#include "apps/trainer/bench.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/grad_mode.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>

#include <algorithm>
#include <optional>
#include <chrono>
#include <fstream>
#include <map>
#include <cmath>
#include <random>
#include <sstream>

#include "lib/core/error.h"
#include "lib/core/files.h"
#include "lib/kernels/tuned_gemm.h"
#include "lib/model/generate.h"
#include "lib/model/lora.h"
#include "lib/model/random_init.h"
#include "lib/train/run_config.h"
#include "lib/train/step_profile.h"
#include "lib/train/trainer.h"

namespace qt {

namespace {

// Dense bf16 matrix rate of the device: 8192^3 GEMMs, the best of three timed batches of ten.
double matrix_rate(at::Device device) {
  const int64_t n = 8192;
  auto opts = at::TensorOptions().dtype(at::kBFloat16).device(device);
  at::Tensor a = at::randn({n, n}, opts), b = at::randn({n, n}, opts), c = at::empty({n, n}, opts);
  at::mm_out(c, a, b);
  c10::cuda::device_synchronize();
  double best = 0;
  for (int round = 0; round < 3; ++round) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < 10; ++i) at::mm_out(c, a, b);
    c10::cuda::device_synchronize();
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::max(best, 10 * 2.0 * n * n * n / s);
  }
  return best;
}

}  // namespace

double model_flops_per_token(const LlamaConfig& c, double attention_span) {
  const double H = static_cast<double>(c.hidden_size), I = static_cast<double>(c.intermediate_size);
  const double q = static_cast<double>(c.q_size()), kv = static_cast<double>(c.num_key_value_heads * c.head_dim);
  const double per_layer = H * q + 2 * H * kv + q * H + 3 * H * I;
  const double n = static_cast<double>(c.num_hidden_layers) * per_layer + static_cast<double>(c.vocab_size) * H;
  // Causal attention per token and layer: Q K^T and P V over S / 2 keys on average, 2 S q FLOPs forward; its
  // backward twice that.
  return 4 * n + 6.0 * static_cast<double>(c.num_hidden_layers) * attention_span * q;
}

Json run_bench(const BenchOptions& o) {
  if (o.shape.empty() == o.model.empty()) fail(ErrorKind::Usage, "bench: give one of --shape NAME or --model DIR");
  if (o.batch <= 0 || o.seq < 2 || o.steps <= 0 || o.warmup < 0 || o.doc_tokens < 0)
    fail(ErrorKind::Usage, "bench: --batch > 0, --seq >= 2, --steps > 0, --warmup >= 0 and --doc-tokens >= 0 expected");
  if (o.out.empty()) fail(ErrorKind::Usage, "bench: --out DIR is required");
  const LlamaConfig shape = o.shape.empty() ? LlamaConfig::from_file(files::join(o.model, "config.json"))
                                            : shape_config(o.shape, "bench", "--shape");
  files::make_dirs(o.out);
  // Random token rows, one document each (no packing), as the peer scripts feed their trainers; or, with
  // doc_tokens, documents of SFT-like lengths (log-normal, that median) packed in order, each row filled exactly
  // (its last document cut to the space left), so that a step still holds batch x seq input tokens.
  const std::string data = files::join(o.out, "tokens.jsonl");
  double tokens = 0, squares = 0;  // the documents' lengths summed, and their squares: the attention span
  {
    std::ostringstream f;  // (written whole below: an ofstream's last buffer was flushed unchecked at its close)
    std::mt19937_64 rng(0);
    std::uniform_int_distribution<int64_t> token(0, shape.vocab_size - 1);
    std::lognormal_distribution<double> doc_len(std::log(static_cast<double>(std::max<int64_t>(o.doc_tokens, 1))), 1.0);
    auto write_doc = [&](int64_t len) {
      tokens += static_cast<double>(len);
      squares += static_cast<double>(len) * static_cast<double>(len);
      Json ids = Json::array();
      for (int64_t t = 0; t < len; ++t) ids.push_back(token(rng));
      f << Json{{"input_ids", ids}}.dump() << "\n";
    };
    for (int64_t r = 0; r < o.batch; ++r) {
      if (o.doc_tokens <= 0) {
        write_doc(o.seq);
        continue;
      }
      for (int64_t left = o.seq; left > 0;) {
        const int64_t len = std::clamp<int64_t>(std::llround(doc_len(rng)), 8, o.seq);
        write_doc(left - len < 8 ? left : len);
        left -= left - len < 8 ? left : len;
      }
    }
    files::write_file_atomically(data, f.str());
  }
  const std::string run_dir = files::join(o.out, "run");
  files::remove_tree(run_dir);
  Json model = {{"init", "random"}, {"quant", "nf4"}, {"device", o.device}};
  if (o.shape.empty()) model["path"] = o.model;
  else model["shape"] = o.shape;
  Json cfg = {{"output_dir", run_dir},
              {"model", model},
              {"lora", {{"r", 16}, {"alpha", 16}}},
              {"data", {{"train_file", data}, {"format", "tokenized"}, {"max_seq_len", o.seq}, {"packing", o.doc_tokens > 0},
                        {"shuffle", false}}},
              {"train", {{"steps", o.warmup + o.steps}, {"batch_size", o.batch}, {"seed", 0}, {"log_every", 1},
                         {"memory", Json::object()}}},
              {"optim", {{"lr", 1e-4}, {"schedule", "constant"}}},
              {"checkpoint", {{"every", 0}}},
              {"logging", {{"progress", "lines"}}}};
  const std::string cfg_path = files::join(o.out, "bench_config.json");
  write_json_file(cfg_path, cfg);
  RunConfig config = RunConfig::load(cfg_path, o.overrides);
  if (!o.log_level.empty()) config.log_level = o.log_level;
  train(config, TrainOptions{});

  std::vector<double> step_s;
  double peak = -1, reserved = -1;
  // The caching allocator's counts (cumulative in metrics.jsonl) at the end of the untimed steps and of the run:
  // cudaFree calls and retries in the timed steps mean a run at its budget's edge (its time is not the plan's).
  const std::vector<std::string> counters = {"gpu_alloc_retries", "gpu_device_allocs", "gpu_device_frees"};
  std::map<std::string, int64_t> counts_warm, counts_end;
  Json plan, replans = Json::array();  // the plan that ran, and those that ran out of memory before it
  int64_t micro = o.batch;             // rows a forward pass (the plan's)
  std::ifstream metrics(files::join(run_dir, "metrics.jsonl"));
  std::string line;
  int64_t seen = 0;
  while (std::getline(metrics, line)) {
    const Json j = Json::parse(line);
    if (j.contains("plan")) {
      plan = j["plan"];
      if (j.contains("micro_batch")) micro = j["micro_batch"].get<int64_t>();
      if (j.contains("out_of_memory_under")) replans = j["out_of_memory_under"];
    }
    if (!j.contains("loss") || !j.contains("step_s")) continue;
    ++seen;
    for (const std::string& k : counters) {
      if (!j.contains(k)) continue;
      (seen <= o.warmup ? counts_warm : counts_end)[k] = j[k].get<int64_t>();
    }
    if (seen <= o.warmup) continue;
    step_s.push_back(j["step_s"].get<double>());
    if (j.contains("gpu_mem_gib")) peak = std::max(peak, j["gpu_mem_gib"].get<double>());
    if (j.contains("gpu_reserved_gib")) reserved = std::max(reserved, j["gpu_reserved_gib"].get<double>());
  }
  QT_CHECK(static_cast<int64_t>(step_s.size()) == o.steps, ErrorKind::Internal,
           "bench: " + std::to_string(step_s.size()) + " timed steps in metrics.jsonl, expected " + std::to_string(o.steps));
  std::sort(step_s.begin(), step_s.end());
  const double median = step_s[step_s.size() / 2];
  const double tok_s = static_cast<double>(o.batch * o.seq) / median;
  // A token attends over its own document: the span is the documents' token-weighted mean length (the row's for
  // one document a row).
  const double span = squares / std::max(1.0, tokens);
  const double flops = model_flops_per_token(shape, span);
  Json out = {{"model", o.shape.empty() ? o.model : o.shape},
              {"batch", o.batch},
              {"seq", o.seq},
              {"doc_tokens", o.doc_tokens},
              {"steps", o.steps},
              {"step_s", median},
              {"tokens_per_s", tok_s},
              {"model_flops_per_token", flops},
              {"attention_span_tokens", span},
              {"peak_gib", nullptr},
              {"reserved_peak_gib", nullptr},
              {"matrix_tflops", nullptr},
              {"mfu", nullptr}};
  if (peak >= 0) out["peak_gib"] = peak;
  if (reserved >= 0) out["reserved_peak_gib"] = reserved;
  out["plan"] = plan;
  out["out_of_memory_under"] = replans;
  out["micro_batch"] = micro;
  // In the timed steps (with no untimed step: since the process started, the load included); null off CUDA.
  out["allocator"] = nullptr;
  if (!counts_end.empty()) {
    Json a = Json::object();
    for (const std::string& k : counters)
      if (counts_end.count(k)) a[k.substr(4) + "_timed"] = counts_end[k] - (counts_warm.count(k) ? counts_warm[k] : 0);
    out["allocator"] = a;
  }
  if (config.model.device == "cuda" || (config.model.device == "auto" && at::hasCUDA())) {
    const double rate = matrix_rate(at::Device(at::kCUDA, 0));
    out["matrix_tflops"] = rate / 1e12;
    out["mfu"] = tok_s * flops / rate;
  }
  return out;
}

Json run_generate_bench(const BenchOptions& o) {
  if (o.shape.empty() == o.model.empty()) fail(ErrorKind::Usage, "bench: give one of --shape NAME or --model DIR");
  if (o.generate <= 0 || o.prompt_tokens <= 0 || o.max_new_tokens <= 0 || o.uncached < 0 || o.batch <= 0 ||
      o.seq <= o.max_new_tokens)
    fail(ErrorKind::Usage, "bench --generate: --generate, --prompt-tokens, --max-new-tokens and --batch > 0, --seq > "
                           "--max-new-tokens, --uncached >= 0");
  LlamaConfig shape = o.shape.empty() ? LlamaConfig::from_file(files::join(o.model, "config.json"))
                                      : shape_config(o.shape, "bench", "--shape");
  const at::Device device = o.device == "cpu" ? at::Device(at::kCPU) : at::Device(at::kCUDA, 0);
  LoadOptions load{device, device.is_cuda() ? at::kBFloat16 : at::kFloat};
  load.quantize_nf4 = true;
  LlamaModel model = random_llama(shape, load, /*seed=*/1);
  attach_lora(model, LoraConfig{}, /*seed=*/2, device);
  model.set_training(false);
  std::mt19937_64 rng(3);
  std::lognormal_distribution<double> length(std::log(static_cast<double>(o.prompt_tokens)), 0.5);
  std::uniform_int_distribution<int32_t> token(0, static_cast<int32_t>(shape.vocab_size - 1));
  std::vector<std::vector<int32_t>> prompts(o.generate);
  double total = 0;
  for (auto& p : prompts) {
    p.resize(std::clamp<int64_t>(std::llround(length(rng)), 1, o.seq - o.max_new_tokens));
    for (int32_t& t : p) t = token(rng);
    total += static_cast<double>(p.size());
  }
  GenerateOptions gen;
  gen.max_new_tokens = o.max_new_tokens;
  auto sync = [&] {
    if (device.is_cuda()) c10::cuda::device_synchronize();
  };
  auto seconds = [&](auto&& f) {
    sync();
    const auto t0 = std::chrono::steady_clock::now();
    f();
    sync();
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  };
  // Warm-up: a batch of two and one uncached prompt (kernels, cuDNN / cuBLAS handles, the allocator).
  generate_batch(model, {prompts[0], prompts[std::min<size_t>(1, prompts.size() - 1)]}, gen, o.batch * o.seq);
  generate_tokens_uncached(model, prompts[0], gen);
  if (device.is_cuda()) c10::cuda::CUDACachingAllocator::resetPeakStats(device.index());
  std::vector<GenerateResult> batched;
  const double cached_s = seconds([&] { batched = generate_batch(model, prompts, gen, o.batch * o.seq); });
  const int64_t n_uncached = std::min<int64_t>(o.uncached, o.generate);
  int64_t same = 0;
  const double uncached_s = seconds([&] {
    for (int64_t i = 0; i < n_uncached; ++i) same += generate_tokens_uncached(model, prompts[i], gen).tokens == batched[i].tokens;
  });
  // Where a batch's time goes: the first prompts that fit --batch x --seq tokens (in their order) through the
  // prefill, then 8 decoding steps timed apart: the forward pass, the last positions' logits to the host, the rows'
  // choices.
  Json phases;
  {
    at::NoGradGuard no_grad;
    kernels::GemmTuningPause no_tuning;  // (as generate_batch runs them)
    size_t rows = 1;
    int64_t longest = static_cast<int64_t>(prompts[0].size());
    while (rows < prompts.size() &&
           static_cast<int64_t>(rows + 1) * (std::max<int64_t>(longest, prompts[rows].size()) + o.max_new_tokens) <=
               o.batch * o.seq)
      longest = std::max<int64_t>(longest, prompts[rows++].size());
    const int64_t B = static_cast<int64_t>(rows), L = longest, steps = 8;
    at::Tensor ids = at::zeros({B, L}, at::kLong), pos = at::zeros({B, L}, at::kLong);
    at::Tensor valid = at::zeros({B, L}, at::kBool);
    for (int64_t r = 0; r < B; ++r) {
      const int64_t n = static_cast<int64_t>(prompts[r].size());
      ids[r].narrow(0, L - n, n).copy_(at::tensor(std::vector<int64_t>(prompts[r].begin(), prompts[r].end())));
      pos[r].narrow(0, L - n, n).copy_(at::arange(n, at::kLong));
      valid[r].narrow(0, L - n, n).fill_(true);
    }
    KvCache cache = make_kv_cache(model, B, L + steps + 2);  // (2 more: the profile's steps)
    at::Tensor hidden;
    const double prefill = seconds([&] { hidden = forward_cached(model, cache, ids, pos, valid); });
    // The steps as generate_batch runs them (Decoder): the first (on CUDA, run and captured in a graph) apart.
    double forward = 0, first_step = 0, logits_s = 0, choose = 0;
    at::Generator g = at::make_generator<at::CPUGeneratorImpl>(0);
    std::optional<Decoder> decoder;
    if (decoder_applies(model)) decoder.emplace(model, cache);
    auto step = [&](const std::vector<int64_t>& ids, const std::vector<int64_t>& p) {
      if (decoder) return decoder->step(ids, p, std::vector<uint8_t>(B, 1));
      return forward_cached(model, cache, at::tensor(ids, at::kLong).view({B, 1}),
                            at::tensor(p, at::kLong).view({B, 1}), at::ones({B, 1}, at::kBool));
    };
    const at::Tensor last_pos = pos.select(1, L - 1).contiguous();
    auto positions = [&](int64_t t) {
      std::vector<int64_t> p(B);
      for (int64_t r = 0; r < B; ++r) p[r] = last_pos[r].item<int64_t>() + t + 1;
      return p;
    };
    for (int64_t t = 0; t < steps; ++t) {
      at::Tensor logits;
      logits_s += seconds([&] { logits = model.logits(hidden.select(1, hidden.size(1) - 1)).to(at::kCPU, at::kFloat); });
      std::vector<int64_t> next(B);
      choose += seconds([&] {
        for (int64_t r = 0; r < B; ++r) next[r] = choose_next_token(logits[r], gen, g);
      });
      const std::vector<int64_t> p = positions(t);
      (t == 0 ? first_step : forward) += seconds([&] { hidden = step(next, p); });
    }
    phases = Json{{"rows", B},
                  {"prompt_columns", L},
                  {"prefill_s", prefill},
                  {"decode_first_step_s", first_step},
                  {"decode_forward_s", forward / (steps - 1)},
                  {"decode_graphed", decoder && decoder->graphed()},
                  {"logits_to_host_s", logits_s / steps},
                  {"choose_s", choose / steps}};
    if (const char* dir = std::getenv("QT_PROFILE_GENERATE"); dir && *dir) {
      // A kernel profile of two decoding steps of this batch (profile_trace.json, profile_kernels.txt in `dir`).
      StepProfile profile(device.is_cuda());
      for (int64_t t = 0; t < 2; ++t) {
        at::Tensor logits = model.logits(hidden.select(1, hidden.size(1) - 1)).to(at::kCPU, at::kFloat);
        hidden = step(std::vector<int64_t>(B, 1), positions(steps + t));
        (void)logits;
      }
      sync();
      files::make_dirs(dir);
      profile.finish(dir);
    }
  }
  Json j{{"mode", "generate"},
         {"phases", phases},
         {"model", o.shape.empty() ? o.model : o.shape},
         {"prompts", o.generate},
         {"prompt_tokens_mean", total / static_cast<double>(o.generate)},
         {"max_new_tokens", o.max_new_tokens},
         {"batch_tokens", o.batch * o.seq},
         {"cached_s", cached_s},
         {"cached_s_per_prompt", cached_s / static_cast<double>(o.generate)},
         {"uncached_prompts", n_uncached},
         {"same_tokens", same}};
  if (n_uncached > 0) {
    j["uncached_s_per_prompt"] = uncached_s / static_cast<double>(n_uncached);
    j["speedup"] = uncached_s / static_cast<double>(n_uncached) / (cached_s / static_cast<double>(o.generate));
  }
  if (device.is_cuda())
    j["peak_gib"] = static_cast<double>(c10::cuda::CUDACachingAllocator::getDeviceStats(device.index())
                                            .allocated_bytes[0].peak) / (1024.0 * 1024 * 1024);
  return j;
}

}  // namespace qt
