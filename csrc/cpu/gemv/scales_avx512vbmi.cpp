// AVX-512 VBMI decode of double-quantized block scales (decode_nested_scales_vbmi in
// kernels.h); called only where vbmi_scales_available().
#include "cpu/gemv/kernels.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#include "cpu/common/byte_planes_vbmi.h"
#endif

namespace qengine::cpu {

#if defined(__x86_64__) || defined(_M_X64)
void decode_nested_scales_vbmi(const BlockScales& s, const ScalePlanes& planes, int64_t b_lo, int64_t count,
                               float* out) {
  const PlaneRegs regs(planes);
  const __m512i order = unpack_order();
  const __m512 mean = _mm512_set1_ps(s.mean);
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m128i shift = _mm_cvtsi32_si128(s.nested_shift);
  int64_t i = 0;
  // Whole groups of 64 blocks inside one nested block (almost all of them): one broadcast
  // absmax, unmasked stores.
  for (; i + 64 <= count; i += 64) {
    const int64_t first = b_lo + i;
    if ((first >> s.nested_shift) != ((first + 63) >> s.nested_shift)) break;
    __m512i values[4];
    regs.lookup64(_mm512_loadu_si512(s.codes + first), order, values);
    const __m512 av = _mm512_set1_ps(s.absmax[first >> s.nested_shift]);
    for (int k = 0; k < 4; ++k) {
      _mm512_storeu_ps(out + i + 16 * k, _mm512_add_ps(_mm512_mul_ps(_mm512_castsi512_ps(values[k]), av), mean));
    }
  }
  for (; i < count; i += 64) {
    const int64_t n = count - i < 64 ? count - i : 64;
    const __mmask64 live = n == 64 ? ~__mmask64{0} : (__mmask64{1} << n) - 1;
    __m512i values[4];
    regs.lookup64(_mm512_maskz_loadu_epi8(live, s.codes + b_lo + i), order, values);
    for (int k = 0; k * 16 < n; ++k) {
      const int64_t first = b_lo + i + 16 * k, m = n - 16 * k < 16 ? n - 16 * k : 16;
      const __mmask16 lanes = m == 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << m) - 1u);
      // The 16 blocks almost always share one nested block: broadcast its absmax then.
      __m512 av;
      if ((first >> s.nested_shift) == ((first + m - 1) >> s.nested_shift)) {
        av = _mm512_set1_ps(s.absmax[first >> s.nested_shift]);
      } else {
        const __m512i nested = _mm512_srl_epi32(_mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(first)), iota), shift);
        av = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), lanes, nested, s.absmax, 4);
      }
      const __m512 v = _mm512_add_ps(_mm512_mul_ps(_mm512_castsi512_ps(values[k]), av), mean);
      _mm512_mask_storeu_ps(out + i + 16 * k, lanes, v);
    }
  }
}

#else
void decode_nested_scales_vbmi(const BlockScales&, const ScalePlanes&, int64_t, int64_t, float*) {}
#endif

}  // namespace qengine::cpu
