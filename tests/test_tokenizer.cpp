// Tokenizer parity with the reference libraries. Expected ids come from tests/oracles/gen_tokenizer.py
// (sentencepiece, tokenizers) at fixture time; nothing here is hard-coded.
#include <cstdio>
#include <functional>
#include <optional>
#include <set>

#include <unistd.h>
#include <fstream>
#include <string>
#include <vector>

#include "lib/core/error.h"
#include "lib/core/files.h"
#include "lib/core/json.h"
#include "lib/data/bpe_tokenizer.h"
#include "lib/data/unicode_nfc.h"
#include "lib/data/sentencepiece_tokenizer.h"
#include "lib/data/tokenizer.h"
#include "tests/test_util.h"
#include "lib/data/unicode_tables.h"
#include "lib/data/unicode_text.h"
#include "tests/catch.h"

namespace {

const std::string k_dir = std::string(QT_FIXTURES) + "/tokenizer";

const qt::Json& cases() {
  static const qt::Json doc = qt::read_json_file(k_dir + "/cases.json", qt::ErrorKind::Internal);
  return doc;
}

const qt::Json& model_cases(const std::string& dir) {
  for (const auto& m : cases().at("models"))
    if (m.at("dir") == dir) return m;
  throw std::runtime_error("no cases for " + dir);
}

std::vector<int32_t> ids_of(const qt::Json& j) { return j.get<std::vector<int32_t>>(); }

// Runs every oracle case of one model directory through the C++ tokenizer.
void check_parity(const std::string& dir) {
  const qt::Json& m = model_cases(dir);
  auto tok = qt::load_tokenizer(k_dir + "/" + dir);
  CHECK(tok->vocab_size() == m.at("vocab_size").get<int32_t>());
  CHECK(tok->bos_id() == m.at("bos_id").get<int32_t>());
  CHECK(tok->eos_id() == m.at("eos_id").get<int32_t>());
  CHECK(tok->add_bos() == m.at("add_bos").get<bool>());
  CHECK(tok->add_eos() == m.at("add_eos").get<bool>());
  CHECK(tok->chat_template() == m.at("chat_template").get<std::string>());
  for (const auto& p : m.at("pieces").items()) {
    INFO("piece " << p.key());
    CHECK(tok->token_to_id(p.key()) == p.value().get<int32_t>());
    CHECK(tok->id_to_token(p.value().get<int32_t>()) == p.key());
  }
  CHECK(tok->token_to_id("no such token \xF0\x9F\xA6\x84") == -1);
  for (const auto& c : m.at("cases")) {
    const std::string text = c.at("text");
    INFO(dir << " text: \"" << text << "\"");
    const auto ids = ids_of(c.at("ids"));
    CHECK(tok->encode(text) == ids);
    CHECK(tok->encode_with_special(text) == ids_of(c.at("with_special")));
    CHECK(tok->encode_document(text) == ids_of(c.at("document")));
    CHECK(tok->decode(ids_of(c.at("with_special"))) == c.at("decoded").get<std::string>());
    // The oracle checks that the reference library round-trips too (to the normalized text under NFC).
    CHECK(tok->decode(ids) == c.value("normalized", text));
  }
}

// Expects load_tokenizer(dir) to fail with ErrorKind::Model and a message naming `where`.
void check_load_error(const std::string& dir, const std::string& where, const std::string& says) {
  try {
    qt::load_tokenizer(dir);
    FAIL("load_tokenizer(" << dir << ") did not throw");
  } catch (const qt::Error& e) {
    INFO(e.what());
    CHECK(e.kind() == qt::ErrorKind::Model);
    CHECK(std::string(e.what()).find(where) != std::string::npos);
    CHECK(std::string(e.what()).find(says) != std::string::npos);
  }
}

}  // namespace

TEST_CASE("sentencepiece tokenizer gives the sentencepiece library's ids, specials and round trips", "[tokenizer]") {
  auto tok = qt::load_tokenizer(k_dir + "/spm");
  CHECK(dynamic_cast<qt::SentencePieceTokenizer*>(tok.get()) != nullptr);
  check_parity("spm");
}

