#include "lib/data/chat_template.h"

#include "lib/core/error.h"
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
std::vector<RenderPiece> render_llama3(const std::vector<ChatMessage>& messages, const Tokenizer& tok, bool all) {
  const int32_t start = required_token(tok, "<|start_header_id|>", ChatFormat::Llama3);
  const int32_t end = required_token(tok, "<|end_header_id|>", ChatFormat::Llama3);
  const int32_t eot = required_token(tok, "<|eot_id|>", ChatFormat::Llama3);
  std::vector<RenderPiece> out{{"", bos_of(tok, ChatFormat::Llama3), all}};
  for (const auto& m : messages) {
    const bool answer = all || m.role == "assistant";
    out.push_back({"", start, all});
    out.push_back({m.role, -1, all});
    out.push_back({"", end, all});
    out.push_back({"\n\n", -1, all});
    out.push_back({py_strip(m.content), -1, answer});
    out.push_back({"", eot, answer});  // the end of the turn: what teaches the model to stop
  }
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
      out.push_back({py_strip(content) + " ", -1, true});
      out.push_back({"", eos, true});
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
      out.push_back({m.content, -1, true});
      out.push_back({"", eos, true});
    }
  }
  return out;
}

constexpr const char* kQwenDefaultSystem = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.";

// ChatML as Qwen2.5-*-Instruct's tokenizer_config.json chat_template renders it without tools:
//   {%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
//   {%- else %}{{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful
//   assistant.<|im_end|>\n' }}{%- endif %}
//   {%- for message in messages %}{%- if (message.role == "user") or (message.role == "system" and not
//   loop.first) or (message.role == "assistant" and not message.tool_calls) %}{{- '<|im_start|>' + message.role +
//   '\n' + message.content + '<|im_end|>' + '\n' }}...
// Contents are not stripped; roles need not alternate. An answer's loss runs from its content through <|im_end|>
// and the newline that ends its turn.
std::vector<RenderPiece> render_chatml(const std::vector<ChatMessage>& messages, const Tokenizer& tok, bool all) {
  const int32_t start = required_token(tok, "<|im_start|>", ChatFormat::ChatML);
  const int32_t end = required_token(tok, "<|im_end|>", ChatFormat::ChatML);
  std::vector<RenderPiece> out;
  if (messages[0].role != "system") {
    out.push_back({"", start, all});
    out.push_back({std::string("system\n") + kQwenDefaultSystem, -1, all});
    out.push_back({"", end, all});
    out.push_back({"\n", -1, all});
  }
  for (const auto& m : messages) {
    const bool answer = all || m.role == "assistant";
    out.push_back({"", start, all});
    out.push_back({m.role + "\n", -1, all});
    out.push_back({m.content, -1, answer});
    out.push_back({"", end, answer});
    out.push_back({"\n", -1, answer});
  }
  return out;
}

bool contains(const std::string& s, const char* what) { return s.find(what) != std::string::npos; }

}  // namespace

const char* chat_format_name(ChatFormat format) {
  switch (format) {
    case ChatFormat::Llama3:
      return "llama3";
    case ChatFormat::Llama2:
      return "llama2";
    case ChatFormat::Mistral:
      return "mistral";
    case ChatFormat::ChatML:
      return "chatml";
  }
  return "?";
}

