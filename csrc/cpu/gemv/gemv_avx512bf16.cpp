// AVX512-BF16 fused 4-bit GEMV for bfloat16 activations: the gemv4_bf16 of the gemv family's
// avx512_bf16 row (gemv_avx512.cpp).
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#include "cpu/common/ladder.h"
#include "cpu/common/simd_avx512.h"
#include "cpu/gemv/kernels.h"

namespace qengine::cpu {
namespace {

// Like gemv_avx512.cpp's gemv4, but the decoded table values are bfloat16 and each vdpbf16ps does 32
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
  // Two chains per row of x when there are few rows (the latency of four dependent vdpbf16ps
  // would show), one when M rows already give the core enough independent chains.
  constexpr bool kTwoChains = M < 4;
  const __m512i tbl = bf16_table32(table);
  const TileGeometry g = tile_geometry(K, blocksize, c0, c1);
  gemv_rows<M>(g, scales, o0, o1, c0, c1, y, ldy, [&](int64_t o, int64_t c, __m512 (&t)[M]) {
    __m512i d = _mm512_loadu_si512(chunk_codes(packed, K, o, c, g.prefetch_ahead));
    const uint16_t* xc = xr + c * 128 * M;
    // Step j, row m of this chunk's x (32 bfloat16 values).
    const auto xload = [xc](int j, int m) { return (__m512bh)_mm512_loadu_si512(xc + (j * M + m) * 32); };
    __m512 t1[M];
    __m512bh w = (__m512bh)_mm512_permutexvar_epi16(d, tbl);
    for (int m = 0; m < M; ++m) t[m] = _mm512_dpbf16_ps(_mm512_setzero_ps(), w, xload(0, m));
    d = _mm512_srli_epi16(d, 4);
    w = (__m512bh)_mm512_permutexvar_epi16(d, tbl);
    for (int m = 0; m < M; ++m) {
      if constexpr (kTwoChains) t1[m] = _mm512_dpbf16_ps(_mm512_setzero_ps(), w, xload(1, m));
      else t[m] = _mm512_dpbf16_ps(t[m], w, xload(1, m));
    }
    d = _mm512_srli_epi16(d, 4);
    w = (__m512bh)_mm512_permutexvar_epi16(d, tbl);
    for (int m = 0; m < M; ++m) t[m] = _mm512_dpbf16_ps(t[m], w, xload(2, m));
    d = _mm512_srli_epi16(d, 4);
    w = (__m512bh)_mm512_permutexvar_epi16(d, tbl);
    for (int m = 0; m < M; ++m) {
      if constexpr (kTwoChains) t1[m] = _mm512_dpbf16_ps(t1[m], w, xload(3, m));
      else t[m] = _mm512_dpbf16_ps(t[m], w, xload(3, m));
    }
    if constexpr (kTwoChains) {
      for (int m = 0; m < M; ++m) t[m] = _mm512_add_ps(t[m], t1[m]);
    }
  });
}

// For blocksize >= 64 the block scale is folded into the table instead: each chunk's table
// holds bfloat16(value * scale) of its two blocks (one per 256-bit half: lanes 0-7 cover
// elements 0..63, lanes 8-15 elements 64..127), so the partial sums need no per-chunk scale
// multiply and every row of x accumulates straight into its register. Each weight is then
// rounded once, from its float32 dequantized value: exactly the weight dense bfloat16 F.linear
// multiplies. vpermw reads index bits 0-4; bit 4 is set to the word's block (for blocksize 64;
// for larger blocks both halves are equal and bit 4 may stay the next nibble's bit). R weight
// rows share every load of x (R = 2 halves the loads, which bound the kernel for M >= 4).
template <int M, int R, bool kTwoBlocks>
void gemv4_bf16_scaled_impl(const uint16_t* xr, int64_t K, const uint8_t* packed, const float* table,
                            const BlockScales& scales, const TileGeometry& g, int64_t o, int64_t c0, int64_t c1,
                            float* y, int64_t ldy) {
  const __m512 tf = _mm512_loadu_ps(table);
  const __m512i bit4 = _mm512_set1_epi16(0x10);
  const __m512i upper_half = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(0x10), 1);
  alignas(64) float scale_buf[R][kMaxTileBlocks];
  const uint8_t* row[R];
  const float* rs[R];
  // The same chunk two groups of R rows ahead, into L2: these R rows are read in step, so
  // prefetching ahead within a row would reach only into rows already being read, and lines
  // fetched that far ahead into L1 would be evicted by the stream of x before their turn.
  const int64_t prefetch_ahead = 2 * R * (K >> 1);
  __m512 acc[R][M];
  for (int r = 0; r < R; ++r) {
    row[r] = packed + ((o + r) * K >> 1);
    rs[r] = tile_scales(scales, (o + r) * g.blocks_per_row + g.rb_lo, g.rb_count, scale_buf[r]) - g.rb_lo;
    for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
  }
  for (int64_t c = c0; c < c1; ++c) {
    const uint16_t* xc = xr + c * 128 * M;
    const int64_t b = (c * 128) >> g.log2_blocksize;
    __m512i tbl[R], d[R];
    for (int r = 0; r < R; ++r) {
      _mm_prefetch(reinterpret_cast<const char*>(row[r] + c * 64 + prefetch_ahead), _MM_HINT_T1);
      const __m512 lo = _mm512_mul_ps(tf, _mm512_set1_ps(rs[r][b]));
      const __m512 hi = kTwoBlocks ? _mm512_mul_ps(tf, _mm512_set1_ps(rs[r][b + 1])) : lo;
      tbl[r] = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
      d[r] = _mm512_loadu_si512(row[r] + c * 64);
    }
    for (int j = 0; j < 4; ++j) {
      __m512bh w[R];
      for (int r = 0; r < R; ++r) {
        if (j > 0) d[r] = _mm512_srli_epi16(d[r], 4);
        // bit 4 of each index word := its block (ternary 0xB8: bit4 ? upper_half : d)
        const __m512i idx = kTwoBlocks ? _mm512_ternarylogic_epi32(d[r], bit4, upper_half, 0xB8) : d[r];
        w[r] = (__m512bh)_mm512_permutexvar_epi16(idx, tbl[r]);
      }
      for (int m = 0; m < M; ++m) {
        const __m512bh xv = (__m512bh)_mm512_loadu_si512(xc + (j * M + m) * 32);
        for (int r = 0; r < R; ++r) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], w[r], xv);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int m = 0; m < M; ++m) y[m * ldy + o + r] += _mm512_reduce_add_ps(acc[r][m]);
  }
}

