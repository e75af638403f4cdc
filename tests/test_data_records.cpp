// Records -> tokenized examples: chat templates, Alpaca and text documents against transformers (expected ids
// and loss masks come from tests/oracles/gen_data.py at fixture time), the run config's data section, and the
// errors a user sees for bad data.
#include <unistd.h>

#include <algorithm>
#include <fstream>
#include <string>
#include <vector>

#include "lib/core/error.h"
#include "lib/core/json.h"
#include "lib/data/chat_template.h"
#include "lib/data/data_config.h"
#include "lib/data/jsonl.h"
#include "lib/data/records.h"
#include "lib/data/tokenizer.h"
#include "tests/catch.h"
#include "tests/test_util.h"

namespace {

const qt::Json& expected() {
  static const qt::Json doc = qt::read_json_file(qt::test::fixture("data/expected.json"), qt::ErrorKind::Internal);
  return doc;
}

qt::DataConfig config(qt::Json extra = qt::Json::object()) {
  qt::Json section = {{"train_file", "train.jsonl"}};
  for (const auto& item : extra.items()) section[item.key()] = item.value();
  return qt::DataConfig::from_json(section, "run.json");
}

std::string write_file(const std::string& name, const std::string& text) {
  const std::string path = qt::files::join(qt::test::scratch_dir("data_" + name), name);
  std::ofstream(path, std::ios::binary) << text;
  return path;
}

// Expects `fn` to throw qt::Error of `kind` whose message holds every one of `says`.
template <typename Fn>
void check_error(Fn fn, qt::ErrorKind kind, const std::vector<std::string>& says) {
  try {
    fn();
    FAIL("no error thrown");
  } catch (const qt::Error& e) {
    INFO(e.what());
    CHECK(e.kind() == kind);
    for (const auto& s : says) CHECK(std::string(e.what()).find(s) != std::string::npos);
  }
}

// Loads `file`.jsonl with the tokenizer of `model` and compares every record with the oracle (expected.json's
// `file` entry, or `cases`).
void check_file(const std::string& file, const std::string& model, const qt::DataConfig& cfg,
                const qt::Json* cases_given = nullptr) {
  auto tok = qt::load_tokenizer(qt::test::fixture("data/" + model));
  const auto examples = qt::load_examples(qt::test::fixture("data/" + file + ".jsonl"), cfg, *tok);
  const qt::Json& cases = cases_given ? *cases_given : expected().at(file);
  REQUIRE(examples.size() == cases.size());
  for (size_t i = 0; i < cases.size(); ++i) {
    INFO(file << " record " << i
              << (cases[i].contains("rendered") ? " rendered: " + cases[i].at("rendered").get<std::string>() : ""));
    CHECK(examples[i].line == static_cast<int64_t>(i + 1));
    CHECK(examples[i].ids == cases[i].at("ids").get<std::vector<int32_t>>());
    if (cfg.train_on_prompt) {
      CHECK(examples[i].loss == std::vector<uint8_t>(examples[i].ids.size(), 1));
    } else {
      CHECK(examples[i].loss == cases[i].at("loss").get<std::vector<uint8_t>>());
    }
  }
}

}  // namespace

