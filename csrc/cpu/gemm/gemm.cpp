// CPU dequantize-matmul for large batches: threads over groups of output rows, each running
// the active ISA's blocked kernel (kernels.h). Where no kernel applies (the dtype of x, the
// format, the shape) the caller keeps its dequantize-tiles-then-GEMM path.
#include "cpu/gemm/kernels.h"

#include <algorithm>
#include <memory>
#include <vector>

#include "cpu/common/isa.h"
#include "cpu/common/thread_pool.h"
#include "cpu/gemv/kernels.h"  // float_rows
#include "qengine/dtype.h"
#include "qengine/ops.h"
#include "qengine/status.h"

namespace qengine {
namespace cpu {

const GemmKernels& gemm_kernels() {
  static constexpr GemmKernels kNone{};
  static constexpr IsaRows<GemmKernels> kRows = {
      .scalar = &kNone, QENGINE_X86_ROWS(.avx512_bf16 = &kGemmAvx512Bf16, .amx = &kGemmAmx)};
  return kRows.active();
}

const GemmVectorKernels& gemm_vector_kernels() {
  static constexpr GemmVectorKernels kNone{};
  static constexpr IsaRows<GemmVectorKernels> kRows = {
      .scalar = &kNone, QENGINE_X86_ROWS(.avx512_bf16 = &kGemmVectorAvx512Bf16)};
  return kRows.active();
}

std::unique_ptr<int32_t[]> packed_rows(const GemmKernels& k, decltype(GemmKernels::pack_x) pack, const void* x,
                                       int64_t M, int64_t K, int64_t ldx) {
  const int64_t tiles = (M + k.tile_rows - 1) / k.tile_rows;
  std::unique_ptr<int32_t[]> xp(new int32_t[static_cast<size_t>(tiles * k.tile_rows * ((K + 31) / 32 * 16))]);
  parallel_for(0, tiles, std::max<int64_t>(1, 8192 / std::max<int64_t>(K, 1)), 1, [&](int64_t t0, int64_t t1) {
    pack(static_cast<const uint16_t*>(x), M, K, ldx, t0, t1, xp.get());
  });
  return xp;
}

}  // namespace cpu

namespace cpu {

bool gemm_applies_on(const GemmKernels& k, int x_dtype, int64_t K, int64_t blocksize, const Codebook& cb, int rule,
                     const float* offsets, bool sparse24, bool forward) {
  const bool layout = sparse24 ? K % 256 == 0 && blocksize >= 32 && (K / 2) % blocksize == 0
                               : K % 32 == 0 && K % blocksize == 0;
  const bool codes = cb.bits == 4 || ((forward || k.bytes_transposed) && cb.bits == 8 && !sparse24 &&
                                      k.min_rows_bytes > 0 && vbmi_scales_available());
  const bool scale_rule = (rule == kAbsmax && offsets == nullptr) ||
                          (rule == kMinmax && offsets != nullptr && !sparse24 && k.minmax);
  return k.bf16_forward != nullptr && x_dtype == kBFloat16 && codes && scale_rule && blocksize >= 16 &&
         (blocksize & (blocksize - 1)) == 0 && layout;
}

}  // namespace cpu

bool gemm_applies(int x_dtype, int64_t K, int64_t blocksize, const Codebook& cb, int rule, const float* offsets,
                  bool sparse24) {
  return cpu::gemm_applies_on(cpu::gemm_kernels(), x_dtype, K, blocksize, cb, rule, offsets, sparse24);
}

int64_t gemm_min_rows(bool sparse24) {
  return sparse24 ? cpu::gemm_kernels().min_rows_sparse24 : cpu::gemm_kernels().min_rows;
}

namespace {

// Whether row k takes M rows of x (its max_rows, or max_rows_sparse24 for the 2:4 layout).
bool rows_apply(const cpu::GemmKernels& k, int64_t M, bool sparse24) {
  const int64_t most = sparse24 ? k.max_rows_sparse24 : k.max_rows;
  return most == 0 || M <= most;
}

// The large-batch products write float32 sums or bfloat16 (x's dtype: each sum rounded once).
bool valid_output_dtype(int dtype) { return dtype == kFloat32 || dtype == kBFloat16; }

void fill_zero(void* out, int dtype, int64_t n) {
  if (dtype == kFloat32) std::fill(static_cast<float*>(out), static_cast<float*>(out) + n, 0.0f);
  else std::fill(static_cast<uint16_t*>(out), static_cast<uint16_t*>(out) + n, uint16_t{0});
}

// src [rows, cols] (dtype, contiguous) transposed into float32 [cols, rows] (widened a row at a
// time first, so the transposing loop has no per-element dtype switch).
std::vector<float> transposed_float(const void* src, int dtype, int64_t rows, int64_t cols) {
  std::vector<float> buf;
  const float* f = cpu::float_rows(src, dtype, rows, cols, cols, buf);  // a view when float32
  std::vector<float> out(static_cast<size_t>(rows * cols));
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < cols; ++j) out[j * rows + i] = f[i * cols + j];
  }
  return out;
}

}  // namespace

