#include "lib/model/llama_config.h"

#include <algorithm>
#include <cmath>
#include <tuple>

namespace qt {

c10::ScalarType parse_dtype_name(const std::string& name, const std::string& file, const std::string& key) {
  std::string n = name.rfind("torch.", 0) == 0 ? name.substr(6) : name;
  if (n == "bfloat16") return c10::ScalarType::BFloat16;
  if (n == "float16" || n == "half") return c10::ScalarType::Half;
  if (n == "float32" || n == "float") return c10::ScalarType::Float;
  fail_key(ErrorKind::Model, file, key, "unsupported dtype '" + name + "' (expected bfloat16, float16 or float32)");
}

std::optional<c10::ScalarType> user_dtype(const std::string& name) {
  if (name == "bf16" || name == "bfloat16") return c10::ScalarType::BFloat16;
  if (name == "fp16" || name == "float16") return c10::ScalarType::Half;
  if (name == "fp32" || name == "float32") return c10::ScalarType::Float;
  return std::nullopt;
}

const char* dtype_short_name(c10::ScalarType type) {
  switch (type) {
    case c10::ScalarType::BFloat16: return "bf16";
    case c10::ScalarType::Half: return "fp16";
    default: return "fp32";
  }
}

std::string dtype_hf_name(c10::ScalarType type) {
  switch (type) {
    case c10::ScalarType::BFloat16: return "bfloat16";
    case c10::ScalarType::Half: return "float16";
    default: return "float32";
  }
}

const char* rope_type_name(RopeType type) {
  switch (type) {
    case RopeType::Linear: return "linear";
    case RopeType::Dynamic: return "dynamic";
    case RopeType::Yarn: return "yarn";
    case RopeType::Llama3: return "llama3";
    default: return "default";
  }
}

static RopeConfig parse_rope(const Json& j, const std::string& file, int64_t max_position_embeddings) {
  RopeConfig rope;
  // 5.x: rope_parameters {rope_type, rope_theta, factor, ...}; 4.x: rope_theta + rope_scaling {rope_type|type, ...}.
  // As transformers' convert_rope_params_to_dict: a non-empty rope_scaling replaces rope_parameters; the dict's
  // rope_theta wins over a top-level one.
  const Json* scaling = nullptr;
  std::string scaling_key;
  if (j.contains("rope_scaling") && !j["rope_scaling"].is_null()) {
    if (!j["rope_scaling"].is_object()) fail_key(ErrorKind::Model, file, "rope_scaling", "expected an object or null");
    if (!j["rope_scaling"].empty()) {
      scaling = &j["rope_scaling"];
      scaling_key = "rope_scaling";
    }
  }
  if (j.contains("rope_parameters") && !j["rope_parameters"].is_null() && !j["rope_parameters"].is_object())
    fail_key(ErrorKind::Model, file, "rope_parameters", "expected an object or null");
  if (!scaling && j.contains("rope_parameters") && j["rope_parameters"].is_object()) {
    scaling = &j["rope_parameters"];
    scaling_key = "rope_parameters";
  }
  JsonReader top{j, file, ErrorKind::Model};
  std::string theta_key = "rope_theta";
  if (scaling && scaling->contains("rope_theta")) {
    JsonReader r{*scaling, file, ErrorKind::Model, scaling_key + "."};
    rope.theta = r.get_double("rope_theta");
    theta_key = scaling_key + ".rope_theta";
  } else if (top.has("rope_theta")) {
    rope.theta = top.get_double("rope_theta");
  }
  if (!(rope.theta > 0)) fail_key(ErrorKind::Model, file, theta_key, "must be positive");
  if (!scaling) return rope;
  JsonReader s{*scaling, file, ErrorKind::Model, scaling_key + "."};
  std::string type = s.has("rope_type") ? s.get_string("rope_type") : s.get_string("type", "default");
  if (type == "default") return rope;
  // llama3 and yarn, as transformers' standardize_rope_params (run again when the rope is computed): a top-level
  // original_max_position_embeddings wins, else the one in the scaling dict, else max_position_embeddings.
  auto original_max = [&]() -> int64_t {
    if (top.has("original_max_position_embeddings")) return top.get_int("original_max_position_embeddings");
    if (s.has("original_max_position_embeddings")) return s.get_int("original_max_position_embeddings");
    return max_position_embeddings;
  };
  auto positive_factor = [&]() {
    rope.factor = s.get_double("factor");
    if (!(rope.factor > 0)) fail_key(ErrorKind::Model, file, scaling_key + ".factor", "must be positive");
  };
  if (type == "linear") {
    rope.type = RopeType::Linear;
    positive_factor();
    return rope;
  }
  if (type == "dynamic") {
    rope.type = RopeType::Dynamic;
    positive_factor();
    return rope;
  }
  if (type == "yarn") {
    rope.type = RopeType::Yarn;
    rope.original_max_position_embeddings = original_max();
    if (rope.original_max_position_embeddings <= 0)
      fail_key(ErrorKind::Model, file, scaling_key + ".original_max_position_embeddings", "must be positive");
    if (s.has("factor")) positive_factor();
    else rope.factor = static_cast<double>(max_position_embeddings) / rope.original_max_position_embeddings;
    // transformers: `get("beta_fast") or 32` (a 0 falls back to the default too).
    if (s.has("beta_fast") && s.get_double("beta_fast") != 0) rope.beta_fast = s.get_double("beta_fast");
    if (s.has("beta_slow") && s.get_double("beta_slow") != 0) rope.beta_slow = s.get_double("beta_slow");
    rope.truncate = s.get_bool("truncate", true);
    auto get_mscale = [](double scale, double m) { return scale <= 1 ? 1.0 : 0.1 * m * std::log(scale) + 1.0; };
    if (s.has("attention_factor")) {
      rope.attention_factor = s.get_double("attention_factor");
    } else {
      const double mscale = s.has("mscale") ? s.get_double("mscale") : 0.0;
      const double mscale_all_dim = s.has("mscale_all_dim") ? s.get_double("mscale_all_dim") : 0.0;
      rope.attention_factor = (mscale != 0 && mscale_all_dim != 0)
                                  ? get_mscale(rope.factor, mscale) / get_mscale(rope.factor, mscale_all_dim)
                                  : get_mscale(rope.factor, 1.0);
    }
    if (!(rope.beta_fast > 0) || !(rope.beta_slow > 0) || !(rope.attention_factor > 0))
      fail_key(ErrorKind::Model, file, scaling_key,
               "yarn scaling needs beta_fast > 0, beta_slow > 0 and a positive attention_factor");
    return rope;
  }
  if (type == "llama3") {
    rope.type = RopeType::Llama3;
    rope.factor = s.get_double("factor");
    rope.low_freq_factor = s.get_double("low_freq_factor");
    rope.high_freq_factor = s.get_double("high_freq_factor");
    rope.original_max_position_embeddings = original_max();
    if (!(rope.factor > 0) || !(rope.high_freq_factor > rope.low_freq_factor) || rope.original_max_position_embeddings <= 0)
      fail_key(ErrorKind::Model, file, scaling_key,
               "llama3 scaling needs factor > 0, high_freq_factor > low_freq_factor and original_max_position_embeddings > 0");
    return rope;
  }
  // Training with a rope we do not implement would silently give a different model: refuse.
  fail_key(ErrorKind::Model, file, scaling_key + ".rope_type",
           "unsupported rope type '" + type + "' (supported: default, linear, dynamic, yarn, llama3)");
}

LlamaConfig LlamaConfig::from_json(const Json& j, const std::string& file) {
  JsonReader r{j, file, ErrorKind::Model};
  if (!j.is_object()) fail_at(ErrorKind::Model, file, "expected a JSON object");
  LlamaConfig c;
  c.model_type = r.get_string("model_type", "llama");
  if (c.model_type != "llama" && c.model_type != "mistral" && c.model_type != "qwen2" && c.model_type != "qwen3")
    fail_key(ErrorKind::Model, file, "model_type",
             "unsupported architecture '" + c.model_type + "' (supported: llama, mistral, qwen2, qwen3)");
  // Qwen2 (transformers' Qwen2Attention): q, k and v projections with a bias, o_proj without, whatever
  // attention_bias says (Qwen2Config has no such key).
  c.qkv_bias = c.model_type == "qwen2";
  // Qwen3 (transformers' Qwen3Attention): q_norm / k_norm over head_dim; biases as attention_bias says.
  c.qk_norm = c.model_type == "qwen3";
  if (r.has("hidden_act") && r.get_string("hidden_act") != "silu")
    fail_key(ErrorKind::Model, file, "hidden_act", "unsupported activation '" + r.get_string("hidden_act") + "' (expected silu)");
  // Qwen2's modules read neither key (q / k / v always with a bias, o_proj and the MLP never): a config.json that
  // carries them (some exports do) changes nothing there.
  c.attention_bias = c.model_type != "qwen2" && r.get_bool("attention_bias", false);
  c.mlp_bias = c.model_type != "qwen2" && r.get_bool("mlp_bias", false);
  c.hidden_size = r.get_int("hidden_size");
  c.intermediate_size = r.get_int("intermediate_size");
  c.num_hidden_layers = r.get_int("num_hidden_layers");
  c.num_attention_heads = r.get_int("num_attention_heads");
  c.num_key_value_heads = r.get_int("num_key_value_heads", c.num_attention_heads);
  c.vocab_size = r.get_int("vocab_size");
  for (auto [key, v] : {std::pair<const char*, int64_t>{"hidden_size", c.hidden_size},
                        {"intermediate_size", c.intermediate_size},
                        {"num_hidden_layers", c.num_hidden_layers},
                        {"num_attention_heads", c.num_attention_heads},
                        {"num_key_value_heads", c.num_key_value_heads},
                        {"vocab_size", c.vocab_size}})
    if (v <= 0) fail_key(ErrorKind::Model, file, key, "must be a positive integer, got " + std::to_string(v));
  // Far beyond any LLaMA-family model (405B: 126 layers, hidden 16384, vocab 128256; Qwen: 152k): a broken file,
  // whose per-layer state or shapes would take the host's memory before anything else was checked.
  for (auto [key, v, most] : {std::tuple<const char*, int64_t, int64_t>{"num_hidden_layers", c.num_hidden_layers, 4096},
                              {"hidden_size", c.hidden_size, int64_t{1} << 20},
                              {"intermediate_size", c.intermediate_size, int64_t{1} << 22},
                              {"num_attention_heads", c.num_attention_heads, int64_t{1} << 16},
                              {"vocab_size", c.vocab_size, int64_t{1} << 26}})
    if (v > most)
      fail_key(ErrorKind::Model, file, key, std::to_string(v) + " is beyond what this trainer takes (at most " +
                                                std::to_string(most) + ")");
  if (c.num_attention_heads % c.num_key_value_heads != 0)
    fail_key(ErrorKind::Model, file, "num_key_value_heads",
             std::to_string(c.num_key_value_heads) + " does not divide num_attention_heads " +
                 std::to_string(c.num_attention_heads));
  if (r.has("head_dim")) {
    c.head_dim = r.get_int("head_dim");
  } else {
    if (c.hidden_size % c.num_attention_heads != 0)
      fail_key(ErrorKind::Model, file, "hidden_size", "not divisible by num_attention_heads and no head_dim given");
    c.head_dim = c.hidden_size / c.num_attention_heads;
  }
  if (c.head_dim <= 0 || c.head_dim % 2 != 0)
    fail_key(ErrorKind::Model, file, "head_dim", "must be a positive even integer, got " + std::to_string(c.head_dim));
  c.rms_norm_eps = r.get_double("rms_norm_eps", 1e-6);
  if (!(c.rms_norm_eps > 0) || !std::isfinite(c.rms_norm_eps))
    fail_key(ErrorKind::Model, file, "rms_norm_eps", "must be a finite number > 0, got " + std::to_string(c.rms_norm_eps));
  c.max_position_embeddings = r.get_int("max_position_embeddings", 2048);
  // The context generation stops at, and what yarn's factor (when absent) and llama3's scaling are computed from.
  if (c.max_position_embeddings <= 0)
    fail_key(ErrorKind::Model, file, "max_position_embeddings",
             "must be a positive integer, got " + std::to_string(c.max_position_embeddings));
  c.tie_word_embeddings = r.get_bool("tie_word_embeddings", false);
  if (r.has("dtype")) c.dtype = parse_dtype_name(r.get_string("dtype"), file, "dtype");
  else if (r.has("torch_dtype")) c.dtype = parse_dtype_name(r.get_string("torch_dtype"), file, "torch_dtype");
  c.rope = parse_rope(j, file, c.max_position_embeddings);
  // Qwen2 writes sliding_window (and max_window_layers) even where use_sliding_window is false: no window then.
  const bool qwen = c.model_type == "qwen2" || c.model_type == "qwen3";
  if (qwen && r.get_bool("use_sliding_window", false))
    fail_key(ErrorKind::Model, file, "use_sliding_window",
             "is true: Qwen's sliding window on the layers from max_window_layers on is not supported");
  // Mistral's window (transformers' MistralConfig: 4096 when the key is absent, none when null). LlamaConfig has no
  // sliding window and ignores the key (some conversions keep it): so do we.
  if (c.model_type == "mistral") {
    if (r.has("sliding_window")) {
      c.sliding_window = r.get_int("sliding_window");
      if (*c.sliding_window <= 0)
        fail_key(ErrorKind::Model, file, "sliding_window", "must be a positive integer or null");
    } else if (!j.contains("sliding_window")) {
      c.sliding_window = 4096;
    }
  }
  // transformers: an id, a list of ids (Llama 3.1's eos_token_id; the first is the one recorded here), or null.
  auto token_id = [&](const char* key) -> int64_t {
    if (!r.has(key)) return -1;
    const Json& v = j.at(key);
    if (v.is_array()) {
      for (size_t i = 0; i < v.size(); ++i)
        if (!v[i].is_number_integer())
          fail_key(ErrorKind::Model, file, std::string(key) + "[" + std::to_string(i) + "]",
                   "expected a token id (an integer), got " + std::string(json_type_name(v[i])) + " " + v[i].dump());
      return v.empty() ? -1 : v[0].get<int64_t>();
    }
    return r.get_int(key);
  };
  c.bos_token_id = token_id("bos_token_id");
  c.eos_token_id = token_id("eos_token_id");
  return c;
}

LlamaConfig LlamaConfig::from_file(const std::string& path) {
  return from_json(read_json_file(path, ErrorKind::Model), path);
}

Json LlamaConfig::to_json() const {
  Json rope_params = {{"rope_theta", rope.theta}, {"rope_type", rope_type_name(rope.type)}};
  if (rope.type == RopeType::Linear || rope.type == RopeType::Dynamic) rope_params["factor"] = rope.factor;
  if (rope.type == RopeType::Yarn) {
    rope_params["factor"] = rope.factor;
    rope_params["beta_fast"] = rope.beta_fast;
    rope_params["beta_slow"] = rope.beta_slow;
    rope_params["attention_factor"] = rope.attention_factor;
    rope_params["truncate"] = rope.truncate;
    rope_params["original_max_position_embeddings"] = rope.original_max_position_embeddings;
  }
  if (rope.type == RopeType::Llama3) {
    rope_params["factor"] = rope.factor;
    rope_params["low_freq_factor"] = rope.low_freq_factor;
    rope_params["high_freq_factor"] = rope.high_freq_factor;
    rope_params["original_max_position_embeddings"] = rope.original_max_position_embeddings;
  }
  const char* arch = model_type == "mistral" ? "MistralForCausalLM"
                     : model_type == "qwen2" ? "Qwen2ForCausalLM"
                     : model_type == "qwen3" ? "Qwen3ForCausalLM"
                                             : "LlamaForCausalLM";
  Json j = {{"architectures", {arch}},
            {"model_type", model_type},
            {"hidden_size", hidden_size},
            {"intermediate_size", intermediate_size},
            {"num_hidden_layers", num_hidden_layers},
            {"num_attention_heads", num_attention_heads},
            {"num_key_value_heads", num_key_value_heads},
            {"head_dim", head_dim},
            {"hidden_act", "silu"},
            {"rms_norm_eps", rms_norm_eps},
            {"rope_parameters", rope_params},
            {"max_position_embeddings", max_position_embeddings},
            {"vocab_size", vocab_size},
            {"tie_word_embeddings", tie_word_embeddings},
            {"dtype", dtype_hf_name(dtype)},
            {"attention_bias", attention_bias},
            {"mlp_bias", mlp_bias}};
  if (bos_token_id >= 0) j["bos_token_id"] = bos_token_id;
  if (eos_token_id >= 0) j["eos_token_id"] = eos_token_id;
  if (sliding_window) j["sliding_window"] = *sliding_window;
  if (model_type == "qwen2" || model_type == "qwen3") j["use_sliding_window"] = false;
  return j;
}

bool LlamaConfig::linear_has_bias(const std::string& name) const {
  if (name.find("self_attn.") == std::string::npos) return mlp_bias;
  if (attention_bias) return true;
  return qkv_bias && name.find("o_proj") == std::string::npos;
}

int64_t LlamaConfig::num_parameters() const {
  const int64_t h = hidden_size;
  int64_t block = h * q_size() + 2 * h * kv_size() + q_size() * h + 3 * h * intermediate_size + 2 * h;
  if (attention_bias) block += q_size() + 2 * kv_size() + h;
  else if (qkv_bias) block += q_size() + 2 * kv_size();
  if (qk_norm) block += 2 * head_dim;
  if (mlp_bias) block += 2 * intermediate_size + h;
  int64_t embed = vocab_size * h;
  return num_hidden_layers * block + embed * (tie_word_embeddings ? 1 : 2) + h;
}

}  // namespace qt
