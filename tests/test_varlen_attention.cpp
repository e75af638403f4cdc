// Varlen causal attention (lib/kernels/varlen_attention.h): the layout helper on qt::Batch rows, the plain-ATen
// reference against an independent dense-mask attention in float64 (the mask LlamaModel::forward_hidden builds
// today: same document, causal, padding sees itself), and on CUDA the flash path against the reference.
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "lib/core/error.h"
#include "lib/kernels/attention_core.h"
#include "lib/kernels/varlen_attention.h"
#include "tests/catch.h"
#include "tests/test_util.h"

namespace {

using qt::test::rel_err;

at::Tensor doc_ids_of(const std::vector<std::vector<int32_t>>& rows) {
  const int64_t B = static_cast<int64_t>(rows.size()), S = static_cast<int64_t>(rows[0].size());
  at::Tensor d = at::empty({B, S}, at::kInt);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < S; ++t) d[b][t] = rows[b][t];
  return d;
}

// Independent oracle on the [B, S] grid: explicit softmax(q k^T * scale + mask) v, float64, with the dense mask
// of LlamaModel::forward_hidden (token i sees j <= i of its own document; padding sees only itself) and an
// optional window (i - j < window). q [B, S, Hq, D], k/v [B, S, Hkv, D] -> [B, S, Hq, D].
at::Tensor dense_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           const at::Tensor& doc_ids, double scale, int64_t window) {
  const int64_t S = q.size(1), Hq = q.size(2), Hkv = k.size(2);
  at::Tensor doc = doc_ids.to(q.device(), at::kLong);
  at::Tensor same = doc.unsqueeze(2).eq(doc.unsqueeze(1));
  at::Tensor idx = at::arange(S, at::TensorOptions().device(q.device()).dtype(at::kLong));
  at::Tensor di = idx.unsqueeze(1) - idx.unsqueeze(0);
  at::Tensor eye = di.eq(0).unsqueeze(0);
  at::Tensor mask = ((same & di.ge(0).unsqueeze(0)) & doc.ge(0).unsqueeze(2)) | eye;
  if (window > 0) mask = mask & di.lt(window).unsqueeze(0);
  at::Tensor qh = q.to(at::kDouble).permute({0, 2, 1, 3});
  at::Tensor kh = k.to(at::kDouble).repeat_interleave(Hq / Hkv, 2).permute({0, 2, 1, 3});
  at::Tensor vh = v.to(at::kDouble).repeat_interleave(Hq / Hkv, 2).permute({0, 2, 1, 3});
  at::Tensor s = at::matmul(qh, kh.transpose(-1, -2)) * scale;
  s = s.masked_fill(mask.unsqueeze(1).logical_not(), -INFINITY);
  return at::matmul(at::softmax(s, -1), vh).permute({0, 2, 1, 3});
}

struct Grads {
  at::Tensor out, dq, dk, dv;
};

// Runs f on leaf copies of q, k, v (dtype dt, on q's device) and backpropagates <out, g>.
template <class F>
Grads run_with_grads(F f, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& g,
                     at::ScalarType dt) {
  at::Tensor ql = q.to(dt).detach().requires_grad_(true);
  at::Tensor kl = k.to(dt).detach().requires_grad_(true);
  at::Tensor vl = v.to(dt).detach().requires_grad_(true);
  at::Tensor out = f(ql, kl, vl);
  (out.to(at::kDouble) * g.to(at::kDouble)).sum().backward();
  return {out.detach(), ql.grad(), kl.grad(), vl.grad()};
}

struct Layout {
  std::string name;
  std::vector<std::vector<int32_t>> rows;
};

std::vector<int32_t> run_of(std::vector<std::pair<int32_t, int>> runs) {
  std::vector<int32_t> r;
  for (auto& [id, n] : runs) r.insert(r.end(), n, id);
  return r;
}

