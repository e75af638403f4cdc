// Fused linear cross-entropy on the CPU (the plain-ATen chunked reference behind the autograd function),
// held to the full-logits path: at::cross_entropy_loss with sum reduction and autograd, fp32, 1e-5 relative.
#include <ATen/ATen.h>

#include <cmath>
#include <functional>

#include "lib/core/error.h"
#include "lib/kernels/fused_linear_ce.h"
#include "lib/kernels/streamed_linear_ce.h"
#include "tests/catch.h"
#include "tests/test_fused_ce_common.h"

namespace {

using qt::FusedLinearCeOptions;
using namespace qt::test_fused_ce;

constexpr double kTol = 1e-5;

struct Case {
  int64_t tokens = 37, hid = 24, vocab = 101;
  bool hidden_grad = true, weight_grad = true;
  int64_t ignore_every = 3;  // about one label in three ignored
  FusedLinearCeOptions options;
  // Builds the hidden state [T, H] from a leaf (a view of it, or the leaf itself).
  std::function<at::Tensor(const Case&)> make_hidden = [](const Case& c) {
    return at::randn({c.tokens, c.hid}).requires_grad_(c.hidden_grad);
  };
  std::function<void(at::Tensor&)> edit_labels = [](at::Tensor&) {};
};

void check_against_plain(const Case& c) {
  at::Tensor hidden = c.make_hidden(c);
  if (hidden.requires_grad()) hidden.retain_grad();  // the gradient w.r.t. the view, whatever the leaf is
  at::Tensor weight = (at::randn({c.vocab, c.hid}) * 0.3).requires_grad_(c.weight_grad);
  at::Tensor labels = random_labels(c.tokens, c.vocab, c.ignore_every, c.options.ignore_index, at::TensorOptions());
  c.edit_labels(labels);
  const PlainCe want = plain_cross_entropy(hidden, weight, labels, c.options, c.hidden_grad, c.weight_grad);

  auto [loss_sum, count] = qt::fused_linear_cross_entropy(hidden, weight, labels, c.options);
  REQUIRE(loss_sum.scalar_type() == at::kFloat);
  REQUIRE(loss_sum.dim() == 0);
  REQUIRE(count.item<int64_t>() == labels.ne(c.options.ignore_index).sum().item<int64_t>());
  REQUIRE(count.item<int64_t>() > 0);
  const double expect = want.loss.item<double>();
  CHECK(std::abs(loss_sum.item<double>() - expect) <= kTol * std::abs(expect));
  if (!c.hidden_grad && !c.weight_grad) {
    CHECK(!loss_sum.requires_grad());
    return;
  }
  loss_sum.backward();
  if (c.hidden_grad) {
    REQUIRE(hidden.grad().defined());
    REQUIRE(max_abs(want.dh) > 0);
    CHECK(rel_err(hidden.grad(), want.dh) <= kTol);
  }
  if (c.weight_grad) {
    REQUIRE(weight.grad().defined());
    REQUIRE(max_abs(want.dw) > 0);
    CHECK(rel_err(weight.grad(), want.dw) <= kTol);
  } else {
    CHECK(!weight.grad().defined());  // frozen: no dW computed, none handed to autograd
  }
}

}  // namespace

