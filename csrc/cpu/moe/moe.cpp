// CPU grouped Mixture-of-Experts forward: the (token, slot) pairs are bucketed by expert (a
// counting sort); the up projections of all experts that received tokens then run as one
// parallel region of fused small-batch GEMVs (each decoded weight serves up to 8 of the
// expert's rows), then the LoRA epilogues, the gate activation, the down projections (one
// more region) and the weighted sum into the output. No dense weight copy, no per-expert
// thread barrier. Experts that receive enough bfloat16 rows for the gemm family's kernel (on AMX
// from 4) run on it instead, in a region of their own.
#include "qengine/moe.h"

#include <cmath>
#include <algorithm>
#include <cstring>
#include <memory>
#include <vector>

#include "cpu/gemm/kernels.h"
#include "cpu/gemv/kernels.h"
#include "cpu/common/thread_pool.h"
#include "qengine/dtype.h"
#include "qengine/ops.h"
#include "qengine/status.h"

namespace qengine {
namespace {

float activate(float v, int activation) {
  switch (activation) {
    case kSilu: return v / (1.0f + std::exp(-v));
    case kGeluTanh: {
      const float u = 0.7978845608028654f * (v + 0.044715f * v * v * v);
      return 0.5f * v * (1.0f + std::tanh(u));
    }
    case kGeluErf: return 0.5f * v * (1.0f + std::erf(v * 0.7071067811865476f));
    default: return v > 0.0f ? v : 0.0f;
  }
}

// Expert e's slice of a stacked matrix: its codes, scales and offsets as a standalone [N, K]
// weight. Double-quantized scales are addressed in place when the expert starts on a nested
// block; otherwise its float32 scales are decoded into `buf` (small: one value per block).
struct ExpertSlice {
  const uint8_t* packed;
  BlockScales scales;
  const float* offsets;
};

ExpertSlice slice(const ExpertMatrices& m, int64_t e, std::vector<float>& buf) {
  const int64_t elems = m.N * m.K;
  const int64_t nb = elems / m.blocksize, b0 = e * nb;
  ExpertSlice s{m.packed + e * elems * m.cb.bits / 8, m.scales, m.offsets ? m.offsets + b0 : nullptr};
  if (m.scales.values != nullptr) {
    s.scales.values = m.scales.values + b0;
  } else if (b0 % m.scales.nested_blocksize == 0) {
    s.scales.codes = m.scales.codes + b0;
    s.scales.absmax = m.scales.absmax + b0 / m.scales.nested_blocksize;
  } else {
    buf.resize(static_cast<size_t>(nb));
    for (int64_t b = 0; b < nb; ++b) buf[b] = block_scale(m.scales, b0 + b);
    s.scales = BlockScales{buf.data(), nullptr, nullptr, nullptr, 1, 0.0f, 0};
  }
  return s;
}

bool valid_matrices(const ExpertMatrices& m) {
  if (m.N < 0 || m.K < 0 || m.blocksize < 1 || (m.cb.bits != 4 && m.cb.bits != 8)) return false;
  if ((m.N * m.K) % m.blocksize != 0 || (m.N * m.K * m.cb.bits) % 8 != 0) return false;
  if (m.scales.values == nullptr && m.scales.nested_blocksize < 1) return false;
  return (m.lora_a == nullptr) == (m.lora_b == nullptr) && (m.lora_a == nullptr || m.lora_rank > 0);
}

// Adds expert e's LoRA side path and bias to its rows of y (float32 [rows, N]).
int expert_epilogue(const ExpertMatrices& m, int64_t e, const void* x, int x_dtype, int64_t rows, float* y) {
  if (m.lora_a != nullptr) {
    const int64_t es = dtype_size(m.lora_dtype);
    const char* a = static_cast<const char*>(m.lora_a) + e * m.lora_rank * m.K * es;
    const char* b = static_cast<const char*>(m.lora_b) + e * m.N * m.lora_rank * es;
    const int status = lora_epilogue_cpu(x, x_dtype, rows, m.K, a, b, m.lora_dtype, m.lora_rank, m.N, m.lora_scale, y);
    if (status != kOk) return status;
  }
  if (m.bias != nullptr) {
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t n = 0; n < m.N; ++n) y[r * m.N + n] += load_as_float(m.bias, m.bias_dtype, e * m.N + n);
    }
  }
  return kOk;
}

