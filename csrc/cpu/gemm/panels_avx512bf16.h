// The weight panels of the gemm family's AVX-512 rows (avx512_bf16 and amx): W decoded from its
// packed codes (dense or 2:4) and block scales straight into the pair-interleaved bfloat16
// layout that vdpbf16ps and AMX's TDPBF16PS both take (kernels.h), and the block scales a task
// decodes a group at a time. Include only from files compiled with AVX512-BF16 flags; the
// anonymous namespace gives each includer its own copy (as simd_avx512.h).
#pragma once
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu/common/simd_avx512.h"
#include "cpu/gemm/kernels.h"
#include "cpu/gemv/kernels.h"  // decode_nested_scales_vbmi

namespace qengine::cpu {
namespace {  // NOLINT(build/namespaces): see above

// Words of one panel: kPanelK / 2 input pairs of kPanelRows columns, two words each.
constexpr int64_t kPanelWords = kPanelK * kPanelRows;

inline int log2_of(int64_t power_of_two) {
  int l = 0;
  while ((int64_t{1} << l) < power_of_two) ++l;
  return l;
}

// r[c] := dword c of every r[i] (lane i): a 16 x 16 transpose of 32-bit elements.
inline void transpose16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0xDD);
    t[i + 8] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0xDD);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xDD);
    r[i + 4] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0x88);
    r[i + 12] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0xDD);
  }
}

// table * rs[b] (absmax), or fma(table, rs[b], os[b]) (minmax: os not null), as decode_value.
inline __m512 scaled_table(__m512 table, const float* rs, const float* os, int64_t b) {
  const __m512 s = _mm512_set1_ps(rs[b]);
  return os == nullptr ? _mm512_mul_ps(table, s) : _mm512_fmadd_ps(table, s, _mm512_set1_ps(os[b]));
}

// Inputs [k, k + 32) of one row of W as 32 bfloat16 words in input order, each
// bfloat16(table[code] * scale) rounded once from its float32 value: the bytes dequantize()
// writes for bfloat16, but for subnormals, which the conversion flushes to zero as vdpbf16ps
// would treat them anyway (k % 32 == 0).
struct SegmentDecoder {
  __m512 table;  // the 16 code values, float32
  int log2_blocksize;
  __m512i low4 = _mm512_set1_epi32(0x0f);
  // vpermw reads index bits 0-4: bit 4 picks the table's upper 16 words, which hold the scale of
  // inputs 16..31 (another block only at blocksize 16).
  __m512i upper = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi32(0x00100010), 1);

  // codes: the row's packed codes; rs[b]: the scale of the row's block b; os[b] its offset
  // (minmax codes: fma(table, scale, offset), one rounding as decode_value), or os null.
  __m512i operator()(const uint8_t* codes, const float* rs, const float* os, int64_t k) const {
    const int64_t b = k >> log2_blocksize;
    const __m512 lo = scaled_table(table, rs, os, b);
    const __m512 hi = log2_blocksize == 4 ? scaled_table(table, rs, os, b + 1) : lo;
    const __m512i tbl = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
    // Byte d of the segment holds inputs 2d (high nibble) and 2d + 1 (low): dword d's words.
    const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + (k >> 1))));
    __m512i idx = _mm512_or_si512(_mm512_srli_epi32(v, 4), _mm512_slli_epi32(_mm512_and_si512(v, low4), 16));
    if (log2_blocksize == 4) idx = _mm512_or_si512(idx, upper);
    return _mm512_permutexvar_epi16(idx, tbl);
  }
};

// Inputs [k, k + 32) of one row of a 2:4 weight (sparse/sparse24.h: 2 of every 4 weights
// stored, in 128-value chunks of 256 inputs whose storage order interleaves four steps) as 32
// bfloat16 words in input order, zeros where nothing is stored; each stored weight rounded once
// from table[code] * scale, as sparse24_dequantize writes it (k % 32 == 0, the row's length a
// multiple of 256).
struct Sparse24Segment {
  __m512 table;
  int log2_blocksize;
  // Word w of the segment belongs to group w / 4, at position w % 4; its group's two stored
  // values are words 2 (w / 4) and 2 (w / 4) + 1 of the 16.
  __m512i first = words([](int w) { return 2 * (w / 4); });
  __m512i second = words([](int w) { return 2 * (w / 4) + 1; });
  __m512i slot = words([](int w) { return w % 4; });

