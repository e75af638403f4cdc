// Fused linear cross-entropy on CUDA: the tile kernel against ATen on the same logits, the whole bf16 path
// against the fp32 full-logits path on upcast inputs, and the extra memory it allocates. GPU only ([gpu]).
#include <ATen/ATen.h>

#include <cmath>
#include <cstdio>
#include <limits>
#include <string>

#include "lib/core/error.h"
#include "lib/kernels/fused_linear_ce.h"
#include "lib/kernels/streamed_linear_ce.h"
#include "tests/catch.h"
#include "tests/test_fused_ce_common.h"

#ifdef QT_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDACachingAllocator.h>

#include "lib/kernels/fused_linear_ce_kernel.h"
#endif

namespace {

using qt::FusedLinearCeOptions;
using namespace qt::test_fused_ce;

#ifdef QT_WITH_CUDA

const at::TensorOptions kCuda = at::TensorOptions().device(at::kCUDA);


struct AllocatorStats {
  int64_t current, peak;
};
AllocatorStats allocator_stats() {
  const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(c10::cuda::current_device());
  const auto& s = stats.allocated_bytes[static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE)];
  return {s.current, s.peak};
}

qt::kernels::CeTileDtype tile_dtype(at::ScalarType t) {
  if (t == at::kBFloat16) return qt::kernels::CeTileDtype::BF16;
  if (t == at::kHalf) return qt::kernels::CeTileDtype::F16;
  return qt::kernels::CeTileDtype::F32;
}

// Per-row loss and d(sum of losses)/d logits from ATen autograd in fp32 on the stored (rounded) logits.
std::pair<at::Tensor, at::Tensor> aten_rows(const at::Tensor& logits, const at::Tensor& labels,
                                            const FusedLinearCeOptions& o) {
  at::Tensor x = logits.detach().to(at::kFloat).requires_grad_(true);
  at::Tensor z = o.logit_softcap > 0 ? at::tanh(x / o.logit_softcap) * o.logit_softcap : x;
  at::Tensor loss = at::cross_entropy_loss(z, labels, {}, at::Reduction::None, o.ignore_index, o.label_smoothing);
  if (o.z_loss > 0) loss = loss + o.z_loss * at::logsumexp(z, 1).square() * labels.ne(o.ignore_index).to(at::kFloat);
  loss.sum().backward();
  return {loss.detach(), x.grad()};
}

#endif

}  // namespace

