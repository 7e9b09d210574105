// AVX512-BF16 large-batch dequantize-matmul: the bf16_forward of the gemm family's avx512_bf16
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
#include "cpu/gemm/panels_avx512bf16.h"

namespace qengine::cpu {
namespace {

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

void bf16_forward(const int32_t* xp, int64_t M, int64_t K, int64_t N, const uint8_t* packed, const uint8_t* positions,
                  int64_t blocksize, const float* table, const ScalePlanes* code_planes,
                  const BlockScales& scales, const float* offsets, const ScalePlanes* planes, const LoraSide* lora,
                  int64_t n0, int64_t n1, void* y, int y_dtype) {
  PanelSource w(packed, positions, K, table, blocksize);
  w.offsets = offsets;
  const ChunkDecoder chunks{_mm512_loadu_ps(table), log2_of(blocksize)};
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
      for (int64_t p = 0; p < count; ++p) {
        uint16_t* panel = panels.get() + p * kPanelWords;
        if (code_planes != nullptr) {  // 8-bit codes (gemm_applies_on: on VBMI CPUs only)
          decode_panel_bytes(packed, K, *code_planes, blocksize, w.scales, offsets, g, g + p * kPanelRows, g_end, k0,
                             kc, panel);
        } else {
          decode_panel(w, chunks, g + p * kPanelRows, g_end, k0, kc, panel);
        }
      }
      const bool last = k0 + kc == K;
      tiles_over_panels(xp, M, K / 2, panels.get(), count, kc / 2, k0 / 2, out.block(M, g, g_end - g, k0 == 0, last),
                        g, g_end - g, last ? lora : nullptr);
    }
  }
}

void bf16_transposed(const int32_t* gp, int64_t M, int64_t N, int64_t K, const uint8_t* packed,
                     const uint8_t* positions, int64_t blocksize, const float* table, const ScalePlanes* code_planes,
                     const float* scales, const float* offsets, int64_t k0, int64_t k1, void* gx, int gx_dtype) {
  PanelSource w(packed, positions, K, table, blocksize);
  w.scales = scales;
  w.offsets = offsets;
  std::unique_ptr<uint16_t[]> panels(new uint16_t[static_cast<size_t>(kGroupPanels * kPanelWords)]);
  std::vector<float> scratch;
  const GroupOut out = group_out(gx, gx_dtype, K, scratch);
  for (int64_t g = k0; g < k1; g += kPanelRows * kGroupPanels) {
    const int64_t g_end = std::min(k1, g + kPanelRows * kGroupPanels);
    const int64_t count = (g_end - g) / kPanelRows;  // K % 32 == 0: whole panels
    for (int64_t n0 = 0; n0 < N; n0 += kPanelK) {
      const int64_t nc = std::min(kPanelK, N - n0);
      for (int64_t p = 0; p < count; ++p) {
        uint16_t* panel = panels.get() + p * kPanelWords;
        if (code_planes != nullptr) {  // 8-bit codes (bytes_transposed: on VBMI CPUs only)
          decode_panel_t_bytes(packed, K, *code_planes, blocksize, scales, offsets, n0, nc, g + p * kPanelRows, panel);
        } else {
          decode_panel_t(w, n0, nc, g + p * kPanelRows, panel);
        }
      }
      tiles_over_panels(gp, M, N / 2, panels.get(), count, nc / 2, n0 / 2,
                        out.block(M, g, g_end - g, n0 == 0, n0 + nc == N), g, g_end - g, nullptr);
    }
  }
}

// The vector kernels (GemmVectorKernels, kernels.h): the LoRA side path and the scale decode.

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
    // 8-bit codes past the small-batch GEMV's rows, as 4-bit ones (min_rows): on Zen 4 the
    // panels overtook the 8-bit GEMV at 12 rows of 11008 x 4096 (16 rows: 10.4 vs 12.4 ms), too
    // few to route 8-bit codes apart from 4-bit ones below 17.
    .min_rows_bytes = 17,
    .bytes_transposed = true,
    .minmax = true,
    .pack_x = pack_x,
    .bf16_forward = bf16_forward,
    .bf16_transposed = bf16_transposed,
};

const GemmVectorKernels kGemmVectorAvx512Bf16 = {
    .decode_scales = decode_scales,
    .lora_down = lora_down,
    .lora_reduce = lora_reduce,
    .lora_up_add = lora_up_add,
};

}  // namespace qengine::cpu
#endif
