#include "lib/kernels/adamw_8bit.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>

#include "lib/core/error.h"
#include "lib/kernels/adamw_8bit_kernel.h"

#ifdef QT_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace qt {

namespace {

at::Tensor make_dynamic_map(bool is_signed) {
  // bitsandbytes.functional.create_dynamic_map(signed, max_exponent_bits=7, total_bits=8), op for op: for each
  // exponent i the midpoints of linspace(0.1, 1) in fp32, times 10^(i - 6) (and their negatives when signed), then
  // 0 and 1, sorted. (The linear region of "additional items" is empty at these settings.)
  constexpr int kExponentBits = 7, kNonSignBits = 7;
  std::vector<float> data;
  for (int i = 0; i < kExponentBits; ++i) {
    const int64_t items = is_signed ? (int64_t{1} << (i + kNonSignBits - kExponentBits)) + 1
                                    : (int64_t{1} << (i + kNonSignBits - kExponentBits + 1)) + 1;
    const at::Tensor bounds = at::linspace(0.1, 1, items, at::TensorOptions().dtype(at::kFloat));
    const at::Tensor means = (bounds.slice(0, 0, items - 1) + bounds.slice(0, 1, items)) / 2.0;
    const double scale = std::pow(10.0, -(kExponentBits - 1) + i);
    const at::Tensor pos = (scale * means).contiguous();
    data.insert(data.end(), pos.data_ptr<float>(), pos.data_ptr<float>() + pos.numel());
    if (is_signed) {
      const at::Tensor neg = (-scale * means).contiguous();
      data.insert(data.end(), neg.data_ptr<float>(), neg.data_ptr<float>() + neg.numel());
    }
  }
  data.push_back(0.0f);
  data.push_back(1.0f);
  QT_CHECK(data.size() == 256, ErrorKind::Internal, "dynamic quantization map: expected 256 values");
  std::sort(data.begin(), data.end());
  return at::tensor(data, at::TensorOptions().dtype(at::kFloat));
}

// The nearest of the map's 256 sorted values to x: the first not below x, or the one before it unless the first is
// strictly nearer (ties to the lower code). adamw_8bit.cu's nearest_code is the same search.
inline uint8_t nearest_code(const float* map, float x) {
  x = std::min(std::max(x, -1.0f), 1.0f);
  const float* r = std::lower_bound(map, map + kAdam8bitBlock, x);
  if (r == map) return 0;
  if (r == map + kAdam8bitBlock) return static_cast<uint8_t>(kAdam8bitBlock - 1);
  const float right = *r - x, left = x - *(r - 1);
  const auto idx = static_cast<uint8_t>(r - map);
  return right < left ? idx : static_cast<uint8_t>(idx - 1);
}

void check_tensor(const Adam8bitTensor& t) {
  const int64_t n = t.p.numel(), nb = q8_blocks(n);
  QT_CHECK(t.p.is_contiguous() && t.grad.defined() && t.grad.numel() == n && t.m.codes.numel() == n &&
               t.v.codes.numel() == n && t.m.absmax.numel() == nb && t.v.absmax.numel() == nb &&
               t.m.codes.scalar_type() == at::kByte && t.v.codes.scalar_type() == at::kByte &&
               t.m.absmax.scalar_type() == at::kFloat && t.v.absmax.scalar_type() == at::kFloat &&
               t.m.codes.is_contiguous() && t.v.codes.is_contiguous() && t.m.absmax.is_contiguous() &&
               t.v.absmax.is_contiguous(),
           ErrorKind::Internal, "adamw_8bit_step: a tensor's gradient or 8-bit state does not match it");
}

kernels::Adam8bitConstants constants(const Adam8bitStep& s) {
  const double bc1 = 1.0 - std::pow(s.beta1, static_cast<double>(s.step));
  const double bc2 = 1.0 - std::pow(s.beta2, static_cast<double>(s.step));
  return {static_cast<float>(s.beta1), static_cast<float>(1.0 - s.beta1), static_cast<float>(s.beta2),
          static_cast<float>(1.0 - s.beta2), static_cast<float>(s.eps),
          static_cast<float>(1.0 - s.lr * s.weight_decay), static_cast<float>(s.lr / bc1),
          static_cast<float>(std::sqrt(bc2))};
}

// One tensor on the CPU: fp32 copies of a parameter of another dtype, its gradient in fp32.
void step_cpu(const Adam8bitTensor& t, const kernels::Adam8bitConstants& c) {
  const float* smap = dynamic_quant_map(true).data_ptr<float>();
  const float* umap = dynamic_quant_map(false).data_ptr<float>();
  at::Tensor p32 = t.p.scalar_type() == at::kFloat ? t.p : t.p.to(at::kFloat);
  const at::Tensor g32 = t.grad.to(at::kFloat).contiguous();
  float* p = p32.data_ptr<float>();
  const float* g = g32.data_ptr<float>();
  uint8_t* mc = t.m.codes.data_ptr<uint8_t>();
  uint8_t* vc = t.v.codes.data_ptr<uint8_t>();
  float* ma = t.m.absmax.data_ptr<float>();
  float* va = t.v.absmax.data_ptr<float>();
  const int64_t n = t.p.numel();
  at::parallel_for(0, q8_blocks(n), 16, [&](int64_t b0, int64_t b1) {
    std::array<float, kAdam8bitBlock> m{}, v{};
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t begin = b * kAdam8bitBlock, len = std::min<int64_t>(kAdam8bitBlock, n - begin);
      float m_max = 0.0f, v_max = 0.0f;
      for (int64_t k = 0; k < len; ++k) {
        const int64_t e = begin + k;
        // One rounding an operation (the kernel's __fmul_rn / __fadd_rn / __fdiv_rn / __fsqrt_rn).
        float mk = smap[mc[e]] * ma[b], vk = umap[vc[e]] * va[b];
        mk = mk * c.beta1 + g[e] * c.one_minus_beta1;
        vk = vk * c.beta2 + g[e] * g[e] * c.one_minus_beta2;
        float x = p[e];
        if (c.decay != 1.0f) x = x * c.decay;
        const float denom = std::sqrt(vk) / c.bc2_sqrt + c.eps;
        p[e] = x - c.step_size * (mk / denom);
        m[k] = mk;
        v[k] = vk;
        m_max = std::max(m_max, std::fabs(mk));
        v_max = std::max(v_max, vk);
      }
      ma[b] = m_max;
      va[b] = v_max;
      for (int64_t k = 0; k < len; ++k) {
        mc[begin + k] = m_max == 0.0f ? 0 : nearest_code(smap, m[k] / m_max);
        vc[begin + k] = v_max == 0.0f ? 0 : nearest_code(umap, v[k] / v_max);
      }
    }
  });
  if (!p32.is_same(t.p)) t.p.copy_(p32);
}

