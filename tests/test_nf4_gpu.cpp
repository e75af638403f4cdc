// NF4 CUDA kernel (lib/kernels/nf4_dequant.cu) against its plain-ATen reference, run on the GPU; and the
// quantizer on CUDA against the quantizer on the CPU. Tagged [gpu]: scripts/gpu-check.sh runs them.
#include <ATen/ATen.h>

#include <cmath>
#include <string>
#include <vector>

#include "lib/core/error.h"
#include "lib/kernels/nf4_dequant.h"
#include "lib/kernels/nf4_format.h"
#include "lib/kernels/nf4_gemm.h"
#include "lib/quant/nf4.h"
#include "tests/catch.h"
#include "tests/test_util.h"

#ifdef QT_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace {

using qt::test::same_bits;

void require_cuda() {
  REQUIRE(at::hasCUDA());
  REQUIRE(qt::kernels::nf4_cuda_compiled());
}

// Random packed codes and statistics (every code and every nested code appears), on the GPU.
qt::kernels::Nf4Data random_nf4(int64_t rows, int64_t cols, int64_t blocksize = 64) {
  const auto u8 = at::TensorOptions().dtype(at::kByte).device(at::kCUDA);
  const auto f32 = at::TensorOptions().dtype(at::kFloat).device(at::kCUDA);
  qt::kernels::Nf4Data d;
  d.numel = rows * cols;
  d.blocksize = blocksize;
  const int64_t blocks = qt::kernels::nf4_blocks(d.numel, blocksize);
  d.packed = at::randint(0, 256, {qt::kernels::nf4_packed_bytes(d.numel)}, u8);
  d.absmax_q = at::randint(0, 256, {blocks}, u8);
  d.nested_absmax = at::rand({(blocks + 255) / 256}, f32).mul_(0.05).add_(0.005);
  d.nested_map = qt::kernels::dynamic_map_tensor().to(at::kCUDA);
  d.quant_map = qt::kernels::nf4_code_tensor().to(at::kCUDA);
  d.offset = 0.0371f;
  return d;
}

const std::vector<std::pair<int64_t, int64_t>> kShapes = {{2048, 2048},  {4096, 4096}, {14336, 4096},
                                                          {4096, 14336}, {1024, 4096}, {128256, 4096}};

}  // namespace

TEST_CASE("CUDA NF4 dequant equals the ATen reference bit for bit, bf16 fp16 fp32, poisoned outputs", "[gpu][nf4]") {
  require_cuda();
  at::manual_seed(1);
  for (const auto& [rows, cols] : kShapes) {
    const qt::kernels::Nf4Data d = random_nf4(rows, cols);
    for (auto dtype : {at::kBFloat16, at::kHalf, at::kFloat}) {
      if (dtype == at::kFloat && rows * cols > (int64_t{1} << 28)) continue;  // 128256x4096 fp32: 2 GB + ref temps
      INFO(rows << "x" << cols << " " << c10::toString(dtype));
      at::Tensor out = at::full({rows, cols}, NAN, at::TensorOptions().dtype(dtype).device(at::kCUDA));
      qt::kernels::nf4_dequant_into(d, out);
      at::Tensor ref = qt::kernels::nf4_dequant_ref(d, dtype);
      CHECK(same_bits(out.reshape({-1}), ref));
      CHECK(out.isfinite().all().item<bool>());
    }
  }
}

TEST_CASE("CUDA NF4 dequant of quantized weights equals the reference, blocksize 64 and 256", "[gpu][nf4]") {
  require_cuda();
  at::manual_seed(2);
  for (int64_t bs : {64, 256}) {
    at::Tensor w = at::randn({4096, 1024}, at::TensorOptions().device(at::kCUDA)).mul_(0.02).to(at::kBFloat16);
    const qt::Nf4Weight q = qt::quantize_nf4(w, bs);
    at::Tensor out = at::full({4096, 1024}, NAN, w.options());
    q.dequantize_into(out);
    CHECK(same_bits(out.reshape({-1}), qt::kernels::nf4_dequant_ref(q.data, at::kBFloat16)));
  }
}

