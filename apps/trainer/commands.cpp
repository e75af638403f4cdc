#include "apps/trainer/commands.h"

// qlora-train's subcommands other than train: eval, export, generate, quantize, config (apps/trainer/commands.h).
#include <ATen/ATen.h>
#include <ATen/Context.h>

#include <torch/headeronly/version.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <atomic>
#include <cmath>
#include <csignal>
#include <cstring>
#include <unistd.h>
#include <iostream>
#include <set>

#include "lib/core/error.h"
#include "lib/core/json.h"
#include "lib/core/log.h"
#include "lib/data/chat_template.h"
#include "lib/data/jsonl.h"
#include "lib/data/records.h"
#include "lib/data/tokenizer.h"
#include "lib/data/unicode_text.h"
#include "lib/core/files.h"
#include "lib/export/gguf_llama.h"
#include "lib/comm/launch_env.h"
#include "lib/model/generate.h"
#include "lib/model/hf_loader.h"
#include "lib/model/merge.h"
#include "lib/model/peft_adapter.h"
#include "lib/model/quantize_model.h"
#include "lib/train/evaluate.h"
#include "lib/train/exact_match.h"
#include "lib/train/output_dir.h"
#include "lib/train/train_data.h"
#include "lib/train/run_config.h"
#include "lib/train/train_stages.h"
#include "lib/model/exec_plan.h"
#include "lib/model/random_init.h"
#include "lib/train/trainer.h"

