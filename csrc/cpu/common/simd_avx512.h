// AVX-512 (F, BW, VL, DQ) primitives every family's *_avx512*.cpp is written with: 16-lane
// loads and stores of each dtype (one bfloat16 rounding rule: float_to_bf16's), the 16-entry
// lookup, and the loop of a fused 4-bit GEMV over 128-code chunks, shared by the dense and 2:4
// layouts. Include only from files compiled with AVX-512 flags; the anonymous namespace gives
// each includer its own copy, so the linker never merges copies built for different flags.
#pragma once
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "qengine/dtype.h"
#include "qengine/quant_math.h"

namespace qengine::cpu {
namespace {  // NOLINT(build/namespaces): see above

template <int DT>
inline __m512 load16(const void* x, int64_t i) {
  if constexpr (DT == kFloat32) {
    return _mm512_loadu_ps(static_cast<const float*>(x) + i);
  } else {
    __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(x) + i));
    if constexpr (DT == kBFloat16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    else return _mm512_cvtph_ps(h);
  }
}

// float_to_bf16 on 16 lanes: round to nearest even, NaN -> quiet NaN (kFinite: the caller's
// values are never NaN, e.g. decoded weights, and the NaN fix-up is skipped; same bytes otherwise).
template <bool kFinite = false>
inline __m256i to_bf16(__m512 v) {
  __m512i u = _mm512_castps_si512(v);
  __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb)), 16);
  if constexpr (!kFinite) {
    __m512i nan = _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), nan);
  }
  return _mm512_cvtepi32_epi16(r);
}

// `stream`: non-temporal stores where aligned (large outputs not read back soon).
template <int DT, bool kFinite = false>
inline void store16(void* out, int64_t i, __m512 v, bool stream = false) {
  if constexpr (DT == kFloat32) {
    float* p = static_cast<float*>(out) + i;
    if (stream && (reinterpret_cast<uintptr_t>(p) & 63) == 0) _mm512_stream_ps(p, v);
    else _mm512_storeu_ps(p, v);
  } else {
    __m256i h = DT == kBFloat16 ? to_bf16<kFinite>(v) : _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    uint16_t* p = static_cast<uint16_t*>(out) + i;
    if (stream && (reinterpret_cast<uintptr_t>(p) & 31) == 0) _mm256_stream_si256(reinterpret_cast<__m256i*>(p), h);
    else _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), h);
  }
}

// table[idx] for a 16-entry float table held in one register (idx's low 4 bits).
inline __m512 lookup16(__m512i idx, __m512 table) { return _mm512_permutexvar_ps(idx, table); }

// 16 byte codes widened to int32 lanes.
inline __m512i load_codes16(const uint8_t* q) {
  return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
}

// |x|'s bits: as unsigned integers they order like |x|, with every NaN above +inf, so one
// integer max tracks both the absmax and any non-finite value.
inline __m512i max_abs_bits(__m512i acc, __m512 x) {
  return _mm512_max_epu32(acc, _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(0x7fffffff)));
}

// A 16-entry table rounded to bfloat16 and stored twice, as 32 words: vpermw reads 5 index
// bits, so a code's neighbouring bit (bit 4) is then ignored.
inline __m512i bf16_table32(const float* table) {
  alignas(64) uint16_t t[32];
  for (int i = 0; i < 32; ++i) t[i] = float_to_bf16(table[i & 15]);
  return _mm512_load_si512(t);
}