TEST_CASE("CUDA NF4 dequant runs on the caller's non-default stream and is CUDA-graph capturable", "[gpu][nf4]") {
  require_cuda();
#ifdef QT_WITH_CUDA
  at::manual_seed(3);
  const qt::kernels::Nf4Data d = random_nf4(4096, 4096);
  at::Tensor ref = qt::kernels::nf4_dequant_ref(d, at::kBFloat16);
  at::Tensor out = at::full({4096 * 4096}, NAN, at::TensorOptions().dtype(at::kBFloat16).device(at::kCUDA));
  c10::cuda::getCurrentCUDAStream().synchronize();
  c10::cuda::CUDAStream side = c10::cuda::getStreamFromPool();
  REQUIRE(side != c10::cuda::getDefaultCUDAStream());
  {
    c10::cuda::CUDAStreamGuard guard(side);
    qt::kernels::nf4_dequant_into(d, out);
    side.synchronize();
    CHECK(same_bits(out, ref));
    // Captured on the side stream: a launch onto any other stream (the legacy default one) would fail the
    // capture, so a replay that rewrites the poisoned buffer proves the kernel used the current stream.
    at::cuda::CUDAGraph graph;
    graph.capture_begin();
    qt::kernels::nf4_dequant_into(d, out);
    graph.capture_end();
    out.fill_(NAN);
    graph.replay();
    side.synchronize();
    CHECK(same_bits(out, ref));
  }
#endif
}

TEST_CASE("one grouped launch dequantizes q, k, v like three single launches", "[gpu][nf4]") {
  require_cuda();
  at::manual_seed(4);
  const qt::kernels::Nf4Data q = random_nf4(4096, 4096), k = random_nf4(1024, 4096), v = random_nf4(1024, 4096);
  const auto bf16 = at::TensorOptions().dtype(at::kBFloat16).device(at::kCUDA);
  std::vector<at::Tensor> outs = {at::full({4096, 4096}, NAN, bf16), at::full({1024, 4096}, NAN, bf16),
                                  at::full({1024, 4096}, NAN, bf16)};
  qt::kernels::nf4_dequant_group_into({&q, &k, &v}, outs);
  CHECK(same_bits(outs[0].reshape({-1}), qt::kernels::nf4_dequant_ref(q, at::kBFloat16)));
  CHECK(same_bits(outs[1].reshape({-1}), qt::kernels::nf4_dequant_ref(k, at::kBFloat16)));
  CHECK(same_bits(outs[2].reshape({-1}), qt::kernels::nf4_dequant_ref(v, at::kBFloat16)));
}

TEST_CASE("grouped NF4 dequantization into the first columns of a wider matrix leaves the other columns alone",
          "[gpu][nf4]") {
  require_cuda();
  at::manual_seed(5);
  // gate and up of a small model side by side, 24 more columns (a LoRA B block, poisoned here) in every row.
  const qt::kernels::Nf4Data g = random_nf4(3072, 2048), u = random_nf4(1024, 2048);
  for (const at::ScalarType dtype : {at::kBFloat16, at::kHalf, at::kFloat}) {
    INFO(c10::toString(dtype));
    const at::Tensor wide = at::full({4096, 2048 + 24}, NAN, at::TensorOptions().dtype(dtype).device(at::kCUDA));
    const std::vector<at::Tensor> outs = {wide.narrow(0, 0, 3072).narrow(1, 0, 2048),
                                          wide.narrow(0, 3072, 1024).narrow(1, 0, 2048)};
    qt::kernels::nf4_dequant_group_into({&g, &u}, outs);
    CHECK(same_bits(outs[0].contiguous().reshape({-1}), qt::kernels::nf4_dequant_ref(g, dtype)));
    CHECK(same_bits(outs[1].contiguous().reshape({-1}), qt::kernels::nf4_dequant_ref(u, dtype)));
    CHECK(wide.narrow(1, 2048, 24).isnan().all().item<bool>());
  }
  // Columns that are not a multiple of 1024 (a warp would straddle two rows) are refused.
  const qt::kernels::Nf4Data d = random_nf4(64, 512);
  at::Tensor wide = at::zeros({64, 512 + 8}, at::TensorOptions().dtype(at::kBFloat16).device(at::kCUDA));
  bool threw = false;
  try {
    qt::kernels::nf4_dequant_into(d, wide.narrow(1, 0, 512));
  } catch (const qt::Error& e) {
    threw = std::string(e.what()).find("multiple of 1024") != std::string::npos;
  }
  CHECK(threw);
  CHECK(wide.eq(0).all().item<bool>());
}