TEST_CASE("chat records render and tokenize as transformers apply_chat_template", "[data]") {
  SECTION("llama3") { check_file("chat_llama3", "llama3", config()); }
  SECTION("llama2") { check_file("chat_llama2", "llama2", config()); }
  SECTION("mistral") { check_file("chat_mistral", "mistral", config()); }
  SECTION("mistral-v0.3 (control tokens, the dummy prefix at the input's start alone, the system message in a last "
          "user message only)") {
    check_file("chat_mistral_v3", "mistral_v3", config());
    check_file("chat_mistral_v3", "mistral_v3", config({{"chat_template", "mistral-v0.3"}}));
    check_file("chat_mistral_v3", "mistral_v3", config({{"train_on_prompt", true}}));
    check_file("chat_mistral_v3_fuzz", "mistral_v3", config());  // random conversations (gen_data.fuzz_alternating)
  }
  SECTION("zephyr (Zephyr's and TinyLlama-Chat's template: <|user|> as text, the newline after eos_token)") {
    check_file("chat_zephyr", "zephyr", config());
    check_file("chat_zephyr", "zephyr", config({{"chat_template", "zephyr"}}));
    check_file("chat_zephyr", "zephyr", config({{"train_on_prompt", true}}));
    check_file("chat_zephyr_fuzz", "zephyr", config());  // random conversations (gen_data.fuzz_conversations)
  }
  SECTION("deepseek-r1 (DeepSeek-R1-Distill-Llama's template: answers keep what follows their last </think>)") {
    check_file("chat_deepseek_r1", "deepseek_r1", config());
    check_file("chat_deepseek_r1", "deepseek_r1", config({{"chat_template", "deepseek-r1"}}));
    check_file("chat_deepseek_r1", "deepseek_r1", config({{"train_on_prompt", true}}));
    check_file("chat_deepseek_r1_fuzz", "deepseek_r1", config());  // <think> / </think> anywhere in the answers
  }
  SECTION("chatml (Qwen2.5's template: its default system prompt where there is no system message)") {
    check_file("chat_qwen", "qwen", config());
    check_file("chat_qwen", "qwen", config({{"format", "chat"}, {"chat_template", "chatml"}}));
    check_file("chat_qwen", "qwen", config({{"train_on_prompt", true}}));
  }
  SECTION("llama3.1 (Llama 3.1's template; 3.2's renders the same where its date is 3.1's)") {
    check_file("chat_llama31", "llama31", config());
    check_file("chat_llama32", "llama32", config());
    check_file("chat_llama32", "llama32", config({{"chat_template", "llama3.1"}}));
    check_file("chat_llama31", "llama31", config({{"train_on_prompt", true}}));
    check_file("chat_llama31_fuzz", "llama31", config());
  }
  SECTION("qwen3 (<think> blocks after the last query, reasoning_content, earlier reasoning left out)") {
    check_file("chat_qwen3", "qwen3", config());
    check_file("chat_qwen3", "qwen3", config({{"chat_template", "qwen3"}}));
    check_file("chat_qwen3", "qwen3", config({{"train_on_prompt", true}}));
    check_file("chat_qwen3_fuzz", "qwen3", config());  // random conversations (gen_data.fuzz_conversations)
  }
  SECTION("qwen2 (Qwen2-Instruct's and Qwen1.5-Chat's template: ChatML, \"You are a helpful assistant.\")") {
    check_file("chat_qwen2", "qwen2", config());
    check_file("chat_qwen2", "qwen2", config({{"chat_template", "qwen2"}}));
  }
  SECTION("smollm2 (SmolLM2-Instruct's template: Qwen2's with SmolLM's default system prompt; GPT-2's layout)") {
    check_file("chat_smollm2", "smollm2", config());
    check_file("chat_smollm2", "smollm2", config({{"chat_template", "smollm2"}}));
    check_file("chat_smollm2", "smollm2", config({{"train_on_prompt", true}}));
    check_file("chat_smollm2_fuzz", "smollm2", config());  // random conversations (gen_data.fuzz_conversations)
  }
  SECTION("qwen3-instruct (Qwen3-Instruct-2507's template: ChatML with no default system prompt)") {
    check_file("chat_qwen3_instruct", "qwen3_instruct", config());
    check_file("chat_qwen3_instruct", "qwen3_instruct", config({{"chat_template", "qwen3-instruct"}}));
  }
  SECTION("custom (data.chat_format: ChatML without a default system prompt; Vicuna's, stripped, on sentencepiece)") {
    for (const std::string name : {"chatml", "vicuna"}) {
      const qt::Json& e = expected().at("chat_custom_" + name);
      const std::string model = e.at("model").get<std::string>();
      check_file("chat_custom_" + name, model, config({{"chat_template", "custom"}, {"chat_format", e.at("format")}}),
                 &e.at("cases"));
      check_file("chat_custom_" + name, model,
                 config({{"chat_template", "custom"}, {"chat_format", e.at("format")}, {"train_on_prompt", true}}),
                 &e.at("cases"));
    }
    // Random formats (gen_data.fuzz_custom_formats): special-token strings in prefixes and suffixes, BOS, stripping.
    const qt::Json& fuzz = expected().at("chat_custom_fuzz");
    for (size_t k = 0; k < fuzz.size(); ++k)
      check_file("chat_custom_fuzz_" + std::to_string(k), "llama3",
                 config({{"chat_template", "custom"}, {"chat_format", fuzz[k].at("format")}}), &fuzz[k].at("cases"));
  }
  SECTION("ShareGPT's conversations (from / value) read as the same messages") {
    check_file("chat_llama3_sharegpt", "llama3", config());
    check_file("chat_llama3_sharegpt", "llama3", config({{"format", "chat"}}));
  }
  SECTION("format named in the config") {
    check_file("chat_llama2", "llama2", config({{"format", "chat"}, {"chat_template", "llama2"}}));
  }
  SECTION("train_on_prompt puts every token in the loss") {
    check_file("chat_llama3", "llama3", config({{"train_on_prompt", true}}));
    check_file("chat_mistral", "mistral", config({{"train_on_prompt", true}}));
  }
}

TEST_CASE("a chat prompt ends where transformers' generation prompt does", "[data]") {
  // generate --format chat: the prompt of a record whose answer is a placeholder, the tokens before its first target
  // (Mistral v0.3 with a system message: the conversation ending with the user's message).
  const qt::DataConfig cfg = config({{"format", "chat"}});
  for (const auto& c : expected().at("generation_prompts")) {
    const std::string model = c.at("model").get<std::string>();
    INFO(model << " system \"" << c.at("system").get<std::string>() << "\"");
    auto tok = qt::load_tokenizer(qt::test::fixture("data/" + model));
    CHECK(qt::generation_prompt_tokens(cfg, c.at("user").get<std::string>(), "", c.at("system").get<std::string>(),
                                       *tok) == c.at("ids").get<std::vector<int32_t>>());
  }
  // ... and with a custom format (data.chat_format): the conversation and its generation prompt.
  for (const auto& c : expected().at("custom_generation_prompts")) {
    INFO(c.at("model").get<std::string>() << " " << c.at("format").dump());
    auto tok = qt::load_tokenizer(qt::test::fixture("data/" + c.at("model").get<std::string>()));
    const qt::DataConfig custom =
        config({{"format", "chat"}, {"chat_template", "custom"}, {"chat_format", c.at("format")}});
    CHECK(qt::generation_prompt_tokens(custom, c.at("user").get<std::string>(), "", c.at("system").get<std::string>(),
                                       *tok) == c.at("ids").get<std::vector<int32_t>>());
  }
  // generate --format completion: the prompt as TRL tokenizes a completion record's prompt.
  for (const std::string model : {"llama3", "llama2", "mistral_v3"}) {
    auto tok = qt::load_tokenizer(qt::test::fixture("data/" + model));
    for (const auto& c : expected().at("completion_" + model)) {
      const std::string prompt = c.at("record").at("prompt").get<std::string>();
      INFO(model << " prompt \"" << prompt << "\"");
      const auto ids = c.at("ids").get<std::vector<int32_t>>();
      const auto loss = c.at("loss").get<std::vector<int32_t>>();
      const auto prompt_end = ids.begin() + (std::find(loss.begin(), loss.end(), 1) - loss.begin());
      const std::vector<int32_t> want(ids.begin(), prompt_end);
      const qt::Json record = qt::prompt_record(qt::RecordFormat::Completion, prompt, "", "");
      CHECK(qt::prompt_tokens(qt::tokenize_record(record, "--prompt", config(), *tok)) == want);
    }
  }
}