TEST_CASE("CUDA CE tile kernel equals ATen on the same logits (fp32, bf16, fp16; vector and scalar paths)",
          "[gpu][fused_ce]") {
  REQUIRE(at::hasCUDA());
#ifdef QT_WITH_CUDA
  at::manual_seed(21);
  const int64_t rows = 67;
  // (vocab, row stride): 16-byte path with 1024 threads, odd vocab (scalar path), padded rows with a scalar
  // tail after the vectors, and a small vocab on the 256-thread kernel.
  const std::vector<std::pair<int64_t, int64_t>> shapes = {{32064, 32064}, {5003, 5003}, {40001, 40008}, {999, 1000}};
  for (const at::ScalarType dtype : {at::kFloat, at::kBFloat16, at::kHalf}) {
    // Bounds: fp32 math in both; the kernel's __expf is a few ulp off expf; the gradient is then rounded to the
    // storage dtype (bf16: 8 bits of mantissa, fp16: 11).
    const double loss_tol = 1e-5;
    const double grad_tol = dtype == at::kFloat ? 1e-5 : dtype == at::kHalf ? 2e-3 : 8e-3;
    for (const auto& [vocab, ld] : shapes) {
      for (const bool extras : {false, true}) {
        FusedLinearCeOptions o;
        if (extras) {
          o.label_smoothing = 0.1;
          o.z_loss = 1e-3;
          o.logit_softcap = 15.0;
        }
        const at::Tensor full = (at::randn({rows, ld}, kCuda) * 4).to(dtype);
        const float sentinel = 1234.f;
        full.narrow(1, vocab, ld - vocab).fill_(sentinel);
        at::Tensor labels = random_labels(rows, vocab, 5, o.ignore_index, kCuda);
        labels.narrow(0, 0, 3).fill_(o.ignore_index);
        const auto [want_loss, want_grad] = aten_rows(full.narrow(1, 0, vocab), labels, o);

        qt::kernels::CeTileParams p;
        p.ignore_index = o.ignore_index;
        p.label_smoothing = static_cast<float>(o.label_smoothing);
        p.z_loss = static_cast<float>(o.z_loss);
        p.logit_softcap = static_cast<float>(o.logit_softcap);
        for (const bool write_grad : {false, true}) {
          at::Tensor x = full.clone();
          at::Tensor loss = at::full({rows}, std::numeric_limits<float>::quiet_NaN(), kCuda.dtype(at::kFloat));
          qt::kernels::ce_tile_loss_grad(x.data_ptr(), tile_dtype(dtype), rows, vocab, ld, labels.data_ptr<int64_t>(),
                                         loss.data_ptr<float>(), write_grad, p,
                                         at::cuda::getCurrentCUDAStream().stream());
          REQUIRE(at::isfinite(loss).all().item<bool>());
          const double loss_err = (loss - want_loss).abs().max().item<double>() / want_loss.abs().max().item<double>();
          CHECK(loss_err <= loss_tol);
          CHECK(x.narrow(1, vocab, ld - vocab).eq(sentinel).all().item<bool>());  // padding untouched
          if (write_grad) {
            REQUIRE(max_abs(want_grad) > 0);
            CHECK(rel_err(x.narrow(1, 0, vocab), want_grad) <= grad_tol);
            CHECK(x.narrow(0, 0, 3).narrow(1, 0, vocab).eq(0).all().item<bool>());  // ignored rows: zero gradient
          } else {
            CHECK(x.equal(full));
          }
        }
      }
    }
  }
#endif
}

TEST_CASE("CUDA CE tile kernel on its persistent grid (one CTA an SM, rows in turn) gives the default grid's bits",
          "[gpu][fused_ce]") {
  REQUIRE(at::hasCUDA());
#ifdef QT_WITH_CUDA
  at::manual_seed(22);
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  // Fewer rows than SMs (a row a CTA) and several rows a CTA with a partial last round; a vocabulary of 16-byte
  // vectors only and one with a scalar tail in padded rows; with and without the extras.
  for (const at::ScalarType dtype : {at::kBFloat16, at::kHalf, at::kFloat}) {
    for (const int64_t rows : {int64_t{67}, 3 * sms + 5}) {
      for (const auto& [vocab, ld] : std::vector<std::pair<int64_t, int64_t>>{{32064, 32064}, {40001, 40008}}) {
        INFO("dtype " << dtype << ", rows " << rows << ", vocab " << vocab);
        qt::kernels::CeTileParams p;
        if (rows > 100) {
          p.label_smoothing = 0.1f;
          p.z_loss = 1e-3f;
          p.logit_softcap = 15.f;
        }
        const at::Tensor full = (at::randn({rows, ld}, kCuda) * 4).to(dtype);
        at::Tensor labels = random_labels(rows, vocab, 5, p.ignore_index, kCuda);
        labels.narrow(0, 0, 3).fill_(p.ignore_index);
        labels.narrow(0, rows - 1, 1).fill_(vocab);  // out of range: NaN loss, zero gradient
        auto run = [&](bool resident) {
          p.resident = resident;
          at::Tensor x = full.clone();
          at::Tensor loss = at::full({rows}, -7.f, kCuda.dtype(at::kFloat));
          at::Tensor lse = at::full({rows}, -7.f, kCuda.dtype(at::kFloat));
          qt::kernels::ce_tile_loss_grad(x.data_ptr(), tile_dtype(dtype), rows, vocab, ld, labels.data_ptr<int64_t>(),
                                         loss.data_ptr<float>(), true, p, at::cuda::getCurrentCUDAStream().stream(),
                                         lse.data_ptr<float>());
          return std::make_tuple(x, loss, lse);
        };
        const auto [x0, loss0, lse0] = run(false);
        const auto [x1, loss1, lse1] = run(true);
        REQUIRE(std::isnan(loss1[rows - 1].item<float>()));
        CHECK(at::isfinite(loss1.narrow(0, 0, rows - 1)).all().item<bool>());
        CHECK(loss1.narrow(0, 0, rows - 1).equal(loss0.narrow(0, 0, rows - 1)));
        CHECK(lse1.equal(lse0));  // (ignored and bad rows left at -7 by both)
        CHECK(x1.equal(x0));
        CHECK(max_abs(x1.narrow(0, 3, rows - 4).narrow(1, 0, vocab)) > 0);
        CHECK(x1.narrow(0, rows - 1, 1).narrow(1, 0, vocab).eq(0).all().item<bool>());
      }
    }
  }
#endif
}