// Checks varlen (via the [B, S] -> varlen layout) against the dense oracle; fp32 on CPU.
void check_reference(const Layout& layout, int64_t Hq, int64_t Hkv, int64_t D, int64_t window) {
  INFO(layout.name << " Hq=" << Hq << " Hkv=" << Hkv << " D=" << D << " window=" << window);
  at::Tensor doc_ids = doc_ids_of(layout.rows);
  const int64_t B = doc_ids.size(0), S = doc_ids.size(1);
  at::manual_seed(7);
  at::Tensor q = at::randn({B, S, Hq, D}), k = at::randn({B, S, Hkv, D}), v = at::randn({B, S, Hkv, D});
  at::Tensor g = at::randn({B, S, Hq, D});
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));
  qt::VarlenLayout L = qt::cu_seqlens_from_doc_ids(doc_ids);
  auto varlen = [&](const at::Tensor& a, const at::Tensor& b, const at::Tensor& c) {
    return qt::varlen_causal_attention(a.reshape({B * S, Hq, D}), b.reshape({B * S, Hkv, D}),
                                       c.reshape({B * S, Hkv, D}), L.cu_seqlens, L.max_seqlen, scale, window)
        .view({B, S, Hq, D});
  };
  auto dense = [&](const at::Tensor& a, const at::Tensor& b, const at::Tensor& c) {
    return dense_attention(a, b, c, doc_ids, scale, window);
  };
  Grads x = run_with_grads(varlen, q, k, v, g, at::kFloat);
  Grads y = run_with_grads(dense, q, k, v, g, at::kDouble);
  CHECK(x.out.scalar_type() == at::kFloat);
  CHECK(rel_err(x.out, y.out) < 1e-5);
  CHECK(rel_err(x.dq, y.dq) < 1e-5);
  CHECK(rel_err(x.dk, y.dk) < 1e-5);
  CHECK(rel_err(x.dv, y.dv) < 1e-5);
}

}  // namespace

TEST_CASE("varlen layout from doc_ids: padding tokens are 1-token documents and rows never merge", "[varlen]") {
  at::Tensor d = doc_ids_of({{0, 0, 1, 1, 1, -1, -1}, {0, 0, 0, 0, 0, 0, 0}, {3, 3, 3, 4, 4, 4, 4}});
  qt::VarlenLayout L = qt::cu_seqlens_from_doc_ids(d);
  REQUIRE(L.cu_seqlens.scalar_type() == at::kInt);
  std::vector<int32_t> want{0, 2, 5, 6, 7, 14, 17, 21};
  REQUIRE(L.cu_seqlens.numel() == static_cast<int64_t>(want.size()));
  for (size_t i = 0; i < want.size(); ++i) CHECK(L.cu_seqlens[i].item<int32_t>() == want[i]);
  CHECK(L.max_seqlen == 7);
  CHECK(L.num_docs == 7);
  REQUIRE(L.token_index.numel() == 21);
  CHECK(L.token_index.equal(at::arange(21, at::kLong)));

  SECTION("two rows with the same doc id stay two documents") {
    qt::VarlenLayout M = qt::cu_seqlens_from_doc_ids(doc_ids_of({{0, 0, 0}, {0, 0, 0}}));
    CHECK(M.num_docs == 2);
    CHECK(M.max_seqlen == 3);
  }
  SECTION("a document that is not one contiguous run is an error") {
    bool threw = false;
    try {
      qt::cu_seqlens_from_doc_ids(doc_ids_of({{0, 0, 1, 0}}));
    } catch (const qt::Error&) {
      threw = true;
    }
    CHECK(threw);
  }
}

TEST_CASE("varlen reference equals dense-mask attention in outputs and gradients (fp32 CPU)", "[varlen]") {
  std::vector<Layout> layouts = {
      {"one long doc", {run_of({{0, 24}})}},
      {"many short docs and padding",
       {run_of({{0, 3}, {1, 1}, {2, 5}, {3, 2}, {4, 7}, {-1, 6}}), run_of({{0, 11}, {1, 9}, {-1, 4}})}},
      {"padding only at the end", {run_of({{0, 20}, {-1, 4}}), run_of({{0, 24}})}},
  };
  CHECK(!qt::varlen_attention_uses_flash(at::zeros({4, 2, 8})));
  for (const Layout& l : layouts) {
    SECTION("MHA " + l.name) { check_reference(l, 4, 4, 16, -1); }
    SECTION("GQA " + l.name) { check_reference(l, 8, 2, 16, -1); }
    SECTION("GQA sliding window " + l.name) { check_reference(l, 6, 3, 8, 4); }
    SECTION("window of one " + l.name) { check_reference(l, 2, 1, 8, 1); }
  }
}

