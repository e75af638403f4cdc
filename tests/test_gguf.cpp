// The GGUF writer's pieces on inputs built here: q8_0 blocks against ggml's quantize_row_q8_0_ref by hand, the
// k-quant and q5_0 blocks decoded by their layouts back to within their rounding (their bytes against llama.cpp's own
// quantizer: tests/e2e/test_gguf.py), the q/k
// row permutation of convert_hf_to_gguf.py, the file layout (header, key/values, tensor infos, aligned data), and
// the Ollama Modelfile per chat format. Files read back by gguf-py and run in llama.cpp: tests/e2e/test_gguf.py.
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <vector>

#include "lib/core/files.h"
#include "lib/data/bpe_tokenizer.h"
#include "lib/export/ggml_quants.h"
#include "lib/export/gguf_llama.h"
#include "lib/export/gguf_vocab.h"
#include "lib/export/gguf_writer.h"
#include "lib/export/ollama_modelfile.h"
#include "tests/catch.h"
#include "tests/test_util.h"

using qt::test::has;
using qt::test::scratch_dir;

namespace {

template <typename T>
T read_at(const std::string& s, size_t& pos) {
  T v;
  std::memcpy(&v, s.data() + pos, sizeof v);
  pos += sizeof v;
  return v;
}

float half_at(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return static_cast<float>(c10::Half(h, c10::Half::from_bits()));
}

// ggml-common.h's layouts read back by hand (dequantize_row_q4_K / q6_K / q5_0).
std::vector<float> decode_q4_k(const uint8_t* b) {
  std::vector<float> out(256);
  const float d = half_at(b), dmin = half_at(b + 2);
  const uint8_t* sc = b + 4;
  for (int j = 0; j < 8; ++j) {
    const int s = j < 4 ? sc[j] & 63 : (sc[j + 4] & 0xF) | ((sc[j - 4] >> 6) << 4);
    const int m = j < 4 ? sc[j + 4] & 63 : (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4);
    const uint8_t* q = b + 16 + 32 * (j / 2);
    for (int l = 0; l < 32; ++l) out[32 * j + l] = d * s * ((j % 2 ? q[l] >> 4 : q[l] & 0xF)) - dmin * m;
  }
  return out;
}
std::vector<float> decode_q6_k(const uint8_t* b) {
  std::vector<float> out(256);
  const float d = half_at(b + 208);
  for (int i = 0; i < 256; ++i) {
    const int half = i / 128, r = i % 128, l = r % 32, quarter = r / 32;
    const uint8_t lo = b[64 * half + l + 32 * (quarter % 2)] >> (4 * (quarter / 2)) & 0xF;
    const uint8_t hi = (b[128 + 32 * half + l] >> (2 * quarter)) & 3;
    out[i] = d * static_cast<int8_t>(b[192 + i / 16]) * ((lo | (hi << 4)) - 32);
  }
  return out;
}
std::vector<float> decode_q5_0(const uint8_t* b) {
  std::vector<float> out(32);
  uint32_t qh;
  std::memcpy(&qh, b + 2, 4);
  for (int j = 0; j < 32; ++j) {
    const int lo = j < 16 ? b[6 + j] & 0xF : b[6 + j - 16] >> 4;
    out[j] = half_at(b) * ((lo | static_cast<int>(((qh >> j) & 1) << 4)) - 16);
  }
  return out;
}

std::string read_str(const std::string& s, size_t& pos) {
  const auto n = read_at<uint64_t>(s, pos);
  std::string out = s.substr(pos, n);
  pos += n;
  return out;
}

}  // namespace

