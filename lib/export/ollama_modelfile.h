#pragma once
// The Ollama Modelfile written beside an exported GGUF (Ollama's docs/modelfile.md): FROM the file, a TEMPLATE in
// Ollama's Go-template syntax (.System, .Prompt, .Response) for the chat format the model's chat_template is, and
// PARAMETER stop lines for its end-of-turn and end-of-sequence tokens. The formats are those lib/data/chat_template
// renders (Llama 3, Llama 2, Mistral, ChatML), recognised from the Jinja source by the same distinctive markers; the
// Llama 3 and ChatML templates are Ollama's own library templates for those families. BOS is not in the templates:
// llama.cpp adds it as the GGUF's tokenizer.ggml.add_bos_token says.
#include <string>

#include "lib/data/data_config.h"

namespace qt {

struct OllamaModelfile {
  std::string text;
  std::string format;  // llama3, llama2, mistral, chatml, or "none" (no template recognised: FROM and stop only)
};

// `gguf_file`: the FROM path ("./model-f16.gguf"); `chat_template`: tokenizer_config.json's Jinja source ("" if
// none); `eos_token`: the EOS token's text ("" if none).
// A custom chat format's (data.chat_format): TEMPLATE of its prefixes and suffixes, its default system message as
// SYSTEM, stops at the answer's end and the user's turn.
OllamaModelfile ollama_modelfile(const std::string& gguf_file, const CustomChatFormat& format,
                                 const std::string& eos_token);

OllamaModelfile ollama_modelfile(const std::string& gguf_file, const std::string& chat_template,
                                 const std::string& eos_token);

}  // namespace qt