namespace qt::cli {

// `config --print`: the run config as training would read it, every default included (the same JSON as
// output_dir/config.resolved.json); without --config, the defaults, with the keys a run must give null.
namespace {
// The run config `file` with `overrides` applied, or without a file the defaults and the overrides (`label` names
// them in errors; required keys may be absent there). complete: a file must have its required keys.
qt::RunConfig config_or_defaults(const std::string& file, const std::vector<std::string>& overrides,
                                 const std::string& label, bool complete) {
  if (!file.empty()) return qt::RunConfig::load(file, overrides, complete);
  qt::Json j = qt::Json::object();
  for (const auto& o : overrides) qt::apply_override(j, o);
  return qt::RunConfig::from_json(j, label, /*complete=*/false);
}
}  // namespace

int run_config(const ConfigArgs& args) {
  if (!args.print) qt::fail(qt::ErrorKind::Usage, "config: pass --print (the resolved config on stdout)");
  const qt::RunConfig config = config_or_defaults(args.config, args.overrides, "--set", /*complete=*/true);
  std::cout << config.to_json().dump(2) << std::endl;
  return 0;
}



// A record's text in runs of tokens in the loss or not: [text, target]. Each token's text is what it adds to the
// decoded text of the tokens before it since the last token the decoder drops (decoding a token alone would lose
// sentencepiece's leading space); those (sentencepiece's <s>, </s>) show as their pieces.
qt::Json target_runs(const qt::Example& e, const qt::Tokenizer& tok) {
  qt::Json runs = qt::Json::array();
  std::vector<int32_t> since;  // the tokens since the last special one
  std::string decoded;         // their text
  std::string run;
  for (size_t t = 0; t < e.ids.size(); ++t) {
    std::string text;
    if (tok.dropped_by_decode(e.ids[t])) {
      text = tok.id_to_token(e.ids[t]);
      since.clear();
      decoded.clear();
    } else {
      since.push_back(e.ids[t]);
      const std::string now = tok.decode(since);
      text = now.compare(0, decoded.size(), decoded) == 0 ? now.substr(decoded.size()) : tok.decode({e.ids[t]});
      decoded = now;
    }
    run += text;
    if (t + 1 == e.ids.size() || e.loss[t + 1] != e.loss[t]) {
      runs.push_back(qt::Json::array({qt::unicode::replace_invalid_utf8(run), e.loss[t] != 0}));
      run.clear();
    }
  }
  return runs;
}

int run_data(const DataArgs& args) {
  const qt::RunConfig cfg = config_or_defaults(args.config, args.overrides, "--set", /*complete=*/true);
  if (cfg.model.path.empty())
    qt::fail(qt::ErrorKind::Usage, "data: the run config's model.path names no directory with the tokenizer");
  const auto tokenizer = qt::load_tokenizer(cfg.model.path);  // the tokenizer alone: no weights are read
  const qt::TrainData data(cfg.data, cfg.file, *tokenizer, 1);
  const qt::Dataset& set = data.train_set();
  const std::vector<std::string>& files = data.config().train_files;
  for (int64_t i = 0; i < std::min<int64_t>(args.show, set.size()); ++i) {
    const qt::Example& e = set.examples()[i];
    const qt::Json runs = target_runs(e, *tokenizer);
    int64_t targets = 0;
    for (uint8_t l : e.loss) targets += l;
    const std::string where = files[e.source] + ":" + std::to_string(e.line);
    if (args.json) {
      qt::Json j{{"record", where}, {"ids", e.ids}, {"loss", e.loss}, {"runs", runs}};
      if (e.second > 0) j["rejected_from"] = e.second;  // a pair: ids[rejected_from:] is prompt + rejected
      std::cout << j.dump() << "\n";
      continue;
    }
    std::cout << "== " << where << ": " << e.ids.size() << " tokens, " << targets
              << " in the loss (between \u00ab and \u00bb)" << (e.second > 0 ? "; a pair: chosen, then rejected" : "")
              << "\n";
    if (e.second > 0) {  // the pair's two sequences apart
      for (int part = 0; part < 2; ++part) {
        qt::Example one;
        const size_t b = part == 0 ? 0 : static_cast<size_t>(e.second), end = part == 0 ? b + e.second : e.ids.size();
        one.ids.assign(e.ids.begin() + b, e.ids.begin() + end);
        one.loss.assign(e.loss.begin() + b, e.loss.begin() + end);
        std::cout << (part == 0 ? "-- chosen: " : "-- rejected: ");
        for (const auto& r : target_runs(one, *tokenizer))
          std::cout << (r[1].get<bool>() ? "\u00ab" + r[0].get<std::string>() + "\u00bb" : r[0].get<std::string>());
        std::cout << "\n";
      }
      continue;
    }
    for (const auto& r : runs)
      std::cout << (r[1].get<bool>() ? "\u00ab" + r[0].get<std::string>() + "\u00bb" : r[0].get<std::string>());
    std::cout << "\n";
  }
  const qt::DataStats& st = set.stats();
  const qt::Json counts = {{"records", st.documents},
                           {"tokens", st.tokens},
                           {"loss_tokens", st.loss_tokens},
                           {"truncated", st.truncated},
                           {"left_out_without_targets", data.untrained_left_out()},
                           {"steps_per_epoch", data.steps_per_epoch(cfg.train.batch_size)},
                           {"batch_size", cfg.train.batch_size},
                           {"max_seq_len", data.config().max_seq_len},
                           {"row_tokens", data.max_seq_len()}};  // (pairs: two sequences a row)
  if (args.json) {
    std::cout << qt::Json{{"counts", counts}}.dump() << std::endl;
  } else {
    std::cout << "== " << data.config().train_file << ": " << st.summary() << "; "
              << data.untrained_left_out() << " left out with no target; "
              << data.steps_per_epoch(cfg.train.batch_size) << " steps an epoch at train.batch_size "
              << cfg.train.batch_size << " (rows of " << data.max_seq_len() << " tokens)" << std::endl;
  }
  return 0;
}

int run_plan(const PlanArgs& args) {
  const qt::RunConfig cfg = config_or_defaults(args.config, args.overrides, "plan", /*complete=*/false);
  if (!args.shape.empty() && !args.model.empty()) qt::fail(qt::ErrorKind::Usage, "plan: --shape or --model, not both");
  qt::LlamaConfig mc;
  if (!args.shape.empty()) mc = qt::shape_config(args.shape, "--shape", "--shape");
  else if (!args.model.empty()) mc = qt::LlamaConfig::from_file(qt::files::join(args.model, "config.json"));
  else if (cfg.model.init == "random" && !cfg.model.shape.empty()) mc = qt::shape_config(cfg.model.shape, cfg.file, "model.shape");
  else if (!cfg.model.path.empty()) mc = qt::LlamaConfig::from_file(qt::files::join(cfg.model.path, "config.json"));
  else qt::fail(qt::ErrorKind::Usage, "plan: name the model (--shape, --model, or a --config with model.path or model.shape)");
  if (args.world < 1) qt::fail(qt::ErrorKind::Usage, "plan: --world must be at least 1");
  // --batch: that many rows a micro-batch; else a config's step (its micro-batch, or the plan's: "auto"), or 1 row.
  const int64_t per_rank = args.batch > 0 ? args.batch
                           : args.config.empty() ? 1
                                                 : std::max<int64_t>(1, cfg.train.batch_size / args.world);
  const int64_t forced_micro = args.batch > 0 || args.config.empty() ? per_rank : cfg.train.micro_batch_size;
  if (args.longest && args.seq > 0) qt::fail(qt::ErrorKind::Usage, "plan: --longest or --seq, not both");
  // As the run config's bounds (train.batch_size, data.max_seq_len): beyond them the plan's figures overflowed, and
  // --seq 2^63 - 1 "fitted" 80 GiB.
  if (args.batch > qt::kMaxBatchRows)
    qt::fail(qt::ErrorKind::Usage, "plan: --batch " + std::to_string(args.batch) + ": at most " +
                                       std::to_string(qt::kMaxBatchRows) + " rows");
  if (args.seq > qt::kMaxSeqLen)
    qt::fail(qt::ErrorKind::Usage,
             "plan: --seq " + std::to_string(args.seq) + ": at most " + std::to_string(qt::kMaxSeqLen) + " tokens");
  int64_t seq = args.seq > 0                         ? args.seq
                : cfg.data.contains("max_seq_len") ? cfg.data["max_seq_len"].get<int64_t>()
                                                   : 2048;
  // Preference rows (DPO, CPO, ORPO) hold a pair: two sequences of up to data.max_seq_len tokens each (as TrainData lays them).
  if (args.seq <= 0 && cfg.preference()) seq *= 2;
  const c10::ScalarType dtype = qt::user_dtype(cfg.model.dtype).value_or(at::kBFloat16);  // auto: bf16 on CUDA
  qt::PlanRequest request = cfg.train.memory;
  if (args.gpu_memory_gib > 0) request.gpu_memory_gib = args.gpu_memory_gib;
  const double free_gib = at::hasCUDA() ? qt::device_free_gib(true, 0) : -1;
  if (!request.gpu_memory_gib && free_gib < 0)
    qt::fail(qt::ErrorKind::Usage, "plan: no GPU here to read the free memory of: give --gpu-memory-gib (or "
                                   "train.memory.gpu_memory_gib)");
  const double link = args.host_link_gb_s > 0                       ? args.host_link_gb_s * 1e9
                      : qt::device_has_reference_rates(at::hasCUDA(), 0) ? qt::host_link_bytes_per_s(true, 0)
                                                                         : 0.0;
  auto decide_at = [&](int64_t tokens) {
    qt::PlanInputs in = qt::plan_inputs(cfg, mc, per_rank, tokens, at::Device(at::kCUDA, 0), dtype, args.world, args.world);
    if (args.host_gib > 0)
      in.host_bytes = static_cast<uint64_t>(args.host_gib * 1024 * 1024 * 1024) / static_cast<uint64_t>(args.world);
    if (args.memory_tb_s > 0) in.memory_bytes_per_s = args.memory_tb_s * 1e12;
    in.host_link_bytes_per_s = link;
    return qt::decide_micro_batch(in, request, free_gib, per_rank, forced_micro);
  };
  if (args.longest) {
    // A bisection over multiples of 128 tokens: a longer row never needs less memory. Refused at 128 tokens: that
    // refusal, with its figure.
    constexpr int64_t kStep = 128, kMost = int64_t{1} << 22;
    int64_t lo = 1, hi = kMost / kStep;
    decide_at(lo * kStep);
    while (lo < hi) {
      const int64_t mid = (lo + hi + 1) / 2;
      try {
        decide_at(mid * kStep);
        lo = mid;
      } catch (const qt::Error& e) {
        if (e.kind() != qt::ErrorKind::Config) throw;
        hi = mid - 1;
      }
    }
    seq = lo * kStep;
    std::cerr << "longest row that fits: " << seq << " tokens" << (lo == kMost / kStep ? " (the most tried)" : "")
              << std::endl;
  }
  const qt::MicroDecision md = decide_at(seq);
  const qt::Decision& d = md.decision;
  const int64_t micro = md.micro_batch;
  std::cerr << "plan: " << qt::describe(d);
  if (per_rank > micro) std::cerr << "; micro-batches of " << micro << " rows, " << per_rank / micro << " a step";
  std::cerr << std::endl;
  qt::Json out = qt::to_json(d);
  out["model"] = !args.shape.empty() ? args.shape : !args.model.empty() ? args.model : cfg.model.path.empty() ? cfg.model.shape : cfg.model.path;
  out["micro_batch"] = micro;
  out["micro_batches_a_step"] = per_rank / micro;
  out["seq"] = seq;
  if (args.longest) out["longest"] = true;
  if (md.sizes.size() > 1) {  // the micro-batch sizes weighed (train.micro_batch_size 0)
    qt::Json sizes = qt::Json::array();
    std::cerr << "micro-batch sizes that fit, per optimizer step (the held weights' saving left out):" << std::endl;
    for (const auto& z : md.sizes) {
      char line[128];
      std::snprintf(line, sizeof line, "  %lld rows x %lld: %.3f s, %.2f GiB%s  ", static_cast<long long>(z.micro_batch),
                    static_cast<long long>(per_rank / z.micro_batch), z.step_s, z.bytes / (1024.0 * 1024.0 * 1024.0),
                    z.micro_batch == micro ? " (the plan's)" : "");
      std::cerr << line << z.plan << std::endl;
      sizes.push_back(qt::Json{{"micro_batch", z.micro_batch}, {"step_s", z.step_s}, {"plan", z.plan}});
    }
    out["micro_batch_sizes"] = sizes;
  }
  if (args.alternatives > 0) {
    // The fastest first; of plans that read the same (their fields alike), the first weighed.
    std::vector<qt::Decision::Alternative> alts = d.alternatives;
    std::stable_sort(alts.begin(), alts.end(), [](const auto& a, const auto& b) { return a.step_s < b.step_s; });
    const std::string chosen = qt::describe(d.plan, d.layers);
    std::set<std::string> seen = {chosen};
    qt::Json list = qt::Json::array();
    std::cerr << "alternatives that fit, fastest first (predicted step, device memory, plan):" << std::endl;
    for (const auto& a : alts) {
      if (static_cast<int>(list.size()) >= args.alternatives) break;
      const std::string text = qt::describe(a.plan, d.layers);
      if (!seen.insert(text).second) continue;
      const double gib = a.bytes / (1024.0 * 1024.0 * 1024.0);
      char line[96];
      std::snprintf(line, sizeof line, "  %.3f s (%+.1f%%)  %.2f GiB  ", a.step_s, 100.0 * (a.step_s / d.step.total() - 1), gib);
      std::cerr << line << text << std::endl;
      list.push_back(qt::Json{{"plan", text}, {"predicted_gib", std::round(gib * 1000) / 1000},
                              {"predicted_step_s", a.step_s}, {"memory", qt::plan_fields(a.plan)}});
    }
    out["alternatives"] = list;
  }
  std::cout << out.dump() << std::endl;
  return 0;
}

at::Device parse_device(const std::string& name) {
  if (name == "cpu") return at::kCPU;
  if (name == "cuda") {
    if (!at::hasCUDA()) qt::fail(qt::ErrorKind::Device, "--device cuda: no CUDA device is available");
    return at::Device(at::kCUDA, 0);
  }
  qt::fail(qt::ErrorKind::Usage, "--device '" + name + "': expected cpu or cuda");
}

// `export --dtype`: auto, or a dtype name as the run config's model.dtype takes them (lib/model/llama_config.h),
// given to run_export as bf16, fp16 or fp32.
std::string export_dtype_name(const std::string& name) {
  if (name == "auto") return name;
  const auto dtype = qt::user_dtype(name);
  if (!dtype) throw CLI::ValidationError("'" + name + "': expected auto, " + qt::kUserDtypeNames);
  return qt::dtype_short_name(*dtype);
}

// eval and generate run the model by the plan training would choose for the same device and row length (the same
// defaults: the attention kernel, ...); what a plan keeps for a backward pass does not apply without one.
void apply_plan(qt::LlamaModel& model, const at::Device& device, int64_t seq) {
  qt::PlanInputs in;
  in.model = model.config;
  in.seq = std::max<int64_t>(seq, 1);
  in.cuda = device.is_cuda();
  in.element_size = static_cast<int64_t>(c10::elementSize(model.dtype()));
  model.plan = qt::decide_plan(in, qt::PlanRequest{}).plan;
  model.to_host(model.plan.embeddings_on_host, model.plan.lm_head_on_host);
}

// The data section's reading of records (lib/data/data_config.h) from eval's / generate's options, which take
// the run config's names and defaults; `command` names them in errors.
// `chat_format`: a JSON file holding data.chat_format's object (--chat-format), or ""; `format_json`: the object
// itself where no file is given (eval --config: the run config's).
qt::DataConfig record_config(const std::string& command, const std::string& format, const std::string& chat_template,
                             bool train_on_prompt, bool add_eos, const std::string& chat_format = "",
                             const qt::Json& format_json = qt::Json::object()) {
  qt::Json data = {{"train_file", "-"},          {"format", format},   {"chat_template", chat_template},
                   {"train_on_prompt", train_on_prompt}, {"add_eos", add_eos}};
  if (!chat_format.empty()) {
    if (chat_template != "custom")
      qt::fail(qt::ErrorKind::Usage, command + ": --chat-format is the format of --chat-template custom (got "
                                                   "--chat-template " + chat_template + ")");
    data["chat_format"] = qt::read_json_file(chat_format, qt::ErrorKind::Config);
    return qt::DataConfig::from_json(data, chat_format);
  }
  if (chat_template == "custom") data["chat_format"] = format_json;
  return qt::DataConfig::from_json(data, command);
}

// The chat format an adapter was trained on, where it was a custom one (ADAPTER/chat_format.json) and the command
// names none (--chat-template auto, no --chat-format): {"custom", that file}; else the given pair.
std::pair<std::string, std::string> chat_format_of(const std::string& adapter, const std::string& chat_template,
                                                   const std::string& chat_format) {
  if (adapter.empty() || chat_template != "auto" || !chat_format.empty()) return {chat_template, chat_format};
  const std::string file = qt::files::join(adapter, qt::kChatFormatFile);
  if (!qt::files::exists(file)) return {chat_template, chat_format};
  qt::log::info("chat format: the adapter's custom one (" + file + ")");
  return {"custom", file};
}

// Runs f; a data error that names the run config's data.format / data.chat_template names the options instead.
template <typename F>
auto with_option_names(F&& f) -> decltype(f()) {
  try {
    return f();
  } catch (const qt::Error& e) {
    std::string m = e.what();
    for (auto [from, to] : {std::pair<std::string, std::string>{"data.chat_template", "--chat-template"},
                            {"data.format", "--format"}})
      for (size_t at = m.find(from); at != std::string::npos; at = m.find(from, at + to.size()))
        m.replace(at, from.size(), to);
    throw qt::Error(e.kind(), m);
  }
}

// A LoRA adapter directory given where a model directory belongs: say so, before a tokenizer is looked for.
void check_not_adapter(const std::string& model_dir) {
  if (qt::files::exists(qt::files::join(model_dir, qt::kAdapterConfigFile)) &&
      !qt::files::exists(qt::files::join(model_dir, "config.json")))
    qt::fail(qt::ErrorKind::Model, model_dir + " is a LoRA adapter (" + qt::kAdapterConfigFile +
                                       "); pass it as --adapter and its base as --model");
}

// --adapter onto --model, with a warning when the adapter names another local base.
void load_adapter(qt::LlamaModel& model, const std::string& adapter, const std::string& model_dir) {
  std::string named;
  if (qt::adapter_names_other_base(adapter, model_dir, &named))
    qt::log::warn("the adapter " + adapter + " was trained on " + named + ", not on --model " + model_dir +
                  " (adapter_config.json's base_model_name_or_path); its outputs may be meaningless");
  qt::load_peft_adapter(model, adapter);
}

// eval --config FILE: the run config's model.path, data.format, data.chat_template, data.train_on_prompt,
// data.add_eos, data.max_seq_len and model.quant, each where the command line does not give it.
EvalArgs with_run_config(EvalArgs a) {
  if (!a.config.empty()) {
    const qt::RunConfig c = qt::RunConfig::load(a.config, a.overrides, /*complete=*/false);
    auto unset = [&](const char* option) { return a.given.count(option) == 0; };
    if (unset("--model")) a.model = c.model.path;
    if (unset("--format")) a.format = qt::record_format_name(c.parsed_data.format);
    if (unset("--chat-template")) a.chat_template = qt::chat_template_name(c.parsed_data.chat_template);
    if (unset("--chat-format")) a.chat_format_json = c.parsed_data.chat_format.to_json();
    if (unset("--train-on-prompt")) a.train_on_prompt = c.parsed_data.train_on_prompt;
    if (unset("--add-eos")) a.add_eos = c.parsed_data.add_eos;
    if (unset("--max-seq-len")) a.max_seq_len = c.parsed_data.max_seq_len;
    if (unset("--quant")) a.quant = c.model.quant;
    const double beta = a.dpo.beta;
    a.dpo = c.dpo;
    if (!unset("--beta")) a.dpo.beta = beta;
    if (c.train.objective == "cpo") {
      a.cpo = c.cpo;
      if (!unset("--beta")) a.cpo->beta = beta;
    }
    if (c.train.objective == "orpo") {
      a.orpo = c.orpo;
      if (!unset("--beta")) a.orpo->beta = beta;
    }
    if (c.train.objective == "kto") {
      a.kto = c.kto;
      a.kto->kl_group_size = c.kto.group(c.train.micro_batch_size);  // (training's KL groups)
      if (!unset("--beta")) a.kto->beta = beta;
    }
    if (unset("--reference-adapter")) a.reference_adapter = c.parsed_lora.init_from;
    // The config's logging.level, as training takes it, unless --log-level was given (before or after `eval`).
    if (unset("--log-level")) qt::log::set_level(qt::log::parse_level(c.log_level));
  } else if (!a.overrides.empty()) {
    qt::fail(qt::ErrorKind::Usage, "eval: --set overrides a key of --config FILE");
  }
  if (a.model.empty()) qt::fail(qt::ErrorKind::Usage, "eval: --model DIR is required (or --config FILE: its model.path)");
  return a;
}

int run_eval(const EvalArgs& given) {
  const EvalArgs args = with_run_config(given);
  const at::Device device = parse_device(args.device);
  check_not_adapter(args.model);
  const auto [chat_template, chat_format] = chat_format_of(args.adapter, args.chat_template, args.chat_format);
  qt::DataConfig data = record_config("eval", args.format, chat_template, args.train_on_prompt, args.add_eos,
                                      chat_format, args.chat_format_json);
  data.unpair = args.kto.has_value();  // (KTO reads preference pairs as two unpaired records each)
  // A KTO run's held-out file holds its records unpaired (TrainData::write_eval_records), whatever data.format says.
  if (data.unpair && data.format == qt::RecordFormat::Preference) data.format = qt::RecordFormat::Auto;
  // fp32 on the CPU (exact comparisons with references), bf16 on the GPU.
  qt::LoadOptions load{device, device.is_cuda() ? at::kBFloat16 : at::kFloat};
  load.quantize_nf4 = args.quant == "nf4";  // as training loads the base, so that eval's figures are the trained model's
  auto tokenizer = qt::load_tokenizer(args.model);
  // Records read, rendered and masked by training's code (lib/data/records.h), before the model loads.
  std::vector<qt::Example> docs = with_option_names([&] { return qt::load_examples(args.data, data, *tokenizer); });
  // KTO (unpaired records): each made a pair with its KL sequence (lib/data/example.h kto_pairs), the records whose
  // prompt leaves no completion token within --max-seq-len left out first, as training leaves them out.
  std::optional<qt::KtoSection> kto = args.kto;
  const auto labelled = [](const qt::Example& e) { return e.label >= 0; };
  if (std::any_of(docs.begin(), docs.end(), labelled)) {
    if (!std::all_of(docs.begin(), docs.end(), labelled))
      qt::fail_at(qt::ErrorKind::Data, args.data,
                  "some records are unpaired preference records {prompt, completion, label} and some are not: "
                  "evaluate them in separate files");
    if (!kto && !args.config.empty())
      qt::fail_at(qt::ErrorKind::Data, args.data,
                  "the records are unpaired preference records {prompt, completion, label}, which train.objective "
                  "\"kto\" trains on, and --config " + args.config + " is not a KTO run");
    if (!kto) {  // (without --config: KTO's defaults, --beta)
      kto.emplace();
      kto->beta = args.dpo.beta;
    }
    docs.erase(std::remove_if(docs.begin(), docs.end(),
                              [&](const qt::Example& e) {
                                qt::Example cut = e;
                                cut.ids.resize(std::min<size_t>(e.ids.size(), static_cast<size_t>(args.max_seq_len)));
                                cut.loss.resize(cut.ids.size());
                                return qt::fewest_targets(cut) == 0;
                              }),
               docs.end());
    if (docs.empty())
      qt::fail_at(qt::ErrorKind::Data, args.data, "no record has a completion token within --max-seq-len");
    docs = qt::kto_pairs(std::move(docs), kto->group(0), kto->kl());
  }
  // Token ids within the model's embeddings (as training and generate check): a tokenizer with more ids than the
  // model, or a tokenized record's id, would fail inside the embedding lookup.
  {
    const qt::LlamaConfig config =
        qt::LlamaConfig::from_file(qt::files::join(args.model, "config.json"));
    for (const qt::Example& e : docs)
      for (int32_t id : e.ids)
        if (id < 0 || id >= config.vocab_size)
          qt::fail_at(qt::ErrorKind::Model, qt::files::join(args.model, "config.json"),
                      "vocab_size " + std::to_string(config.vocab_size) + ", but " + args.data + " line " +
                          std::to_string(e.line) + " holds token id " + std::to_string(id) +
                          " (as the tokenizer gives it, or as the record writes it): the tokenizer, the data and the "
                          "model do not belong together");
  }
  qt::LlamaModel model = qt::load_llama(args.model, load);
  if (!args.adapter.empty()) load_adapter(model, args.adapter, args.model);
  apply_plan(model, device, args.max_seq_len);
  // Preference pairs: DPO's loss against the model without the adapter, or CPO's / ORPO's (a file holds pairs or
  // none).
  const size_t pairs = static_cast<size_t>(std::count_if(docs.begin(), docs.end(), [](const qt::Example& e) {
    return e.second > 0;
  }));
  if (pairs > 0) {
    if (pairs < docs.size())
      qt::fail_at(qt::ErrorKind::Data, args.data,
                  std::to_string(pairs) + " of " + std::to_string(docs.size()) + " records are preference pairs "
                  "{prompt, chosen, rejected}: evaluate pairs and other records in separate files");
    if (args.exact_match > 0)
      qt::fail(qt::ErrorKind::Usage, "eval: --exact-match needs records with one answer, not preference pairs");
    qt::PreferenceObjective pref;
    if (args.cpo) pref.cpo = &*args.cpo;
    else if (args.orpo) pref.orpo = &*args.orpo;
    else if (kto) pref.kto = &*kto;
    else pref.dpo = &args.dpo;
    if (!pref.needs_reference() && args.given.count("--reference-adapter"))
      qt::fail(qt::ErrorKind::Usage, std::string("eval: --reference-adapter: --config's ") + pref.name() +
                                         " run has no reference");
    if (args.given.count("--reference-adapter") && args.adapter.empty())
      qt::fail(qt::ErrorKind::Usage, "eval: --reference-adapter compares --adapter with it: give --adapter too");
    // The reference swaps the LoRA adapters alone: a trained lm_head or embed_tokens would stay the policy's.
    if (model.lm_head_trainable.defined() || model.embed_tokens_trainable.defined())
      qt::fail(qt::ErrorKind::Usage, "eval: preference pairs with an adapter that trains lm_head or embed_tokens "
                                     "(modules_to_save) are not supported yet");
    const std::string reference_dir = args.adapter.empty() || !pref.needs_reference() ? "" : args.reference_adapter;
    if (!reference_dir.empty() &&
        !qt::read_peft_adapter_config(reference_dir).lora.modules_to_save.empty())
      qt::fail(qt::ErrorKind::Usage, "eval: --reference-adapter " + reference_dir + " trains lm_head or "
                                     "embed_tokens (modules_to_save): not supported yet for preference pairs");
    std::optional<qt::ReferenceAdapters> reference;
    if (pref.needs_reference()) {
      reference.emplace(model, reference_dir);
      qt::log::info(pref.describe() + ": the reference is " + reference->describe());
    } else {
      qt::log::info(pref.describe() + ": reference-free");
    }
    const qt::DpoEvalResult d =
        qt::evaluate_dpo(model, reference ? &*reference : nullptr, docs, args.max_seq_len, pref);
    if (d.truncated)
      qt::log::warn(std::to_string(d.truncated) + " of " + std::to_string(docs.size()) + " pairs were longer than "
                    "--max-seq-len " + std::to_string(args.max_seq_len) + " tokens and were truncated");
    if (d.pairs == 0)
      qt::fail_at(qt::ErrorKind::Data, args.data, "no pair has a target token in both its completions");
    if (!std::isfinite(d.mean(0))) qt::fail(qt::ErrorKind::Numeric, "evaluation loss is not finite");
    qt::Json out = {{"loss", d.mean(0)}, {"pairs", d.pairs}, {"records", docs.size()}, {"truncated", d.truncated},
                    {"objective", args.cpo ? "cpo" : args.orpo ? "orpo" : kto ? "kto" : "dpo"},
                    {"loss_type", args.cpo    ? qt::Json(args.cpo->loss_type)
                                  : args.orpo ? qt::Json("orpo")
                                  : kto       ? qt::Json(kto->loss_type)
                                              : args.dpo.to_json()["loss_type"]},
                    {"beta", args.cpo    ? args.cpo->beta
                             : args.orpo ? args.orpo->beta
                             : kto       ? kto->beta
                                         : args.dpo.beta}};
    for (const auto& [name, value] : pref.statistics(d.sums, static_cast<double>(d.pairs))) out[name] = value;
    std::cout << out.dump() << std::endl;
    return 0;
  }
  qt::EvalResult r = qt::evaluate_loss(model, docs, args.max_seq_len);
  if (r.truncated) qt::log::warn(std::to_string(r.truncated) + " of " + std::to_string(r.documents) +
                                 " records were longer than --max-seq-len " + std::to_string(args.max_seq_len) +
                                 " tokens and were truncated");
  if (r.tokens == 0)
    qt::fail_at(qt::ErrorKind::Data, args.data,
                "no record has a target token to evaluate (a text record needs two or more tokens; prompts are not "
                "targets unless --train-on-prompt)");
  if (!std::isfinite(r.mean_loss())) qt::fail(qt::ErrorKind::Numeric, "evaluation loss is not finite");
  qt::Json out = {{"loss", r.mean_loss()}, {"perplexity", r.perplexity()}, {"tokens", r.tokens},
                  {"records", r.documents}, {"truncated", r.truncated}};
  if (args.exact_match > 0) {
    const qt::ExactMatchResult em =
        qt::exact_match(model, *tokenizer, data, args.data, args.exact_match, args.max_new_tokens);
    out["exact_match"] = em.accuracy();
    out["exact_match_correct"] = em.correct;
    out["exact_match_total"] = em.total;
  }
  std::cout << out.dump() << std::endl;
  return 0;
}

// The base of an adapter: --model, else adapter_config.json's base_model_name_or_path (a local directory).
std::string adapter_base(const std::string& model, const std::string& adapter_dir) {
  if (!model.empty()) return model;
  const std::string base = qt::read_peft_adapter_config(adapter_dir).base_model_name_or_path;
  if (base.empty())
    qt::fail_at(qt::ErrorKind::Usage, qt::files::join(adapter_dir, qt::kAdapterConfigFile),
                "base_model_name_or_path is null: pass --model DIR");
  if (!qt::files::is_dir(base))
    qt::fail_at(qt::ErrorKind::Usage, qt::files::join(adapter_dir, qt::kAdapterConfigFile),
                "base_model_name_or_path '" + base + "' is not a local directory (no downloads): pass --model DIR");
  return base;
}

int run_export(const ExportArgs& args) {
  // --dtype is the merged weights' (--merge); GGUF has its own types and a plain adapter copy none.
  if (args.dtype != "auto" && (!args.merge || !args.gguf.empty() || !args.gguf_lora.empty()))
    qt::fail(qt::ErrorKind::Usage,
             "export: --dtype " + args.dtype + " applies to --merge only" +
                 (!args.gguf.empty()        ? " (--gguf " + args.gguf + " sets the GGUF weights' type)"
                  : !args.gguf_lora.empty() ? " (--gguf-lora " + args.gguf_lora + " sets the adapter's tensor type)"
                                            : std::string(" (add --merge)")));
  if (qt::files::exists(args.out) && !qt::files::is_dir(args.out))
    qt::fail_at(qt::ErrorKind::Usage, args.out, "is a file, not a directory (--out names the directory to write)");
  const std::string base = adapter_base(args.model, args.adapter);
  if (!args.gguf_lora.empty()) {
    if (args.quant != "nf4" || args.device != "cpu")
      qt::fail(qt::ErrorKind::Usage, "export: --quant and --device apply to a merge; --gguf-lora writes the adapter "
                                     "alone (no base weights are read)");
    const qt::GgufLoraStats s =
        qt::export_gguf_lora({base, args.adapter, args.out, qt::parse_gguf_lora_type(args.gguf_lora)});
    qt::log::info("wrote " + std::to_string(s.adapters) + " adapted weights (alpha " + std::to_string(s.alpha) +
                  ") at " + s.gguf_path + ": llama.cpp applies it to the base's GGUF (llama-cli -m BASE.gguf --lora " +
                  s.gguf_path + ")");
    std::cout << qt::Json{{"out", args.out}, {"gguf_lora", s.gguf_path}, {"type", args.gguf_lora}, {"base", base},
                          {"adapters", s.adapters}, {"alpha", s.alpha}, {"tensors", s.tensors}, {"bytes", s.bytes}}
                     .dump()
              << std::endl;
    return 0;
  }
  if (!args.gguf.empty()) {
    qt::GgufExportRequest req{base, args.adapter, args.out, qt::parse_gguf_file_type(args.gguf), {}};
    req.chat_format = qt::read_chat_format_file(args.adapter);
    req.load = qt::LoadOptions{parse_device(args.device), at::kFloat};
    req.load.quantize_nf4 = args.quant == "nf4";  // the base as training saw it, as --merge merges it
    const qt::GgufExportStats s = qt::export_gguf(req);
    qt::log::info("merged " + std::to_string(s.merged) + " adapters into " + base + ": " + std::to_string(s.tensors) +
                  " tensors, " + std::to_string(s.bytes >> 20) + " MiB at " + s.gguf_path);
    std::cout << qt::Json{{"out", args.out}, {"gguf", s.gguf_path}, {"modelfile", s.modelfile_path},
                          {"type", args.gguf}, {"base", base}, {"adapters", s.merged}, {"tensors", s.tensors},
                          {"bytes", s.bytes}, {"chat_format", s.chat_format}}.dump()
              << std::endl;
    return 0;
  }
  if (!args.merge) {
    // The adapter alone, in PEFT's format, checked against the base's shapes (config.json only is read).
    const std::string config_path = qt::find_model_files(base).config_path;
    const qt::LlamaConfig config =
        qt::LlamaConfig::from_json(qt::read_json_file(config_path, qt::ErrorKind::Model), config_path);
    if (qt::files::exists(args.out) && !qt::files::list_dir(args.out).empty())
      qt::fail_at(qt::ErrorKind::Usage, args.out, "output directory exists and is not empty");
    qt::copy_peft_adapter(args.adapter, args.out, args.model, &config);
    if (const auto format = qt::read_chat_format_file(args.adapter)) qt::write_chat_format_files(args.out, *format);
    std::cout << qt::Json{{"out", args.out}, {"merged", false}, {"base", base}}.dump() << std::endl;
    return 0;
  }
  const at::Device device = parse_device(args.device);
  // The base as training saw it (NF4, quantized on load, unless --quant none); merged in fp32.
  qt::LoadOptions load{device, at::kFloat};
  load.quantize_nf4 = args.quant == "nf4";
  qt::LlamaModel model = qt::load_llama(base, load);
  qt::load_peft_adapter(model, args.adapter);
  at::ScalarType dtype = at::kBFloat16;  // auto: the base's 16-bit dtype, else bf16
  if (args.dtype == "auto") {
    if (model.config.dtype == at::kHalf || model.config.dtype == at::kBFloat16) dtype = model.config.dtype;
  } else {
    dtype = args.dtype == "fp32" ? at::kFloat : args.dtype == "fp16" ? at::kHalf : at::kBFloat16;
  }
  qt::MergedExportStats s = qt::save_merged_model(model, base, args.out, dtype);
  // The chat format the adapter was trained on (a custom one), as the merged model's chat template.
  if (const auto format = qt::read_chat_format_file(args.adapter)) qt::set_model_chat_format(args.out, *format);
  qt::log::info("merged " + std::to_string(s.merged) + " adapters into " + base + ": " + std::to_string(s.tensors) +
                " tensors, " + std::to_string(s.bytes >> 20) + " MiB in " + std::to_string(s.shards) + " shard(s) at " + args.out);
  std::cout << qt::Json{{"out", args.out}, {"merged", true}, {"base", base}, {"adapters", s.merged},
                        {"dtype", qt::dtype_hf_name(dtype)}, {"shards", s.shards}}.dump()
            << std::endl;
  return 0;
}

// Ids that end generation: an answer's (answer_stop_ids: the tokenizer's EOS, Llama 3's and ChatML's end-of-turn
// tokens where the vocabulary has them), and generation_config.json's and config.json's eos_token_id (an id or a
// list; transformers' generate falls back on the model config's).
std::vector<int32_t> stop_ids(const std::string& model_dir, const qt::Tokenizer& tokenizer) {
  std::vector<int32_t> ids = qt::answer_stop_ids(tokenizer, qt::DataConfig{});
  for (const char* name : {"generation_config.json", "config.json"}) {
    const std::string gen = qt::files::join(model_dir, name);
    if (!qt::files::exists(gen)) continue;
    const qt::Json j = qt::read_json_file(gen, qt::ErrorKind::Model);
    if (j.contains("eos_token_id")) {
      const qt::Json& e = j["eos_token_id"];
      if (e.is_number_integer()) ids.push_back(e.get<int32_t>());
      else if (e.is_array())
        for (const auto& v : e)
          if (v.is_number_integer()) ids.push_back(v.get<int32_t>());
    }
  }
  return ids;
}

// The prompt's tokens: as they are (text: BOS as the tokenizer says), or an alpaca / chat record's prompt as
// training renders and masks it (the tokens before the answer).
std::vector<int32_t> generation_prompt(const GenerateArgs& args, const qt::Tokenizer& tokenizer) {
  if (!args.system.empty() && args.format != "chat")
    qt::fail(qt::ErrorKind::Usage, "--system is the system message of --format chat");
  if (!args.input.empty() && args.format != "alpaca")
    qt::fail(qt::ErrorKind::Usage, "--input is the alpaca record's input (--format alpaca)");
  if (args.format == "text") {
    std::vector<int32_t> prompt;
    if (tokenizer.add_bos() && tokenizer.bos_id() >= 0) prompt.push_back(tokenizer.bos_id());
    for (int32_t id : tokenizer.encode(args.prompt)) prompt.push_back(id);
    return prompt;
  }
  const auto [chat_template, chat_format] = chat_format_of(args.adapter, args.chat_template, args.chat_format);
  const qt::DataConfig data = record_config("generate", args.format, chat_template, false, true, chat_format);
  return with_option_names(
      [&] { return qt::generation_prompt_tokens(data, args.prompt, args.input, args.system, tokenizer); });
}

// --prompts: each record's prompt as --prompt would give it, the record's "input" / "system" over the options'.
std::vector<std::pair<int64_t, std::vector<int32_t>>> file_prompts(const GenerateArgs& args,
                                                                   const qt::Tokenizer& tokenizer) {
  std::vector<std::pair<int64_t, std::vector<int32_t>>> out;
  const qt::LlamaConfig config = qt::LlamaConfig::from_file(qt::files::join(args.model, "config.json"));
  for (const auto& record : qt::read_jsonl(args.prompts)) {
    const std::string where = args.prompts + ":" + std::to_string(record.line);
    for (const auto& [key, value] : record.value.items())
      if (key != "prompt" && key != "input" && key != "system")
        qt::fail_at(qt::ErrorKind::Data, where,
                    "unknown key \"" + key + "\" (a --prompts record holds \"prompt\", and \"input\" or \"system\")");
    if (record.value.contains("input") && args.format != "alpaca")
      qt::fail_at(qt::ErrorKind::Data, where, "\"input\" is an alpaca record's input (--format alpaca)");
    if (record.value.contains("system") && args.format != "chat")
      qt::fail_at(qt::ErrorKind::Data, where, "\"system\" is a chat record's system message (--format chat)");
    GenerateArgs one = args;
    one.prompt = qt::record_string(record, args.prompts, "prompt");
    if (record.value.contains("input")) one.input = qt::record_string(record, args.prompts, "input");
    if (record.value.contains("system")) one.system = qt::record_string(record, args.prompts, "system");
    try {
      out.emplace_back(record.line, generation_prompt(one, tokenizer));
    } catch (const qt::Error& e) {
      qt::fail_at(e.kind(), where, e.what());
    }
    const std::vector<int32_t>& ids = out.back().second;
    if (ids.empty()) qt::fail_at(qt::ErrorKind::Data, where, "the prompt encodes to no tokens");
    if (args.max_new_tokens > 0 && static_cast<int64_t>(ids.size()) >= config.max_position_embeddings)
      qt::fail_at(qt::ErrorKind::Data, where,
                  "the prompt is " + std::to_string(ids.size()) + " tokens, and the model's context (config.json's " +
                      "max_position_embeddings) is " + std::to_string(config.max_position_embeddings) +
                      ": no token can follow it; shorten the prompt");
    for (int32_t id : ids)
      if (id < 0 || id >= config.vocab_size)
        qt::fail_at(qt::ErrorKind::Model, where,
                    "the prompt holds token id " + std::to_string(id) + " and the model has " +
                        std::to_string(config.vocab_size) + " embeddings (config.json's vocab_size): the tokenizer "
                        "and the model do not belong together");
  }
  return out;
}

// The model as generate runs it: the base (NF4 as training loads it, unless --quant none), the adapter, the plan.
qt::LlamaModel generation_model(const GenerateArgs& args, const qt::LoadOptions& load, const at::Device& device) {
  qt::LlamaModel model = qt::load_llama(args.model, load);
  if (!args.adapter.empty()) load_adapter(model, args.adapter, args.model);
  apply_plan(model, device, model.config.max_position_embeddings);
  return model;
}

qt::GenerateOptions generation_options(const GenerateArgs& args, const qt::LlamaModel& model,
                                       const qt::Tokenizer& tokenizer) {
  qt::GenerateOptions options;
  options.max_new_tokens = args.max_new_tokens;
  options.temperature = args.temperature;
  options.top_p = args.top_p;
  options.seed = args.seed;
  options.stop_ids = stop_ids(args.model, tokenizer);
  options.max_seq_len = model.config.max_position_embeddings;
  return options;
}

// The generated ids as text (the stop token left out), made valid UTF-8 as transformers' decode makes it: a
// byte-level BPE model may stop inside a UTF-8 sequence (U+FFFD per maximal ill-formed subpart).
std::string generated_text(const qt::GenerateResult& r, const qt::Tokenizer& tokenizer) {
  std::vector<int32_t> text_ids = r.tokens;
  if (r.stopped) text_ids.pop_back();
  return qt::unicode::replace_invalid_utf8(tokenizer.decode(text_ids));
}

int run_generate_file(const GenerateArgs& args, const qt::LoadOptions& load, const qt::Tokenizer& tokenizer) {
  const at::Device device = load.device;
  const auto prompts = file_prompts(args, tokenizer);  // (every record checked before the model loads)
  qt::LlamaModel model = generation_model(args, load, device);
  const qt::GenerateOptions options = generation_options(args, model, tokenizer);
  std::vector<std::vector<int32_t>> ids;
  for (const auto& p : prompts) ids.push_back(p.second);
  const std::vector<qt::GenerateResult> results = qt::generate_batch(model, ids, options, args.batch_tokens);
  for (size_t i = 0; i < prompts.size(); ++i)
    std::cout << qt::Json{{"line", prompts[i].first}, {"prompt_ids", prompts[i].second}, {"ids", results[i].tokens},
                          {"text", generated_text(results[i], tokenizer)},
                          {"stop", results[i].stopped ? "eos" : "length"}}.dump()
              << "\n";
  std::cout << std::flush;
  return 0;
}

int run_generate(const GenerateArgs& args) {
  if (args.prompt.empty() == args.prompts.empty())
    qt::fail(qt::ErrorKind::Usage, "generate: give --prompt TEXT or --prompts FILE.jsonl");
  const at::Device device = parse_device(args.device);
  check_not_adapter(args.model);
  qt::LoadOptions load{device, device.is_cuda() ? at::kBFloat16 : at::kFloat};
  load.quantize_nf4 = args.quant == "nf4";  // as training loads the base
  auto tokenizer = qt::load_tokenizer(args.model);
  if (!args.prompts.empty()) return run_generate_file(args, load, *tokenizer);
  const std::vector<int32_t> prompt = generation_prompt(args, *tokenizer);
  qt::LlamaModel model = generation_model(args, load, device);
  qt::GenerateResult r = qt::generate_tokens(model, prompt, generation_options(args, model, *tokenizer));
  const std::string text = generated_text(r, *tokenizer);
  if (args.json) {
    std::cout << qt::Json{{"prompt_ids", prompt}, {"ids", r.tokens}, {"text", text},
                          {"stop", r.stopped ? "eos" : "length"}}.dump()
              << std::endl;
  } else {
    std::cout << text << std::endl;
  }
  return 0;
}

int run_quantize(const QuantizeArgs& args) {
  if (qt::files::exists(args.out) && !qt::files::is_dir(args.out))
    qt::fail_at(qt::ErrorKind::Usage, args.out, "is a file, not a directory (--out names the directory to write)");
  qt::QuantizeStats s = qt::quantize_model_dir(args.model, args.out, parse_device(args.device));
  qt::log::info("quantized " + std::to_string(s.linears) + " linears: " + std::to_string(s.input_bytes >> 20) + " MiB -> " +
                std::to_string(s.output_bytes >> 20) + " MiB in " + std::to_string(s.shards) + " shard(s) at " + args.out);
  std::cout << qt::Json{{"linears", s.linears}, {"input_bytes", s.input_bytes}, {"output_bytes", s.output_bytes},
                        {"shards", s.shards}, {"out", args.out}}.dump()
            << std::endl;
  return 0;
}

}  // namespace qt::cli
