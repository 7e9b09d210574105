// The gemv family: its per-ISA table (gemv_scalar / _avx2 / _avx512.cpp fill the rows by field
// name) and RowProduct, the small-batch dequantize-matmul that matmul.cpp, moe.cpp and the 2:4
// layout (sparse/sparse24.cpp) run by output-row ranges.
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

#include "cpu/common/byte_planes.h"
#include "cpu/common/isa.h"
#include "qengine/quant_math.h"

namespace qengine::cpu {

struct GemvKernels {
  // y[m * ldy] = dot(x[m * ldx .. + K], w[0..K)) for m < M (float32; a tiny GEMV tile).
  void (*dot_rows)(const float* x, int64_t M, int64_t K, int64_t ldx, const float* w, float* y, int64_t ldy);
  // acc[m * lda + k] += g[m * ldg] * w[k] for m < M, k < K (the transposed product).
  void (*axpy_rows)(const float* g, int64_t M, int64_t ldg, const float* w, int64_t K, float* acc, int64_t lda);
  // Optional fast path (null where absent): y[m * ldy + o] += dot(x[m], W[o]) for m < M <= 8 and
  // rows o in [o0, o1) of a 4-bit absmax weight with K % blocksize == 0 and blocksize a power of
  // two >= 16, decoding in registers (no dense row is written anywhere). xr holds the M rows of
  // x interleaved in nibble order (nibble_order_x in matmul.cpp). Adds the dot products over the
  // whole 128-element chunks [c0, c1) of each row to y (K tiles keep the slice of x in L1);
  // c1 - c0 <= 64 and the tile spans at most 256 blocks. (RowProduct runs a row's last K % 128
  // elements as one more chunk of a zero-padded copy.)
  void (*gemv4)(const float* xr, int64_t M, int64_t K, const uint8_t* packed, int64_t blocksize, const float* table,
                const BlockScales& scales, int64_t o0, int64_t o1, int64_t c0, int64_t c1, float* y,
                int64_t ldy) = nullptr;
  // Optional fast path (null where absent): gemv4 for a 4-bit minmax weight (uint4, GGUF Q4_1 /
  // Q4_K), each weight decoded in registers as decode_value's fma(table[q], scale, offset);
  // offsets[o * (K / blocksize) + b] is block b of row o.
  void (*gemv4_affine)(const float* xr, int64_t M, int64_t K, const uint8_t* packed, int64_t blocksize,
                       const float* table, const BlockScales& scales, const float* offsets, int64_t o0, int64_t o1,
                       int64_t c0, int64_t c1, float* y, int64_t ldy) = nullptr;
  // Optional fast path (null where absent): gemv4 for bfloat16 x, with the weights rounded to
  // bfloat16 once (the table values, or from three rows of x and blocksize >= 64 the dequantized
  // weights: the precision dense bfloat16 F.linear gives them) and float32 accumulation; xr
  // holds the rows in bfloat16 pair order (bf16_pair_order_x in matmul.cpp).
  void (*gemv4_bf16)(const uint16_t* xr, int64_t M, int64_t K, const uint8_t* packed, int64_t blocksize,
                     const float* table, const BlockScales& scales, int64_t o0, int64_t o1, int64_t c0, int64_t c1,
                     float* y, int64_t ldy) = nullptr;
  // Optional fast path (null where absent; call only where vbmi_scales_available()): gemv4 and
  // gemv4_affine for 8-bit codes (one a byte, K bytes a row), the table as byte planes; offsets
  // null for absmax weights, else the minmax offsets as in gemv4_affine. xr in nibble order.
  void (*gemv8)(const float* xr, int64_t M, int64_t K, const uint8_t* codes, int64_t blocksize,
                const ScalePlanes& table, const BlockScales& scales, const float* offsets, int64_t o0, int64_t o1,
                int64_t c0, int64_t c1, float* y, int64_t ldy) = nullptr;
};

extern const GemvKernels kGemvScalar;
#if defined(__x86_64__) || defined(_M_X64)
extern const GemvKernels kGemvAvx2;
extern const GemvKernels kGemvAvx512;
extern const GemvKernels kGemvAvx512Bf16;  // the avx512 row plus gemv4_bf16
// gemv8_avx512vbmi.cpp: the gemv8 of the AVX-512 rows.
void gemv8_avx512vbmi(const float* xr, int64_t M, int64_t K, const uint8_t* codes, int64_t blocksize,
                      const ScalePlanes& table, const BlockScales& scales, const float* offsets, int64_t o0,
                      int64_t o1, int64_t c0, int64_t c1, float* y, int64_t ldy);
// gemv_avx512bf16.cpp: the gemv4_bf16 of the avx512_bf16 row.
void gemv4_bf16_avx512bf16(const uint16_t* xr, int64_t M, int64_t K, const uint8_t* packed, int64_t blocksize,
                           const float* table, const BlockScales& scales, int64_t o0, int64_t o1, int64_t c0,
                           int64_t c1, float* y, int64_t ldy);
#endif

// The row of the active ISA (isa.h).
const GemvKernels& gemv_kernels();

// Double-quantized scales decoded in bulk without gathers (scales_avx512vbmi.cpp): out[i] =
// block_scale(s, b_lo + i) for i < count, bit for bit (s nested, its nested_shift >= 0). Call
// only where vbmi_scales_available(); Zen 4 takes ~27 cycles per 16-lane gather, a fifth of a
// one-row GEMV.
void decode_nested_scales_vbmi(const BlockScales& s, const ScalePlanes& planes, int64_t b_lo, int64_t count,
                               float* out);

// The byte planes decode_nested_scales_vbmi reads for a nested scale table of nblocks scales,
// where this CPU decodes them with VBMI (else null: the kernels gather per row).
inline std::unique_ptr<ScalePlanes> scale_planes(const BlockScales& scales, int64_t nblocks) {
  if (scales.values == nullptr && scales.nested_shift >= 0 && nblocks < (int64_t{1} << 30) &&
      vbmi_scales_available()) {
    return std::make_unique<ScalePlanes>(scales.table);
  }
  return nullptr;
}

// Runs rows(a, b, plain) over consecutive ranges [a, b) of weight rows [n0, n1), plain holding
// rows a..b-1's scales (per_row blocks a row) decoded in bulk by decode_nested_scales_vbmi, as
// rows [0, b - a): a few rows at a time (16 KiB, in L1 while the kernel reads them).
template <class Rows>
void with_bulk_scales(const BlockScales& s, const ScalePlanes& planes, int64_t per_row, int64_t n0, int64_t n1,
                      Rows&& rows) {
  const int64_t step = per_row >= 4096 ? 1 : 4096 / per_row;
  std::unique_ptr<float[]> plain(new float[static_cast<size_t>(step * per_row)]);  // written before read
  for (int64_t a = n0; a < n1; a += step) {
    const int64_t b = n1 - a < step ? n1 : a + step;
    decode_nested_scales_vbmi(s, planes, a * per_row, (b - a) * per_row, plain.get());
    rows(a, b, BlockScales{plain.get(), nullptr, nullptr, nullptr, 1, 0.0f, 0});
  }
}

// A small-batch dequantize-matmul prepared once and computed by output-row ranges, so that a
// caller can spread the rows of several products (the experts of a MoE layer) over one
// parallel region. matmul_cpu is one RowProduct run over all its rows.
class RowProduct {
 public:
  // y[M, N] (float32, row stride N) = x[M, K] (x_dtype, row stride ldx) @ W^T for the quantized
  // W [N, K]. Copies x into the kernel's order now; the pointers must outlive run(). Arguments
  // are checked by the caller (see valid_product).
  RowProduct(const void* x, int x_dtype, int64_t M, int64_t K, int64_t ldx, int64_t N, const uint8_t* packed,
             int64_t blocksize, const Codebook& cb, int rule, const BlockScales& scales, const float* offsets,
             float* y);
  // Overwrites rows [n0, n1) of every row of y (columns n0..n1 of y's M rows).
  void run(int64_t n0, int64_t n1) const;
  // Output rows per thread below which splitting costs more than it saves.
  int64_t min_rows() const { return min_rows_; }

