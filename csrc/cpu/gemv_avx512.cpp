// AVX-512 fused 4-bit GEMV (the small-batch dequantize-matmul); the table entry of
// kernels_avx512.cpp. Compiled with -mavx512* only here.
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#include "cpu/gemv_tiles.h"
#include "cpu/kernels.h"

namespace qengine::cpu {
namespace {

// Fused 4-bit GEMV over x in the "nibble order" of matmul.cpp: one 64-byte load holds 128
// codes; as 16 dwords, vpermps reads the low 4 bits of each lane, so shifting the dwords by 4
// bits seven times walks all 8 nibbles of each lane: one table lookup per 16 weights and no
// unpacking. xr holds this group's M rows of x interleaved per chunk,
// xr[c*128*M + (j*M + m)*16 + i], so every load is a constant offset from one pointer.
// Per chunk and row of x, two chains of unscaled partial sums, scaled once per chunk.
template <int M>
void gemv4_impl(const float* xr, int64_t K, const uint8_t* packed, int64_t blocksize, const float* table,
                const BlockScales& scales, int64_t o0, int64_t o1, int64_t c0, int64_t c1, float* y, int64_t ldy) {
  const __m512 tbl = _mm512_loadu_ps(table);
  const TileGeometry g = tile_geometry(K, blocksize, c0, c1);
  alignas(64) float scale_buf[kMaxTileBlocks];
  for (int64_t o = o0; o < o1; ++o) {
    __m512 acc[M];
    for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
    const uint8_t* row = packed + (o * K >> 1);
    // rs[b] is the scale of the row's block b (b in the tile's range).
    const float* rs = tile_scales(scales, o * g.blocks_per_row + g.rb_lo, g.rb_count, scale_buf) - g.rb_lo;
    for (int64_t c = c0; c < c1; ++c) {
      _mm_prefetch(reinterpret_cast<const char*>(row + c * 64 + g.prefetch_ahead), _MM_HINT_T0);
      __m512i d = _mm512_loadu_si512(row + c * 64);
      const float* xc = xr + c * 128 * M;
      const __m512 sc = chunk_scales(rs, c, g.log2_blocksize);
      __m512 t0[M], t1[M];  // two chains per row of x: unscaled partial sums of this chunk
      __m512 w = _mm512_permutexvar_ps(d, tbl);
      for (int m = 0; m < M; ++m) t0[m] = _mm512_mul_ps(w, _mm512_loadu_ps(xc + m * 16));
      d = _mm512_srli_epi32(d, 4);
      w = _mm512_permutexvar_ps(d, tbl);
      for (int m = 0; m < M; ++m) t1[m] = _mm512_mul_ps(w, _mm512_loadu_ps(xc + (M + m) * 16));
      for (int j = 2; j < 8; j += 2) {
        d = _mm512_srli_epi32(d, 4);
        w = _mm512_permutexvar_ps(d, tbl);
        for (int m = 0; m < M; ++m) t0[m] = _mm512_fmadd_ps(w, _mm512_loadu_ps(xc + (j * M + m) * 16), t0[m]);
        d = _mm512_srli_epi32(d, 4);
        w = _mm512_permutexvar_ps(d, tbl);
        for (int m = 0; m < M; ++m) {
          t1[m] = _mm512_fmadd_ps(w, _mm512_loadu_ps(xc + ((j + 1) * M + m) * 16), t1[m]);
        }
      }
      for (int m = 0; m < M; ++m) acc[m] = _mm512_fmadd_ps(_mm512_add_ps(t0[m], t1[m]), sc, acc[m]);
    }
    for (int m = 0; m < M; ++m) y[m * ldy + o] += _mm512_reduce_add_ps(acc[m]);
  }
}

template <int M>
void gemv4_dispatch(int64_t m, const float* xr, int64_t K, const uint8_t* packed, int64_t bs, const float* table,
                    const BlockScales& sc, int64_t o0, int64_t o1, int64_t c0, int64_t c1, float* y, int64_t ldy) {
  if constexpr (M > 1) {
    if (m < M) return gemv4_dispatch<M - 1>(m, xr, K, packed, bs, table, sc, o0, o1, c0, c1, y, ldy);
  }
  gemv4_impl<M>(xr, K, packed, bs, table, sc, o0, o1, c0, c1, y, ldy);
}

}  // namespace

void avx512_gemv4(const float* xr, int64_t M, int64_t K, const uint8_t* packed, int64_t blocksize,
                  const float* table, const BlockScales& scales, int64_t o0, int64_t o1, int64_t c0, int64_t c1,
                  float* y, int64_t ldy) {
  gemv4_dispatch<8>(M, xr, K, packed, blocksize, table, scales, o0, o1, c0, c1, y, ldy);
}

}  // namespace qengine::cpu
#endif