// Past 80 KB the text is encoded in pieces cut at single spaces (sentencepiece's own Encode takes ~250 bytes a
// byte); the ids are the library's for the whole text.
TEST_CASE("sentencepiece tokenizer on long text gives the library's ids for the whole text", "[tokenizer]") {
  auto tok = qt::load_tokenizer(k_dir + "/spm");
  const qt::Json& longs = model_cases("spm").at("long");
  REQUIRE(longs.size() == 2);
  for (const auto& c : longs) {
    const std::string text = c.at("text");
    const auto ids = ids_of(c.at("ids"));
    REQUIRE(text.size() > 150000);
    const auto got = tok->encode(text);
    size_t first = 0;
    while (first < std::min(got.size(), ids.size()) && got[first] == ids[first]) ++first;
    INFO(text.size() << " bytes, " << ids.size() << " ids; first difference at id " << first);
    CHECK(got == ids);
    CHECK(tok->encode_with_special(text) == ids);
    CHECK(tok->decode(ids) == text);
  }
}

TEST_CASE("byte-level BPE gives tokenizers' ids (merges as pairs)", "[tokenizer]") {
  auto tok = qt::load_tokenizer(k_dir + "/bpe");
  CHECK(dynamic_cast<qt::BpeTokenizer*>(tok.get()) != nullptr);
  check_parity("bpe");
}

TEST_CASE("byte-level BPE in GPT-2's layout gives tokenizers' ids: ByteLevel's own regex, after each digit split "
          "off alone (SmolLM2's) or not",
          "[tokenizer]") {
  check_parity("bpe_gpt2");
  check_parity("bpe_gpt2_plain");
  // Against the regex's alternatives as tokenizers splits them (contractions in lower case only; a space goes with
  // the run after it; a run of spaces before a word leaves its last one to the word).
  using V = std::vector<std::string_view>;
  CHECK(qt::gpt2_pre_tokenize("It's 'S we'RE  x12 !?", false) == V{"It", "'s", " '", "S", " we", "'", "RE", " ", " x",
                                                                     "12", " !?"});
  CHECK(qt::gpt2_pre_tokenize("a 12b", true) == V{"a", " ", "1", "2", "b"});
}

TEST_CASE("byte-level BPE gives tokenizers' ids (merges as strings, ignore_merges, Instruct EOS)", "[tokenizer]") {
  check_parity("bpe_legacy");
}

TEST_CASE("byte-level BPE in Qwen2's layout gives tokenizers' ids: digits one at a time, NFC (decomposed and "
          "reordered marks, Hangul jamo, singletons, exclusions)",
          "[tokenizer]") {
  check_parity("bpe_qwen");
  // The normalizer on its own against tokenizers' NFC.
  for (const auto& c : model_cases("bpe_qwen").at("cases")) {
    const std::string text = c.at("text");
    INFO("text: \"" << text << "\"");
    CHECK(qt::unicode::nfc(text) == c.at("normalized").get<std::string>());
  }
}

// tokenizers' NFC has Unicode 9.0's tables: a mark or composite assigned since is left alone there (U+0899 is no
// mark to it, so "a" U+0899 U+0301 does not compose and U+0898 U+0899 stay in order); so here.
TEST_CASE("NFC applies the classes, decompositions and composites of tokenizers' NFC, every entry", "[tokenizer]") {
  const qt::Json& table = model_cases("bpe_qwen").at("nfc_table");
  REQUIRE(table.size() > 4000);
  size_t differ = 0;
  for (const auto& entry : table) {
    const std::string text = entry.at(0), expected = entry.at(1);
    if (qt::unicode::nfc(text) == expected) continue;
    if (++differ <= 10) {
      std::string hex;
      for (size_t pos = 0, len = 0; pos < text.size(); pos += len) {
        char buf[16];
        std::snprintf(buf, sizeof buf, "U+%04X ", static_cast<unsigned>(qt::unicode::decode_utf8(text, pos, &len)));
        hex += buf;
      }
      UNSCOPED_INFO("nfc(" << hex << ") differs from tokenizers'");
    }
  }
  CHECK(differ == 0);
}

