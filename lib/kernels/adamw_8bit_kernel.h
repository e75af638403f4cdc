#pragma once
// The raw launch of adamw_8bit.cu (callers: lib/kernels/adamw_8bit.cpp).
#include <cstdint>

#include "lib/kernels/fused_ops_kernels.h"

struct CUstream_st;

namespace qt::kernels {

// One tensor of a launch: its parameter and gradient (the launch's type), its moments' codes and block absmax.
struct Adam8bitJob {
  void* p;
  const void* grad;
  uint8_t* m_codes;
  float* m_absmax;
  uint8_t* v_codes;
  float* v_absmax;
  int64_t n;
  int64_t first_block;  // the job's first block of 256 elements among the launch's
};
// The update's constants, in fp32 as the CPU loop takes them.
struct Adam8bitConstants {
  float beta1, one_minus_beta1, beta2, one_minus_beta2, eps;
  float decay;        // 1 - lr * weight_decay (1: none)
  float step_size;    // lr / (1 - beta1^step)
  float bc2_sqrt;     // sqrt(1 - beta2^step)
};
// maps: 512 fp32 on the device (the signed map, then the unsigned one); jobs: n on the device, `blocks` in all;
// found_inf: null or a device fp32 scalar (non-zero: the kernel writes nothing).
void adamw_8bit_launch(const Adam8bitJob* jobs, int64_t n, int64_t blocks, const float* maps, const float* found_inf,
                       const Adam8bitConstants& c, ElemType type, CUstream_st* stream);

}  // namespace qt::kernels
