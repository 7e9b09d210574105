// AVX512-BF16 GEMV of the 2:4 sparse layout (4-bit absmax codes, bfloat16 activations): the
// gemv_bf16 of the 2:4 family's avx512_bf16 row (sparse24_avx512.cpp).
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#include "cpu/common/ladder.h"
#include "cpu/common/simd_avx512.h"
#include "cpu/sparse/sparse24.h"

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
void gemv_rows_bf16(const uint16_t* x, int64_t ldx, int64_t K, const uint8_t* packed, const uint8_t* positions,
                    int64_t blocksize, const float* table, const BlockScales& scales, int64_t o0, int64_t o1,
                    int64_t c0, int64_t c1, float* y, int64_t ldy) {
  constexpr bool kTwoChains = M < 4;
  const __m512i tbl = bf16_table32(table);
  alignas(64) uint16_t base16[32];
  for (int i = 0; i < 32; ++i) base16[i] = static_cast<uint16_t>((i >> 1) << 2);
  const __m512i base = _mm512_load_si512(base16);
  const __m512i three = _mm512_set1_epi16(3);
  const int64_t ks = K / 2;  // stored values per row
  const TileGeometry g = tile_geometry(ks, blocksize, c0, c1);
  gemv_rows<M>(g, scales, o0, o1, c0, c1, y, ldy, [&](int64_t o, int64_t c, __m512 (&t)[M]) {
    __m512i d = _mm512_loadu_si512(chunk_codes(packed, ks, o, c, g.prefetch_ahead));
    const uint8_t* pos = chunk_positions24(positions, ks, o, c, g.prefetch_ahead);
    __m512i p = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(pos)));
    const uint16_t* xc = x + c * 256;
    __m512 t1[M];
    for (int m = 0; m < M; ++m) {
      t[m] = _mm512_setzero_ps();
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
        else t[m] = _mm512_dpbf16_ps(t[m], w, xs);
      }
    }
    if constexpr (kTwoChains) {
      for (int m = 0; m < M; ++m) t[m] = _mm512_add_ps(t[m], t1[m]);
    }
  });
}

}  // namespace

void sparse24_gemv_avx512bf16(const uint16_t* x, int64_t M, int64_t ldx, int64_t K, const uint8_t* packed,
                              const uint8_t* positions, int64_t blocksize, const float* table,
                              const BlockScales& scales, int64_t o0, int64_t o1, int64_t c0, int64_t c1, float* y,
                              int64_t ldy) {
  with_rows<8>(M, [&](auto rows) {
    gemv_rows_bf16<rows>(x, ldx, K, packed, positions, blocksize, table, scales, o0, o1, c0, c1, y, ldy);
  });
}

}  // namespace qengine::cpu
#endif