TEST_CASE("varlen flash attention equals the reference in bf16 (outputs and gradients)", "[gpu][varlen]") {
  REQUIRE(at::hasCUDA());
  const auto cuda = at::TensorOptions().device(at::kCUDA);
  struct GpuLayout {
    std::string name;
    std::vector<int32_t> lengths;  // per document; negative: that many padding tokens (1-token documents)
  };
  std::vector<GpuLayout> layouts = {
      {"one long doc", {2048}},
      {"many short docs", {1, 7, 33, 64, 100, 128, 5, 300, 17, 211, 2, 64, 129, 250, 400, 339}},
      {"docs then padding", {700, 513, 331, -504}},
      {"two rows with padding", {1000, -24, 300, 600, 100, -24}},
  };
  struct Shape {
    int64_t Hq, Hkv, D, window;
  };
  std::vector<Shape> shapes = {{8, 8, 64, -1}, {8, 2, 64, -1}, {8, 2, 128, -1}, {4, 1, 128, -1}, {8, 2, 128, 256},
                               {8, 2, 64, 3}};  // a tiny window: an off-by-one in it would show
  for (const GpuLayout& l : layouts) {
    std::vector<int32_t> cu{0};
    int64_t max_len = 0;
    for (int32_t n : l.lengths) {
      const int reps = n < 0 ? -n : 1, len = n < 0 ? 1 : n;
      for (int r = 0; r < reps; ++r) {
        cu.push_back(cu.back() + len);
        max_len = std::max<int64_t>(max_len, len);
      }
    }
    const int64_t T = cu.back();
    at::Tensor cu_t = at::tensor(cu, at::kInt).to(at::kCUDA);
    for (const Shape& s : shapes) {
      for (at::ScalarType dt : {at::kBFloat16, at::kHalf}) {
        if (dt == at::kHalf && s.D != 128) continue;
        INFO(l.name << " T=" << T << " Hq=" << s.Hq << " Hkv=" << s.Hkv << " D=" << s.D << " window=" << s.window
                    << " dtype=" << at::toString(dt));
        at::manual_seed(11);
        at::Tensor q = at::randn({T, s.Hq, s.D}, cuda), k = at::randn({T, s.Hkv, s.D}, cuda);
        at::Tensor v = at::randn({T, s.Hkv, s.D}, cuda), g = at::randn({T, s.Hq, s.D}, cuda);
        // The oracle runs on the low-precision inputs upcast to fp32.
        q = q.to(dt).to(at::kFloat), k = k.to(dt).to(at::kFloat), v = v.to(dt).to(at::kFloat);
        const double scale = 1.0 / std::sqrt(static_cast<double>(s.D));
        REQUIRE(qt::varlen_attention_uses_flash(q.to(dt)));
        auto flash = [&](const at::Tensor& a, const at::Tensor& b, const at::Tensor& c) {
          return qt::varlen_causal_attention(a, b, c, cu_t, max_len, scale, s.window);
        };
        auto ref = [&](const at::Tensor& a, const at::Tensor& b, const at::Tensor& c) {
          return qt::varlen_causal_attention_reference(a, b, c, cu_t, max_len, scale, s.window);
        };
        Grads x = run_with_grads(flash, q, k, v, g, dt);
        Grads y = run_with_grads(ref, q, k, v, g, at::kFloat);
        CHECK(x.out.scalar_type() == dt);
        CHECK(x.dk.sizes() == k.sizes());
        const double eo = rel_err(x.out, y.out), eq = rel_err(x.dq, y.dq), ek = rel_err(x.dk, y.dk),
                     ev = rel_err(x.dv, y.dv);
        INFO("rel err out " << eo << " dq " << eq << " dk " << ek << " dv " << ev);
        std::printf("varlen flash %-22s T=%5lld Hq=%lld Hkv=%lld D=%3lld window=%4lld %s: out %.2e dq %.2e dk %.2e dv %.2e\n",
                    l.name.c_str(), (long long)T, (long long)s.Hq, (long long)s.Hkv, (long long)s.D,
                    (long long)s.window, at::toString(dt), eo, eq, ek, ev);
        CHECK(eo < 2e-2);
        CHECK(eq < 2e-2);
        CHECK(ek < 2e-2);
        CHECK(ev < 2e-2);
      }
    }
  }
}

