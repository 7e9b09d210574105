// The AdamW update and the 8-bit optimizer-state code, written once for the CPU and CUDA
// kernels so that every backend and ISA produces the same bytes.
//
// The element update follows torch.optim.AdamW (foreach=False) operation by operation, in
// float32, with the fused multiply-adds where torch's vectorised CPU kernels have them (lerp,
// addcmul), so the 32-bit optimizer matches torch to float32 rounding:
//   p = p * (1 - lr * wd)
//   m = lerp(m, g, 1 - beta1)              (fma(w, g - m, m), or fma(w - 1, g - m, g) for w >= 0.5)
//   v = fma((1 - beta2) * g, g, v * beta2)
//   p = p + (-lr / (1 - beta1^t)) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
//
// 8-bit states (blockwise, 256 elements per block): m is stored as codes of a signed dynamic
// code scaled by the block's signed scale (its element of largest magnitude, with that
// element's sign: m_signed_scale), v as codes of an unsigned one scaled by max v (sorted
// 256-value tables, python/qengine/formats.py). The nearest code is found without a search: a
// byte table indexed by the float's sign, exponent and top 7 mantissa bits gives the candidate
// and the one midpoint that can separate it from the next code (python/qengine/ops/optim.py
// builds it and checks that). The CPU's SIMD kernels use equivalent forms without gathers: the
// codes' minifloat arithmetic (MinifloatForm below; AVX2) or byte-permute tables built from
// encode_state itself (csrc/cpu/optim/state_encoder.h; AVX-512 VBMI).
#pragma once
#include <cstdint>

#include "qengine/dtype.h"

namespace qengine {

// Elements per 8-bit state block (one absmax per state and block).
constexpr int64_t kOptimBlock = 256;

// Per-parameter constants of one step, float32 values rounded from Python's double
// arithmetic exactly where torch rounds its Python scalars. All floats, so a float32 tensor
// [k, 9] built in Python has this layout.
struct AdamHyper {
  float decay;       // 1 - lr * weight_decay
  float w1;          // lerp weight 1 - beta1
  float lerp_small;  // 1 when |w1| < 0.5 (torch's lerp switches form there), else 0
  float beta2;
  float w2;          // 1 - beta2
  float bc2_sqrt;    // sqrt(1 - beta2^step)
  float eps;
  float neg_step;    // -lr / (1 - beta1^step)
  float maximize;    // 1: ascend (the gradient is negated)
};

// One contiguous span of one parameter and its states; a parameter split over several
// state pages gives several tasks. All int64, so an int64 tensor [ntasks, 10] built in Python
// has this layout. Addresses are of the span's first element (8-bit: the first element of a
// 256-block, so absmax1/absmax2 point at that block's scale).
struct OptimTask {
  int64_t param;    // float32/float16/bfloat16 [n], updated in place
  int64_t grad;     // same dtype as param [n]
  int64_t state1;   // float32 m [n], or uint8 codes [n]
  int64_t state2;   // float32 v [n], or uint8 codes [n]
  int64_t absmax1;  // 8-bit: float32 [ceil(n / 256)]; else 0
  int64_t absmax2;
  int64_t n;
  int64_t dtype;    // DType of param and grad
  int64_t hyper;    // row of the AdamHyper table
  int64_t reserved;
};

// The arithmetic form of a state code whose values are a two-piece minifloat without subnormals
// (python/qengine/formats.py, STATE8_*_FORM). The code of s * k (s = +-1, magnitude k >= 0) is
// zero_code + s * k; k = k_top = 255 - zero_code is 1.0, the top_binades binades below it hold
// 2^top_mantissa_bits magnitudes each, the ones below those 2^mantissa_bits each, and k = 0 is
// 0.0. Within a piece the float bits of consecutive magnitudes are evenly spaced:
//   bits(k) = (k + offset) << (23 - piece's mantissa bits)
// so the nearest magnitude of a float is its bits rounded at that bit, minus the offset: shifts
// instead of table lookups. mantissa_bits == 0: the code has no such form. cpu/optim/state_minifloat.cpp
// checks a form against the code's table and search before any kernel may use it.
struct MinifloatForm {
  int top_mantissa_bits = 0;
  int top_binades = 0;
  int mantissa_bits = 0;
  int zero_code = 0;  // -1 where the code has no zero (then no negatives either)
};

// One 8-bit state code: decode table and the table of the nearest-code search.
//
// Search: floats whose bits share the top 16 (sign, exponent, 7 mantissa bits) form a bucket;
// lut[bucket] = (first << 16) | t, where `first` is the number of midpoints below the bucket
// and t the low 16 bits of the one midpoint inside it (python/qengine/ops/optim.py checks
// that no bucket holds two). Inside a bucket the low 16 bits order the magnitudes, so
// x > midpoint is (low16(x) > t) for positive x and (low16(x) < t) for negative x; a bucket
// without a midpoint stores t = 0xffff (positive) or 0 (negative), which never passes.
// Magnitudes below 2^(lut_base / 128 - 127) and from 1.0 up are clamped into the end buckets,
// which the builder also checks hold no midpoint.
struct StateCode {
  const float* table;   // 256 values, sorted ascending (code = sorted index)
  const uint32_t* lut;  // 2 * (lut_kmax + 1) entries: negatives (largest magnitude first), then positives
  int lut_base;         // (|x| bits >> 16) of the lowest bucket
  int lut_kmax;         // buckets per sign - 1
  // CPU only, may be null: a cpu::StateEncoder (csrc/cpu/optim/state_encoder.h) built from this code,
  // the gather-free form of the same search for AVX-512 VBMI CPUs.
  const void* cpu_encoder = nullptr;
  // CPU only: the arithmetic form of the code (mantissa_bits 0: none), checked against table and lut.
  MinifloatForm minifloat{};
};

QE_HD float qe_fma(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#else
  return __builtin_fmaf(a, b, c);
#endif
}

QE_HD float qe_sqrt(float x) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(x);
#else
  return __builtin_sqrtf(x);
#endif
}

