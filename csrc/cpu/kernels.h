// The per-ISA building blocks of the CPU kernels. Each ISA file (kernels_scalar.cpp,
// kernels_avx2.cpp, kernels_avx512.cpp) fills one table; dispatch.cpp picks one at load.
// The drivers (quantize.cpp, dequantize.cpp, kmeans.cpp) own threading and layout.
#pragma once
#include <cstdint>

#include "cpu/optim_kernels.h"
#include "qengine/quant_math.h"

namespace qengine::cpu {

struct Kernels {
  const char* name;
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
                         int out_dtype, bool stream);
  // y[m * ldy] = dot(x[m * ldx .. + K], w[0..K)) for m < M (float32; a tiny GEMV tile).
  void (*dot_rows)(const float* x, int64_t M, int64_t K, int64_t ldx, const float* w, float* y, int64_t ldy);
  // acc[m * lda + k] += g[m * ldg] * w[k] for m < M, k < K (the transposed product).
  void (*axpy_rows)(const float* g, int64_t M, int64_t ldg, const float* w, int64_t K, float* acc, int64_t lda);
  // Optional fast path (null where absent): y[m * ldy + o] += dot(x[m], W[o]) for m < M <= 8 and
  // rows o in [o0, o1) of a 4-bit absmax weight with K % 128 == 0, K % blocksize == 0 and
  // blocksize a power of two >= 32, decoding in registers (no dense row is written anywhere).
  // xr holds the M rows of x interleaved in nibble order (nibble_order_x in matmul.cpp).
  // Adds the dot products over the 128-element chunks [c0, c1) of each row to y (K tiles keep
  // the slice of x in L1); c1 - c0 <= 64.
  void (*gemv4)(const float* xr, int64_t M, int64_t K, const uint8_t* packed, int64_t blocksize, const float* table,
                const BlockScales& scales, int64_t o0, int64_t o1, int64_t c0, int64_t c1, float* y, int64_t ldy);
  // Optional fast path (null where absent): quantizes the full blocks b0..b1 of a 4-bit format
  // whose blocksize is a multiple of 32, writing scales/offsets and packed bytes directly.
  // Returns a Status.
  int (*quantize_blocks4)(const void* x, int dtype, int64_t blocksize, int64_t b0, int64_t b1, const Codebook& cb,
                          int rule, uint8_t* packed, float* scales, float* offsets);
  // Optional fast path (null where absent): gemv4 for bfloat16 x, with the weights rounded to
  // bfloat16 once (the table values, or from three rows of x and blocksize >= 64 the dequantized
  // weights: the precision dense bfloat16 F.linear gives them) and float32 accumulation; xr
  // holds the rows in bfloat16 pair order (bf16_pair_order_x in matmul.cpp).
  void (*gemv4_bf16)(const uint16_t* xr, int64_t M, int64_t K, const uint8_t* packed, int64_t blocksize,
                     const float* table, const BlockScales& scales, int64_t o0, int64_t o1, int64_t c0, int64_t c1,
                     float* y, int64_t ldy);
  // The fused AdamW step's spans for 32-bit and 8-bit states (optim_kernels.h).
  AdamSpan32 adamw32;
  AdamSpan8 adamw8;
};

extern const Kernels kScalarKernels;
#if defined(__x86_64__) || defined(_M_X64)
extern const Kernels kAvx2Kernels;
extern const Kernels kAvx512Kernels;
// The avx512 table plus the AVX512-BF16 GEMV (CPUs with vdpbf16ps).
extern const Kernels kAvx512Bf16Kernels;
// gemv_avx512bf16.cpp
void avx512_gemv4_bf16(const uint16_t* xr, int64_t M, int64_t K, const uint8_t* packed, int64_t blocksize,
                       const float* table, const BlockScales& scales, int64_t o0, int64_t o1, int64_t c0, int64_t c1,
                       float* y, int64_t ldy);
// gemv_avx512.cpp
void avx512_gemv4(const float* xr, int64_t M, int64_t K, const uint8_t* packed, int64_t blocksize,
                  const float* table, const BlockScales& scales, int64_t o0, int64_t o1, int64_t c0, int64_t c1,
                  float* y, int64_t ldy);
#endif

// The table chosen at load (QENGINE_CPU_ISA may lower it); set_isa changes it at run time.
const Kernels& kernels();
const char* isa_name();
// Returns false when `name` is unknown or the CPU lacks it.
bool set_isa(const char* name);
// Comma-separated ISA names this CPU supports, best last.
const char* supported_isas();

// Scalar building blocks, also used by the SIMD files for heads and tails.
void scalar_block_stats(const void* x, int dtype, int64_t len, BlockStats* out);
void scalar_encode(const void* x, int dtype, int64_t len, const BlockNorm& norm, int rule,
                   const Codebook& cb, uint8_t* codes);
void scalar_decode(const uint8_t* packed, int64_t first, int64_t len, const Codebook& cb,
                   float scale, float offset, int rule, void* out, int out_dtype, bool stream);
void scalar_dot_rows(const float* x, int64_t M, int64_t K, int64_t ldx, const float* w, float* y, int64_t ldy);
void scalar_axpy_rows(const float* g, int64_t M, int64_t ldg, const float* w, int64_t K, float* acc, int64_t lda);

// Decodes elements [first, first + count) of a quantized tensor into out (out_dtype), block
// by block through k.decode (dequantize.cpp); used by dequantize and the matmul fallbacks.
void decode_span(const Kernels& k, const uint8_t* packed, int64_t first, int64_t count, int64_t blocksize,
                 const Codebook& cb, int rule, const BlockScales& scales, const float* offsets, void* out,
                 int out_dtype, bool stream);

static inline void merge_stats(BlockStats* into, const BlockStats& s) {
  into->nonfinite = into->nonfinite || s.nonfinite;
  into->min = s.min < into->min ? s.min : into->min;
  into->max = s.max > into->max ? s.max : into->max;
  into->absmax = s.absmax > into->absmax ? s.absmax : into->absmax;
}

}  // namespace qengine::cpu