TEST_CASE("chat answers end with the end-of-turn token in the loss", "[data]") {
  for (const std::string model :
       {"llama3", "llama31", "llama2", "mistral", "mistral_v3", "zephyr", "deepseek_r1", "qwen", "qwen2", "qwen3",
        "qwen3_instruct", "smollm2"}) {
    auto tok = qt::load_tokenizer(qt::test::fixture("data/" + model));
    const int32_t end = model.rfind("llama3", 0) == 0 ? tok->token_to_id("<|eot_id|>")
                        : model.rfind("qwen", 0) == 0 || model == "smollm2" ? tok->token_to_id("<|im_end|>")
                                                      : tok->eos_id();
    REQUIRE(end >= 0);
    const std::string file = qt::test::fixture("data/chat_" + model + ".jsonl");
    const auto examples = qt::load_examples(file, config(), *tok);
    const auto records = qt::read_jsonl(file);
    REQUIRE(records.size() == examples.size());
    for (size_t i = 0; i < examples.size(); ++i) {
      const auto& e = examples[i];
      INFO(model << " line " << e.line);
      int64_t ends = 0;
      for (size_t t = 0; t < e.ids.size(); ++t) {
        if (e.ids[t] != end) continue;
        if (t == 0 || e.loss[t - 1]) CHECK(e.loss[t] == 1);  // after an answer's last token
        ends += e.loss[t];  // an empty answer (Mistral v0.3's " </s>"): its end-of-turn token alone
      }
      bool answered = false;
      for (const auto& m : records[i].value.at("messages")) answered = answered || m.at("role") == "assistant";
      CHECK(ends >= (answered ? 1 : 0));
    }
  }
}

TEST_CASE("alpaca, completion and text records tokenize as transformers", "[data]") {
  SECTION("alpaca llama3") { check_file("alpaca_llama3", "llama3", config()); }
  SECTION("alpaca llama2") { check_file("alpaca_llama2", "llama2", config()); }
  SECTION("alpaca and completion mistral v0.3 (the BOS the tokenizer adds: the text still starts the input)") {
    check_file("alpaca_mistral_v3", "mistral_v3", config());
    check_file("completion_mistral_v3", "mistral_v3", config({{"format", "completion"}}));
  }
  SECTION("completion (TRL's prompt-completion: strings, and lists of messages through the chat template)") {
    check_file("completion_llama3", "llama3", config());
    check_file("completion_llama2", "llama2", config({{"format", "completion"}}));
    check_file("completion_chat_llama3", "llama3", config());
    check_file("completion_llama3", "llama3", config({{"train_on_prompt", true}}));
  }
  SECTION("text llama3") { check_file("text_llama3", "llama3", config({{"format", "text"}})); }
  SECTION("text llama2") { check_file("text_llama2", "llama2", config()); }
  SECTION("text without EOS") {
    auto tok = qt::load_tokenizer(qt::test::fixture("data/llama3"));
    const auto with = qt::load_examples(qt::test::fixture("data/text_llama3.jsonl"), config(), *tok);
    const auto without =
        qt::load_examples(qt::test::fixture("data/text_llama3.jsonl"), config({{"add_eos", false}}), *tok);
    REQUIRE(with.size() == without.size());
    for (size_t i = 0; i < with.size(); ++i) {
      CHECK(with[i].ids.back() == tok->eos_id());
      CHECK(std::vector<int32_t>(with[i].ids.begin(), with[i].ids.end() - 1) == without[i].ids);
    }
  }
}

