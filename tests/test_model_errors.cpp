// Bad model directories and safetensors files get a qt::Error that names the file and what was expected.
#include <ATen/ATen.h>
#include <unistd.h>

#include <fstream>
#include <functional>
#include <limits>
#include <optional>

#include "lib/core/error.h"
#include "lib/core/files.h"
#include "lib/core/json.h"
#include "lib/core/safetensors.h"
#include "lib/model/hf_loader.h"
#include "lib/model/peft_adapter.h"
#include "lib/model/quantize_model.h"
#include "tests/catch.h"
#include "tests/test_util.h"

using qt::test::fixture;
using qt::test::scratch_dir;

namespace {

// Copies the small GQA model so that a test can damage its copy.
std::string copy_model(const std::string& name) {
  std::string dir = scratch_dir(name);
  qt::files::copy_tree(fixture("llama/gqa_untied/model"), dir);
  return dir;
}

// Runs `f`, requires a qt::Error of `kind` whose message contains every one of `needles`.
template <typename F>
void require_error(F&& f, qt::ErrorKind kind, std::initializer_list<std::string> needles) {
  try {
    f();
  } catch (const qt::Error& e) {
    INFO(e.what());
    CHECK(e.kind() == kind);
    for (const auto& n : needles) CHECK(std::string(e.what()).find(n) != std::string::npos);
    return;
  }
  FAIL("expected a qt::Error");
}

void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream(path, std::ios::binary | std::ios::trunc) << bytes;
}

std::string read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

// A safetensors file with a hand-written header (8-byte length + JSON + data bytes).
std::string raw_safetensors(const std::string& header, size_t data_bytes) {
  std::string out(8, '\0');
  uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>(n >> (8 * i));
  return out + header + std::string(data_bytes, '\x11');
}

}  // namespace

TEST_CASE("safetensors round trip keeps names dtypes shapes values and metadata", "[safetensors]") {
  std::string dir = scratch_dir("st_roundtrip");
  std::vector<std::pair<std::string, at::Tensor>> tensors = {
      {"a.bf16", at::randn({3, 5}).to(at::kBFloat16)}, {"b.f16", at::randn({7}).to(at::kHalf)},
      {"c.f32", at::randn({2, 3, 4})},                 {"d.u8", at::randint(0, 255, {9}, at::kByte)},
      {"e.i8", at::randint(-128, 127, {4}, at::kChar)}, {"f.i32", at::randint(-1000, 1000, {6}, at::kInt)},
      {"g.i64", at::randint(-1000, 1000, {2, 2}, at::kLong)}, {"h.t", at::randn({4, 6}).t()},
      // Zero-size tensors: data_offsets [n, n] where the next one starts (were refused as overlapping at times).
      {"a0.empty", at::empty({0, 4})}, {"c0.empty", at::empty({0})}, {"f0.empty", at::empty({3, 0}, at::kInt)}};
  qt::save_safetensors(dir + "/x.safetensors", tensors, {{"format", "pt"}});
  qt::SafetensorsFile f(dir + "/x.safetensors");
  CHECK(f.metadata().at("format") == "pt");
  REQUIRE(f.tensors().size() == tensors.size());
  for (const auto& [name, t] : tensors) {
    INFO(name);
    at::Tensor v = f.view(name);
    CHECK(v.scalar_type() == t.scalar_type());
    CHECK(v.sizes() == t.sizes());
    CHECK(at::equal(v, t.contiguous()));
  }
}

