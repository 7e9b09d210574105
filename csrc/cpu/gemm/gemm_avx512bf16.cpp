// AVX512-BF16 large-batch dequantize-matmul: the bf16_4bit of the gemm family's avx512_bf16
// row. The weight is decoded from its packed codes straight into vdpbf16ps's operand layout
// (kernels.h), 32 output columns by 512 inputs a panel, and a 12 x 32 register tile of y
// accumulates over it: no dense weight tile is written to memory, and nothing is repacked.
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <vector>

#include "cpu/common/ladder.h"
#include "cpu/common/simd_avx512.h"
#include "cpu/gemm/kernels.h"
#include "cpu/gemv/kernels.h"  // decode_nested_scales_vbmi

namespace qengine::cpu {
namespace {

// Words of one panel: kPanelK / 2 input pairs of kPanelRows columns, two words each.
constexpr int64_t kPanelWords = kPanelK * kPanelRows;

int log2_of(int64_t power_of_two) {
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

  // codes: the row's packed codes; rs[b]: the scale of the row's block b.
  __m512i operator()(const uint8_t* codes, const float* rs, int64_t k) const {
    const int64_t b = k >> log2_blocksize;
    const __m512 lo = _mm512_mul_ps(table, _mm512_set1_ps(rs[b]));
    const __m512 hi = log2_blocksize == 4 ? _mm512_mul_ps(table, _mm512_set1_ps(rs[b + 1])) : lo;
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

  // Inputs [k, k + 32) of row n as 32 bfloat16 words.
  __m512i segment(int64_t n, int64_t k) const {
    const int64_t stored = stored_per_row();
    const float* rs = scales + (n - first_row) * blocks_per_row();
    if (positions == nullptr) return dense(packed + ((n * stored) >> 1), rs, k);
    return sparse(packed + ((n * stored) >> 1), positions + ((n * stored) >> 2), rs, k);
  }
};

// For y = x @ W^T: panel[(k - k0) / 2][n - n0][2] = W[n][k], W[n][k + 1] (bfloat16) for rows n in
// [n0, n0 + 32) (zeros from n_end on) and inputs [k0, k0 + kc), kc % 32 == 0.
void decode_panel(const PanelSource& w, int64_t n0, int64_t n_end, int64_t k0, int64_t kc, uint16_t* panel) {
  for (int64_t half = 0; half < 2; ++half) {
    const int64_t first = n0 + 16 * half;
    const int64_t rows = std::clamp<int64_t>(n_end - first, 0, 16);
    for (int64_t k = k0; k < k0 + kc; k += 32) {
      __m512i r[16];
      for (int64_t i = 0; i < 16; ++i) {
        const int64_t n = first + i;
        r[i] = i < rows ? w.segment(n, k) : _mm512_setzero_si512();
      }
      transpose16(r);  // r[c]: input pair c of the segment, for the 16 rows
      uint16_t* dst = panel + ((k - k0) / 2) * (2 * kPanelRows) + 2 * 16 * half;
      for (int c = 0; c < 16; ++c) _mm512_storeu_si512(dst + c * 2 * kPanelRows, r[c]);
    }
  }
}

// For gx = g @ W: panel[(n - n0) / 2][k - k0][2] = W[n][k], W[n + 1][k] (bfloat16) for the row
// pairs of [n0, n0 + nc) (nc even) and columns [k0, k0 + 32).
void decode_panel_t(const PanelSource& w, int64_t n0, int64_t nc, int64_t k0, uint16_t* panel) {
  // Word j of a pair's low / high vector: word j / 2 (+ 16) of row n (j even) or of row n + 1.
  alignas(64) uint16_t lo_idx[32], hi_idx[32];
  for (int j = 0; j < 32; ++j) {
    lo_idx[j] = static_cast<uint16_t>((j / 2) + (j % 2) * 32);
    hi_idx[j] = static_cast<uint16_t>(16 + (j / 2) + (j % 2) * 32);
  }
  const __m512i lo = _mm512_load_si512(lo_idx), hi = _mm512_load_si512(hi_idx);
  for (int64_t n = n0; n < n0 + nc; n += 2) {
    const __m512i a = w.segment(n, k0), b = w.segment(n + 1, k0);
    uint16_t* dst = panel + ((n - n0) / 2) * (2 * kPanelRows);
    _mm512_storeu_si512(dst, _mm512_permutex2var_epi16(a, lo, b));
    _mm512_storeu_si512(dst + 32, _mm512_permutex2var_epi16(a, hi, b));
  }
}

// x's rows as the tiles read them: rows [m0, m0 + kTileRows) of x as input pairs, xp[(m0 /
// kTileRows) * K * kTileRows / 2 + p * kTileRows + m] = the pair p of row m0 + m (zeros past M), so
// a tile's broadcasts of x come from one sequential stream. Packs the tiles [t0, t1), 16 pairs
// of every row at a time through one 16 x 16 transpose.
void pack_x(const uint16_t* x, int64_t M, int64_t K, int64_t ldx, int64_t t0, int64_t t1, int32_t* xp) {
  const int64_t pairs = K / 2;
  const __mmask16 tile_lanes = lanes_below(kTileRows);
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t m0 = t * kTileRows;
    int32_t* dst = xp + t * pairs * kTileRows;
    for (int64_t p0 = 0; p0 < pairs; p0 += 16) {
      const __mmask16 live = lanes_below(pairs - p0);
      __m512i r[16];
      for (int64_t m = 0; m < 16; ++m) {
        r[m] = m < kTileRows && m0 + m < M ? _mm512_maskz_loadu_epi32(live, x + (m0 + m) * ldx + 2 * p0)
                                           : _mm512_setzero_si512();
      }
      transpose16(r);  // r[c]: pair p0 + c of the 16 rows
      const int64_t n = std::min<int64_t>(16, pairs - p0);
      for (int64_t c = 0; c < n; ++c) _mm512_mask_storeu_epi32(dst + (p0 + c) * kTileRows, tile_lanes, r[c]);
    }
  }
}

// Where a tile's sums go: added to the float32 partial sums at part (row stride ldp) when add;
// then stored there, or, when out16 is set (the last input block of a bfloat16 output), rounded
// to bfloat16 into out16 (row stride ldo).
struct TileOut {
  float* part;
  int64_t ldp;
  bool add;
  uint16_t* out16;
  int64_t ldo;

