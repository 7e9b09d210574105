// AVX512-BF16 GEMV of the 2:4 sparse layout (4-bit absmax codes, bfloat16 activations).
// Compiled with -mavx512bf16 only here; chosen by sparse24.cpp when the avx512_bf16 table is active.
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#include "cpu/gemv_tiles.h"
#include "cpu/sparse24.h"
#include "qengine/dtype.h"

namespace qengine::cpu {
namespace {

// One chunk = 64 bytes of codes (128 kept values, 256 weights) + 32 bytes of positions. As in
// the dense bfloat16 GEMV, the codes are 32 words of 4 nibbles and vpermw decodes one nibble
// of every word per step (the 16-entry table stored twice: vpermw reads 5 index bits). The
// layout puts, at step j, the kept values of groups 16j..16j+15 in the words: word i is kept
// value i % 2 of group 16j + i / 2, at weight 64j + 4 * (i / 2) + position. So the matching
// x values come from one 64-weight window (two registers) with one vpermt2w whose index is
// base(i) = 4 * (i / 2) plus the 2-bit position: ((P >> 2j) & 3) | base, one ternary-logic op,
// with P the 32 position bytes widened to words. vdpbf16ps lane l sums words 2l and 2l + 1 =
// storage elements 8l..8l+7 of the chunk, the dense kernel's lanes-to-blocks map, so the
// block scales are applied per chunk exactly as there. Half the codes, a quarter fewer bytes
// than the dense layout, and the extra x selection is 3 cheap ops per 32 kept values.
template <int M>
void sgemv_impl(const uint16_t* x, int64_t ldx, int64_t K, const uint8_t* packed, const uint8_t* positions,
                int64_t blocksize, const float* table, const BlockScales& scales, int64_t o0, int64_t o1, int64_t c0,
                int64_t c1, float* y, int64_t ldy) {
  constexpr bool kTwoChains = M < 4;
  alignas(64) uint16_t table16[32];
  for (int i = 0; i < 32; ++i) table16[i] = float_to_bf16(table[i & 15]);
  const __m512i tbl = _mm512_load_si512(table16);
  alignas(64) uint16_t base16[32];
  for (int i = 0; i < 32; ++i) base16[i] = static_cast<uint16_t>((i >> 1) << 2);
  const __m512i base = _mm512_load_si512(base16);
  const __m512i three = _mm512_set1_epi16(3);
  const int64_t ks = K / 2;  // stored values per row
  const TileGeometry g = tile_geometry(ks, blocksize, c0, c1);
  alignas(64) float scale_buf[kMaxTileBlocks];
  for (int64_t o = o0; o < o1; ++o) {
    __m512 acc[M];
    for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
    const uint8_t* row = packed + (o * ks >> 1);
    const uint8_t* prow = positions + (o * ks >> 2);
    const float* rs = tile_scales(scales, o * g.blocks_per_row + g.rb_lo, g.rb_count, scale_buf) - g.rb_lo;
    for (int64_t c = c0; c < c1; ++c) {
      _mm_prefetch(reinterpret_cast<const char*>(row + c * 64 + g.prefetch_ahead), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(prow + c * 32 + (g.prefetch_ahead >> 1)), _MM_HINT_T0);
      __m512i d = _mm512_loadu_si512(row + c * 64);
      __m512i p = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(prow + c * 32)));
      const uint16_t* xc = x + c * 256;
      const __m512 sc = chunk_scales(rs, c, g.log2_blocksize);
      __m512 t0[M], t1[M];
      for (int m = 0; m < M; ++m) {
        t0[m] = _mm512_setzero_ps();
        t1[m] = _mm512_setzero_ps();
      }
      for (int j = 0; j < 4; ++j) {
        const __m512bh w = (__m512bh)_mm512_permutexvar_epi16(d, tbl);
        const __m512i idx = _mm512_ternarylogic_epi32(p, three, base, 0xEA);  // (p & 3) | base
        d = _mm512_srli_epi16(d, 4);
        p = _mm512_srli_epi16(p, 2);
        for (int m = 0; m < M; ++m) {
          const uint16_t* xw = xc + m * ldx + 64 * j;
          const __m512i lo = _mm512_loadu_si512(xw);
          const __m512i hi = _mm512_loadu_si512(xw + 32);
          const __m512bh xs = (__m512bh)_mm512_permutex2var_epi16(lo, idx, hi);
          if (kTwoChains && (j & 1)) t1[m] = _mm512_dpbf16_ps(t1[m], w, xs);
          else t0[m] = _mm512_dpbf16_ps(t0[m], w, xs);
        }
      }
      for (int m = 0; m < M; ++m) {
        const __m512 t = kTwoChains ? _mm512_add_ps(t0[m], t1[m]) : t0[m];
        acc[m] = _mm512_fmadd_ps(t, sc, acc[m]);
      }
    }
    for (int m = 0; m < M; ++m) y[m * ldy + o] += _mm512_reduce_add_ps(acc[m]);
  }
}

template <int M>
void dispatch(int64_t m, const uint16_t* x, int64_t ldx, int64_t K, const uint8_t* packed, const uint8_t* positions,
              int64_t bs, const float* table, const BlockScales& sc, int64_t o0, int64_t o1, int64_t c0, int64_t c1,
              float* y, int64_t ldy) {
  if constexpr (M > 1) {
    if (m < M) return dispatch<M - 1>(m, x, ldx, K, packed, positions, bs, table, sc, o0, o1, c0, c1, y, ldy);
  }
  sgemv_impl<M>(x, ldx, K, packed, positions, bs, table, sc, o0, o1, c0, c1, y, ldy);
}

}  // namespace

void avx512bf16_sparse24_gemv(const uint16_t* x, int64_t M, int64_t ldx, int64_t K, const uint8_t* packed,
                              const uint8_t* positions, int64_t blocksize, const float* table,
                              const BlockScales& scales, int64_t o0, int64_t o1, int64_t c0, int64_t c1, float* y,
                              int64_t ldy) {
  dispatch<8>(M, x, ldx, K, packed, positions, blocksize, table, scales, o0, o1, c0, c1, y, ldy);
}

}  // namespace qengine::cpu
#endif
