// The quantized weight as the CUDA matmul kernels read it (matmul.cu, matmul_t.cu): packed
// codes of W [N, K] (flat blocks over its row-major elements), the per-block scales (plain or
// double-quantized) and offsets, decoded with the shared maths of quant_math.h, so every
// decoded weight equals the CPU's bit for bit and only the order of the sums differs.
#pragma once
#include <cstdint>

#include "qengine/ops.h"

namespace qengine::cuda {

struct Weight {
  const uint8_t* packed;
  int64_t N, K;        // W is [N, K]
  int64_t blocksize;
  int block_shift;     // log2(blocksize) when a power of two, else -1
  int bits;            // 4 or 8
  int rule;            // kAbsmax or kMinmax (then offsets is one float32 per block)
  const float* table;  // 2^bits float32 codebook values (global; kernels copy it to shared memory)
  BlockScales scales;  // .mean is not used: the mean is read on the device from `mean`
  const float* mean;   // float32 [1] on the device (double quantization), else null
  const float* offsets;
};

// A word is the unit each lane loads: 4 bytes = 8 four-bit or 4 eight-bit codes.
template <int BITS>
struct Word {
  static constexpr int kElems = 32 / BITS;
  // Code of element p (0 <= p < kElems) of a little-endian word; bitsandbytes' nibble order
  // puts element 2k in the high nibble of byte k.
  static __device__ __forceinline__ int code(uint32_t w, int p) {
    if constexpr (BITS == 8) return (w >> (8 * p)) & 0xff;
    return (w >> (8 * (p >> 1) + ((p & 1) ? 0 : 4))) & 0x0f;
  }
};

// Whether W can be read a word at a time: every word lies inside one block and one row, and
// the words are 4-byte aligned. Otherwise the kernels decode element by element.
inline bool word_layout(const Weight& w) {
  const int elems_per_word = 32 / w.bits;
  return w.K % w.blocksize == 0 && w.blocksize % elems_per_word == 0 &&  // so K % elems_per_word == 0 too
         reinterpret_cast<uintptr_t>(w.packed) % 4 == 0;
}

__device__ __forceinline__ int64_t block_of(const Weight& w, int64_t e) {
  return w.block_shift >= 0 ? e >> w.block_shift : e / w.blocksize;
}

// The codebook (and the nested scales' table) in shared memory, and the mean in a register:
// every decode then reads only shared memory plus the per-block scale bytes.
struct SharedTables {
  float table[256];
  float nested[256];
};

__device__ __forceinline__ Weight load_tables(const Weight& w, SharedTables& sh) {
  const int ncodes = 1 << w.bits;
  for (int i = threadIdx.x; i < ncodes; i += blockDim.x) sh.table[i] = w.table[i];
  Weight local = w;
  local.table = sh.table;
  if (w.scales.values == nullptr) {
    for (int i = threadIdx.x; i < 256; i += blockDim.x) sh.nested[i] = w.scales.table[i];
    local.scales.table = sh.nested;
    local.scales.mean = *w.mean;
  }
  return local;  // callers __syncthreads() before the first decode
}

// Scale of block b, and the addend that makes decode(q) = fma(table[q], scale, addend) equal
// decode_value without a branch on the rule in the inner loops.
__device__ __forceinline__ float scale_of(const Weight& w, int64_t b) { return block_scale(w.scales, b); }
__device__ __forceinline__ float addend_of(const Weight& w, int64_t b) {
  return decode_addend(w.rule == kMinmax ? w.offsets[b] : 0.0f, w.rule);
}
__device__ __forceinline__ float decode(const Weight& w, int q, float scale, float addend) {
  return __fmaf_rn(w.table[q], scale, addend);
}

// Element e of the flat weight, decoded (the slow general path).
template <int BITS>
__device__ __forceinline__ float element(const Weight& w, int64_t e) {
  const int q = BITS == 4 ? nibble_at(w.packed, e) : w.packed[e];
  const int64_t b = block_of(w, e);
  return decode(w, q, scale_of(w, b), addend_of(w, b));
}

inline int shift_of(int64_t v) {
  for (int k = 0; k < 63; ++k) {
    if ((int64_t{1} << k) == v) return k;
  }
  return -1;
}

}  // namespace qengine::cuda