  TileOut at(int64_t m0, int64_t c) const {
    return TileOut{part != nullptr ? part + m0 * ldp + c : nullptr, ldp, add,
                   out16 != nullptr ? out16 + m0 * ldo + c : nullptr, ldo};
  }
};

template <int MR>
void tile(const int32_t* xp, const uint16_t* panel, int64_t pairs, const TileOut& o, __mmask16 mask0, __mmask16 mask1,
          const LoraSide* lora, int64_t m0, int64_t n) {
  __m512 acc[MR][2];
  for (int m = 0; m < MR; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(panel + p * 2 * kPanelRows);
    const __m512bh w1 = (__m512bh)_mm512_loadu_si512(panel + p * 2 * kPanelRows + 32);
    const int32_t* xq = xp + p * kTileRows;
    for (int m = 0; m < MR; ++m) {
      const __m512bh xb = (__m512bh)_mm512_set1_epi32(xq[m]);
      acc[m][0] = _mm512_dpbf16_ps(acc[m][0], w0, xb);
      acc[m][1] = _mm512_dpbf16_ps(acc[m][1], w1, xb);
    }
  }
  if (lora != nullptr) {  // the side path's r multiply-adds per output, in the same float32 sum
    // Its fields read once, before the loop.
    const int64_t r = lora->r, ldbt = lora->ldbt;
    const float* bt = lora->bt + n;
    const float* t = lora->t + m0 * r;
    for (int64_t j = 0; j < r; ++j) {
      const __m512 b0 = _mm512_maskz_loadu_ps(mask0, bt + j * ldbt);
      const __m512 b1 = _mm512_maskz_loadu_ps(mask1, bt + j * ldbt + 16);
      for (int m = 0; m < MR; ++m) {
        const __m512 tv = _mm512_set1_ps(t[m * r + j]);
        acc[m][0] = _mm512_fmadd_ps(tv, b0, acc[m][0]);
        acc[m][1] = _mm512_fmadd_ps(tv, b1, acc[m][1]);
      }
    }
  }
  // Unrolled, so that acc is indexed by constants only and stays in registers through the side
  // path's loop above (a runtime index here made GCC store every accumulator back to the stack
  // at each step of that loop).
#pragma GCC unroll 16
  for (int m = 0; m < MR; ++m) {
    float* pm = o.part + m * o.ldp;
    if (o.add) {
      acc[m][0] = _mm512_add_ps(acc[m][0], _mm512_maskz_loadu_ps(mask0, pm));
      acc[m][1] = _mm512_add_ps(acc[m][1], _mm512_maskz_loadu_ps(mask1, pm + 16));
    }
    if (o.out16 != nullptr) {  // the whole sum: rounded once, as float_to_bf16
      uint16_t* ym = o.out16 + m * o.ldo;
      _mm256_mask_storeu_epi16(ym, mask0, to_bf16(acc[m][0]));
      _mm256_mask_storeu_epi16(ym + 16, mask1, to_bf16(acc[m][1]));
    } else {
      _mm512_mask_storeu_ps(pm, mask0, acc[m][0]);
      _mm512_mask_storeu_ps(pm + 16, mask1, acc[m][1]);
    }
  }
}

// The float32 scales of blocks [b_lo, b_lo + count): the plain ones in place, or the double-
// quantized ones decoded into buf, in bulk with byte permutes where the CPU has VBMI.
// buf: kept between calls and grown when count needs more (a task decodes group after group).
const float* group_scales(const BlockScales& s, const ScalePlanes* planes, int64_t b_lo, int64_t count,
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

// Rows [m0, m0 + kTileRows) of the output (column c0 at out's column 0) (+)= the packed rows
// of x times `count` panels of `pairs` input pairs; cols: the columns left at the first panel
// (the last panel may be partial). lora: the side path to add (the last input block only).
void tiles_over_panels(const int32_t* xp, int64_t M, int64_t total_pairs, const uint16_t* panels, int64_t count,
                       int64_t pairs, int64_t pair0, const TileOut& out, int64_t c0, int64_t cols,
                       const LoraSide* lora) {
  for (int64_t m0 = 0; m0 < M; m0 += kTileRows) {
    with_rows<static_cast<int>(kTileRows)>(std::min(kTileRows, M - m0), [&](auto rows) {
      for (int64_t p = 0; p < count; ++p) {
        const int64_t left = cols - p * kPanelRows;
        tile<rows>(xp + m0 * total_pairs + pair0 * kTileRows, panels + p * kPanelWords, pairs,
                   out.at(m0, p * kPanelRows), lanes_below(left), lanes_below(std::max<int64_t>(0, left - 16)), lora,
                   m0, c0 + p * kPanelRows);
      }
    });
  }
}

// Where one task's output columns [c, c + width) go for one input block: float32 partial sums
// in y itself (float32 output) or in the task's scratch [M, width] (bfloat16 output, whose last
// block rounds the whole sum straight into y).
struct GroupOut {
  float* y32;
  uint16_t* y16;
  int64_t ld;  // y's row stride
  std::vector<float>* scratch;

  TileOut block(int64_t M, int64_t c, int64_t width, bool first, bool last) const {
    if (y32 != nullptr) return TileOut{y32 + c, ld, !first, nullptr, 0};
    if (!(first && last) && static_cast<int64_t>(scratch->size()) < M * width) {
      scratch->resize(static_cast<size_t>(M * width));
    }
    return TileOut{scratch->empty() ? nullptr : scratch->data(), width, !first, last ? y16 + c : nullptr, ld};
  }
};

GroupOut group_out(void* y, int dtype, int64_t ld, std::vector<float>& scratch) {
  if (dtype == kFloat32) return GroupOut{static_cast<float*>(y), nullptr, ld, &scratch};
  return GroupOut{nullptr, static_cast<uint16_t*>(y), ld, &scratch};
}

void bf16_4bit(const int32_t* xp, int64_t M, int64_t K, int64_t N, const uint8_t* packed, const uint8_t* positions,
               int64_t blocksize, const float* table, const BlockScales& scales, const ScalePlanes* planes,
               const LoraSide* lora, int64_t n0, int64_t n1, void* y, int y_dtype) {
  PanelSource w(packed, positions, K, table, blocksize);
  const int64_t per_row = w.blocks_per_row();
  std::unique_ptr<uint16_t[]> panels(new uint16_t[static_cast<size_t>(kGroupPanels * kPanelWords)]);
  std::vector<float> scale_buf, scratch;
  const GroupOut out = group_out(y, y_dtype, N, scratch);
  for (int64_t g = n0; g < n1; g += kPanelRows * kGroupPanels) {
    const int64_t g_end = std::min(n1, g + kPanelRows * kGroupPanels);
    const int64_t count = (g_end - g + kPanelRows - 1) / kPanelRows;
    w.scales = group_scales(scales, planes, g * per_row, (g_end - g) * per_row, scale_buf);
    w.first_row = g;
    for (int64_t k0 = 0; k0 < K; k0 += kPanelK) {
      const int64_t kc = std::min(kPanelK, K - k0);
      for (int64_t p = 0; p < count; ++p) decode_panel(w, g + p * kPanelRows, g_end, k0, kc, panels.get() + p * kPanelWords);
      const bool last = k0 + kc == K;
      tiles_over_panels(xp, M, K / 2, panels.get(), count, kc / 2, k0 / 2, out.block(M, g, g_end - g, k0 == 0, last),
                        g, g_end - g, last ? lora : nullptr);
    }
  }
}

void bf16_4bit_t(const int32_t* gp, int64_t M, int64_t N, int64_t K, const uint8_t* packed, const uint8_t* positions,
                 int64_t blocksize, const float* table, const float* scales, int64_t k0, int64_t k1, void* gx,
                 int gx_dtype) {
  PanelSource w(packed, positions, K, table, blocksize);
  w.scales = scales;
  std::unique_ptr<uint16_t[]> panels(new uint16_t[static_cast<size_t>(kGroupPanels * kPanelWords)]);
  std::vector<float> scratch;
  const GroupOut out = group_out(gx, gx_dtype, K, scratch);
  for (int64_t g = k0; g < k1; g += kPanelRows * kGroupPanels) {
    const int64_t g_end = std::min(k1, g + kPanelRows * kGroupPanels);
    const int64_t count = (g_end - g) / kPanelRows;  // K % 32 == 0: whole panels
    for (int64_t n0 = 0; n0 < N; n0 += kPanelK) {
      const int64_t nc = std::min(kPanelK, N - n0);
      for (int64_t p = 0; p < count; ++p) decode_panel_t(w, n0, nc, g + p * kPanelRows, panels.get() + p * kPanelWords);
      tiles_over_panels(gp, M, N / 2, panels.get(), count, nc / 2, n0 / 2,
                        out.block(M, g, g_end - g, n0 == 0, n0 + nc == N), g, g_end - g, nullptr);
    }
  }
}

// t[m * r + j] = scale * (x[m] . a[j]) for the rows [m0, m1) of x (bfloat16, row stride ldx) and
// the r rows of a (float32 [r, K]): the side path's first product. Blocks of 4 rows of x by 4
// rows of a share every load (16 accumulators): A (48-128 KiB at r = 16) is read from L2 once per
// 4 rows of x instead of once per row (at 512 rows, K = 2048: 0.38 -> 0.19 ms).
void lora_down(const uint16_t* x, int64_t K, int64_t ldx, const float* a, int64_t r, float scale, int64_t m0,
               int64_t m1, float* t) {
  constexpr int kR = 4, kJ = 4;
  const int64_t K16 = K & ~int64_t{15};
  for (int64_t m = m0; m < m1; m += kR) {
    const int64_t rows = std::min<int64_t>(kR, m1 - m);
    for (int64_t j0 = 0; j0 < r; j0 += kJ) {
      const int64_t jn = std::min<int64_t>(kJ, r - j0);
      __m512 acc[kR][kJ];
      for (int i = 0; i < kR; ++i) {
        for (int j = 0; j < kJ; ++j) acc[i][j] = _mm512_setzero_ps();
      }
      for (int64_t k = 0; k < K16; k += 16) {
        __m512 xv[kR], av[kJ];
        for (int i = 0; i < kR; ++i) xv[i] = i < rows ? load16<kBFloat16>(x + (m + i) * ldx, k) : _mm512_setzero_ps();
        for (int j = 0; j < kJ; ++j) av[j] = j < jn ? _mm512_loadu_ps(a + (j0 + j) * K + k) : _mm512_setzero_ps();
        for (int i = 0; i < kR; ++i) {
          for (int j = 0; j < kJ; ++j) acc[i][j] = _mm512_fmadd_ps(xv[i], av[j], acc[i][j]);
        }
      }
      // Unrolled with constant indices, so acc stays in registers (as in lora_up_add).
#pragma GCC unroll 4
      for (int i = 0; i < kR; ++i) {
#pragma GCC unroll 4
        for (int j = 0; j < kJ; ++j) {
          if (i >= rows || j >= jn) continue;
          float sum = _mm512_reduce_add_ps(acc[i][j]);
          for (int64_t kk = K16; kk < K; ++kk) sum += bf16_to_float(x[(m + i) * ldx + kk]) * a[(j0 + j) * K + kk];
          t[(m + i) * r + j0 + j] = scale * sum;
        }
      }
    }
  }
}

// bfloat16 lanes [i, i + n) of p (n <= 16; the rest 0) as float32.
inline __m512 load_bf16_masked(const uint16_t* p, __mmask16 lanes) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(lanes, p)), 16));
}

