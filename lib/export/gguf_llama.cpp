#include "lib/export/gguf_llama.h"

#include "lib/data/chat_template.h"

#include <ATen/ATen.h>
#include <sentencepiece_processor.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <iomanip>
#include <map>
#include <memory>
#include <sstream>
#include <tuple>

#include "lib/core/error.h"
#include "lib/core/files.h"
#include "lib/core/json.h"
#include "lib/core/log.h"
#include "lib/data/bpe_tokenizer.h"
#include "lib/data/tokenizer.h"
#include "lib/export/ggml_quants.h"
#include "lib/export/gguf_vocab.h"
#include "lib/export/ollama_modelfile.h"
#include "lib/model/merge.h"
#include "lib/model/peft_adapter.h"

namespace qt {

namespace {

struct FileTypeInfo {
  GgufFileType type;
  const char* name;
  uint32_t ftype;       // llama.h's enum llama_ftype, general.file_type
  GgmlType main_type;   // most 2-D tensors' type (llama-quant.cpp's llama_ftype_get_default_type)
};

constexpr FileTypeInfo kFileTypes[] = {
    {GgufFileType::F16, "f16", 1, GgmlType::F16},         {GgufFileType::BF16, "bf16", 32, GgmlType::BF16},
    {GgufFileType::Q8_0, "q8_0", 7, GgmlType::Q8_0},      {GgufFileType::Q4_K_M, "q4_k_m", 15, GgmlType::Q4_K},
    {GgufFileType::Q4_K_S, "q4_k_s", 14, GgmlType::Q4_K}, {GgufFileType::Q5_K_M, "q5_k_m", 17, GgmlType::Q5_K},
    {GgufFileType::Q5_K_S, "q5_k_s", 16, GgmlType::Q5_K}, {GgufFileType::Q6_K, "q6_k", 18, GgmlType::Q6_K},
    {GgufFileType::Q4_0, "q4_0", 2, GgmlType::Q4_0},      {GgufFileType::Q4_1, "q4_1", 3, GgmlType::Q4_1},
    {GgufFileType::Q5_0, "q5_0", 8, GgmlType::Q5_0},      {GgufFileType::Q5_1, "q5_1", 9, GgmlType::Q5_1},
    {GgufFileType::Q3_K_M, "q3_k_m", 12, GgmlType::Q3_K}, {GgufFileType::Q3_K_S, "q3_k_s", 11, GgmlType::Q3_K},
    {GgufFileType::Q3_K_L, "q3_k_l", 13, GgmlType::Q3_K}, {GgufFileType::Q2_K, "q2_k", 10, GgmlType::Q2_K},
};

const FileTypeInfo& info_of(GgufFileType type) {
  for (const FileTypeInfo& i : kFileTypes)
    if (i.type == type) return i;
  fail(ErrorKind::Internal, "unknown GGUF file type");
}

}  // namespace

GgufFileType parse_gguf_file_type(const std::string& name) {
  std::string choices;
  for (const FileTypeInfo& i : kFileTypes) {
    if (name == i.name) return i.type;
    choices += std::string(choices.empty() ? "" : ", ") + i.name;
  }
  fail(ErrorKind::Usage, "--gguf '" + name + "': expected one of " + choices);
}

const char* gguf_file_type_name(GgufFileType type) { return info_of(type).name; }

std::vector<std::string> gguf_file_type_names() {
  std::vector<std::string> names;
  for (const FileTypeInfo& i : kFileTypes) names.emplace_back(i.name);
  return names;
}

// transformers' _compute_yarn_parameters without attention_factor, mscale or mscale_all_dim: get_mscale(factor).
static double yarn_default_attention_factor(double factor) { return factor <= 1 ? 1.0 : 0.1 * std::log(factor) + 1.0; }

static std::string number(double v) {
  std::ostringstream s;
  s << std::setprecision(6) << v;
  return s.str();
}

std::string gguf_architecture(const LlamaConfig& c, const std::string& config_path) {
  const bool llama = c.model_type == "llama" || c.model_type == "mistral";
  if (!llama && c.model_type != "qwen2" && c.model_type != "qwen3")
    fail_key(ErrorKind::Model, config_path, "model_type",
             "'" + c.model_type + "': GGUF export supports llama, mistral, qwen2 and qwen3");
  // llama.cpp's `llama` takes a bias on any projection (attention_bias: q / k / v / o; mlp_bias: gate / up / down);
  // its qwen2 has q / k / v biases only, its qwen3 none.
  if (!llama && (c.attention_bias || (c.model_type == "qwen3" && c.qkv_bias)))
    fail_key(ErrorKind::Model, config_path, "attention_bias",
             "true: llama.cpp's " + c.model_type + " architecture has no place for these projection biases");
  if (!llama && c.mlp_bias)
    fail_key(ErrorKind::Model, config_path, "mlp_bias",
             "true: llama.cpp's " + c.model_type + " architecture has no place for gate / up / down biases");
  if (c.qk_norm && c.model_type != "qwen3")
    fail_key(ErrorKind::Model, config_path, "model_type", "q/k norms are written for qwen3 only");
  auto rope_key = [](const std::string& field) {
    return "rope_scaling." + field + " (rope_parameters." + field + " in transformers 5.x files)";
  };
  const bool rope_ok = c.rope.type == RopeType::Default || c.rope.type == RopeType::Linear ||
                       c.rope.type == RopeType::Yarn || (llama && c.rope.type == RopeType::Llama3);
  if (!rope_ok)
    fail_key(ErrorKind::Model, config_path, rope_key("rope_type"),
             std::string("'") + rope_type_name(c.rope.type) + "': GGUF export writes default, linear" +
                 (llama ? ", yarn and llama3" : " and yarn") + " rope scaling only" +
                 (c.rope.type == RopeType::Dynamic ? " (llama.cpp has no dynamic NTK scaling)" : ""));
  if (c.rope.type == RopeType::Yarn) {
    // llama.cpp's YaRN (ggml's rope_yarn) rounds the correction range to whole dimensions and scales cos / sin by
    // 1 + 0.1 ln(factor): transformers' truncate = true and its default attention_factor, for factor >= 1.
    if (!c.rope.truncate)
      fail_key(ErrorKind::Model, config_path, rope_key("truncate"),
               "false: llama.cpp's YaRN rounds the correction range to whole dimensions (truncate true)");
    if (c.rope.factor < 1)
      fail_key(ErrorKind::Model, config_path, rope_key("factor"),
               number(c.rope.factor) + ": llama.cpp's YaRN takes factors of 1 or more");
    // Its correction range is beta_fast 32 and beta_slow 1 for these architectures: a file with beta_fast 8 and
    // beta_slow 2 in rope.scaling.yarn_beta_* ran as 32 / 1 in llama-cpp-python 0.3.36.
    if (c.rope.beta_fast != 32 || c.rope.beta_slow != 1)
      fail_key(ErrorKind::Model, config_path, rope_key(c.rope.beta_fast != 32 ? "beta_fast" : "beta_slow"),
               "beta_fast " + number(c.rope.beta_fast) + ", beta_slow " + number(c.rope.beta_slow) +
                   ": llama.cpp's YaRN runs these architectures at beta_fast 32, beta_slow 1");
    const double want = yarn_default_attention_factor(c.rope.factor);
    if (std::abs(c.rope.attention_factor / want - 1) > 1e-6)
      fail_key(ErrorKind::Model, config_path, rope_key("attention_factor"),
               number(c.rope.attention_factor) + " (given, or from mscale / mscale_all_dim): llama.cpp's " +
                   "YaRN scales attention by 1 + 0.1 ln(factor) = " + number(want));
  }
  if (c.head_dim % 2 != 0) fail_key(ErrorKind::Model, config_path, "head_dim", "must be even for rotary embeddings");
  // llama.cpp's qwen2 sizes its q / k / v / o tensors from the hidden size (n_embd x n_embd), not from key_length:
  // a file with another head_dim does not load there ("check_tensor_dims: wrong shape"); llama / mistral and qwen3
  // take head_dim from attention.key_length.
  if (c.model_type == "qwen2" && c.head_dim * c.num_attention_heads != c.hidden_size)
    fail_key(ErrorKind::Model, config_path, "head_dim",
             std::to_string(c.head_dim) + " x " + std::to_string(c.num_attention_heads) + " heads is not hidden_size " +
                 std::to_string(c.hidden_size) +
                 ": llama.cpp's qwen2 architecture takes its heads' width from hidden_size");
  return llama ? "llama" : c.model_type;
}

at::Tensor permute_for_llama_cpp_rope(const at::Tensor& w, int64_t n_head) {
  const int64_t rows = w.size(0);
  QT_CHECK(rows % (2 * n_head) == 0, ErrorKind::Internal, "rope permutation: rows not a multiple of 2 x heads");
  std::vector<int64_t> shape = {n_head, 2, rows / n_head / 2};
  for (int64_t d = 1; d < w.dim(); ++d) shape.push_back(w.size(d));
  return w.reshape(shape).transpose(1, 2).reshape(w.sizes()).contiguous();
}

namespace {

// The type llama.cpp's `llama-quantize` gives each 2-D weight of the file types it makes here, without an importance
// matrix, for the architectures written here (no experts): llama-quant.cpp's llama_tensor_get_type, then its fallback
// for rows not a whole number of blocks. Called in llama.cpp's order (blocks ascending), as its counters of attn_v
// and ffn_down tensors are.
class QuantizedTypes {
 public:
  QuantizedTypes(GgufFileType file_type, const LlamaConfig& c, const std::string& arch, bool has_output)
      : ft_(file_type),
        n_layer_(static_cast<int>(c.num_hidden_layers)),
        n_gqa_(static_cast<int>(c.num_attention_heads / c.num_key_value_heads)),
        tied_(!has_output) {
    // llama.cpp's 70B model type (llama-model.cpp): 80 layers of `llama` with grouped K / V, or of qwen2.
    is_70b_ = c.num_hidden_layers == 80 &&
              ((arch == "llama" && c.num_key_value_heads != c.num_attention_heads) || arch == "qwen2");
  }