// The vector type loops written once for every ISA take (see F32x8 in simd_avx2.h).
struct F32x16 {
  using F = __m512;
  using I = __m512i;
  static constexpr int kLanes = 16;
  static constexpr int kRegisters = 32;  // vector registers of the ISA
  template <int DT>
  static F load(const void* x, int64_t i) { return load16<DT>(x, i); }
  template <int DT>
  static void store_finite(void* out, int64_t i, F v, bool stream) { store16<DT, true>(out, i, v, stream); }
  template <int DT>
  static void store(void* out, int64_t i, F v) { store16<DT>(out, i, v); }
  static F loadu(const float* x) { return _mm512_loadu_ps(x); }
  static void storeu(float* out, F v) { _mm512_storeu_ps(out, v); }
  static F set1(float v) { return _mm512_set1_ps(v); }
  static F neg(F a) { return _mm512_xor_ps(a, _mm512_set1_ps(-0.0f)); }
  static F sqrt(F a) { return _mm512_sqrt_ps(a); }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F div(F a, F b) { return _mm512_div_ps(a, b); }
  static F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static F min(F a, F b) { return _mm512_min_ps(a, b); }
  static F max(F a, F b) { return _mm512_max_ps(a, b); }
  static float reduce_min(F v) { return _mm512_reduce_min_ps(v); }
  static float reduce_max(F v) { return _mm512_reduce_max_ps(v); }
  static bool any_nan(F v) { return _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q) != 0; }
  static I iset1(int v) { return _mm512_set1_epi32(v); }
  static I iset1_16(int16_t v) { return _mm512_set1_epi16(v); }
  static I iadd(I a, I b) { return _mm512_add_epi32(a, b); }
  static I max_abs_bits(I acc, F x) { return ::qengine::cpu::max_abs_bits(acc, x); }
  static I max_pos_bits(I acc, F x) { return _mm512_max_epi32(acc, _mm512_castps_si512(x)); }
  static uint32_t reduce_max_bits(I acc) { return static_cast<uint32_t>(_mm512_reduce_max_epi32(acc)); }
  static I add_where_greater(I a, F v, F t, int step) {
    return _mm512_mask_add_epi32(a, _mm512_cmp_ps_mask(v, t, _CMP_GT_OQ), a, _mm512_set1_epi32(step));
  }
  static I load_codes(const uint8_t* q) { return load_codes16(q); }
  static void store_codes(uint8_t* dst, I codes) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm512_cvtepi32_epi8(codes));
  }
  static F gather(const float* base, I idx) { return _mm512_i32gather_ps(idx, base, 4); }
  struct Table16 {
    F v;
  };
  static Table16 table16(const float* t) { return {_mm512_loadu_ps(t)}; }
  static Table16 code_table16(const uint8_t* c) { return {_mm512_castsi512_ps(load_codes16(c))}; }
  static F lookup(I idx, const Table16& t) { return _mm512_permutexvar_ps(idx, t.v); }
  static I lookup_code(I idx, const Table16& t) { return _mm512_permutexvar_epi32(idx, _mm512_castps_si512(t.v)); }
};

inline __mmask16 lanes_below(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << n) - 1u);
}

// ---- The fused 4-bit GEMV loop over 128-code chunks (dense and 2:4 layouts) ----

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
    const __mmask16 live = lanes_below(count - i);
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

// Scales of the 16 lanes of 128-code chunk c (lane i covers codes 8i..8i+7), from the tile's
// scales rs (block b is rs[b]); blocksize is a power of two >= 16.
inline __m512 chunk_scales(const float* rs, int64_t c, int log2_blocksize) {
  const int64_t b = (c * 128) >> log2_blocksize;
  if (log2_blocksize >= 7) return _mm512_set1_ps(rs[b]);
  if (log2_blocksize == 6) return _mm512_insertf32x8(_mm512_set1_ps(rs[b]), _mm256_set1_ps(rs[b + 1]), 1);
  if (log2_blocksize == 5) {  // lanes 4j..4j+3 belong to block b + j
    const __m512i spread = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    return _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(_mm_loadu_ps(rs + b)));
  }
  // blocksize 16 (NVFP4): lanes 2j, 2j+1 belong to block b + j
  const __m512i spread = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
  return _mm512_permutexvar_ps(spread, _mm512_castps256_ps512(_mm256_loadu_ps(rs + b)));
}

