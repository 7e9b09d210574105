// AVX-512 rows of the 2:4 family: the float32 GEMV (4-bit absmax codes; x as float32 rows), on
// the GEMV loop of simd_avx512.h; the avx512_bf16 row adds sparse24_avx512bf16.cpp's.
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#include "cpu/common/ladder.h"
#include "cpu/common/simd_avx512.h"
#include "cpu/sparse/sparse24.h"

namespace qengine::cpu {
namespace {

// Chunks [c0, c1) of M rows of x copied chunk by chunk, the rows of a chunk side by side (so
// the kernel addresses row m of chunk c at a fixed offset, not through a pointer a row):
// row m's 256 weights of chunk c at xc[((c - c0) * M + m) * 256].
void chunk_major_x(const float* x, int64_t M, int64_t ldx, int64_t c0, int64_t c1, float* xc) {
  for (int64_t c = c0; c < c1; ++c) {
    for (int64_t m = 0; m < M; ++m) {
      const float* in = x + m * ldx + c * 256;
      float* out = xc + ((c - c0) * M + m) * 256;
      for (int i = 0; i < 256; i += 16) _mm512_storeu_ps(out + i, _mm512_loadu_ps(in + i));
    }
  }
}

// The chunk's 64 code bytes as 16 dwords of 8 nibbles, decoded with vpermps one nibble a step
// (as the dense float32 GEMV). In the layout's word order (sparse24.h), nibble n < 4 of dword l
// is kept value 0 of group 16n + l and nibble n + 4 its kept value 1, so steps n and n + 4 draw
// from the same 64 weights 64n..64n+63 of x: lane l from x[64n + 4l + position]. vpermt2ps
// reaches 32 floats, so lanes 0-7 select from the window's first half, lanes 8-15 from its
// second (two permutes and a blend, the index shared). The 32 position bytes widened to words
// give, in dword l, byte 2l (nibbles 0-3) and byte 2l + 1 (nibbles 4-7) at bits 0 and 16.
// xw: chunk_major_x's copy of chunks [c0, c1).
template <int M>
void gemv_rows_f32(const float* xw, int64_t K, const uint8_t* packed, const uint8_t* positions, int64_t blocksize,
                   const float* table, const BlockScales& scales, int64_t o0, int64_t o1, int64_t c0, int64_t c1,
                   float* y, int64_t ldy) {
  const __m512 tbl = _mm512_loadu_ps(table);
  const __m512i base = _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 0, 4, 8, 12, 16, 20, 24, 28);
  const __m512i three = _mm512_set1_epi32(3);
  constexpr __mmask16 kHigh = 0xFF00;
  const int64_t ks = K / 2;  // stored values per row
  const TileGeometry g = tile_geometry(ks, blocksize, c0, c1);
  gemv_rows<M>(g, scales, o0, o1, c0, c1, y, ldy, [&](int64_t o, int64_t c, __m512 (&t)[M]) {
    __m512i d = _mm512_loadu_si512(chunk_codes(packed, ks, o, c, g.prefetch_ahead));
    const uint8_t* pos = chunk_positions24(positions, ks, o, c, g.prefetch_ahead);
    const __m512i p = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(pos)));
    const float* xc = xw + (c - c0) * M * 256;
    __m512 t1[M];
    for (int m = 0; m < M; ++m) {
      t[m] = _mm512_setzero_ps();
      t1[m] = _mm512_setzero_ps();
    }
#pragma GCC unroll 8  // the step's shift and window then fold to constants
    for (int n = 0; n < 8; ++n) {
      const __m512 w = lookup16(d, tbl);
      d = _mm512_srli_epi32(d, 4);
      const int shift = n < 4 ? 2 * n : 2 * n + 8;
      const __m512i idx = _mm512_ternarylogic_epi32(_mm512_srli_epi32(p, shift), three, base, 0xEA);
      for (int m = 0; m < M; ++m) {
        const float* xs_at = xc + m * 256 + 64 * (n & 3);
        const __m512 lo = _mm512_permutex2var_ps(_mm512_loadu_ps(xs_at), idx, _mm512_loadu_ps(xs_at + 16));
        const __m512 hi = _mm512_permutex2var_ps(_mm512_loadu_ps(xs_at + 32), idx, _mm512_loadu_ps(xs_at + 48));
        const __m512 xs = _mm512_mask_blend_ps(kHigh, lo, hi);
        if (n & 1) t1[m] = _mm512_fmadd_ps(w, xs, t1[m]);
        else t[m] = _mm512_fmadd_ps(w, xs, t[m]);
      }
    }
    for (int m = 0; m < M; ++m) t[m] = _mm512_add_ps(t[m], t1[m]);
  });
}

void gemv(const float* x, int64_t M, int64_t ldx, int64_t K, const uint8_t* packed, const uint8_t* positions,
          int64_t blocksize, const float* table, const BlockScales& scales, int64_t o0, int64_t o1, int64_t c0,
          int64_t c1, float* y, int64_t ldy) {
  constexpr int64_t kChunkRows = 24;  // x chunk-major: 24 KiB on the stack
  alignas(64) float xw[kChunkRows * 256];
  with_rows<8>(M, [&](auto rows) {
    for_buffered_spans(rows, kChunkRows, c0, c1, [&](int64_t cs, int64_t ce) {
      chunk_major_x(x, rows, ldx, cs, ce, xw);
      gemv_rows_f32<rows>(xw, K, packed, positions, blocksize, table, scales, o0, o1, cs, ce, y, ldy);
    });
  });
}

}  // namespace

const Sparse24Kernels kSparse24Avx512 = {
    .gemv = gemv,
};

const Sparse24Kernels kSparse24Avx512Bf16 = {
    .gemv = gemv,
    .gemv_bf16 = sparse24_gemv_avx512bf16,
};

}  // namespace qengine::cpu
#endif
