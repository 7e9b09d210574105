// AMX large-batch dequantize-matmul: the gemm family's amx row. The AMX unit multiplies 16 x 32
// bfloat16 tiles into 16 x 16 float32 tiles so fast that, from a few rows of x on, the product
// costs little more than decoding W once; the decode is what this file keeps cheap.
// - y = x @ W^T is computed as y^T = W x^T: W is the tiles' A operand, a tile row 32 inputs of
//   one row of W, exactly what one vpermw step over 64 bytes of codes yields (ChunkDecoder), so
//   W is decoded with no transpose; x^T is the B operand (pairs of inputs by 16 rows of x),
//   packed once per call in the same input order.
// - gx = g @ W (the backward) keeps g as the A operand and decodes W into the pair-interleaved B
//   layout of the avx512_bf16 row's panels (decode_chunk_t; decode_panel_t for tails).
// The LoRA side path, the transpose of y^T's tiles and the rounding to bfloat16 run on AVX-512
// in the epilogue.
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <vector>

#include "cpu/common/ladder.h"  // IntC
#include "cpu/common/simd_avx512.h"
#include "cpu/gemm/kernels.h"
#include "cpu/gemm/byte_chunks_vbmi.h"  // (this file is compiled with VBMI: cpu_flags.cmake)
#include "cpu/gemm/panels_avx512bf16.h"

namespace qengine::cpu {
namespace {

// Rows of x in one AMX tile; pack_x pads x to whole tiles.
constexpr int64_t kAmxRows = 16;
// Inputs a tile row holds (64 bytes of bfloat16): pack_x pads each row of x to a multiple.
constexpr int64_t kAmxK = 32;
// Output columns of one task's group: kGroupPanels panels.
constexpr int64_t kGroupCols = kPanelRows * kGroupPanels;
static_assert(kGroupCols == 128, "a transposed group is one 128-column chunk (decode_chunk_t)");

int64_t round_up(int64_t v, int64_t to) { return (v + to - 1) / to * to; }

// Palette 1, every tile 16 rows of 64 bytes: tiles 0-3 accumulate (sums_start), 4 and 5 hold
// A operands, 6 and 7 B operands.
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// GCC's AMX intrinsics are asm statements that do not tell the compiler which memory they read
// or write. This barrier orders the plain stores of a decode or a pack before the tile loads that
// read them, and the tile stores of the sums before the plain loads that read them back.
inline void memory_barrier() { asm volatile("" ::: "memory"); }

// The tiles configured on the calling thread for one task, and released at its end (a thread
// holding no tile state saves and restores less at every context switch).
class Tiles {
 public:
  Tiles() {
    TileConfig c;
    for (int t = 0; t < 8; ++t) {
      c.colsb[t] = 64;
      c.rows[t] = 16;
    }
    // ldtilecfg with the whole 64-byte configuration as its operand (_tile_loadconfig names only
    // its first 8 bytes, so the compiler could drop the stores above).
    asm volatile("ldtilecfg\t%X0" : : "m"(c) : "memory");
  }
  ~Tiles() { _tile_release(); }
  Tiles(const Tiles&) = delete;
  Tiles& operator=(const Tiles&) = delete;
};

// The forward walks each whole 128-input chunk of K in ChunkDecoder's step order (kStepOrder in
// panels_avx512bf16.h; a tail past the last whole chunk stays in input order), and x^T is packed
// in the same order, so every sum is still over the same products.

// A chunk's 4 steps from its 128 inputs in order (v[s]: inputs 32 s..32 s + 31).
struct ChunkOrder {
  __m512i idx[4];  // word w of step j: element 4 (w % 16) + kStepOrder[j] of v[0]|v[1] (w < 16) or v[2]|v[3]

  ChunkOrder() {
    for (int j = 0; j < 4; ++j) {
      alignas(64) uint16_t words[32];
      for (int w = 0; w < 32; ++w) words[w] = static_cast<uint16_t>(4 * (w % 16) + kStepOrder[j]);
      idx[j] = _mm512_load_si512(words);
    }
  }