// The dense causal node (the keep_attention path) on CUDA with grouped K/V: cuDNN takes the groups as they are on
// rows a multiple of 128 tokens with head_dim 64 or 128 and expands them elsewhere; FlashAttention-2 expands. Both
// against the float64 oracle, in the layout the model passes ([B, S, heads, D] transposed to [B, heads, S, D]).
TEST_CASE("dense causal attention with grouped K/V on CUDA equals the reference (cuDNN grouped or expanded, flash)",
          "[gpu][varlen]") {
  REQUIRE(at::hasCUDA());
  const at::TensorOptions cuda = at::TensorOptions().device(at::kCUDA);
  struct Shape {
    int64_t B, S, Hq, Hkv, D;
  };
  for (const Shape& s : {Shape{2, 128, 8, 2, 64}, Shape{1, 384, 8, 2, 128}, Shape{2, 256, 32, 8, 128},
                         Shape{2, 40, 4, 2, 16}, Shape{1, 100, 8, 2, 128}, Shape{1, 128, 4, 2, 16}})
    for (bool cudnn : {true, false}) {
      INFO("B=" << s.B << " S=" << s.S << " Hq=" << s.Hq << " Hkv=" << s.Hkv << " D=" << s.D
                << (cudnn ? " cuDNN" : " flash"));
      at::manual_seed(13);
      at::Tensor q = at::randn({s.B, s.S, s.Hq, s.D}, cuda).to(at::kBFloat16).to(at::kFloat);
      at::Tensor k = at::randn({s.B, s.S, s.Hkv, s.D}, cuda).to(at::kBFloat16).to(at::kFloat);
      at::Tensor v = at::randn({s.B, s.S, s.Hkv, s.D}, cuda).to(at::kBFloat16).to(at::kFloat);
      at::Tensor g = at::randn({s.B, s.S, s.Hq, s.D}, cuda);
      const double scale = 1.0 / std::sqrt(static_cast<double>(s.D));
      auto node = [&](const at::Tensor& a, const at::Tensor& b, const at::Tensor& c) {
        return qt::causal_attention(a.transpose(1, 2), b.transpose(1, 2), c.transpose(1, 2), scale, cudnn, nullptr)
            .transpose(1, 2);
      };
      const at::Tensor all = at::zeros({s.B, s.S}, at::kInt);
      auto oracle = [&](const at::Tensor& a, const at::Tensor& b, const at::Tensor& c) {
        return dense_attention(a, b, c, all, scale, -1);
      };
      Grads x = run_with_grads(node, q, k, v, g, at::kBFloat16);
      Grads y = run_with_grads(oracle, q, k, v, g, at::kDouble);
      CHECK(x.dk.sizes() == k.sizes());
      const double eo = rel_err(x.out, y.out), eq = rel_err(x.dq, y.dq), ek = rel_err(x.dk, y.dk),
                   ev = rel_err(x.dv, y.dv);
      std::printf("dense %s B=%lld S=%4lld Hq=%2lld Hkv=%lld D=%3lld: out %.2e dq %.2e dk %.2e dv %.2e\n",
                  cudnn ? "cuDNN" : "flash", (long long)s.B, (long long)s.S, (long long)s.Hq, (long long)s.Hkv,
                  (long long)s.D, eo, eq, ek, ev);
      CHECK(eo < 2e-2);
      CHECK(eq < 2e-2);
      CHECK(ek < 2e-2);
      CHECK(ev < 2e-2);
    }
}
