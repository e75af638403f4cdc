#pragma once
// cuBLASLt's entry points, taken from the libcublasLt that LibTorch has loaded (libtorch_cuda.so needs it), by
// dlsym: linking a cuBLASLt of our own could put the toolkit's copy beside the wheel's libcublas, whose versions must
// match. CUDA builds only (QT_WITH_CUDA); used by tuned_gemm.cpp and bench/bench_gemm_algos.cpp.
#ifdef QT_WITH_CUDA
#include <cublasLt.h>

namespace qt::kernels {

struct CublasLtApi {
  decltype(&cublasLtMatmulDescCreate) desc_create = nullptr;
  decltype(&cublasLtMatmulDescDestroy) desc_destroy = nullptr;
  decltype(&cublasLtMatmulDescSetAttribute) desc_set = nullptr;
  decltype(&cublasLtMatrixLayoutCreate) layout_create = nullptr;
  decltype(&cublasLtMatrixLayoutDestroy) layout_destroy = nullptr;
  decltype(&cublasLtMatmulPreferenceCreate) pref_create = nullptr;
  decltype(&cublasLtMatmulPreferenceDestroy) pref_destroy = nullptr;
  decltype(&cublasLtMatmulPreferenceSetAttribute) pref_set = nullptr;
  decltype(&cublasLtMatmulAlgoGetHeuristic) heuristic = nullptr;
  decltype(&cublasLtMatmulAlgoConfigGetAttribute) algo_get = nullptr;
  decltype(&cublasLtMatmul) matmul = nullptr;
};

// The entry points, resolved once; null where the library or one of them is missing.
const CublasLtApi* cublaslt_api();

}  // namespace qt::kernels
#endif
