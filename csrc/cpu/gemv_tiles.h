// Block scales and tile bookkeeping shared by the AVX-512 GEMV kernels (gemv_avx512.cpp,
// gemv_avx512bf16.cpp). Include only from files compiled with AVX-512 flags.
#pragma once
#include <immintrin.h>

#include <cstdint>

#include "qengine/quant_math.h"

namespace qengine::cpu {
namespace {  // internal linkage: each ISA file keeps its own copy, compiled with its own flags

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
    // The 16 blocks almost always share one nested block (of 256 or more): broadcast its absmax
    // then, and gather only across a boundary.
    const int64_t first = b_lo + i, last = b_lo + i + (count - i >= 16 ? 15 : count - i - 1);
    __m512 av;
    if ((first >> s.nested_shift) == (last >> s.nested_shift)) {
      av = _mm512_set1_ps(s.absmax[first >> s.nested_shift]);
    } else {
      __m512i nested = _mm512_srl_epi32(_mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(first)), iota), shift);
      av = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), live, nested, s.absmax, 4);
    }
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

// How far ahead of the decode the packed weights are prefetched (a few DRAM latencies' worth
// at the one-row decode rate, ~15 cycles per 64 bytes).
constexpr int64_t kPrefetchBytes = 4096;

// What a K tile (128-element chunks [c0, c1) of every row) needs to know of the layout.
struct TileGeometry {
  int64_t blocks_per_row;
  int log2_blocksize;
  int64_t rb_lo, rb_count;  // the blocks the tile touches, relative to a row's first block
  int64_t prefetch_ahead;   // bytes
};

inline TileGeometry tile_geometry(int64_t K, int64_t blocksize, int64_t c0, int64_t c1) {
  TileGeometry g{};
  g.blocks_per_row = K / blocksize;
  while ((int64_t{1} << g.log2_blocksize) < blocksize) ++g.log2_blocksize;
  g.rb_lo = (c0 * 128) >> g.log2_blocksize;
  g.rb_count = (((c1 * 128) - 1) >> g.log2_blocksize) + 1 - g.rb_lo;
  // A tile covering whole rows streams through memory: prefetch ahead in the stream. A partial
  // tile jumps to the next row after c1: prefetch the next row's segment of this tile.
  g.prefetch_ahead = (c0 == 0 && c1 * 128 == K) ? kPrefetchBytes : (K >> 1);
  return g;
}

}  // namespace
}  // namespace qengine::cpu