TEST_CASE("CUDA streamed loss with the weight in pinned host memory equals the fp32 full-logits path and the weight "
          "on the device", "[gpu][fused_ce]") {
  REQUIRE(at::hasCUDA());
  at::manual_seed(31);
  const at::Device cuda(at::kCUDA, 0);
  for (at::ScalarType dtype : {at::kBFloat16, at::kFloat}) {
    INFO(c10::toString(dtype));
    const int64_t tokens = 1000, hid = 512, vocab = 32003;
    FusedLinearCeOptions o;
    at::Tensor hidden = at::randn({tokens, hid}, at::TensorOptions().device(cuda)).to(dtype).requires_grad_(true);
    const at::Tensor weight = (at::randn({vocab, hid}) * 0.05).to(dtype);
    const at::Tensor labels = random_labels(tokens, vocab, 7, o.ignore_index, at::TensorOptions());
    const PlainCe want = plain_cross_entropy(hidden, weight.to(cuda), labels.to(cuda), o, true, false);
    const double tol = dtype == at::kFloat ? 1e-4 : 1e-2;
    std::vector<at::Tensor> got;
    for (const at::Tensor& w : {weight.pin_memory(), weight.to(cuda)}) {
      hidden.mutable_grad() = at::Tensor();
      qt::StreamedLinearCeOptions so;
      so.vocab_slice = 4096;  // 8 slices, a short last one: both staging buffers reused
      at::Tensor loss = qt::streamed_linear_cross_entropy(hidden, w, labels, so);
      loss.backward();
      CHECK(rel_err(loss, want.loss) <= tol);
      CHECK(rel_err(hidden.grad(), want.dh) <= tol);
      got.push_back(hidden.grad().clone());
    }
    CHECK(at::equal(got[0], got[1]));  // streamed from the host or read on the device: the same arithmetic
  }
}

TEST_CASE("CUDA streamed loss from the host gives the same bits call after call with large GEMMs in flight",
          "[gpu][fused_ce]") {
  // A slice's staging buffer comes from the compute stream's pool and may be the memory the previous pass (or
  // call) was still reading in a queued GEMM: the copy on the side stream must wait for that work. Large GEMMs keep
  // the compute stream busy while the copies are issued, so an unordered copy would change the result.
  REQUIRE(at::hasCUDA());
  at::manual_seed(37);
  const at::Device cuda(at::kCUDA, 0);
  const int64_t tokens = 8192, hid = 4096, vocab = 24000;
  const at::Tensor weight = (at::randn({vocab, hid}) * 0.02).to(at::kBFloat16).pin_memory();
  at::Tensor hidden = at::randn({tokens, hid}, at::TensorOptions().device(cuda)).to(at::kBFloat16);
  const at::Tensor labels = at::randint(0, vocab, {tokens}, at::TensorOptions().dtype(at::kLong));
  qt::StreamedLinearCeOptions so;
  so.vocab_slice = 4096;
  at::Tensor first_loss, first_grad;
  for (int rep = 0; rep < 6; ++rep) {
    INFO("call " << rep);
    at::Tensor h = hidden.detach().requires_grad_(true);
    at::Tensor loss = qt::streamed_linear_cross_entropy(h, weight, labels, so);
    loss.backward();
    REQUIRE(std::isfinite(loss.item<float>()));
    if (rep == 0) {
      first_loss = loss.detach().clone();
      first_grad = h.grad().clone();
      const at::Tensor on_device = qt::streamed_linear_cross_entropy(hidden, weight.to(cuda), labels, so);
      CHECK(at::equal(on_device, first_loss));
    } else {
      CHECK(at::equal(loss, first_loss));
      CHECK(at::equal(h.grad(), first_grad));
    }
  }
}