  template <class F>
  static __m512i words(F f) {
    alignas(64) uint16_t v[32];
    for (int w = 0; w < 32; ++w) v[w] = static_cast<uint16_t>(f(w));
    return _mm512_load_si512(v);
  }

  // codes / positions: the row's packed codes and position bytes; rs[b]: the scale of the
  // row's stored block b.
  __m512i operator()(const uint8_t* codes, const uint8_t* positions, const float* rs, int64_t k) const {
    const int64_t c = k >> 8, s = (k >> 5) & 7;  // the 256-input chunk and the segment in it
    const int j = static_cast<int>(s >> 1), i0 = static_cast<int>(16 * (s & 1));
    // Stored value t < 16 of the segment is v = 32 j + i0 + t of the chunk: storage element
    // e = 4 (i0 + t) + (j ^ 1), i.e. byte 2 (i0 + t) + ((j ^ 1) >> 1), high nibble when e is even.
    const int r = j ^ 1;
    const __m256i word16 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + c * 64 + 2 * i0));
    __m256i code = _mm256_and_si256(_mm256_srl_epi16(word16, _mm_cvtsi32_si128(8 * (r >> 1) + ((r & 1) ? 0 : 4))),
                                    _mm256_set1_epi16(0x0f));
    // Its position: bits 2j..2j+1 of position byte i0 + t of the chunk.
    const __m256i pbyte = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(positions + c * 32 + i0)));
    const __m256i pos = _mm256_and_si256(_mm256_srl_epi16(pbyte, _mm_cvtsi32_si128(2 * j)), _mm256_set1_epi16(3));
    // Its scale: stored block (128 c + e) >> log2_blocksize; values 8..15 reach the next block at
    // blocksize 32 only, and then look up the table's upper half (vpermw index bit 4).
    const int64_t b = (128 * c + 4 * i0 + r) >> log2_blocksize;
    const __m512 lo = _mm512_mul_ps(table, _mm512_set1_ps(rs[b]));
    const __m512 hi = log2_blocksize == 5 ? _mm512_mul_ps(table, _mm512_set1_ps(rs[b + 1])) : lo;
    if (log2_blocksize == 5) code = _mm256_or_si256(code, _mm256_setr_epi16(0, 0, 0, 0, 0, 0, 0, 0, 16, 16, 16, 16, 16, 16, 16, 16));
    const __m512i vz = _mm512_permutexvar_epi16(_mm512_castsi256_si512(code), (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
    const __m512i pz = _mm512_castsi256_si512(pos);
    const __mmask32 at_first = _mm512_cmpeq_epi16_mask(_mm512_permutexvar_epi16(first, pz), slot);
    const __mmask32 at_second = _mm512_cmpeq_epi16_mask(_mm512_permutexvar_epi16(second, pz), slot);
    // One permute of the values: word w takes the group's second value where its position is
    // w's slot (the second wins when both are), else the first where that one is, else 0.
    const __m512i from = _mm512_mask_blend_epi16(at_second, first, second);
    return _mm512_maskz_permutexvar_epi16(_kor_mask32(at_first, at_second), from, vz);
  }
};

// Where a panel decoder finds row n of W: its codes, (2:4) positions and block scales.
struct PanelSource {
  const uint8_t* packed;
  const uint8_t* positions;  // null: the dense layout
  int64_t K;
  SegmentDecoder dense;
  Sparse24Segment sparse;
  const float* scales;  // float32 block scales, row first_row's first block at index 0
  int64_t first_row;
  const float* offsets = nullptr;  // minmax codes (dense layout): float32 block offsets, row 0's first at 0

  PanelSource(const uint8_t* packed_, const uint8_t* positions_, int64_t K_, const float* table, int64_t blocksize)
      : packed(packed_),
        positions(positions_),
        K(K_),
        dense{_mm512_loadu_ps(table), log2_of(blocksize)},
        sparse{_mm512_loadu_ps(table), log2_of(blocksize)},
        scales(nullptr),
        first_row(0) {}

  // Codes (and scales) a row: all K, or the K / 2 the 2:4 layout stores.
  int64_t stored_per_row() const { return positions == nullptr ? K : K / 2; }
  int64_t blocks_per_row() const { return stored_per_row() >> dense.log2_blocksize; }