// Minifloat block scales computed in the chunk loop from their codes (no decoded copy written
// and read back): NVFP4's E4M3 at block 16, MXFP4's E8M0 at block 32. A row qualifies when the
// table is such a minifloat (BlockScales::table_kind), its tile's codes are all below the
// minifloat's NaN, one nested absmax a >= +0 covers the tile, the mean is +0.0 (adding it changes
// no bit of a non-negative product) and the CPU keeps subnormal inputs (MXCSR.DAZ clear). Each
// scale is then float32(value(c) * a) with one rounding: block_scale's bits.
//   E4M3: c << 20 read as float32 is value(c) * 2**-120 exactly (codes 0-7 a float32
//         subnormal): one multiply by a * 2**120 (kept finite).
//   E8M0: vscalefps(a, c - 127) is a * 2**(c - 127) rounded once.
struct ComputedScales {
  int kind = kTableRead;  // for this call: the table, the block size, the mean, the CPU
  ComputedScales(const BlockScales& s, int log2_blocksize) {
    const bool plain = s.values == nullptr && s.nested_shift >= 0 && s.mean == 0.0f && !std::signbit(s.mean) &&
                       (_mm_getcsr() & 0x40) == 0;
    if (plain && ((s.table_kind == kTableE4m3 && log2_blocksize == 4) ||
                  (s.table_kind == kTableE8m0 && log2_blocksize == 5))) {
      kind = s.table_kind;
    }
  }
  // Whether blocks [b, b + count) of the whole tensor qualify; factor := a * 2**120 (E4M3) or a.
  bool row(const BlockScales& s, int64_t b, int64_t count, __m256& factor) const {
    const int64_t nb = b >> s.nested_shift;
    if (nb != ((b + count - 1) >> s.nested_shift)) return false;
    const float a = kind == kTableE4m3 ? s.absmax[nb] * 0x1p120f : s.absmax[nb];
    if (std::signbit(a) || !std::isfinite(a)) return false;
    const __m512i nan = _mm512_set1_epi8(static_cast<char>(kind == kTableE4m3 ? 0x7F : 0xFF));
    __mmask64 bad = 0;
    for (int64_t i = 0; i < count; i += 64) {
      const __mmask64 live = count - i >= 64 ? ~__mmask64{0} : (__mmask64{1} << (count - i)) - 1;
      bad |= _mm512_mask_cmpge_epu8_mask(live, _mm512_maskz_loadu_epi8(live, s.codes + b + i), nan);
    }
    factor = _mm256_set1_ps(a);
    return bad == 0;
  }
  // The 16 lanes' scales of 128-code chunk c from row codes rc: lanes 2j, 2j+1 take block 8c + j.
  static __m512 e4m3_chunk(const uint8_t* rc, int64_t c, __m256 a_2p120) {
    const __m256i codes = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(rc + 8 * c)));
    const __m256 v = _mm256_mul_ps(_mm256_castsi256_ps(_mm256_slli_epi32(codes, 20)), a_2p120);
    const __m512i spread = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
    return _mm512_permutexvar_ps(spread, _mm512_castps256_ps512(v));
  }
  // Lanes 4j..4j+3 take block 4c + j.
  static __m512 e8m0_chunk(const uint8_t* rc, int64_t c, __m256 a) {
    int32_t four;
    std::memcpy(&four, rc + 4 * c, 4);
    const __m128i codes = _mm_cvtepu8_epi32(_mm_cvtsi32_si128(four));
    const __m128 exponent = _mm_cvtepi32_ps(_mm_sub_epi32(codes, _mm_set1_epi32(127)));
    const __m128 v = _mm_scalef_ps(_mm256_castps256_ps128(a), exponent);
    const __m512i spread = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    return _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(v));
  }
};

// How far ahead of the decode the packed codes are prefetched (a few DRAM latencies' worth
// at the one-row decode rate, ~15 cycles per 64 bytes).
constexpr int64_t kPrefetchBytes = 4096;

// The 64 code bytes of 128-code chunk c of row o (codes_per_row codes a row), with the bytes
// `ahead` of them prefetched.
inline const uint8_t* chunk_codes(const uint8_t* packed, int64_t codes_per_row, int64_t o, int64_t c, int64_t ahead) {
  const uint8_t* codes = packed + (o * codes_per_row >> 1) + c * 64;
  _mm_prefetch(reinterpret_cast<const char*>(codes + ahead), _MM_HINT_T0);
  return codes;
}

// What a K tile (128-code chunks [c0, c1) of every row of `codes_per_row` codes) needs to know.
struct TileGeometry {
  int64_t blocks_per_row;
  int log2_blocksize;
  int64_t rb_lo, rb_count;  // the blocks the tile touches, relative to a row's first block
  int64_t prefetch_ahead;   // bytes
};

