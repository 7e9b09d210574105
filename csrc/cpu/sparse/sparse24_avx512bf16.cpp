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
// value i % 2 of group 16j + i / 2, at weight 64j + 4 * (i / 2) + position. So the matching x
// values come from one 64-weight window (two registers) with one vpermt2w, whose index has 6
// bits: the 2-bit position and g = (i / 2), 4 bits. vpermt2w ignores the bits above them. With
// P the 32 position bytes widened to words (step j's position at bits 2j..2j+1), the index of
// step 0 is (P & 3) | 4g and that of step 1 (P & 12) | (g's bits 0-1 and 2-3 at bits 0-1 and
// 4-5): one ternary-logic op each, the position left where it lies. Steps 2 and 3 do the same
// on P >> 4. So the even steps read x's window as it is (index 4g + position) and the odd steps
// in "order B" (index = g's low bits | position << 2 | g's high bits << 4), from window_order_x's
// copy of x: 6 instructions a chunk for the positions (a widen, one shift, four ternary-logic
// ops) instead of 8 with each step's position shifted to bits 0-1.
// vdpbf16ps lane l sums words 2l and 2l + 1 = storage elements 8l..8l+7 of the chunk, the dense
// kernel's lanes-to-blocks map, so the block scales are applied per chunk exactly as there.

// Where order B puts weight 4g + p of a window.
constexpr int order_b(int g, int p) { return (g & 3) | (p << 2) | ((g >> 2) << 4); }

// Chunks [c0, c1) of M rows of x copied chunk by chunk, the rows of a chunk side by side (so
// the kernel addresses row m of chunk c at a fixed offset): row m's 256 weights of chunk c at
// xw[((c - c0) * M + m) * 256], the windows of steps 0 and 2 as they are, those of steps 1 and
// 3 in order B.
void window_order_x(const uint16_t* x, int64_t M, int64_t ldx, int64_t c0, int64_t c1, uint16_t* xw) {
  alignas(64) uint16_t from[64];
  for (int g = 0; g < 16; ++g) {
    for (int p = 0; p < 4; ++p) from[order_b(g, p)] = static_cast<uint16_t>(4 * g + p);
  }
  const __m512i from_lo = _mm512_load_si512(from), from_hi = _mm512_load_si512(from + 32);
  for (int64_t c = c0; c < c1; ++c) {
    for (int64_t m = 0; m < M; ++m) {
      const uint16_t* in = x + m * ldx + c * 256;
      uint16_t* out = xw + ((c - c0) * M + m) * 256;
      for (int j = 0; j < 4; ++j) {
        const __m512i lo = _mm512_loadu_si512(in + 64 * j), hi = _mm512_loadu_si512(in + 64 * j + 32);
        _mm512_storeu_si512(out + 64 * j, (j & 1) ? _mm512_permutex2var_epi16(lo, from_lo, hi) : lo);
        _mm512_storeu_si512(out + 64 * j + 32, (j & 1) ? _mm512_permutex2var_epi16(lo, from_hi, hi) : hi);
      }
    }
  }
}

// xw: window_order_x's copy of chunks [c0, c1).
template <int M>
void gemv_rows_bf16(const uint16_t* xw, int64_t K, const uint8_t* packed, const uint8_t* positions,
                    int64_t blocksize, const float* table, const BlockScales& scales, int64_t o0, int64_t o1,
                    int64_t c0, int64_t c1, float* y, int64_t ldy) {
  constexpr bool kTwoChains = M < 4;
  const __m512i tbl = bf16_table32(table);
  alignas(64) uint16_t even[32], odd[32];
  for (int i = 0; i < 32; ++i) {
    even[i] = static_cast<uint16_t>(4 * (i >> 1));
    odd[i] = static_cast<uint16_t>(order_b(i >> 1, 0));
  }
  const __m512i group_a = _mm512_load_si512(even), group_b = _mm512_load_si512(odd);
  const __m512i bits01 = _mm512_set1_epi16(3), bits23 = _mm512_set1_epi16(12);
  const int64_t ks = K / 2;  // stored values per row
  const TileGeometry g = tile_geometry(ks, blocksize, c0, c1);
  gemv_rows<M>(g, scales, o0, o1, c0, c1, y, ldy, [&](int64_t o, int64_t c, __m512 (&t)[M]) {
    __m512i d = _mm512_loadu_si512(chunk_codes(packed, ks, o, c, g.prefetch_ahead));
    const uint8_t* pos = chunk_positions24(positions, ks, o, c, g.prefetch_ahead);
    const __m512i p01 = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(pos)));
    const __m512i p23 = _mm512_srli_epi16(p01, 4);
    const uint16_t* xc = xw + (c - c0) * M * 256;
    __m512 t1[M];
    for (int m = 0; m < M; ++m) {
      t[m] = _mm512_setzero_ps();
      t1[m] = _mm512_setzero_ps();
    }
#pragma GCC unroll 4  // the step's operands (shift, positions, masks) then fold to constants
    for (int j = 0; j < 4; ++j) {
      const __m512bh w = (__m512bh)_mm512_permutexvar_epi16(d, tbl);
      if (j < 3) d = _mm512_srli_epi16(d, 4);
      const __m512i pj = j < 2 ? p01 : p23;
      const __m512i idx = (j & 1) ? _mm512_ternarylogic_epi32(pj, bits23, group_b, 0xEA)   // (p & 12) | group
                                  : _mm512_ternarylogic_epi32(pj, bits01, group_a, 0xEA);  // (p & 3) | group
      for (int m = 0; m < M; ++m) {
        const uint16_t* xs_at = xc + m * 256 + 64 * j;
        const __m512bh xs = (__m512bh)_mm512_permutex2var_epi16(_mm512_loadu_si512(xs_at), idx,
                                                                 _mm512_loadu_si512(xs_at + 32));
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
  constexpr int64_t kChunkRows = 48;  // x in window order: 24 KiB on the stack
  alignas(64) uint16_t xw[kChunkRows * 256];
  with_rows<8>(M, [&](auto rows) {
    for_buffered_spans(rows, kChunkRows, c0, c1, [&](int64_t cs, int64_t ce) {
      window_order_x(x, rows, ldx, cs, ce, xw);
      gemv_rows_bf16<rows>(xw, K, packed, positions, blocksize, table, scales, o0, o1, cs, ce, y, ldy);
    });
  });
}

}  // namespace qengine::cpu
#endif