TEST_CASE("misaligned output buffers are refused by the launch, written through a staging buffer by the tensor call",
          "[gpu][nf4]") {
  require_cuda();
  const qt::kernels::Nf4Data d = random_nf4(64, 64);
  at::Tensor buf = at::zeros({64 * 64 + 8}, at::TensorOptions().dtype(at::kBFloat16).device(at::kCUDA));
  at::Tensor out = buf.slice(0, 1, 1 + 64 * 64);  // 2-byte offset
  qt::kernels::Nf4DequantJob job;
  job.packed = d.packed.data_ptr<uint8_t>();
  job.absmax_q = d.absmax_q.data_ptr<uint8_t>();
  job.nested_absmax = d.nested_absmax.data_ptr<float>();
  job.nested_map = d.nested_map.data_ptr<float>();
  job.quant_map = d.quant_map.data_ptr<float>();
  job.numel = d.numel;
  job.out = out.data_ptr();
  bool threw = false;
  try {
    qt::kernels::nf4_dequant_launch(&job, 1, qt::kernels::Nf4OutType::BFloat16, nullptr);
  } catch (const qt::Error& e) {
    threw = std::string(e.what()).find("aligned") != std::string::npos;
  }
  CHECK(threw);
  CHECK(buf.eq(0).all().item<bool>());
  qt::kernels::nf4_dequant_into(d, out);
  CHECK(same_bits(out, qt::kernels::nf4_dequant_ref(d, at::kBFloat16)));
  CHECK(buf[0].item<float>() == 0.0f);
  CHECK(buf.slice(0, 1 + 64 * 64).eq(0).all().item<bool>());
}

TEST_CASE("CUDA NF4 dequant of shapes that are not whole blocks (short last block, odd numel) equals the reference",
          "[gpu][nf4]") {
  require_cuda();
  at::manual_seed(6);
  const std::vector<std::pair<int64_t, int64_t>> shapes = {{80, 203}, {7, 45}, {300, 77}, {3, 70}, {1, 33}, {1, 1}};
  for (const auto& [rows, cols] : shapes) {
    for (int64_t bs : {64, 256}) {
      const qt::kernels::Nf4Data d = random_nf4(rows, cols, bs);
      for (auto dtype : {at::kBFloat16, at::kHalf, at::kFloat}) {
        INFO(rows << "x" << cols << " blocksize " << bs << " " << c10::toString(dtype));
        at::Tensor out = at::full({rows, cols}, NAN, at::TensorOptions().dtype(dtype).device(at::kCUDA));
        qt::kernels::nf4_dequant_into(d, out);
        CHECK(same_bits(out.reshape({-1}), qt::kernels::nf4_dequant_ref(d, dtype)));
      }
    }
  }
  // Quantized on the device (the CPU's bytes), then q, k, v of such shapes in one grouped launch into one buffer,
  // whose second and third parts do not start on 16 bytes.
  std::vector<qt::Nf4Weight> ws;
  for (const auto& [rows, cols] : std::vector<std::pair<int64_t, int64_t>>{{80, 203}, {21, 203}, {21, 203}}) {
    at::Tensor w = at::randn({rows, cols}).mul_(0.02).to(at::kBFloat16);
    const qt::Nf4Weight cpu = qt::quantize_nf4(w);
    ws.push_back(qt::quantize_nf4(w.to(at::kCUDA)));
    CHECK(same_bits(ws.back().data.packed.cpu(), cpu.data.packed));
    CHECK(same_bits(ws.back().data.absmax_q.cpu(), cpu.data.absmax_q));
    CHECK(same_bits(ws.back().data.nested_absmax.cpu(), cpu.data.nested_absmax));
  }
  at::Tensor W = at::full({122, 203}, NAN, at::TensorOptions().dtype(at::kBFloat16).device(at::kCUDA));
  const std::vector<at::Tensor> outs = {W.narrow(0, 0, 80), W.narrow(0, 80, 21), W.narrow(0, 101, 21)};
  qt::kernels::nf4_dequant_group_into({&ws[0].data, &ws[1].data, &ws[2].data}, outs);
  for (int i = 0; i < 3; ++i)
    CHECK(same_bits(outs[i].reshape({-1}), qt::kernels::nf4_dequant_ref(ws[i].data, at::kBFloat16)));
}