// lstrip / rstrip added tokens take the white space beside them (they were matched alone: other ids for
// "end<|eom|>  \n next"); single_word is refused.
TEST_CASE("byte-level BPE gives tokenizers' ids for added tokens that strip white space", "[tokenizer]") {
  check_parity("bpe_strip");
  qt::Json doc = qt::read_json_file(k_dir + "/bpe_strip/tokenizer.json", qt::ErrorKind::Internal);
  for (auto& t : doc["added_tokens"])
    if (t["content"] == "<tool>") t["single_word"] = true;
  const std::string dir = qt::test::scratch_dir("tokenizer_single_word");
  std::ofstream(qt::files::join(dir, "tokenizer.json")) << doc.dump();
  check_load_error(dir, "added_tokens", "single_word");
}

TEST_CASE("Llama 3 pre-tokenization splits as tokenizers' regex does", "[tokenizer]") {
  for (const auto& c : model_cases("bpe").at("cases")) {
    const std::string text = c.at("text");
    INFO("text: \"" << text << "\"");
    std::vector<std::string> got;
    for (auto piece : qt::llama3_pre_tokenize(text)) got.emplace_back(piece);
    CHECK(got == c.at("pretokens").get<std::vector<std::string>>());
  }
}

TEST_CASE("unicode class tables agree with tokenizers' regex engine on sampled codepoints", "[tokenizer]") {
  const qt::Json& u = cases().at("unicode");
  auto as_set = [&](const char* key) {
    auto v = u.at(key).get<std::vector<uint32_t>>();
    return std::set<uint32_t>(v.begin(), v.end());
  };
  const auto letters = as_set("letter"), numbers = as_set("number"), spaces = as_set("white_space");
  REQUIRE(!letters.empty());
  size_t mismatches = 0;
  for (uint32_t c : u.at("sample").get<std::vector<uint32_t>>()) {
    bool ok = qt::unicode::is_letter(c) == (letters.count(c) > 0) && qt::unicode::is_number(c) == (numbers.count(c) > 0) &&
              qt::unicode::is_white_space(c) == (spaces.count(c) > 0);
    if (!ok) {
      UNSCOPED_INFO("codepoint U+" << std::hex << c);
      ++mismatches;
    }
  }
  CHECK(mismatches == 0);
}

TEST_CASE("UTF-8 decoding rejects malformed sequences byte by byte", "[tokenizer]") {
  size_t len = 0;
  std::string euro = "\xE2\x82\xAC";
  CHECK(qt::unicode::decode_utf8(euro, 0, &len) == 0x20AC);
  CHECK(len == 3);
  for (std::string bad : {std::string("\xC0\xAF"), std::string("\xED\xA0\x80"), std::string("\xE2\x82"),
                          std::string("\x80"), std::string("\xF4\x90\x80\x80")}) {
    CHECK(qt::unicode::decode_utf8(bad, 0, &len) == qt::unicode::k_invalid);
    CHECK(len == 1);
  }
}

TEST_CASE("invalid UTF-8 becomes U+FFFD per maximal subpart, as Python's decode(errors='replace')", "[tokenizer]") {
  // Expected values: bytes.decode("utf-8", "replace").encode() in Python 3 (the policy of Rust's from_utf8_lossy,
  // which HF tokenizers' decode uses).
  const std::string r = "\xEF\xBF\xBD";
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"ok \xE2\x82", "ok " + r},
      {"\xC0\xAF", r + r},
      {"\xED\xA0\x80x", r + r + r + "x"},
      {"\xF0\x9F\xA6", r},
      {"\xF4\x90\x80\x80", r + r + r + r},
      {"a\xFF" "b\xFE", "a" + r + "b" + r},
      {"\xE2\x82\xAC\xF0\x9F\xA6\x84", "\xE2\x82\xAC\xF0\x9F\xA6\x84"},
      {"\xE0\x80\xAF", r + r + r},
      {"\xF0\x9F\xE2\x82\xAC", r + "\xE2\x82\xAC"},
  };
  for (const auto& [in, want] : cases) {
    INFO("input of " << in.size() << " bytes");
    CHECK(qt::unicode::replace_invalid_utf8(in) == want);
  }
}

