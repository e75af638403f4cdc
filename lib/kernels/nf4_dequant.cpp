// Tensor-level NF4 dequantization: the CUDA kernel (nf4_dequant.cu) for CUDA tensors, the reference
// (nf4_ref.cpp) for CPU tensors.
#include "lib/kernels/nf4_dequant.h"

#include <ATen/ATen.h>

#include <atomic>
#include <string>

#include "lib/core/error.h"

#ifdef QT_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#endif

namespace qt::kernels {

#ifndef QT_WITH_CUDA
bool nf4_cuda_compiled() { return false; }
void nf4_dequant_launch(const Nf4DequantJob*, int, Nf4OutType, CUstream_st*) {
  fail(ErrorKind::Device, "nf4_dequant_launch: this build has no CUDA kernels (QT_CUDA=OFF)");
}
#endif

namespace {


Nf4OutType out_type(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return Nf4OutType::Float32;
    case at::kHalf:
      return Nf4OutType::Float16;
    case at::kBFloat16:
      return Nf4OutType::BFloat16;
    default:
      fail(ErrorKind::Internal,
           std::string("NF4 dequantize: output must be float32/bfloat16/float16, got ") + c10::toString(t));
  }
}

// A 2-D view whose rows are strided (stride(1) == 1, stride(0) > columns): the first columns of a wider matrix.
bool row_strided(const at::Tensor& out) {
  return out.dim() == 2 && !out.is_contiguous() && out.stride(1) == 1 && out.stride(0) >= out.size(1);
}

void check_out(const Nf4Data& d, const at::Tensor& out) {
  check_nf4_data(d);
  QT_CHECK(out.defined() && (out.is_contiguous() || row_strided(out)) && out.numel() == d.numel, ErrorKind::Internal,
           "NF4 dequantize: output must be contiguous, or 2-D with strided rows, with " + std::to_string(d.numel) +
               " elements");
  QT_CHECK(!row_strided(out) || !out.is_cuda() ||
               (out.size(1) % kNf4StridedCols == 0 && (out.stride(0) * out.element_size()) % 16 == 0),
           ErrorKind::Internal,
           "NF4 dequantize: a row-strided output on CUDA needs columns a multiple of " +
               std::to_string(kNf4StridedCols) + " and 16-byte row strides");
  QT_CHECK(out.device() == d.packed.device(), ErrorKind::Internal,
           "NF4 dequantize: output on " + out.device().str() + ", data on " + d.packed.device().str());
  out_type(out.scalar_type());
}

Nf4DequantJob job_of(const Nf4Data& d, const at::Tensor& out) {
  Nf4DequantJob job;
  job.packed = d.packed.data_ptr<uint8_t>();
  job.absmax_q = d.absmax_q.data_ptr<uint8_t>();
  job.nested_absmax = d.nested_absmax.data_ptr<float>();
  job.nested_map = d.nested_map.data_ptr<float>();
  job.quant_map = d.quant_map.data_ptr<float>();
  job.offset = d.offset;
  job.numel = d.numel;
  job.blocksize = static_cast<int32_t>(d.blocksize);
  job.out = out.data_ptr();
  if (row_strided(out)) {
    job.cols = out.size(1);
    job.ld = out.stride(0);
  }
  return job;
}

}  // namespace

void nf4_dequant_group_into(const std::vector<const Nf4Data*>& ds, const std::vector<at::Tensor>& outs) {
  QT_CHECK(!ds.empty() && ds.size() == outs.size(), ErrorKind::Internal,
           "nf4_dequant_group_into: one output per weight expected");
  for (size_t i = 0; i < ds.size(); ++i) check_out(*ds[i], outs[i]);
  if (!outs[0].is_cuda()) {
    for (size_t i = 0; i < ds.size(); ++i)
      outs[i].copy_(nf4_dequant_ref(*ds[i], outs[i].scalar_type()).view(outs[i].sizes()));
    return;
  }
#ifdef QT_WITH_CUDA
  QT_CHECK(ds.size() <= static_cast<size_t>(kNf4MaxJobs), ErrorKind::Internal,
           "nf4_dequant_group_into: at most " + std::to_string(kNf4MaxJobs) + " weights per launch");
  const auto type = outs[0].scalar_type();
  const c10::cuda::CUDAGuard guard(outs[0].device());
  Nf4DequantJob jobs[kNf4MaxJobs];
  // An output that does not start on 16 bytes (the rows of k after a q whose numel is not a multiple of 8, in
  // one fused buffer: shapes that are not multiples of the blocksize) is written through an aligned buffer.
  std::vector<std::pair<at::Tensor, at::Tensor>> staged;
  for (size_t i = 0; i < ds.size(); ++i) {
    QT_CHECK(outs[i].scalar_type() == type && outs[i].device() == outs[0].device(), ErrorKind::Internal,
             "nf4_dequant_group_into: all outputs must share one dtype and device");
    if ((reinterpret_cast<uintptr_t>(outs[i].data_ptr()) & 15u) != 0 && !row_strided(outs[i])) {
      staged.emplace_back(at::empty({ds[i]->numel}, outs[i].options()), outs[i]);
      jobs[i] = job_of(*ds[i], staged.back().first);
    } else {
      jobs[i] = job_of(*ds[i], outs[i]);
    }
  }
  nf4_dequant_launch(jobs, static_cast<int>(ds.size()), out_type(type), at::cuda::getCurrentCUDAStream().stream());
  for (auto& [tmp, out] : staged) out.copy_(tmp.view(out.sizes()));
#else
  fail(ErrorKind::Device, "NF4 dequantize: CUDA tensor given but this build has no CUDA kernels (QT_CUDA=OFF)");
#endif
}


void nf4_dequant_into(const Nf4Data& d, const at::Tensor& out) {
  std::vector<const Nf4Data*> ds{&d};
  const std::vector<at::Tensor> outs{out};
  nf4_dequant_group_into(ds, outs);
}

}  // namespace qt::kernels