TEST_CASE("fused linear CE equals full-logits cross-entropy in loss, dh and dW", "[fused_ce]") {
  at::manual_seed(11);
  Case c;
  SECTION("ignored tokens, vocab and T not multiples of the chunk") {
    c.options.chunk_tokens = 8;  // 37 tokens: 4 full chunks and one of 5
    check_against_plain(c);
  }
  SECTION("an all-ignored chunk") {
    c.tokens = 40;
    c.options.chunk_tokens = 8;
    c.edit_labels = [](at::Tensor& y) { y.narrow(0, 8, 8).fill_(-100); };
    check_against_plain(c);
  }
  SECTION("a custom ignore index") {
    c.options.ignore_index = 7;
    c.options.chunk_tokens = 16;
    check_against_plain(c);
  }
  SECTION("hidden is a transposed view") {
    c.options.chunk_tokens = 8;
    c.make_hidden = [](const Case& k) { return at::randn({k.hid, k.tokens}).requires_grad_(true).t(); };
    check_against_plain(c);
  }
  SECTION("hidden is a column slice of a wider tensor") {
    c.options.chunk_tokens = 5;
    c.make_hidden = [](const Case& k) {
      return at::randn({k.tokens, 2 * k.hid + 3}).requires_grad_(true).narrow(1, 3, k.hid);
    };
    check_against_plain(c);
  }
  SECTION("frozen weight: dh only, weight.grad stays undefined") {
    c.weight_grad = false;
    c.options.chunk_tokens = 8;
    check_against_plain(c);
  }
  SECTION("frozen hidden: dW only") {
    c.hidden_grad = false;
    c.options.chunk_tokens = 8;
    check_against_plain(c);
  }
  SECTION("no gradients wanted: loss only") {
    c.hidden_grad = false;
    c.weight_grad = false;
    check_against_plain(c);
  }
  SECTION("automatic chunk, low-memory chunk") {
    c.tokens = 300;
    check_against_plain(c);
    c.options.low_memory = true;
    check_against_plain(c);
  }
  SECTION("label smoothing, z-loss and logit soft-capping") {
    c.options.chunk_tokens = 8;
    c.options.label_smoothing = 0.1;
    c.options.z_loss = 1e-3;
    c.options.logit_softcap = 3.0;  // logits here are O(1): a cap of 3 bends them noticeably
    check_against_plain(c);
  }
}

TEST_CASE("fused linear CE scales its stored gradients by grad_output", "[fused_ce]") {
  at::manual_seed(12);
  const int64_t tokens = 29, hid = 16, vocab = 53;
  FusedLinearCeOptions o;
  o.chunk_tokens = 7;
  at::Tensor hidden = at::randn({tokens, hid}).requires_grad_(true);
  at::Tensor weight = (at::randn({vocab, hid}) * 0.3).requires_grad_(true);
  const at::Tensor labels = random_labels(tokens, vocab, 4, o.ignore_index, at::TensorOptions());
  const PlainCe want = plain_cross_entropy(hidden, weight, labels, o, true, true);
  const double count = static_cast<double>(labels.ne(o.ignore_index).sum().item<int64_t>());
  REQUIRE(count > 0);

  SECTION("mean(): gradients divided by the count") {
    qt::fused_linear_cross_entropy(hidden, weight, labels, o).mean().backward();
    CHECK(rel_err(hidden.grad() * count, want.dh) <= kTol);
    CHECK(rel_err(weight.grad() * count, want.dw) <= kTol);
  }
  SECTION("a scaled sum, accumulated twice (gradient accumulation over micro-batches)") {
    for (int i = 0; i < 2; ++i) (qt::fused_linear_cross_entropy(hidden, weight, labels, o).loss_sum * 0.25).backward();
    CHECK(rel_err(hidden.grad() * 2.0, want.dh) <= kTol);
    CHECK(rel_err(weight.grad() * 2.0, want.dw) <= kTol);
  }
}