TEST_CASE("chat template is recognised from the tokenizer or named", "[data]") {
  using qt::ChatFormat;
  using qt::ChatTemplateChoice;
  const std::vector<std::pair<std::string, std::string>> models = {
      {"llama3", "llama3"}, {"llama31", "llama3.1"}, {"llama32", "llama3.1"},     {"llama2", "llama2"},
      {"mistral", "mistral"}, {"qwen", "chatml"},    {"qwen3", "qwen3"}, {"qwen3_instruct", "qwen3-instruct"},
      {"qwen2", "qwen2"},     {"mistral_v3", "mistral-v0.3"}, {"zephyr", "zephyr"}, {"deepseek_r1", "deepseek-r1"},
      {"smollm2", "smollm2"}};
  for (const auto& [model, format] : models) {
    auto tok = qt::load_tokenizer(qt::test::fixture("data/" + model));
    CHECK(qt::chat_format_name(qt::resolve_chat_format(ChatTemplateChoice::Auto, tok->chat_template(), "run.json")) ==
          format);
  }
  // Qwen2's and SmolLM2's default system line with its break as a newline (as the models' tokenizer_config.json has
  // it; the smollm2 fixture's template is SmolLM2's so) or as Jinja's escape (the qwen2 fixture's).
  for (const char* newline : {"\n", "\\n"}) {
    const std::string turns = std::string("{{'<|im_start|>' + message['role'] + '") + newline + "' + message['content']";
    CHECK(qt::resolve_chat_format(ChatTemplateChoice::Auto,
                                  std::string("<|im_start|>system") + newline + "You are a helpful assistant.<|im_end|>" +
                                      turns,
                                  "run.json") == ChatFormat::Qwen2);
    CHECK(qt::resolve_chat_format(ChatTemplateChoice::Auto,
                                  std::string("<|im_start|>system") + newline +
                                      "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>" +
                                      turns,
                                  "run.json") == ChatFormat::SmolLM2);
  }
  // Every choice but auto names its format, whatever the tokenizer's template.
  for (const std::string& name : qt::chat_template_names()) {
    if (name == "auto") continue;
    const qt::DataConfig c =
        name == "custom" ? config({{"chat_template", name}, {"chat_format", {{"assistant_suffix", "</s>"}}}})
                         : config({{"chat_template", name}});
    CHECK(qt::chat_format_name(qt::resolve_chat_format(c.chat_template, "", "run.json")) == name);
  }
  // ChatML other than Qwen2.5's, Qwen2's, Qwen3's, Qwen3-Instruct-2507's and SmolLM2's (SmolLM's default system
  // prompt with a begin token, Qwen2's with tools, <think> blocks without Qwen3's enable_thinking as
  // Qwen3-Thinking-2507's, Hermes's begin token): not built in; the error names the built-ins.
  for (const std::string jinja :
       {"{{'<|im_start|>' + message['role']}}",
        "{{bos_token}}<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
        "Face<|im_end|>",
        "<|im_start|>system\\nYou are a helpful assistant.<|im_end|> <tool_response>",
        "<|im_start|>You are Qwen, created by Alibaba Cloud. You are a helpful assistant. <think>",
        "<|im_start|> <think> reasoning_content last_query_index", "{{bos_token}}<|im_start|> <tool_response>"})
    check_error([&] { qt::resolve_chat_format(ChatTemplateChoice::Auto, jinja, "run.json"); }, qt::ErrorKind::Config,
                {"run.json", "data.chat_template", "<|im_start|>", "llama3", "llama3.1", "mistral", "chatml", "qwen2",
                 "qwen3", "qwen3-instruct", "smollm2"});
  check_error([] { qt::resolve_chat_format(ChatTemplateChoice::Auto, "", "run.json"); }, qt::ErrorKind::Config,
              {"run.json", "data.chat_template", "no chat_template"});
  // DeepSeek templates other than DeepSeek-R1-Distill-Llama's (the Qwen distills': <｜Assistant｜> after each user
  // message): not built in.
  check_error(
      [] {
        qt::resolve_chat_format(ChatTemplateChoice::Auto,
                                "{{'<\uff5cUser\uff5c>' + content + '<\uff5cAssistant\uff5c>'}} is_last_user",
                                "run.json");
      },
      qt::ErrorKind::Config, {"data.chat_template", "DeepSeek", "deepseek-r1"});
  // Later Mistral templates other than v0.3's (v0.2's update: the system message in the first user turn; Mistral
  // Small's [SYSTEM_PROMPT] beside the tools): not built in.
  for (const std::string jinja :
       {"{%- if loop.first and system_message is defined %}{{- ' [INST] ' + system_message + '\\n\\n' + "
        "message['content'] + ' [/INST]' }}",
        "[SYSTEM_PROMPT]{{ system_message }}[/SYSTEM_PROMPT] [AVAILABLE_TOOLS] [INST]{{ message['content'] }}[/INST]"})
    check_error([&] { qt::resolve_chat_format(ChatTemplateChoice::Auto, jinja, "run.json"); }, qt::ErrorKind::Config,
                {"run.json", "data.chat_template", "later Mistral", "mistral-v0.3"});
  check_error(
      [] {
        qt::resolve_chat_format(ChatTemplateChoice::Auto, "<|start_header_id|> Cutting Knowledge Date <|image|>",
                                "run.json");
      },
      qt::ErrorKind::Config, {"data.chat_template", "Vision"});
  check_error([] { config({{"chat_template", "qwen"}}); }, qt::ErrorKind::Config,
              {"run.json", "data.chat_template", "\"qwen3\"", "\"llama3.1\""});
}