  // Row n's block offsets (minmax codes), or null.
  const float* row_offsets(int64_t n) const { return offsets == nullptr ? nullptr : offsets + n * blocks_per_row(); }

  // Inputs [k, k + 32) of row n as 32 bfloat16 words.
  __m512i segment(int64_t n, int64_t k) const {
    const int64_t stored = stored_per_row();
    const float* rs = scales + (n - first_row) * blocks_per_row();
    if (positions == nullptr) return dense(packed + ((n * stored) >> 1), rs, row_offsets(n), k);
    return sparse(packed + ((n * stored) >> 1), positions + ((n * stored) >> 2), rs, k);
  }
};

// The order in which ChunkDecoder yields a whole 128-input chunk: step j of 4 holds the 32 inputs
// 4w + kStepOrder[j], w = 0..31, the order vpermw yields them from the chunk's 64 bytes of codes
// read as 32 words of 4 nibbles and shifted 4 bits a step (byte d holds input 2d in its high
// nibble, 2d + 1 in its low one). The amx row packs x^T in the same order; decode_panel pairs the
// steps back into input order.
constexpr int kStepOrder[4] = {1, 0, 3, 2};

// One row's whole 128-input chunk of a 4-bit weight decoded into its 4 steps, each weight
// bfloat16(table[code] * scale), or of fma(table[code], scale, offset) for minmax codes, rounded
// once (as SegmentDecoder), for blocksize >= 32: the block
// scales are folded into vpermw's 32-word table, whose index bit 4 (the next nibble's low bit as
// loaded) is set to the word's block where a chunk spans two blocks; blocksize 32 (four blocks)
// looks up two tables and blends them. The dense layout's chunk is 64 bytes of codes (decode);
// the 2:4 layout's 256-input chunk stores its 128 values in the same 64-byte order, and each
// half of it is decoded from those values and the position bytes (decode24).
struct ChunkDecoder {
  __m512 table;
  int log2_blocksize;
  __m512i bit4 = _mm512_set1_epi16(0x10);
  // Words 16-31 (inputs 64..127) index the table's upper half.
  __m512i upper = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(0x10), 1);
  // 2:4: word w of a half is group w's first (second) stored value: word 2 (w % 16) (+ 1) of the
  // first (w < 16) or second of its two decoded steps, and the same position byte.
  __m512i first = words([](int w) { return 2 * (w % 16) + (w >= 16 ? 32 : 0); });
  __m512i second = words([](int w) { return 2 * (w % 16) + 1 + (w >= 16 ? 32 : 0); });
  __m512i first_byte = words([](int w) { return 2 * (w % 16); });
  __m512i second_byte = words([](int w) { return 2 * (w % 16) + 1; });
  // A position byte holds step j's position in bits 2j..2j + 1: half h's words read step 2h + (w >= 16).
  __m512i position_shift[2] = {words([](int w) { return w >= 16 ? 2 : 0; }),
                               words([](int w) { return w >= 16 ? 6 : 4; })};

  template <class F>
  static __m512i words(F f) {
    alignas(64) uint16_t v[32];
    for (int w = 0; w < 32; ++w) v[w] = static_cast<uint16_t>(f(w));
    return _mm512_load_si512(v);
  }

  __m512i scaled(const float* rs, const float* os, int64_t b_lo, int64_t b_hi) const {
    return (__m512i)_mm512_cvtne2ps_pbh(scaled_table(table, rs, os, b_hi), scaled_table(table, rs, os, b_lo));
  }

  // The tables of the chunk whose first code is block b's; kLog2: the block size's log2 capped
  // at 7 (one block a chunk), known at compile time in the hot loops.
  template <int kLog2>
  void tables(const float* rs, const float* os, int64_t b, __m512i tbl[2]) const {
    if constexpr (kLog2 >= 7) {  // one block: both halves of the table equal, bit 4 ignored
      tbl[0] = scaled(rs, os, b, b);
    } else if constexpr (kLog2 == 6) {
      tbl[0] = scaled(rs, os, b, b + 1);
    } else {  // blocksize 32: words 0-7, 8-15, 16-23, 24-31 in blocks b..b + 3
      tbl[0] = scaled(rs, os, b, b + 2);
      tbl[1] = scaled(rs, os, b + 1, b + 3);
    }
  }

  // The 32 values whose codes are the low nibbles of d's words.
  template <int kLog2>
  __m512i step(__m512i d, const __m512i tbl[2]) const {
    if constexpr (kLog2 >= 7) return _mm512_permutexvar_epi16(d, tbl[0]);
    const __m512i idx = _mm512_ternarylogic_epi32(d, bit4, upper, 0xB8);
    if constexpr (kLog2 == 6) return _mm512_permutexvar_epi16(idx, tbl[0]);
    return _mm512_mask_blend_epi16(0xFF00FF00u, _mm512_permutexvar_epi16(idx, tbl[0]),
                                   _mm512_permutexvar_epi16(idx, tbl[1]));
  }

  // The dense layout. codes: the row's packed codes; rs[b]: the scale of its block b; k % 128 == 0;
  // os: the row's block offsets (minmax codes), or null.
  template <int kLog2>
  void decode(const uint8_t* codes, const float* rs, int64_t k, __m512i steps[4], const float* os = nullptr) const {
    __m512i d = _mm512_loadu_si512(codes + (k >> 1)), tbl[2];
    tables<kLog2>(rs, os, k >> log2_blocksize, tbl);
    for (int j = 0; j < 4; ++j, d = _mm512_srli_epi16(d, 4)) steps[j] = step<kLog2>(d, tbl);
  }

  // The 2:4 layout (sparse/sparse24.h), kHalves 128-input halves of one row from input k (k %
  // 128 == 0; k % 256 == 0 for both halves of a chunk): codes and positions its stored values'
  // codes and position bytes, rs[b] the scale of its stored block b. Group w of half h (inputs
  // 4w..4w + 3 of the half) keeps stored values 2w and 2w + 1 of the half, at word 2 (w % 16)
  // (+ 1) of the chunk's decoded step 2h + (w >= 16); step j's word w is the kept value whose
  // position is kStepOrder[j], else 0. A group's two positions increase (checked where a 2:4
  // state is loaded), so position 0 can only be the first kept value and 3 only the second.
  template <int kLog2, int kHalves>
  void decode24(const uint8_t* codes, const uint8_t* positions, const float* rs, int64_t k,
                __m512i steps[4 * kHalves]) const {
    const int64_t c = k >> 8;
    const __m512i d = _mm512_loadu_si512(codes + 64 * c);
    __m512i tbl[2];
    tables<kLog2>(rs, nullptr, (128 * c) >> log2_blocksize, tbl);
    const __m512i p = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(positions + 32 * c)));
    const __m512i p0 = _mm512_permutexvar_epi16(first_byte, p), p1 = _mm512_permutexvar_epi16(second_byte, p);
    const __m512i three = _mm512_set1_epi16(3);
    for (int half = 0; half < kHalves; ++half) {
      const int h = kHalves == 2 ? half : static_cast<int>((k >> 7) & 1);
      const __m512i dh = _mm512_srli_epi16(d, 8 * h);
      const __m512i v0 = step<kLog2>(dh, tbl), v1 = step<kLog2>(_mm512_srli_epi16(dh, 4), tbl);
      const __m512i kept0 = _mm512_permutex2var_epi16(v0, first, v1);
      const __m512i kept1 = _mm512_permutex2var_epi16(v0, second, v1);
      const __m512i pos0 = _mm512_and_si512(_mm512_srlv_epi16(p0, position_shift[h]), three);
      const __m512i pos1 = _mm512_and_si512(_mm512_srlv_epi16(p1, position_shift[h]), three);
      const auto at = [](__m512i pos, int q) {
        return _mm512_cmpeq_epi16_mask(pos, _mm512_set1_epi16(static_cast<int16_t>(q)));
      };
      static_assert(kStepOrder[0] == 1 && kStepOrder[1] == 0 && kStepOrder[2] == 3 && kStepOrder[3] == 2);
      __m512i* out = steps + 4 * half;
      out[0] = _mm512_mask_mov_epi16(_mm512_maskz_mov_epi16(at(pos0, 1), kept0), at(pos1, 1), kept1);
      out[1] = _mm512_maskz_mov_epi16(at(pos0, 0), kept0);
      out[2] = _mm512_maskz_mov_epi16(at(pos1, 3), kept1);
      out[3] = _mm512_mask_mov_epi16(_mm512_maskz_mov_epi16(at(pos0, 2), kept0), at(pos1, 2), kept1);
    }
  }

  // Either layout: kHalves * 128 inputs of row n of w (its scales rs) from input k.
  template <int kLog2, int kHalves = 1>
  void row(const PanelSource& w, int64_t n, const float* rs, int64_t k, __m512i steps[4 * kHalves]) const {
    const int64_t stored = w.stored_per_row();
    if (w.positions != nullptr) {
      decode24<kLog2, kHalves>(w.packed + ((n * stored) >> 1), w.positions + ((n * stored) >> 2), rs, k, steps);
    } else {
      for (int half = 0; half < kHalves; ++half) {
        decode<kLog2>(w.packed + ((n * stored) >> 1), rs, k + 128 * half, steps + 4 * half, w.row_offsets(n));
      }
    }
  }

  template <int kHalves = 1>
  void decode_row(const PanelSource& w, int64_t n, const float* rs, int64_t k, __m512i steps[4 * kHalves]) const {
    if (log2_blocksize >= 7) {
      row<7, kHalves>(w, n, rs, k, steps);
    } else if (log2_blocksize == 6) {
      row<6, kHalves>(w, n, rs, k, steps);
    } else {
      row<5, kHalves>(w, n, rs, k, steps);
    }
  }
};