TEST_CASE("NF4 quantization on CUDA produces the CPU's bytes", "[gpu][nf4]") {
  require_cuda();
  at::manual_seed(5);
  for (auto dtype : {at::kBFloat16, at::kFloat, at::kHalf}) {
    for (const auto& [rows, cols] : std::vector<std::pair<int64_t, int64_t>>{{1024, 4096}, {160, 256}, {4096, 14336}}) {
      INFO(rows << "x" << cols << " " << c10::toString(dtype));
      at::Tensor w = at::randn({rows, cols}).mul_(0.02);
      w.view({-1}).index_put_({at::randint(0, rows * cols, {rows * cols / 500})}, 0.5);  // outliers
      w = w.to(dtype);
      const qt::Nf4Weight cpu = qt::quantize_nf4(w);
      const qt::Nf4Weight gpu = qt::quantize_nf4(w.to(at::kCUDA));
      CHECK(gpu.device().is_cuda());
      CHECK(same_bits(gpu.data.packed.cpu(), cpu.data.packed));
      CHECK(same_bits(gpu.data.absmax_q.cpu(), cpu.data.absmax_q));
      CHECK(same_bits(gpu.data.nested_absmax.cpu(), cpu.data.nested_absmax));
      CHECK(same_bits(at::tensor({gpu.data.offset}), at::tensor({cpu.data.offset})));
    }
  }
}

// ---- The NF4 GEMM (lib/kernels/nf4_gemm.h): the fused Hopper kernel against dequantization then matmul.