TEST_CASE("bad records are errors naming file line and key", "[data]") {
  auto l3 = qt::load_tokenizer(qt::test::fixture("data/llama3"));
  auto l2 = qt::load_tokenizer(qt::test::fixture("data/llama2"));
  auto mi = qt::load_tokenizer(qt::test::fixture("data/mistral"));
  const std::string ok = "{\"text\": \"fine\"}\n";
  auto load = [](const std::string& path, const qt::Tokenizer& tok, qt::DataConfig cfg) {
    return [path, &tok, cfg] { qt::load_examples(path, cfg, tok); };
  };
  SECTION("unknown role") {
    const std::string p = write_file("role.jsonl", ok + "{\"messages\": [{\"role\": \"tool\", \"content\": \"x\"}]}\n");
    check_error(load(p, *l3, config()), qt::ErrorKind::Data, {p + ":2", "unknown role \"tool\""});
  }
  SECTION("tools and tool calls with the chatml template") {
    // Qwen2.5's template renders them (a <tools> system prompt, <tool_call> blocks): they were dropped, the answer
    // trained as its empty content. The Llama 3 template ignores both, as here; an empty tool_calls is no call.
    auto qw = qt::load_tokenizer(qt::test::fixture("data/qwen"));
    const std::string user = "{\"role\": \"user\", \"content\": \"weather?\"}";
    const std::string call =
        "{\"role\": \"assistant\", \"content\": \"\", \"tool_calls\": [{\"type\": \"function\", \"function\": "
        "{\"name\": \"get\", \"arguments\": {\"city\": \"Paris\"}}}]}";
    const std::string calls = write_file("calls.jsonl", ok + "{\"messages\": [" + user + ", " + call + "]}\n");
    check_error(load(calls, *qw, config({{"chat_template", "chatml"}})), qt::ErrorKind::Data,
                {calls + ":2", "messages[1].tool_calls", "not built in"});
    const std::string tools = write_file(
        "tools.jsonl", "{\"messages\": [" + user + "], \"tools\": [{\"type\": \"function\", \"function\": {\"name\": "
                       "\"get\"}}]}\n");
    check_error(load(tools, *qw, config({{"chat_template", "chatml"}})), qt::ErrorKind::Data,
                {tools + ":1", "key 'tools'", "not built in"});
    const std::string none = write_file(
        "no_calls.jsonl", "{\"messages\": [" + user + ", {\"role\": \"assistant\", \"content\": \"sunny\", "
                          "\"tool_calls\": []}], \"tools\": null}\n");
    CHECK(qt::load_examples(none, config({{"chat_template", "chatml"}}), *qw).size() == 1);
    CHECK(qt::load_examples(calls, config({{"chat_template", "llama3"}}), *l3).size() == 2);
    // Qwen3's, Qwen3-Instruct-2507's, Llama 3.1's and Mistral v0.3's templates render them too.
    auto q3 = qt::load_tokenizer(qt::test::fixture("data/qwen3"));
    auto l31 = qt::load_tokenizer(qt::test::fixture("data/llama31"));
    auto mv3 = qt::load_tokenizer(qt::test::fixture("data/mistral_v3"));
    for (const std::string name : {"qwen3", "qwen3-instruct", "llama3.1", "mistral-v0.3"}) {
      const qt::Tokenizer& tok = name == "llama3.1" ? *l31 : name == "mistral-v0.3" ? *mv3 : *q3;
      check_error(load(calls, tok, config({{"chat_template", name}})), qt::ErrorKind::Data,
                  {calls + ":2", "messages[1].tool_calls", name, "not built in"});
      check_error(load(tools, tok, config({{"chat_template", name}})), qt::ErrorKind::Data,
                  {tools + ":1", "key 'tools'", "not built in"});
    }
    // DeepSeek-R1-Distill-Llama's template renders no tools list, and an answer with content as an answer whatever
    // its tool_calls: such records read as they would without them.
    auto ds = qt::load_tokenizer(qt::test::fixture("data/deepseek_r1"));
    const std::string answer = "{\"role\": \"assistant\", \"content\": \"sunny\"}";
    const std::string plain = write_file("ds_plain.jsonl", "{\"messages\": [" + user + ", " + answer + "]}\n");
    const std::string with_tools = write_file(
        "ds_tools.jsonl", "{\"messages\": [" + user + ", {\"role\": \"assistant\", \"content\": \"sunny\", "
                          "\"tool_calls\": [{\"type\": \"function\"}]}], \"tools\": [{\"type\": \"function\"}]}\n");
    const auto a = qt::load_examples(plain, config({{"chat_template", "deepseek-r1"}}), *ds);
    const auto b = qt::load_examples(with_tools, config({{"chat_template", "deepseek-r1"}}), *ds);
    REQUIRE(a.size() == 1);
    REQUIRE(b.size() == 1);
    CHECK(a[0].ids == b[0].ids);
    CHECK(a[0].loss == b[0].loss);
  }
  SECTION("a custom format: a system message where it has no system turn, tools") {
    const qt::DataConfig custom =
        config({{"chat_template", "custom"},
                {"chat_format", {{"user_prefix", "U: "}, {"assistant_prefix", "A: "}, {"assistant_suffix", "</s>"}}}});
    const std::string p = write_file(
        "custom_system.jsonl", "{\"messages\": [{\"role\": \"user\", \"content\": \"a\"}, {\"role\": \"assistant\", "
                               "\"content\": \"b\"}]}\n{\"messages\": [{\"role\": \"system\", \"content\": \"s\"}, "
                               "{\"role\": \"user\", \"content\": \"a\"}]}\n");
    check_error(load(p, *l2, custom), qt::ErrorKind::Data, {p + ":2", "messages[0]", "no system turn"});
    const std::string t = write_file(
        "custom_tools.jsonl", "{\"messages\": [{\"role\": \"user\", \"content\": \"a\"}], \"tools\": [{\"type\": "
                              "\"function\"}]}\n");
    check_error(load(t, *l2, custom), qt::ErrorKind::Data, {t + ":1", "key 'tools'", "custom"});
  }
  SECTION("a completion record of a string and a list") {
    const std::string p = write_file(
        "mixed.jsonl", "{\"prompt\": \"a\", \"completion\": [{\"role\": \"assistant\", \"content\": \"b\"}]}\n");
    check_error(load(p, *l3, config()), qt::ErrorKind::Data, {p + ":1", "completion", "expected a string", "list"});
  }
  SECTION("a ShareGPT message from someone unknown") {
    const std::string p = write_file(
        "from.jsonl", ok + "{\"conversations\": [{\"from\": \"human\", \"value\": \"a\"}, {\"from\": \"bot\", "
                      "\"value\": \"b\"}]}\n");
    check_error(load(p, *l3, config()), qt::ErrorKind::Data, {p + ":2", "conversations[1].from", "\"bot\"", "gpt"});
    const std::string q = write_file("value.jsonl", "{\"conversations\": [{\"from\": \"human\"}]}\n");
    check_error(load(q, *l3, config()), qt::ErrorKind::Data, {q + ":1", "conversations[0]", "content", "missing"});
  }
  SECTION("roles that do not alternate") {
    const std::string p = write_file(
        "alt.jsonl",
        "{\"messages\": [{\"role\": \"user\", \"content\": \"a\"}, {\"role\": \"user\", \"content\": \"b\"}]}\n");
    check_error(load(p, *l2, config()), qt::ErrorKind::Data, {p + ":1", "messages[1]", "alternate"});
  }
  SECTION("system message with the mistral template") {
    const std::string p = write_file(
        "sys.jsonl",
        "{\"messages\": [{\"role\": \"system\", \"content\": \"a\"}, {\"role\": \"user\", \"content\": \"b\"}]}\n");
    check_error(load(p, *mi, config()), qt::ErrorKind::Data, {p + ":1", "system"});
  }
  SECTION("message without content") {
    const std::string p = write_file("content.jsonl", "{\"messages\": [{\"role\": \"user\"}]}\n");
    check_error(load(p, *l3, config()), qt::ErrorKind::Data, {p + ":1", "content", "missing"});
  }
  SECTION("token id outside the vocabulary") {
    const std::string big = std::to_string(l3->vocab_size());
    const std::string p = write_file("ids.jsonl", "{\"input_ids\": [1, 2]}\n{\"input_ids\": [1, " + big + "]}\n");
    check_error(load(p, *l3, config()), qt::ErrorKind::Data, {p + ":2", "input_ids", "id " + big});
  }
  SECTION("labels of another length") {
    const std::string p = write_file("labels.jsonl", "{\"input_ids\": [1, 2, 3], \"labels\": [-100, 2]}\n");
    check_error(load(p, *l3, config()), qt::ErrorKind::Data, {p + ":1", "labels"});
  }
  SECTION("empty line") {
    const std::string p = write_file("empty.jsonl", ok + "\n" + ok);
    check_error(load(p, *l3, config()), qt::ErrorKind::Data, {p + ":2", "empty line"});
  }
  SECTION("malformed line") {
    const std::string p = write_file("bad.jsonl", ok + ok + "{\"text\": \"x\"\n");
    check_error(load(p, *l3, config()), qt::ErrorKind::Data, {p + ":3", "malformed JSON"});
  }
  SECTION("a NUL byte") {
    // nlohmann's parser stops at a NUL: what follows it on the line would be dropped without a word.
    const std::string p = write_file("nul.jsonl", ok + "{\"text\": \"kept\"}" + std::string(1, '\0') + "{\"text\": \"dropped\"}\n");
    check_error(load(p, *l3, config()), qt::ErrorKind::Data, {p + ":2", "NUL byte", "column 17"});
  }
  SECTION("a symbolic link loop") {
    const std::string p = qt::files::join(qt::test::scratch_dir("data_loop"), "loop.jsonl");
    ::unlink(p.c_str());
    REQUIRE(::symlink(p.c_str(), p.c_str()) == 0);
    check_error(load(p, *l3, config()), qt::ErrorKind::Data, {p, "cannot be read", "symbolic links"});
  }
  SECTION("gzip-compressed file") {
    const std::string p = write_file("gz.jsonl", std::string("\x1f\x8b\x08\x00\x00\x00\x00\x00", 8) + "rest");
    check_error(load(p, *l3, config()), qt::ErrorKind::Data, {p, "gzip-compressed", "gunzip"});
  }
  // Found by fuzzing (round 8): a UTF-16 file was "a NUL byte at line 1, column 4", one of blank lines alone "the
  // file is empty".
  SECTION("UTF-16 file, and a file of blank lines") {
    const std::string u16 = write_file("utf16.jsonl", std::string("\xff\xfe{\0\n\0", 6));
    check_error(load(u16, *l3, config()), qt::ErrorKind::Data, {u16, "UTF-16", "iconv"});
    const std::string blank = write_file("blank.jsonl", "\n \n\n");
    check_error(load(blank, *l3, config()), qt::ErrorKind::Data, {blank, "only blank lines"});
  }
  SECTION("invalid UTF-8 quoted as escapes") {
    const std::string p = write_file("utf8.jsonl", ok + "{\"text\": \"a\xff\xfe\"}\n");
    try {
      qt::load_examples(p, config(), *l3);
      FAIL("no error thrown");
    } catch (const qt::Error& e) {
      const std::string what = e.what();
      INFO(what);
      CHECK(what.find(p + ":2") != std::string::npos);
      CHECK(what.find("\\xff") != std::string::npos);
      CHECK(what.find('\xff') == std::string::npos);
    }
  }
  SECTION("an id beyond int64") {
    const std::string p = write_file("huge.jsonl", "{\"input_ids\": [1, 18446744073709551615]}\n");
    check_error(load(p, *l3, config()), qt::ErrorKind::Data, {p + ":1", "input_ids", "18446744073709551615", "out of range"});
  }
  SECTION("an attention mask that leaves a token out") {
    const std::string p = write_file("mask.jsonl", "{\"input_ids\": [1, 2, 3], \"attention_mask\": [1, 1, 0]}\n");
    check_error(load(p, *l3, config()), qt::ErrorKind::Data, {p + ":1", "attention_mask", "entry 2 is 0"});
  }
  SECTION("record of no known shape") {
    const std::string p = write_file("shape.jsonl", "{\"question\": \"x\", \"answer\": \"y\"}\n");
    check_error(load(p, *l3, config()), qt::ErrorKind::Data,
                {p + ":1", "answer, question", "\"prompt\"/\"completion\"", "\"conversations\" (chat)"});
  }
  SECTION("record that is not the configured format") {
    const std::string p = write_file("fmt.jsonl", ok);
    check_error(load(p, *l3, config({{"format", "alpaca"}})), qt::ErrorKind::Data,
                {p + ":1", "instruction", "missing"});
  }
}