TEST_CASE("byte-level BPE round-trips invalid UTF-8 and long inputs byte for byte", "[tokenizer]") {
  auto tok = qt::load_tokenizer(k_dir + "/bpe");
  std::string corpus;
  {
    std::ifstream in(k_dir + "/corpus.txt", std::ios::binary);
    corpus.assign(std::istreambuf_iterator<char>(in), {});
  }
  REQUIRE(corpus.size() > 10000);
  for (std::string text : {std::string("bad \xC0\xAF bytes \xFF\xFE end\xE2\x82"), corpus}) {
    CHECK(tok->decode(tok->encode(text)) == text);
  }
}

TEST_CASE("load_tokenizer reports missing, malformed and unsupported tokenizer files", "[tokenizer]") {
  SECTION("no tokenizer files") {
    check_load_error(k_dir + "/bad_empty", "bad_empty", "tokenizer.json");
  }
  SECTION("not a directory") { check_load_error(k_dir + "/does_not_exist", "does_not_exist", "directory"); }
  SECTION("malformed tokenizer.json") {
    check_load_error(k_dir + "/bad_malformed", "bad_malformed/tokenizer.json", "malformed JSON");
  }
  SECTION("tokenizer.json whose model is not BPE") {
    check_load_error(k_dir + "/bad_wordpiece", "bad_wordpiece/tokenizer.json", "WordPiece");
  }
  // Found by fuzzing (round 8): a directory named tokenizer.model was an internal error (a stream that threw), a
  // tokenizer_config.json holding a list was read as no settings.
  SECTION("tokenizer.model that is a directory") {
    const std::string dir = qt::test::scratch_dir("tokenizer_model_dir");
    qt::files::make_dirs(dir + "/tokenizer.model");
    check_load_error(dir, "tokenizer_model_dir/tokenizer.model", "is a directory");
  }
  SECTION("tokenizer_config.json that is no JSON object") {
    const std::string dir = qt::test::scratch_dir("tokenizer_config_list");
    qt::files::copy_file(k_dir + "/spm/tokenizer.model", dir + "/tokenizer.model");
    std::ofstream(dir + "/tokenizer_config.json") << "[]";
    check_load_error(dir, "tokenizer_config_list/tokenizer_config.json", "expected a JSON object, got array");
  }
}

// Found by fuzzing: a negative added id wrote out of bounds, 2^32 + 5 wrapped to 5, an id of 1e9 built a table of
// 1e9 strings, a field of another type or a missing key deep in the file was an internal error.
TEST_CASE("tokenizer.json with ids out of range or fields of the wrong type is a model error naming it", "[tokenizer]") {
  const qt::Json good = qt::read_json_file(k_dir + "/bpe/tokenizer.json", qt::ErrorKind::Internal);
  int n = 0;
  auto broken = [&](const std::function<void(qt::Json&)>& edit, const std::string& where, const std::string& says) {
    const std::string dir = qt::test::scratch_dir("tokenizer_broken_" + std::to_string(n++));
    qt::files::copy_file(k_dir + "/bpe/tokenizer_config.json", dir + "/tokenizer_config.json");
    qt::Json doc = good;
    edit(doc);
    qt::write_json_file(dir + "/tokenizer.json", doc);
    check_load_error(dir, where, says);
  };
  const qt::Json extra = {{"id", -5}, {"content", "<x>"}, {"special", true}};
  broken([&](qt::Json& t) { t["added_tokens"].push_back(extra); }, "key 'added_tokens'", "32-bit integer id");
  broken([&](qt::Json& t) { t["added_tokens"].push_back(qt::Json{{"id", (int64_t{1} << 32) + 5}, {"content", "<x>"}}); },
         "key 'added_tokens'", "32-bit integer id");
  broken([&](qt::Json& t) { t["model"]["vocab"]["zzz"] = 1000000000; }, "key 'model.vocab'", "far beyond");
  broken([&](qt::Json& t) { t["added_tokens"][0]["special"] = "yes"; }, "key 'added_tokens'", "true or false");
  broken([&](qt::Json& t) { t["pre_tokenizer"]["pretokenizers"][0]["behavior"] = 5; }, "tokenizer file",
         "unexpected type");
}