  // The file's own type for most tensors (llama_ftype_get_default_type).
  GgmlType default_type() const { return info_of(ft_).main_type; }

  GgmlType operator()(const std::string& name, int64_t ncols) {
    const bool k_m = ft_ == GgufFileType::Q4_K_M || ft_ == GgufFileType::Q5_K_M;
    GgmlType t = default_type();
    const auto has = [&](const char* part) { return name.find(part) != std::string::npos; };
    if (name == "output.weight" || (tied_ && name == "token_embd.weight")) {
      t = ncols % ggml_block_size(t) != 0 ? GgmlType::Q8_0 : GgmlType::Q6_K;
    } else if (name == "token_embd.weight") {
      // the file's default type
    } else if (has("attn_v.weight")) {
      if (ft_ == GgufFileType::Q2_K)
        t = n_gqa_ >= 4 ? GgmlType::Q4_K : GgmlType::Q3_K;
      else if (ft_ == GgufFileType::Q3_K_M)
        t = i_attn_v_ < 2 ? GgmlType::Q5_K : GgmlType::Q4_K;
      else if (ft_ == GgufFileType::Q3_K_L)
        t = GgmlType::Q5_K;
      else if (k_m && more_bits(i_attn_v_, n_layer_))
        t = GgmlType::Q6_K;
      else if (ft_ == GgufFileType::Q4_K_S && i_attn_v_ < 4)
        t = GgmlType::Q5_K;
      if (is_70b_ && (t == GgmlType::Q3_K || t == GgmlType::Q4_K)) t = GgmlType::Q5_K;
      ++i_attn_v_;
    } else if (has("ffn_down")) {
      if (ft_ == GgufFileType::Q2_K)
        t = GgmlType::Q3_K;
      else if (ft_ == GgufFileType::Q3_K_M)
        t = i_ffn_down_ < n_layer_ / 16 ? GgmlType::Q5_K : GgmlType::Q4_K;
      else if (ft_ == GgufFileType::Q3_K_L)
        t = GgmlType::Q5_K;
      else if (k_m && more_bits(i_ffn_down_, n_layer_))
        t = GgmlType::Q6_K;
      else if (ft_ == GgufFileType::Q4_K_S && i_ffn_down_ < n_layer_ / 8)
        t = GgmlType::Q5_K;
      ++i_ffn_down_;
    } else if (has("attn_output.weight")) {
      if (ft_ == GgufFileType::Q2_K)
        t = GgmlType::Q3_K;
      else if (ft_ == GgufFileType::Q3_K_M)
        t = GgmlType::Q4_K;
      else if (ft_ == GgufFileType::Q3_K_L)
        t = GgmlType::Q5_K;
    }
    if (ncols % ggml_block_size(t) != 0) {
      ++fallbacks_;
      // llama-quantize's fallbacks for the k-quants (q2_K / q3_K to q4_0); for the 32-value types f16, as for
      // anything not a multiple of 32.
      t = t == GgmlType::Q2_K || t == GgmlType::Q3_K ? GgmlType::Q4_0
          : t == GgmlType::Q4_K ? GgmlType::Q5_0
          : t == GgmlType::Q5_K ? GgmlType::Q5_1
          : t == GgmlType::Q6_K ? GgmlType::Q8_0
                                : GgmlType::F16;
      if (ncols % ggml_block_size(t) != 0) t = GgmlType::F16;
    }
    return t;
  }
  int64_t fallbacks() const { return fallbacks_; }

