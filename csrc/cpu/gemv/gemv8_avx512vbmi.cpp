// The fused 8-bit GEMV (gemv8 of the AVX-512 rows) on CPUs with AVX-512 VBMI: each byte code
// looked up in its 256-entry float32 table with byte permutes on the table's four byte planes
// (byte_planes_vbmi.h), in registers, so no dense row is written and read back. Compiled with
// -mavx512vbmi only here; RowProduct calls it only where vbmi_scales_available().
#include "cpu/gemv/kernels.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#include <type_traits>

#include "cpu/common/byte_planes_vbmi.h"
#include "cpu/common/ladder.h"
#include "cpu/common/simd_avx512.h"

namespace qengine::cpu {
namespace {

// The two byte permutations that put a 128-code chunk into the lookup's order. lookup64 leaves
// the table value of code position 16l + 4k + e of its 64 codes in lane 4l + e of output k; the
// 8 outputs of a chunk (half h, output k) are its steps s = 4h + k, and lane j of step s must
// hold element 8j + kNibbleOrder[s] (matmul.cpp's x order, the same as the 4-bit kernels').
// Index bit 6 picks the chunk's second 64 bytes (vpermt2b).
struct ChunkOrder {
  __m512i half[2];
  ChunkOrder() {
    constexpr int kNibbleOrder[8] = {1, 0, 3, 2, 5, 4, 7, 6};
    for (int h = 0; h < 2; ++h) {
      alignas(64) uint8_t idx[64];
      for (int l = 0; l < 4; ++l) {
        for (int k = 0; k < 4; ++k) {
          for (int e = 0; e < 4; ++e) idx[16 * l + 4 * k + e] = static_cast<uint8_t>(8 * (4 * l + e) + kNibbleOrder[4 * h + k]);
        }
      }
      half[h] = _mm512_load_si512(idx);
    }
  }
};

// The table values of half h (64 codes) of chunk c of row o as 4 steps of 16 weights (steps
// 4h..4h+3 of x's nibble order), with the bytes `ahead` of the chunk prefetched at h = 0.
template <bool kLowHalfZero>
inline void half_weights(const uint8_t* chunk, int h, int64_t ahead, const PlaneRegs& planes, const ChunkOrder& order,
                         __m512 (&w)[4]) {
  if (h == 0) {
    _mm_prefetch(reinterpret_cast<const char*>(chunk + ahead), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(chunk + ahead + 64), _MM_HINT_T0);
  }
  const __m512i a = _mm512_loadu_si512(chunk), b = _mm512_loadu_si512(chunk + 64);
  __m512i v[4];
  planes.lookup64_unordered<kLowHalfZero>(_mm512_permutex2var_epi8(a, order.half[h], b), v);
  for (int k = 0; k < 4; ++k) w[k] = _mm512_castsi512_ps(v[k]);
}

// Adds the 8 steps of weights of chunk c of row o, times x, to acc[m] (one chain per row of x) or
// for at most 2 rows to acc[m] and acc2[m] (a chain per half: the FMA latency is not hidden by
// other rows there); `affine` maps each step of weights before the product.
template <int M, bool kLowHalfZero, class Affine>
inline void chunk_products(const uint8_t* codes, int64_t K, int64_t o, int64_t c, int64_t ahead, const PlaneRegs& planes,
                           const ChunkOrder& order, const float* xr, Affine affine, __m512 (&acc)[M],
                           __m512 (&acc2)[M]) {
  const uint8_t* chunk = codes + o * K + c * 128;
  const float* xc = xr + c * 128 * M;
  for (int h = 0; h < 2; ++h) {
    __m512 w[4];
    half_weights<kLowHalfZero>(chunk, h, ahead, planes, order, w);
    __m512(&a)[M] = (M <= 2 && h == 1) ? acc2 : acc;
    for (int k = 0; k < 4; ++k) {
      const __m512 wk = affine(w[k]);
      for (int m = 0; m < M; ++m) a[m] = _mm512_fmadd_ps(wk, _mm512_loadu_ps(xc + ((4 * h + k) * M + m) * 16), a[m]);
    }
  }
}

// Absmax weights: per chunk and row of x, the unscaled partial sums, scaled once per chunk by
// the shared loop (gemv_rows), as the 4-bit gemv4.
template <int M, bool kLowHalfZero>
void gemv8_absmax(const float* xr, int64_t K, const uint8_t* codes, int64_t blocksize, const PlaneRegs& planes,
                  const BlockScales& scales, int64_t o0, int64_t o1, int64_t c0, int64_t c1, float* y, int64_t ldy) {
  const ChunkOrder order;
  const TileGeometry g = tile_geometry(K, blocksize, c0, c1, 8);
  gemv_rows<M>(g, scales, o0, o1, c0, c1, y, ldy, [&](int64_t o, int64_t c, __m512 (&t)[M]) {
    __m512 t2[M];
    for (int m = 0; m < M; ++m) t[m] = t2[m] = _mm512_setzero_ps();
    chunk_products<M, kLowHalfZero>(codes, K, o, c, g.prefetch_ahead, planes, order, xr, [](__m512 w) { return w; }, t, t2);
    if (M <= 2) {
      for (int m = 0; m < M; ++m) t[m] = _mm512_add_ps(t[m], t2[m]);
    }
  });
}

// Minmax weights: each decoded as decode_value's fma(table[q], scale, offset) before the
// product, as the 4-bit gemv4_affine.
template <int M, bool kLowHalfZero>
void gemv8_minmax(const float* xr, int64_t K, const uint8_t* codes, int64_t blocksize, const PlaneRegs& planes,
                  const BlockScales& scales, const float* offsets, int64_t o0, int64_t o1, int64_t c0, int64_t c1,
                  float* y, int64_t ldy) {
  const ChunkOrder order;
  const TileGeometry g = tile_geometry(K, blocksize, c0, c1, 8);
  gemv_affine_rows<M>(g, scales, offsets, o0, o1, c0, c1, y, ldy,
                      [&](int64_t o, int64_t c, __m512 sv, __m512 ov, __m512 (&a0)[M], __m512 (&a1)[M]) {
    chunk_products<M, kLowHalfZero>(codes, K, o, c, g.prefetch_ahead, planes, order, xr,
                      [&](__m512 w) { return _mm512_fmadd_ps(w, sv, ov); }, a0, a1);
  });
}

}  // namespace

void gemv8_avx512vbmi(const float* xr, int64_t M, int64_t K, const uint8_t* codes, int64_t blocksize,
                      const ScalePlanes& table, const BlockScales& scales, const float* offsets, int64_t o0,
                      int64_t o1, int64_t c0, int64_t c1, float* y, int64_t ldy) {
  const PlaneRegs planes(table);
  const auto run = [&](auto low_half_zero) {
    with_rows<8>(M, [&](auto rows) {
      if (offsets == nullptr) {
        gemv8_absmax<rows, low_half_zero>(xr, K, codes, blocksize, planes, scales, o0, o1, c0, c1, y, ldy);
      } else {
        gemv8_minmax<rows, low_half_zero>(xr, K, codes, blocksize, planes, scales, offsets, o0, o1, c0, c1, y, ldy);
      }
    });
  };
  if (table.low_half_zero) run(std::true_type{});
  else run(std::false_type{});
}

}  // namespace qengine::cpu
#endif