TEST_CASE("q8_0 blocks hold an fp16 scale max over 127 and values rounded half away from zero", "[gguf]") {
  // Block 0: max |x| = 127, so d = 1 and q = round(x): 2.5 -> 3, -2.5 -> -3, 0.49 -> 0. Block 1: all zero.
  at::Tensor x = at::zeros({64}, at::kFloat);
  x[0] = 127.f;
  x[1] = 2.5f;
  x[2] = -2.5f;
  x[3] = 0.49f;
  x[4] = -127.f;
  const at::Tensor q = qt::quantize_q8_0(x);
  REQUIRE(q.numel() == 2 * 34);
  const uint8_t* b = q.data_ptr<uint8_t>();
  uint16_t d0, d1;
  std::memcpy(&d0, b, 2);
  std::memcpy(&d1, b + 34, 2);
  CHECK(d0 == c10::Half(1.0f).x);
  CHECK(d1 == 0);
  const auto* q0 = reinterpret_cast<const int8_t*>(b + 2);
  CHECK(q0[0] == 127);
  CHECK(q0[1] == 3);
  CHECK(q0[2] == -3);
  CHECK(q0[3] == 0);
  CHECK(q0[4] == -127);
  for (int j = 0; j < 32; ++j) CHECK(b[36 + j] == 0);

  // Random values: dequantized within half a step plus the scale's fp16 rounding.
  at::manual_seed(0);
  const at::Tensor r = at::randn({32 * 40}, at::kFloat) * 3;
  const at::Tensor back = qt::dequantize_q8_0(qt::quantize_q8_0(r), r.numel());
  const at::Tensor d = r.view({-1, 32}).abs().amax(1, true) / 127;
  CHECK(((back - r).view({-1, 32}).abs() <= d * 0.57).all().item<bool>());
}

TEST_CASE("the rope permutation interleaves the two halves of each head as convert_hf_to_gguf does", "[gguf]") {
  // 2 heads of head_dim 4, one column: HF rows [h0: 0 1 | 2 3, h1: 4 5 | 6 7] -> llama.cpp [0 2 1 3 4 6 5 7].
  const at::Tensor w = at::arange(8, at::kFloat).view({8, 1});
  const at::Tensor p = qt::permute_for_llama_cpp_rope(w, 2).view({8});
  const std::vector<float> want = {0, 2, 1, 3, 4, 6, 5, 7};
  for (int i = 0; i < 8; ++i) CHECK(p[i].item<float>() == want[i]);
}

TEST_CASE("a GGUF file has the v3 header, typed key values, innermost-first dims and aligned data", "[gguf]") {
  const std::string dir = scratch_dir("gguf_writer");
  qt::GgufWriter w(32);
  w.add_string("general.architecture", "llama");
  w.add_u32("llama.block_count", 2);
  w.add_string_array("tokenizer.ggml.tokens", {"a", "bc"});
  const at::Tensor t = at::arange(6, at::kFloat).view({2, 3});
  w.add_tensor("x.weight", {2, 3}, qt::GgmlType::F16, [t] { return t; });
  w.add_tensor("n.weight", {3}, qt::GgmlType::F32, [] { return at::ones({3}, at::kFloat); });
  const std::string path = qt::files::join(dir, "t.gguf");
  w.write(path);
  const std::string s = qt::files::read_file(path);

  size_t pos = 0;
  CHECK(s.substr(0, 4) == "GGUF");
  pos = 4;
  CHECK(read_at<uint32_t>(s, pos) == 3);
  CHECK(read_at<uint64_t>(s, pos) == 2);  // tensors
  CHECK(read_at<uint64_t>(s, pos) == 4);  // key values: general.alignment added
  CHECK(read_str(s, pos) == "general.architecture");
  CHECK(read_at<uint32_t>(s, pos) == 8);  // string
  CHECK(read_str(s, pos) == "llama");
  CHECK(read_str(s, pos) == "llama.block_count");
  CHECK(read_at<uint32_t>(s, pos) == 4);  // uint32
  CHECK(read_at<uint32_t>(s, pos) == 2);
  CHECK(read_str(s, pos) == "tokenizer.ggml.tokens");
  CHECK(read_at<uint32_t>(s, pos) == 9);  // array
  CHECK(read_at<uint32_t>(s, pos) == 8);  // of strings
  CHECK(read_at<uint64_t>(s, pos) == 2);
  CHECK(read_str(s, pos) == "a");
  CHECK(read_str(s, pos) == "bc");
  CHECK(read_str(s, pos) == "general.alignment");
  CHECK(read_at<uint32_t>(s, pos) == 4);
  CHECK(read_at<uint32_t>(s, pos) == 32);
  CHECK(read_str(s, pos) == "x.weight");
  CHECK(read_at<uint32_t>(s, pos) == 2);
  CHECK(read_at<uint64_t>(s, pos) == 3);  // innermost first
  CHECK(read_at<uint64_t>(s, pos) == 2);
  CHECK(read_at<uint32_t>(s, pos) == 1);  // F16
  CHECK(read_at<uint64_t>(s, pos) == 0);
  CHECK(read_str(s, pos) == "n.weight");
  CHECK(read_at<uint32_t>(s, pos) == 1);
  CHECK(read_at<uint64_t>(s, pos) == 3);
  CHECK(read_at<uint32_t>(s, pos) == 0);   // F32
  CHECK(read_at<uint64_t>(s, pos) == 32);  // 12 bytes of f16, padded to 32
  const size_t data = (pos + 31) / 32 * 32;
  for (size_t i = pos; i < data; ++i) CHECK(s[i] == 0);
  for (int i = 0; i < 6; ++i) {
    c10::Half h;
    std::memcpy(&h.x, s.data() + data + 2 * i, 2);
    CHECK(static_cast<float>(h) == static_cast<float>(i));
  }
  float one;
  std::memcpy(&one, s.data() + data + 32, 4);
  CHECK(one == 1.0f);
  CHECK(s.size() == data + 64);
}