TEST_CASE("safetensors reader rejects truncated and inconsistent files and names the file", "[safetensors]") {
  std::string dir = scratch_dir("st_bad");
  const std::string path = dir + "/bad.safetensors";
  SECTION("shorter than the length prefix") {
    write_bytes(path, "abc");
    require_error([&] { qt::SafetensorsFile f(path); }, qt::ErrorKind::Model, {path, "8-byte"});
  }
  SECTION("header length points past the end") {
    std::string bytes = raw_safetensors(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", 8);
    bytes[0] = '\xff';
    bytes[1] = '\x7f';
    write_bytes(path, bytes);
    require_error([&] { qt::SafetensorsFile f(path); }, qt::ErrorKind::Model, {path, "past the end"});
  }
  SECTION("data offsets point past the end (truncated data)") {
    write_bytes(path, raw_safetensors(R"({"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", 8));
    require_error([&] { qt::SafetensorsFile f(path); }, qt::ErrorKind::Model, {path, "'w'", "past the end"});
  }
  SECTION("data offsets reversed") {
    write_bytes(path, raw_safetensors(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}})", 8));
    require_error([&] { qt::SafetensorsFile f(path); }, qt::ErrorKind::Model, {path, "'w'", "reversed"});
  }
  SECTION("an adapter's or checkpoint's file is reported as such") {
    write_bytes(path, raw_safetensors(R"({"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", 8));
    require_error([&] { qt::SafetensorsFile f(path, qt::ErrorKind::Checkpoint); }, qt::ErrorKind::Checkpoint,
                  {path, "'w'", "past the end"});
  }
  SECTION("byte range does not hold the shape") {
    write_bytes(path, raw_safetensors(R"({"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", 8));
    require_error([&] { qt::SafetensorsFile f(path); }, qt::ErrorKind::Model, {path, "'w'", "do not hold"});
  }
  SECTION("unknown dtype") {
    write_bytes(path, raw_safetensors(R"({"w":{"dtype":"F8_E9","shape":[2],"data_offsets":[0,2]}})", 2));
    require_error([&] { qt::SafetensorsFile f(path); }, qt::ErrorKind::Model, {path, "F8_E9"});
  }
  SECTION("overlapping tensors") {
    write_bytes(path, raw_safetensors(R"({"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},)"
                                      R"("b":{"dtype":"U8","shape":[4],"data_offsets":[2,6]}})", 6));
    require_error([&] { qt::SafetensorsFile f(path); }, qt::ErrorKind::Model, {path, "overlap"});
  }
  // The safetensors library refuses both (InvalidOffset, MetadataIncompleteBuffer): transformers cannot load them.
  SECTION("bytes between two tensors") {
    write_bytes(path, raw_safetensors(R"({"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},)"
                                      R"("b":{"dtype":"U8","shape":[4],"data_offsets":[6,10]}})", 10));
    require_error([&] { qt::SafetensorsFile f(path); }, qt::ErrorKind::Model,
                  {path, "'b' starts at byte 6", "'a' ends at 4", "2 bytes belong to no tensor"});
  }
  SECTION("bytes before the first tensor") {
    write_bytes(path, raw_safetensors(R"({"a":{"dtype":"U8","shape":[4],"data_offsets":[3,7]}})", 7));
    require_error([&] { qt::SafetensorsFile f(path); }, qt::ErrorKind::Model,
                  {path, "'a' starts at byte 3", "3 bytes belong to no tensor"});
  }
  SECTION("bytes after the last tensor") {
    write_bytes(path, raw_safetensors(R"({"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}})", 9));
    require_error([&] { qt::SafetensorsFile f(path); }, qt::ErrorKind::Model,
                  {path, "5 bytes after the last tensor's data", "end at byte 4 of 9"});
    write_bytes(path, raw_safetensors(R"({"__metadata__":{"format":"pt"}})", 3));
    require_error([&] { qt::SafetensorsFile f(path); }, qt::ErrorKind::Model, {path, "3 bytes after"});
  }
  SECTION("malformed header JSON") {
    write_bytes(path, raw_safetensors(R"({"w":{"dtype":"F32",)", 0));
    require_error([&] { qt::SafetensorsFile f(path); }, qt::ErrorKind::Model, {path, "malformed JSON"});
  }
  SECTION("missing file") {
    require_error([&] { qt::SafetensorsFile f(dir + "/nope.safetensors"); }, qt::ErrorKind::Model,
                  {"nope.safetensors", "not found"});
  }
  SECTION("an adapter given as a file, or missing (eval / export / generate --adapter)") {
    write_bytes(path, "{}");
    require_error([&] { qt::read_peft_adapter_config(path); }, qt::ErrorKind::Checkpoint,
                  {path, "is a file: an adapter is a directory"});
    require_error([&] { qt::read_peft_adapter_config(dir + "/nope"); }, qt::ErrorKind::Checkpoint,
                  {"nope", "adapter directory not found"});
  }
}

TEST_CASE("model loader reports bad model directories with the file and key", "[llama][errors]") {
  SECTION("missing config.json") {
    std::string dir = copy_model("no_config");
    qt::files::remove_tree(dir + "/config.json");
    require_error([&] { qt::load_llama(dir, {}); }, qt::ErrorKind::Model, {"config.json", "not found"});
  }
  SECTION("malformed config.json") {
    std::string dir = copy_model("bad_config");
    write_bytes(dir + "/config.json", "{\"hidden_size\": 64,\n \"vocab_size\": }");
    require_error([&] { qt::load_llama(dir, {}); }, qt::ErrorKind::Model, {"config.json", "line 2"});
  }
  SECTION("config.json with a wrongly typed field") {
    std::string dir = copy_model("typed_config");
    qt::Json j = qt::read_json_file(dir + "/config.json", qt::ErrorKind::Model);
    j["num_attention_heads"] = "four";
    qt::write_json_file(dir + "/config.json", j);
    require_error([&] { qt::load_llama(dir, {}); }, qt::ErrorKind::Model, {"config.json", "num_attention_heads", "integer"});
  }
  SECTION("num_hidden_layers beyond the layers the files hold, or beyond any model") {
    // Found by fuzzing: 1e6 built a million layers' state (4.3 GB) before a tensor was missing; 1e12 bad_alloc.
    std::string dir = copy_model("many_layers");
    qt::Json j = qt::read_json_file(dir + "/config.json", qt::ErrorKind::Model);
    const int64_t held = j["num_hidden_layers"].get<int64_t>();
    j["num_hidden_layers"] = held + 3;
    qt::write_json_file(dir + "/config.json", j);
    require_error([&] { qt::load_llama(dir, {}); }, qt::ErrorKind::Model,
                  {"config.json", "num_hidden_layers", "model.layers." + std::to_string(held) + " is missing"});
    j["num_hidden_layers"] = int64_t{1000000000000};
    qt::write_json_file(dir + "/config.json", j);
    require_error([&] { qt::load_llama(dir, {}); }, qt::ErrorKind::Model, {"num_hidden_layers", "at most 4096"});
  }
  SECTION("tie_word_embeddings true with an lm_head.weight that differs from the embeddings") {
    // Found by fuzzing: lm_head.weight was dropped and the two tied, where transformers keeps them apart.
    std::string dir = copy_model("tied_differs");
    qt::Json j = qt::read_json_file(dir + "/config.json", qt::ErrorKind::Model);
    j["tie_word_embeddings"] = true;
    qt::write_json_file(dir + "/config.json", j);
    require_error([&] { qt::load_llama(dir, {}); }, qt::ErrorKind::Model,
                  {"model.safetensors", "lm_head.weight", "differs from model.embed_tokens.weight", "tie_word_embeddings"});
    // Equal, as some exports keep both: tied.
    std::vector<std::pair<std::string, at::Tensor>> tensors;
    {
      qt::SafetensorsFile f(dir + "/model.safetensors");
      for (const auto& info : f.tensors()) tensors.emplace_back(info.name, f.view(info.name).clone());
    }
    at::Tensor embed;
    for (auto& [name, t] : tensors)
      if (name == "model.embed_tokens.weight") embed = t;
    for (auto& [name, t] : tensors)
      if (name == "lm_head.weight") t = embed.clone();
    qt::save_safetensors(dir + "/model.safetensors", tensors, {{"format", "pt"}});
    const qt::LlamaModel m = qt::load_llama(dir, {});
    CHECK(m.lm_head.is_same(m.embed_tokens));
  }
  SECTION("config.json of another architecture") {
    std::string dir = copy_model("other_arch");
    qt::Json j = qt::read_json_file(dir + "/config.json", qt::ErrorKind::Model);
    j["model_type"] = "gpt2";
    qt::write_json_file(dir + "/config.json", j);
    require_error([&] { qt::load_llama(dir, {}); }, qt::ErrorKind::Model, {"model_type", "gpt2"});
    for (const char* other : {"gemma", "phi3", "mixtral", "qwen3_moe"}) {
      j["model_type"] = other;
      qt::write_json_file(dir + "/config.json", j);
      require_error([&] { qt::load_llama(dir, {}); }, qt::ErrorKind::Model,
                    {"model_type", other, "supported: llama, mistral, qwen2, qwen3"});
    }
  }
  SECTION("Qwen2 with use_sliding_window true") {
    std::string dir = copy_model("qwen2_window");
    qt::Json j = qt::read_json_file(dir + "/config.json", qt::ErrorKind::Model);
    j["model_type"] = "qwen2";
    j["use_sliding_window"] = true;
    j["sliding_window"] = 4096;
    qt::write_json_file(dir + "/config.json", j);
    require_error([&] { qt::load_llama(dir, {}); }, qt::ErrorKind::Model,
                  {"config.json", "use_sliding_window", "not supported"});
  }
  SECTION("rms_norm_eps not > 0") {
    std::string dir = copy_model("eps");
    qt::Json j = qt::read_json_file(dir + "/config.json", qt::ErrorKind::Model);
    j["rms_norm_eps"] = -1;
    qt::write_json_file(dir + "/config.json", j);
    require_error([&] { qt::load_llama(dir, {}); }, qt::ErrorKind::Model, {"config.json", "rms_norm_eps", "> 0"});
  }
  SECTION("unknown rope type") {
    std::string dir = copy_model("rope_type");
    qt::Json j = qt::read_json_file(dir + "/config.json", qt::ErrorKind::Model);
    j["rope_parameters"]["rope_type"] = "longrope";
    qt::write_json_file(dir + "/config.json", j);
    require_error([&] { qt::load_llama(dir, {}); }, qt::ErrorKind::Model, {"rope_type", "longrope"});
  }
  // Found by fuzzing (round 8): an eos_token_id list holding a string or null was an internal error (train,
  // generate, export, quantize, plan); max_position_embeddings 0 trained a yarn rope to a NaN loss (its factor
  // max / original was 0) and a negative one silently; a rope_parameters that was no object was ignored.
  SECTION("config.json values of the wrong kind: eos_token_id entries, max_position_embeddings, rope_parameters") {
    std::string dir = copy_model("config_values");
    const qt::Json good = qt::read_json_file(dir + "/config.json", qt::ErrorKind::Model);
    auto refused = [&](const std::string& key, const qt::Json& value, std::initializer_list<std::string> needles) {
      qt::Json j = good;
      j[key] = value;
      qt::write_json_file(dir + "/config.json", j);
      require_error([&] { qt::load_llama(dir, {}); }, qt::ErrorKind::Model, needles);
    };
    refused("eos_token_id", qt::Json::array({"a"}), {"config.json", "eos_token_id[0]", "token id", "string"});
    refused("eos_token_id", qt::Json::array({2, nullptr}), {"config.json", "eos_token_id[1]", "null"});
    refused("eos_token_id", "2", {"config.json", "eos_token_id", "integer"});
    refused("max_position_embeddings", 0, {"config.json", "max_position_embeddings", "positive", "got 0"});
    refused("max_position_embeddings", -512, {"config.json", "max_position_embeddings", "got -512"});
    refused("rope_parameters", "default", {"config.json", "rope_parameters", "object or null"});
    qt::Json j = good;
    j["eos_token_id"] = qt::Json::array({2, 5});
    qt::write_json_file(dir + "/config.json", j);
    CHECK(qt::load_llama(dir, {}).config.eos_token_id == 2);
  }
  // Found by fuzzing (round 8): a directory named model.safetensors said "mmap failed: No such device", and a
  // broken symbolic link (a Hugging Face cache snapshot whose blob is gone) "no model.safetensors".
  SECTION("model.safetensors that is a directory or a broken symbolic link") {
    std::string dir = copy_model("weights_dir");
    qt::files::remove_tree(dir + "/model.safetensors");
    qt::files::make_dirs(dir + "/model.safetensors");
    require_error([&] { qt::load_llama(dir, {}); }, qt::ErrorKind::Model, {"model.safetensors", "is a directory"});
    qt::files::remove_tree(dir + "/model.safetensors");
    REQUIRE(::symlink("../blobs/0123abcd", (dir + "/model.safetensors").c_str()) == 0);
    require_error([&] { qt::load_llama(dir, {}); }, qt::ErrorKind::Model,
                  {"model.safetensors", "symbolic link to '../blobs/0123abcd', which does not exist"});
  }
  SECTION("truncated safetensors") {
    std::string dir = copy_model("truncated");
    std::string bytes = read_bytes(dir + "/model.safetensors");
    write_bytes(dir + "/model.safetensors", bytes.substr(0, bytes.size() - 1000));
    require_error([&] { qt::load_llama(dir, {}); }, qt::ErrorKind::Model, {"model.safetensors", "truncated"});
  }
  SECTION("a tensor with the wrong shape or dtype") {
    std::string dir = copy_model("wrong_shape");
    qt::SafetensorsFile src(dir + "/model.safetensors");
    std::vector<std::pair<std::string, at::Tensor>> tensors;
    for (const auto& t : src.tensors()) tensors.emplace_back(t.name, src.view(t.name).clone());
    SECTION("shape") {
      for (auto& [n, t] : tensors)
        if (n == "model.layers.1.mlp.up_proj.weight") t = t.narrow(0, 0, t.size(0) - 1).clone();
      qt::save_safetensors(dir + "/model.safetensors", tensors);
      require_error([&] { qt::load_llama(dir, {}); }, qt::ErrorKind::Model,
                    {"model.safetensors", "model.layers.1.mlp.up_proj.weight", "shape"});
    }
    SECTION("dtype") {
      for (auto& [n, t] : tensors)
        if (n == "model.norm.weight") t = t.to(at::kInt);
      qt::save_safetensors(dir + "/model.safetensors", tensors);
      require_error([&] { qt::load_llama(dir, {}); }, qt::ErrorKind::Model, {"model.norm.weight", "I32"});
    }
    SECTION("a NaN or an infinity in a weight, quantized on load or not") {
      for (auto& [n, t] : tensors) {
        if (n == "model.layers.1.self_attn.q_proj.weight") t.view(-1)[7] = std::numeric_limits<float>::quiet_NaN();
        if (n == "model.norm.weight") t.view(-1)[3] = std::numeric_limits<float>::infinity();
      }
      qt::save_safetensors(dir + "/model.safetensors", tensors);
      qt::LoadOptions nf4;
      nf4.quantize_nf4 = true;
      require_error([&] { qt::load_llama(dir, nf4); }, qt::ErrorKind::Model,
                    {"model.safetensors", "model.layers.1.self_attn.q_proj.weight", "NaN or infinite"});
      for (auto& [n, t] : tensors)
        if (n == "model.layers.1.self_attn.q_proj.weight") t.view(-1)[7] = 0.5f;
      qt::save_safetensors(dir + "/model.safetensors", tensors);
      require_error([&] { qt::load_llama(dir, nf4); }, qt::ErrorKind::Model,
                    {"model.safetensors", "model.norm.weight", "NaN or infinite"});
    }
    SECTION("missing tensor") {
      tensors.erase(std::remove_if(tensors.begin(), tensors.end(),
                                   [](const auto& p) { return p.first == "model.layers.0.self_attn.k_proj.weight"; }),
                    tensors.end());
      qt::save_safetensors(dir + "/model.safetensors", tensors);
      require_error([&] { qt::load_llama(dir, {}); }, qt::ErrorKind::Model, {"model.layers.0.self_attn.k_proj.weight", "missing"});
    }
  }
  SECTION("a tensor in two shards, or one the model does not take, refused by loading and quantize alike") {
    // Found by fuzzing: a duplicated linear was taken from the later shard silently (a norm was refused), quantize
    // ended in an internal error on it, and quantized an unexpected tensor into a directory that did not load.
    std::string dir = scratch_dir("dup_shard");
    qt::files::copy_tree(fixture("llama/mha_tied_sharded/model"), dir);
    const std::string first = dir + "/model-00001-of-00009.safetensors", second = dir + "/model-00002-of-00009.safetensors";
    auto read_all = [](const std::string& path) {
      std::vector<std::pair<std::string, at::Tensor>> out;
      qt::SafetensorsFile f(path);
      for (const auto& info : f.tensors()) out.emplace_back(info.name, f.view(info.name).clone());
      return out;
    };
    const auto original = read_all(second);
    auto doubled = original;
    doubled.push_back(read_all(first).front());
    qt::save_safetensors(second, doubled, {{"format", "pt"}});
    const std::string name = doubled.back().first;
    require_error([&] { qt::load_llama(dir, {}); }, qt::ErrorKind::Model,
                  {"model-00002-of-00009.safetensors", name, "model-00001-of-00009.safetensors too"});
    require_error([&] { qt::quantize_model_dir(dir, dir + "_q", at::kCPU); }, qt::ErrorKind::Model,
                  {name, "two shards"});
    CHECK(!qt::files::exists(dir + "_q"));
    auto extra = original;
    extra.emplace_back("model.layers.0.foo.weight", at::randn({4}));
    qt::save_safetensors(second, extra, {{"format", "pt"}});
    require_error([&] { qt::quantize_model_dir(dir, dir + "_q", at::kCPU); }, qt::ErrorKind::Model,
                  {"model.layers.0.foo.weight", "unexpected tensor"});
    CHECK(!qt::files::exists(dir + "_q"));
  }
  SECTION("missing shard") {
    std::string dir = scratch_dir("missing_shard");
    qt::files::copy_tree(fixture("llama/mha_tied_sharded/model"), dir);
    qt::files::remove_tree(dir + "/model-00003-of-00009.safetensors");
    require_error([&] { qt::load_llama(dir, {}); }, qt::ErrorKind::Model, {"model-00003-of-00009.safetensors", "missing"});
  }
  SECTION("an index naming a tensor no shard holds, or a path for a shard") {
    std::string dir = scratch_dir("bad_index");
    qt::files::copy_tree(fixture("llama/mha_tied_sharded/model"), dir);
    const std::string index = dir + "/model.safetensors.index.json";
    qt::Json j = qt::read_json_file(index, qt::ErrorKind::Model);
    const std::string shard = j["weight_map"].begin().value().get<std::string>();
    j["weight_map"]["model.layers.0.extra.weight"] = shard;
    qt::write_json_file(index, j);
    require_error([&] { qt::load_llama(dir, {}); }, qt::ErrorKind::Model,
                  {"model.safetensors.index.json", "model.layers.0.extra.weight", shard, "does not hold it"});
    j["weight_map"].erase("model.layers.0.extra.weight");
    j["weight_map"][j["weight_map"].begin().key()] = "../" + shard;
    qt::write_json_file(index, j);
    require_error([&] { qt::load_llama(dir, {}); }, qt::ErrorKind::Model,
                  {"model.safetensors.index.json", "not a file name in the model directory"});
  }
}

// As transformers 5.17 reads config.json (found by fuzzing, each gave other logits than transformers with exit 0):
// LlamaConfig has no sliding window and ignores the key, MistralConfig's is 4096 when absent; a rope_parameters'
// rope_theta wins over a top-level one (convert_rope_params_to_dict's setdefault); a non-empty rope_scaling replaces
// rope_parameters; a top-level original_max_position_embeddings wins for llama3 as for yarn (standardize_rope_params,
// run again when the rope is computed).
TEST_CASE("config.json keys read with transformers' precedence", "[llama][errors]") {
  const qt::Json base = {{"hidden_size", 64}, {"intermediate_size", 128}, {"num_hidden_layers", 2},
                         {"num_attention_heads", 4}, {"num_key_value_heads", 2}, {"vocab_size", 512},
                         {"max_position_embeddings", 2048}};
  auto parse = [&](const std::function<void(qt::Json&)>& edit) {
    qt::Json j = base;
    edit(j);
    return qt::LlamaConfig::from_json(j, "config.json");
  };
  CHECK(!parse([](qt::Json& j) { j["sliding_window"] = 8; }).sliding_window);
  CHECK(parse([](qt::Json& j) { j["model_type"] = "mistral"; }).sliding_window == std::optional<int64_t>(4096));
  CHECK(!parse([](qt::Json& j) { j["model_type"] = "mistral"; j["sliding_window"] = nullptr; }).sliding_window);
  CHECK(parse([](qt::Json& j) { j["model_type"] = "mistral"; j["sliding_window"] = 8; }).sliding_window ==
        std::optional<int64_t>(8));
  CHECK(parse([](qt::Json& j) {
          j["rope_parameters"] = {{"rope_type", "default"}, {"rope_theta", 10000.0}};
          j["rope_theta"] = 500000.0;
        }).rope.theta == 10000.0);
  CHECK(parse([](qt::Json& j) {
          j["rope_parameters"] = {{"rope_type", "default"}};
          j["rope_theta"] = 500000.0;
        }).rope.theta == 500000.0);
  const qt::Json llama3 = {{"rope_type", "llama3"}, {"factor", 8.0}, {"low_freq_factor", 1.0},
                           {"high_freq_factor", 4.0}, {"original_max_position_embeddings", 256}};
  const qt::LlamaConfig scaled = parse([&](qt::Json& j) {
    j["rope_parameters"] = {{"rope_type", "default"}, {"rope_theta", 1000.0}};
    j["rope_scaling"] = llama3;
    j["rope_theta"] = 500000.0;
  });
  CHECK(scaled.rope.type == qt::RopeType::Llama3);
  CHECK(scaled.rope.theta == 500000.0);
  CHECK(scaled.rope.original_max_position_embeddings == 256);
  CHECK(parse([&](qt::Json& j) {
          j["rope_scaling"] = llama3;
          j["original_max_position_embeddings"] = 64;
        }).rope.original_max_position_embeddings == 64);
  CHECK(parse([&](qt::Json& j) {
          qt::Json l = llama3;
          l.erase("original_max_position_embeddings");
          j["rope_scaling"] = l;
        }).rope.original_max_position_embeddings == 2048);
}