TEST_CASE("fused linear CE per token: each row's loss and, through any weights of them, dh as autograd's", "[fused_ce]") {
  at::manual_seed(13);
  const int64_t tokens = 31, hid = 16, vocab = 53;
  FusedLinearCeOptions o;
  o.chunk_tokens = 6;
  const at::Tensor hidden = at::randn({tokens, hid});
  const at::Tensor weight = at::randn({vocab, hid}) * 0.3;
  const at::Tensor labels = random_labels(tokens, vocab, 4, o.ignore_index, at::TensorOptions());
  REQUIRE(labels.eq(o.ignore_index).any().item<bool>());
  const at::Tensor g = at::randn({tokens});  // the incoming gradient of each row (DPO: a sequence's coefficient)
  // Autograd through the full logits, per token.
  at::Tensor h_ref = hidden.clone().requires_grad_(true);
  const at::Tensor rows_ref = at::cross_entropy_loss(at::matmul(h_ref, weight.t()), labels, {}, at::Reduction::None,
                                                     o.ignore_index);
  (rows_ref * g).sum().backward();
  at::Tensor h = hidden.clone().requires_grad_(true);
  const at::Tensor rows = qt::fused_linear_cross_entropy_rows(h, weight, labels, o);
  REQUIRE(rows.sizes() == rows_ref.sizes());
  CHECK(rel_err(rows, rows_ref.detach()) <= kTol);
  CHECK(rows.masked_select(labels.eq(o.ignore_index)).abs().max().item<double>() == 0.0);
  (rows * g).sum().backward();
  CHECK(rel_err(h.grad(), h_ref.grad()) <= kTol);
  // A trainable weight is refused (its gradient needs each token's weight before the sum over tokens).
  bool refused = false;
  try {
    qt::fused_linear_cross_entropy_rows(h, weight.clone().requires_grad_(true), labels, o);
  } catch (const qt::Error& e) {
    refused = std::string(e.what()).find("must be frozen") != std::string::npos;
  }
  CHECK(refused);
}

TEST_CASE("the streamed loss (weight in vocabulary slices, online log-sum-exp) equals full-logits cross-entropy in "
          "loss and dh", "[fused_ce]") {
  at::manual_seed(21);
  for (int64_t slice : {int64_t{16}, int64_t{101}, int64_t{0}}) {  // a short last slice, one slice, automatic
    INFO("vocab_slice " << slice);
    const int64_t tokens = 37, hid = 24, vocab = 101;
    FusedLinearCeOptions o;
    at::Tensor hidden = at::randn({tokens, hid}).requires_grad_(true);
    const at::Tensor weight = at::randn({vocab, hid}) * 0.3;
    const at::Tensor labels = random_labels(tokens, vocab, 3, o.ignore_index, at::TensorOptions());
    const PlainCe want = plain_cross_entropy(hidden, weight, labels, o, true, false);
    qt::StreamedLinearCeOptions so;
    so.vocab_slice = slice;
    at::Tensor loss = qt::streamed_linear_cross_entropy(hidden, weight, labels, so);
    CHECK(rel_err(loss, want.loss) <= kTol);
    (loss * 0.5).backward();
    CHECK(rel_err(hidden.grad() * 2.0, want.dh) <= kTol);
  }
  // Every label ignored: zero loss, zero gradient.
  at::Tensor hidden = at::randn({5, 8}).requires_grad_(true);
  at::Tensor loss = qt::streamed_linear_cross_entropy(hidden, at::randn({20, 8}), at::full({5}, -100, at::kLong));
  loss.backward();
  CHECK(loss.item<double>() == 0.0);
  CHECK(hidden.grad().abs().max().item<double>() == 0.0);
  // A label outside the vocabulary is named.
  at::Tensor labels = at::zeros({5}, at::kLong);
  labels[3] = 20;
  bool threw = false;
  try {
    qt::streamed_linear_cross_entropy(hidden, at::randn({20, 8}), labels);
  } catch (const qt::Error& e) {
    threw = true;
    CHECK(e.kind() == qt::ErrorKind::Data);
    CHECK(std::string(e.what()).find("token 3") != std::string::npos);
  }
  CHECK(threw);
}