inline TileGeometry tile_geometry(int64_t codes_per_row, int64_t blocksize, int64_t c0, int64_t c1,
                                  int code_bits = 4) {
  TileGeometry g{};
  g.blocks_per_row = codes_per_row / blocksize;
  while ((int64_t{1} << g.log2_blocksize) < blocksize) ++g.log2_blocksize;
  g.rb_lo = (c0 * 128) >> g.log2_blocksize;
  g.rb_count = (((c1 * 128) - 1) >> g.log2_blocksize) + 1 - g.rb_lo;
  // A tile covering whole rows (all their whole chunks: a tail of K % 128 codes is read apart)
  // streams through memory: prefetch ahead in the stream. A partial tile jumps to the next row
  // after c1: prefetch the next row's segment of this tile.
  g.prefetch_ahead = (c0 == 0 && c1 == codes_per_row / 128) ? kPrefetchBytes : codes_per_row * code_bits / 8;
  return g;
}

// y[m * ldy + o] += sum over chunks c in [c0, c1) of reduce(chunk(o, c, t) * scales of c) for
// the M rows of x and the weight rows o in [o0, o1). chunk(o, c, t) writes t[m], the unscaled
// partial sums of chunk c of row o with row m of x (16 lanes: lane i covers codes 8i..8i+7).
template <int M, class Chunk>
inline void gemv_rows(const TileGeometry& g, const BlockScales& scales, int64_t o0, int64_t o1, int64_t c0,
                      int64_t c1, float* y, int64_t ldy, Chunk&& chunk) {
  alignas(64) float scale_buf[kMaxTileBlocks];
  const ComputedScales computed(scales, g.log2_blocksize);
  for (int64_t o = o0; o < o1; ++o) {
    __m512 acc[M];
    for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
    const auto run = [&](auto chunk_scale) {
      for (int64_t c = c0; c < c1; ++c) {
        __m512 t[M];
        chunk(o, c, t);
        const __m512 sc = chunk_scale(c);
        for (int m = 0; m < M; ++m) acc[m] = _mm512_fmadd_ps(t[m], sc, acc[m]);
      }
    };
    const int64_t first = o * g.blocks_per_row + g.rb_lo;
    __m256 factor;
    if (computed.kind != kTableRead && computed.row(scales, first, g.rb_count, factor)) {
      const uint8_t* rc = scales.codes + o * g.blocks_per_row;
      if (computed.kind == kTableE4m3) run([&](int64_t c) { return ComputedScales::e4m3_chunk(rc, c, factor); });
      else run([&](int64_t c) { return ComputedScales::e8m0_chunk(rc, c, factor); });
    } else {
      // rs[b] is the scale of the row's block b (b in the tile's range).
      const float* rs = tile_scales(scales, first, g.rb_count, scale_buf) - g.rb_lo;
      run([&](int64_t c) { return chunk_scales(rs, c, g.log2_blocksize); });
    }
    for (int m = 0; m < M; ++m) y[m * ldy + o] += _mm512_reduce_add_ps(acc[m]);
  }
}

// The loop of the minmax kernels: y[m * ldy + o] += the sums chunk(o, c, sv, ov, a0, a1) adds to
// a0[m] and a1[m] (two chains per row of x) over chunks [c0, c1) of rows [o0, o1); sv and ov hold
// chunk c's scales and offsets per lane (lane i covers codes 8i..8i+7), for the chunk to decode
// each weight as decode_value's fma(table[q], scale, offset).
template <int M, class Chunk>
inline void gemv_affine_rows(const TileGeometry& g, const BlockScales& scales, const float* offsets, int64_t o0,
                             int64_t o1, int64_t c0, int64_t c1, float* y, int64_t ldy, Chunk&& chunk) {
  alignas(64) float scale_buf[kMaxTileBlocks];
  for (int64_t o = o0; o < o1; ++o) {
    // rs[b] and ro[b]: the scale and offset of the row's block b (b in the tile's range).
    const float* rs = tile_scales(scales, o * g.blocks_per_row + g.rb_lo, g.rb_count, scale_buf) - g.rb_lo;
    const float* ro = offsets + o * g.blocks_per_row;
    __m512 a0[M], a1[M];
    for (int m = 0; m < M; ++m) a0[m] = a1[m] = _mm512_setzero_ps();
    for (int64_t c = c0; c < c1; ++c) {
      chunk(o, c, chunk_scales(rs, c, g.log2_blocksize), chunk_scales(ro, c, g.log2_blocksize), a0, a1);
    }
    for (int m = 0; m < M; ++m) y[m * ldy + o] += _mm512_reduce_add_ps(_mm512_add_ps(a0[m], a1[m]));
  }
}

}  // namespace
}  // namespace qengine::cpu
#endif