// The products of every active expert with one matrix, in one parallel region: expert j's
// rows are j*N .. j*N + N of a virtual stacked output, split across threads like one GEMV.
// x holds the tokens' rows grouped by expert (expert e's from row start[e]); y likewise.
// An expert on the gemm family's kernel: its rows of x packed by the row's pack_x.
struct GemmExpert {
  std::unique_ptr<int32_t[]> xp;
  int64_t rows;
  ExpertSlice s;
  float* y;
};

// The gemm experts' products, threads over (expert, group of output rows) tasks.
void gemm_products(const cpu::GemmKernels& k, const ExpertMatrices& m, const std::vector<GemmExpert>& experts) {
  const int64_t group = cpu::kPanelRows * cpu::kGroupPanels, groups = (m.N + group - 1) / group;
  const std::unique_ptr<cpu::ScalePlanes> code_planes =
      m.cb.bits == 8 ? std::make_unique<cpu::ScalePlanes>(m.cb.table) : nullptr;
  cpu::parallel_chunks(0, static_cast<int64_t>(experts.size()) * groups, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const GemmExpert& g = experts[t / groups];
      const int64_t n0 = (t % groups) * group;
      k.bf16_forward(g.xp.get(), g.rows, m.K, m.N, g.s.packed, nullptr, m.blocksize, m.cb.table, code_planes.get(),
                     g.s.scales, g.s.offsets, nullptr, nullptr, n0, std::min(m.N, n0 + group), g.y, kFloat32);
    }
  });
}

int grouped_products(const ExpertMatrices& m, const std::vector<int64_t>& active, const std::vector<int64_t>& start,
                     const char* x, int x_dtype, float* y) {
  const int64_t es = dtype_size(x_dtype);
  if (!cpu::valid_product(x_dtype, 1, m.K, m.K, m.N, m.blocksize, m.cb)) return kInvalidArgument;
  const cpu::GemmKernels& k = cpu::gemm_kernels();  // one row for the call (set_isa may run meanwhile)
  const bool gemm = cpu::gemm_applies_on(k, x_dtype, m.K, m.blocksize, m.cb, m.rule, m.offsets, false, true);
  const int64_t gemm_rows = m.cb.bits == 8 ? std::max(k.min_rows, k.min_rows_bytes) : k.min_rows;
  std::vector<std::vector<float>> scale_bufs(active.size());
  std::vector<cpu::RowProduct> products;
  std::vector<GemmExpert> gemm_experts;
  products.reserve(active.size());
  for (size_t j = 0; j < active.size(); ++j) {
    const int64_t e = active[j], rows = start[e + 1] - start[e];
    const ExpertSlice s = slice(m, e, scale_bufs[j]);
    const char* xe = x + start[e] * m.K * es;
    if (gemm && rows >= gemm_rows) {
      gemm_experts.push_back({cpu::packed_rows(k, k.pack_x, xe, rows, m.K, m.K), rows, s, y + start[e] * m.N});
      continue;
    }
    products.emplace_back(xe, x_dtype, rows, m.K, m.K, m.N, s.packed, m.blocksize, m.cb, m.rule, s.scales, s.offsets,
                          y + start[e] * m.N);
  }
  if (!gemm_experts.empty()) gemm_products(k, m, gemm_experts);
  const int64_t total = static_cast<int64_t>(products.size()) * m.N;
  if (total > 0) {
    cpu::parallel_for(0, total, products.front().min_rows(), 1, [&](int64_t g0, int64_t g1) {
      for (int64_t g = g0; g < g1;) {
        const int64_t j = g / m.N, r0 = g - j * m.N, r1 = std::min(m.N, r0 + (g1 - g));
        products[j].run(r0, r1);
        g += r1 - r0;
      }
    });
  }
  for (size_t j = 0; j < active.size(); ++j) {
    const int64_t e = active[j];
    const int status = expert_epilogue(m, e, x + start[e] * m.K * es, x_dtype, start[e + 1] - start[e],
                                       y + start[e] * m.N);
    if (status != kOk) return status;
  }
  return kOk;
}

