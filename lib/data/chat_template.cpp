#include "lib/data/chat_template.h"

#include <utility>

#include "lib/core/error.h"
#include "lib/core/files.h"
#include "lib/core/json.h"
#include "lib/data/unicode_tables.h"
#include "lib/data/unicode_text.h"

namespace qt {

namespace {

// Python's str.isspace(), which Jinja's `trim` filter and str.strip() use: Unicode White_Space plus the
// information separators U+001C..U+001F (bidirectional class B/S).
bool py_space(char32_t c) { return (c >= 0x1C && c <= 0x1F) || unicode::is_white_space(c); }

std::string py_strip(const std::string& s) {
  size_t begin = 0, end = 0, pos = 0;
  bool seen = false;
  while (pos < s.size()) {
    size_t len = 1;
    const char32_t c = unicode::decode_utf8(s, pos, &len);
    if (!py_space(c)) {
      if (!seen) begin = pos;
      seen = true;
      end = pos + len;
    }
    pos += len;
  }
  return seen ? s.substr(begin, end - begin) : std::string();
}

int32_t required_token(const Tokenizer& tok, const std::string& token, ChatFormat format) {
  const int32_t id = tok.token_to_id(token);
  if (id < 0)
    fail(ErrorKind::Config, std::string("the ") + chat_format_name(format) + " chat format needs the token " + token +
                                ", which the tokenizer does not have (data.chat_template)");
  return id;
}

int32_t bos_of(const Tokenizer& tok, ChatFormat format) {
  if (tok.bos_id() < 0)
    fail(ErrorKind::Config, std::string("the ") + chat_format_name(format) +
                                " chat format starts with bos_token, but the tokenizer has none (data.chat_template)");
  return tok.bos_id();
}

int32_t eos_of(const Tokenizer& tok, ChatFormat format) {
  if (tok.eos_id() < 0)
    fail(ErrorKind::Config,
         std::string("the ") + chat_format_name(format) +
             " chat format ends answers with eos_token, but the tokenizer has none (data.chat_template)");
  return tok.eos_id();
}

// An answer in the loss: an assistant message's, unless it belongs to a completion record's prompt.
bool answer(const ChatMessage& m) { return m.role == "assistant" && m.target; }

void check_role(const ChatMessage& m, size_t index, const std::string& where) {
  if (m.role != "system" && m.role != "user" && m.role != "assistant")
    fail_at(ErrorKind::Data, where,
            "messages[" + std::to_string(index) + "]: unknown role \"" + m.role +
                "\" (expected \"system\", \"user\" or \"assistant\")");
  if (m.role == "system" && index != 0)
    fail_at(ErrorKind::Data, where,
            "messages[" + std::to_string(index) + "]: a \"system\" message may only come first");
}

// The Llama 2 and Mistral templates raise_exception('Conversation roles must alternate
// user/assistant/user/assistant/...') when (role == 'user') != (index % 2 == 0).
void check_alternating(const std::vector<ChatMessage>& messages, size_t first, const std::string& where) {
  for (size_t i = first; i < messages.size(); ++i) {
    const bool user_turn = (i - first) % 2 == 0;
    if ((messages[i].role == "user") != user_turn || (!user_turn && messages[i].role != "assistant"))
      fail_at(ErrorKind::Data, where,
              "messages[" + std::to_string(i) + "]: role \"" + messages[i].role + "\" where the template expects \"" +
                  (user_turn ? "user" : "assistant") +
                  "\" (roles must alternate user/assistant after an optional system message)");
  }
}

// Meta-Llama-3-8B-Instruct tokenizer_config.json chat_template:
//   {% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' +
//   message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}
//   {% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}...
// (`|` binds tighter than `+`: only the content is trimmed.)
struct Llama3Tokens {
  int32_t start, end, eot;
};

Llama3Tokens llama3_tokens(const Tokenizer& tok, ChatFormat format) {
  return {required_token(tok, "<|start_header_id|>", format), required_token(tok, "<|end_header_id|>", format),
          required_token(tok, "<|eot_id|>", format)};
}

void append_llama3_turn(std::vector<RenderPiece>& out, const Llama3Tokens& t, const std::string& role,
                        const std::string& text, bool prompt_loss, bool in_loss) {
  out.push_back({"", t.start, prompt_loss});
  out.push_back({role, -1, prompt_loss});
  out.push_back({"", t.end, prompt_loss});
  out.push_back({"\n\n", -1, prompt_loss});
  out.push_back({text, -1, in_loss});
  out.push_back({"", t.eot, in_loss});  // the end of the turn: what teaches the model to stop
}

std::vector<RenderPiece> render_llama3(const std::vector<ChatMessage>& messages, const Tokenizer& tok, bool all) {
  const Llama3Tokens t = llama3_tokens(tok, ChatFormat::Llama3);
  std::vector<RenderPiece> out{{"", bos_of(tok, ChatFormat::Llama3), all}};
  for (const auto& m : messages)
    append_llama3_turn(out, t, m.role, py_strip(m.content), all, all || answer(m));
  return out;
}

// The date Llama 3.1's and 3.3's templates print (date_string's default), and Llama 3.2's where strftime_now is
// undefined: transformers defines it, so that it renders 3.2's conversations with the day's date.
constexpr const char* kLlama31Date = "26 Jul 2024";

// Meta-Llama-3.1-8B-Instruct tokenizer_config.json chat_template without tools (Llama-3.2-*-Instruct's and
// Llama-3.3-70B-Instruct's render the same text; 3.2's date_string aside, above):
//   {{- bos_token }}...{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content']|trim %}
//   {%- set messages = messages[1:] %}{%- else %}{%- set system_message = "" %}{%- endif %}
//   {{- "<|start_header_id|>system<|end_header_id|>\n\n" }}...{{- "Cutting Knowledge Date: December 2023\n" }}
//   {{- "Today Date: " + date_string + "\n\n" }}...{{- system_message }}{{- "<|eot_id|>" }}...
//   {%- for message in messages %}{%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in
//   message) %}{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim +
//   '<|eot_id|>' }}...
// A system header always comes first, the system message (trimmed) after the dates.
std::vector<RenderPiece> render_llama31(const std::vector<ChatMessage>& messages, const Tokenizer& tok, bool all) {
  const Llama3Tokens t = llama3_tokens(tok, ChatFormat::Llama31);
  const bool has_system = messages[0].role == "system";
  std::vector<RenderPiece> out{{"", bos_of(tok, ChatFormat::Llama31), all}};
  append_llama3_turn(out, t, "system",
                     std::string("Cutting Knowledge Date: December 2023\nToday Date: ") + kLlama31Date + "\n\n" +
                         (has_system ? py_strip(messages[0].content) : ""),
                     all, all);
  for (size_t i = has_system ? 1 : 0; i < messages.size(); ++i)
    append_llama3_turn(out, t, messages[i].role, py_strip(messages[i].content), all, all || answer(messages[i]));
  return out;
}

// Llama-2-7b-chat-hf tokenizer_config.json chat_template:
//   {% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message =
//   messages[0]['content'] %}{% else %}...{% endif %}{% for message in loop_messages %}(roles alternate)
//   {% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\n' + system_message +
//   '\n<</SYS>>\n\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}
//   {% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}
//   {% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}
std::vector<RenderPiece> render_llama2(const std::vector<ChatMessage>& messages, const Tokenizer& tok, bool all,
                                       const std::string& where) {
  const int32_t bos = bos_of(tok, ChatFormat::Llama2), eos = eos_of(tok, ChatFormat::Llama2);
  const bool has_system = !messages.empty() && messages[0].role == "system";
  const size_t first = has_system ? 1 : 0;
  check_alternating(messages, first, where);
  std::vector<RenderPiece> out;
  for (size_t i = first; i < messages.size(); ++i) {
    std::string content = messages[i].content;
    if (i == first && has_system) content = "<<SYS>>\n" + messages[0].content + "\n<</SYS>>\n\n" + content;
    if (messages[i].role == "user") {
      out.push_back({"", bos, all});
      out.push_back({"[INST] " + py_strip(content) + " [/INST]", -1, all});
    } else {
      out.push_back({" ", -1, all});
      out.push_back({py_strip(content) + " ", -1, all || answer(messages[i])});
      out.push_back({"", eos, all || answer(messages[i])});
    }
  }
  return out;
}

// Mistral-7B-Instruct-v0.1 tokenizer_config.json chat_template:
//   {{ bos_token }}{% for message in messages %}(roles alternate){% if message['role'] == 'user' %}
//   {{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}
//   {{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant roles are
//   supported!') }}{% endif %}{% endfor %}
std::vector<RenderPiece> render_mistral(const std::vector<ChatMessage>& messages, const Tokenizer& tok, bool all,
                                        const std::string& where) {
  if (!messages.empty() && messages[0].role == "system")
    fail_at(ErrorKind::Data, where,
            "messages[0]: role \"system\": the Mistral chat template supports only \"user\" and \"assistant\"");
  check_alternating(messages, 0, where);
  std::vector<RenderPiece> out{{"", bos_of(tok, ChatFormat::Mistral), all}};
  const int32_t eos = eos_of(tok, ChatFormat::Mistral);
  for (const auto& m : messages) {
    if (m.role == "user") {
      out.push_back({"[INST] " + m.content + " [/INST]", -1, all});
    } else {
      out.push_back({m.content, -1, all || answer(m)});
      out.push_back({"", eos, all || answer(m)});
    }
  }
  return out;
}

// Mistral-7B-Instruct-v0.3's chat_template (tests/oracles/chat_templates/mistral_v0_3.jinja), without its tools:
//   {%- if messages[0]["role"] == "system" %}{%- set system_message = messages[0]["content"] %}
//   {%- set loop_messages = messages[1:] %}...(roles alternate from user after it)...{{- bos_token }}
//   {%- for message in loop_messages %}{%- if message["role"] == "user" %}
//   {%- if loop.last and system_message is defined %}
//   {{- "[INST] " + system_message + "\n\n" + message["content"] + "[/INST]" }}
//   {%- else %}{{- "[INST] " + message["content"] + "[/INST]" }}{%- endif %}
//   {%- elif message["role"] == "assistant" %}{{- " " + message["content"]|trim + eos_token}}...
// [INST] and [/INST] are control tokens of v0.3's vocabulary, and its tokenizer files put sentencepiece's dummy
// prefix at the input's start alone (DummyPrefix::First), so " " + answer is one "▁word" token after [/INST].
std::vector<RenderPiece> render_mistral_v03(const std::vector<ChatMessage>& messages, const Tokenizer& tok, bool all,
                                            const std::string& where) {
  const bool system = !messages.empty() && messages[0].role == "system";
  check_alternating(messages, system ? 1 : 0, where);
  std::vector<RenderPiece> out{{"", bos_of(tok, ChatFormat::MistralV03), all}};
  const int32_t eos = eos_of(tok, ChatFormat::MistralV03);
  for (size_t i = system ? 1 : 0; i < messages.size(); ++i) {
    const ChatMessage& m = messages[i];
    if (m.role == "user") {
      const bool with_system = system && i + 1 == messages.size();
      out.push_back({"[INST] " + (with_system ? messages[0].content + "\n\n" : "") + m.content + "[/INST]", -1, all});
    } else {
      out.push_back({" ", -1, all});
      out.push_back({py_strip(m.content), -1, all || answer(m)});
      out.push_back({"", eos, all || answer(m)});
    }
  }
  return out;
}

// HuggingFaceH4/zephyr-7b-beta's chat_template (TinyLlama-1.1B-Chat-v1.0's too), rendered with transformers'
// trim_blocks (the newline after each block tag dropped; the one after each message's `}}` kept):
//   {% for message in messages %}{% if message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] +
//   eos_token }}\n{% elif message['role'] == 'system' %}{{ '<|system|>\n' + message['content'] + eos_token }}\n
//   {% elif message['role'] == 'assistant' %}{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}
//   {% if loop.last and add_generation_prompt %}{{ '<|assistant|>' }}\n{% endif %}{% endfor %}
// <|user|>, <|system|> and <|assistant|> are text, not tokens. An answer's loss is its content and eos_token; the
// newline after it, which follows the end of the answer, is not.
std::vector<RenderPiece> render_zephyr(const std::vector<ChatMessage>& messages, const Tokenizer& tok, bool all) {
  const int32_t eos = eos_of(tok, ChatFormat::Zephyr);
  std::vector<RenderPiece> out;
  for (const auto& m : messages) {
    const bool loss = all || answer(m);
    out.push_back({"<|" + m.role + "|>\n", -1, all});
    out.push_back({m.content, -1, m.role == "assistant" ? loss : all});
    out.push_back({"", eos, m.role == "assistant" ? loss : all});
    out.push_back({"\n", -1, all});
  }
  return out;
}

// deepseek-ai/DeepSeek-R1-Distill-Llama-8B's (and -70B's) chat_template, without its tools:
//   {% set ns = namespace(..., system_prompt='') %}{%- for message in messages %}{%- if message['role'] == 'system' %}
//   {% set ns.system_prompt = message['content'] %}{%- endif %}{%- endfor %}{{bos_token}}{{ns.system_prompt}}
//   {%- for message in messages %}{%- if message['role'] == 'user' %}...{{'<｜User｜>' + message['content']}}
//   {%- endif %}...{%- if message['role'] == 'assistant' and message['content'] is not none %}...{% set content =
//   message['content'] %}{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}
//   {{'<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>'}}...{% if add_generation_prompt and not ns.is_tool %}
//   {{'<｜Assistant｜><think>\n'}}{% endif %}
// An answer keeps what follows its last </think>: its reasoning is left out (load_examples warns).
constexpr const char* kDeepSeekUser = "<\uff5cUser\uff5c>";
constexpr const char* kDeepSeekAssistant = "<\uff5cAssistant\uff5c>";
constexpr const char* kDeepSeekEnd = "<\uff5cend\u2581of\u2581sentence\uff5c>";

std::vector<RenderPiece> render_deepseek_r1(const std::vector<ChatMessage>& messages, const Tokenizer& tok, bool all) {
  std::vector<RenderPiece> out{{"", bos_of(tok, ChatFormat::DeepSeekR1), all}};
  const int32_t end = required_token(tok, kDeepSeekEnd, ChatFormat::DeepSeekR1);
  required_token(tok, kDeepSeekUser, ChatFormat::DeepSeekR1);
  required_token(tok, kDeepSeekAssistant, ChatFormat::DeepSeekR1);
  if (!messages.empty() && messages[0].role == "system") out.push_back({messages[0].content, -1, all});
  for (const auto& m : messages) {
    if (m.role == "user") {
      out.push_back({kDeepSeekUser + m.content, -1, all});
    } else if (m.role == "assistant") {
      const size_t think = m.content.rfind("</think>");
      out.push_back({kDeepSeekAssistant, -1, all});
      out.push_back({think == std::string::npos ? m.content : m.content.substr(think + 8), -1, all || answer(m)});
      out.push_back({"", end, all || answer(m)});
    }
  }
  return out;
}

constexpr const char* kQwenDefaultSystem = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.";
// Qwen2-*-Instruct's and Qwen1.5-*-Chat's chat_template:
//   {% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are
//   a helpful assistant.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] +
//   '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}
// (Qwen2.5's ChatML with another default system prompt, and no tools.)
constexpr const char* kQwen2DefaultSystem = "You are a helpful assistant.";
// HuggingFaceTB/SmolLM2-*-Instruct's chat_template is Qwen2's with this default system prompt.
constexpr const char* kSmolLMDefaultSystem = "You are a helpful AI assistant named SmolLM, trained by Hugging Face";

// ChatML as Qwen2.5-*-Instruct's tokenizer_config.json chat_template renders it without tools:
//   {%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
//   {%- else %}{{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful
//   assistant.<|im_end|>\n' }}{%- endif %}
//   {%- for message in messages %}{%- if (message.role == "user") or (message.role == "system" and not
//   loop.first) or (message.role == "assistant" and not message.tool_calls) %}{{- '<|im_start|>' + message.role +
//   '\n' + message.content + '<|im_end|>' + '\n' }}...
// Contents are not stripped; roles need not alternate. An answer's loss runs from its content through <|im_end|>
// and the newline that ends its turn.
// `default_system`: the system turn rendered where the conversation has none (Qwen2.5's), or none
// (Qwen3-Instruct-2507's template, the same text otherwise).
std::vector<RenderPiece> render_chatml(const std::vector<ChatMessage>& messages, const Tokenizer& tok, bool all,
                                       ChatFormat format, const char* default_system) {
  const int32_t start = required_token(tok, "<|im_start|>", format);
  const int32_t end = required_token(tok, "<|im_end|>", format);
  std::vector<RenderPiece> out;
  if (messages[0].role != "system" && default_system) {
    out.push_back({"", start, all});
    out.push_back({std::string("system\n") + default_system, -1, all});
    out.push_back({"", end, all});
    out.push_back({"\n", -1, all});
  }
  for (const auto& m : messages) {
    const bool in_loss = all || answer(m);
    out.push_back({"", start, all});
    out.push_back({m.role + "\n", -1, all});
    out.push_back({m.content, -1, in_loss});
    out.push_back({"", end, in_loss});
    out.push_back({"\n", -1, in_loss});
  }
  return out;
}

bool starts_with(const std::string& s, const std::string& p) { return s.compare(0, p.size(), p) == 0; }
bool ends_with(const std::string& s, const std::string& p) {
  return s.size() >= p.size() && s.compare(s.size() - p.size(), p.size(), p) == 0;
}

// Python's s.lstrip('\n') / s.rstrip('\n').
std::string lstrip_newlines(const std::string& s) {
  const size_t b = s.find_first_not_of('\n');
  return b == std::string::npos ? std::string() : s.substr(b);
}
std::string rstrip_newlines(const std::string& s) {
  const size_t e = s.find_last_not_of('\n');
  return e == std::string::npos ? std::string() : s.substr(0, e + 1);
}

// Qwen/Qwen3-8B tokenizer_config.json chat_template without tools (ChatML with no default system prompt):
//   {%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
//   {%- for message in messages[::-1] %}{%- set index = (messages|length - 1) - loop.index0 %}
//   {%- if ns.multi_step_tool and message.role == "user" and message.content is string and
//   not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
//   {%- set ns.multi_step_tool = false %}{%- set ns.last_query_index = index %}{%- endif %}{%- endfor %}...
//   {%- elif message.role == "assistant" %}{%- set reasoning_content = '' %}
//   {%- if message.reasoning_content is string %}{%- set reasoning_content = message.reasoning_content %}{%- else %}
//   {%- if '</think>' in content %}{%- set reasoning_content =
//   content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
//   {%- set content = content.split('</think>')[-1].lstrip('\n') %}{%- endif %}{%- endif %}
//   {%- if loop.index0 > ns.last_query_index %}{%- if loop.last or (not loop.last and reasoning_content) %}
//   {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' +
//   content.lstrip('\n') }}{%- else %}{{- '<|im_start|>' + message.role + '\n' + content }}{%- endif %}{%- else %}
//   {{- '<|im_start|>' + message.role + '\n' + content }}{%- endif %}...{{- '<|im_end|>\n' }}
// So the answers after the last user query carry a <think> block (the last one always, empty where it has no
// reasoning), the earlier ones their content alone (their reasoning left out). An answer's loss runs from what
// follows "<|im_start|>assistant\n" (its <think> block included: what the model writes in thinking mode) through
// <|im_end|> and the newline that ends its turn.
std::vector<RenderPiece> render_qwen3(const std::vector<ChatMessage>& messages, const Tokenizer& tok, bool all) {
  const int32_t start = required_token(tok, "<|im_start|>", ChatFormat::Qwen3);
  const int32_t end = required_token(tok, "<|im_end|>", ChatFormat::Qwen3);
  size_t last_query = messages.size() - 1;
  for (size_t k = messages.size(); k-- > 0;) {
    const std::string& c = messages[k].content;
    if (messages[k].role == "user" && !(starts_with(c, "<tool_response>") && ends_with(c, "</tool_response>"))) {
      last_query = k;
      break;
    }
  }
  std::vector<RenderPiece> out;
  for (size_t i = 0; i < messages.size(); ++i) {
    const ChatMessage& m = messages[i];
    const bool in_loss = all || answer(m);
    std::string content = m.content;
    if (m.role == "assistant") {
      std::string reasoning;
      if (m.reasoning_content) {
        reasoning = *m.reasoning_content;
      } else if (const size_t close = content.find("</think>"); close != std::string::npos) {
        const std::string before = rstrip_newlines(content.substr(0, close));
        const size_t open = before.rfind("<think>");
        reasoning = lstrip_newlines(open == std::string::npos ? before : before.substr(open + 7));
        content = lstrip_newlines(content.substr(content.rfind("</think>") + 8));
      }
      if (i > last_query && (i + 1 == messages.size() || !reasoning.empty()))
        content = "<think>\n" + lstrip_newlines(rstrip_newlines(reasoning)) + "\n</think>\n\n" +
                  lstrip_newlines(content);
    }
    out.push_back({"", start, all});
    out.push_back({m.role + "\n", -1, all});
    out.push_back({content, -1, in_loss});
    out.push_back({"", end, in_loss});
    out.push_back({"\n", -1, in_loss});
  }
  return out;
}

bool contains(const std::string& s, const char* what) { return s.find(what) != std::string::npos; }

// Each format is the data.chat_template choice of the same name.
constexpr std::pair<ChatFormat, ChatTemplateChoice> kFormats[] = {
    {ChatFormat::Llama3, ChatTemplateChoice::Llama3},   {ChatFormat::Llama31, ChatTemplateChoice::Llama31},
    {ChatFormat::Llama2, ChatTemplateChoice::Llama2},   {ChatFormat::Mistral, ChatTemplateChoice::Mistral},
    {ChatFormat::MistralV03, ChatTemplateChoice::MistralV03}, {ChatFormat::Zephyr, ChatTemplateChoice::Zephyr},
    {ChatFormat::DeepSeekR1, ChatTemplateChoice::DeepSeekR1},
    {ChatFormat::ChatML, ChatTemplateChoice::ChatML},   {ChatFormat::Qwen2, ChatTemplateChoice::Qwen2},
    {ChatFormat::Qwen3, ChatTemplateChoice::Qwen3},     {ChatFormat::Qwen3Instruct, ChatTemplateChoice::Qwen3Instruct},
    {ChatFormat::SmolLM2, ChatTemplateChoice::SmolLM2}, {ChatFormat::Custom, ChatTemplateChoice::Custom}};

}  // namespace

const char* chat_format_name(ChatFormat format) {
  for (const auto& [f, c] : kFormats)
    if (f == format) return chat_template_name(c);
  return "?";
}

ChatFormat resolve_chat_format(ChatTemplateChoice choice, const std::string& jinja, const std::string& config_file) {
  for (const auto& [f, c] : kFormats)
    if (c == choice) return f;
  std::string names;
  for (const std::string& n : chat_template_names())
    if (n != "auto" && n != "custom") names += (names.empty() ? "\"" : ", \"") + n + "\"";
  const std::string choices = "set data.chat_template to one of the built-in formats (" + names +
                              ": docs/CONFIG.md says which model's template each is), or to \"custom\" with "
                              "data.chat_format spelling the format out";
  const auto refuse = [&](const std::string& what) {
    fail_key(ErrorKind::Config, config_file, "data.chat_template",
             "the tokenizer's chat_template is " + what + ", which is not built in; " + choices);
  };
  if (jinja.empty())
    fail_key(ErrorKind::Config, config_file, "data.chat_template",
             "is \"auto\" but the tokenizer has no chat_template (tokenizer_config.json); " + choices);
  if (contains(jinja, "<|start_header_id|>")) {
    // Llama 3.1, 3.2 and 3.3 always render a system header with "Cutting Knowledge Date" and a date; 3.2 Vision's
    // template renders images and leaves that header out where there are images.
    if (!contains(jinja, "Cutting Knowledge Date")) return ChatFormat::Llama3;
    if (contains(jinja, "<|image|>")) refuse("Llama 3.2 Vision's (<|image|>)");
    return ChatFormat::Llama31;
  }
  if (contains(jinja, "[INST]")) {
    if (contains(jinja, "<<SYS>>")) return ChatFormat::Llama2;
    // Mistral v0.3's: [INST] without spaces inside, the system message in the last user turn, tools. Other later
    // Mistral templates (v0.2's update, Nemo's and Small's own) render differently from both.
    if (contains(jinja, "[AVAILABLE_TOOLS]") && contains(jinja, "loop.last and system_message is defined") &&
        contains(jinja, R"("[INST] " + message["content"] + "[/INST]")") &&
        contains(jinja, R"(" " + message["content"]|trim + eos_token)"))
      return ChatFormat::MistralV03;
    if (contains(jinja, "[AVAILABLE_TOOLS]") || contains(jinja, "system_message"))
      refuse("a later Mistral one other than v0.3's (tools or a system message)");
    return ChatFormat::Mistral;
  }
  // Zephyr's: each turn '<|role|>' and a newline (in the Jinja string itself), the content and eos_token, then the
  // template's own newline before the next block tag.
  const auto zephyr_turn = [&](const std::string& role) {
    return contains(jinja, ("'<|" + role + "|>\n'").c_str()) || contains(jinja, ("'<|" + role + "|>\\n'").c_str());
  };
  if (zephyr_turn("user") && zephyr_turn("assistant") && zephyr_turn("system") &&
      contains(jinja, "message['content'] + eos_token }}\n{%"))
    return ChatFormat::Zephyr;
  if (contains(jinja, kDeepSeekUser) && contains(jinja, kDeepSeekAssistant)) {
    // DeepSeek-R1-Distill-Llama's: the system prompt right after bos_token, each answer's reasoning left out. The
    // Qwen distills' renders <｜Assistant｜> after each user message instead.
    if (contains(jinja, "{{bos_token}}{{ns.system_prompt}}") && contains(jinja, "content.split('</think>')[-1]") &&
        contains(jinja, "{{'<\uff5cUser\uff5c>' + message['content']}}"))
      return ChatFormat::DeepSeekR1;
    refuse("a DeepSeek one other than DeepSeek-R1-Distill-Llama's (the Qwen distills' among them)");
  }
  if (contains(jinja, "<|im_start|>")) {
    // Qwen3's (the hybrid models': enable_thinking, <think> blocks after the last query), Qwen2.5's (its default
    // system prompt), Qwen2's (its own, no tools) and Qwen3-Instruct-2507's (no default system prompt, tools as
    // Qwen3's: no begin token, no other default system prompt) and SmolLM2's (Qwen2's with SmolLM's default system
    // prompt). Others (Qwen3-Thinking-2507's, QwQ's, SmolLM3's, Hermes's) render different text.
    if (contains(jinja, "<think>")) {
      if (contains(jinja, "enable_thinking") && contains(jinja, "last_query_index") &&
          contains(jinja, "reasoning_content"))
        return ChatFormat::Qwen3;
      refuse("a ChatML one (<|im_start|>) with <think> blocks other than Qwen3's");
    }
    if (contains(jinja, kQwenDefaultSystem)) return ChatFormat::ChatML;
    // The line break after "system" as the template's text has it: a newline (the models' tokenizer_config.json
    // writes "\n" in JSON) or Jinja's escape "\\n" (both render a newline).
    const auto default_system_is = [&](const char* text) {
      for (const char* newline : {"\n", "\\n"})
        if (contains(jinja, (std::string("<|im_start|>system") + newline + text + "<|im_end|>").c_str()))
          return !contains(jinja, "bos_token") && !contains(jinja, "tool");
      return false;
    };
    if (default_system_is(kQwen2DefaultSystem)) return ChatFormat::Qwen2;
    if (default_system_is(kSmolLMDefaultSystem)) return ChatFormat::SmolLM2;
    if (contains(jinja, "<tool_response>") && !contains(jinja, "bos_token") && !contains(jinja, "You are Qwen") &&
        !contains(jinja, "You are a helpful"))
      return ChatFormat::Qwen3Instruct;
    refuse("a ChatML one (<|im_start|>) other than Qwen2.5's, Qwen2's, Qwen3's, Qwen3-Instruct-2507's or SmolLM2's "
           "(another default system prompt)");
  }
  refuse("not one of the built-in formats: \"" + jinja.substr(0, 60) + (jinja.size() > 60 ? "...\"" : "\""));
  fail(ErrorKind::Internal, "resolve_chat_format: unreachable");
}

std::vector<RenderPiece> render_chat(ChatFormat format, const std::vector<ChatMessage>& messages,
                                     const Tokenizer& tokenizer, bool train_on_prompt, const std::string& where,
                                     bool tools) {
  if (messages.empty()) fail_key(ErrorKind::Data, where, "messages", "is empty");
  for (size_t i = 0; i < messages.size(); ++i) check_role(messages[i], i, where);
  // Qwen2.5's, Qwen3's and Qwen3-Instruct-2507's templates render tools into their system prompt and an assistant's
  // tool_calls as <tool_call> JSON (Python's json.dumps of them, key order kept); Llama 3.1's tools into the first
  // user message and a call as JSON; Mistral v0.3's tools before the last user message and calls as [TOOL_CALLS].
  // DeepSeek-R1-Distill-Llama's renders neither a tools list nor the calls of an answer with content (only those of
  // one without, which records cannot hold), as here.
  // The Llama 3, Llama 2 and Mistral v0.1 templates ignore both.
  if (format == ChatFormat::ChatML || format == ChatFormat::Qwen3 || format == ChatFormat::Qwen3Instruct ||
      format == ChatFormat::Llama31 || format == ChatFormat::MistralV03) {
    const std::string why = std::string("the ") + chat_format_name(format) +
                            " format's tools and tool calls (what its template renders of them) are not built in; "
                            "leave them out of the record";
    if (tools) fail_key(ErrorKind::Data, where, "tools", why);
    for (size_t i = 0; i < messages.size(); ++i)
      if (messages[i].tool_calls) fail_key(ErrorKind::Data, where, "messages[" + std::to_string(i) + "].tool_calls", why);
  }
  switch (format) {
    case ChatFormat::Llama3:
      return render_llama3(messages, tokenizer, train_on_prompt);
    case ChatFormat::Llama31:
      return render_llama31(messages, tokenizer, train_on_prompt);
    case ChatFormat::Llama2:
      return render_llama2(messages, tokenizer, train_on_prompt, where);
    case ChatFormat::Mistral:
      return render_mistral(messages, tokenizer, train_on_prompt, where);
    case ChatFormat::MistralV03:
      return render_mistral_v03(messages, tokenizer, train_on_prompt, where);
    case ChatFormat::Zephyr:
      return render_zephyr(messages, tokenizer, train_on_prompt);
    case ChatFormat::DeepSeekR1:
      return render_deepseek_r1(messages, tokenizer, train_on_prompt);
    case ChatFormat::ChatML:
      return render_chatml(messages, tokenizer, train_on_prompt, format, kQwenDefaultSystem);
    case ChatFormat::Qwen2:
      return render_chatml(messages, tokenizer, train_on_prompt, format, kQwen2DefaultSystem);
    case ChatFormat::Qwen3:
      return render_qwen3(messages, tokenizer, train_on_prompt);
    case ChatFormat::Qwen3Instruct:
      return render_chatml(messages, tokenizer, train_on_prompt, format, nullptr);
    case ChatFormat::SmolLM2:
      return render_chatml(messages, tokenizer, train_on_prompt, format, kSmolLMDefaultSystem);
    case ChatFormat::Custom:
      break;
  }
  fail(ErrorKind::Internal, "render_chat: the custom format is rendered by render_custom");
}

std::optional<std::string> generation_prompt_suffix(ChatFormat format) {
  if (format == ChatFormat::MistralV03) return std::string();
  if (format == ChatFormat::DeepSeekR1) return std::string(kDeepSeekAssistant) + "<think>\n";
  return std::nullopt;
}

bool renders_system_message(ChatFormat format, const std::vector<ChatMessage>& messages) {
  if (messages.empty() || messages[0].role != "system") return false;
  return format != ChatFormat::MistralV03 || (messages.size() > 1 && messages.back().role == "user");
}

std::vector<RenderPiece> render_custom(const CustomChatFormat& f, const std::vector<ChatMessage>& messages,
                                       const Tokenizer& tok, bool all, const std::string& where, bool tools,
                                       bool generation) {
  if (messages.empty()) fail_key(ErrorKind::Data, where, "messages", "is empty");
  const std::string why = "the custom chat format (data.chat_format) renders no tools; leave them out of the record";
  if (tools) fail_key(ErrorKind::Data, where, "tools", why);
  for (size_t i = 0; i < messages.size(); ++i) {
    check_role(messages[i], i, where);
    if (messages[i].tool_calls) fail_key(ErrorKind::Data, where, "messages[" + std::to_string(i) + "].tool_calls", why);
  }
  const bool system = messages[0].role == "system";
  if ((system || !f.default_system.empty()) && f.system_prefix.empty() && f.system_suffix.empty())
    fail_key(ErrorKind::Data, where, system ? "messages[0]" : "data.chat_format.default_system",
             "is a system message, but data.chat_format has no system turn (system_prefix and system_suffix are "
             "empty)");
  std::vector<RenderPiece> out;
  if (f.bos) {
    if (tok.bos_id() < 0)
      fail(ErrorKind::Config, "data.chat_format.bos is true, but the tokenizer has no BOS token");
    out.push_back({"", tok.bos_id(), all});
  }
  if (!system && !f.default_system.empty())
    out.push_back({f.system_prefix + f.default_system + f.system_suffix, -1, all});
  for (const ChatMessage& m : messages) {
    const bool loss = all || answer(m);
    const bool sys = m.role == "system", user = m.role == "user";
    const std::string& prefix = sys ? f.system_prefix : user ? f.user_prefix : f.assistant_prefix;
    const std::string& suffix = sys ? f.system_suffix : user ? f.user_suffix : f.assistant_suffix;
    out.push_back({prefix, -1, all});
    out.push_back({f.strip ? py_strip(m.content) : m.content, -1, m.role == "assistant" ? loss : all});
    out.push_back({suffix, -1, m.role == "assistant" ? loss : all});
  }
  if (generation) out.push_back({f.generation_prompt.empty() ? f.assistant_prefix : f.generation_prompt, -1, false});
  return out;
}

namespace {

// `s` as a Jinja string literal: single-quoted, its backslashes, quotes and line breaks escaped (Jinja unescapes
// them as Python does; other characters, UTF-8 included, stand for themselves).
std::string jinja_literal(const std::string& s) {
  std::string out = "'";
  for (char c : s) {
    switch (c) {
      case '\\':
        out += "\\\\";
        break;
      case '\'':
        out += "\\'";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\r':
        out += "\\r";
        break;
      case '\t':
        out += "\\t";
        break;
      default:
        out += c;
    }
  }
  return out + "'";
}

}  // namespace

std::string custom_format_jinja(const CustomChatFormat& f) {
  const auto lit = [](const std::string& s) { return jinja_literal(s); };
  std::string j = "{#- the chat format qlora-train trained with (data.chat_format) #}";
  if (f.bos) j += "{{- bos_token }}";
  if (!f.default_system.empty())
    j += "{%- if messages[0]['role'] != 'system' %}{{- " + lit(f.system_prefix + f.default_system + f.system_suffix) +
         " }}{%- endif %}";
  j += "{%- for message in messages %}";
  j += f.strip ? "{%- set content = message['content'] | trim %}" : "{%- set content = message['content'] %}";
  const std::pair<const char*, std::pair<const std::string*, const std::string*>> roles[] = {
      {"system", {&f.system_prefix, &f.system_suffix}},
      {"user", {&f.user_prefix, &f.user_suffix}},
      {"assistant", {&f.assistant_prefix, &f.assistant_suffix}}};
  for (size_t i = 0; i < 3; ++i) {
    j += std::string(i == 0 ? "{%- if" : "{%- elif") + " message['role'] == '" + roles[i].first + "' %}";
    j += "{{- " + lit(*roles[i].second.first) + " + content + " + lit(*roles[i].second.second) + " }}";
  }
  j += "{%- else %}{{- raise_exception('roles are system (first), user and assistant') }}{%- endif %}{%- endfor %}";
  const std::string& gen = f.generation_prompt.empty() ? f.assistant_prefix : f.generation_prompt;
  j += "{%- if add_generation_prompt %}{{- " + lit(gen) + " }}{%- endif %}";
  return j;
}

void write_chat_format_files(const std::string& dir, const CustomChatFormat& f) {
  write_json_file(files::join(dir, kChatFormatFile), f.to_json());
  files::write_file_atomically(files::join(dir, kChatTemplateFile), custom_format_jinja(f));
}

std::optional<CustomChatFormat> read_chat_format_file(const std::string& dir) {
  const std::string path = files::join(dir, kChatFormatFile);
  if (!files::exists(path)) return std::nullopt;
  return CustomChatFormat::from_json(read_json_file(path, ErrorKind::Config), path);
}

void set_model_chat_format(const std::string& model_dir, const CustomChatFormat& f) {
  const std::string cfg_path = files::join(model_dir, "tokenizer_config.json");
  Json cfg = files::exists(cfg_path) ? read_json_file(cfg_path, ErrorKind::Model) : Json::object();
  cfg["chat_template"] = custom_format_jinja(f);
  write_json_file(cfg_path, cfg);
  write_chat_format_files(model_dir, f);
}

}  // namespace qt
