// AVX-512 fused 4-bit GEMV (the small-batch dequantize-matmul); the table entry of
// kernels_avx512.cpp. Compiled with -mavx512* only here.
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#include "cpu/kernels.h"

namespace qengine::cpu {
namespace {

// The float32 scales of blocks [b_lo, b_lo + count) into out (count <= kMaxTileBlocks): a copy of
// plain scales, or the double-quantized ones decoded 16 at a time with gathers, with the same
// float32 operations as block_scale (multiply, then add the mean).
constexpr int64_t kMaxTileBlocks = 256;

inline const float* tile_scales(const BlockScales& s, int64_t b_lo, int64_t count, float* out) {
  if (s.values != nullptr) return s.values + b_lo;
  if (s.nested_shift < 0 || b_lo + count > (int64_t{1} << 30)) {
    for (int64_t i = 0; i < count; ++i) out[i] = block_scale(s, b_lo + i);
    return out;
  }
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m128i shift = _mm_cvtsi32_si128(s.nested_shift);
  const __m512 mean = _mm512_set1_ps(s.mean);
  for (int64_t i = 0; i < count; i += 16) {
    const __mmask16 live = count - i >= 16 ? static_cast<__mmask16>(0xffff)
                                           : static_cast<__mmask16>((1u << (count - i)) - 1u);
    __m512i codes = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(live, s.codes + b_lo + i));
    __m512 tv = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), live, codes, s.table, 4);
    __m512i nested = _mm512_srl_epi32(_mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(b_lo + i)), iota), shift);
    __m512 av = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), live, nested, s.absmax, 4);
    _mm512_mask_storeu_ps(out + i, live, _mm512_add_ps(_mm512_mul_ps(tv, av), mean));
  }
  return out;
}

// Scales of the 16 lanes of 128-element chunk c (lane i covers elements 8i..8i+7), from the
// tile's scales rs (block b is rs[b]); blocksize is a power of two >= 32.
inline __m512 chunk_scales(const float* rs, int64_t c, int log2_blocksize) {
  const int64_t b = (c * 128) >> log2_blocksize;
  if (log2_blocksize >= 7) return _mm512_set1_ps(rs[b]);
  if (log2_blocksize == 6) return _mm512_insertf32x8(_mm512_set1_ps(rs[b]), _mm256_set1_ps(rs[b + 1]), 1);
  // blocksize 32: lanes 4j..4j+3 belong to block b + j
  const __m512i spread = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
  return _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(_mm_loadu_ps(rs + b)));
}

// How far ahead of the decode the packed weights are prefetched (a few DRAM latencies' worth).
constexpr int64_t kPrefetchBytes = 1024;

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
  const int64_t blocks_per_row = K / blocksize;
  int log2_bs = 0;
  while ((int64_t{1} << log2_bs) < blocksize) ++log2_bs;
  // The blocks that chunks [c0, c1) of a row touch, relative to the row's first block.
  const int64_t rb_lo = (c0 * 128) >> log2_bs;
  const int64_t rb_count = (((c1 * 128) - 1) >> log2_bs) + 1 - rb_lo;
  alignas(64) float scale_buf[kMaxTileBlocks];
  // A tile covering whole rows streams through memory: prefetch ahead in the stream. A partial
  // tile jumps to the next row after c1: prefetch the next row's segment of this tile.
  const bool whole_rows = c0 == 0 && c1 * 128 == K;
  const int64_t ahead = whole_rows ? kPrefetchBytes : (K >> 1);
  for (int64_t o = o0; o < o1; ++o) {
    __m512 acc[M];
    for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
    const uint8_t* row = packed + (o * K >> 1);
    // rs[b] is the scale of the row's block b (b in the tile's range).
    const float* rs = tile_scales(scales, o * blocks_per_row + rb_lo, rb_count, scale_buf) - rb_lo;
    for (int64_t c = c0; c < c1; ++c) {
      _mm_prefetch(reinterpret_cast<const char*>(row + c * 64 + ahead), _MM_HINT_T0);
      __m512i d = _mm512_loadu_si512(row + c * 64);
      const float* xc = xr + c * 128 * M;
      const __m512 sc = chunk_scales(rs, c, log2_bs);
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