// One element of the AdamW step; m and v are the float32 states before and after.
QE_HD void adamw_element(float g, float& p, float& m, float& v, const AdamHyper& h) {
  if (h.maximize != 0.0f) g = -g;
  p = p * h.decay;
  const float d = g - m;
  m = h.lerp_small != 0.0f ? qe_fma(h.w1, d, m) : qe_fma(h.w1 - 1.0f, d, g);
  v = qe_fma(h.w2 * g, g, v * h.beta2);
  const float denom = qe_sqrt(v) / h.bc2_sqrt + h.eps;
  p = p + (h.neg_step * m) / denom;
}

// Nearest code (ties to the lower one): the number of midpoints strictly below x.
QE_HD uint8_t encode_state(float x, const StateCode& c) {
  const uint32_t u = float_bits(x);
  int k = static_cast<int>((u & 0x7fffffffu) >> 16) - c.lut_base;
  k = k < 0 ? 0 : (k > c.lut_kmax ? c.lut_kmax : k);
  const bool neg = (u >> 31) != 0;
  const uint32_t e = c.lut[neg ? c.lut_kmax - k : c.lut_kmax + 1 + k];
  const uint32_t low = u & 0xffffu, t = e & 0xffffu;
  return static_cast<uint8_t>((e >> 16) + ((neg ? low < t : low > t) ? 1u : 0u));
}

// Reciprocal used to normalise a block by its scale (an all-zero block keeps zeros). The scale
// may be negative (m_signed_scale): its magnitude is clamped the same way, its sign kept, so
// 1 / -s is exactly -(1 / s). A NaN scale gives 1e38, as it always has.
QE_HD float state_inv_scale(float scale) {
  return 1.0f / (scale < 0.0f ? (scale < -1e-38f ? scale : -1e-38f) : (scale > 1e-38f ? scale : 1e-38f));
}

// NaN-propagating running max of |x| (a NaN state poisons its block, as torch's state would).
QE_HD float absmax_step(float acc, float x) {
  if (x != x || acc != acc) return bits_float(0x7fc00000u);  // one canonical NaN on every ISA
  const float a = x < 0.0f ? -x : x;
  return a > acc ? a : acc;
}

// Running max of the positive elements (start at 0.0f; NaN and negatives never win). With the
// block's absmax it gives m_signed_scale. SIMD kernels take the same max as int32 bits starting
// at 0 (a negative float's bits are negative ints), which orders positive floats the same way.
QE_HD float posmax_step(float acc, float x) { return x > acc ? x : acc; }

// The scale of m's block: its element of largest magnitude with that element's sign, so that
// element is stored as exactly code 1.0. The signed code has 128 positive magnitudes (1.0
// included) and 127 negative ones; with a plain absmax a block led by a negative m stored it
// at -(1 - 1/64) every step, a systematic shrink of its dominant momentum. Tie (+a and -a
// both present): positive. absmax NaN: that NaN. absmax 0 (all zeros): +0.
QE_HD float m_signed_scale(float absmax, float posmax) {
  if (absmax != absmax) return absmax;
  return posmax < absmax ? -absmax : absmax;
}

}  // namespace qengine