namespace {

// The weights dequantized to bf16, side by side as [sum rows, K], the tail's columns after them where given.
at::Tensor full_weight(const std::vector<const qt::kernels::Nf4Data*>& ws, int64_t k, const at::Tensor& tail) {
  std::vector<at::Tensor> parts;
  for (const auto* w : ws) {
    at::Tensor wt = at::empty({w->numel / k, k}, tail.defined() ? tail.options() : at::TensorOptions()
                                                                                       .dtype(at::kBFloat16)
                                                                                       .device(at::kCUDA));
    qt::kernels::nf4_dequant_into(*w, wt);
    parts.push_back(wt);
  }
  at::Tensor w = at::cat(parts, 0);
  return tail.defined() ? at::cat({w, tail}, 1) : w;
}

// Error bound of a bf16 result of fp32 sums: its bf16 roundings (each at most half an ulp, 2^-8 of the value at the
// bottom of a binade: 2^-7 of `rounded`, the magnitudes rounded, the exact value's by default) plus fp32 summation
// error relative to the sum of |products| (K * 2^-24, taken 4x). A wrong term costs O(1): far past the bound.
void require_close_to_exact(const at::Tensor& got, const at::Tensor& exact, const at::Tensor& abs_sum,
                            const at::Tensor& rounded = {}) {
  const at::Tensor bound = (rounded.defined() ? rounded : exact.abs()) * std::ldexp(1.0, -7) + abs_sum * 1e-5 + 1e-30;
  const at::Tensor err = (got.to(at::kDouble) - exact).abs();
  const int64_t worst = (err - bound).flatten().argmax().item<int64_t>();
  INFO("max error " << err.max().item<double>() << ", max |exact| " << exact.abs().max().item<double>()
                    << "; worst against its bound at flat index " << worst << ": got "
                    << got.flatten()[worst].item<double>() << ", exact " << exact.flatten()[worst].item<double>()
                    << ", bound " << bound.flatten()[worst].item<double>());
  REQUIRE(at::isfinite(got).all().item<bool>());
  REQUIRE((err <= bound).all().item<bool>());
}

// A fused NF4 GEMM case: m rows of x, K, the weights' rows side by side, and k_tail bf16 columns after the NF4 ones
// (LoRA's B terms; 0: none).
struct GemmCase {
  int64_t m, k;
  std::vector<int64_t> rows;
  int64_t k_tail;
};

// A case's random operands on CUDA, with the exact (fp64) sums of the bf16 products and the sums of their
// magnitudes (for the bound).
struct GemmOperands {
  std::vector<qt::kernels::Nf4Data> data;
  std::vector<const qt::kernels::Nf4Data*> ws;
  int64_t cols = 0;
  at::Tensor x, tail, wf, exact, abs_sum;
};

GemmOperands make_operands(const GemmCase& c) {
  const auto bf16 = at::TensorOptions().dtype(at::kBFloat16).device(at::kCUDA);
  GemmOperands o;
  for (int64_t r : c.rows) o.data.push_back(random_nf4(r, c.k));
  for (const auto& d : o.data) o.ws.push_back(&d);
  for (int64_t r : c.rows) o.cols += r;
  o.x = at::randn({c.m, c.k + c.k_tail}, bf16);
  if (c.k_tail > 0) o.tail = at::randn({o.cols, c.k_tail}, bf16);
  o.wf = full_weight(o.ws, c.k, o.tail).to(at::kDouble);
  o.exact = at::mm(o.x.to(at::kDouble), o.wf.t());
  o.abs_sum = at::mm(o.x.to(at::kDouble).abs(), o.wf.abs().t());
  return o;
}

// The kernel's `variant` on a case: y = x W^T and then y += x W^T onto random values, each within the bound of the
// exact sums, into an output one tile wider whose last 128 (poisoned) columns stay untouched.
void check_variant(const GemmOperands& o, int variant) {
  INFO("variant " << variant);
  const int64_t m = o.x.size(0);
  at::Tensor out = at::full({m, o.cols + 128}, std::nan(""), o.x.options());
  qt::kernels::nf4_linear_into(o.x, o.ws, out, /*accumulate=*/false, o.tail, variant);
  require_close_to_exact(out.narrow(1, 0, o.cols), o.exact, o.abs_sum);
  REQUIRE(at::isnan(out.narrow(1, o.cols, 128)).all().item<bool>());
  const at::Tensor old = at::randn({m, o.cols}, o.x.options());
  out.narrow(1, 0, o.cols).copy_(old);
  qt::kernels::nf4_linear_into(o.x, o.ws, out, /*accumulate=*/true, o.tail, variant);
  require_close_to_exact(out.narrow(1, 0, o.cols), o.exact + old.to(at::kDouble), o.abs_sum + old.abs().to(at::kDouble));
  REQUIRE(at::isnan(out.narrow(1, o.cols, 128)).all().item<bool>());
}

}  // namespace

