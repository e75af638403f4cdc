// Plain-ATen NF4 references. Each step mirrors a line of bitsandbytes' reference backend
// (bitsandbytes/backends/default/ops.py: quantize_4bit, quantize_blockwise, dequantize_blockwise,
// dequantize_4bit; functional.quantize_4bit for the nested pass), including its choice of reciprocal-multiply
// for full blocks and division for a partial last block, because those choices decide the last bit.
#include "lib/kernels/nf4_ref.h"

#include <ATen/ATen.h>

#include <cmath>
#include <string>

#include "lib/core/error.h"
#include "lib/kernels/nf4_format.h"

namespace qt::kernels {

at::Tensor nf4_code_tensor() {
  return at::tensor(at::ArrayRef<float>(kNf4Code, 16), at::TensorOptions().dtype(at::kFloat)).clone();
}

at::Tensor dynamic_map_tensor() {
  // functional.create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8): for each exponent i, the
  // midpoints of linspace(0.1, 1, 2^i + 1) scaled by +-10^(i-6); then 0 and 1; sorted. 7 exponent bits leave
  // no "additional items" (2^(7-7) - 1 = 0).
  std::vector<at::Tensor> parts;
  const int max_exponent_bits = 7, non_sign_bits = 7;
  for (int i = 0; i < max_exponent_bits; ++i) {
    const int64_t fraction_items = (int64_t{1} << (i + non_sign_bits - max_exponent_bits)) + 1;
    at::Tensor boundaries = at::linspace(0.1, 1.0, fraction_items, at::TensorOptions().dtype(at::kFloat));
    at::Tensor means = (boundaries.slice(0, 0, -1) + boundaries.slice(0, 1)) / 2.0;
    const double scale = std::pow(10.0, -(max_exponent_bits - 1) + i);  // Python: 10 ** (-(7 - 1) + i)
    parts.push_back(means * scale);
    parts.push_back(means * -scale);
  }
  parts.push_back(at::tensor({0.0f, 1.0f}, at::TensorOptions().dtype(at::kFloat)));
  at::Tensor data = at::cat(parts);
  QT_CHECK(data.numel() == 256, ErrorKind::Internal, "dynamic map: expected 256 values");
  return std::get<0>(at::sort(data));
}

void check_nf4_data(const Nf4Data& d) {
  auto expect = [](bool ok, const std::string& what) {
    if (!ok) fail(ErrorKind::Internal, "NF4 data: " + what);
  };
  expect(d.blocksize >= kNf4MinBlocksize && (d.blocksize & (d.blocksize - 1)) == 0 && d.blocksize <= 4096,
         "blocksize " + std::to_string(d.blocksize) + " is not a power of two in [64, 4096]");
  expect(d.numel > 0, "numel " + std::to_string(d.numel) + " is not positive");
  const int64_t blocks = nf4_blocks(d.numel, d.blocksize);
  const int64_t groups = (blocks + kNf4NestedBlocksize - 1) / kNf4NestedBlocksize;
  expect(d.packed.defined() && d.packed.scalar_type() == at::kByte && d.packed.numel() == nf4_packed_bytes(d.numel) &&
             d.packed.is_contiguous(),
         "packed must be contiguous uint8[ceil(numel/2)]");
  expect(d.absmax_q.defined() && d.absmax_q.scalar_type() == at::kByte && d.absmax_q.numel() == blocks &&
             d.absmax_q.is_contiguous(),
         "absmax_q must be contiguous uint8[ceil(numel/blocksize)]");
  expect(d.nested_absmax.defined() && d.nested_absmax.scalar_type() == at::kFloat &&
             d.nested_absmax.numel() == groups && d.nested_absmax.is_contiguous(),
         "nested_absmax must be contiguous float32[ceil(blocks/256)]");
  expect(d.nested_map.defined() && d.nested_map.scalar_type() == at::kFloat && d.nested_map.numel() == 256 &&
             d.nested_map.is_contiguous(),
         "nested_map must be contiguous float32[256]");
  expect(d.quant_map.defined() && d.quant_map.scalar_type() == at::kFloat && d.quant_map.numel() == 16 &&
             d.quant_map.is_contiguous(),
         "quant_map must be contiguous float32[16]");
  const auto dev = d.packed.device();
  expect(d.absmax_q.device() == dev && d.nested_absmax.device() == dev && d.nested_map.device() == dev &&
             d.quant_map.device() == dev,
         "all tensors must be on one device");
}

namespace {

// One blockwise pass of bitsandbytes' reference quantizer over flat fp32 `a`: returns (codes uint8 [n],
// absmax float32 [ceil(n/blocksize)]). Nearest entry of the sorted `code` by bucketize over the fp32 midpoints
// (a value on a midpoint goes to the lower code), full blocks scaled by reciprocal(absmax), a partial last
// block divided by its absmax: ops.py quantize_blockwise / quantize_4bit ("default" kernels).
std::pair<at::Tensor, at::Tensor> blockwise_codes(const at::Tensor& a, const at::Tensor& code, int64_t blocksize) {
  const int64_t n = a.numel();
  const int64_t rem = n % blocksize;
  const int64_t full = n - rem;
  at::Tensor com = a.slice(0, 0, full).view({full / blocksize, blocksize});
  at::Tensor absmax = at::amax(com.abs(), {1});
  at::Tensor scaled = at::clamp(com * at::reciprocal(absmax.clamp_min(1e-38)).view({-1, 1}), -1, 1).reshape({-1});
  if (rem) {
    at::Tensor tail = a.slice(0, full);
    at::Tensor am = tail.abs().max().clamp_min(1e-38);
    absmax = at::cat({absmax, am.unsqueeze(0)});
    scaled = at::cat({scaled, at::clamp(tail / am, -1, 1)});
  }
  at::Tensor bounds = (code.slice(0, 0, -1) + code.slice(0, 1)) / 2;
  at::Tensor q = at::bucketize(scaled, bounds, /*out_int32=*/true).to(at::kByte);
  return {q, absmax};
}

}  // namespace

Nf4Data nf4_quantize_ref(const at::Tensor& w, int64_t blocksize) {
  const auto t = w.scalar_type();
  QT_CHECK(t == at::kFloat || t == at::kBFloat16 || t == at::kHalf, ErrorKind::Internal,
           std::string("nf4_quantize_ref: expected float32/bfloat16/float16, got ") + c10::toString(t));
  QT_CHECK(blocksize >= kNf4MinBlocksize && blocksize <= 4096 && (blocksize & (blocksize - 1)) == 0,
           ErrorKind::Internal, "nf4_quantize_ref: blocksize must be a power of two in [64, 4096]");
  QT_CHECK(w.numel() > 0, ErrorKind::Internal, "nf4_quantize_ref: empty tensor");
  const auto dev = w.device();
  const auto f32 = at::TensorOptions().dtype(at::kFloat).device(dev);

  Nf4Data d;
  d.blocksize = blocksize;
  d.numel = w.numel();
  d.quant_map = nf4_code_tensor().to(dev);
  d.nested_map = dynamic_map_tensor().to(dev);

  // First level: 4-bit NF4 codes with fp32 absmax per block.
  at::Tensor a = w.reshape({-1}).to(f32);
  auto [q, absmax] = blockwise_codes(a, d.quant_map, blocksize);
  // An odd count: bitsandbytes pads the scaled values with one 0 before bucketize, so the last low nibble holds
  // the code of 0.0 (kNf4Code[7]).
  if (q.numel() % 2) q = at::cat({q, at::full({1}, 7, q.options())});
  const int64_t n = q.numel();
  d.packed = at::bitwise_or(at::bitwise_left_shift(q.slice(0, 0, n, 2), 4), q.slice(0, 1, n, 2)).contiguous();

  // Second level (functional.quantize_4bit, compress_statistics=True): offset = absmax.mean(), then 8-bit
  // dynamic quantization of absmax - offset in blocks of 256. The mean is taken on the CPU, where bitsandbytes
  // takes it when quantizing on the CPU, so every device agrees on it.
  at::Tensor offset = absmax.to(at::kCPU).mean();
  d.offset = offset.item<float>();
  at::Tensor centered = absmax - offset.to(dev);
  auto [q2, absmax2] = blockwise_codes(centered, d.nested_map, kNf4NestedBlocksize);
  d.absmax_q = q2.contiguous();
  d.nested_absmax = absmax2.contiguous();
  return d;
}

at::Tensor nf4_absmax_ref(const Nf4Data& d) {
  check_nf4_data(d);
  const int64_t blocks = nf4_blocks(d.numel, d.blocksize);
  // dequantize_blockwise: code[q] * absmax2[block] in fp32; then `absmax += offset` as a separate op.
  at::Tensor group_scale = d.nested_absmax.repeat_interleave(kNf4NestedBlocksize).slice(0, 0, blocks);
  at::Tensor scale = d.nested_map.index_select(0, d.absmax_q.to(at::kLong)) * group_scale;
  return scale + d.offset;
}

at::Tensor nf4_dequant_ref(const Nf4Data& d, at::ScalarType dtype) {
  QT_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, ErrorKind::Internal,
           std::string("nf4_dequant_ref: output must be float32/bfloat16/float16, got ") + c10::toString(dtype));
  at::Tensor scale = nf4_absmax_ref(d);
  // High nibble first (element 2i), then the low nibble (element 2i + 1).
  // A short last block (numel not a multiple of the blocksize) takes its own scale; an odd numel leaves a
  // padding nibble, dropped (ops.py _dequantize_4bit_compute: the same fp32 products, element by element).
  at::Tensor idx = at::stack({at::bitwise_right_shift(d.packed, 4), at::bitwise_and(d.packed, 15)}, 1)
                       .reshape({-1})
                       .slice(0, 0, d.numel);
  at::Tensor values = d.quant_map.index_select(0, idx.to(at::kLong));
  if (d.numel % d.blocksize == 0) return (values.view({-1, d.blocksize}) * scale.view({-1, 1})).reshape({-1}).to(dtype);
  return (values * scale.repeat_interleave(d.blocksize).slice(0, 0, d.numel)).to(dtype);
}

}  // namespace qt::kernels