TEST_CASE("CUDA fused linear CE equals the fp32 full-logits path on upcast inputs", "[gpu][fused_ce]") {
  REQUIRE(at::hasCUDA());
#ifdef QT_WITH_CUDA
  at::manual_seed(22);
  struct Case {
    const char* name;
    int64_t tokens, hid, vocab, chunk;
    at::ScalarType dtype;
    bool transposed, weight_grad, all_ignored_chunk, extras;
    bool overlap_dw = true;
    int64_t ignore_every = 7;  // 0: every token counted (no gathering of rows)
  };
  const std::vector<Case> cases = {
      {"bf16, ignored tokens, T and V not multiples of the chunk", 300, 256, 32064, 64, at::kBFloat16, false, true,
       false, false},
      {"bf16, odd vocab (scalar kernel path), an all-ignored chunk", 300, 256, 5003, 64, at::kBFloat16, false, true,
       true, false},
      {"bf16, transposed hidden", 300, 256, 32064, 64, at::kBFloat16, true, true, false, false},
      {"bf16, frozen weight", 300, 256, 32064, 64, at::kBFloat16, false, false, false, false},
      {"bf16, automatic chunk", 1000, 256, 32064, 0, at::kBFloat16, false, true, false, false},
      {"bf16, label smoothing, z-loss, soft-cap", 300, 256, 32064, 64, at::kBFloat16, false, true, false, true},
      {"bf16, dW on the main stream (no overlap)", 300, 256, 32064, 64, at::kBFloat16, false, true, true, false, false},
      {"fp16", 300, 256, 32064, 64, at::kHalf, false, true, false, false},
      {"fp32 (tight bounds)", 300, 256, 32064, 64, at::kFloat, false, true, true, true},
      {"bf16, every token counted", 300, 256, 32064, 64, at::kBFloat16, false, true, false, false, true, 0},
      {"bf16, every token counted, frozen weight", 300, 256, 32064, 64, at::kBFloat16, false, false, false, false, true,
       0},
      {"fp32, every token counted, transposed hidden", 300, 256, 32064, 64, at::kFloat, true, true, false, true, true,
       0},
  };
  // Trainable weight: both schedules; vocabulary tiles also with small slices (many slices in dW's unwritten rows,
  // then the last tile).
  struct Schedule {
    qt::FusedCeSchedule schedule;
    int64_t vocab_tile;
    const char* name;
  };
  const std::vector<Schedule> schedules = {{qt::FusedCeSchedule::TokenChunks, 0, "token chunks"},
                                           {qt::FusedCeSchedule::VocabTiles, 0, "vocabulary tiles"},
                                           {qt::FusedCeSchedule::VocabTiles, 512, "vocabulary tiles of 512"}};
  // Labels on the device, and on the host (counted and located there: the trainer's path).
  for (const Case& c : cases)
    for (const Schedule& sched : schedules)
      for (const bool host_labels : {false, true}) {
        if (!c.weight_grad && sched.schedule == qt::FusedCeSchedule::VocabTiles) continue;
        std::printf("case: %s, %s, labels on the %s\n", c.name, sched.name, host_labels ? "host" : "device");
        FusedLinearCeOptions o;
        o.schedule = sched.schedule;
        o.vocab_tile = sched.vocab_tile;
        o.chunk_tokens = c.chunk;
        o.overlap_dw = c.overlap_dw;
        o.resident_tiles = host_labels ? 1 : 0;  // the tile kernel's persistent grid on the trainer's path
        if (c.extras) {
          o.label_smoothing = 0.1;
          o.z_loss = 1e-4;
          o.logit_softcap = 30.0;
        }
        const at::Tensor leaf = c.transposed ? at::randn({c.hid, c.tokens}, kCuda).to(c.dtype)
                                             : at::randn({c.tokens, c.hid}, kCuda).to(c.dtype);
        at::Tensor leaf_var = leaf.clone().requires_grad_(true);
        at::Tensor hidden = c.transposed ? leaf_var.t() : leaf_var;
        hidden.retain_grad();
        // Scaled so logits are O(3): softmax neither one-hot nor flat.
        at::Tensor weight = (at::randn({c.vocab, c.hid}, kCuda) * (3.0 / std::sqrt(double(c.hid)))).to(c.dtype);
        weight.requires_grad_(c.weight_grad);
        at::Tensor labels = random_labels(c.tokens, c.vocab, c.ignore_every, o.ignore_index, kCuda);
        if (c.all_ignored_chunk) labels.narrow(0, 64, 64).fill_(o.ignore_index);
        const PlainCe want = plain_cross_entropy(hidden, weight, labels, o, true, c.weight_grad);

        qt::test::poison_allocator_cache(at::Device(at::kCUDA, 0));
        auto [loss_sum, count] = qt::fused_linear_cross_entropy(hidden, weight, host_labels ? labels.cpu() : labels, o);
        loss_sum.backward();
        const bool fp32 = c.dtype == at::kFloat;
        const double loss_tol = fp32 ? 1e-5 : 1e-3, grad_tol = fp32 ? 1e-4 : 2e-2;
        const double loss_err =
            std::abs(loss_sum.item<double>() - want.loss.item<double>()) / std::abs(want.loss.item<double>());
        std::printf("  loss rel err %.2e", loss_err);
        CHECK(loss_err <= loss_tol);
        CHECK(count.item<int64_t>() == labels.ne(o.ignore_index).sum().item<int64_t>());
        REQUIRE(hidden.grad().defined());
        REQUIRE(hidden.grad().scalar_type() == c.dtype);
        REQUIRE(max_abs(want.dh) > 0);
        const double dh_err = rel_err(hidden.grad(), want.dh);
        std::printf("  dh rel err %.2e", dh_err);
        CHECK(dh_err <= grad_tol);
        if (c.weight_grad) {
          REQUIRE(weight.grad().defined());
          REQUIRE(max_abs(want.dw) > 0);
          const double dw_err = rel_err(weight.grad(), want.dw);
          std::printf("  dW rel err %.2e", dw_err);
          CHECK(dw_err <= grad_tol);
        } else {
          CHECK(!weight.grad().defined());
        }
        std::printf("\n");
      }
#endif
}

