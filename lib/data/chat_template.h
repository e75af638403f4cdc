#pragma once
// Built-in renderers for the chat formats of Llama 3, Llama 3.1 (3.2 and 3.3 too), Llama 2, Mistral v0.1, Mistral
// v0.3, Zephyr (TinyLlama-Chat's too), DeepSeek-R1-Distill-Llama, ChatML (Qwen2.5's), Qwen2 (Qwen1.5's too), Qwen3
// (its <think> blocks), Qwen3-Instruct-2507 and SmolLM2 (ChatML): there is no C++ Jinja library in Debian or on the
// GPU image, so each official template is re-implemented here and held to transformers' apply_chat_template by tests
// (tests/oracles/gen_data.py). The format is recognised from the tokenizer's chat_template (tokenizer_config.json)
// or named in the run config (data.chat_template).
#include <optional>
#include <string>
#include <vector>

#include "lib/data/data_config.h"
#include "lib/data/rendered_text.h"
#include "lib/data/tokenizer.h"

namespace qt {

// Custom: data.chat_format's (render_custom).
enum class ChatFormat {
  Llama3, Llama31, Llama2, Mistral, MistralV03, Zephyr, DeepSeekR1, ChatML, Qwen2, Qwen3, Qwen3Instruct, SmolLM2,
  Custom
};

const char* chat_format_name(ChatFormat format);

// The format named by `choice`, or for Auto the one whose official Jinja template `jinja` is, recognised by
// distinctive substrings. No template, or one that is none of the built-in ones, is a qt::Error(Config) naming
// `config_file`'s data.chat_template and the choices.
ChatFormat resolve_chat_format(ChatTemplateChoice choice, const std::string& jinja, const std::string& config_file);

struct ChatMessage {
  std::string role;  // "system", "user" or "assistant"
  std::string content;
  bool tool_calls = false;  // the message has a non-empty "tool_calls" (what a template may render beside content)
  std::optional<std::string> reasoning_content;  // a string "reasoning_content" (Qwen3's template renders it)
  bool target = true;  // an assistant message's answer is in the loss (false: a prompt's, as a completion record's)
};

// The conversation as the template renders it, as pieces: assistant answers (those marked target) and their
// end-of-turn token in the loss (everything when train_on_prompt). Roles the format does not accept (an unknown
// role, a system message not first, user/assistant not alternating where the template raises) are qt::Error(Data)
// naming `where` ("file:line") and the role. `tools`: the record has a non-empty "tools" list (TRL passes it to the
// template).
// Tools and tool calls that the format's template renders (ChatML, Qwen3: a <tools> system prompt and <tool_call>
// blocks; Llama 3.1: tools in the first user message, a call as JSON; Mistral v0.3: [AVAILABLE_TOOLS] and
// [TOOL_CALLS]) are not built in: qt::Error(Data) naming the key, never rendered without them.
std::vector<RenderPiece> render_chat(ChatFormat format, const std::vector<ChatMessage>& messages,
                                     const Tokenizer& tokenizer, bool train_on_prompt, const std::string& where,
                                     bool tools);

// The conversation in a format spelled out in the run config (data.chat_format): pieces as render_chat's. A system
// message where the format has no system prefix or suffix is a qt::Error(Data) naming `where` and the key; so are
// tools and tool calls, which it does not render. `generation`: the prompt `generate` gives the model, the
// conversation (ending with the user's message) and the format's generation prompt.
std::vector<RenderPiece> render_custom(const CustomChatFormat& format, const std::vector<ChatMessage>& messages,
                                       const Tokenizer& tokenizer, bool train_on_prompt, const std::string& where,
                                       bool tools, bool generation = false);

// A Jinja chat template that renders as render_custom(format) (transformers' apply_chat_template, with
// add_generation_prompt the format's generation prompt): what a model trained on the format is prompted with.
std::string custom_format_jinja(const CustomChatFormat& format);

// A run trained on a custom format leaves it beside its adapters (kChatFormatFile: data.chat_format's object;
// kChatTemplateFile: its Jinja), so that export carries it into merged models and GGUF files.
inline constexpr const char* kChatFormatFile = "chat_format.json";
inline constexpr const char* kChatTemplateFile = "chat_template.jinja";
void write_chat_format_files(const std::string& dir, const CustomChatFormat& format);
// The format a directory holds (kChatFormatFile), if any; qt::Error(Config) naming the file where it is malformed.
std::optional<CustomChatFormat> read_chat_format_file(const std::string& dir);
// A merged model directory's chat template made `format`'s: tokenizer_config.json's chat_template and
// chat_template.jinja (which newer transformers read first), and kChatFormatFile.
void set_model_chat_format(const std::string& model_dir, const CustomChatFormat& format);

// Whether `format` renders a conversation's system message in a record of these messages. Mistral v0.3's template
// puts it in the last user message only where that message ends the conversation, so a training record (ending
// with an answer) loses it.
bool renders_system_message(ChatFormat format, const std::vector<ChatMessage>& messages);

// Where transformers' generation prompt for `format` is not the start of an answer's turn as training renders it:
// the text its template appends to the conversation that ends with the user's message. Mistral v0.3's has no
// generation prompt (""), puts the system message into a last user message alone, and starts an answer with a space
// (which a small vocabulary may hold as a token of its own before the answer's); DeepSeek-R1-Distill-Llama's opens
// a <think> block ("<｜Assistant｜><think>\n") that its answers in training do not have. nullopt for the others.
std::optional<std::string> generation_prompt_suffix(ChatFormat format);

}  // namespace qt