  void operator()(const __m512i v[4], __m512i steps[4]) const {
    for (int j = 0; j < 4; ++j) {
      const __m512i lo = _mm512_permutex2var_epi16(v[0], idx[j], v[1]);
      const __m512i hi = _mm512_permutex2var_epi16(v[2], idx[j], v[3]);
      steps[j] = _mm512_mask_blend_epi16(0xFFFF0000u, lo, hi);
    }
  }
};

// x as the forward's B tiles load it: x^T in pairs, input steps in the chunk order above,
// xt[((m / 16) * (K / 2) + p) * 16 + m % 16] = the words 2p, 2p + 1 of row m's steps (zeros past
// M), for the row tiles [t0, t1); a B tile (16 pairs by 16 rows) is 1 KiB of contiguous words.
// K % 32 == 0.
void pack_x(const uint16_t* x, int64_t M, int64_t K, int64_t ldx, int64_t t0, int64_t t1, int32_t* xt) {
  const int64_t pairs = K / 2, whole = K / 128 * 128;
  const ChunkOrder order;
  alignas(64) uint16_t steps[4][16][32];  // a chunk's steps for the tile's 16 rows
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t m0 = t * kAmxRows;
    int32_t* dst = xt + t * pairs * kAmxRows;
    for (int64_t k = 0; k < K; k += 128) {
      const int64_t n_steps = k < whole ? 4 : (K - k) / kAmxK;
      for (int64_t m = 0; m < 16; ++m) {
        __m512i v[4], out[4];
        for (int s = 0; s < 4; ++s) {
          v[s] = m0 + m < M && s < n_steps ? _mm512_loadu_si512(x + (m0 + m) * ldx + k + 32 * s) : _mm512_setzero_si512();
        }
        if (k < whole) {
          order(v, out);
        } else {
          for (int s = 0; s < 4; ++s) out[s] = v[s];
        }
        for (int s = 0; s < 4; ++s) _mm512_store_si512(steps[s][m], out[s]);
      }
      for (int64_t s = 0; s < n_steps; ++s) {
        __m512i r[16];
        for (int m = 0; m < 16; ++m) r[m] = _mm512_load_si512(steps[s][m]);
        transpose16(r);  // r[c]: pair c of the step, the 16 rows
        const int64_t p0 = (k + 32 * s) / 2;
        for (int c = 0; c < 16; ++c) _mm512_storeu_si512(dst + (p0 + c) * kAmxRows, r[c]);
      }
    }
  }
}

// g as the backward's A tiles load it: bfloat16 rows [t0 * 16, t1 * 16) of a [tiles * 16,
// round_up(N, 32)] row-major copy (zeros past M and past N), so every tile load reads whole
// rows in bounds.
void pack_g(const uint16_t* g, int64_t M, int64_t N, int64_t ldg, int64_t t0, int64_t t1, int32_t* gp) {
  const int64_t ld = round_up(N, kAmxK);
  auto* rows = reinterpret_cast<unsigned char*>(gp);
  for (int64_t m = t0 * kAmxRows; m < t1 * kAmxRows; ++m) {
    unsigned char* row = rows + m * ld * 2;
    const int64_t copied = m < M ? N : 0;
    if (copied > 0) std::memcpy(row, g + m * ldg, static_cast<size_t>(copied * 2));
    std::memset(row + copied * 2, 0, static_cast<size_t>((ld - copied) * 2));
  }
}

// For y^T = W x^T: rows [n0, n0 + 32) of W (zeros from n_end on), inputs [k0, k0 + kc) (k0 % 128
// == 0, kc % 32 == 0) in the forward's step order, as A tiles: panel[((h * steps + s) * 16 + i) *
// 32 + j] = word j of step s of row n0 + 16 h + i (steps = kc / 32): each 16-row by 32-input tile
// is 1 KiB of contiguous words, a step of one row a tile row. Blocksize >= 32 (every 2:4 weight)
// goes through ChunkDecoder; dense blocksize 16 decodes in input order and is reordered.
// decode_row writes row i of the panel; decode_rows all 32.
void decode_row(const PanelSource& w, const ChunkDecoder& chunks, const ByteChunks& bytes, const ChunkOrder& order,
                int64_t n0, int64_t n_end, int64_t k0, int64_t kc, int64_t i, uint16_t* panel) {
  const int64_t steps = kc / kAmxK, whole = k0 + (kc / 128) * 128;
  const int64_t n = n0 + i;
  uint16_t* row = panel + ((i / 16) * steps * 16 + i % 16) * kAmxK;
  const auto put = [&](int64_t s, __m512i v) { _mm512_storeu_si512(row + s * 16 * kAmxK, v); };
  if (n >= n_end) {
    for (int64_t s = 0; s < steps; ++s) put(s, _mm512_setzero_si512());
    return;
  }
  const float* rs = w.scales + (n - w.first_row) * w.blocks_per_row();
  if (bytes.planes != nullptr) {
    const uint8_t* codes = w.packed + n * w.K;
    for (int64_t k = k0; k < whole; k += 128) {
      __m512i st[4];
      bytes.chunk(codes, rs, k, st);
      for (int j = 0; j < 4; ++j) put((k - k0) / kAmxK + j, st[j]);
    }
    for (int64_t k = whole; k < k0 + kc; k += kAmxK) put((k - k0) / kAmxK, bytes.segment(codes, rs, k));
    return;
  }
  const bool fast = chunks.log2_blocksize >= 5;
  for (int64_t k = k0; k < whole;) {
    __m512i st[8];
    int count = 4;
    if (!fast) {
      __m512i v[4];
      for (int s = 0; s < 4; ++s) v[s] = w.segment(n, k + 32 * s);
      order(v, st);
    } else if (w.positions != nullptr && k + 256 <= whole) {  // a whole 2:4 chunk at once
      chunks.decode_row<2>(w, n, rs, k, st);
      count = 8;
    } else {
      chunks.decode_row(w, n, rs, k, st);
    }
    for (int j = 0; j < count; ++j) put((k - k0) / kAmxK + j, st[j]);
    k += 32 * count;
  }
  for (int64_t k = whole; k < k0 + kc; k += kAmxK) put((k - k0) / kAmxK, w.segment(n, k));
}

void decode_rows(const PanelSource& w, const ChunkDecoder& chunks, const ByteChunks& bytes, const ChunkOrder& order,
                 int64_t n0, int64_t n_end, int64_t k0, int64_t kc, uint16_t* panel) {
  for (int64_t i = 0; i < kPanelRows; ++i) decode_row(w, chunks, bytes, order, n0, n_end, k0, kc, i, panel);
}

// The accumulator tiles of both products: tile a + 2 b holds the float32 sums of A tile 4 + a
// (16 rows) times B tile 6 + b (16 columns), kept in memory at c + 16 a ldc + 16 b (row stride
// ldc floats). Tile 0 always; tile 1 (a second A tile) with kTwoA, tile 2 (a second B tile)
// with kTwoB, tile 3 with both. Loaded when add, else zeroed.
template <bool kTwoA, bool kTwoB>
void sums_start(const float* c, int64_t ldc, bool add) {
  const int64_t sc = ldc * 4;  // tile strides in bytes
  if (add) {
    _tile_loadd(0, c, sc);
    if constexpr (kTwoA) _tile_loadd(1, c + 16 * ldc, sc);
    if constexpr (kTwoB) _tile_loadd(2, c + 16, sc);
    if constexpr (kTwoA && kTwoB) _tile_loadd(3, c + 16 * ldc + 16, sc);
  } else {
    _tile_zero(0);
    if constexpr (kTwoA) _tile_zero(1);
    if constexpr (kTwoB) _tile_zero(2);
    if constexpr (kTwoA && kTwoB) _tile_zero(3);
  }
}

template <bool kTwoA, bool kTwoB>
void sums_store(float* c, int64_t ldc) {
  const int64_t sc = ldc * 4;  // tile strides in bytes
  _tile_stored(0, c, sc);
  if constexpr (kTwoA) _tile_stored(1, c + 16 * ldc, sc);
  if constexpr (kTwoB) _tile_stored(2, c + 16, sc);
  if constexpr (kTwoA && kTwoB) _tile_stored(3, c + 16 * ldc + 16, sc);
  memory_barrier();
}

// The float32 sums of rows [m0, m0 + 16 * (1 + kTwo)) of g by one panel's 32 columns (+)= g's
// rows (gr: row m0's first pair of the block, row stride ldg elements; the A tiles) times the
// panel's `pairs` input pairs (a multiple of 16; the B tiles). The sums live in c (row stride ldc
// floats): read first when add, else started from zero; written back at the end.
template <bool kTwo>
void block(const uint16_t* gr, int64_t ldg, const uint16_t* panel, int64_t pairs, float* c, int64_t ldc, bool add) {
  const int64_t sg = ldg * 2, sp = kPanelRows * 4;
  sums_start<kTwo, true>(c, ldc, add);
  memory_barrier();
  for (int64_t p = 0; p < pairs; p += 16) {
    const uint16_t* b = panel + p * 2 * kPanelRows;
    _tile_loadd(6, b, sp);
    _tile_loadd(7, b + 32, sp);
    _tile_loadd(4, gr + 2 * p, sg);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(2, 4, 7);
    if constexpr (kTwo) {
      _tile_loadd(5, gr + 16 * ldg + 2 * p, sg);
      _tile_dpbf16ps(1, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  sums_store<kTwo, true>(c, ldc);
}

// Where a product's rows go: y [M, ldy] float32, or bfloat16 (each whole sum rounded once, as
// float_to_bf16), plus the LoRA side path (null: none).
struct Output {
  void* y;
  int dtype;
  int64_t ldy;
  const LoraSide* lora;
};

// y's rows [m0, m1) at columns [c, c + 32) (lanes per mask0 / mask1) = the float32 sums s (row
// stride lds, row m0 first) plus the side path's r products, stored once.
void store_rows(const float* s, int64_t lds, int64_t m0, int64_t m1, int64_t c, __mmask16 mask0, __mmask16 mask1,
                const Output& out) {
  const LoraSide* lora = out.lora;
  for (int64_t m = m0; m < m1; ++m) {
    __m512 a0 = _mm512_maskz_loadu_ps(mask0, s + (m - m0) * lds);
    __m512 a1 = _mm512_maskz_loadu_ps(mask1, s + (m - m0) * lds + 16);
    if (lora != nullptr) {
      const float* t = lora->t + m * lora->r;
      const float* bt = lora->bt + c;
      for (int64_t j = 0; j < lora->r; ++j) {
        const __m512 tv = _mm512_set1_ps(t[j]);
        a0 = _mm512_fmadd_ps(tv, _mm512_maskz_loadu_ps(mask0, bt + j * lora->ldbt), a0);
        a1 = _mm512_fmadd_ps(tv, _mm512_maskz_loadu_ps(mask1, bt + j * lora->ldbt + 16), a1);
      }
    }
    if (out.dtype == kFloat32) {
      float* ym = static_cast<float*>(out.y) + m * out.ldy + c;
      _mm512_mask_storeu_ps(ym, mask0, a0);
      _mm512_mask_storeu_ps(ym + 16, mask1, a1);
    } else {
      uint16_t* ym = static_cast<uint16_t*>(out.y) + m * out.ldy + c;
      _mm256_mask_storeu_epi16(ym, mask0, to_bf16(a0));
      _mm256_mask_storeu_epi16(ym + 16, mask1, to_bf16(a1));
    }
  }
}

// For gx = g @ W on a whole 128-column chunk [c, c + 128) of W (blocksize >= 32, either layout):
// rows [n0, n0 + nc) of W (nc even) decoded a chunk per row by ChunkDecoder and interleaved in
// pairs of rows, so that panel j holds step j: panel_j[(n - n0) / 2][w][2] = W[n][c + 4 w +
// kStepOrder[j]], W[n + 1][...] for w < 32. The 4 panels' columns are the chunk's in step order;
// store_chunk_rows puts them back in order.
void decode_chunk_t(const PanelSource& w, const ChunkDecoder& chunks, int64_t n0, int64_t nc, int64_t c,
                    uint16_t* panels) {
  alignas(64) uint16_t lo_idx[32], hi_idx[32];
  for (int j = 0; j < 32; ++j) {  // word j: word j / 2 (+ 16) of row n (j even) or of row n + 1
    lo_idx[j] = static_cast<uint16_t>((j / 2) + (j % 2) * 32);
    hi_idx[j] = static_cast<uint16_t>(16 + (j / 2) + (j % 2) * 32);
  }
  const __m512i lo = _mm512_load_si512(lo_idx), hi = _mm512_load_si512(hi_idx);
  const int64_t per_row = w.blocks_per_row();
  for (int64_t n = n0; n < n0 + nc; n += 2) {
    __m512i a[4], b[4];
    chunks.decode_row(w, n, w.scales + n * per_row, c, a);
    chunks.decode_row(w, n + 1, w.scales + (n + 1) * per_row, c, b);
    for (int j = 0; j < 4; ++j) {
      uint16_t* dst = panels + j * kPanelWords + ((n - n0) / 2) * (2 * kPanelRows);
      _mm512_storeu_si512(dst, _mm512_permutex2var_epi16(a[j], lo, b[j]));
      _mm512_storeu_si512(dst + 32, _mm512_permutex2var_epi16(a[j], hi, b[j]));
    }
  }
}

// gx's rows [0, M) at columns [c, c + 128) from the float32 sums of a chunked group (row stride
// kGroupCols, panel j's 32 columns at 32 j: step j's columns c + 4 w + kStepOrder[j]), each
// stored once: output lanes [16 q, 16 q + 16) gather from the two halves of the panels at half
// q / 4 (two two-source permutes and a blend).
void store_chunk_rows(const float* sums, int64_t M, int64_t c, const Output& out) {
  __m512i idx[4];  // lane t of output vector q: lane 4 (q % 4) + t / 4 of the step kStepOrder[t % 4]
  __mmask16 from_23 = 0;
  for (int q = 0; q < 4; ++q) {
    alignas(64) int32_t v[16];
    for (int t = 0; t < 16; ++t) {
      const int j = kStepOrder[t % 4];
      v[t] = (j & 1) * 16 + 4 * q + t / 4;
      if (q == 0 && j >= 2) from_23 = static_cast<__mmask16>(from_23 | (1u << t));
    }
    idx[q] = _mm512_load_si512(v);
  }
  for (int64_t m = 0; m < M; ++m) {
    const float* row = sums + m * kGroupCols;
    for (int q = 0; q < 8; ++q) {
      const int half = (q / 4) * 16;
      const __m512 p01 = _mm512_permutex2var_ps(_mm512_loadu_ps(row + half), idx[q % 4],
                                                _mm512_loadu_ps(row + kPanelRows + half));
      const __m512 p23 = _mm512_permutex2var_ps(_mm512_loadu_ps(row + 2 * kPanelRows + half), idx[q % 4],
                                                _mm512_loadu_ps(row + 3 * kPanelRows + half));
      const __m512 v = _mm512_mask_blend_ps(from_23, p01, p23);
      if (out.dtype == kFloat32) {
        _mm512_storeu_ps(static_cast<float*>(out.y) + m * out.ldy + c + 16 * q, v);
      } else {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(out.y) + m * out.ldy + c + 16 * q),
                            to_bf16(v));
      }
    }
  }
}

// One input block of a group: for each of `count` decoded panels (columns c0 + 32 p of y, cols
// columns in all), every 32-row block of the packed rows xp (M rows, row stride ldx, the block's
// first input at pair0 * 2) into the group's float32 sums (first: started from zero); on the last
// block the sums go to y. Panel-major: a panel (32 KiB) stays in L1 across the rows.
// chunked: the group's 4 panels hold the 4 steps of one 128-column chunk (decode_chunk_t), and the
// last block's sums go to y through store_chunk_rows.
void group_block(const uint16_t* xp, int64_t M, int64_t ldx, const uint16_t* panels, int64_t count, int64_t pairs,
                 int64_t pair0, float* sums, bool first, bool last, int64_t c0, int64_t cols, const Output& out,
                 bool chunked) {
  const int64_t Mp = round_up(M, kAmxRows);
  for (int64_t p = 0; p < count; ++p) {
    const uint16_t* panel = panels + p * kPanelWords;
    const int64_t left = cols - p * kPanelRows;
    const __mmask16 mask0 = lanes_below(left), mask1 = lanes_below(std::max<int64_t>(0, left - 16));
    for (int64_t m0 = 0; m0 < Mp; m0 += 2 * kAmxRows) {
      const uint16_t* xr = xp + m0 * ldx + 2 * pair0;
      float* c = sums + m0 * kGroupCols + p * kPanelRows;
      if (Mp - m0 >= 2 * kAmxRows) {
        block<true>(xr, ldx, panel, pairs, c, kGroupCols, !first);
      } else {
        block<false>(xr, ldx, panel, pairs, c, kGroupCols, !first);
      }
      if (last && !chunked) {
        store_rows(c, kGroupCols, m0, std::min(M, m0 + 2 * kAmxRows), c0 + p * kPanelRows, mask0, mask1, out);
      }
    }
  }
  if (last && chunked) store_chunk_rows(sums, M, c0, out);
}

// A task's buffers: the group's decoded panels and float32 sums (rows padded to whole tiles).
struct Scratch {
  std::unique_ptr<uint16_t[]> panels;
  std::vector<float> sums;

  explicit Scratch(int64_t M)
      : panels(new uint16_t[static_cast<size_t>(kGroupPanels * kPanelWords)]),
        sums(static_cast<size_t>(round_up(M, kAmxRows) * kGroupCols)) {}
};

// The forward's accumulators (sums_start<true, kTwo>: y^T's rows are W's, two 16-row A tiles;
// its columns x's rows, one or two 16-row B tiles) (+)= the panel's A tiles (`steps` of 32
// inputs, decode_rows' layout) times x^T's B tiles (xt: the first pair of the block in row tile
// m; the next row tile tile_step words on).
// step_add: step s alone.
template <bool kTwo>
inline void step_add(const uint16_t* panel, int64_t steps, const int32_t* xt, int64_t tile_step, int64_t s) {
  constexpr int64_t kTileWords = 16 * kAmxK;  // bfloat16 words of one tile
  _tile_loadd(4, panel + s * kTileWords, 64);
  _tile_loadd(5, panel + (steps + s) * kTileWords, 64);
  _tile_loadd(6, xt + s * kTileWords / 2, 64);
  _tile_dpbf16ps(0, 4, 6);
  _tile_dpbf16ps(1, 5, 6);
  if constexpr (kTwo) {
    _tile_loadd(7, xt + tile_step + s * kTileWords / 2, 64);
    _tile_dpbf16ps(2, 4, 7);
    _tile_dpbf16ps(3, 5, 7);
  }
}

template <bool kTwo>
void sums_add(const uint16_t* panel, int64_t steps, const int32_t* xt, int64_t tile_step) {
  memory_barrier();
  for (int64_t s = 0; s < steps; ++s) step_add<kTwo>(panel, steps, xt, tile_step, s);
}

// y's rows [m, min(m + 16, M)) at columns [c, c + 16) (lanes per mask) = the 16 x 16 block of
// y^T's float32 sums at s (row stride lds) transposed, plus the side path's r products; stored once.
void store_transposed(const float* s, int64_t lds, int64_t m, int64_t M, int64_t c, __mmask16 mask,
                      const Output& out) {
  __m512i r[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(s + i * lds);
  transpose16(r);  // r[j]: row m + j of y, 16 columns
  const LoraSide* lora = out.lora;
  const int64_t rows = std::min<int64_t>(16, M - m);
  for (int64_t j = 0; j < rows; ++j) {
    __m512 v = _mm512_castsi512_ps(r[j]);
    if (lora != nullptr) {
      const float* t = lora->t + (m + j) * lora->r;
      for (int64_t q = 0; q < lora->r; ++q) {
        v = _mm512_fmadd_ps(_mm512_set1_ps(t[q]), _mm512_maskz_loadu_ps(mask, lora->bt + q * lora->ldbt + c), v);
      }
    }
    if (out.dtype == kFloat32) {
      _mm512_mask_storeu_ps(static_cast<float*>(out.y) + (m + j) * out.ldy + c, mask, v);
    } else {
      _mm256_mask_storeu_epi16(static_cast<uint16_t*>(out.y) + (m + j) * out.ldy + c, mask, to_bf16(v));
    }
  }
}

// Chunks of codes prefetched ahead of the decode in the streaming loop below: far enough that a
// row's next lines arrive before their turn, near enough to stay in L2 (measured on a Xeon with
// AMX: 8 chunks, into L2, beat 1-4 and 16-32 and hints into L1).
constexpr int64_t kPrefetchChunks = 8;

// The accumulators (+)= rows [col, col + 32) of a 4-bit weight (blocksize >= 32; zeros from
// n_end on) over all of K times x^T's first one or two (two) row tiles, the weight decoded a
// chunk at a time (128 inputs dense, a whole 256-input chunk of the 2:4 layout) into one of two
// small buffers (8 or 16 KiB: a decode need not wait for the tile loads of the one before) just
// before its products, so decode and TDPBF16PS overlap. Each row's codes (and positions) are
// prefetched kPrefetchChunks 128-input chunks ahead, the stream running on into the same row of
// the next panel (col + 32, below rows_end).
void stream_panel(const PanelSource& w, const ChunkDecoder& chunks, const ByteChunks& bytes, int64_t col,
                  int64_t n_end, int64_t rows_end, uint16_t* bufs, const int32_t* xt, bool two, int64_t tile_step) {
  const int64_t K = w.K, whole = K / 128 * 128;
  const bool sparse = w.positions != nullptr, eight = bytes.planes != nullptr;
  // input index -> code byte (the 2:4 layout stores half the inputs; 8-bit codes are a byte each)
  const int code_shift = sparse ? 2 : eight ? 0 : 1;
  const int64_t rows = std::min<int64_t>(kPanelRows, n_end - col);
  const int64_t rows_next = std::clamp<int64_t>(rows_end - col - kPanelRows, 0, kPanelRows);
  const uint8_t* codes[kPanelRows];
  const uint8_t* positions[kPanelRows];
  const float* rs[kPanelRows];
  for (int64_t i = 0; i < rows; ++i) {
    codes[i] = w.packed + (((col + i) * K) >> code_shift);
    positions[i] = sparse ? w.positions + (((col + i) * K) >> 3) : nullptr;
    rs[i] = w.scales + (col + i - w.first_row) * w.blocks_per_row();
  }
  const auto run = [&](auto log2, auto halves) {
    constexpr int kLog2 = decltype(log2)::value, kHalves = decltype(halves)::value;
    constexpr int64_t kWidth = 128 * kHalves;
    for (int64_t k = 0, it = 0; k < K; k += kWidth, ++it) {
      uint16_t* panel = bufs + (it & 1) * kPanelRows * kWidth;
      const int64_t kc = std::min<int64_t>(kWidth, K - k), steps = kc / kAmxK;
      // The prefetch target: this row ahead, or the next panel's row past the end of this one.
      const int64_t ahead = k + kPrefetchChunks * 128;
      const int64_t pf_rows = ahead < K ? rows : rows_next;
      const int64_t pf_in = ahead < K ? ahead : kPanelRows * K + ahead - K;  // inputs past the row's first
      const bool pf_positions = sparse && (ahead & 511) == 0;  // a 64-byte line of positions: 512 inputs
      for (int64_t i = 0; i < kPanelRows; ++i) {
        uint16_t* row = panel + ((i / 16) * steps * 16 + i % 16) * kAmxK;
        if (i < pf_rows) {
          _mm_prefetch(reinterpret_cast<const char*>(codes[i] + (pf_in >> code_shift)), _MM_HINT_T1);
          if (pf_positions) _mm_prefetch(reinterpret_cast<const char*>(positions[i] + (pf_in >> 3)), _MM_HINT_T1);
        }
        __m512i st[4 * kHalves];
        if (i >= rows) {
          for (int j = 0; j < 4 * kHalves; ++j) st[j] = _mm512_setzero_si512();
        } else if (sparse) {
          chunks.decode24<kLog2, kHalves>(codes[i], positions[i], rs[i], k, st);
        } else if (eight) {
          if (k < whole) bytes.chunk(codes[i], rs[i], k, st);
          else for (int64_t j = 0; j < steps; ++j) st[j] = bytes.segment(codes[i], rs[i], k + j * kAmxK);
        } else if (k < whole) {
          chunks.decode<kLog2>(codes[i], rs[i], k, st);
        } else {  // the tail past the last whole chunk, in input order
          for (int64_t j = 0; j < steps; ++j) st[j] = w.segment(col + i, k + j * kAmxK);
        }
        for (int64_t j = 0; j < steps; ++j) _mm512_storeu_si512(row + j * 16 * kAmxK, st[j]);
      }
      const int32_t* x = xt + (k / 2) * kAmxRows;
      two ? sums_add<true>(panel, steps, x, tile_step) : sums_add<false>(panel, steps, x, tile_step);
    }
  };
  const auto with_halves = [&](auto log2) { sparse ? run(log2, IntC<2>{}) : run(log2, IntC<1>{}); };
  if (eight) {
    run(IntC<7>{}, IntC<1>{});  // (ByteChunks takes any block size at run time)
  } else if (chunks.log2_blocksize >= 7) {
    with_halves(IntC<7>{});
  } else if (chunks.log2_blocksize == 6) {
    with_halves(IntC<6>{});
  } else {
    with_halves(IntC<5>{});
  }
}

// The finished sums of one panel (c: y^T's rows [col, col + 32) by columns [m0, m0 + 16 (1 +
// two)), row stride ldc) into y's rows and columns [col, min(col + 32, col_end)).
void store_panel(const float* c, int64_t ldc, int64_t m0, bool two, int64_t M, int64_t col, int64_t col_end,
                 const Output& out) {
  for (int64_t i = 0; i < 2 && col + 16 * i < col_end; ++i) {
    for (int64_t j = 0; j < (two ? 2 : 1); ++j) {
      store_transposed(c + 16 * i * ldc + 16 * j, ldc, m0 + 16 * j, M, col + 16 * i, lanes_below(col_end - col - 16 * i),
                       out);
    }
  }
}

void bf16_forward(const int32_t* xp, int64_t M, int64_t K, int64_t N, const uint8_t* packed, const uint8_t* positions,
                  int64_t blocksize, const float* table, const ScalePlanes* code_planes, const BlockScales& scales,
                  const float* /*offsets: absmax only here (minmax false)*/, const ScalePlanes* planes,
                  const LoraSide* lora, int64_t n0, int64_t n1, void* y, int y_dtype) {
  PanelSource w(packed, positions, K, table, blocksize);
  const ChunkDecoder chunks{_mm512_loadu_ps(table), log2_of(blocksize)};
  const ByteChunks bytes(code_planes, blocksize);
  const ChunkOrder order;
  const int64_t per_row = w.blocks_per_row();
  const int64_t Mp = round_up(M, kAmxRows), pairs = K / 2, tile_step = pairs * kAmxRows;
  const Output out{y, y_dtype, N, lora};
  Scratch buf(M);
  float* sums = buf.sums.data();  // y^T's: [kGroupCols, Mp]
  std::vector<float> scale_buf;
  const Tiles tiles;
  for (int64_t g = n0; g < n1; g += kGroupCols) {
    const int64_t g_end = std::min(n1, g + kGroupCols);
    const int64_t count = (g_end - g + kPanelRows - 1) / kPanelRows;
    w.scales = group_scales(scales, planes, g * per_row, (g_end - g) * per_row, scale_buf);
    w.first_row = g;
    if (Mp <= 2 * kAmxRows) {
      // One block of rows: a panel's sums stay in the tiles over all of K.
      const bool two = Mp > kAmxRows;
      for (int64_t p = 0; p < count; ++p) {
        const int64_t col = g + p * kPanelRows;
        two ? sums_start<true, true>(sums, Mp, false) : sums_start<true, false>(sums, Mp, false);
        if (chunks.log2_blocksize >= 5 || code_planes != nullptr) {
          stream_panel(w, chunks, bytes, col, g_end, n1, buf.panels.get(), xp, two, tile_step);
        } else {
          for (int64_t k0 = 0; k0 < K; k0 += kPanelK) {
            const int64_t kc = std::min(kPanelK, K - k0);
            decode_rows(w, chunks, bytes, order, col, g_end, k0, kc, buf.panels.get());
            const int32_t* xt = xp + (k0 / 2) * kAmxRows;
            two ? sums_add<true>(buf.panels.get(), kc / kAmxK, xt, tile_step)
                : sums_add<false>(buf.panels.get(), kc / kAmxK, xt, tile_step);
          }
        }
        two ? sums_store<true, true>(sums, Mp) : sums_store<true, false>(sums, Mp);
        store_panel(sums, Mp, 0, two, M, col, g_end, out);
      }
      continue;
    }
    // Past 32 rows: the group's panels one (512-input block, panel) item at a time, k-block
    // major. An item's 32 rows of W are decoded (into one of two buffers) while the previous
    // item's tiles run, a few rows after each of its tile steps: the AVX-512 decode and the AMX
    // unit overlap instead of taking turns. The two panels (32 KiB each) stay in L1 or L2 across
    // the rows of x.
    const int64_t kblocks = (K + kPanelK - 1) / kPanelK, items = kblocks * count;
    const int64_t m_blocks = (Mp + 2 * kAmxRows - 1) / (2 * kAmxRows);
    const auto item_k0 = [&](int64_t t) { return (t / count) * kPanelK; };
    const auto decode_item_row = [&](int64_t t, int64_t i, uint16_t* panel) {
      const int64_t k0 = item_k0(t);
      decode_row(w, chunks, bytes, order, g + (t % count) * kPanelRows, g_end, k0, std::min(kPanelK, K - k0), i,
                 panel);
    };
    uint16_t* bufs[2] = {buf.panels.get(), buf.panels.get() + kPanelWords};
    for (int64_t i = 0; i < kPanelRows; ++i) decode_item_row(0, i, bufs[0]);
    for (int64_t t = 0; t < items; ++t) {
      const uint16_t* panel = bufs[t & 1];
      uint16_t* next = bufs[(t + 1) & 1];
      const int64_t k0 = item_k0(t), p = t % count;
      const int64_t kc = std::min(kPanelK, K - k0), steps = kc / kAmxK;  // K % 32 == 0: whole tiles
      const bool first = k0 == 0, last = k0 + kc == K, more = t + 1 < items;
      // Row r of the next item is decoded after tile step r * total / 32 of this one.
      const int64_t total = m_blocks * steps;
      int64_t done = 0, decoded = 0;
      const auto decode_due = [&]() {
        const int64_t due = more ? (done * kPanelRows + total - 1) / total : 0;
        for (; decoded < due; ++decoded) decode_item_row(t + 1, decoded, next);
      };
      memory_barrier();  // this item's decode is written before its tiles load it
      for (int64_t m0 = 0; m0 < Mp; m0 += 2 * kAmxRows) {
        const int32_t* xt = xp + ((m0 / kAmxRows) * pairs + k0 / 2) * kAmxRows;
        float* c = sums + p * kPanelRows * Mp + m0;
        const bool two = Mp - m0 >= 2 * kAmxRows;
        two ? sums_start<true, true>(c, Mp, !first) : sums_start<true, false>(c, Mp, !first);
        for (int64_t s = 0; s < steps; ++s, ++done) {
          two ? step_add<true>(panel, steps, xt, tile_step, s) : step_add<false>(panel, steps, xt, tile_step, s);
          decode_due();
        }
        two ? sums_store<true, true>(c, Mp) : sums_store<true, false>(c, Mp);
        if (last) store_panel(c, Mp, m0, two, M, g + p * kPanelRows, g_end, out);
      }
      if (more) {
        for (; decoded < kPanelRows; ++decoded) decode_item_row(t + 1, decoded, next);
      }
    }
  }
}

void bf16_transposed(const int32_t* gp, int64_t M, int64_t N, int64_t K, const uint8_t* packed,
                     const uint8_t* positions, int64_t blocksize, const float* table,
                     const ScalePlanes* /*code_planes: 4-bit only here (bytes_transposed false)*/,
                     const float* scales, const float* /*offsets: absmax only here (minmax false)*/, int64_t k0,
                     int64_t k1, void* gx, int gx_dtype) {
  PanelSource w(packed, positions, K, table, blocksize);
  w.scales = scales;
  const ChunkDecoder chunks{_mm512_loadu_ps(table), log2_of(blocksize)};
  const bool fast = chunks.log2_blocksize >= 5;
  const auto* g = reinterpret_cast<const uint16_t*>(gp);
  const int64_t ldg = round_up(N, kAmxK);  // pack_x's row stride
  const Output out{gx, gx_dtype, K, nullptr};
  Scratch buf(M);
  const Tiles tiles;
  for (int64_t c = k0; c < k1; c += kGroupCols) {
    const int64_t c_end = std::min(k1, c + kGroupCols);
    const int64_t count = (c_end - c) / kPanelRows;  // K % 32 == 0: whole panels
    for (int64_t n0 = 0; n0 < N; n0 += kPanelK) {
      const int64_t nc = std::min(kPanelK, N - n0);
      const int64_t pairs = round_up(nc, kAmxK) / 2;  // the tail's pairs past N: zeros, as g's padding
      const bool chunked = fast && c_end - c == kGroupCols;  // a whole 128-column chunk
      if (chunked) decode_chunk_t(w, chunks, n0, nc, c, buf.panels.get());
      for (int64_t p = 0; p < count; ++p) {
        uint16_t* panel = buf.panels.get() + p * kPanelWords;
        if (!chunked) decode_panel_t(w, n0, nc, c + p * kPanelRows, panel);
        std::memset(panel + nc * kPanelRows, 0, static_cast<size_t>((pairs * 2 - nc) * kPanelRows * 2));
      }
      group_block(g, M, ldg, buf.panels.get(), count, pairs, n0 / 2, buf.sums.data(), n0 == 0, n0 + nc == N, c,
                  c_end - c, out, chunked);
    }
  }
}

}  // namespace

const GemmKernels kGemmAmx = {
    .tile_rows = kAmxRows,
    .min_rows = 4,
    // The 2:4 chunks decode from stored values and positions: level with the 2:4 GEMV at 4 rows
    // of 11008 x 4096, ahead from 5 (bench/RESULTS.md).
    .min_rows_sparse24 = 5,
    // Past 256 rows the tiles' loads outweigh the decode saved: dense bfloat16 on dequantized
    // tiles (oneDNN's AMX GEMM in torch) measured faster at 512 rows, as fast at 256 for K <= 2048
    // and slower for 11008 x 4096 (bench/RESULTS.md).
    .max_rows = 256,
    // None for 2:4: its fallback (a dense copy of W, then torch) took 142 ms at 512 rows of
    // 11008 x 4096 where these tiles took 41-90 ms in the same minutes.
    .max_rows_sparse24 = 0,
    // 8-bit codes decode by byte-plane lookups, dearer than a 4-bit chunk's: the 8-bit GEMV won at
    // 4 rows of 11008 x 4096, these tiles from 8 (level there, 2x at 16; bench/RESULTS.md).
    .min_rows_bytes = 8,
    .pack_x = pack_x,
    .pack_g = pack_g,
    .bf16_forward = bf16_forward,
    .bf16_transposed = bf16_transposed,
};

}  // namespace qengine::cpu
#endif