TEST_CASE("CUDA fused linear CE per token: rows and dh through any weights of them as the fp32 full-logits path",
          "[gpu][fused_ce][dpo]") {
  REQUIRE(at::hasCUDA());
#ifdef QT_WITH_CUDA
  at::manual_seed(23);
  const int64_t tokens = 300, hid = 256, vocab = 32064;
  for (const at::ScalarType dtype : {at::kFloat, at::kBFloat16})
    for (const bool host_labels : {false, true}) {
      FusedLinearCeOptions o;
      o.chunk_tokens = 64;
      const at::Tensor h0 = at::randn({tokens, hid}, kCuda).to(dtype);
      const at::Tensor weight = (at::randn({vocab, hid}, kCuda) * (3.0 / std::sqrt(double(hid)))).to(dtype);
      const at::Tensor labels = random_labels(tokens, vocab, 7, o.ignore_index, kCuda);
      const at::Tensor g = at::randn({tokens}, kCuda);  // each row's incoming gradient (DPO: its sequence's weight)
      at::Tensor h_ref = h0.to(at::kFloat).clone().requires_grad_(true);  // (a copy: in fp32, to() is h0 itself)
      const at::Tensor rows_ref = at::cross_entropy_loss(at::matmul(h_ref, weight.to(at::kFloat).t()), labels, {},
                                                         at::Reduction::None, o.ignore_index);
      (rows_ref * g).sum().backward();
      at::Tensor h = h0.clone().requires_grad_(true);
      qt::test::poison_allocator_cache(at::Device(at::kCUDA, 0));
      const at::Tensor rows = qt::fused_linear_cross_entropy_rows(h, weight, host_labels ? labels.cpu() : labels, o);
      REQUIRE(rows.scalar_type() == at::kFloat);
      const bool fp32 = dtype == at::kFloat;
      const double rows_err = rel_err(rows, rows_ref.detach());
      CHECK(rows_err <= (fp32 ? 1e-5 : 1e-2));
      CHECK(rows.masked_select(labels.eq(o.ignore_index)).abs().max().item<double>() == 0.0);
      (rows * g).sum().backward();
      REQUIRE(h.grad().defined());
      const double dh_err = rel_err(h.grad(), h_ref.grad());
      std::printf("per token, %s, labels on the %s: rows rel err %.2e, dh rel err %.2e\n", fp32 ? "fp32" : "bf16",
                  host_labels ? "host" : "device", rows_err, dh_err);
      CHECK(dh_err <= (fp32 ? 1e-4 : 2e-2));
    }
#endif
}

