// AVX512-BF16 fused 4-bit GEMV for bfloat16 activations; the gemv4_bf16 entry of the
// avx512_bf16 table. Compiled with -mavx512bf16 only here.
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#include "cpu/gemv_tiles.h"
#include "cpu/kernels.h"
#include "qengine/dtype.h"

namespace qengine::cpu {
namespace {

// Like avx512_gemv4, but the decoded table values are bfloat16 and each vdpbf16ps does 32
// multiply-adds (twice an FMA's), so the weights are read with half the instructions and x
// with half the bytes. The weights get exactly the precision dense bfloat16 F.linear gives
// them (one rounding of the table value; the float32 block scale is applied per chunk).
//
// One 64-byte load holds 128 codes as 32 words of 4 nibbles; vpermw reads the low 5 bits of
// each word, so the 16-entry table is stored twice (bit 4, the next nibble's low bit, is then
// ignored) and shifting the words by 4 bits three times walks all 4 nibbles. Word i of step j
// holds element 4i + kPairOrder[j]; float32 lane l of vdpbf16ps sums words 2l and 2l+1, i.e.
// elements 8l..8l+7 of the chunk: the same lanes-to-blocks map as the float32 kernel.
// xr[c*128*M + (j*M + m)*32 + i] = x[m][c*128 + 4i + kPairOrder[j]] (bf16_pair_order_x).
template <int M>
void gemv4_bf16_impl(const uint16_t* xr, int64_t K, const uint8_t* packed, int64_t blocksize, const float* table,
                     const BlockScales& scales, int64_t o0, int64_t o1, int64_t c0, int64_t c1, float* y,
                     int64_t ldy) {
  constexpr bool kTwoChains = M < 4;
  // Step j, row m of this chunk's x (32 bfloat16 values).
  const auto xload = [](const uint16_t* xc, int j, int m) {
    return (__m512bh)_mm512_loadu_si512(xc + (j * M + m) * 32);
  };
  alignas(64) uint16_t table16[32];
  for (int i = 0; i < 32; ++i) table16[i] = float_to_bf16(table[i & 15]);
  const __m512i tbl = _mm512_load_si512(table16);
  const TileGeometry g = tile_geometry(K, blocksize, c0, c1);
  alignas(64) float scale_buf[kMaxTileBlocks];
  for (int64_t o = o0; o < o1; ++o) {
    __m512 acc[M];
    for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
    const uint8_t* row = packed + (o * K >> 1);
    const float* rs = tile_scales(scales, o * g.blocks_per_row + g.rb_lo, g.rb_count, scale_buf) - g.rb_lo;
    for (int64_t c = c0; c < c1; ++c) {
      _mm_prefetch(reinterpret_cast<const char*>(row + c * 64 + g.prefetch_ahead), _MM_HINT_T0);
      __m512i d = _mm512_loadu_si512(row + c * 64);
      const uint16_t* xc = xr + c * 128 * M;
      const __m512 sc = chunk_scales(rs, c, g.log2_blocksize);
      // Unscaled partial sums of this chunk: two chains per row of x when there are few rows
      // (the latency of four dependent vdpbf16ps would show), one when M rows already give
      // the core enough independent chains (then the per-chunk add is saved).
      __m512 t0[M], t1[M];
      __m512bh w = (__m512bh)_mm512_permutexvar_epi16(d, tbl);
      for (int m = 0; m < M; ++m) t0[m] = _mm512_dpbf16_ps(_mm512_setzero_ps(), w, xload(xc, 0, m));
      d = _mm512_srli_epi16(d, 4);
      w = (__m512bh)_mm512_permutexvar_epi16(d, tbl);
      for (int m = 0; m < M; ++m) {
        if constexpr (kTwoChains) t1[m] = _mm512_dpbf16_ps(_mm512_setzero_ps(), w, xload(xc, 1, m));
        else t0[m] = _mm512_dpbf16_ps(t0[m], w, xload(xc, 1, m));
      }
      d = _mm512_srli_epi16(d, 4);
      w = (__m512bh)_mm512_permutexvar_epi16(d, tbl);
      for (int m = 0; m < M; ++m) t0[m] = _mm512_dpbf16_ps(t0[m], w, xload(xc, 2, m));
      d = _mm512_srli_epi16(d, 4);
      w = (__m512bh)_mm512_permutexvar_epi16(d, tbl);
      for (int m = 0; m < M; ++m) {
        if constexpr (kTwoChains) t1[m] = _mm512_dpbf16_ps(t1[m], w, xload(xc, 3, m));
        else t0[m] = _mm512_dpbf16_ps(t0[m], w, xload(xc, 3, m));
      }
      if constexpr (kTwoChains) {
        for (int m = 0; m < M; ++m) acc[m] = _mm512_fmadd_ps(_mm512_add_ps(t0[m], t1[m]), sc, acc[m]);
      } else {
        for (int m = 0; m < M; ++m) acc[m] = _mm512_fmadd_ps(t0[m], sc, acc[m]);
      }
    }
    for (int m = 0; m < M; ++m) y[m * ldy + o] += _mm512_reduce_add_ps(acc[m]);
  }
}

template <int M>
void dispatch(int64_t m, const uint16_t* xr, int64_t K, const uint8_t* packed, int64_t bs, const float* table,
              const BlockScales& sc, int64_t o0, int64_t o1, int64_t c0, int64_t c1, float* y, int64_t ldy) {
  if constexpr (M > 1) {
    if (m < M) return dispatch<M - 1>(m, xr, K, packed, bs, table, sc, o0, o1, c0, c1, y, ldy);
  }
  gemv4_bf16_impl<M>(xr, K, packed, bs, table, sc, o0, o1, c0, c1, y, ldy);
}

}  // namespace

void avx512_gemv4_bf16(const uint16_t* xr, int64_t M, int64_t K, const uint8_t* packed, int64_t blocksize,
                       const float* table, const BlockScales& scales, int64_t o0, int64_t o1, int64_t c0, int64_t c1,
                       float* y, int64_t ldy) {
  dispatch<8>(M, xr, K, packed, blocksize, table, scales, o0, o1, c0, c1, y, ldy);
}

}  // namespace qengine::cpu
#endif