 private:
  enum class Path { kFusedFloat, kFusedAffine, kFusedBf16, kFused8, kDecodeRows };
  // The active fused kernel on rows [o0, o1) of `packed` (codes_per_row codes a row; offsets:
  // the affine path's, row o's blocks from offsets + o * (codes_per_row / blocksize)), chunks
  // [c0, c1), mb rows of x from xf_ / xb_ + x_offset, into y (row stride N).
  void fused_kernel(int64_t x_offset, int64_t mb, int64_t codes_per_row, const uint8_t* packed,
                    const BlockScales& scales, const float* offsets, int64_t o0, int64_t o1, int64_t c0, int64_t c1,
                    float* y) const;
  // Adds the last K % 128 codes' share of rows [n0, n1) (fused paths, K not whole chunks).
  void run_tail(int64_t n0, int64_t n1) const;
  // The ISA row chosen at construction: the path depends on its slots, and set_isa from another
  // thread must not switch a product half way to a row without them.
  const GemvKernels& k_;
  Path path_;
  const void* x_;
  int x_dtype_;
  int64_t M_, K_, ldx_, N_;
  const uint8_t* packed_;
  int64_t blocksize_;
  Codebook cb_;
  int rule_;
  BlockScales scales_;
  const float* offsets_;
  float* y_;
  int64_t min_rows_;
  int64_t kp_ = 0;              // K rounded up to whole 128-code chunks (the fused kernels' x rows)
  std::vector<float> xf_;       // fused float32 kernels: x in nibble order; decode path: x as float32 rows
  std::vector<uint16_t> xb_;    // fused bfloat16 kernel: x in pair order
  // Fused kernels with double-quantized scales on a VBMI CPU: run() decodes a row range's scales
  // in bulk (no gathers) and hands the kernels plain ones.
  std::unique_ptr<ScalePlanes> planes_;
  // The 8-bit path's codebook as byte planes.
  std::unique_ptr<ScalePlanes> table_planes_;
};

// The checks matmul_cpu applies to its arguments.
bool valid_product(int x_dtype, int64_t M, int64_t K, int64_t ldx, int64_t N, int64_t blocksize, const Codebook& cb);

// x as contiguous float32 rows (the fallback kernels' input): a view when it already is.
const float* float_rows(const void* x, int dtype, int64_t M, int64_t K, int64_t ldx, std::vector<float>& buf);

// Runs kernel(m, mb, c0, c1) over the groups of mb <= 8 rows of x starting at m and the K tiles
// [c0, c1) of `chunks` chunks, tile(mb) chunks long: the loop order of every fused GEMV.
template <class Tile, class Kernel>
inline void for_row_groups_and_tiles(int64_t M, int64_t chunks, Tile&& tile, Kernel&& kernel) {
  for (int64_t m = 0; m < M; m += 8) {
    const int64_t mb = M - m < 8 ? M - m : 8;
    const int64_t t = tile(mb);
    for (int64_t c = 0; c < chunks; c += t) kernel(m, mb, c, c + t < chunks ? c + t : chunks);
  }
}

}  // namespace qengine::cpu