TEST_CASE("the fused NF4 GEMM equals dequantization then matmul: one weight, q/k/v grouped, ragged rows, a LoRA "
          "tail, += onto out",
          "[gpu][nf4][nf4_gemm]") {
  require_cuda();
#ifdef QT_WITH_CUDA
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  at::manual_seed(7);
  const auto bf16 = at::TensorOptions().dtype(at::kBFloat16).device(at::kCUDA);
  // The 8B block's q / k / v (K 4096) with their LoRA tail (3 x r 16), gate / up, a ragged token count, one row,
  // several steps deep past the ring of stages, K of one step with a tail of two steps, and a tail of 8.
  const std::vector<GemmCase> cases = {{4096, 4096, {4096, 1024, 1024}, 48}, {300, 1024, {2048, 2048}, 0},
                                       {1, 2048, {256}, 0},                   {517, 64, {128, 384}, 72},
                                       {2048, 14336, {1024}, 0},              {640, 512, {256}, 8}};
  for (const GemmCase& c : cases) {
    const GemmOperands o = make_operands(c);
    const std::vector<const qt::kernels::Nf4Data*>& ws = o.ws;
    const at::Tensor &x = o.x, &tail = o.tail, &wf = o.wf, &exact = o.exact, &abs_sum = o.abs_sum;
    const int64_t cols = o.cols;
    INFO("m " << c.m << " k " << c.k << " weights " << c.rows.size() << " cols " << cols << " tail " << c.k_tail);
    // out one tile wider than the weights' columns: those stay untouched.
    at::Tensor out = at::full({c.m, cols + 128}, std::nan(""), bf16);
    const std::string unfit = qt::kernels::nf4_gemm_unfit(x, ws, out, tail);
    if (prop->major == 9 && prop->minor == 0) {
      REQUIRE(unfit.empty());
    } else {
      REQUIRE_FALSE(unfit.empty());  // elsewhere the reference runs; the fused kernel is not checked here
    }
    qt::kernels::nf4_linear_into(x, ws, out, /*accumulate=*/false, tail);
    require_close_to_exact(out.narrow(1, 0, cols), exact, abs_sum);
    REQUIRE(at::isnan(out.narrow(1, cols, 128)).all().item<bool>());
    // The kernel's variant 1, the same bits: one producer warpgroup instead of two.
    {
      at::Tensor other = at::full({c.m, cols + 128}, std::nan(""), bf16);
      qt::kernels::nf4_linear_into(x, ws, other, /*accumulate=*/false, tail, 1);
      REQUIRE(same_bits(other, out));
    }
    // W decoded into registers, the product transposed (5; 7 with two wgmma groups in flight; 8 and 9 the same on a
    // persistent grid with the epilogue in registers).
    for (int variant : {5, 7, 8, 9, 12, 13, 14}) check_variant(o, variant);
    // 12, 13 and 14 decode by byte permutes out of each row's products (5, 8 and 9 look each value up and multiply
    // it): the same values in the same sums, so the same bits.
    for (auto [variant, twin] : {std::pair{12, 5}, std::pair{13, 8}, std::pair{14, 9}}) {
      INFO("variant " << variant << " against " << twin);
      at::Tensor a = at::full({c.m, cols}, std::nan(""), bf16), b = at::full({c.m, cols}, std::nan(""), bf16);
      qt::kernels::nf4_linear_into(x, ws, a, /*accumulate=*/false, tail, variant);
      qt::kernels::nf4_linear_into(x, ws, b, /*accumulate=*/false, tail, twin);
      REQUIRE(same_bits(a, b));
    }

    // The reference (dequantize, then cuBLAS) within the same bound: the two differ only in summation order.
    at::Tensor ref = at::empty({c.m, cols}, bf16);
    qt::kernels::nf4_linear_ref_into(x, ws, ref, false, tail);
    // (with a tail, two roundings: the base products' to bf16, then their sum with the tail's products)
    const at::Tensor base = at::mm(x.narrow(1, 0, c.k).to(at::kDouble), wf.narrow(1, 0, c.k).t());
    require_close_to_exact(ref, exact, abs_sum, c.k_tail > 0 ? exact.abs() + base.abs() : at::Tensor());

    // += onto random values: one rounding of the fp32 sum of the old value and the products.
    const at::Tensor before = at::randn({c.m, cols}, bf16);
    at::Tensor acc = at::full({c.m, cols + 128}, std::nan(""), bf16);
    acc.narrow(1, 0, cols).copy_(before);
    qt::kernels::nf4_linear_into(x, ws, acc, /*accumulate=*/true, tail);
    require_close_to_exact(acc.narrow(1, 0, cols), exact + before.to(at::kDouble), abs_sum + before.abs().to(at::kDouble));
    REQUIRE(at::isnan(acc.narrow(1, cols, 128)).all().item<bool>());
  }
#endif
}