ChatFormat resolve_chat_format(ChatTemplateChoice choice, const std::string& jinja, const std::string& config_file) {
  switch (choice) {
    case ChatTemplateChoice::Llama3:
      return ChatFormat::Llama3;
    case ChatTemplateChoice::Llama2:
      return ChatFormat::Llama2;
    case ChatTemplateChoice::Mistral:
      return ChatFormat::Mistral;
    case ChatTemplateChoice::ChatML:
      return ChatFormat::ChatML;
    case ChatTemplateChoice::Auto:
      break;
  }
  const std::string choices =
      "set data.chat_template to \"llama3\", \"llama2\", \"mistral\" or \"chatml\" (Qwen2.5's ChatML) to use a "
      "built-in format";
  if (jinja.empty())
    fail_key(ErrorKind::Config, config_file, "data.chat_template",
             "is \"auto\" but the tokenizer has no chat_template (tokenizer_config.json); " + choices);
  if (contains(jinja, "<|start_header_id|>")) {
    // Llama 3.1 and later always render a system header with "Cutting Knowledge Date" and today's date: a
    // different text from Llama 3's, not built in.
    if (contains(jinja, "Cutting Knowledge Date"))
      fail_key(ErrorKind::Config, config_file, "data.chat_template",
               "the tokenizer's chat_template is Llama 3.1's or later (a dated system header), which is not built "
               "in; " +
                   choices);
    return ChatFormat::Llama3;
  }
  if (contains(jinja, "[INST]")) {
    if (contains(jinja, "<<SYS>>")) return ChatFormat::Llama2;
    // Later Mistral templates (v0.3 on: tools, the system prompt moved into the last user turn) render
    // differently from v0.1's.
    if (contains(jinja, "[AVAILABLE_TOOLS]") || contains(jinja, "system_message"))
      fail_key(ErrorKind::Config, config_file, "data.chat_template",
               "the tokenizer's chat_template is a later Mistral one (tools or a system message), which is not built "
               "in; " +
                   choices);
    return ChatFormat::Mistral;
  }
  if (contains(jinja, "<|im_start|>")) {
    // Qwen2.5's template (its default system prompt) is the built-in ChatML. Qwen3's (a <think> block in the
    // last answer, no default system prompt), Qwen2's ("You are a helpful assistant.") and other ChatML
    // templates render different text.
    if (contains(jinja, kQwenDefaultSystem) && !contains(jinja, "<think>")) return ChatFormat::ChatML;
    fail_key(ErrorKind::Config, config_file, "data.chat_template",
             "the tokenizer's chat_template is a ChatML one (<|im_start|>) other than Qwen2.5's (a different default "
             "system prompt, or Qwen3's <think> blocks), which is not built in; " +
                 choices);
  }
  fail_key(ErrorKind::Config, config_file, "data.chat_template",
           "the tokenizer's chat_template is not one of the built-in formats (Llama 3, Llama 2, Mistral, ChatML): \"" +
               jinja.substr(0, 60) + (jinja.size() > 60 ? "...\"" : "\"") + "; " + choices);
}

std::vector<RenderPiece> render_chat(ChatFormat format, const std::vector<ChatMessage>& messages,
                                     const Tokenizer& tokenizer, bool train_on_prompt, const std::string& where,
                                     bool tools) {
  if (messages.empty()) fail_key(ErrorKind::Data, where, "messages", "is empty");
  for (size_t i = 0; i < messages.size(); ++i) check_role(messages[i], i, where);
  // Qwen2.5's template renders tools into its system prompt and an assistant's tool_calls as <tool_call> JSON
  // (Python's json.dumps of them, key order kept); the Llama 3, Llama 2 and Mistral v0.1 templates ignore both.
  if (format == ChatFormat::ChatML) {
    const std::string why = "the chatml format's tools and tool calls (Qwen2.5's <tools> system prompt, <tool_call> "
                            "blocks) are not built in; leave them out of the record";
    if (tools) fail_key(ErrorKind::Data, where, "tools", why);
    for (size_t i = 0; i < messages.size(); ++i)
      if (messages[i].tool_calls) fail_key(ErrorKind::Data, where, "messages[" + std::to_string(i) + "].tool_calls", why);
  }
  switch (format) {
    case ChatFormat::Llama3:
      return render_llama3(messages, tokenizer, train_on_prompt);
    case ChatFormat::Llama2:
      return render_llama2(messages, tokenizer, train_on_prompt, where);
    case ChatFormat::Mistral:
      return render_mistral(messages, tokenizer, train_on_prompt, where);
    case ChatFormat::ChatML:
      return render_chatml(messages, tokenizer, train_on_prompt);
  }
  fail(ErrorKind::Internal, "render_chat: unknown format");
}

}  // namespace qt
