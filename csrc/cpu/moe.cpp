// CPU grouped Mixture-of-Experts forward: tokens are bucketed by expert (a counting sort),
// then each expert that received tokens runs its two dequantize-matmuls on its own rows
// through matmul_cpu (the fused small-batch kernel, 8 rows per decoded weight), the LoRA
// epilogue, the gate activation, and a weighted sum into the output. No dense weight copy.
#include "qengine/moe.h"

#include <cmath>
#include <cstring>
#include <vector>

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

// y[m, n] (float32 [rows, N]) = expert e's product for `rows` rows of x (x_dtype, contiguous
// [rows, K]), with its LoRA side path and bias.
int expert_product(const ExpertMatrices& m, int64_t e, const void* x, int x_dtype, int64_t rows, float* y,
                   std::vector<float>& scale_buf) {
  const ExpertSlice s = slice(m, e, scale_buf);
  int status = matmul_cpu(x, x_dtype, rows, m.K, m.K, m.N, s.packed, m.blocksize, m.cb, m.rule, s.scales, s.offsets, y);
  if (status != kOk) return status;
  if (m.lora_a != nullptr) {
    const int64_t es = dtype_size(m.lora_dtype);
    const char* a = static_cast<const char*>(m.lora_a) + e * m.lora_rank * m.K * es;
    const char* b = static_cast<const char*>(m.lora_b) + e * m.N * m.lora_rank * es;
    status = lora_epilogue_cpu(x, x_dtype, rows, m.K, a, b, m.lora_dtype, m.lora_rank, m.N, m.lora_scale, y);
    if (status != kOk) return status;
  }
  if (m.bias != nullptr) {
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t n = 0; n < m.N; ++n) y[r * m.N + n] += load_as_float(m.bias, m.bias_dtype, e * m.N + n);
    }
  }
  return kOk;
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

  std::fill(y, y + T * H, 0.0f);
  const int64_t es = dtype_size(x_dtype);
  std::vector<char> xe, he;                 // this expert's rows of x, and its intermediate (x's dtype)
  std::vector<float> a, out, scale_buf;     // up projection [rows, up.N], down projection [rows, H]
  for (int64_t e = 0; e < E; ++e) {
    const int64_t rows = start[e + 1] - start[e];
    if (rows == 0) continue;
    const int64_t* mine = order.data() + start[e];
    xe.resize(static_cast<size_t>(rows * H * es));
    for (int64_t r = 0; r < rows; ++r) {
      std::memcpy(xe.data() + r * H * es, static_cast<const char*>(x) + (mine[r] / topk) * H * es,
                  static_cast<size_t>(H * es));
    }
    a.resize(static_cast<size_t>(rows * up.N));
    int status = expert_product(up, e, xe.data(), x_dtype, rows, a.data(), scale_buf);
    if (status != kOk) return status;
    he.resize(static_cast<size_t>(rows * inter * es));
    for (int64_t r = 0; r < rows; ++r) {
      const float* ar = a.data() + r * up.N;
      for (int64_t j = 0; j < inter; ++j) {
        float h;
        if (gate_layout == kGateConcatenated) h = activate(ar[j], activation) * ar[inter + j];
        else if (gate_layout == kGateInterleaved) h = activate(ar[2 * j], activation) * ar[2 * j + 1];
        else h = activate(ar[j], activation);
        store_from_float(he.data(), x_dtype, r * inter + j, h);
      }
    }
    out.resize(static_cast<size_t>(rows * H));
    status = expert_product(down, e, he.data(), x_dtype, rows, out.data(), scale_buf);
    if (status != kOk) return status;
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t p = mine[r];
      const float w = weights[p];
      float* yt = y + (p / topk) * H;
      const float* o = out.data() + r * H;
      for (int64_t i = 0; i < H; ++i) yt[i] += w * o[i];
    }
  }
  return kOk;
}

}  // namespace qengine