TEST_CASE("sentencepiece model alone: BOS/EOS from the model, BOS added as transformers' LlamaTokenizer does",
          "[tokenizer]") {
  const std::string dir = qt::test::scratch_dir("tokenizer_bare");
  qt::files::copy_file(k_dir + "/spm/tokenizer.model", dir + "/tokenizer.model");
  auto tok = qt::load_tokenizer(dir);
  const qt::Json& m = model_cases("spm");
  CHECK(tok->bos_id() == m.at("bos_id").get<int32_t>());
  CHECK(tok->eos_id() == m.at("eos_id").get<int32_t>());
  CHECK(tok->add_bos());
  CHECK(!tok->add_eos());
  CHECK(tok->chat_template().empty());
}

// Mistral v0.3's files put sentencepiece's dummy prefix at the input's start alone (tokenizer.json's Metaspace
// prepend_scheme "first"); Llama 2's before every run of text. Each scheme against transformers' ids of texts with
// control tokens (gen_data.py's dummy_prefix), and the choice from the files: tokenizer.json first, else
// tokenizer_config.json's legacy.
TEST_CASE("sentencepiece's dummy prefix goes where the tokenizer files put it, as transformers", "[tokenizer]") {
  const std::string src = std::string(QT_FIXTURES) + "/data/mistral_v3";
  const qt::Json expected = qt::read_json_file(std::string(QT_FIXTURES) + "/data/expected.json",
                                               qt::ErrorKind::Internal).at("dummy_prefix");
  const qt::Json tokenizer_json = qt::read_json_file(src + "/tokenizer.json", qt::ErrorKind::Internal);
  const qt::Json config = qt::read_json_file(src + "/tokenizer_config.json", qt::ErrorKind::Internal);
  int n = 0;
  // A copy of v0.3's directory, its tokenizer.json's pre-tokenizer and normalizer edited (or the file left out),
  // its tokenizer_config.json's legacy set (or left out).
  auto dir_with = [&](const std::function<void(qt::Json&)>& edit_json, std::optional<bool> legacy, bool with_json) {
    const std::string dir = qt::test::scratch_dir("dummy_prefix_" + std::to_string(n++));
    qt::files::copy_file(src + "/tokenizer.model", dir + "/tokenizer.model");
    qt::Json cfg = config;
    cfg.erase("legacy");
    if (legacy) cfg["legacy"] = *legacy;
    qt::write_json_file(dir + "/tokenizer_config.json", cfg);
    if (with_json) {
      qt::Json t = tokenizer_json;
      edit_json(t);
      qt::write_json_file(dir + "/tokenizer.json", t);
    }
    return dir;
  };
  auto scheme = [](const std::string& s) { return [s](qt::Json& t) { t["pre_tokenizer"]["prepend_scheme"] = s; }; };
  auto prefix_of = [](const std::string& dir) {
    auto tok = qt::load_tokenizer(dir);
    const auto* sp = dynamic_cast<const qt::SentencePieceTokenizer*>(tok.get());
    REQUIRE(sp != nullptr);
    return sp->dummy_prefix();
  };
  using qt::DummyPrefix;
  SECTION("each scheme gives transformers' ids") {
    for (const auto& [name, mode] : {std::pair<std::string, DummyPrefix>{"first", DummyPrefix::First},
                                     {"always", DummyPrefix::MetaspaceAlways}, {"never", DummyPrefix::Never}}) {
      const std::string dir = dir_with(scheme(name), std::nullopt, true);
      CHECK(prefix_of(dir) == mode);
      auto tok = qt::load_tokenizer(dir);
      for (const auto& c : expected.at(name)) {
        INFO(name << ": \"" << c.at("text").get<std::string>() << "\"");
        CHECK(tok->encode_with_special(c.at("text").get<std::string>()) == ids_of(c.at("ids")));
      }
    }
    // The fixture's own files (Metaspace "first", legacy false).
    CHECK(prefix_of(src) == DummyPrefix::First);
  }
  SECTION("text after a special token, and plain text") {
    auto first = qt::load_tokenizer(dir_with(scheme("first"), std::nullopt, true));
    auto never = qt::load_tokenizer(dir_with(scheme("never"), std::nullopt, true));
    auto legacy = qt::load_tokenizer(dir_with([](qt::Json&) {}, true, false));
    for (const std::string text : {"Hello world", " leading space", "x [INST]y"}) {
      INFO(text);
      CHECK(first->encode_after_special(text) == never->encode_with_special(text));
      CHECK(legacy->encode_after_special(text) == legacy->encode_with_special(text));
      CHECK(first->encode_after_special(text) != legacy->encode_after_special(text));
    }
    CHECK(first->encode("Hello") == legacy->encode("Hello"));  // at the input's start: prefixed
    CHECK(never->encode("Hello") != legacy->encode("Hello"));
  }
  SECTION("tokenizer.json decides, else tokenizer_config.json's legacy") {
    // Llama 2's tokenizer.json: a Prepend normalizer, no pre-tokenizer: every run, whatever legacy says.
    const auto llama2 = [](qt::Json& t) {
      t["pre_tokenizer"] = nullptr;
      const qt::Json prepend = {{"type", "Prepend"}, {"prepend", "\u2581"}};
      const qt::Json replace = {{"type", "Replace"}, {"pattern", {{"String", " "}}}, {"content", "\u2581"}};
      t["normalizer"] = {{"type", "Sequence"}, {"normalizers", {prepend, replace}}};
    };
    CHECK(prefix_of(dir_with(llama2, false, true)) == DummyPrefix::Always);
    CHECK(prefix_of(dir_with(scheme("first"), true, true)) == DummyPrefix::First);
    const auto old_metaspace = [](qt::Json& t) {
      t["pre_tokenizer"] = {{"type", "Metaspace"}, {"add_prefix_space", false}};
    };
    CHECK(prefix_of(dir_with(old_metaspace, std::nullopt, true)) == DummyPrefix::Never);
    // Neither a Metaspace nor a Prepend (the converter's legacy pipeline with add_prefix_space false): no prefix.
    CHECK(prefix_of(dir_with([](qt::Json& t) { t["pre_tokenizer"] = nullptr; }, true, true)) == DummyPrefix::Never);
    // tokenizer_config.json's add_prefix_space has transformers convert the model anew: false, no prefix; true, as
    // legacy says, whatever tokenizer.json holds.
    const auto with_add_prefix_space = [&](bool add, bool legacy) {
      const std::string dir = dir_with(scheme("first"), legacy, true);
      qt::Json cfg = qt::read_json_file(dir + "/tokenizer_config.json", qt::ErrorKind::Internal);
      cfg["add_prefix_space"] = add;
      qt::write_json_file(dir + "/tokenizer_config.json", cfg);
      return prefix_of(dir);
    };
    CHECK(with_add_prefix_space(false, true) == DummyPrefix::Never);
    CHECK(with_add_prefix_space(true, true) == DummyPrefix::Always);
    CHECK(with_add_prefix_space(true, false) == DummyPrefix::First);
    CHECK(prefix_of(dir_with([](qt::Json&) {}, false, false)) == DummyPrefix::First);
    CHECK(prefix_of(dir_with([](qt::Json&) {}, true, false)) == DummyPrefix::Always);
    CHECK(prefix_of(dir_with([](qt::Json&) {}, std::nullopt, false)) == DummyPrefix::Always);
    const std::string bad = dir_with(scheme("sometimes"), std::nullopt, true);
    check_load_error(bad, "pre_tokenizer.prepend_scheme", "\"sometimes\"");
  }
}
