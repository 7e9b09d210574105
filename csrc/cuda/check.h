// Every CUDA runtime call and launch goes through QE_CUDA_CHECK: a failure becomes kCudaError
// (with the message kept for the binding) instead of being ignored.
#pragma once
#include <cuda_runtime.h>

#include "qengine/status.h"

namespace qengine::cuda {

// The last CUDA error message, per thread, for the exception text.
const char* last_error_message();
void set_last_error(cudaError_t err);

}  // namespace qengine::cuda

#define QE_CUDA_CHECK(expr)                      \
  do {                                           \
    cudaError_t qe_err_ = (expr);                \
    if (qe_err_ != cudaSuccess) {                \
      ::qengine::cuda::set_last_error(qe_err_);  \
      return ::qengine::kCudaError;              \
    }                                            \
  } while (0)
