// NF4 CUDA kernel (lib/kernels/nf4_dequant.cu) against its plain-ATen reference, run on the GPU; and the
// quantizer on CUDA against the quantizer on the CPU. Tagged [gpu]: scripts/gpu-check.sh runs them.
#include <ATen/ATen.h>

#include <cmath>
#include <string>
#include <vector>

#include "lib/core/error.h"
#include "lib/kernels/nf4_dequant.h"
#include "lib/kernels/nf4_format.h"
#include "lib/quant/nf4.h"
#include "tests/catch.h"
#include "tests/test_util.h"

#ifdef QT_WITH_CUDA
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
