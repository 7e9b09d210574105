// CPU kernels of the 2:4 sparse layout (byte order in sparse24.h): dequantize (decode the
// stored span with the dense per-ISA decoder, scatter by position, zeros elsewhere) and the
// small-batch matmul: the AVX512-BF16 GEMV for 4-bit absmax codes with bfloat16 activations,
// the AVX-512 float32 GEMV for other activations, and a portable path (decode a row, dot it
// with every row of x) for everything else.
#include <algorithm>
#include <cstring>
#include <memory>
#include <vector>

#include "cpu/common/thread_pool.h"
#include "cpu/gemv/kernels.h"
#include "cpu/quantize/kernels.h"
#include "cpu/sparse/sparse24.h"
#include "qengine/dtype.h"
#include "qengine/ops.h"
#include "qengine/status.h"

namespace qengine {
namespace {

using cpu::kChunk24;

// Scatters the decoded stored values of chunks [c0, c1) (vals[e] = storage element
// c0 * 128 + e) into dense weights out[0 .. 2 * (stored count)) of dtype out_dtype, writing
// each group of 4 at once: its two kept values at their positions, exact zeros elsewhere.
template <typename T, typename Convert>
void scatter_chunks(const float* vals, const uint8_t* positions, int64_t S, int64_t c0, int64_t c1, T* out,
                    Convert convert) {
  for (int64_t c = c0; c < c1; ++c) {
    const int64_t s0 = c * kChunk24;
    const int64_t len = std::min(kChunk24, S - s0);
    const uint8_t* pos = positions + s0 / 4;
    const float* cv = vals + (c - c0) * kChunk24;
    T* dst = out + (c - c0) * 2 * kChunk24;
    const bool full = len == kChunk24;
    for (int64_t g = 0; g < len / 2; ++g) {
      int p[2];
      T kept[2];
      for (int64_t k = 0; k < 2; ++k) {
        const int64_t v = 2 * g + k;
        // Full chunks: v = 32j + i sits at storage 4i + (j ^ 1), its position in byte i, bits 2j.
        const int64_t e = full ? 4 * (v & 31) + ((v >> 5) ^ 1) : v;
        p[k] = full ? (pos[v & 31] >> (2 * (v >> 5))) & 3 : (pos[v >> 2] >> (2 * (v & 3))) & 3;
        kept[k] = convert(cv[e]);
      }
      // The group assembled in registers (a store of parts then a wide reload would stall).
      if constexpr (sizeof(T) == 2) {
        const uint64_t word = (static_cast<uint64_t>(kept[0]) << (16 * p[0])) |
                              (static_cast<uint64_t>(kept[1]) << (16 * p[1]));
        std::memcpy(dst + 4 * g, &word, sizeof(word));
      } else {  // zeros, then the two kept values over them: stores only, no data-dependent branch
        const T zeros[4] = {T(0), T(0), T(0), T(0)};
        std::memcpy(dst + 4 * g, zeros, sizeof(zeros));
        dst[4 * g + p[0]] = kept[0];
        dst[4 * g + p[1]] = kept[1];
      }
    }
  }
}

// Stored values [s0, s1) (storage order) as float32 into vals.
void decode_stored(const cpu::QuantizeKernels& k, const uint8_t* packed, int64_t s0, int64_t s1, int64_t blocksize,
                   const Codebook& cb, int rule, const BlockScales& scales, const float* offsets, float* vals) {
  if (k.decode_blocks4 != nullptr && cb.bits == 4 && scales.values != nullptr && blocksize % 32 == 0 &&
      s0 % blocksize == 0 && (s1 - s0) % blocksize == 0) {
    // Whole blocks: the dense layout's batched 4-bit decoder.
    k.decode_blocks4(packed, s0 / blocksize, (s1 - s0) / blocksize, blocksize, cb.table, rule, scales.values,
                     offsets, vals, kFloat32, false);
  } else {
    cpu::decode_span(k, packed, s0, s1 - s0, blocksize, cb, rule, scales, offsets, vals, kFloat32, false);
  }
}

// Dense weights of chunks [c0, c1) (c1 - c0 <= kBatchChunks) into out (out_dtype); vals is
// scratch for kBatchChunks * 128 floats.
constexpr int64_t kBatchChunks = 32;

void decode_chunks(const cpu::QuantizeKernels& k, const uint8_t* packed, const uint8_t* positions, int64_t S, int64_t c0,
                   int64_t c1, int64_t blocksize, const Codebook& cb, int rule, const BlockScales& scales,
                   const float* offsets, void* out, int out_dtype, float* vals) {
  decode_stored(k, packed, c0 * kChunk24, std::min(S, c1 * kChunk24), blocksize, cb, rule, scales, offsets, vals);
  if (out_dtype == kFloat32) {
    scatter_chunks(vals, positions, S, c0, c1, static_cast<float*>(out), [](float v) { return v; });
  } else if (out_dtype == kBFloat16) {
    scatter_chunks(vals, positions, S, c0, c1, static_cast<uint16_t*>(out), [](float v) { return float_to_bf16(v); });
  } else {
    scatter_chunks(vals, positions, S, c0, c1, static_cast<uint16_t*>(out), [](float v) { return float_to_half(v); });
  }
}

// Dense float32 weights [first, first + count) (both multiples of 4) into out.
void decode_weights(const cpu::QuantizeKernels& k, const uint8_t* packed, const uint8_t* positions, int64_t S,
                    int64_t first, int64_t count, int64_t blocksize, const Codebook& cb, int rule,
                    const BlockScales& scales, const float* offsets, float* out, std::vector<float>& vals) {
  const int64_t end_w = first + count;
  if (first % (2 * kChunk24) == 0 && (end_w % (2 * kChunk24) == 0 || end_w == 2 * S)) {
    // Whole chunks (rows of a K % 256 == 0 weight): decoded straight into out, in batches.
    vals.resize(static_cast<size_t>(kBatchChunks * kChunk24));
    const int64_t c_end = (end_w / 2 + kChunk24 - 1) / kChunk24;
    for (int64_t c = first / (2 * kChunk24); c < c_end; c += kBatchChunks) {
      const int64_t ce = std::min(c_end, c + kBatchChunks);
      decode_chunks(k, packed, positions, S, c, ce, blocksize, cb, rule, scales, offsets,
                    out + (c * 2 * kChunk24 - first), kFloat32, vals.data());
    }
    return;
  }
  float w[2 * kChunk24];
  vals.resize(static_cast<size_t>(kChunk24));
  for (int64_t i = first; i < first + count;) {
    const int64_t c = i / (2 * kChunk24);
    const int64_t base = c * 2 * kChunk24;
    decode_chunks(k, packed, positions, S, c, c + 1, blocksize, cb, rule, scales, offsets, w, kFloat32, vals.data());
    const int64_t len = 2 * std::min(kChunk24, S - c * kChunk24);
    const int64_t end = std::min(first + count, base + len);
    std::memcpy(out + (i - first), w + (i - base), static_cast<size_t>(end - i) * sizeof(float));
    i = end;
  }
}

bool power_of_two(int64_t v) { return v > 0 && (v & (v - 1)) == 0; }

}  // namespace

namespace cpu {

const Sparse24Kernels& sparse24_kernels() {
  static constexpr Sparse24Kernels kNone = {};  // portable path only
  static constexpr IsaRows<Sparse24Kernels> kRows = {
      .scalar = &kNone, QENGINE_X86_ROWS(.avx512 = &kSparse24Avx512, .avx512_bf16 = &kSparse24Avx512Bf16)};
  return kRows.active();
}

}  // namespace cpu

int sparse24_dequantize_cpu(const uint8_t* packed, const uint8_t* positions, int64_t S, int64_t blocksize,
                            const Codebook& cb, int rule, const BlockScales& scales, const float* offsets, void* out,
                            int out_dtype) {
  if (S < 0 || S % 2 != 0 || blocksize < 1 || (cb.bits != 4 && cb.bits != 8) || !valid_dtype(out_dtype)) {
    return kInvalidArgument;
  }
  if (S == 0) return kOk;
  const cpu::QuantizeKernels& k = cpu::quantize_kernels();
  const int64_t chunks = (S + kChunk24 - 1) / kChunk24;
  const int esz = dtype_size(out_dtype);
  // 64 chunks (16384 weights) per thread at least: enough work to pay for the wake-up.
  cpu::parallel_for(0, chunks, 64, kBatchChunks, [&](int64_t c0, int64_t c1) {
    std::vector<float> vals(static_cast<size_t>(kBatchChunks * kChunk24));
    for (int64_t c = c0; c < c1; c += kBatchChunks) {
      const int64_t ce = std::min(c1, c + kBatchChunks);
      decode_chunks(k, packed, positions, S, c, ce, blocksize, cb, rule, scales, offsets,
                    static_cast<char*>(out) + c * 2 * kChunk24 * esz, out_dtype, vals.data());
    }
  });
  return kOk;
}

int sparse24_dequantize_columns_cpu(const uint8_t* packed, const uint8_t* positions, int64_t S, int64_t row0,
                                    int64_t rows, int64_t K, int64_t k0, int64_t cols, int64_t blocksize,
                                    const Codebook& cb, int rule, const BlockScales& scales, const float* offsets,
                                    void* out, int out_dtype) {
  constexpr int64_t kChunkWeights = 2 * kChunk24;
  if (S < 0 || row0 < 0 || rows < 0 || K < 0 || k0 < 0 || cols < 0 || K % kChunkWeights != 0 ||
      k0 % kChunkWeights != 0 || cols % kChunkWeights != 0 || k0 > K || cols > K - k0 || blocksize < 1 ||
      (cb.bits != 4 && cb.bits != 8) || !valid_dtype(out_dtype)) {
    return kInvalidArgument;
  }
  if (rows == 0 || cols == 0) return kOk;
  if (K == 0 || row0 > 2 * S / K || rows > 2 * S / K - row0) return kInvalidArgument;  // rows past the weight's
  const cpu::QuantizeKernels& k = cpu::quantize_kernels();
  const int esz = dtype_size(out_dtype);
  const int64_t row_chunks = cols / kChunkWeights;
  // Rows to a thread task: at least 64 chunks each, as sparse24_dequantize_cpu's.
  const int64_t grain = std::max<int64_t>(1, 64 / row_chunks);
  cpu::parallel_for(0, rows, grain, 1, [&](int64_t r0, int64_t r1) {
    std::vector<float> vals(static_cast<size_t>(kBatchChunks * kChunk24));
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t first = ((row0 + r) * K + k0) / kChunkWeights;  // the row's first chunk in the tile
      char* row_out = static_cast<char*>(out) + r * cols * esz;
      for (int64_t c = 0; c < row_chunks; c += kBatchChunks) {
        const int64_t ce = std::min(row_chunks, c + kBatchChunks);
        decode_chunks(k, packed, positions, S, first + c, first + ce, blocksize, cb, rule, scales, offsets,
                      row_out + c * kChunkWeights * esz, out_dtype, vals.data());
      }
    }
  });
  return kOk;
}