template <int M>
void gemv4_bf16_scaled(const uint16_t* xr, int64_t K, const uint8_t* packed, int64_t blocksize, const float* table,
                       const BlockScales& scales, int64_t o0, int64_t o1, int64_t c0, int64_t c1, float* y,
                       int64_t ldy) {
  const TileGeometry g = tile_geometry(K, blocksize, c0, c1);
  int64_t o = o0;
  if (g.log2_blocksize == 6) {
    for (; o + 2 <= o1; o += 2) gemv4_bf16_scaled_impl<M, 2, true>(xr, K, packed, table, scales, g, o, c0, c1, y, ldy);
    if (o < o1) gemv4_bf16_scaled_impl<M, 1, true>(xr, K, packed, table, scales, g, o, c0, c1, y, ldy);
  } else {
    for (; o + 2 <= o1; o += 2) gemv4_bf16_scaled_impl<M, 2, false>(xr, K, packed, table, scales, g, o, c0, c1, y, ldy);
    if (o < o1) gemv4_bf16_scaled_impl<M, 1, false>(xr, K, packed, table, scales, g, o, c0, c1, y, ldy);
  }
}

}  // namespace

void gemv4_bf16_avx512bf16(const uint16_t* xr, int64_t M, int64_t K, const uint8_t* packed, int64_t blocksize,
                           const float* table, const BlockScales& scales, int64_t o0, int64_t o1, int64_t c0,
                           int64_t c1, float* y, int64_t ldy) {
  with_rows<8>(M, [&](auto rows) {
    // One or two rows of x are bound by the weight stream, not the core: the kernel with the
    // fewest instructions per chunk serves them; from three rows on the folded scales win.
    if (rows >= 3 && blocksize >= 64) {
      gemv4_bf16_scaled<rows>(xr, K, packed, blocksize, table, scales, o0, o1, c0, c1, y, ldy);
    } else {
      gemv4_bf16_impl<rows>(xr, K, packed, blocksize, table, scales, o0, o1, c0, c1, y, ldy);
    }
  });
}

}  // namespace qengine::cpu
#endif