TEST_CASE("the Modelfile carries the chat format of the model's template and its stop tokens", "[gguf]") {
  struct Case {
    const char* jinja;
    const char* format;
    std::vector<std::string> needles;
  };
  const std::vector<Case> cases = {
      {"{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>' }}",
       "llama3",
       {"<|start_header_id|>assistant<|end_header_id|>\n\n{{ .Response }}<|eot_id|>",
        "PARAMETER stop \"<|eot_id|>\"\n"}},
      {"{{ '[INST] ' + '<<SYS>>\\n' }}", "llama2", {"[INST] {{ if .System }}<<SYS>>", "PARAMETER stop \"[/INST]\"\n"}},
      {"{{ '[INST] ' + message['content'] + ' [/INST]' }}",
       "mistral",
       {"{{ .Prompt }} [/INST]", "PARAMETER stop \"[INST]\"\n"}},
      // Mistral v0.3's: the system message in the last user message, no space before [/INST], one before the answer.
      {"{%- if loop.last and system_message is defined %}{{- \"[INST] \" + system_message + \"\\n\\n\" + "
       "message[\"content\"] + \"[/INST]\" }}",
       "mistral-v0.3",
       {"[INST] {{ if .System }}{{ .System }}\n\n{{ end }}{{ .Prompt }}[/INST]{{ if .Response }} {{ .Response }}",
        "PARAMETER stop \"[INST]\"\n"}},
      {"{{ '<|user|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'system' %}\n{{ "
       "'<|system|>\n' + message['content'] + eos_token }}{{ '<|assistant|>\n'  + message['content'] + eos_token }}",
       "zephyr",
       {"<|user|>\n{{ .Prompt }}</s>\n{{ end }}<|assistant|>\n{{ .Response }}</s>\n", "PARAMETER stop \"<|user|>\"\n"}},
      {"{{bos_token}}{{ns.system_prompt}}{{'<\uff5cUser\uff5c>' + message['content']}}",
       "deepseek-r1",
       {"<\uff5cUser\uff5c>{{ .Prompt }}{{ end }}<\uff5cAssistant\uff5c>{{ .Response }}",
        "PARAMETER stop \"<\uff5cUser\uff5c>\"\n"}},
      {"{{- '<|im_start|>system\\n' }}",
       "chatml",
       {"<|im_start|>assistant\n{{ .Response }}<|im_end|>", "PARAMETER stop \"<|im_end|>\"\n"}},
      {"", "none", {"# No TEMPLATE"}},
  };
  for (const auto& c : cases) {
    const qt::OllamaModelfile m = qt::ollama_modelfile("./m-f16.gguf", c.jinja, "</s>");
    INFO(m.text);
    CHECK(m.format == c.format);
    CHECK(has(m.text, "FROM ./m-f16.gguf\n"));
    CHECK(has(m.text, "PARAMETER stop \"</s>\"\n"));
    for (const auto& n : c.needles) CHECK(has(m.text, n));
  }
}