// A chunk's 4 steps (ChunkDecoder's order) as 4 vectors of input pairs (panel words): steps 1
// and 0 interleaved give the pairs (4w, 4w + 1), steps 3 and 2 the pairs (4w + 2, 4w + 3), word
// w landing in 128-bit lane w / 8 of the unpacks (chunk_pair says which pair a dword holds).
inline void step_pairs(const __m512i st[4], __m512i out[4]) {
  static_assert(kStepOrder[0] == 1 && kStepOrder[1] == 0 && kStepOrder[2] == 3 && kStepOrder[3] == 2);
  out[0] = _mm512_unpacklo_epi16(st[1], st[0]);
  out[1] = _mm512_unpackhi_epi16(st[1], st[0]);
  out[2] = _mm512_unpacklo_epi16(st[3], st[2]);
  out[3] = _mm512_unpackhi_epi16(st[3], st[2]);
}

// The chunk's pair (of 64) that dword c of step_pairs' vector v holds.
constexpr int64_t chunk_pair(int v, int c) { return 2 * (8 * (c / 4) + c % 4 + 4 * (v & 1)) + (v >> 1); }

// For y = x @ W^T: panel[(k - k0) / 2][n - n0][2] = W[n][k], W[n][k + 1] (bfloat16) for rows n in
// [n0, n0 + 32) (zeros from n_end on) and inputs [k0, k0 + kc), kc % 32 == 0, from a decoder of
// rows: chunk(n, k, steps) the 4 steps of row n's 128-input chunk at k (k % 128 == 0; used for
// whole chunks where chunked), segment(n, k) its inputs [k, k + 32) in input order (the rest).
template <class Chunk, class Segment>
void decode_panel_by(const Chunk& chunk, const Segment& segment, bool chunked, int64_t n0, int64_t n_end, int64_t k0,
                     int64_t kc, uint16_t* panel) {
  const int64_t whole = chunked ? k0 + kc / 128 * 128 : k0;
  for (int64_t half = 0; half < 2; ++half) {
    const int64_t first = n0 + 16 * half;
    const int64_t rows = std::clamp<int64_t>(n_end - first, 0, 16);
    uint16_t* base = panel + 2 * 16 * half;
    for (int64_t k = k0; k < whole; k += 128) {
      alignas(64) __m512i pairs[4][16];  // the chunk's pair vectors of the 16 rows
      for (int64_t i = 0; i < 16; ++i) {
        __m512i st[4], v[4] = {};
        if (i < rows) {
          chunk(first + i, k, st);
          step_pairs(st, v);
        }
        for (int j = 0; j < 4; ++j) pairs[j][i] = v[j];
      }
      uint16_t* dst = base + ((k - k0) / 2) * (2 * kPanelRows);
      for (int j = 0; j < 4; ++j) {
        transpose16(pairs[j]);  // pairs[j][c]: dword c of vector j, the 16 rows
        for (int c = 0; c < 16; ++c) _mm512_storeu_si512(dst + chunk_pair(j, c) * (2 * kPanelRows), pairs[j][c]);
      }
    }
    for (int64_t k = whole; k < k0 + kc; k += 32) {
      __m512i r[16];
      for (int64_t i = 0; i < 16; ++i) r[i] = i < rows ? segment(first + i, k) : _mm512_setzero_si512();
      transpose16(r);  // r[c]: input pair c of the segment, for the 16 rows
      uint16_t* dst = base + ((k - k0) / 2) * (2 * kPanelRows);
      for (int c = 0; c < 16; ++c) _mm512_storeu_si512(dst + c * 2 * kPanelRows, r[c]);
    }
  }
}

