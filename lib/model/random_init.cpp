#include "lib/model/random_init.h"

#include <ATen/ATen.h>

#include <map>

#include "lib/core/error.h"
#include "lib/quant/nf4.h"

namespace qt {
namespace {

Json llama3_rope(double factor, int64_t original) {
  return Json{{"rope_type", "llama3"}, {"factor", factor}, {"low_freq_factor", 1.0}, {"high_freq_factor", 4.0},
              {"original_max_position_embeddings", original}};
}

// config.json fields of each shape, as published with the models on the Hugging Face hub.
const std::map<std::string, Json>& shapes() {
  static const std::map<std::string, Json> table = [] {
    std::map<std::string, Json> t;
    auto llama3 = [](int64_t H, int64_t I, int64_t L, int64_t heads, bool tied, double factor) {
      return Json{{"hidden_size", H}, {"intermediate_size", I}, {"num_hidden_layers", L},
                  {"num_attention_heads", heads}, {"num_key_value_heads", 8}, {"vocab_size", 128256},
                  {"tie_word_embeddings", tied}, {"rms_norm_eps", 1e-5}, {"rope_theta", 500000.0},
                  {"rope_scaling", llama3_rope(factor, 8192)}, {"max_position_embeddings", 131072},
                  {"bos_token_id", 128000}, {"eos_token_id", 128001}, {"torch_dtype", "bfloat16"}};
    };
    t["llama-3.2-1b"] = llama3(2048, 8192, 16, 32, true, 32.0);
    t["llama-3.2-3b"] = llama3(3072, 8192, 28, 24, true, 32.0);
    t["llama-3.1-8b"] = llama3(4096, 14336, 32, 32, false, 8.0);
    t["llama-3.1-70b"] = llama3(8192, 28672, 80, 64, false, 8.0);
    auto llama2 = [](int64_t H, int64_t I, int64_t L, int64_t heads) {
      return Json{{"hidden_size", H}, {"intermediate_size", I}, {"num_hidden_layers", L},
                  {"num_attention_heads", heads}, {"num_key_value_heads", heads}, {"vocab_size", 32000},
                  {"tie_word_embeddings", false}, {"rms_norm_eps", 1e-5}, {"rope_theta", 10000.0},
                  {"max_position_embeddings", 4096}, {"bos_token_id", 1}, {"eos_token_id", 2},
                  {"torch_dtype", "float16"}};
    };
    t["llama-2-7b"] = llama2(4096, 11008, 32, 32);
    t["llama-2-13b"] = llama2(5120, 13824, 40, 40);
    t["mistral-7b"] = Json{{"hidden_size", 4096}, {"intermediate_size", 14336}, {"num_hidden_layers", 32},
                           {"num_attention_heads", 32}, {"num_key_value_heads", 8}, {"vocab_size", 32768},
                           {"tie_word_embeddings", false}, {"rms_norm_eps", 1e-5}, {"rope_theta", 1000000.0},
                           {"max_position_embeddings", 32768}, {"bos_token_id", 1}, {"eos_token_id", 2},
                           {"torch_dtype", "bfloat16"}, {"model_type", "mistral"}};
    t["tinyllama-1.1b"] = Json{{"hidden_size", 2048}, {"intermediate_size", 5632}, {"num_hidden_layers", 22},
                               {"num_attention_heads", 32}, {"num_key_value_heads", 4}, {"vocab_size", 32000},
                               {"tie_word_embeddings", false}, {"rms_norm_eps", 1e-5}, {"rope_theta", 10000.0},
                               {"max_position_embeddings", 2048}, {"bos_token_id", 1}, {"eos_token_id", 2},
                               {"torch_dtype", "float32"}};
    // Qwen/Qwen2.5-7B config.json: q, k, v with a bias (model_type qwen2), 28 heads of 128 on 4 KV heads.
    t["qwen2.5-7b"] = Json{{"hidden_size", 3584}, {"intermediate_size", 18944}, {"num_hidden_layers", 28},
                           {"num_attention_heads", 28}, {"num_key_value_heads", 4}, {"vocab_size", 152064},
                           {"tie_word_embeddings", false}, {"rms_norm_eps", 1e-6}, {"rope_theta", 1000000.0},
                           {"max_position_embeddings", 131072}, {"bos_token_id", 151643}, {"eos_token_id", 151643},
                           {"use_sliding_window", false}, {"torch_dtype", "bfloat16"}, {"model_type", "qwen2"}};
    // Qwen/Qwen3-8B config.json: q / k norms (model_type qwen3), no bias, head_dim 128 given, untied.
    t["qwen3-8b"] = Json{{"hidden_size", 4096}, {"intermediate_size", 12288}, {"num_hidden_layers", 36},
                         {"num_attention_heads", 32}, {"num_key_value_heads", 8}, {"head_dim", 128},
                         {"vocab_size", 151936}, {"tie_word_embeddings", false}, {"rms_norm_eps", 1e-6},
                         {"rope_theta", 1000000.0}, {"max_position_embeddings", 40960}, {"bos_token_id", 151643},
                         {"eos_token_id", 151645}, {"attention_bias", false}, {"use_sliding_window", false},
                         {"torch_dtype", "bfloat16"}, {"model_type", "qwen3"}};
    for (auto& [name, j] : t)
      if (!j.contains("model_type")) j["model_type"] = "llama";
    return t;
  }();
  return table;
}

}  // namespace

std::vector<std::string> shape_names() {
  std::vector<std::string> out;
  for (const auto& [name, j] : shapes()) out.push_back(name);
  return out;
}

LlamaConfig shape_config(const std::string& name, const std::string& file, const std::string& key) {
  auto it = shapes().find(name);
  if (it == shapes().end()) {
    std::string known;
    for (const auto& n : shape_names()) known += (known.empty() ? "" : ", ") + n;
    fail_key(ErrorKind::Config, file, key, "unknown shape '" + name + "'; known: " + known);
  }
  return LlamaConfig::from_json(it->second, "shape " + name);
}

LlamaModel random_llama(const LlamaConfig& config, const LoadOptions& options, uint64_t seed) {
  LlamaModel model(config);
  at::Generator gen = options.device.is_cuda() ? at::globalContext().defaultGenerator(options.device)
                                               : at::globalContext().defaultGenerator(at::kCPU);
  // The default generator of the device, reseeded: the same seed gives the same weights on that device.
  {
    std::lock_guard<std::mutex> lock(gen.mutex());
    gen.set_current_seed(seed);
  }
  const auto on = at::TensorOptions().device(options.device);
  auto normal = [&](std::vector<int64_t> shape, c10::ScalarType dtype) {
    return at::normal(0.0, 0.02, shape, gen, on.dtype(at::kFloat)).to(dtype);
  };
  // Drawn on the device (the same weights as a run that keeps them there), then moved at once where the plan
  // keeps them: one at a time, before the blocks, so the GPU never holds both.
  auto placed = [&](at::Tensor t, bool host) { return host && options.device.is_cuda() ? t.to(at::kCPU).pin_memory() : t; };
  model.embed_tokens = placed(normal({config.vocab_size, config.hidden_size}, options.dtype), options.embeddings_on_host);
  model.lm_head = config.tie_word_embeddings
                      ? model.embed_tokens
                      : placed(normal({config.vocab_size, config.hidden_size}, options.dtype), options.lm_head_on_host);
  model.norm = at::ones({config.hidden_size}, on.dtype(options.dtype));
  for (auto& b : model.layers) {
    b.input_layernorm = at::ones({config.hidden_size}, on.dtype(options.dtype));
    b.post_attention_layernorm = at::ones({config.hidden_size}, on.dtype(options.dtype));
    if (config.qk_norm) {
      b.q_norm = at::ones({config.head_dim}, on.dtype(options.dtype));
      b.k_norm = at::ones({config.head_dim}, on.dtype(options.dtype));
    }
  }
  model.for_each_linear([&](const std::string& name, Linear& l) {
    const std::vector<int64_t> shape = expected_shape(config, name + ".weight");
    if (options.quantize_nf4) {
      l.nf4 = std::make_shared<Nf4Weight>(quantize_nf4(normal(shape, at::kBFloat16), options.nf4_blocksize));
      if (options.linear_on_host(name, config.num_hidden_layers)) l.nf4 = std::make_shared<Nf4Weight>(l.nf4->to(at::kCPU));
    } else {
      l.weight = normal(shape, options.dtype);
    }
    if (config.linear_has_bias(name)) l.bias = at::zeros({shape[0]}, on.dtype(options.dtype));
  });
  return model;
}

}  // namespace qt