 private:
  // The layers a q4_k_m / q5_k_m file gives 6 bits in attn_v and ffn_down: the first and last eighth, every third
  // between (use_more_bits).
  static bool more_bits(int i, int n) { return i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2; }

  GgufFileType ft_;
  int n_layer_;
  int n_gqa_;  // query heads a key / value head
  bool tied_;
  bool is_70b_ = false;
  int i_attn_v_ = 0;
  int i_ffn_down_ = 0;
  int64_t fallbacks_ = 0;
};

// llama.cpp's tensor names (gguf-py's constants.py TENSOR_NAMES / tensor_mapping.py) for HF LlamaForCausalLM's.
std::string gguf_tensor_name(const std::string& hf, int64_t* block) {
  *block = -1;
  if (hf == "model.embed_tokens.weight") return "token_embd.weight";
  if (hf == "model.norm.weight") return "output_norm.weight";
  if (hf == "lm_head.weight") return "output.weight";
  const std::string prefix = "model.layers.";
  if (hf.compare(0, prefix.size(), prefix) == 0) {
    const size_t dot = hf.find('.', prefix.size());
    *block = std::stoll(hf.substr(prefix.size(), dot - prefix.size()));
    const std::string rest = hf.substr(dot + 1);
    static const std::map<std::string, std::string> names = {{"self_attn.q_proj.weight", "attn_q.weight"},
                                                             {"self_attn.k_proj.weight", "attn_k.weight"},
                                                             {"self_attn.v_proj.weight", "attn_v.weight"},
                                                             {"self_attn.o_proj.weight", "attn_output.weight"},
                                                             {"mlp.gate_proj.weight", "ffn_gate.weight"},
                                                             {"mlp.up_proj.weight", "ffn_up.weight"},
                                                             {"mlp.down_proj.weight", "ffn_down.weight"},
                                                             {"input_layernorm.weight", "attn_norm.weight"},
                                                             {"post_attention_layernorm.weight", "ffn_norm.weight"},
                                                             {"self_attn.q_proj.bias", "attn_q.bias"},
                                                             {"self_attn.k_proj.bias", "attn_k.bias"},
                                                             {"self_attn.v_proj.bias", "attn_v.bias"},
                                                             {"self_attn.o_proj.bias", "attn_output.bias"},
                                                             {"mlp.gate_proj.bias", "ffn_gate.bias"},
                                                             {"mlp.up_proj.bias", "ffn_up.bias"},
                                                             {"mlp.down_proj.bias", "ffn_down.bias"},
                                                             {"self_attn.q_norm.weight", "attn_q_norm.weight"},
                                                             {"self_attn.k_norm.weight", "attn_k_norm.weight"}};
    auto it = names.find(rest);
    if (it != names.end()) return "blk." + std::to_string(*block) + "." + it->second;
  }
  fail(ErrorKind::Internal, "GGUF export: no llama.cpp name for tensor " + hf);
}

// Llama 3.1's rope scaling as llama.cpp takes it: a rope_freqs tensor of per-frequency divisors
// (convert_hf_to_gguf.py LlamaModel.generate_extra_tensors; Meta's apply_scaling).
std::vector<float> llama3_rope_factors(const RopeConfig& r, int64_t head_dim) {
  const double low_wavelen = r.original_max_position_embeddings / r.low_freq_factor;
  const double high_wavelen = r.original_max_position_embeddings / r.high_freq_factor;
  std::vector<float> factors;
  for (int64_t i = 0; i < head_dim; i += 2) {
    const float freq = 1.0f / std::pow(static_cast<float>(r.theta), static_cast<float>(i) / head_dim);
    const double wavelen = 2 * M_PI / freq;
    if (wavelen < high_wavelen) {
      factors.push_back(1.0f);
    } else if (wavelen > low_wavelen) {
      factors.push_back(static_cast<float>(r.factor));
    } else {
      const double smooth =
          (r.original_max_position_embeddings / wavelen - r.low_freq_factor) / (r.high_freq_factor - r.low_freq_factor);
      factors.push_back(static_cast<float>(1.0 / ((1 - smooth) / r.factor + smooth)));
    }
  }
  return factors;
}

// The heads by which a tensor's rows go into llama.cpp's interleaved rotary order: `llama`'s attn_q (query heads)
// and attn_k (key-value heads), weights and biases; 0 for any other tensor, and for qwen2 / qwen3, whose rotate-half
// layout llama.cpp runs as NEOX rope.
int64_t llama_cpp_rope_heads(const std::string& arch, const std::string& gguf_name, const LlamaConfig& c) {
  if (arch != "llama") return 0;
  if (gguf_name.find(".attn_q.") != std::string::npos) return c.num_attention_heads;
  if (gguf_name.find(".attn_k.") != std::string::npos) return c.num_key_value_heads;
  return 0;
}

// The output files under temporary names until commit(); otherwise removed (and the directory, if made here).
class PendingOutputs {
 public:
  explicit PendingOutputs(const std::string& dir) : dir_(dir) {
    if (!files::exists(dir)) {
      files::make_dirs(dir);
      created_ = true;
    }
  }
  ~PendingOutputs() {
    if (committed_) return;
    try {
      for (const auto& [tmp, final_path] : files_) files::remove_tree(tmp);
      if (created_) files::remove_tree(dir_);
    } catch (...) {
    }
  }
  std::string add(const std::string& final_path) {
    const std::string tmp = files::join(dir_, "." + files::base_name(final_path) + ".partial");
    files::remove_tree(tmp);  // left by a killed earlier run
    files_.emplace_back(tmp, final_path);
    return tmp;
  }
  void commit() {
    for (const auto& [tmp, final_path] : files_) {
      if (files::exists(final_path)) fail_at(ErrorKind::Usage, final_path, "exists (appeared during the export)");
      files::rename_path(tmp, final_path);
    }
    files::sync_path(dir_);
    committed_ = true;
  }