TEST_CASE("a ChatML Modelfile carries the template's default system prompt as SYSTEM", "[gguf]") {
  // Qwen2.5's: the system message when there is one, else its own literal default.
  const std::string qwen25 =
      "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + "
      "'<|im_end|>\\n' }}{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a "
      "helpful assistant.<|im_end|>\\n' }}{%- endif %}";
  const qt::OllamaModelfile m = qt::ollama_modelfile("./q.gguf", qwen25, "<|im_end|>");
  INFO(m.text);
  CHECK(m.format == "chatml");
  CHECK(has(m.text, "SYSTEM \"You are Qwen, created by Alibaba Cloud. You are a helpful assistant.\"\n"));
  // Qwen3's: no default.
  const std::string qwen3 =
      "{%- if messages[0].role == 'system' %}{{- '<|im_start|>system\\n' + "
      "messages[0].content + '<|im_end|>\\n' }}{%- endif %}";
  CHECK(!has(qt::ollama_modelfile("./q.gguf", qwen3, "<|im_end|>").text, "SYSTEM"));
}

// Found in fuzzing round 12: added tokens were control only when marked special, so a Qwen2.5 / Qwen3 tokenizer's
// non-special <|fim_prefix|> ... <|file_sep|> were user-defined where convert_hf_to_gguf.py makes them control
// (llama.cpp then reads them from typed text and prints them in its output).
TEST_CASE("GGUF vocabularies type added tokens as convert_hf_to_gguf does, special-looking ones as control; byte-level "
          "pre-tokenizers by llama.cpp's names", "[gguf]") {
  const std::string dir = scratch_dir("gguf_added_tokens");
  const qt::Json added = qt::Json::array({
      {{"id", 3}, {"content", "<|endoftext|>"}, {"special", true}},
      {{"id", 4}, {"content", "<|fim_prefix|>"}, {"special", false}},
      {{"id", 5}, {"content", "<tool_call>"}, {"special", false}},
      {{"id", 6}, {"content", "<unused0>"}, {"special", false}},
      {{"id", 7}, {"content", "<\xef\xbd\x9c" "fim\xe2\x96\x81" "begin\xef\xbd\x9c>"}, {"special", false}},
      {{"id", 8}, {"content", "a\xe2\x96\x81" "b"}, {"special", false}},
      {{"id", 9}, {"content", "<pad>"}, {"special", false}},
      {{"id", 10}, {"content", "<|x"}, {"special", false}},
  });
  const qt::Json doc = {
      {"model", {{"type", "BPE"}, {"vocab", {{"a", 0}, {"b", 1}, {"ab", 2}}}, {"merges", {"a b"}}}},
      {"pre_tokenizer",
       {{"type", "Sequence"},
        {"pretokenizers",
         {{{"type", "Split"}, {"pattern", {{"Regex", qt::k_llama3_pattern}}}, {"behavior", "Isolated"}},
          {{"type", "ByteLevel"}}}}}},
      {"added_tokens", added}};
  qt::files::write_file_atomically(qt::files::join(dir, "tokenizer.json"), doc.dump());
  const qt::Vocab v = qt::bpe_vocab(qt::files::join(dir, "tokenizer.json"));
  using T = qt::TokenType;
  CHECK(v.types == std::vector<int32_t>{T::kNormal, T::kNormal, T::kNormal, T::kControl, T::kControl, T::kUserDefined,
                                        T::kControl, T::kControl, T::kUserDefined, T::kControl, T::kUserDefined});
  CHECK(v.tokens[7] == "<\xef\xbd\x9c" "fim\xe2\x96\x81" "begin\xef\xbd\x9c>");  // control tokens keep their text
  CHECK(v.tokens[8] == "a b");  // a user-defined token's "▁" is a space, as the converter pre-normalizes it

  // Sentencepiece: tokenizer_config.json's added tokens past the model's pieces, the same way.
  const std::string spm = qt::test::fixture("tokenizer/spm");
  const int32_t n = static_cast<int32_t>(qt::sentencepiece_vocab(spm, qt::Json::object()).tokens.size());
  qt::Json decoder = qt::Json::object();
  decoder[std::to_string(n)] = {{"content", "<|im_start|>"}, {"special", false}};
  decoder[std::to_string(n + 1)] = {{"content", "<tool_call>"}, {"special", false}};
  decoder[std::to_string(n + 2)] = {{"content", "<eot>"}, {"special", true}};
  const qt::Vocab s = qt::sentencepiece_vocab(spm, {{"added_tokens_decoder", decoder}});
  REQUIRE(s.types.size() == static_cast<size_t>(n) + 3);
  CHECK(s.types[n] == T::kControl);
  CHECK(s.types[n + 1] == T::kUserDefined);
  CHECK(s.types[n + 2] == T::kControl);
  // GPT-2's byte-level layout: llama.cpp's smollm after Digits(individual_digits) (SmolLM2's), gpt-2 alone; the
  // vocabulary and merges as Llama 3's layout writes them.
  const qt::Vocab smollm = qt::bpe_vocab(qt::test::fixture("tokenizer/bpe_gpt2/tokenizer.json"));
  const qt::Vocab gpt2 = qt::bpe_vocab(qt::test::fixture("tokenizer/bpe_gpt2_plain/tokenizer.json"));
  const qt::Vocab llama3 = qt::bpe_vocab(qt::test::fixture("tokenizer/bpe/tokenizer.json"));
  CHECK(smollm.pre == "smollm");
  CHECK(gpt2.pre == "gpt-2");
  CHECK(llama3.pre == "llama-bpe");
  CHECK((smollm.model == "gpt2" && smollm.tokens == llama3.tokens && smollm.merges == llama3.merges));
  // A layout llama.cpp has no name for is refused naming the key: ByteLevel adding a prefix space, Digits keeping
  // runs of digits, a Whitespace split.
  const qt::Json gpt2_doc =
      qt::read_json_file(qt::test::fixture("tokenizer/bpe_gpt2/tokenizer.json"), qt::ErrorKind::Model);
  const std::string pre_dir = qt::test::scratch_dir("gguf_pre");
  auto refused = [&](const std::string& name, const std::function<void(qt::Json&)>& edit) {
    qt::Json j = gpt2_doc;
    edit(j);
    const std::string path = qt::files::join(pre_dir, name + ".json");
    qt::files::write_file_atomically(path, j.dump(), false);
    qt::ErrorKind kind{};
    const std::string what = qt::test::error_of([&] { qt::bpe_vocab(path); }, &kind);
    INFO(name << ": " << what);
    CHECK(kind == qt::ErrorKind::Model);
    CHECK(qt::test::has(what, "pre_tokenizer"));
    CHECK(qt::test::has(what, path));
  };
  refused("prefix_space", [](qt::Json& j) { j["pre_tokenizer"]["pretokenizers"][1]["add_prefix_space"] = true; });
  refused("digit_runs", [](qt::Json& j) { j["pre_tokenizer"]["pretokenizers"][0]["individual_digits"] = false; });
  refused("whitespace", [](qt::Json& j) { j["pre_tokenizer"] = {{"type", "Whitespace"}}; });
  refused("no_regex", [](qt::Json& j) {
    j["pre_tokenizer"] = j["pre_tokenizer"]["pretokenizers"][1];
    j["pre_tokenizer"]["use_regex"] = false;
  });
  // ByteLevel as a bare object, not in a Sequence (GPT-2's own tokenizer.json): gpt-2.
  qt::Json bare = gpt2_doc;
  bare["pre_tokenizer"] = gpt2_doc["pre_tokenizer"]["pretokenizers"][1];
  const std::string bare_path = qt::files::join(pre_dir, "bare.json");
  qt::files::write_file_atomically(bare_path, bare.dump(), false);
  CHECK(qt::bpe_vocab(bare_path).pre == "gpt-2");
}

