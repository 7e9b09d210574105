// The quantize family's per-ISA table (quantize_scalar / _avx2 / _avx512.cpp each fill one
// row by field name) and the scalar building blocks the SIMD rows use for heads and tails.
// The drivers (quantize.cpp, dequantize.cpp, kmeans.cpp) own threading and layout.
#pragma once
#include <cmath>
#include <cstdint>

#include "cpu/common/isa.h"
#include "cpu/common/ladder.h"
#include "qengine/quant_math.h"

namespace qengine::cpu {

struct QuantizeKernels {
  // Min, max, absmax and a non-finite flag over x[0..len) (any dtype).
  void (*block_stats)(const void* x, int dtype, int64_t len, BlockStats* out);
  // Storage codes (one per byte) of x[0..len), normalised by `norm`.
  void (*encode)(const void* x, int dtype, int64_t len, const BlockNorm& norm, int rule,
                 const Codebook& cb, uint8_t* codes);
  // out[0..len) = decoded elements first..first+len of one block of `packed`. `stream`
  // asks for non-temporal stores (large outputs that will not be read back soon).
  void (*decode)(const uint8_t* packed, int64_t first, int64_t len, const Codebook& cb,
                 float scale, float offset, int rule, void* out, int out_dtype, bool stream);
  // Optional fast path (null where absent): decodes `count` whole blocks of a 4-bit format from
  // block `first_block` on (blocksize % 32 == 0) into out, with the block loop inside.
  void (*decode_blocks4)(const uint8_t* packed, int64_t first_block, int64_t count, int64_t blocksize,
                         const float* table, int rule, const float* scales, const float* offsets, void* out,
                         int out_dtype, bool stream) = nullptr;
  // Optional fast path (null where absent): quantizes the full blocks b0..b1 of a 4-bit format
  // whose blocksize is a multiple of 32, writing scales/offsets and packed bytes directly.
  // Returns a Status.
  int (*quantize_blocks4)(const void* x, int dtype, int64_t blocksize, int64_t b0, int64_t b1, const Codebook& cb,
                          int rule, uint8_t* packed, float* scales, float* offsets) = nullptr;
};

extern const QuantizeKernels kQuantizeScalar;
#if defined(__x86_64__) || defined(_M_X64)
extern const QuantizeKernels kQuantizeAvx2;
extern const QuantizeKernels kQuantizeAvx512;
#endif

// The row of the active ISA (isa.h).
const QuantizeKernels& quantize_kernels();

void scalar_block_stats(const void* x, int dtype, int64_t len, BlockStats* out);
void scalar_encode(const void* x, int dtype, int64_t len, const BlockNorm& norm, int rule,
                   const Codebook& cb, uint8_t* codes);
void scalar_decode(const uint8_t* packed, int64_t first, int64_t len, const Codebook& cb,
                   float scale, float offset, int rule, void* out, int out_dtype, bool stream);

// Decodes elements [first, first + count) of a quantized tensor into out (out_dtype), block
// by block through k.decode (dequantize.cpp); used by dequantize and the matmul fallbacks.
void decode_span(const QuantizeKernels& k, const uint8_t* packed, int64_t first, int64_t count, int64_t blocksize,
                 const Codebook& cb, int rule, const BlockScales& scales, const float* offsets, void* out,
                 int out_dtype, bool stream);

static inline void merge_stats(BlockStats* into, const BlockStats& s) {
  into->nonfinite = into->nonfinite || s.nonfinite;
  into->min = s.min < into->min ? s.min : into->min;
  into->max = s.max > into->max ? s.max : into->max;
  into->absmax = s.absmax > into->absmax ? s.absmax : into->absmax;
}

// The scalar kernels on elements [i, len) that a SIMD row's loop left over (no-ops when i >= len).
inline void block_stats_tail(const void* x, int dtype, int64_t i, int64_t len, BlockStats* s) {
  if (i >= len) return;
  BlockStats tail;
  scalar_block_stats(static_cast<const char*>(x) + i * dtype_size(dtype), dtype, len - i, &tail);
  merge_stats(s, tail);
  s->absmax = std::fmax(std::fabs(s->min), std::fabs(s->max));  // +0 for an all-zero block
}

inline void encode_tail(const void* x, int dtype, int64_t i, int64_t len, const BlockNorm& norm, int rule,
                        const Codebook& cb, uint8_t* codes) {
  if (i < len) scalar_encode(static_cast<const char*>(x) + i * dtype_size(dtype), dtype, len - i, norm, rule, cb, codes + i);
}

// Elements first + i .. first + len of a block into out[i .. len).
inline void decode_tail(const uint8_t* packed, int64_t first, int64_t i, int64_t len, const Codebook& cb, float scale,
                        float offset, int rule, void* out, int out_dtype) {
  if (i < len) {
    scalar_decode(packed, first + i, len - i, cb, scale, offset, rule,
                  static_cast<char*>(out) + i * dtype_size(out_dtype), out_dtype, false);
  }
}

// The template parameters of the SIMD rows' loops from their runtime values, one ladder for all
// rows: f(dtype, rule, divide, bits) for encode loops, f(out_dtype, rule) for decode loops.
template <class F>
inline void with_encode_params(int dtype, int rule, bool divide, int bits, F&& f) {
  with_dtype(dtype, [&](auto dt) {
    with_rule(rule, [&](auto r) {
      with_bool(divide, [&](auto d) { with_bits(bits, [&](auto b) { f(dt, r, d, b); }); });
    });
  });
}

template <class F>
inline decltype(auto) with_decode_params(int out_dtype, int rule, F&& f) {
  return with_dtype(out_dtype, [&](auto dt) { return with_rule(rule, [&](auto r) { return f(dt, r); }); });
}

}  // namespace qengine::cpu
