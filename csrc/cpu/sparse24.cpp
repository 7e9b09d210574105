// CPU kernels of the 2:4 sparse layout (byte order in sparse24.h): dequantize (decode the
// stored span with the dense per-ISA decoder, scatter by position, zeros elsewhere) and the
// small-batch matmul: the AVX512-BF16 GEMV for 4-bit absmax codes with bfloat16 activations,
// and a portable path (decode a row, dot it with every row of x) for everything else.
#include <algorithm>
#include <cstring>
#include <vector>

#include "cpu/kernels.h"
#include "cpu/sparse24.h"
#include "cpu/thread_pool.h"
#include "qengine/dtype.h"
#include "qengine/ops.h"
#include "qengine/status.h"

namespace qengine {
namespace {

using cpu::kChunk24;

// Decodes chunk c of the S stored values into dense float32 weights w[0 .. 2 * len) (len the
// chunk's stored count, returned), exact zeros at the pruned positions.
int64_t decode_chunk(const cpu::Kernels& k, const uint8_t* packed, const uint8_t* positions, int64_t S, int64_t c,
                     int64_t blocksize, const Codebook& cb, int rule, const BlockScales& scales,
                     const float* offsets, float* w) {
  const int64_t s0 = c * kChunk24;
  const int64_t len = std::min(kChunk24, S - s0);
  float vals[kChunk24];
  cpu::decode_span(k, packed, s0, len, blocksize, cb, rule, scales, offsets, vals, kFloat32, false);
  std::fill(w, w + 2 * len, 0.0f);
  const uint8_t* pos = positions + s0 / 4;
  if (len == kChunk24) {
    for (int e = 0; e < kChunk24; ++e) {
      const int v = cpu::natural_of_storage24(e);
      const int p = (pos[v & 31] >> (2 * (v >> 5))) & 3;
      w[4 * (v >> 1) + p] = vals[e];
    }
  } else {
    for (int64_t v = 0; v < len; ++v) {
      const int p = (pos[v >> 2] >> (2 * (v & 3))) & 3;
      w[4 * (v >> 1) + p] = vals[v];
    }
  }
  return len;
}

// Dense float32 weights [first, first + count) (both multiples of 4) into out.
void decode_weights(const cpu::Kernels& k, const uint8_t* packed, const uint8_t* positions, int64_t S,
                    int64_t first, int64_t count, int64_t blocksize, const Codebook& cb, int rule,
                    const BlockScales& scales, const float* offsets, float* out) {
  float w[2 * kChunk24];
  for (int64_t i = first; i < first + count;) {
    const int64_t c = i / (2 * kChunk24);
    const int64_t base = c * 2 * kChunk24;
    const int64_t len = 2 * decode_chunk(k, packed, positions, S, c, blocksize, cb, rule, scales, offsets, w);
    const int64_t end = std::min(first + count, base + len);
    std::memcpy(out + (i - first), w + (i - base), static_cast<size_t>(end - i) * sizeof(float));
    i = end;
  }
}

bool valid_dtype(int dtype) { return dtype == kFloat32 || dtype == kFloat16 || dtype == kBFloat16; }

bool power_of_two(int64_t v) { return v > 0 && (v & (v - 1)) == 0; }

}  // namespace

int sparse24_dequantize_cpu(const uint8_t* packed, const uint8_t* positions, int64_t S, int64_t blocksize,
                            const Codebook& cb, int rule, const float* scales, const float* offsets, void* out,
                            int out_dtype) {
  if (S < 0 || S % 2 != 0 || blocksize < 1 || (cb.bits != 4 && cb.bits != 8) || !valid_dtype(out_dtype)) {
    return kInvalidArgument;
  }
  if (S == 0) return kOk;
  const cpu::Kernels& k = cpu::kernels();
  const BlockScales plain{scales, nullptr, nullptr, nullptr, 1, 0.0f, 0};
  const int64_t chunks = (S + kChunk24 - 1) / kChunk24;
  const int esz = dtype_size(out_dtype);
  // 64 chunks (16384 weights) per thread at least: enough work to pay for the wake-up.
  cpu::parallel_for(0, chunks, 64, 1, [&](int64_t c0, int64_t c1) {
    float w[2 * kChunk24];
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t n = 2 * decode_chunk(k, packed, positions, S, c, blocksize, cb, rule, plain, offsets, w);
      char* dst = static_cast<char*>(out) + c * 2 * kChunk24 * esz;
      if (out_dtype == kFloat32) {
        std::memcpy(dst, w, static_cast<size_t>(n) * sizeof(float));
      } else {
        for (int64_t i = 0; i < n; ++i) store_from_float(dst, out_dtype, i, w[i]);
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
  const cpu::Kernels& k = cpu::kernels();
  const int64_t S = N * K / 2;
  const int64_t min_rows = std::max<int64_t>(1, 65536 / std::max<int64_t>(K, 1));
#if defined(__x86_64__) || defined(_M_X64)
  const bool fused = std::strcmp(k.name, "avx512_bf16") == 0 && x_dtype == kBFloat16 && cb.bits == 4 &&
                     rule == kAbsmax && K % (2 * kChunk24) == 0 && (K / 2) % blocksize == 0 && blocksize >= 32 &&
                     power_of_two(blocksize);
  if (fused) {
    std::fill(y, y + M * N, 0.0f);
    const int64_t chunks = K / (2 * kChunk24);
    const uint16_t* xb = static_cast<const uint16_t*>(x);
    cpu::parallel_for(0, N, min_rows, 1, [&](int64_t n0, int64_t n1) {
      for (int64_t m = 0; m < M; m += 8) {
        const int64_t mb = std::min<int64_t>(8, M - m);
        // K tiles whose mb rows of x (512 bytes per chunk and row) stay in L1 (~24 KiB), and
        // at most 64 chunks (the kernel's 256-block scale buffer at block 32).
        const int64_t tile = std::min<int64_t>(48, std::max<int64_t>(1, 48 / mb));
        for (int64_t c = 0; c < chunks; c += tile) {
          cpu::avx512bf16_sparse24_gemv(xb + m * ldx, mb, ldx, K, packed, positions, blocksize, cb.table, scales,
                                        n0, n1, c, std::min(chunks, c + tile), y + m * N, N);
        }
      }
    });
    return kOk;
  }
#endif
  // Portable path: x as float32 rows, each weight row decoded once for all rows of x.
  std::vector<float> buf;
  const float* xf = static_cast<const float*>(x);
  int64_t ldxf = ldx;
  if (x_dtype != kFloat32) {
    buf.resize(static_cast<size_t>(M * K));
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t i = 0; i < K; ++i) buf[m * K + i] = load_as_float(x, x_dtype, m * ldx + i);
    }
    xf = buf.data();
    ldxf = K;
  }
  cpu::parallel_for(0, N, min_rows, 1, [&](int64_t n0, int64_t n1) {
    std::vector<float> w(static_cast<size_t>(std::max<int64_t>(K, 1)));
    for (int64_t o = n0; o < n1; ++o) {
      decode_weights(k, packed, positions, S, o * K, K, blocksize, cb, rule, scales, offsets, w.data());
      k.dot_rows(xf, M, K, ldxf, w.data(), y + o, N);
    }
  });
  return kOk;
}

}  // namespace qengine
