#pragma once
// The "data" section of the run config: which files, how records are read and rendered, how sequences are
// batched. Parsed and validated here once; defaults are written once, below.
#include <cstdint>
#include <string>
#include <vector>

#include "lib/core/json.h"

namespace qt {

enum class RecordFormat { Auto, Text, Alpaca, Chat, Completion, Preference, Unpaired, Tokenized };
// The built-in chat templates (lib/data/chat_template.h says which model's each is); auto: recognised from the
// tokenizer's chat_template.
// custom: the format data.chat_format spells out.
enum class ChatTemplateChoice {
  Auto, Llama3, Llama31, Llama2, Mistral, MistralV03, Zephyr, DeepSeekR1, ChatML, Qwen2, Qwen3, Qwen3Instruct, SmolLM2,
  Custom
};

// A chat format spelled out in the run config (data.chat_format, with data.chat_template "custom"), for a model
// whose template is none of the built-in ones: each message is its role's prefix, its content and its role's
// suffix; special-token strings in them become their tokens. An answer's targets are its content and the assistant
// suffix (its end of turn, where generation stops).
struct CustomChatFormat {
  bool bos = false;  // the conversation starts with BOS, as a template's {{ bos_token }}
  std::string system_prefix, system_suffix, user_prefix, user_suffix, assistant_prefix, assistant_suffix;
  std::string default_system;     // the system message where a conversation has none ("": none)
  std::string generation_prompt;  // what `generate` appends after the user's message ("": assistant_prefix)
  bool strip = false;             // contents stripped of white space at both ends (Jinja's trim)

  static CustomChatFormat from_json(const Json& object, const std::string& file);  // "data.chat_format.<key>"
  Json to_json() const;
  bool operator==(const CustomChatFormat& o) const { return to_json() == o.to_json(); }
};
// What happens to a training record longer than max_seq_len: cut to its first max_seq_len tokens, left out, or
// the run stops naming it.
enum class Truncation { Truncate, Drop, Error };

// How packing fills rows: InOrder lays the documents in the (shuffled) order, a document that does not fit starting
// the next row; BestFit first reorders each window of kBestFitWindow documents of that order so that next-fit packs
// them as best-fit decreasing would (packing.h: best_fit_order). Auto: BestFit for SFT with packing and shuffling
// (packs_best_fit), else InOrder.
enum class PackingStrategy { Auto, BestFit, InOrder };

// The longest row: 16M tokens, far beyond any LLaMA-family context (Qwen's 1M); rows x tokens of a plan then stay
// within 2^48 (train.batch_size is at most 2^24 rows), where the plan's products of them are exact.
constexpr int64_t kMaxSeqLen = int64_t{1} << 24;

struct DataConfig {
  std::string file;                          // the run config the section came from, for errors
  // jsonl, required: one file, or a list of them read one after another as one set of records (JSON: a string or
  // a list of strings). train_files holds them; train_file names them in messages (the one path, or "a.jsonl,
  // b.jsonl" for several).
  std::vector<std::string> train_files;
  std::string train_file;
  std::string eval_file;                     // jsonl, optional
  double eval_fraction = 0.0;                // held out of train_file when there is no eval_file; [0, 1)
  RecordFormat format = RecordFormat::Auto;  // auto: each record's keys decide
  ChatTemplateChoice chat_template = ChatTemplateChoice::Auto;  // auto: recognised from the tokenizer's template
  CustomChatFormat chat_format;  // chat_template custom's format
  int64_t max_seq_len = 2048;
  Truncation truncation = Truncation::Truncate;
  bool packing = true;  // several documents per row; false: one document per row, right-padded
  PackingStrategy packing_strategy = PackingStrategy::Auto;
  bool shuffle = true;
  uint64_t seed = 42;
  bool train_on_prompt = false;  // false: only answers (alpaca output, assistant turns) are in the loss
  bool add_eos = true;           // text records end with EOS, so that the model learns where a document stops
  // The key of a text record's text (TRL's dataset_text_field): {"content": ...} records with "content".
  std::string text_field = "text";
  // Not a key: set for train.objective "kto", which reads preference pairs as two unpaired records each (chosen
  // desirable, rejected undesirable), as TRL's unpair_preference_dataset does.
  bool unpair = false;

  // `section` is the run config's "data" object; `file` names the config in errors (key "data.<name>").
  // `complete` false: train_file may be absent (`config --print` of the defaults).
  static DataConfig from_json(const Json& section, const std::string& file, bool complete = true);
  // The section with every key (`qlora-train config --print`); from_json reads it back.
  Json to_json() const;
};

const char* record_format_name(RecordFormat format);
const char* chat_template_name(ChatTemplateChoice choice);
// Every data.chat_template value, "auto" first (the CLI's --chat-template choices).
std::vector<std::string> chat_template_names();
const char* truncation_name(Truncation truncation);
const char* packing_strategy_name(PackingStrategy strategy);
// Whether rows are packed best-fit: data.packing_strategy "best_fit", or "auto" with packing and shuffling on and
// an SFT run (`preference`: the records are preference pairs or KTO's, whose batches follow TRL's record order).
bool packs_best_fit(const DataConfig& config, bool preference);

}  // namespace qt