TEST_CASE("CUDA fused linear CE allocates no more than one tile plus the gradients under both schedules",
          "[gpu][fused_ce]") {
  REQUIRE(at::hasCUDA());
#ifdef QT_WITH_CUDA
  at::manual_seed(23);
  const int64_t tokens = 4096, hid = 1024, vocab = 32000, bf16 = 2;
  const at::Tensor hidden0 = at::randn({tokens, hid}, kCuda).to(at::kBFloat16);
  const at::Tensor weight0 = (at::randn({vocab, hid}, kCuda) * 0.1).to(at::kBFloat16);
  const at::Tensor labels = random_labels(tokens, vocab, 7, -100, kCuda);
  for (const bool trainable : {true, false}) {
    for (const auto schedule : {qt::FusedCeSchedule::Auto, qt::FusedCeSchedule::TokenChunks}) {
      for (const bool low_memory : {false, true}) {
        if (!trainable && schedule != qt::FusedCeSchedule::Auto) continue;
        FusedLinearCeOptions o;
        o.low_memory = low_memory;
        o.schedule = schedule;
        at::Tensor hidden = hidden0.clone().requires_grad_(true);
        at::Tensor weight = weight0.clone().requires_grad_(trainable);
        auto step = [&] { qt::fused_linear_cross_entropy(hidden, weight, labels, o).loss_sum.backward(); };
        step();  // warm-up: cuBLAS workspaces come from the caching allocator once per stream
        hidden.mutable_grad().reset();
        if (trainable) weight.mutable_grad().reset();
        at::cuda::device_synchronize();
        c10::cuda::CUDACachingAllocator::resetPeakStats(c10::cuda::current_device());
        const AllocatorStats before = allocator_stats();
        step();
        at::cuda::device_synchronize();
        const AllocatorStats after = allocator_stats();
        const bool by_vocab =
            qt::fused_linear_ce_schedule(tokens, hid, vocab, trainable, o) == qt::FusedCeSchedule::VocabTiles;
        const int64_t chunk =
            std::min(tokens, qt::fused_linear_ce_chunk_tokens(tokens, hid, vocab, trainable, o, bf16));
        // Vocabulary tiles: pass 1's tile lives in dW, and only the last slices have a tile of their own.
        const int64_t tile =
            by_vocab ? tokens * qt::fused_linear_ce_last_tile_columns(tokens, hid, vocab) * bf16 : chunk * vocab * bf16;
        const int64_t dh = tokens * hid * bf16, dw = trainable ? vocab * hid * bf16 : 0;
        // Vocabulary tiles without low_memory: pass 2 reads the counted rows gathered once (at most T x H).
        const int64_t gathered = by_vocab && !low_memory ? tokens * hid * bf16 : 0;
        const int64_t slack = int64_t{2} << 20;  // per-token losses and log-sum-exps, label checks, 0-dim results
        const int64_t extra = after.peak - before.current;
        const int64_t bound = tile + gathered + dh + dw + slack;
        std::printf(
            "trainable %d schedule %d low_memory %d: by vocabulary %d, chunk %lld, extra %.1f MiB, bound %.1f MiB\n",
            int(trainable), int(schedule), int(low_memory), int(by_vocab), static_cast<long long>(chunk),
            extra / 1048576.0, bound / 1048576.0);
        CHECK(extra >= dh + dw);  // the gradients themselves are held: a sanity check of the measurement
        CHECK(extra <= bound);
        if (by_vocab && low_memory) CHECK(extra * 100 <= (dh + dw) * 105);  // the promise of low_memory
      }
    }
  }
#endif
}