// The LoRA backward's reductions over the rows: out[j * ldo + n] = sum_m u[m * ru + j] * g[m * ldg + n]
// for j < 16 and n in [n0, n1). 16 accumulators, one per j, over 16 columns of g: each bfloat16
// load of g feeds 16 FMAs whose other operand is a broadcast of u.
void lora_reduce(const uint16_t* g, int64_t M, int64_t ldg, const float* u, int64_t ru, int64_t n0, int64_t n1,
                 float* out, int64_t ldo) {
  for (int64_t n = n0; n < n1; n += 16) {
    const __mmask16 lanes = lanes_below(n1 - n);
    __m512 acc[16];
    for (int j = 0; j < 16; ++j) acc[j] = _mm512_setzero_ps();
    for (int64_t m = 0; m < M; ++m) {
      const __m512 gv = load_bf16_masked(g + m * ldg + n, lanes);
      const float* um = u + m * ru;
#pragma GCC unroll 16
      for (int j = 0; j < 16; ++j) acc[j] = _mm512_fmadd_ps(_mm512_set1_ps(um[j]), gv, acc[j]);
    }
#pragma GCC unroll 16
    for (int j = 0; j < 16; ++j) _mm512_mask_storeu_ps(out + j * ldo + n, lanes, acc[j]);
  }
}