#ifdef QT_WITH_CUDA
kernels::ElemType elem_type_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return kernels::ElemType::Float32;
    case at::kHalf: return kernels::ElemType::Float16;
    case at::kBFloat16: return kernels::ElemType::BFloat16;
    default: fail(ErrorKind::Internal, "adamw_8bit_step: parameters must be fp32, fp16 or bf16");
  }
}

// The tensors of one dtype in one launch: the two maps and the job table go to the device through pinned memory,
// queued ahead of the kernel (the host allocator keeps the pinned block until the copy has run).
void step_cuda(const std::vector<const Adam8bitTensor*>& ts, const kernels::Adam8bitConstants& c,
               const at::Tensor& found_inf) {
  const at::Device device = ts[0]->p.device();
  std::vector<kernels::Adam8bitJob> jobs;
  int64_t blocks = 0;
  for (const Adam8bitTensor* t : ts) {
    const int64_t n = t->p.numel();
    if (n == 0) continue;
    jobs.push_back({t->p.data_ptr(), t->grad.data_ptr(), t->m.codes.data_ptr<uint8_t>(),
                    t->m.absmax.data_ptr<float>(), t->v.codes.data_ptr<uint8_t>(), t->v.absmax.data_ptr<float>(), n,
                    blocks});
    blocks += q8_blocks(n);
  }
  if (jobs.empty()) return;
  constexpr int64_t kMapBytes = 2 * kAdam8bitBlock * sizeof(float);
  const int64_t bytes = kMapBytes + static_cast<int64_t>(jobs.size() * sizeof(kernels::Adam8bitJob));
  at::Tensor host = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  auto* h = static_cast<char*>(host.data_ptr());
  std::memcpy(h, dynamic_quant_map(true).data_ptr<float>(), kMapBytes / 2);
  std::memcpy(h + kMapBytes / 2, dynamic_quant_map(false).data_ptr<float>(), kMapBytes / 2);
  std::memcpy(h + kMapBytes, jobs.data(), jobs.size() * sizeof(kernels::Adam8bitJob));
  c10::cuda::CUDAGuard guard(device);
  at::Tensor table = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).device(device));
  table.copy_(host, /*non_blocking=*/true);
  const at::Tensor inf = found_inf.defined() ? found_inf.to(device, at::kFloat).contiguous() : at::Tensor();
  const auto* base = static_cast<const char*>(table.data_ptr());
  kernels::adamw_8bit_launch(reinterpret_cast<const kernels::Adam8bitJob*>(base + kMapBytes),
                             static_cast<int64_t>(jobs.size()), blocks, reinterpret_cast<const float*>(base),
                             inf.defined() ? inf.data_ptr<float>() : nullptr, c,
                             elem_type_of(ts[0]->p.scalar_type()), c10::cuda::getCurrentCUDAStream().stream());
}
#endif

// x [n] fp32 -> [blocks, 256], zero-padded.
at::Tensor as_blocks(const at::Tensor& x) {
  const int64_t n = x.numel(), nb = q8_blocks(n);
  at::Tensor flat = x.reshape({-1});
  if (nb * kAdam8bitBlock != n) flat = at::constant_pad_nd(flat, {0, nb * kAdam8bitBlock - n}, 0);
  return flat.view({nb, kAdam8bitBlock});
}

}  // namespace