// Variants 11 and 15 (clusters of two CTAs sharing x's tiles by TMA multicast; 15 decoding as 13) apart from
// [nf4_gemm], so that a hang there cannot cost the other checks their run: next_gpu_calls.sh 41 runs it last, on
// its own timeout.
TEST_CASE("the fused NF4 GEMM in clusters of two CTAs sharing x's tiles equals the exact sums, with a tail and +=",
          "[gpu][nf4][nf4_gemm_cluster]") {
  require_cuda();
#ifdef QT_WITH_CUDA
  at::manual_seed(11);
  // Pairs of tiles within a weight and across two; one row; an odd count of W's tiles (variant 8 runs instead).
  const std::vector<GemmCase> cases = {{4096, 4096, {4096, 1024, 1024}, 48}, {517, 64, {128, 384}, 72},
                                       {300, 1024, {2048, 2048}, 0},          {1, 2048, {256}, 0},
                                       {640, 512, {384}, 8}};
  for (const GemmCase& c : cases) {
    INFO("m " << c.m << " k " << c.k << " weights " << c.rows.size() << " tail " << c.k_tail);
    const GemmOperands o = make_operands(c);
    check_variant(o, 11);
    check_variant(o, 15);
    at::Tensor a = at::full({c.m, o.cols}, std::nan(""), o.x.options());
    at::Tensor b = at::full({c.m, o.cols}, std::nan(""), o.x.options());
    qt::kernels::nf4_linear_into(o.x, o.ws, a, /*accumulate=*/false, o.tail, 15);
    qt::kernels::nf4_linear_into(o.x, o.ws, b, /*accumulate=*/false, o.tail, 11);
    REQUIRE(same_bits(a, b));
  }
#endif
}

TEST_CASE("the fused NF4 GEMM writes into a strided view of a wider matrix, on the caller's stream", "[gpu][nf4][nf4_gemm]") {
  require_cuda();
#ifdef QT_WITH_CUDA
  at::manual_seed(8);
  const auto bf16 = at::TensorOptions().dtype(at::kBFloat16).device(at::kCUDA);
  const qt::kernels::Nf4Data d = random_nf4(512, 1024);
  const at::Tensor wide_x = at::randn({700, 1024 + 64}, bf16);
  const at::Tensor x = wide_x.narrow(1, 64, 1024);  // rows 16-byte aligned: 64 columns = 128 bytes in
  at::Tensor ref = at::empty({700, 512}, bf16);
  qt::kernels::nf4_linear_ref_into(x.contiguous(), {&d}, ref, false);
  for (int variant : {0, 5, 7, 8, 9, 12, 13, 14}) {  // the default, and W decoded into registers (their own epilogues)
    INFO("variant " << variant);
    at::Tensor big = at::zeros({700, 2048}, bf16);
    at::Tensor out = big.narrow(1, 256, 512);
    c10::cuda::CUDAStream side = c10::cuda::getStreamFromPool();
    {
      c10::cuda::CUDAStreamGuard guard(side);
      qt::kernels::nf4_linear_into(x, {&d}, out, false, {}, variant);
    }
    side.synchronize();
    const at::Tensor diff = (out.to(at::kFloat) - ref.to(at::kFloat)).abs();
    INFO("max diff " << diff.max().item<float>() << " max |ref| " << ref.abs().max().item<float>());
    REQUIRE((diff <= ref.to(at::kFloat).abs() * (2.0f / 256) + 1e-2f).all().item<bool>());
    REQUIRE((big.narrow(1, 0, 256) == 0).all().item<bool>());
    REQUIRE((big.narrow(1, 768, 2048 - 768) == 0).all().item<bool>());
  }
#endif
}