TEST_CASE("tokenized records keep their ids and mask labels of -100", "[data]") {
  auto tok = qt::load_tokenizer(qt::test::fixture("data/llama3"));
  const std::string p = write_file(
      "tok.jsonl", "{\"input_ids\": [5, 6, 7, 8]}\n{\"input_ids\": [9, 10, 11], \"labels\": [-100, -100, 11]}\n");
  const auto ex = qt::load_examples(p, config(), *tok);
  REQUIRE(ex.size() == 2);
  CHECK(ex[0].ids == std::vector<int32_t>{5, 6, 7, 8});
  CHECK(ex[0].loss == std::vector<uint8_t>{1, 1, 1, 1});
  CHECK(ex[1].ids == std::vector<int32_t>{9, 10, 11});
  CHECK(ex[1].loss == std::vector<uint8_t>{0, 0, 1});
  // An all-ones attention mask (as tokenizers write it) is read.
  const std::string m = write_file("ones.jsonl", "{\"input_ids\": [5, 6], \"attention_mask\": [1, 1]}\n");
  CHECK(qt::load_examples(m, config(), *tok).at(0).ids == std::vector<int32_t>{5, 6});
}

TEST_CASE("data.text_field: text records under another key (TRL's dataset_text_field)", "[data]") {
  auto tok = qt::load_tokenizer(qt::test::fixture("data/llama3"));
  // The fixture's text records, their "text" renamed "content", with another key beside it in one record.
  std::string renamed, line;
  std::ifstream in(qt::test::fixture("data/text_llama3.jsonl"));
  int n = 0;
  while (std::getline(in, line)) {
    qt::Json j = qt::Json::parse(line);
    qt::Json k = {{"content", j["text"]}};
    if (n++ == 0) k["text"] = "not this one";
    renamed += k.dump() + "\n";
  }
  const std::string path = write_file("content.jsonl", renamed);
  const auto want = qt::load_examples(qt::test::fixture("data/text_llama3.jsonl"), config(), *tok);
  for (const char* format : {"auto", "text"}) {
    INFO(format);
    const auto got = qt::load_examples(path, config({{"format", format}, {"text_field", "content"}}), *tok);
    REQUIRE(got.size() == want.size());
    for (size_t i = 0; i < got.size(); ++i) {
      CHECK(got[i].ids == want[i].ids);
      CHECK(got[i].loss == want[i].loss);
    }
  }
  // Without it the records' format is not told, and the message names the key to set; a missing field is named.
  const std::string plain = write_file("plain.jsonl", "{\"content\": \"hello\"}\n");
  const std::string e = qt::test::error_of([&] { qt::load_examples(plain, config(), *tok); });
  CHECK(qt::test::has(e, "plain.jsonl:1"));
  CHECK(qt::test::has(e, "data.text_field"));
  const qt::DataConfig body = config({{"format", "text"}, {"text_field", "body"}});
  CHECK(qt::test::has(qt::test::error_of([&] { qt::load_examples(plain, body, *tok); }), "body"));
  CHECK(config().text_field == "text");
  CHECK(config({{"text_field", "content"}}).to_json()["text_field"] == "content");
  CHECK(qt::test::has(qt::test::error_of([] { config({{"text_field", ""}}); }), "data.text_field"));
}