int matmul_large_cpu(const void* x, int x_dtype, int64_t M, int64_t K, int64_t ldx, int64_t N, const uint8_t* packed,
                     const uint8_t* positions, int64_t blocksize, const Codebook& cb, int rule,
                     const BlockScales& scales, const float* offsets, const LoraArgs& lora, void* y, int y_dtype,
                     bool* done) {
  *done = false;
  if (M < 0 || K < 0 || N < 0 || ldx < K || blocksize < 1 || (cb.bits != 4 && cb.bits != 8) || lora.r < 0 ||
      (lora.r > 0 && !valid_dtype(lora.dtype))) {
    return kInvalidArgument;
  }
  // One ISA row for the whole call: set_isa from another thread must not switch it half way.
  const cpu::GemmKernels& k = cpu::gemm_kernels();
  if (!cpu::gemm_applies_on(k, x_dtype, K, blocksize, cb, rule, offsets, positions != nullptr, true) ||
      !rows_apply(k, M, positions != nullptr) || (cb.bits == 8 && M < k.min_rows_bytes)) {
    return kOk;
  }
  if (!valid_output_dtype(y_dtype)) return kInvalidArgument;
  *done = true;
  if (M == 0 || N == 0) return kOk;
  if (K == 0) {  // x @ W^T and the side path are both zero
    fill_zero(y, y_dtype, M * N);
    return kOk;
  }
  const auto* xb = static_cast<const uint16_t*>(x);
  // The side path: t = scale * x @ A^T now (threads over rows of x), B^T as float32 for the epilogue.
  std::vector<float> t, bt;
  cpu::LoraSide side{nullptr, nullptr, lora.r, N};
  if (lora.r > 0) {
    std::vector<float> a_buf;
    const float* a = cpu::float_rows(lora.a, lora.dtype, lora.r, K, K, a_buf);  // a view when float32
    t.resize(static_cast<size_t>(M * lora.r));
    bt = transposed_float(lora.b, lora.dtype, N, lora.r);
    const cpu::GemmVectorKernels& vk = cpu::gemm_vector_kernels();
    cpu::parallel_for(0, M, 16, 1, [&](int64_t m0, int64_t m1) {
      vk.lora_down(xb, K, ldx, a, lora.r, lora.scale, m0, m1, t.data());
    });
    side.t = t.data();
    side.bt = bt.data();
  }
  const int64_t stored = positions != nullptr ? K / 2 : K;  // codes a row
  const std::unique_ptr<cpu::ScalePlanes> planes = cpu::scale_planes(scales, N * (stored / blocksize));
  const std::unique_ptr<int32_t[]> xp = cpu::packed_rows(k, k.pack_x, x, M, K, ldx);
  const std::unique_ptr<cpu::ScalePlanes> code_planes =
      cb.bits == 8 ? std::make_unique<cpu::ScalePlanes>(cb.table) : nullptr;
  const int64_t group = cpu::kPanelRows * cpu::kGroupPanels;
  cpu::parallel_chunks(0, N, group, [&](int64_t n0, int64_t n1) {
    k.bf16_forward(xp.get(), M, K, N, packed, positions, blocksize, cb.table, code_planes.get(), scales, offsets,
                   planes.get(), lora.r > 0 ? &side : nullptr, n0, n1, y, y_dtype);
  });
  return kOk;
}

}  // namespace qengine

namespace qengine {

int matmul_t_large_cpu(const void* g, int g_dtype, int64_t M, int64_t N, int64_t K, const uint8_t* packed,
                       const uint8_t* positions, int64_t blocksize, const Codebook& cb, int rule,
                       const BlockScales& scales, const float* offsets, void* gx, int gx_dtype, bool* done) {
  *done = false;
  if (M < 0 || K < 0 || N < 0 || blocksize < 1 || (cb.bits != 4 && cb.bits != 8)) return kInvalidArgument;
  const cpu::GemmKernels& k = cpu::gemm_kernels();
  if (!cpu::gemm_applies_on(k, g_dtype, K, blocksize, cb, rule, offsets, positions != nullptr) ||
      k.bf16_transposed == nullptr || N % 2 != 0 || !rows_apply(k, M, positions != nullptr) ||
      (cb.bits == 8 && M < k.min_rows_bytes)) {
    return kOk;
  }
  if (!valid_output_dtype(gx_dtype)) return kInvalidArgument;
  *done = true;
  if (M == 0 || K == 0) return kOk;
  if (N == 0) {
    fill_zero(gx, gx_dtype, M * K);
    return kOk;
  }
  const int64_t nblocks = N * ((positions != nullptr ? K / 2 : K) / blocksize);
  std::vector<float> buf;
  const std::unique_ptr<cpu::ScalePlanes> planes = cpu::scale_planes(scales, nblocks);
  const float* all_scales = cpu::gemm_vector_kernels().decode_scales(scales, planes.get(), nblocks, buf);
  const std::unique_ptr<int32_t[]> gp = cpu::packed_rows(k, k.pack_g != nullptr ? k.pack_g : k.pack_x, g, M, N, N);
  const std::unique_ptr<cpu::ScalePlanes> code_planes =
      cb.bits == 8 ? std::make_unique<cpu::ScalePlanes>(cb.table) : nullptr;
  const int64_t group = cpu::kPanelRows * cpu::kGroupPanels;
  cpu::parallel_chunks(0, K, group, [&](int64_t k0, int64_t k1) {
    k.bf16_transposed(gp.get(), M, N, K, packed, positions, blocksize, cb.table, code_planes.get(), all_scales,
                      offsets, k0, k1, gx, gx_dtype);
  });
  return kOk;
}

}  // namespace qengine
