// The fused AdamW step on the CPU: argument checks, the thread split over all spans at once,
// the scalar row and the choice of the active one (QENGINE_CPU_ISA / set_isa apply),
// and the portable scalar spans every SIMD variant must match byte for byte.
#include <algorithm>
#include <vector>

#include "cpu/common/thread_pool.h"
#include "cpu/optim/kernels.h"
#include "qengine/optim.h"
#include "qengine/status.h"

namespace qengine::cpu {

void scalar_adamw32(const OptimTask& t, int64_t lo, int64_t hi, const AdamHyper& h) {
  const TaskArrays a(t);
  for (int64_t i = lo; i < hi; ++i) {
    float pi = load_as_float(a.p, a.dt, i), mi = a.m[i], vi = a.v[i];
    adamw_element(load_as_float(a.g, a.dt, i), pi, mi, vi, h);
    store_from_float(a.p, a.dt, i, pi);
    a.m[i] = mi;
    a.v[i] = vi;
  }
}

void scalar_adamw8(const OptimTask& t, int64_t lo, int64_t hi, const AdamHyper& h, const StateCode& c1,
                   const StateCode& c2) {
  const TaskArrays a(t);
  float mt[kOptimBlock], vt[kOptimBlock];  // the block's updated states, before requantizing
  for (int64_t b0 = lo; b0 < hi; b0 += kOptimBlock) {
    const int64_t len = std::min(kOptimBlock, hi - b0);
    const int64_t b = b0 / kOptimBlock;
    const float s1 = a.a1[b], s2 = a.a2[b];
    float n1 = 0.0f, p1 = 0.0f, n2 = 0.0f;
    for (int64_t i = 0; i < len; ++i) {
      float pi = load_as_float(a.p, a.dt, b0 + i);
      float mi = c1.table[a.q1[b0 + i]] * s1, vi = c2.table[a.q2[b0 + i]] * s2;
      adamw_element(load_as_float(a.g, a.dt, b0 + i), pi, mi, vi, h);
      store_from_float(a.p, a.dt, b0 + i, pi);
      mt[i] = mi;
      vt[i] = vi;
      n1 = absmax_step(n1, mi);
      p1 = posmax_step(p1, mi);
      n2 = absmax_step(n2, vi);
    }
    n1 = m_signed_scale(n1, p1);
    a.a1[b] = n1;
    a.a2[b] = n2;
    const float i1 = state_inv_scale(n1), i2 = state_inv_scale(n2);
    for (int64_t i = 0; i < len; ++i) {
      a.q1[b0 + i] = encode_state(mt[i] * i1, c1);
      a.q2[b0 + i] = encode_state(vt[i] * i2, c2);
    }
  }
}

const OptimKernels kOptimScalar = {
    .name = "scalar",
    .adamw32 = scalar_adamw32,
    .adamw8 = scalar_adamw8,
};

const OptimKernels& optim_kernels() {
  static constexpr IsaRows<OptimKernels> kRows = {
      .scalar = &kOptimScalar, QENGINE_X86_ROWS(.avx2 = &kOptimAvx2, .avx512 = &kOptimAvx512)};
  return kRows.active();
}

}  // namespace qengine::cpu

namespace qengine {
namespace {

// Elements per unit of the thread split: a multiple of the 8-bit block, large enough that a
// unit's work dwarfs the bookkeeping.
constexpr int64_t kUnit = 16 * kOptimBlock;
// Units a thread takes at a time (256K elements: 1 MiB of float32 parameters), and the step
// size below which threads are not worth waking.
constexpr int64_t kChunkUnits = 64;
constexpr int64_t kMinParallelUnits = 16;

bool valid_code(const StateCode& c) {
  return c.table != nullptr && c.lut != nullptr && c.lut_kmax >= 0 && c.lut_base >= 0;
}

}  // namespace

namespace cpu {

const char* adamw_spans_name() { return optim_kernels().name; }

}  // namespace cpu

int adamw_cpu(const OptimTask* tasks, int64_t ntasks, const AdamHyper* hyper, int64_t nhyper, int state_bits,
              const StateCode* codes) {
  if (ntasks < 0 || (ntasks > 0 && (tasks == nullptr || hyper == nullptr))) return kInvalidArgument;
  if (state_bits != 32 && state_bits != 8) return kInvalidArgument;
  if (state_bits == 8 && (codes == nullptr || !valid_code(codes[0]) || !valid_code(codes[1]))) return kInvalidArgument;
  // Prefix sums of units per task, so any thread's range maps to (task, element) spans.
  std::vector<int64_t> first_unit(static_cast<size_t>(ntasks) + 1, 0);
  for (int64_t k = 0; k < ntasks; ++k) {
    const OptimTask& t = tasks[k];
    if (t.n < 0 || t.dtype < kFloat32 || t.dtype > kBFloat16 || t.hyper < 0 || t.hyper >= nhyper) {
      return kInvalidArgument;
    }
    if (t.n > 0 && (t.param == 0 || t.grad == 0 || t.state1 == 0 || t.state2 == 0)) return kInvalidArgument;
    if (t.n > 0 && state_bits == 8 && (t.absmax1 == 0 || t.absmax2 == 0)) return kInvalidArgument;
    first_unit[k + 1] = first_unit[k] + (t.n + kUnit - 1) / kUnit;
  }
  const int64_t units = first_unit[ntasks];
  if (units == 0) return kOk;

  // The spans of the ISA table the other kernels use (QENGINE_CPU_ISA / set_isa apply).
  const cpu::AdamSpan32 span32 = cpu::optim_kernels().adamw32;
  const cpu::AdamSpan8 span8 = cpu::optim_kernels().adamw8;

  // Threads claim chunks of units (parallel_chunks): a thread slowed by other processes then
  // does less of the step. Steps of fewer than kMinParallelUnits stay on the calling thread.
  auto run = [&](int64_t u0, int64_t u1) {
    int64_t k = std::upper_bound(first_unit.begin(), first_unit.end(), u0) - first_unit.begin() - 1;
    for (int64_t u = u0; u < u1; ++k) {
      const OptimTask& t = tasks[k];
      const int64_t lo = (u - first_unit[k]) * kUnit;
      const int64_t u_end = std::min(u1, first_unit[k + 1]);
      const int64_t hi = std::min(t.n, (u_end - first_unit[k]) * kUnit);
      if (state_bits == 32) span32(t, lo, hi, hyper[t.hyper]);
      else span8(t, lo, hi, hyper[t.hyper], codes[0], codes[1]);
      u = u_end;
    }
  };
  if (units < kMinParallelUnits) {
    run(0, units);
  } else {
    cpu::parallel_chunks(0, units, kChunkUnits, run);
  }
  return kOk;
}

}  // namespace qengine
