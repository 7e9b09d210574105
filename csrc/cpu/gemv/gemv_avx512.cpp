// AVX-512 rows of the gemv family: the fused 4-bit GEMV (the small-batch dequantize-matmul)
// and the dot / axpy tiles; the avx512_bf16 row adds gemv_avx512bf16.cpp's bfloat16 GEMV.
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#include "cpu/common/ladder.h"
#include "cpu/common/simd_avx512.h"
#include "cpu/gemv/kernels.h"

namespace qengine::cpu {
namespace {

// Fused 4-bit GEMV over x in the "nibble order" of matmul.cpp: one 64-byte load holds 128
// codes; as 16 dwords, vpermps reads the low 4 bits of each lane, so shifting the dwords by 4
// bits seven times walks all 8 nibbles of each lane: one table lookup per 16 weights and no
// unpacking. xr holds this group's M rows of x interleaved per chunk,
// xr[c*128*M + (j*M + m)*16 + i], so every load is a constant offset from one pointer.
// Per chunk and row of x, two chains of unscaled partial sums, scaled once per chunk.
template <int M>
void gemv4_rows(const float* xr, int64_t K, const uint8_t* packed, int64_t blocksize, const float* table,
                const BlockScales& scales, int64_t o0, int64_t o1, int64_t c0, int64_t c1, float* y, int64_t ldy) {
  const __m512 tbl = _mm512_loadu_ps(table);
  const TileGeometry g = tile_geometry(K, blocksize, c0, c1);
  gemv_rows<M>(g, scales, o0, o1, c0, c1, y, ldy, [&](int64_t o, int64_t c, __m512 (&t)[M]) {
    __m512i d = _mm512_loadu_si512(chunk_codes(packed, K, o, c, g.prefetch_ahead));
    const float* xc = xr + c * 128 * M;
    __m512 t0[M], t1[M];  // two chains per row of x
    __m512 w = lookup16(d, tbl);
    for (int m = 0; m < M; ++m) t0[m] = _mm512_mul_ps(w, _mm512_loadu_ps(xc + m * 16));
    d = _mm512_srli_epi32(d, 4);
    w = lookup16(d, tbl);
    for (int m = 0; m < M; ++m) t1[m] = _mm512_mul_ps(w, _mm512_loadu_ps(xc + (M + m) * 16));
    for (int j = 2; j < 8; j += 2) {
      d = _mm512_srli_epi32(d, 4);
      w = lookup16(d, tbl);
      for (int m = 0; m < M; ++m) t0[m] = _mm512_fmadd_ps(w, _mm512_loadu_ps(xc + (j * M + m) * 16), t0[m]);
      d = _mm512_srli_epi32(d, 4);
      w = lookup16(d, tbl);
      for (int m = 0; m < M; ++m) t1[m] = _mm512_fmadd_ps(w, _mm512_loadu_ps(xc + ((j + 1) * M + m) * 16), t1[m]);
    }
    for (int m = 0; m < M; ++m) t[m] = _mm512_add_ps(t0[m], t1[m]);
  });
}

void gemv4(const float* xr, int64_t M, int64_t K, const uint8_t* packed, int64_t blocksize, const float* table,
           const BlockScales& scales, int64_t o0, int64_t o1, int64_t c0, int64_t c1, float* y, int64_t ldy) {
  with_rows<8>(M, [&](auto rows) { gemv4_rows<rows>(xr, K, packed, blocksize, table, scales, o0, o1, c0, c1, y, ldy); });
}

// gemv4 for minmax weights: each decoded weight is fma(table[q], scale, offset), decode_value's
// one rounding, with the block's scale and offset spread over the lanes once per chunk, so W
// enters the product exactly as dequantize gives it and the sums need no per-chunk scaling. One
// FMA more per 16 weights than gemv4; two chains of sums per row of x across the chunks.
template <int M>
void gemv4_affine_rows(const float* xr, int64_t K, const uint8_t* packed, int64_t blocksize, const float* table,
                       const BlockScales& scales, const float* offsets, int64_t o0, int64_t o1, int64_t c0,
                       int64_t c1, float* y, int64_t ldy) {
  const __m512 tbl = _mm512_loadu_ps(table);
  const TileGeometry g = tile_geometry(K, blocksize, c0, c1);
  gemv_affine_rows<M>(g, scales, offsets, o0, o1, c0, c1, y, ldy,
                      [&](int64_t o, int64_t c, __m512 sv, __m512 ov, __m512 (&a0)[M], __m512 (&a1)[M]) {
    __m512i d = _mm512_loadu_si512(chunk_codes(packed, K, o, c, g.prefetch_ahead));
    const float* xc = xr + c * 128 * M;
    for (int j = 0; j < 8; j += 2) {
      if (j > 0) d = _mm512_srli_epi32(d, 4);
      __m512 w = _mm512_fmadd_ps(lookup16(d, tbl), sv, ov);
      for (int m = 0; m < M; ++m) a0[m] = _mm512_fmadd_ps(w, _mm512_loadu_ps(xc + (j * M + m) * 16), a0[m]);
      d = _mm512_srli_epi32(d, 4);
      w = _mm512_fmadd_ps(lookup16(d, tbl), sv, ov);
      for (int m = 0; m < M; ++m) a1[m] = _mm512_fmadd_ps(w, _mm512_loadu_ps(xc + ((j + 1) * M + m) * 16), a1[m]);
    }
  });
}

void gemv4_affine(const float* xr, int64_t M, int64_t K, const uint8_t* packed, int64_t blocksize, const float* table,
                  const BlockScales& scales, const float* offsets, int64_t o0, int64_t o1, int64_t c0, int64_t c1,
                  float* y, int64_t ldy) {
  with_rows<8>(M, [&](auto rows) {
    gemv4_affine_rows<rows>(xr, K, packed, blocksize, table, scales, offsets, o0, o1, c0, c1, y, ldy);
  });
}

void dot_rows(const float* x, int64_t M, int64_t K, int64_t ldx, const float* w, float* y, int64_t ldy) {
  const int64_t K16 = K & ~int64_t{15};
  const __mmask16 tail = static_cast<__mmask16>((1u << (K - K16)) - 1u);
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) {  // four rows share each weight load
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    const float* x0 = x + m * ldx;
    for (int64_t k = 0; k < K16; k += 16) {
      __m512 wv = _mm512_loadu_ps(w + k);
      a0 = _mm512_fmadd_ps(_mm512_loadu_ps(x0 + k), wv, a0);
      a1 = _mm512_fmadd_ps(_mm512_loadu_ps(x0 + ldx + k), wv, a1);
      a2 = _mm512_fmadd_ps(_mm512_loadu_ps(x0 + 2 * ldx + k), wv, a2);
      a3 = _mm512_fmadd_ps(_mm512_loadu_ps(x0 + 3 * ldx + k), wv, a3);
    }
    if (tail) {
      __m512 wv = _mm512_maskz_loadu_ps(tail, w + K16);
      a0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, x0 + K16), wv, a0);
      a1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, x0 + ldx + K16), wv, a1);
      a2 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, x0 + 2 * ldx + K16), wv, a2);
      a3 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, x0 + 3 * ldx + K16), wv, a3);
    }
    y[m * ldy] = _mm512_reduce_add_ps(a0);
    y[(m + 1) * ldy] = _mm512_reduce_add_ps(a1);
    y[(m + 2) * ldy] = _mm512_reduce_add_ps(a2);
    y[(m + 3) * ldy] = _mm512_reduce_add_ps(a3);
  }
  for (; m < M; ++m) {  // one row: four accumulators to cover the FMA latency
    const float* xm = x + m * ldx;
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 64 <= K16; k += 64) {
      a0 = _mm512_fmadd_ps(_mm512_loadu_ps(xm + k), _mm512_loadu_ps(w + k), a0);
      a1 = _mm512_fmadd_ps(_mm512_loadu_ps(xm + k + 16), _mm512_loadu_ps(w + k + 16), a1);
      a2 = _mm512_fmadd_ps(_mm512_loadu_ps(xm + k + 32), _mm512_loadu_ps(w + k + 32), a2);
      a3 = _mm512_fmadd_ps(_mm512_loadu_ps(xm + k + 48), _mm512_loadu_ps(w + k + 48), a3);
    }
    for (; k < K16; k += 16) a0 = _mm512_fmadd_ps(_mm512_loadu_ps(xm + k), _mm512_loadu_ps(w + k), a0);
    if (tail) a1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, xm + K16), _mm512_maskz_loadu_ps(tail, w + K16), a1);
    y[m * ldy] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
  }
}

