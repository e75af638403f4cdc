// qlora-train: the command line. Subcommands wire parsed options to the library; every qt::Error becomes one
// line on stderr and the exit code of its kind (README, "Exit codes").
#include <ATen/ATen.h>
#include <ATen/Context.h>

#include <CLI/CLI.hpp>
#include <cmath>
#include <iostream>

#include "lib/core/error.h"
#include "lib/core/json.h"
#include "lib/core/log.h"
#include "lib/data/jsonl.h"
#include "lib/data/tokenizer.h"
#include "lib/model/hf_loader.h"
#include "lib/model/quantize_model.h"
#include "lib/train/evaluate.h"

namespace {

struct EvalArgs {
  std::string model;
  std::string data;
  int64_t max_seq_len = 2048;
  std::string device = "cpu";
  std::string quant = "nf4";
};

struct QuantizeArgs {
  std::string model;
  std::string out;
  std::string device = "cpu";
};

at::Device parse_device(const std::string& name) {
  if (name == "cpu") return at::kCPU;
  if (name == "cuda") {
    if (!at::hasCUDA()) qt::fail(qt::ErrorKind::Device, "--device cuda: no CUDA device is available");
    return at::Device(at::kCUDA, 0);
  }
  qt::fail(qt::ErrorKind::Usage, "--device '" + name + "': expected cpu or cuda");
}

int run_eval(const EvalArgs& args) {
  const at::Device device = parse_device(args.device);
  // fp32 on the CPU (exact comparisons with references), bf16 on the GPU.
  qt::LoadOptions load{device, device.is_cuda() ? at::kBFloat16 : at::kFloat};
  load.quantize_nf4 = args.quant == "nf4";  // as training loads the base, so that eval's figures are the trained model's
  auto tokenizer = qt::load_tokenizer(args.model);
  qt::LlamaModel model = qt::load_llama(args.model, load);
  std::vector<std::vector<int32_t>> docs;
  for (const auto& record : qt::read_jsonl(args.data))
    docs.push_back(tokenizer->encode_document(qt::record_string(record, args.data, "text")));
  qt::EvalResult r = qt::evaluate_loss(model, docs, args.max_seq_len);
  if (r.truncated) qt::log::warn(std::to_string(r.truncated) + " of " + std::to_string(r.documents) +
                                 " records were longer than --max-seq-len " + std::to_string(args.max_seq_len) +
                                 " tokens and were truncated");
  if (r.tokens == 0) qt::fail_at(qt::ErrorKind::Data, args.data, "no record has two or more tokens to evaluate");
  if (!std::isfinite(r.mean_loss())) qt::fail(qt::ErrorKind::Numeric, "evaluation loss is not finite");
  qt::Json out = {{"loss", r.mean_loss()}, {"perplexity", r.perplexity()}, {"tokens", r.tokens},
                  {"records", r.documents}, {"truncated", r.truncated}};
  std::cout << out.dump() << std::endl;
  return 0;
}

int run_quantize(const QuantizeArgs& args) {
  qt::QuantizeStats s = qt::quantize_model_dir(args.model, args.out, parse_device(args.device));
  qt::log::info("quantized " + std::to_string(s.linears) + " linears: " + std::to_string(s.input_bytes >> 20) + " MiB -> " +
                std::to_string(s.output_bytes >> 20) + " MiB in " + std::to_string(s.shards) + " shard(s) at " + args.out);
  std::cout << qt::Json{{"linears", s.linears}, {"input_bytes", s.input_bytes}, {"output_bytes", s.output_bytes},
                        {"shards", s.shards}, {"out", args.out}}.dump()
            << std::endl;
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"qlora-train: QLoRA fine-tuning of LLaMA-family models (NF4 base, LoRA adapters)"};
  app.set_version_flag("--version", std::string("qlora-train ") + QT_VERSION);
  std::string log_level = "info";
  app.add_option("--log-level", log_level, "debug, info, warn, error or off");
  app.require_subcommand(1);

  EvalArgs eval;
  CLI::App* eval_cmd = app.add_subcommand("eval", "Mean token cross-entropy and perplexity over a jsonl file's text records");
  eval_cmd->add_option("--model", eval.model, "Hugging Face model directory (config.json, safetensors, tokenizer)")->required();
  eval_cmd->add_option("--data", eval.data, "jsonl file of {\"text\": ...} records")->required();
  eval_cmd->add_option("--max-seq-len", eval.max_seq_len, "truncate each record to this many tokens")
      ->check(CLI::PositiveNumber);
  eval_cmd->add_option("--device", eval.device, "cpu or cuda");
  eval_cmd->add_option("--quant", eval.quant, "nf4 (quantize the base on load, as training does) or none")
      ->check(CLI::IsMember({"nf4", "none"}));

  QuantizeArgs quantize;
  CLI::App* quantize_cmd = app.add_subcommand("quantize", "Write a pre-quantized NF4 copy of a model directory (bitsandbytes layout)");
  quantize_cmd->add_option("--model", quantize.model, "Hugging Face model directory (16-bit safetensors)")->required();
  quantize_cmd->add_option("--out", quantize.out, "output directory (new or empty)")->required();
  quantize_cmd->add_option("--device", quantize.device, "where to quantize: cpu or cuda");

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    int code = app.exit(e);
    return code == 0 ? 0 : qt::exit_code(qt::ErrorKind::Usage);
  }
  try {
    qt::log::set_level(qt::log::parse_level(log_level));
    if (eval_cmd->parsed()) return run_eval(eval);
    if (quantize_cmd->parsed()) return run_quantize(quantize);
    return qt::exit_code(qt::ErrorKind::Usage);
  } catch (const qt::Error& e) {
    std::cerr << "qlora-train: " << qt::kind_name(e.kind()) << ": " << e.what() << std::endl;
    return qt::exit_code(e.kind());
  } catch (const c10::Error& e) {
    std::cerr << "qlora-train: internal error (torch): " << e.what_without_backtrace() << std::endl;
    return qt::exit_code(qt::ErrorKind::Internal);
  } catch (const std::exception& e) {
    std::cerr << "qlora-train: internal error: " << e.what() << std::endl;
    return qt::exit_code(qt::ErrorKind::Internal);
  }
}
