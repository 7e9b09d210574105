// The LoRA side path's products, natively, for bfloat16 x and gradients with float32 adapters
// (the QLoRA training step): its share of the backward (lora_backward_cpu) and, for the
// large-batch products that run on torch's GEMM, its share of the forward (lora_add_cpu). No
// float32 copies of x, of the output or of its gradient; each bfloat16 output rounded once; the
// thin products (M x r) on FMA kernels instead of torch GEMMs sized for square matrices. Where
// the active ISA has no such kernels the caller keeps its torch composite.
#include <algorithm>
#include <cstring>
#include <vector>

#include "cpu/common/thread_pool.h"
#include "cpu/gemm/kernels.h"
#include "qengine/ops.h"
#include "qengine/status.h"

namespace qengine {
namespace {

constexpr int64_t kLanes = 16;  // j values per lora_reduce call

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// t = scale * rows @ w^T [M, r] (rows bfloat16 [M, K], w float32 [r, K]), stored with row stride rp
// and zero columns r..rp (what lora_reduce reads in blocks of 16).
std::vector<float> thin_product(const cpu::GemmVectorKernels& k, const uint16_t* rows, int64_t M, int64_t K,
                                const float* w, int64_t r, int64_t rp, float scale) {
  std::vector<float> t(static_cast<size_t>(M * r));
  cpu::parallel_for(0, M, 16, 1, [&](int64_t m0, int64_t m1) { k.lora_down(rows, K, K, w, r, scale, m0, m1, t.data()); });
  std::vector<float> padded(static_cast<size_t>(M * rp), 0.0f);
  for (int64_t m = 0; m < M; ++m) std::memcpy(&padded[m * rp], &t[m * r], sizeof(float) * r);
  return padded;
}

// out[j * n_cols + n] = sum_m u[m * rp + j] * rows[m * n_cols + n] for j < rp (out float32 [rp, n_cols]).
std::vector<float> reduce_rows(const cpu::GemmVectorKernels& k, const uint16_t* rows, int64_t M, int64_t n_cols,
                               const std::vector<float>& u, int64_t rp) {
  std::vector<float> out(static_cast<size_t>(rp * n_cols));
  cpu::parallel_for(0, n_cols, 64, kLanes, [&](int64_t n0, int64_t n1) {
    for (int64_t j0 = 0; j0 < rp; j0 += kLanes) {
      k.lora_reduce(rows, M, n_cols, u.data() + j0, rp, n0, n1, out.data() + j0 * n_cols, n_cols);
    }
  });
  return out;
}

// t^T (float32 [r, n]) of t (float32 [n, r]).
std::vector<float> transposed(const float* t, int64_t n, int64_t r) {
  std::vector<float> out(static_cast<size_t>(r * n));
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < r; ++j) out[j * n + i] = t[i * r + j];
  }
  return out;
}

}  // namespace

int lora_backward_cpu(const void* g, const void* x, int64_t M, int64_t N, int64_t K, const float* a, const float* b,
                      int64_t r, float scale, const void* gx_in, void* gx_out, float* ga, float* gb, bool* done) {
  *done = false;
  if (M < 0 || N < 1 || K < 1 || r < 1 || g == nullptr || x == nullptr || a == nullptr || b == nullptr ||
      (gx_out != nullptr && gx_in == nullptr)) {
    return kInvalidArgument;
  }
  const cpu::GemmVectorKernels& k = cpu::gemm_vector_kernels();
  if (k.lora_down == nullptr || k.lora_reduce == nullptr || k.lora_up_add == nullptr) return kOk;
  *done = true;
  const auto* gb16 = static_cast<const uint16_t*>(g);
  const auto* xb16 = static_cast<const uint16_t*>(x);
  const int64_t rp = round_up(r, kLanes);
  if (gx_out != nullptr || ga != nullptr) {
    // u = scale * g @ B [M, r]: the gradient at the side path's bottleneck.
    const std::vector<float> bt = transposed(b, N, r);
    const std::vector<float> u = thin_product(k, gb16, M, N, bt.data(), r, rp, scale);
    if (gx_out != nullptr) {
      cpu::parallel_for(0, M, 8, 4, [&](int64_t m0, int64_t m1) {
        k.lora_up_add(u.data(), rp, r, a, K, static_cast<const uint16_t*>(gx_in), static_cast<uint16_t*>(gx_out), m0,
                      m1);
      });
    }
    if (ga != nullptr) {  // ga = u^T @ x [r, K]
      const std::vector<float> gat = reduce_rows(k, xb16, M, K, u, rp);
      std::memcpy(ga, gat.data(), sizeof(float) * r * K);
    }
  }
  if (gb != nullptr) {  // gb = g^T @ (scale * x @ A^T) [N, r]
    const std::vector<float> v = thin_product(k, xb16, M, K, a, r, rp, scale);
    const std::vector<float> gbt = reduce_rows(k, gb16, M, N, v, rp);
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t j = 0; j < r; ++j) gb[n * r + j] = gbt[j * N + n];
    }
  }
  return kOk;
}

int lora_add_cpu(const void* x, int64_t M, int64_t K, const float* a, const float* b, int64_t r, int64_t N,
                 float scale, const void* y_in, void* y_out, bool* done) {
  *done = false;
  if (M < 0 || N < 1 || K < 1 || r < 1 || x == nullptr || a == nullptr || b == nullptr || y_in == nullptr ||
      y_out == nullptr) {
    return kInvalidArgument;
  }
  const cpu::GemmVectorKernels& k = cpu::gemm_vector_kernels();
  if (k.lora_down == nullptr || k.lora_up_add == nullptr) return kOk;
  *done = true;
  // t = scale * x @ A^T [M, r], then y_out = y_in + t @ B^T: the backward's input-gradient
  // kernels, with x in the gradient's place and B^T in A's.
  const int64_t rp = round_up(r, kLanes);
  const std::vector<float> t = thin_product(k, static_cast<const uint16_t*>(x), M, K, a, r, rp, scale);
  const std::vector<float> bt = transposed(b, N, r);
  cpu::parallel_for(0, M, 8, 4, [&](int64_t m0, int64_t m1) {
    k.lora_up_add(t.data(), rp, r, bt.data(), N, static_cast<const uint16_t*>(y_in), static_cast<uint16_t*>(y_out),
                  m0, m1);
  });
  return kOk;
}

}  // namespace qengine