void axpy_rows(const float* g, int64_t M, int64_t ldg, const float* w, int64_t K, float* acc, int64_t lda) {
  const int64_t K16 = K & ~int64_t{15};
  const __mmask16 tail = static_cast<__mmask16>((1u << (K - K16)) - 1u);
  for (int64_t m = 0; m < M; ++m) {
    const __m512 gv = _mm512_set1_ps(g[m * ldg]);
    float* am = acc + m * lda;
    for (int64_t k = 0; k < K16; k += 16) {
      _mm512_storeu_ps(am + k, _mm512_fmadd_ps(gv, _mm512_loadu_ps(w + k), _mm512_loadu_ps(am + k)));
    }
    if (tail) {
      __m512 r = _mm512_fmadd_ps(gv, _mm512_maskz_loadu_ps(tail, w + K16), _mm512_maskz_loadu_ps(tail, am + K16));
      _mm512_mask_storeu_ps(am + K16, tail, r);
    }
  }
}

}  // namespace

const GemvKernels kGemvAvx512 = {
    .dot_rows = dot_rows,
    .axpy_rows = axpy_rows,
    .gemv4 = gemv4,
    .gemv4_affine = gemv4_affine,
    .gemv8 = gemv8_avx512vbmi,
};

const GemvKernels kGemvAvx512Bf16 = {
    .dot_rows = dot_rows,
    .axpy_rows = axpy_rows,
    .gemv4 = gemv4,
    .gemv4_affine = gemv4_affine,
    .gemv4_bf16 = gemv4_bf16_avx512bf16,
    .gemv8 = gemv8_avx512vbmi,
};

}  // namespace qengine::cpu
#endif