TEST_CASE("CUDA fused linear CE with every label ignored gives zero loss and zero gradients", "[gpu][fused_ce]") {
  REQUIRE(at::hasCUDA());
#ifdef QT_WITH_CUDA
  for (const auto schedule : {qt::FusedCeSchedule::TokenChunks, qt::FusedCeSchedule::VocabTiles})
    for (const bool host_labels : {false, true}) {
      INFO("labels on the " << (host_labels ? "host" : "device"));
      FusedLinearCeOptions o;
      o.schedule = schedule;
      at::Tensor hidden = at::randn({50, 64}, kCuda).to(at::kBFloat16).requires_grad_(true);
      at::Tensor weight = at::randn({1000, 64}, kCuda).to(at::kBFloat16).requires_grad_(true);
      const at::Tensor labels = at::full({50}, o.ignore_index, host_labels ? at::TensorOptions() : kCuda).to(at::kLong);
      qt::test::poison_allocator_cache(at::Device(at::kCUDA, 0));
      auto [loss_sum, count] = qt::fused_linear_cross_entropy(hidden, weight, labels, o);
      loss_sum.backward();
      CHECK(loss_sum.item<float>() == 0.f);
      CHECK(count.item<int64_t>() == 0);
      CHECK(hidden.grad().eq(0).all().item<bool>());
      CHECK(weight.grad().eq(0).all().item<bool>());
    }
#endif
}

TEST_CASE("CUDA fused linear CE names a bad label on the device and on the host", "[gpu][fused_ce]") {
  REQUIRE(at::hasCUDA());
#ifdef QT_WITH_CUDA
  at::manual_seed(23);
  const at::Tensor hidden = at::randn({40, 32}, kCuda).to(at::kBFloat16);
  const at::Tensor weight = at::randn({300, 32}, kCuda).to(at::kBFloat16);
  for (const bool host_labels : {false, true})
    for (const int64_t bad : {int64_t{300}, int64_t{-7}}) {
      INFO("labels on the " << (host_labels ? "host" : "device") << ", label " << bad);
      at::Tensor labels = random_labels(40, 300, 5, -100, at::TensorOptions());
      labels[17] = bad;
      bool threw = false;
      try {
        qt::fused_linear_cross_entropy(hidden, weight, host_labels ? labels : labels.to(at::kCUDA));
      } catch (const qt::Error& e) {
        threw = true;
        CHECK(e.kind() == qt::ErrorKind::Data);
        CHECK(std::string(e.what()).find("label " + std::to_string(bad) + " of token 17") != std::string::npos);
      }
      CHECK(threw);
    }
#endif
}
