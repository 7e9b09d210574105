// 8-bit codes (absmax, or minmax with block offsets) decoded into ChunkDecoder's step order
// (panels_avx512bf16.h), or in input order for segments, with VBMI
// byte permutes: the gemm family's 8-bit panels, for the amx row's tiles and the avx512_bf16
// row's panels (decode_panel_bytes). Include only from files compiled with AVX512-BF16 and VBMI
// flags (*_amx.cpp, *_avx512bf16vbmi.cpp); the anonymous namespace gives each includer its own
// copy (as simd_avx512.h).
#pragma once
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "cpu/common/byte_planes_vbmi.h"
#include "cpu/gemm/panels_avx512bf16.h"

namespace qengine::cpu {
namespace {  // NOLINT(build/namespaces): see above

// 8-bit codes (one a byte, K bytes a row) decoded into the forward's steps, each weight
// bfloat16(table[code] * scale), or of fma(table[code], scale, offset) for minmax codes, rounded
// once as ChunkDecoder rounds 4-bit ones: a chunk's two
// halves of 64 codes put in step order with one byte permute each, then looked up in the table's
// byte planes (byte_planes_vbmi.h), so output k of half h holds step k's words 16 h..16 h + 15.
struct ByteChunks {
  const ScalePlanes* planes;  // null: 4-bit codes (ChunkDecoder)
  int log2_blocksize;
  __m512i step_order;     // byte 16 l + 4 k + e: code 4 (4 l + e) + kStepOrder[k] of the half
  __m512i lane_block[2];  // lane w of half h: the block of code 64 h + 4 w, from the chunk's first
  __mmask16 chunk_blocks;  // the blocks a chunk spans (its scales' load)

  ByteChunks(const ScalePlanes* planes_, int64_t blocksize) : planes(planes_), log2_blocksize(log2_of(blocksize)) {
    alignas(64) uint8_t idx[64];
    for (int l = 0; l < 4; ++l) {
      for (int k = 0; k < 4; ++k) {
        for (int e = 0; e < 4; ++e) idx[16 * l + 4 * k + e] = static_cast<uint8_t>(4 * (4 * l + e) + kStepOrder[k]);
      }
    }
    step_order = _mm512_load_si512(idx);
    for (int h = 0; h < 2; ++h) {
      alignas(64) int32_t b[16];
      for (int w = 0; w < 16; ++w) b[w] = (64 * h + 4 * w) >> std::min(log2_blocksize, 7);
      lane_block[h] = _mm512_load_si512(b);
    }
    const int count = log2_blocksize >= 7 ? 1 : 128 >> log2_blocksize;
    chunk_blocks = static_cast<__mmask16>((1u << count) - 1u);
  }

  void lookup(const PlaneRegs& regs, __m512i codes, __m512i out[4]) const {
    if (planes->low_half_zero) regs.lookup64_unordered<true>(codes, out);
    else regs.lookup64_unordered<false>(codes, out);
  }

  // The whole chunk at input k (k % 128 == 0) of the row whose codes start at row, scales rs
  // (and block offsets os for minmax codes, each weight fma(table, scale, offset) as
  // decode_value; null for absmax).
  void chunk(const uint8_t* row, const float* rs, int64_t k, __m512i steps[4], const float* os = nullptr) const {
    const PlaneRegs regs(*planes);  // from L1: 16 registers are too many to hold across the loop
    __m512i f0[4], f1[4];
    lookup(regs, _mm512_permutexvar_epi8(step_order, _mm512_loadu_si512(row + k)), f0);
    lookup(regs, _mm512_permutexvar_epi8(step_order, _mm512_loadu_si512(row + k + 64)), f1);
    const __m512 r = _mm512_maskz_loadu_ps(chunk_blocks, rs + (k >> log2_blocksize));
    const __m512 s0 = _mm512_permutexvar_ps(lane_block[0], r), s1 = _mm512_permutexvar_ps(lane_block[1], r);
    if (os != nullptr) {
      const __m512 o = _mm512_maskz_loadu_ps(chunk_blocks, os + (k >> log2_blocksize));
      const __m512 o0 = _mm512_permutexvar_ps(lane_block[0], o), o1 = _mm512_permutexvar_ps(lane_block[1], o);
      for (int j = 0; j < 4; ++j) {
        steps[j] = (__m512i)_mm512_cvtne2ps_pbh(_mm512_fmadd_ps(_mm512_castsi512_ps(f1[j]), s1, o1),
                                                _mm512_fmadd_ps(_mm512_castsi512_ps(f0[j]), s0, o0));
      }
      return;
    }
    for (int j = 0; j < 4; ++j) {
      steps[j] = (__m512i)_mm512_cvtne2ps_pbh(_mm512_mul_ps(_mm512_castsi512_ps(f1[j]), s1),
                                              _mm512_mul_ps(_mm512_castsi512_ps(f0[j]), s0));
    }
  }

  // Inputs [k, k + 32) of two rows (codes at row_a and row_b, scales and offsets as segment's) in
  // input order, both rows' 64 codes in one lookup (regs: the table's planes, held by the caller
  // across its loop).
  void segment_pair(const PlaneRegs& regs, const uint8_t* row_a, const uint8_t* row_b, const float* rs_a,
                    const float* rs_b, const float* os_a, const float* os_b, int64_t k, __m512i& a,
                    __m512i& b) const {
    const __m256i ca = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row_a + k));
    const __m256i cb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row_b + k));
    __m512i v[4];  // v[0], v[1]: row a's values 0-15, 16-31; v[2], v[3]: row b's
    regs.lookup64(_mm512_inserti64x4(_mm512_castsi256_si512(ca), cb, 1), unpack_order(), v);
    const int64_t b0 = k >> log2_blocksize, b1 = (k + 16) >> log2_blocksize;
    a = (__m512i)_mm512_cvtne2ps_pbh(scaled_table(_mm512_castsi512_ps(v[1]), rs_a, os_a, b1),
                                     scaled_table(_mm512_castsi512_ps(v[0]), rs_a, os_a, b0));
    b = (__m512i)_mm512_cvtne2ps_pbh(scaled_table(_mm512_castsi512_ps(v[3]), rs_b, os_b, b1),
                                     scaled_table(_mm512_castsi512_ps(v[2]), rs_b, os_b, b0));
  }

  // Inputs [k, k + 32) in input order (k % 32 == 0): the tail past the last whole chunk.
  __m512i segment(const uint8_t* row, const float* rs, int64_t k, const float* os = nullptr) const {
    __m512i v[4];
    PlaneRegs(*planes).lookup64(_mm512_maskz_loadu_epi8(0xFFFFFFFFull, row + k), unpack_order(), v);
    const __m512 lo = scaled_table(_mm512_castsi512_ps(v[0]), rs, os, k >> log2_blocksize);
    const __m512 hi = scaled_table(_mm512_castsi512_ps(v[1]), rs, os, (k + 16) >> log2_blocksize);
    return (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
  }
};

}  // namespace
}  // namespace qengine::cpu
#endif