TEST_CASE("data config defaults and errors", "[data]") {
  const qt::DataConfig d = config();
  CHECK(d.train_file == "train.jsonl");
  CHECK(d.eval_file.empty());
  CHECK(d.eval_fraction == 0.0);
  CHECK(d.format == qt::RecordFormat::Auto);
  CHECK(d.chat_template == qt::ChatTemplateChoice::Auto);
  CHECK(d.max_seq_len == 2048);
  CHECK(d.packing);
  CHECK(d.shuffle);
  CHECK_FALSE(d.train_on_prompt);
  CHECK(d.add_eos);
  const qt::DataConfig s = config({{"format", "chat"},
                                   {"chat_template", "mistral"},
                                   {"max_seq_len", 512},
                                   {"packing", false},
                                   {"seed", 7},
                                   {"eval_fraction", 0.1}});
  CHECK(s.format == qt::RecordFormat::Chat);
  CHECK(s.chat_template == qt::ChatTemplateChoice::Mistral);
  CHECK(s.max_seq_len == 512);
  CHECK_FALSE(s.packing);
  CHECK(s.seed == 7);
  CHECK(s.eval_fraction == 0.1);
  check_error(
      [] {
        config({{"max_seq_length", 10}});
      },
      qt::ErrorKind::Config, {"run.json", "data.max_seq_length", "data.max_seq_len"});
  check_error([] { config({{"format", "sharegpt"}}); }, qt::ErrorKind::Config, {"data.format", "sharegpt"});
  check_error([] { config({{"chat_template", "llama33"}}); }, qt::ErrorKind::Config, {"data.chat_template", "llama3"});
  check_error([] { config({{"packing", "yes"}}); }, qt::ErrorKind::Config, {"data.packing", "true or false"});
  check_error([] { config({{"eval_fraction", 1.0}}); }, qt::ErrorKind::Config, {"data.eval_fraction"});
  check_error(
      [] {
        config({{"eval_fraction", 0.1}, {"eval_file", "e.jsonl"}});
      },
      qt::ErrorKind::Config, {"data.eval_fraction", "eval_file"});
  check_error([] { config({{"max_seq_len", 1}}); }, qt::ErrorKind::Config, {"data.max_seq_len"});
  check_error([] { qt::DataConfig::from_json(qt::Json::object(), "run.json"); }, qt::ErrorKind::Config,
              {"data.train_file", "missing"});
  // One file or a list of them: train_files holds them, train_file names them, to_json gives back what was read.
  CHECK(d.train_files == std::vector<std::string>{"train.jsonl"});
  CHECK(d.to_json()["train_file"] == "train.jsonl");
  const qt::DataConfig l = config({{"train_file", {"a.jsonl", "b/c.jsonl"}}});
  CHECK(l.train_files == std::vector<std::string>{"a.jsonl", "b/c.jsonl"});
  CHECK(l.train_file == "a.jsonl, b/c.jsonl");
  CHECK(l.to_json()["train_file"] == qt::Json::array({"a.jsonl", "b/c.jsonl"}));
  CHECK(qt::DataConfig::from_json(l.to_json(), "run.json").train_files == l.train_files);
  check_error([] { config({{"train_file", qt::Json::array()}}); }, qt::ErrorKind::Config,
              {"data.train_file", "empty list"});
  check_error([] { config({{"train_file", {"a.jsonl", ""}}}); }, qt::ErrorKind::Config, {"data.train_file[1]", "empty"});
  // data.chat_format: read with chat_template "custom" only, its keys checked, an answer's end required; to_json
  // gives back what was read.
  const qt::Json chatml = {{"user_prefix", "<|im_start|>user\n"}, {"assistant_suffix", "<|im_end|>\n"}, {"bos", true}};
  const qt::DataConfig cf = config({{"chat_template", "custom"}, {"chat_format", chatml}});
  CHECK(cf.chat_format.user_prefix == "<|im_start|>user\n");
  CHECK(cf.chat_format.bos);
  CHECK(qt::DataConfig::from_json(cf.to_json(), "run.json").chat_format == cf.chat_format);
  check_error([] { config({{"chat_template", "custom"}}); }, qt::ErrorKind::Config,
              {"data.chat_format.assistant_suffix", "custom"});
  check_error([&] { config({{"chat_template", "llama3"}, {"chat_format", chatml}}); }, qt::ErrorKind::Config,
              {"data.chat_format", "\"llama3\"", "custom"});
  check_error([] { config({{"chat_template", "custom"}, {"chat_format", {{"assistant_sufix", "x"}}}}); },
              qt::ErrorKind::Config, {"data.chat_format.assistant_sufix", "assistant_suffix"});
  check_error([] { config({{"chat_template", "custom"}, {"chat_format", {{"assistant_suffix", 3}}}}); },
              qt::ErrorKind::Config, {"data.chat_format.assistant_suffix"});
  check_error(
      [] {
        config({{"chat_template", "custom"},
                {"chat_format", {{"assistant_suffix", "</s>"}, {"default_system", "Hi."}}}});
      },
      qt::ErrorKind::Config, {"data.chat_format.default_system", "no system turn"});
  check_error([] { config({{"train_file", {"a.jsonl", 3}}}); }, qt::ErrorKind::Config,
              {"data.train_file", "list of strings"});
}