TEST_CASE("nf4_linear_into on the CPU: each weight's product in its columns, += onto out, other columns untouched",
          "[nf4][nf4_gemm]") {
  at::manual_seed(9);
  const at::Tensor x = at::randn({5, 128});
  const qt::kernels::Nf4Data w0 = qt::kernels::nf4_quantize_ref(at::randn({128, 128}), 64);
  const qt::kernels::Nf4Data w1 = qt::kernels::nf4_quantize_ref(at::randn({64, 128}), 64);
  const std::vector<const qt::kernels::Nf4Data*> ws = {&w0, &w1};
  at::Tensor out = at::full({5, 200}, std::nan(""));
  REQUIRE_FALSE(qt::kernels::nf4_gemm_unfit(x, ws, out).empty());  // the fused kernel is CUDA-only
  qt::kernels::nf4_linear_into(x, ws, out, false);
  const at::Tensor p0 = at::matmul(x, qt::kernels::nf4_dequant_ref(w0, at::kFloat).view({128, 128}).t());
  const at::Tensor p1 = at::matmul(x, qt::kernels::nf4_dequant_ref(w1, at::kFloat).view({64, 128}).t());
  CHECK(at::allclose(out.narrow(1, 0, 128), p0, 1e-5, 1e-5));
  CHECK(at::allclose(out.narrow(1, 128, 64), p1, 1e-5, 1e-5));
  CHECK(at::isnan(out.narrow(1, 192, 8)).all().item<bool>());
  const at::Tensor before = out.narrow(1, 0, 192).clone();
  qt::kernels::nf4_linear_into(x, ws, out, true);
  CHECK(at::allclose(out.narrow(1, 0, 128), before.narrow(1, 0, 128) + p0, 1e-5, 1e-5));
  CHECK(at::allclose(out.narrow(1, 128, 64), before.narrow(1, 128, 64) + p1, 1e-5, 1e-5));
  CHECK(at::isnan(out.narrow(1, 192, 8)).all().item<bool>());
  // A tail: x's last 16 columns against tail's, in the same columns.
  const at::Tensor xt = at::randn({5, 128 + 16});
  const at::Tensor tail = at::randn({192, 16});
  at::Tensor out_t = at::full({5, 200}, std::nan(""));
  qt::kernels::nf4_linear_into(xt, ws, out_t, false, tail);
  const at::Tensor tail_part = at::matmul(xt.narrow(1, 128, 16), tail.t());
  CHECK(at::allclose(out_t.narrow(1, 0, 128),
                     at::matmul(xt.narrow(1, 0, 128), qt::kernels::nf4_dequant_ref(w0, at::kFloat).view({128, 128}).t()) +
                         tail_part.narrow(1, 0, 128),
                     1e-4, 1e-4));
  CHECK(at::allclose(out_t.narrow(1, 128, 64),
                     at::matmul(xt.narrow(1, 0, 128), qt::kernels::nf4_dequant_ref(w1, at::kFloat).view({64, 128}).t()) +
                         tail_part.narrow(1, 128, 64),
                     1e-4, 1e-4));
  CHECK(at::isnan(out_t.narrow(1, 192, 8)).all().item<bool>());
  // A weight whose size is not a multiple of x's columns is refused by name.
  const qt::kernels::Nf4Data odd = qt::kernels::nf4_quantize_ref(at::randn({3, 100}), 64);
  CHECK(qt::test::error_of([&] { qt::kernels::nf4_linear_into(x, {&odd}, out, false); })
            .find("a weight of 300 elements is not [rows, 128]") != std::string::npos);
}

TEST_CASE("QT_NF4_GEMM_VARIANT names a variant that computes right values, or fails naming the choices",
          "[nf4][nf4_gemm]") {
  for (int v : {0, 1, 5, 7, 8, 9, 11, 12, 13, 14, 15}) REQUIRE(qt::kernels::nf4_gemm_variant(std::to_string(v)) == v);
  for (const char* bad : {"3", "4", "6", "10", "16", "", "eight", "8 "}) {
    INFO("'" << bad << "'");
    try {
      qt::kernels::nf4_gemm_variant(bad);
      FAIL("accepted");
    } catch (const qt::Error& e) {
      REQUIRE(e.kind() == qt::ErrorKind::Usage);
      REQUIRE(std::string(e.what()).find("QT_NF4_GEMM_VARIANT") != std::string::npos);
      REQUIRE(std::string(e.what()).find("0, 1, 5, 7, 8, 9, 11, 12, 13, 14 or 15") != std::string::npos);
    }
  }
}