// gx[m][k] = bfloat16(gx_in[m][k] + sum_{j < r} u[m * ru + j] * a[j * K + k]) for m in [m0, m1), each
// sum rounded once (float_to_bf16). Blocks of 4 rows by 64 columns (a load of a feeds 4 FMAs), the
// rows innermost so the r x 64 slice of a stays in L1 across them (K = 2048: 0.65 -> 0.45 ms).
void lora_up_add(const float* u, int64_t ru, int64_t r, const float* a, int64_t K, const uint16_t* gx_in,
                 uint16_t* gx, int64_t m0, int64_t m1) {
  constexpr int kR = 4, kC = 4;
  for (int64_t k0 = 0; k0 < K; k0 += 16 * kC) {
    __mmask16 lanes[kC];
    for (int c = 0; c < kC; ++c) lanes[c] = k0 + 16 * c < K ? lanes_below(K - k0 - 16 * c) : __mmask16{0};
    for (int64_t m = m0; m < m1; m += kR) {
      const int64_t rows = std::min<int64_t>(kR, m1 - m);
      const float* um[kR];
      for (int i = 0; i < kR; ++i) um[i] = u + (m + std::min<int64_t>(i, rows - 1)) * ru;  // spare rows repeat the last
      __m512 acc[kR][kC];
      for (int i = 0; i < kR; ++i) {
        for (int c = 0; c < kC; ++c) acc[i][c] = _mm512_setzero_ps();
      }
      for (int64_t j = 0; j < r; ++j) {
        __m512 av[kC];
        for (int c = 0; c < kC; ++c) av[c] = _mm512_maskz_loadu_ps(lanes[c], a + j * K + k0 + 16 * c);
        for (int i = 0; i < kR; ++i) {
          const __m512 b = _mm512_set1_ps(um[i][j]);
          for (int c = 0; c < kC; ++c) acc[i][c] = _mm512_fmadd_ps(b, av[c], acc[i][c]);
        }
      }
      // Unrolled, so acc is indexed by constants only and stays in registers (a runtime row
      // count here made GCC store all 16 accumulators to the stack at every step of j).
#pragma GCC unroll 4
      for (int i = 0; i < kR; ++i) {
#pragma GCC unroll 4
        for (int c = 0; c < kC; ++c) {
          if (i >= rows || lanes[c] == 0) continue;
          const int64_t o = (m + i) * K + k0 + 16 * c;
          const __m512 sum = _mm512_add_ps(load_bf16_masked(gx_in + o, lanes[c]), acc[i][c]);
          _mm256_mask_storeu_epi16(gx + o, lanes[c], to_bf16(sum));
        }
      }
    }
  }
}

const float* decode_scales(const BlockScales& s, const ScalePlanes* planes, int64_t count, std::vector<float>& buf) {
  return group_scales(s, planes, 0, count, buf);
}

}  // namespace

const GemmKernels kGemmAvx512Bf16 = {
    .pack_x = pack_x,
    .bf16_4bit = bf16_4bit,
    .bf16_4bit_t = bf16_4bit_t,
    .decode_scales = decode_scales,
    .lora_down = lora_down,
    .lora_reduce = lora_reduce,
    .lora_up_add = lora_up_add};

}  // namespace qengine::cpu
#endif
