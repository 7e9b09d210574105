// CUDA runtime queries and the per-thread error message used by QE_CUDA_CHECK.
#include "cuda/check.h"
#include "qengine/ops.h"

namespace qengine {
namespace cuda {

namespace {
thread_local const char* g_last_error = "no error";
}

const char* last_error_message() { return g_last_error; }
void set_last_error(cudaError_t err) { g_last_error = cudaGetErrorString(err); }

}  // namespace cuda

// No driver or no device is not an error: the count is 0 and the CPU backend is used.
int cuda_device_count(int* count) {
  *count = 0;
  cudaError_t err = cudaGetDeviceCount(count);
  if (err != cudaSuccess) {
    *count = 0;
    cudaGetLastError();  // clear the sticky "no device" state
  }
  return kOk;
}

}  // namespace qengine
