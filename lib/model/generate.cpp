#include "lib/model/generate.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/grad_mode.h>

#include <algorithm>

#include "lib/core/error.h"

namespace qt {

int64_t choose_next_token(const at::Tensor& logits_row, const GenerateOptions& o, at::Generator& gen) {
  at::Tensor logits = logits_row.detach().to(at::kCPU, at::kFloat).reshape({-1});
  // (Greedy decoding of NaN logits printed token 0 every step with exit 0; sampling ended in an internal error.)
  if (!at::isfinite(logits).all().item<bool>())
    fail(ErrorKind::Numeric, "generate: the model's next-token logits hold NaN or infinite values (a broken model "
                             "directory or adapter: its weights, or the NF4 statistics of a pre-quantized one)");
  if (o.temperature == 0) return logits.argmax().item<int64_t>();
  const at::Tensor scaled = logits / o.temperature;
  // A temperature so small (1e-300) that the logits overflow float (softmax: NaN, multinomial: an internal error) is
  // the limit of sampling as the temperature goes to 0: greedy.
  if (!at::isfinite(scaled).all().item<bool>()) return logits.argmax().item<int64_t>();
  at::Tensor probs = at::softmax(scaled, 0);
  if (o.top_p < 1.0) {
    // transformers' TopPLogitsWarper: sort ascending, drop the tokens whose cumulative probability is
    // <= 1 - top_p, always keep the most likely one.
    auto [sorted, order] = probs.sort(/*dim=*/0, /*descending=*/false);
    at::Tensor cum = sorted.cumsum(0);
    at::Tensor drop = cum <= (1.0 - o.top_p);
    drop.index_put_({-1}, false);
    at::Tensor remove = at::zeros_like(drop).scatter_(0, order, drop);
    probs = probs.masked_fill(remove, 0.0);
    probs = probs / probs.sum();
  }
  return at::multinomial(probs, 1, /*replacement=*/false, gen).item<int64_t>();
}

GenerateResult generate_tokens(const LlamaModel& model, const std::vector<int32_t>& prompt, const GenerateOptions& o,
                               const std::function<void(int32_t)>& on_token) {
  if (prompt.empty()) fail(ErrorKind::Usage, "generate: the prompt encodes to no tokens");
  if (!(o.temperature >= 0)) fail(ErrorKind::Usage, "generate: --temperature must be >= 0");
  if (!(o.top_p > 0 && o.top_p <= 1)) fail(ErrorKind::Usage, "generate: --top-p must be in (0, 1]");
  if (o.max_new_tokens < 0) fail(ErrorKind::Usage, "generate: --max-new-tokens must be >= 0");
  if (o.max_seq_len > 0 && o.max_new_tokens > 0 && static_cast<int64_t>(prompt.size()) >= o.max_seq_len)
    fail(ErrorKind::Usage, "generate: the prompt is " + std::to_string(prompt.size()) + " tokens, and the model's context " +
                               "(config.json's max_position_embeddings) is " + std::to_string(o.max_seq_len) +
                               ": no token can follow it; shorten the prompt");
  for (int32_t id : prompt)
    if (id < 0 || id >= model.config.vocab_size)
      fail(ErrorKind::Model, "generate: the prompt holds token id " + std::to_string(id) + " and the model has " +
                                 std::to_string(model.config.vocab_size) + " embeddings (config.json's vocab_size): " +
                                 "the tokenizer and the model do not belong together");
  at::NoGradGuard no_grad;
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(o.seed);
  std::vector<int64_t> seq(prompt.begin(), prompt.end());
  GenerateResult r;
  for (int64_t step = 0; step < o.max_new_tokens; ++step) {
    if (o.max_seq_len > 0 && static_cast<int64_t>(seq.size()) >= o.max_seq_len) break;
    at::Tensor ids = at::tensor(seq, at::kLong).unsqueeze(0).to(model.device());
    at::Tensor hidden = model.forward_hidden(model.embed(ids));
    at::Tensor logits = model.logits(hidden.select(1, hidden.size(1) - 1)).squeeze(0);
    const auto next = static_cast<int32_t>(choose_next_token(logits, o, gen));
    seq.push_back(next);
    r.tokens.push_back(next);
    if (on_token) on_token(next);
    if (std::find(o.stop_ids.begin(), o.stop_ids.end(), next) != o.stop_ids.end()) {
      r.stopped = true;
      break;
    }
  }
  return r;
}

}  // namespace qt