// h[i] (x's dtype, [inter]) = the gate of a[i] (float32 [up.N]) for pairs i in [i0, i1).
void gate_rows(const float* a, int64_t up_n, int64_t inter, int gate_layout, int activation, int x_dtype, int64_t i0,
               int64_t i1, char* h) {
  for (int64_t i = i0; i < i1; ++i) {
    const float* ar = a + i * up_n;
    for (int64_t j = 0; j < inter; ++j) {
      float v;
      if (gate_layout == kGateConcatenated) v = activate(ar[j], activation) * ar[inter + j];
      else if (gate_layout == kGateInterleaved) v = activate(ar[2 * j], activation) * ar[2 * j + 1];
      else v = activate(ar[j], activation);
      store_from_float(h, x_dtype, i * inter + j, v);
    }
  }
}

// Decoding: few rows per expert and at least as many active experts as threads. Each thread
// then runs whole experts (up projection, gate, down projection) on its own, with no barrier
// between the phases; every expert's weights are one contiguous stream for one core. (Only
// without LoRA: its epilogue is a parallel region of its own, which a worker must not open.)
void experts_per_thread(const ExpertMatrices& up, const ExpertMatrices& down, const std::vector<int64_t>& active,
                        const std::vector<int64_t>& start, const char* xs, int x_dtype, int gate_layout,
                        int activation, float* a, char* h, float* out) {
  const int64_t es = dtype_size(x_dtype), inter = down.K;
  cpu::parallel_for(0, static_cast<int64_t>(active.size()), 1, 1, [&](int64_t j0, int64_t j1) {
    std::vector<float> scale_buf;
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t e = active[j], rows = start[e + 1] - start[e], r0 = start[e];
      ExpertSlice s = slice(up, e, scale_buf);
      cpu::RowProduct(xs + r0 * up.K * es, x_dtype, rows, up.K, up.K, up.N, s.packed, up.blocksize, up.cb, up.rule,
                      s.scales, s.offsets, a + r0 * up.N).run(0, up.N);
      expert_epilogue(up, e, nullptr, x_dtype, rows, a + r0 * up.N);  // bias only (no LoRA here)
      gate_rows(a, up.N, inter, gate_layout, activation, x_dtype, r0, r0 + rows, h);
      s = slice(down, e, scale_buf);
      cpu::RowProduct(h + r0 * inter * es, x_dtype, rows, inter, inter, down.N, s.packed, down.blocksize, down.cb,
                      down.rule, s.scales, s.offsets, out + r0 * down.N).run(0, down.N);
      expert_epilogue(down, e, nullptr, x_dtype, rows, out + r0 * down.N);
    }
  });
}

}  // namespace