TEST_CASE("k-quant and q5_0 blocks decode to the values within their rounding", "[gguf]") {
  at::manual_seed(5);
  const at::Tensor x = at::randn({8, 512}, at::kFloat) * 0.05;  // 16 super-blocks of 256, 128 blocks of 32
  const float* xs = x.data_ptr<float>();
  struct Case {
    const char* name;
    at::Tensor (*quantize)(const at::Tensor&);
    int64_t block, bytes;
    std::vector<float> (*decode)(const uint8_t*);
    double rms_bound;  // of the error, in units of x's standard deviation
  };
  // Uniform rounding's error is step / sqrt(12): 16 levels over a sub-block of 32 (q4_K, min and scale fitted) about
  // 0.08 sigma, 64 levels over +-max of 16 (q6_K) about 0.02, 32 over +-max of 32 (q5_0) about 0.05.
  for (const Case& c : {Case{"q4_K", qt::quantize_q4_k, qt::kQK_K, qt::kQ4_KBlockBytes, decode_q4_k, 0.11},
                        Case{"q6_K", qt::quantize_q6_k, qt::kQK_K, qt::kQ6_KBlockBytes, decode_q6_k, 0.03},
                        Case{"q5_0", qt::quantize_q5_0, qt::kQ5_Block, qt::kQ5_0BlockBytes, decode_q5_0, 0.07}}) {
    INFO(c.name);
    const at::Tensor q = c.quantize(x);
    REQUIRE(q.numel() == x.numel() / c.block * c.bytes);
    double se = 0, worst = 0;
    for (int64_t b = 0; b < x.numel() / c.block; ++b) {
      const std::vector<float> back = c.decode(q.data_ptr<uint8_t>() + b * c.bytes);
      for (int64_t i = 0; i < c.block; ++i) {
        const double e = back[i] - xs[b * c.block + i];
        se += e * e;
        worst = std::max(worst, std::abs(e));
      }
    }
    const double rms = std::sqrt(se / x.numel()) / 0.05;
    INFO("rms error " << rms << " sigma, worst " << worst / 0.05 << " sigma");
    CHECK(rms > 0.001);  // not the identity (a decoder reading the wrong bytes would be far off either way)
    CHECK(rms < c.rms_bound);
    CHECK(worst / 0.05 < 6 * c.rms_bound);
  }
  CHECK(qt::ggml_nbytes(qt::GgmlType::Q4_K, 512) == 2 * 144);
  CHECK(qt::ggml_nbytes(qt::GgmlType::Q5_K, 512) == 2 * 176);
  CHECK(qt::ggml_nbytes(qt::GgmlType::Q6_K, 512) == 2 * 210);
  CHECK(qt::ggml_nbytes(qt::GgmlType::Q5_1, 64) == 2 * 24);
  CHECK(qt::parse_gguf_file_type("q4_k_m") == qt::GgufFileType::Q4_K_M);
  CHECK(has(qt::test::error_of([] { qt::parse_gguf_file_type("q4_k"); }),
            "expected one of f16, bf16, q8_0, q4_k_m, q4_k_s"));
}

