// CUDA dequantization of the 2:4 sparse layout (byte order in cpu/sparse/sparse24.h): one thread per
// group of 4 weights, which decodes its two kept values and writes all four (zeros at the
// pruned positions). Same decode_value as the CPU, so the bytes match.
#include <cstdint>

#include "cuda/check.h"
#include "qengine/dtype.h"
#include "qengine/ops.h"

namespace qengine {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kChunk = 128;  // stored values per chunk (cpu::kChunk24)

__global__ void sparse24_dequantize_kernel(const uint8_t* __restrict__ packed, const uint8_t* __restrict__ positions,
                                           int64_t S, int64_t blocksize, const float* __restrict__ table, int bits,
                                           int rule, const float* __restrict__ scales,
                                           const float* __restrict__ offsets, void* __restrict__ out,
                                           int out_dtype) {
  __shared__ float tbl[256];
  const int ncodes = 1 << bits;
  for (int i = threadIdx.x; i < ncodes; i += blockDim.x) tbl[i] = table[i];
  __syncthreads();
  const int64_t groups = S / 2;
  const int64_t full_end = S / kChunk * kChunk;  // stored values in full (permuted) chunks
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < groups; g += stride) {
    float vals[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int k = 0; k < 2; ++k) {
      const int64_t v = 2 * g + k;
      int64_t e;
      int p;
      if (v < full_end) {  // v = 32j + i of its chunk: storage 4i + (j ^ 1), position byte i bits 2j
        const int64_t c0 = v / kChunk * kChunk;
        const int64_t r = v - c0;
        e = c0 + 4 * (r & 31) + ((r >> 5) ^ 1);
        p = (positions[c0 / 4 + (r & 31)] >> (2 * (r >> 5))) & 3;
      } else {
        e = v;
        p = (positions[v >> 2] >> (2 * (v & 3))) & 3;
      }
      const int64_t b = e / blocksize;
      const uint8_t q = bits == 4 ? nibble_at(packed, e) : packed[e];
      const float offset = rule == kMinmax ? offsets[b] : 0.0f;
      vals[p] = decode_value(tbl[q], scales[b], offset, rule);
    }
    for (int i = 0; i < 4; ++i) store_from_float(out, out_dtype, 4 * g + i, vals[i]);
  }
}

}  // namespace

int sparse24_dequantize_cuda(const uint8_t* packed, const uint8_t* positions, int64_t S, int64_t blocksize,
                             const Codebook& cb, int rule, const float* scales, const float* offsets, void* out,
                             int out_dtype, void* stream) {
  if (S < 0 || S % 2 != 0 || blocksize < 1 || (cb.bits != 4 && cb.bits != 8)) return kInvalidArgument;
  if (S == 0) return kOk;
  const int64_t blocks = (S / 2 + kThreads - 1) / kThreads;
  const int grid = static_cast<int>(blocks < 65535 * 8 ? blocks : 65535 * 8);
  sparse24_dequantize_kernel<<<grid, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      packed, positions, S, blocksize, cb.table, cb.bits, rule, scales, offsets, out, out_dtype);
  QE_CUDA_CHECK(cudaGetLastError());
  return kOk;
}

}  // namespace qengine