 private:
  std::string dir_;
  bool created_ = false;
  bool committed_ = false;
  std::vector<std::pair<std::string, std::string>> files_;
};

std::string file_stem(const std::string& base_dir) {
  std::string name = files::base_name(base_dir);
  for (char& ch : name)
    if (!std::isalnum(static_cast<unsigned char>(ch)) && ch != '-' && ch != '_' && ch != '.') ch = '-';
  return name.empty() || name == "." || name == ".." ? "model" : name;
}

}  // namespace

GgufExportStats export_gguf(const GgufExportRequest& req) {
  // Refusals first: nothing is loaded or written for a model llama.cpp would not load or an existing output.
  const std::string config_path = find_model_files(req.base_dir).config_path;
  const LlamaConfig config = LlamaConfig::from_file(config_path);
  const std::string arch = gguf_architecture(config, config_path);
  // convert_hf_to_gguf.py drops Mistral's window too: llama.cpp's `llama` attends to the whole context.
  if (arch == "llama" && config.sliding_window && *config.sliding_window < config.max_position_embeddings)
    log::warn(config_path + ": sliding_window " + std::to_string(*config.sliding_window) +
              " is not in the GGUF (llama.cpp's llama architecture has no window): sequences longer than it attend "
              "further back than in training");
  if (files::exists(req.out_dir) && !files::is_dir(req.out_dir))
    fail_at(ErrorKind::Usage, req.out_dir, "exists and is not a directory (--out names the output directory)");
  GgufExportStats stats;
  const std::string stem = file_stem(req.base_dir) + "-" + gguf_file_type_name(req.type);
  stats.gguf_path = files::join(req.out_dir, stem + ".gguf");
  stats.modelfile_path = files::join(req.out_dir, "Modelfile");
  for (const auto& p : {stats.gguf_path, stats.modelfile_path})
    if (files::exists(p)) fail_at(ErrorKind::Usage, p, "exists; remove it or choose another --out directory");

  const std::string tok_cfg_path = files::join(req.base_dir, "tokenizer_config.json");
  const Json tok_cfg = files::exists(tok_cfg_path) ? read_json_file(tok_cfg_path, ErrorKind::Model) : Json::object();
  const std::string tok_json = files::join(req.base_dir, "tokenizer.json");
  const bool bpe = files::exists(tok_json) && is_byte_level_tokenizer_json(read_json_file(tok_json, ErrorKind::Model));
  Vocab vocab;
  SpecialTokens special;
  if (arch == "llama") {
    // The special ids, add_bos and the chat template as training and generate resolve them.
    const std::unique_ptr<Tokenizer> tokenizer = load_tokenizer(req.base_dir);
    vocab = bpe ? bpe_vocab(tok_json) : sentencepiece_vocab(req.base_dir, tok_cfg);
    special = {tokenizer->bos_id(),  tokenizer->eos_id(),  -1,
               tokenizer->add_bos(), tokenizer->add_eos(), tokenizer->chat_template()};
  } else {
    // Qwen's tokenizer.json (NFC normalizer, its own digit regex): its vocabulary, merges and special tokens are read
    // from the files as they are.
    if (!bpe)
      fail_at(ErrorKind::Model, tok_json, "expected a byte-level BPE tokenizer.json (" + arch + " models have one)");
    vocab = bpe_vocab(tok_json);
    special = special_tokens_from_files(vocab, tok_cfg, tok_cfg_path, req.base_dir, config);
  }
  pad_vocab(vocab, config.vocab_size, config_path);
  if (const std::string pad = token_text(tok_cfg, "pad_token"); !pad.empty()) special.pad = vocab.id_of(pad);

  LlamaModel model = load_llama(req.base_dir, req.load);
  load_peft_adapter(model, req.adapter_dir);
  model.for_each_linear([&](const std::string&, Linear& l) {
    if (l.lora) ++stats.merged;
  });

  GgufWriter w(32);
  w.add_string("general.architecture", arch);
  w.add_string("general.type", "model");
  w.add_string("general.name", file_stem(req.base_dir));
  w.add_u32("general.alignment", 32);
  w.add_u32(arch + ".context_length", static_cast<uint32_t>(config.max_position_embeddings));
  w.add_u32(arch + ".embedding_length", static_cast<uint32_t>(config.hidden_size));
  w.add_u32(arch + ".block_count", static_cast<uint32_t>(config.num_hidden_layers));
  w.add_u32(arch + ".feed_forward_length", static_cast<uint32_t>(config.intermediate_size));
  w.add_u32(arch + ".attention.head_count", static_cast<uint32_t>(config.num_attention_heads));
  w.add_u32(arch + ".attention.head_count_kv", static_cast<uint32_t>(config.num_key_value_heads));
  w.add_u32(arch + ".attention.key_length", static_cast<uint32_t>(config.head_dim));
  w.add_u32(arch + ".attention.value_length", static_cast<uint32_t>(config.head_dim));
  w.add_f32(arch + ".attention.layer_norm_rms_epsilon", static_cast<float>(config.rms_norm_eps));
  w.add_f32(arch + ".rope.freq_base", static_cast<float>(config.rope.theta));
  w.add_u32(arch + ".rope.dimension_count", static_cast<uint32_t>(config.head_dim));
  if (config.rope.type == RopeType::Linear) {
    w.add_string(arch + ".rope.scaling.type", "linear");
    w.add_f32(arch + ".rope.scaling.factor", static_cast<float>(config.rope.factor));
  }
  if (config.rope.type == RopeType::Yarn) {
    w.add_string(arch + ".rope.scaling.type", "yarn");
    w.add_f32(arch + ".rope.scaling.factor", static_cast<float>(config.rope.factor));
    w.add_u32(arch + ".rope.scaling.original_context_length",
              static_cast<uint32_t>(config.rope.original_max_position_embeddings));
  }
  w.add_u32(arch + ".vocab_size", static_cast<uint32_t>(config.vocab_size));
  w.add_u32("general.file_type", info_of(req.type).ftype);
  w.add_u32("general.quantization_version", 2);  // GGML_QNT_VERSION

  // A custom chat format: its template, and BOS added as its conversations had it.
  if (req.chat_format) {
    special.chat_template = custom_format_jinja(*req.chat_format);
    special.add_bos = req.chat_format->bos;
  }
  w.add_string("tokenizer.ggml.model", vocab.model);
  w.add_string("tokenizer.ggml.pre", vocab.pre);
  w.add_string_array("tokenizer.ggml.tokens", vocab.tokens);
  if (!vocab.scores.empty()) w.add_f32_array("tokenizer.ggml.scores", vocab.scores);
  w.add_i32_array("tokenizer.ggml.token_type", vocab.types);
  if (!vocab.merges.empty()) w.add_string_array("tokenizer.ggml.merges", vocab.merges);
  if (special.bos >= 0) w.add_u32("tokenizer.ggml.bos_token_id", static_cast<uint32_t>(special.bos));
  if (special.eos >= 0) w.add_u32("tokenizer.ggml.eos_token_id", static_cast<uint32_t>(special.eos));
  if (vocab.unk_id >= 0) w.add_u32("tokenizer.ggml.unknown_token_id", static_cast<uint32_t>(vocab.unk_id));
  if (special.pad >= 0) w.add_u32("tokenizer.ggml.padding_token_id", static_cast<uint32_t>(special.pad));
  w.add_bool("tokenizer.ggml.add_bos_token", special.add_bos);
  w.add_bool("tokenizer.ggml.add_eos_token", special.add_eos);
  if (!special.chat_template.empty()) w.add_string("tokenizer.chat_template", special.chat_template);

  // Tensors: token_embd (and rope_freqs) first, then the blocks in order, output_norm and output last.
  struct Entry {
    int64_t order;
    std::string name;
    MergedTensor t;
  };
  std::vector<Entry> entries;
  for (MergedTensor& t : merged_tensors(model)) {
    int64_t block = -1;
    std::string name = gguf_tensor_name(t.name, &block);
    const int64_t order = name == "token_embd.weight" ? -2
                          : block >= 0                ? block
                                                      : (name == "output_norm.weight" ? 1 << 30 : (1 << 30) + 1);
    if (const int64_t heads = llama_cpp_rope_heads(arch, name, config)) {
      auto make = t.make;
      t.make = [make, heads] { return permute_for_llama_cpp_rope(make(), heads); };
    }
    entries.push_back({order, std::move(name), std::move(t)});
  }
  std::stable_sort(entries.begin(), entries.end(), [](const Entry& a, const Entry& b) { return a.order < b.order; });
  if (config.rope.type == RopeType::Llama3) {
    const std::vector<float> f = llama3_rope_factors(config.rope, config.head_dim);
    w.add_tensor("rope_freqs.weight", {static_cast<int64_t>(f.size())}, GgmlType::F32,
                 [f] { return at::tensor(f, at::kFloat); });
  }
  int64_t q8_fallbacks = 0;
  const bool has_output =
      std::any_of(entries.begin(), entries.end(), [](const Entry& e) { return e.name == "output.weight"; });
  QuantizedTypes quantized_types(req.type, config, arch, has_output);
  for (Entry& e : entries) {
    // Norms and other 1-D tensors stay f32 in every mode, as convert_hf_to_gguf.py keeps them.
    GgmlType type = GgmlType::F32;
    const bool is_norm = e.name.size() >= 12 && e.name.compare(e.name.size() - 12, 12, "_norm.weight") == 0;
    if (e.t.shape.size() >= 2 && !is_norm) {
      switch (req.type) {
        case GgufFileType::F16:
          type = GgmlType::F16;
          break;
        case GgufFileType::BF16:
          type = GgmlType::BF16;
          break;
        case GgufFileType::Q8_0:
          // Rows not a multiple of 32 values cannot be q8_0 blocks: f16, as the converter falls back.
          type = e.t.shape.back() % kQ8_0BlockSize == 0 ? GgmlType::Q8_0 : GgmlType::F16;
          if (type == GgmlType::F16) ++q8_fallbacks;
          break;
        default: {
          type = quantized_types(e.name, e.t.shape.back());
          // llama-quantize reads the f16 file: the values quantized are the merged weights rounded to f16.
          auto make = e.t.make;
          e.t.make = [make, name = e.name] {
            at::Tensor x = make();
            if (!x.isfinite().all().item<bool>()) return x;  // the writer names it
            at::Tensor h = x.to(at::kHalf);
            if (!h.isfinite().all().item<bool>())
              fail(ErrorKind::Numeric, name + ": the merged weight holds a value f16 cannot store (|w| > 65504), " +
                                           "from which the k-quants are made; nothing exported");
            return h.to(at::kFloat);
          };
          break;
        }
      }
    }
    w.add_tensor(e.name, e.t.shape, type, e.t.make);
  }
  if (q8_fallbacks)
    log::warn(std::to_string(q8_fallbacks) +
              " tensor(s) have rows that are not a multiple of 32 values: written as f16");
  if (quantized_types.fallbacks())
    log::warn(std::to_string(quantized_types.fallbacks()) + " tensor(s) have rows that are not a whole number of " +
              ggml_type_name(quantized_types.default_type()) + " blocks: written as q5_0 / q5_1 / q8_0 for k-quants " +
              "(q4_0 for q2_K / q3_K, as llama-quantize falls back), f16 where not a multiple of 32 values");

  const std::string eos_text = special.eos >= 0 ? vocab.tokens[special.eos] : "";
  const OllamaModelfile modelfile =
      req.chat_format ? ollama_modelfile("./" + files::base_name(stats.gguf_path), *req.chat_format, eos_text)
                      : ollama_modelfile("./" + files::base_name(stats.gguf_path), special.chat_template, eos_text);
  stats.chat_format = modelfile.format;

  PendingOutputs out(req.out_dir);
  const std::string gguf_tmp = out.add(stats.gguf_path);
  const std::string modelfile_tmp = out.add(stats.modelfile_path);
  w.write(gguf_tmp);
  files::write_file_atomically(modelfile_tmp, modelfile.text);  // (its errors name errno's text: "write failed" alone)
  out.commit();
  stats.tensors = w.tensor_count();
  stats.bytes = files::file_size(stats.gguf_path);
  return stats;
}

constexpr GgmlType kGgufLoraTypes[] = {GgmlType::F32, GgmlType::F16, GgmlType::BF16};

std::vector<std::string> gguf_lora_type_names() {
  std::vector<std::string> names;
  for (GgmlType t : kGgufLoraTypes) names.emplace_back(ggml_type_name(t));
  return names;
}

GgmlType parse_gguf_lora_type(const std::string& name) {
  std::string choices;
  for (GgmlType t : kGgufLoraTypes) {
    if (name == ggml_type_name(t)) return t;
    choices += std::string(choices.empty() ? "" : ", ") + ggml_type_name(t);
  }
  fail(ErrorKind::Usage, "--gguf-lora '" + name + "': expected one of " + choices);
}

GgufLoraStats export_gguf_lora(const GgufLoraRequest& req) {
  const std::string config_path = find_model_files(req.base_dir).config_path;
  const LlamaConfig config = LlamaConfig::from_file(config_path);
  const std::string arch = gguf_architecture(config, config_path);
  if (files::exists(req.out_dir) && !files::is_dir(req.out_dir))
    fail_at(ErrorKind::Usage, req.out_dir, "exists and is not a directory (--out names the output directory)");
  GgufLoraStats stats;
  stats.gguf_path =
      files::join(req.out_dir, file_stem(req.adapter_dir) + "-lora-" + ggml_type_name(req.type) + ".gguf");
  if (files::exists(stats.gguf_path))
    fail_at(ErrorKind::Usage, stats.gguf_path, "exists; remove it or choose another --out directory");

  PeftAdapterTensors adapter = read_peft_adapter_tensors(req.adapter_dir, &config);
  const std::string adapter_config = files::join(req.adapter_dir, kAdapterConfigFile);
  if (adapter.config.lora.use_dora)
    fail_key(ErrorKind::Checkpoint, adapter_config, "use_dora",
             "true: a llama.cpp LoRA adapter has no DoRA magnitude; `export --gguf TYPE` merges a DoRA adapter "
             "into the model instead");
  if (!adapter.config.lora.modules_to_save.empty() || adapter.config.ensure_weight_tying)
    fail_key(ErrorKind::Checkpoint, adapter_config, "modules_to_save",
             "a trained lm_head / embed_tokens is a whole tensor, not a LoRA pair; `export --gguf TYPE` merges it "
             "into the model instead");

  struct Entry {
    int64_t block;
    std::string name;
    at::Tensor t;
  };
  std::vector<Entry> entries;
  const std::string prefix = "base_model.model.";
  const std::string suffix_a = ".lora_A.weight";  // else .lora_B.weight, of the same length (DoRA refused above)
  for (auto& [key, t] : adapter.tensors) {
    const bool is_a = key.compare(key.size() - suffix_a.size(), suffix_a.size(), suffix_a) == 0;
    const std::string module = key.substr(prefix.size(), key.size() - prefix.size() - suffix_a.size());
    int64_t block = -1;
    const std::string name = gguf_tensor_name(module + ".weight", &block);
    // B's rows are the weight's output rows: in llama.cpp's rotary order as the base's q / k rows are.
    const int64_t heads = is_a ? 0 : llama_cpp_rope_heads(arch, name, config);
    entries.push_back({block, name + (is_a ? ".lora_a" : ".lora_b"),
                       heads ? permute_for_llama_cpp_rope(t, heads) : t.contiguous()});
  }
  std::sort(entries.begin(), entries.end(),
            [](const Entry& a, const Entry& b) { return std::tie(a.block, a.name) < std::tie(b.block, b.name); });

  GgufWriter w(32);
  w.add_string("general.architecture", arch);
  w.add_string("general.type", "adapter");
  w.add_string("general.name", file_stem(req.adapter_dir));
  w.add_u32("general.alignment", 32);
  w.add_string("adapter.type", "lora");
  // llama.cpp scales each pair by alpha / r (r from the tensors' shapes): PEFT's scale x r gives PEFT's scale.
  stats.alpha = adapter.config.lora.scale() * static_cast<double>(adapter.config.lora.r);
  w.add_f32("adapter.lora.alpha", static_cast<float>(stats.alpha));
  for (Entry& e : entries) w.add_tensor(e.name, e.t.sizes().vec(), req.type, [t = e.t] { return t; });
  stats.adapters = static_cast<int64_t>(entries.size() / 2);

  PendingOutputs out(req.out_dir);
  const std::string gguf_tmp = out.add(stats.gguf_path);
  w.write(gguf_tmp);
  out.commit();
  stats.tensors = w.tensor_count();
  stats.bytes = files::file_size(stats.gguf_path);
  return stats;
}

}  // namespace qt
