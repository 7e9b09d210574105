// AVX2 + FMA + F16C row of the quantize family: 8 lanes; a 16-entry lookup is two in-register
// permutes and a blend.
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#include "cpu/common/simd_avx2.h"
#include "cpu/quantize/kernels.h"
#include "cpu/quantize/quantize_loops.h"

namespace qengine::cpu {
namespace {

// The 4-bit decode's main loop (decode4 in quantize_loops.h): 8 bytes give 16 codes, looked up
// high and low nibble, interleaved back into order.
struct Nibbles {
  template <int OUT, int RULE>
  static int64_t run(const uint8_t* packed, int64_t first, int64_t i, int64_t len, const Codebook& cb, float scale,
                     float offset, void* out, bool stream) {
    const __m256 tlo = _mm256_loadu_ps(cb.table), thi = _mm256_loadu_ps(cb.table + 8);
    const __m256 sc = _mm256_set1_ps(scale), of = _mm256_set1_ps(offset);
    const __m256i nib = _mm256_set1_epi32(0x0f);
    for (; i + 16 <= len; i += 16) {
      __m256i b = load_codes8(packed + ((first + i) >> 1));
      __m256 vh = lookup16(_mm256_srli_epi32(b, 4), tlo, thi);
      __m256 vl = lookup16(_mm256_and_si256(b, nib), tlo, thi);
      __m256 a = _mm256_unpacklo_ps(vh, vl);  // h0 l0 h1 l1 | h4 l4 h5 l5
      __m256 c = _mm256_unpackhi_ps(vh, vl);  // h2 l2 h3 l3 | h6 l6 h7 l7
      store8<OUT, true>(out, i, apply_scale<F32x8, RULE>(_mm256_permute2f128_ps(a, c, 0x20), sc, of), stream);
      store8<OUT, true>(out, i + 8, apply_scale<F32x8, RULE>(_mm256_permute2f128_ps(a, c, 0x31), sc, of), stream);
    }
    return i;
  }
};

}  // namespace

const QuantizeKernels kQuantizeAvx2 = {
    .block_stats = block_stats<F32x8>,
    .encode = encode<F32x8>,
    .decode = decode<F32x8, Nibbles>,
};

}  // namespace qengine::cpu
#endif
