#include "lib/export/ollama_modelfile.h"

#include <algorithm>
#include <vector>

#include "lib/core/error.h"

namespace qt {

namespace {

bool contains(const std::string& s, const char* needle) { return s.find(needle) != std::string::npos; }

struct Format {
  const char* name;
  const char* tmpl;
  std::vector<std::string> stops;
};

const Format kLlama3 = {"llama3",
                        "{{ if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}"
                        "{{ if .Prompt }}<|start_header_id|>user<|end_header_id|>\n\n{{ .Prompt }}<|eot_id|>{{ end }}"
                        "<|start_header_id|>assistant<|end_header_id|>\n\n{{ .Response }}<|eot_id|>",
                        {"<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"}};
// Llama 2 chat: "[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user} [/INST] {answer} </s>".
const Format kLlama2 = {
    "llama2",
    "[INST] {{ if .System }}<<SYS>>\n{{ .System }}\n<</SYS>>\n\n{{ end }}{{ .Prompt }} [/INST] {{ .Response }}",
    {"[INST]", "[/INST]", "<<SYS>>", "<</SYS>>"}};
// Mistral Instruct: "[INST] {system}\n\n{user} [/INST]{answer}</s>" (the system text before the user's).
const Format kMistral = {"mistral",
                         "[INST] {{ if .System }}{{ .System }}\n\n{{ end }}{{ .Prompt }} [/INST]{{ .Response }}",
                         {"[INST]", "[/INST]"}};
// Mistral-7B-Instruct-v0.3: "[INST] {system}\n\n{user}[/INST] {answer}</s>" ([INST] and [/INST] control tokens, no
// space before [/INST]; the system text in the last user message, as Ollama's mistral template for v0.3 puts it).
// The prompt ends at [/INST]: the answer's space is its first token's ("▁word"), as in training.
const Format kMistralV03 = {"mistral-v0.3",
                            "[INST] {{ if .System }}{{ .System }}\n\n{{ end }}{{ .Prompt }}[/INST]"
                            "{{ if .Response }} {{ .Response }}{{ end }}",
                            {"[INST]", "[/INST]"}};
// Zephyr (TinyLlama-Chat too): "<|user|>\n{user}</s>\n<|assistant|>\n{answer}</s>\n", the roles as text; the
// end-of-turn token is the model's eos_token (its text written in for EOS below).
const Format kZephyr = {"zephyr",
                        "{{ if .System }}<|system|>\n{{ .System }}EOS\n{{ end }}{{ if .Prompt }}<|user|>\n{{ .Prompt }}"
                        "EOS\n{{ end }}<|assistant|>\n{{ .Response }}EOS\n",
                        {"<|system|>", "<|user|>", "<|assistant|>"}};
// DeepSeek-R1-Distill-Llama: "{system}<｜User｜>{user}<｜Assistant｜>{answer}<｜end▁of▁sentence｜>".
const Format kDeepSeekR1 = {
    "deepseek-r1",
    "{{ if .System }}{{ .System }}{{ end }}{{ if .Prompt }}<\uff5cUser\uff5c>{{ .Prompt }}{{ end }}"
    "<\uff5cAssistant\uff5c>{{ .Response }}<\uff5cend\u2581of\u2581sentence\uff5c>",
    {"<\uff5cbegin\u2581of\u2581sentence\uff5c>", "<\uff5cend\u2581of\u2581sentence\uff5c>", "<\uff5cUser\uff5c>",
     "<\uff5cAssistant\uff5c>"}};
const Format kChatML = {"chatml",
                        "{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
                        "{{ if .Prompt }}<|im_start|>user\n{{ .Prompt }}<|im_end|>\n{{ end }}"
                        "<|im_start|>assistant\n{{ .Response }}<|im_end|>\n",
                        {"<|im_start|>", "<|im_end|>"}};

// A Modelfile argument in double quotes (Ollama's parser takes \" and \\ escapes inside them).
std::string quoted(const std::string& s) {
  std::string out = "\"";
  for (char c : s) {
    if (c == '"' || c == '\\') out += '\\';
    out += c;
  }
  return out + "\"";
}

// A ChatML template's default system prompt: the literal text of a '<|im_start|>system\n...<|im_end|>' it renders
// when the conversation has no system message (Qwen2.5's "You are Qwen, created by Alibaba Cloud. ...", Qwen2's
// "You are a helpful assistant."); "" when it has none (Qwen3) or the text is not a literal.
std::string chatml_default_system(const std::string& jinja) {
  for (const char* open : {"<|im_start|>system\\n", "<|im_start|>system\n"}) {
    size_t pos = 0;
    while ((pos = jinja.find(open, pos)) != std::string::npos) {
      pos += std::string(open).size();
      const size_t end = jinja.find("<|im_end|>", pos);
      if (end == std::string::npos) break;
      const std::string text = jinja.substr(pos, end - pos);
      if (!text.empty() && text.find_first_of("'\"{}+\\\n") == std::string::npos) return text;
    }
  }
  return "";
}

}  // namespace

OllamaModelfile ollama_modelfile(const std::string& gguf_file, const std::string& chat_template,
                                 const std::string& eos_token) {
  const Format* f = nullptr;
  if (contains(chat_template, "<|start_header_id|>"))
    f = &kLlama3;
  else if (contains(chat_template, "<|im_start|>"))
    f = &kChatML;
  else if (contains(chat_template, "<\uff5cUser\uff5c>") &&
           contains(chat_template, "{{bos_token}}{{ns.system_prompt}}"))
    f = &kDeepSeekR1;
  else if (contains(chat_template, "<|user|>") && contains(chat_template, "<|assistant|>") &&
           contains(chat_template, "<|system|>") && contains(chat_template, "eos_token"))
    f = &kZephyr;
  else if (contains(chat_template, "[INST]"))
    f = contains(chat_template, "<<SYS>>")                                    ? &kLlama2
        : contains(chat_template, "loop.last and system_message is defined") ? &kMistralV03
                                                                             : &kMistral;

  OllamaModelfile m;
  m.format = f ? f->name : "none";
  m.text = "# Ollama Modelfile written by qlora-train export --gguf: `ollama create NAME -f Modelfile`\n";
  m.text += "FROM " + gguf_file + "\n";
  std::vector<std::string> stops;
  if (f) {
    std::string tmpl = f->tmpl;
    const std::string eos = eos_token.empty() ? "</s>" : eos_token;
    for (size_t at = tmpl.find("EOS"); f == &kZephyr && at != std::string::npos; at = tmpl.find("EOS", at + eos.size()))
      tmpl.replace(at, 3, eos);
    m.text += "TEMPLATE \"\"\"" + tmpl + "\"\"\"\n";
    // Ollama fills .System with SYSTEM when a conversation has none: the chat template's own default.
    if (f == &kChatML)
      if (const std::string system = chatml_default_system(chat_template); !system.empty())
        m.text += "SYSTEM " + quoted(system) + "\n";
    stops = f->stops;
  } else {
    m.text += "# No TEMPLATE: the model's chat_template is none of llama3, llama2, mistral, mistral-v0.3, zephyr, "
              "deepseek-r1, chatml\n";
  }
  if (!eos_token.empty() && std::find(stops.begin(), stops.end(), eos_token) == stops.end()) stops.push_back(eos_token);
  for (const auto& s : stops) m.text += "PARAMETER stop " + quoted(s) + "\n";
  return m;
}

OllamaModelfile ollama_modelfile(const std::string& gguf_file, const CustomChatFormat& f,
                                 const std::string& eos_token) {
  for (const auto& [key, text] : std::vector<std::pair<const char*, const std::string*>>{
           {"system_prefix", &f.system_prefix}, {"system_suffix", &f.system_suffix}, {"user_prefix", &f.user_prefix},
           {"user_suffix", &f.user_suffix}, {"assistant_prefix", &f.assistant_prefix},
           {"assistant_suffix", &f.assistant_suffix}, {"generation_prompt", &f.generation_prompt}})
    if (text->find("{{") != std::string::npos || text->find("\"\"\"") != std::string::npos)
      fail_key(ErrorKind::Usage, "chat_format.json", key,
               "holds {{ or \"\"\", which an Ollama Modelfile's TEMPLATE cannot hold as text");
  OllamaModelfile m;
  m.format = "custom";
  m.text = "# Ollama Modelfile written by qlora-train export --gguf: `ollama create NAME -f Modelfile`\n";
  m.text += "# TEMPLATE: the chat format the adapter was trained on (data.chat_format)\n";
  m.text += "FROM " + gguf_file + "\n";
  const std::string gen = f.generation_prompt.empty() ? f.assistant_prefix : f.generation_prompt;
  m.text += "TEMPLATE \"\"\"{{ if .System }}" + f.system_prefix + "{{ .System }}" + f.system_suffix + "{{ end }}" +
            "{{ if .Prompt }}" + f.user_prefix + "{{ .Prompt }}" + f.user_suffix + "{{ end }}" + gen +
            "{{ .Response }}" + f.assistant_suffix + "\"\"\"\n";
  if (!f.default_system.empty()) m.text += "SYSTEM " + quoted(f.default_system) + "\n";
  // Where an answer ends, and where a user's turn would begin.
  std::vector<std::string> stops;
  for (const std::string& s : {f.assistant_suffix, f.user_prefix}) {
    const size_t a = s.find_first_not_of(" \t\r\n"), b = s.find_last_not_of(" \t\r\n");
    if (a != std::string::npos) stops.push_back(s.substr(a, b - a + 1));
  }
  if (!eos_token.empty()) stops.push_back(eos_token);
  std::vector<std::string> unique;
  for (const auto& s : stops)
    if (std::find(unique.begin(), unique.end(), s) == unique.end()) unique.push_back(s);
  for (const auto& s : unique) m.text += "PARAMETER stop " + quoted(s) + "\n";
  return m;
}

}  // namespace qt