const at::Tensor& dynamic_quant_map(bool is_signed) {
  static const at::Tensor maps[2] = {make_dynamic_map(false), make_dynamic_map(true)};
  return maps[is_signed ? 1 : 0];
}

int64_t q8_blocks(int64_t numel) { return (numel + kAdam8bitBlock - 1) / kAdam8bitBlock; }

BlockwiseQ8 q8_zeros(at::IntArrayRef sizes, const at::TensorOptions& options) {
  int64_t n = 1;
  for (int64_t s : sizes) n *= s;
  return {at::zeros(sizes, options.dtype(at::kByte)), at::zeros({q8_blocks(n)}, options.dtype(at::kFloat))};
}

BlockwiseQ8 quantize_blockwise(const at::Tensor& x, bool is_signed) {
  // Plain ATen on any device: the block absmax, x / absmax, and the nearest code by searchsorted (the first value
  // not below: the right neighbour) against the one before it, ties to the lower, as nearest_code.
  const int64_t n = x.numel();
  const at::Tensor blocks = as_blocks(x.to(at::kFloat));
  const at::Tensor absmax = blocks.abs().amax({1});
  const at::Tensor safe = at::where(absmax == 0, at::ones_like(absmax), absmax);
  const at::Tensor y = (blocks / safe.unsqueeze(1)).clamp(-1.0, 1.0).reshape({-1});
  const at::Tensor map = dynamic_quant_map(is_signed).to(x.device());
  const at::Tensor right = at::searchsorted(map, y).clamp_max(kAdam8bitBlock - 1);
  const at::Tensor left = (right - 1).clamp_min(0);
  const at::Tensor take_right = (map.index_select(0, right) - y) < (y - map.index_select(0, left));
  at::Tensor codes = at::where(take_right | (right == 0), right, left).view({-1, kAdam8bitBlock});
  codes = at::where((absmax == 0).unsqueeze(1), at::zeros_like(codes), codes);
  return {codes.reshape({-1}).slice(0, 0, n).to(at::kByte).reshape(x.sizes()).contiguous(), absmax.contiguous()};
}

at::Tensor dequantize_blockwise(const BlockwiseQ8& q, bool is_signed) {
  const int64_t n = q.codes.numel();
  const at::Tensor map = dynamic_quant_map(is_signed).to(q.codes.device());
  const at::Tensor values = as_blocks(map.index_select(0, q.codes.reshape({-1}).to(at::kLong)));
  return (values * q.absmax.unsqueeze(1)).reshape({-1}).slice(0, 0, n).reshape(q.codes.sizes()).contiguous();
}

void adamw_8bit_step(const std::vector<Adam8bitTensor>& tensors, const Adam8bitStep& s, const at::Tensor& found_inf) {
  if (tensors.empty()) return;
  for (const Adam8bitTensor& t : tensors) check_tensor(t);
  const kernels::Adam8bitConstants c = constants(s);
#ifdef QT_WITH_CUDA
  if (tensors[0].p.is_cuda()) {
    for (at::ScalarType type : {at::kFloat, at::kHalf, at::kBFloat16}) {
      std::vector<const Adam8bitTensor*> of_type;
      for (const Adam8bitTensor& t : tensors)
        if (t.p.scalar_type() == type) of_type.push_back(&t);
      if (!of_type.empty()) step_cuda(of_type, c, found_inf);
    }
    return;
  }
#endif
  if (found_inf.defined() && found_inf.item<double>() != 0) return;
  for (const Adam8bitTensor& t : tensors) step_cpu(t, c);
}

void adamw_8bit_step_reference(const std::vector<Adam8bitTensor>& tensors, const Adam8bitStep& s,
                               const at::Tensor& found_inf) {
  if (found_inf.defined() && found_inf.item<double>() != 0) return;
  const double bc1 = 1.0 - std::pow(s.beta1, static_cast<double>(s.step));
  const double bc2 = 1.0 - std::pow(s.beta2, static_cast<double>(s.step));
  for (const Adam8bitTensor& t : tensors) {
    const at::Tensor g = t.grad.to(at::kFloat);
    const at::Tensor m = dequantize_blockwise(t.m, true) * s.beta1 + g * (1.0 - s.beta1);
    const at::Tensor v = dequantize_blockwise(t.v, false) * s.beta2 + g * g * (1.0 - s.beta2);
    at::Tensor p = t.p.to(at::kFloat);
    if (s.weight_decay != 0) p = p * (1.0 - s.lr * s.weight_decay);
    p = p - (m / (v.sqrt() / std::sqrt(bc2) + s.eps)) * (s.lr / bc1);
    t.p.copy_(p);
    const BlockwiseQ8 qm = quantize_blockwise(m, true), qv = quantize_blockwise(v, false);
    t.m.codes.copy_(qm.codes);
    t.m.absmax.copy_(qm.absmax);
    t.v.codes.copy_(qv.codes);
    t.v.absmax.copy_(qv.absmax);
  }
}

}  // namespace qt