int moe_experts_cpu(const void* x, int x_dtype, int64_t T, int64_t H, const int64_t* index, const float* weights,
                    int64_t topk, int64_t E, const ExpertMatrices& up, const ExpertMatrices& down, int gate_layout,
                    int activation, float* y) {
  if (T < 0 || H < 1 || topk < 1 || E < 1 || !valid_matrices(up) || !valid_matrices(down)) return kInvalidArgument;
  if (x_dtype != kFloat32 && x_dtype != kFloat16 && x_dtype != kBFloat16) return kInvalidArgument;
  if (gate_layout < kGateConcatenated || gate_layout > kNoGate || activation < kSilu || activation > kRelu) {
    return kInvalidArgument;
  }
  const int64_t inter = down.K;
  if (up.K != H || down.N != H || up.N != (gate_layout == kNoGate ? inter : 2 * inter)) return kInvalidArgument;
  const int64_t pairs = T * topk;
  // Counting sort of the (token, slot) pairs by expert; every index checked before any work.
  std::vector<int64_t> start(static_cast<size_t>(E + 1), 0);
  for (int64_t p = 0; p < pairs; ++p) {
    if (index[p] < 0 || index[p] >= E) return kInvalidArgument;
    ++start[index[p] + 1];
  }
  for (int64_t e = 0; e < E; ++e) start[e + 1] += start[e];
  std::vector<int64_t> order(static_cast<size_t>(pairs));
  std::vector<int64_t> fill(start.begin(), start.end() - 1);
  for (int64_t p = 0; p < pairs; ++p) order[fill[index[p]]++] = p;
  std::vector<int64_t> active;
  for (int64_t e = 0; e < E; ++e) {
    if (start[e + 1] > start[e]) active.push_back(e);
  }

  // The pairs' rows of x, grouped by expert.
  const int64_t es = dtype_size(x_dtype);
  std::vector<char> xs(static_cast<size_t>(pairs * H * es));
  for (int64_t i = 0; i < pairs; ++i) {
    std::memcpy(xs.data() + i * H * es, static_cast<const char*>(x) + (order[i] / topk) * H * es,
                static_cast<size_t>(H * es));
  }
  std::vector<float> a(static_cast<size_t>(pairs * up.N));
  std::vector<char> h(static_cast<size_t>(pairs * inter * es));  // the gate, in x's dtype (as a dense model's)
  std::vector<float> out(static_cast<size_t>(pairs * H));
  const int64_t threads = cpu::num_threads(), n_active = static_cast<int64_t>(active.size());
  if (!cpu::valid_product(x_dtype, 1, up.K, up.K, up.N, up.blocksize, up.cb) ||
      !cpu::valid_product(x_dtype, 1, down.K, down.K, down.N, down.blocksize, down.cb)) {
    return kInvalidArgument;
  }
  if (threads > 1 && n_active >= threads && pairs <= 8 * n_active && up.lora_a == nullptr &&
      down.lora_a == nullptr) {
    experts_per_thread(up, down, active, start, xs.data(), x_dtype, gate_layout, activation, a.data(), h.data(),
                       out.data());
  } else {
    int status = grouped_products(up, active, start, xs.data(), x_dtype, a.data());
    if (status != kOk) return status;
    // (Small problems run on this thread: a parallel region costs more.)
    cpu::parallel_for(0, pairs, std::max<int64_t>(1, 65536 / inter), 1, [&](int64_t i0, int64_t i1) {
      gate_rows(a.data(), up.N, inter, gate_layout, activation, x_dtype, i0, i1, h.data());
    });
    status = grouped_products(down, active, start, h.data(), x_dtype, out.data());
    if (status != kOk) return status;
  }
  // y[t] = sum of its pairs' weighted outputs, threads over columns (each pair in sorted order).
  cpu::parallel_for(0, H, std::max<int64_t>(16, 65536 / std::max<int64_t>(pairs, 1)), 16, [&](int64_t c0, int64_t c1) {
    for (int64_t t = 0; t < T; ++t) std::fill(y + t * H + c0, y + t * H + c1, 0.0f);
    for (int64_t i = 0; i < pairs; ++i) {
      const float w = weights[order[i]];
      float* yt = y + (order[i] / topk) * H;
      const float* o = out.data() + i * H;
      for (int64_t c = c0; c < c1; ++c) yt[c] += w * o[c];
    }
  });
  return kOk;
}

}  // namespace qengine