// decode_panel_by for 4-bit codes (either layout): whole chunks of a blocksize >= 32 through
// ChunkDecoder (one 64-byte load and table a chunk, the 2:4 positions read once a chunk:
// 11008 x 4096 at 64 rows 3 % faster dense, 4.5 % 2:4 than by segments), the rest by segments.
inline void decode_panel(const PanelSource& w, const ChunkDecoder& chunks, int64_t n0, int64_t n_end, int64_t k0,
                         int64_t kc, uint16_t* panel) {
  const int64_t per_row = w.blocks_per_row();
  decode_panel_by(
      [&](int64_t n, int64_t k, __m512i st[4]) {
        chunks.decode_row(w, n, w.scales + (n - w.first_row) * per_row, k, st);
      },
      [&](int64_t n, int64_t k) { return w.segment(n, k); }, chunks.log2_blocksize >= 5, n0, n_end, k0, kc, panel);
}

// For gx = g @ W: panel[(n - n0) / 2][k - k0][2] = W[n][k], W[n + 1][k] (bfloat16) for the row
// pairs of [n0, n0 + nc) (nc even) and columns [k0, k0 + 32), from rows(n, k, a, b): inputs
// [k, k + 32) of rows n (a) and n + 1 (b) in input order.
template <class Rows>
void decode_panel_t_by(const Rows& rows, int64_t n0, int64_t nc, int64_t k0, uint16_t* panel) {
  // Word j of a pair's low / high vector: word j / 2 (+ 16) of row n (j even) or of row n + 1.
  alignas(64) uint16_t lo_idx[32], hi_idx[32];
  for (int j = 0; j < 32; ++j) {
    lo_idx[j] = static_cast<uint16_t>((j / 2) + (j % 2) * 32);
    hi_idx[j] = static_cast<uint16_t>(16 + (j / 2) + (j % 2) * 32);
  }
  const __m512i lo = _mm512_load_si512(lo_idx), hi = _mm512_load_si512(hi_idx);
  for (int64_t n = n0; n < n0 + nc; n += 2) {
    __m512i a, b;
    rows(n, k0, a, b);
    uint16_t* dst = panel + ((n - n0) / 2) * (2 * kPanelRows);
    _mm512_storeu_si512(dst, _mm512_permutex2var_epi16(a, lo, b));
    _mm512_storeu_si512(dst + 32, _mm512_permutex2var_epi16(a, hi, b));
  }
}

// decode_panel_t_by for 4-bit codes (either layout).
inline void decode_panel_t(const PanelSource& w, int64_t n0, int64_t nc, int64_t k0, uint16_t* panel) {
  decode_panel_t_by(
      [&](int64_t n, int64_t k, __m512i& a, __m512i& b) {
        a = w.segment(n, k);
        b = w.segment(n + 1, k);
      },
      n0, nc, k0, panel);
}

// The float32 scales of blocks [b_lo, b_lo + count): the plain ones in place, or the double-
// quantized ones decoded into buf, in bulk with byte permutes where the CPU has VBMI.
// buf: kept between calls and grown when count needs more (a task decodes group after group).
inline const float* group_scales(const BlockScales& s, const ScalePlanes* planes, int64_t b_lo, int64_t count,
                          std::vector<float>& buf) {
  if (s.values != nullptr) return s.values + b_lo;
  if (static_cast<int64_t>(buf.size()) < count) buf.resize(static_cast<size_t>(count));
  if (planes != nullptr) {
    decode_nested_scales_vbmi(s, *planes, b_lo, count, buf.data());
  } else {
    tile_scales(s, b_lo, count, buf.data());
  }
  return buf.data();
}

}  // namespace
}  // namespace qengine::cpu
#endif