int sparse24_matmul_cpu(const void* x, int x_dtype, int64_t M, int64_t K, int64_t ldx, int64_t N,
                        const uint8_t* packed, const uint8_t* positions, int64_t blocksize, const Codebook& cb,
                        int rule, const BlockScales& scales, const float* offsets, float* y) {
  if (M < 0 || N < 0 || K < 0 || K % 4 != 0 || ldx < K || blocksize < 1 || (cb.bits != 4 && cb.bits != 8) ||
      !valid_dtype(x_dtype)) {
    return kInvalidArgument;
  }
  if (M == 0 || N == 0) return kOk;
  const int64_t S = N * K / 2;
  const int64_t min_rows = std::max<int64_t>(1, 65536 / std::max<int64_t>(K, 1));
  const cpu::Sparse24Kernels& sk = cpu::sparse24_kernels();
  const bool fused = sk.gemv != nullptr && cb.bits == 4 && rule == kAbsmax && K % (2 * kChunk24) == 0 &&
                     (K / 2) % blocksize == 0 && blocksize >= 32 && power_of_two(blocksize);
  std::vector<float> xbuf;
  if (fused) {
    std::fill(y, y + M * N, 0.0f);
    const int64_t ks = K / 2;  // stored values a row
    const int64_t chunks = K / (2 * kChunk24);
    const int64_t per_row = ks / blocksize;
    // Double-quantized scales on a VBMI CPU: decoded in bulk a few rows at a time, the kernel
    // then reading plain ones (per-row gathers, ~27 cycles each on Zen 4 for 16 blocks, were
    // ~15 % of a one-row 2:4 GEMV at K = 4096).
    const std::unique_ptr<cpu::ScalePlanes> planes = chunks > 0 ? cpu::scale_planes(scales, N * per_row) : nullptr;
    // Threads over output rows; in each, the groups of rows of x and the K tiles (tile(mb)
    // chunks long), the ISA row's gemv (gemv or gemv_bf16) on rows xr of stride ld.
    const auto run_fused = [&](auto tile, auto gemv, const auto* xr, int64_t ld) {
      cpu::parallel_for(0, N, min_rows, 1, [&](int64_t n0, int64_t n1) {
        // Weight rows base + [o0, o1), s the scales of the rows from `base` on.
        const auto rows = [&](int64_t base, const BlockScales& s, int64_t o0, int64_t o1) {
          cpu::for_row_groups_and_tiles(M, chunks, tile, [&](int64_t m, int64_t mb, int64_t c0, int64_t c1) {
            gemv(xr + m * ld, mb, ld, K, packed + (base * ks >> 1), positions + (base * ks >> 2), blocksize,
                 cb.table, s, o0, o1, c0, c1, y + m * N + base, N);
          });
        };
        if (planes) {
          cpu::with_bulk_scales(scales, *planes, per_row, n0, n1, [&](int64_t a, int64_t b, const BlockScales& plain) {
            rows(a, plain, 0, b - a);
          });
        } else {
          rows(0, scales, n0, n1);
        }
      });
    };
    if (x_dtype == kBFloat16 && sk.gemv_bf16 != nullptr) {
      // K tiles whose mb rows of x (512 bytes per chunk and row) stay in L1 (~24 KiB), and at
      // most 48 chunks (the kernel's 256-block scale buffer allows 64 at block 32).
      const auto tile = [](int64_t mb) { return std::min<int64_t>(48, std::max<int64_t>(1, 48 / mb)); };
      run_fused(tile, sk.gemv_bf16, static_cast<const uint16_t*>(x), ldx);
      return kOk;
    }
    // float32 kernel: x widened to float32 rows once (exact), weights exact in float32. K tiles
    // whose mb rows of x (1 KiB per chunk and row) stay in L1 (~24 KiB).
    const float* xf = cpu::float_rows(x, x_dtype, M, K, ldx, xbuf);
    const auto tile = [](int64_t mb) { return std::max<int64_t>(1, 24 / mb); };
    run_fused(tile, sk.gemv, xf, x_dtype == kFloat32 ? ldx : K);
    return kOk;
  }
  // Portable path: x as float32 rows, each weight row decoded once for all rows of x.
  const float* xf = cpu::float_rows(x, x_dtype, M, K, ldx, xbuf);
  const int64_t ldxf = x_dtype == kFloat32 ? ldx : K;
  const cpu::QuantizeKernels& k = cpu::quantize_kernels();
  const cpu::GemvKernels& gk = cpu::gemv_kernels();
  cpu::parallel_for(0, N, min_rows, 1, [&](int64_t n0, int64_t n1) {
    std::vector<float> w(static_cast<size_t>(std::max<int64_t>(K, 1)));
    std::vector<float> vals;
    for (int64_t o = n0; o < n1; ++o) {
      decode_weights(k, packed, positions, S, o * K, K, blocksize, cb, rule, scales, offsets, w.data(), vals);
      gk.dot_rows(xf, M, K, ldxf, w.data(), y + o, N);
    }
  });
  return kOk;
}

}  // namespace qengine