// Found in fuzzing round 12: a merged weight finite in fp32 but beyond fp16's 65504 was written to an f16 GGUF as
// infinity (NaN logits in llama.cpp) with exit 0, where export --merge --dtype fp16 refuses it; likewise a q8_0
// block whose fp16 scale amax / 127 overflows.
TEST_CASE("a GGUF weight its type cannot store is a numeric error naming the tensor", "[gguf]") {
  const std::string dir = scratch_dir("gguf_overflow");
  auto write = [&](qt::GgmlType type, float value) {
    qt::GgufWriter w(32);
    w.add_string("general.architecture", "llama");
    at::Tensor t = at::ones({2, 32}, at::kFloat);
    t[1][5] = value;
    w.add_tensor("blk.0.ffn_down.weight", {2, 32}, type, [t] { return t; });
    return qt::test::error_of([&] { w.write(qt::files::join(dir, "t.gguf")); });
  };
  CHECK(write(qt::GgmlType::F16, 65504.f).empty());
  CHECK(write(qt::GgmlType::F32, 1e30f).empty());
  CHECK(write(qt::GgmlType::BF16, 1e30f).empty());
  CHECK(write(qt::GgmlType::Q8_0, 127.f * 65504.f).empty());
  CHECK(has(write(qt::GgmlType::F16, 7e4f), "blk.0.ffn_down.weight: the merged weight holds a value f16 cannot store"));
  CHECK(has(write(qt::GgmlType::F16, -1e5f), "(|w| > 65504)"));
  CHECK(has(write(qt::GgmlType::Q8_0, 1e7f), "q8_0 cannot store (|w| > 127 x 65504"));
  CHECK(has(write(qt::GgmlType::Q5_0, 1e5f), "q5_0 cannot store (|w| > 65504)"));
}