TEST_CASE("KTO: unpaired records, pairs unpaired in TRL's batches of 1,000, KL sequences rotated in groups", "[data]") {
  auto tok = qt::load_tokenizer(qt::test::fixture("data/llama2"));
  // 1,003 pairs: TRL's unpair_preference_dataset maps batches of 1,000 rows, each batch's chosen then its rejected.
  std::string pairs, completions;
  for (int i = 0; i < 1003; ++i) {
    const std::string prompt = "question " + std::to_string(i) + "?";
    pairs += qt::Json{{"prompt", prompt}, {"chosen", " yes " + std::to_string(i)}, {"rejected", " no"}}.dump() + "\n";
    completions += qt::Json{{"prompt", prompt}, {"completion", " yes " + std::to_string(i)}}.dump() + "\n";
  }
  qt::DataConfig cfg = config();
  cfg.unpair = true;
  const auto unpaired = qt::load_examples(write_file("kto_pairs.jsonl", pairs), cfg, *tok);
  const auto plain = qt::load_examples(write_file("kto_completions.jsonl", completions), config(), *tok);
  REQUIRE(unpaired.size() == 2006);
  REQUIRE(plain.size() == 1003);
  for (size_t k = 0; k < unpaired.size(); ++k) {
    const bool chosen = k < 1000 || (k >= 2000 && k < 2003);
    const size_t record = k < 1000 ? k : k < 2000 ? k - 1000 : k < 2003 ? k - 1000 : k - 1003;
    INFO("example " << k);
    CHECK(unpaired[k].label == (chosen ? 1 : 0));
    CHECK(unpaired[k].line == static_cast<int64_t>(record + 1));
    CHECK(unpaired[k].second == 0);
    if (chosen) CHECK((unpaired[k].ids == plain[record].ids && unpaired[k].loss == plain[record].loss));
  }
  // Without DataConfig::unpair a pair stays one Example; an unpaired record's label is read.
  CHECK(qt::load_examples(write_file("kto_pairs2.jsonl", pairs), config(), *tok).front().second > 0);
  const auto labelled = qt::load_examples(
      write_file("kto_unpaired.jsonl", "{\"prompt\": \"a?\", \"completion\": \" b\", \"label\": false}\n"
                                       "{\"prompt\": \"c?\", \"completion\": \" d\", \"label\": true}\n"),
      config(), *tok);
  REQUIRE(labelled.size() == 2);
  CHECK((labelled[0].label == 0 && labelled[1].label == 1));

  // kto_pairs: each example then its KL sequence, its prompt before the completion of the one before it in its group
  // of 3 (the group's first takes its last's; the last group of 2 likewise).
  std::vector<qt::Example> seven(plain.begin(), plain.begin() + 7);
  for (size_t i = 0; i < seven.size(); ++i) seven[i].label = static_cast<int8_t>(i % 2);
  const auto prompt_end = [](const qt::Example& e) {
    return static_cast<size_t>(std::find(e.loss.begin(), e.loss.end(), uint8_t{1}) - e.loss.begin());
  };
  for (const bool kl : {true, false}) {
    const auto out = qt::kto_pairs(seven, 3, kl);
    REQUIRE(out.size() == 7);
    for (size_t i = 0; i < 7; ++i) {
      INFO("example " << i << (kl ? "" : ", no KL"));
      const size_t start = i / 3 * 3, size = std::min<size_t>(3, 7 - start);
      const qt::Example& e = seven[i];
      const qt::Example& other = seven[start + (i - start + size - 1) % size];
      const size_t p = prompt_end(e), q = prompt_end(other);
      std::vector<int32_t> ids = e.ids;
      std::vector<uint8_t> loss(p, 0);
      loss.resize(e.ids.size(), 1);
      if (kl) {
        ids.insert(ids.end(), e.ids.begin(), e.ids.begin() + static_cast<std::ptrdiff_t>(p));
        ids.insert(ids.end(), other.ids.begin() + static_cast<std::ptrdiff_t>(q), other.ids.end());
        loss.resize(loss.size() + p, 0);
        loss.resize(ids.size(), 1);
      } else {
        ids.push_back(e.ids.front());
        loss.push_back(0);
      }
      CHECK(out[i].ids == ids);
      CHECK(out[i].loss == loss);
      CHECK(out[i].second == static_cast<int64_t>(e.ids.size()));
      CHECK(out[i].label == e.label);
      // (the KL sequence is no target: a record trains where its own completion has a token)
      CHECK(qt::fewest_targets(out[i]) == static_cast<int64_t>(e.ids.size() - std::max<size_t>(p, 1)));
    }
  }
}