TEST_CASE("fused linear CE rejects labels outside the vocabulary", "[fused_ce]") {
  at::manual_seed(13);
  const at::Tensor hidden = at::randn({10, 8});
  const at::Tensor weight = at::randn({20, 8});
  for (const int64_t bad : {int64_t{20}, int64_t{-5}}) {
    at::Tensor labels = random_labels(10, 20, 0, -100, at::TensorOptions());
    labels[6] = bad;
    bool threw = false;
    try {
      qt::fused_linear_cross_entropy(hidden, weight, labels);
    } catch (const qt::Error& e) {
      threw = true;
      CHECK(e.kind() == qt::ErrorKind::Data);
      CHECK(std::string(e.what()).find("token 6") != std::string::npos);
    }
    CHECK(threw);
  }
}

TEST_CASE("fused linear CE automatic chunk follows the memory rules", "[fused_ce]") {
  const int64_t vocab = 128256, bf16 = 2;
  FusedLinearCeOptions o;
  for (const auto& [t, h] : {std::pair<int64_t, int64_t>{8192, 2048}, {16384, 4096}, {4096, 8192}}) {
    // Token chunks, trainable: the [chunk, V] tile holds about as many elements as the hidden state [T, H]
    // (Liger's rule; next_pow2 may double it).
    o.schedule = qt::FusedCeSchedule::TokenChunks;
    o.low_memory = false;
    const int64_t chunk = qt::fused_linear_ce_chunk_tokens(t, h, vocab, true, o, bf16);
    CHECK(chunk * vocab <= 2 * (t * h + vocab));
    CHECK(2 * chunk * vocab >= t * h);
    o.low_memory = true;
    CHECK(qt::fused_linear_ce_chunk_tokens(t, h, vocab, true, o, bf16) * 4 == chunk);
    // Vocabulary tiles: pass 1's tile [chunk, V] fits in dW [V, H]; the last tile within 4% of the gradients.
    o.schedule = qt::FusedCeSchedule::VocabTiles;
    CHECK(qt::fused_linear_ce_chunk_tokens(t, h, vocab, true, o, bf16) == h);
    const int64_t last = qt::fused_linear_ce_last_tile_columns(t, h, vocab);
    CHECK(last % 64 == 0);
    CHECK(last >= 64);
    CHECK(25 * t * last <= vocab * h + t * h);
    // Frozen: the bf16 tile stays within 192 MiB, whatever the schedule asked for.
    o.low_memory = false;
    CHECK(qt::fused_linear_ce_schedule(t, h, vocab, false, o) == qt::FusedCeSchedule::TokenChunks);
    const int64_t frozen = qt::fused_linear_ce_chunk_tokens(t, h, vocab, false, o, bf16);
    CHECK(frozen * vocab * bf16 <= (int64_t{192} << 20));
    CHECK(frozen >= 64);
  }
  o.schedule = qt::FusedCeSchedule::TokenChunks;
  o.chunk_tokens = 100;
  CHECK(qt::fused_linear_ce_chunk_tokens(8192, 2048, vocab, true, o, bf16) == 100);
}

TEST_CASE("fused linear CE automatic schedule takes vocabulary tiles for low memory and many passes over dW",
          "[fused_ce]") {
  const int64_t vocab = 128256;
  FusedLinearCeOptions o;
  o.low_memory = true;
  CHECK(qt::fused_linear_ce_schedule(16384, 4096, vocab, true, o) == qt::FusedCeSchedule::VocabTiles);
  o.low_memory = false;
  // 8192 x 2048: 32 token chunks re-read dW 32 times, more than one more logits GEMM costs (measured on an H100,
  // docs/PERFORMANCE.md); 16384 x 4096: 32 passes over a dW twice as large but twice the tokens to recompute.
  CHECK(qt::fused_linear_ce_schedule(8192, 2048, vocab, true, o) == qt::FusedCeSchedule::VocabTiles);
  CHECK(qt::fused_linear_ce_schedule(16384, 4096, vocab, true, o) == qt::FusedCeSchedule::TokenChunks);
  o.schedule = qt::FusedCeSchedule::TokenChunks;
  CHECK(qt::fused_linear_ce_schedule(8192, 2048, vocab, true, o) == qt::FusedCeSchedule::TokenChunks);
}
