// CPU dequantize-matmul for small batches (the GEMV regime): RowProduct (kernels.h) picks the
// fused 4-bit GEMV of the active gemv row, or decodes each weight row once into an L1-resident
// float32 buffer and dots it with every input row; threads split the output rows. The
// transposed product (backward for x) splits the columns instead.
#include <algorithm>
#include <cstring>
#include <memory>
#include <vector>

#include "cpu/common/thread_pool.h"
#include "cpu/gemv/kernels.h"
#include "cpu/quantize/kernels.h"
#include "qengine/dtype.h"
#include "qengine/ops.h"
#include "qengine/status.h"

namespace qengine {
namespace {

// The fused GEMV reads 128 codes per 64-byte load in dword-nibble order: lane i of step j
// holds element 8i + kNibbleOrder[j] of the chunk (low nibble = odd element, see nibble_at).
constexpr int64_t kGemvChunk = 128;
constexpr int kNibbleOrder[8] = {1, 0, 3, 2, 5, 4, 7, 6};

// The smallest block the fused kernels scale per chunk (chunk_scales in simd_avx512.h): NVFP4's 16.
constexpr int64_t kMinFusedBlocksize = 16;

// Groups of up to kGemvRows rows of x share each decoded weight (the kernel's limit).
constexpr int64_t kGemvRows = 8;

// The bfloat16 GEMV reads the same 64 bytes as 32 words of 4 nibbles: word i of step j holds
// element 4i + kPairOrder[j] of the chunk.
constexpr int kPairOrder[4] = {1, 0, 3, 2};

// K rounded up to whole chunks: a row of x in a fused kernel's order (the last chunk padded).
int64_t padded_k(int64_t K) { return (K + kGemvChunk - 1) / kGemvChunk * kGemvChunk; }

// x copied into a fused kernel's order: for each group of mb <= kGemvRows rows starting at m0,
// stored at xr + m0 * Kp (Kp = padded_k(K)), lane i of step j of chunk c (a chunk start) and
// row m holds
//   xr[m0*Kp + c*mb + (j*mb + m)*kLanes + i] = x[m0 + m][c + kSteps*i + order[j]]
// (kSteps * kLanes = 128), and zero past K. load(e) reads element e of x (row stride ldx).
template <int kSteps, class T, class Load>
std::vector<T> interleave_x(int64_t M, int64_t K, int64_t ldx, const int* order, Load load) {
  constexpr int kLanes = kGemvChunk / kSteps;
  const int64_t Kp = padded_k(K);
  std::vector<T> xr(static_cast<size_t>(M * Kp));  // zeros (the padding)
  for (int64_t m0 = 0; m0 < M; m0 += kGemvRows) {
    const int64_t mb = std::min(kGemvRows, M - m0);
    T* group = xr.data() + m0 * Kp;
    for (int64_t c = 0; c < K; c += kGemvChunk) {
      for (int j = 0; j < kSteps; ++j) {
        for (int64_t m = 0; m < mb; ++m) {
          T* dst = group + c * mb + (j * mb + m) * kLanes;
          for (int i = 0; i < kLanes; ++i) {
            const int64_t e = c + kSteps * i + order[j];
            if (e < K) dst[i] = load((m0 + m) * ldx + e);
          }
        }
      }
    }
  }
  return xr;
}

// The float32 kernel's nibble order (x float32, float16 or bfloat16, widened exactly).
std::vector<float> nibble_order_x(const void* x, int dtype, int64_t M, int64_t K, int64_t ldx) {
  return interleave_x<8, float>(M, K, ldx, kNibbleOrder, [&](int64_t e) { return load_as_float(x, dtype, e); });
}

// The bfloat16 kernel's pair order (x bfloat16, copied bit for bit).
std::vector<uint16_t> bf16_pair_order_x(const uint16_t* x, int64_t M, int64_t K, int64_t ldx) {
  return interleave_x<4, uint16_t>(M, K, ldx, kPairOrder, [&](int64_t e) { return x[e]; });
}

// src[first .. first + n) as float32: src itself when it is float32, else widened into buf.
// One loop per dtype so the compiler vectorises the bfloat16 case (a shift).
const float* float_row(const void* src, int dtype, int64_t first, int64_t n, float* buf) {
  if (dtype == kFloat32) return static_cast<const float*>(src) + first;
  const uint16_t* h = static_cast<const uint16_t*>(src) + first;
  if (dtype == kBFloat16) {
    for (int64_t i = 0; i < n; ++i) buf[i] = bf16_to_float(h[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) buf[i] = half_to_float(h[i]);
  }
  return buf;
}

bool power_of_two(int64_t v) { return v > 0 && (v & (v - 1)) == 0; }

bool valid(int64_t M, int64_t K, int64_t N, int64_t blocksize, const Codebook& cb) {
  return M >= 0 && K >= 0 && N >= 0 && blocksize >= 1 && (cb.bits == 4 || cb.bits == 8);
}

}  // namespace

namespace cpu {

const float* float_rows(const void* x, int dtype, int64_t M, int64_t K, int64_t ldx, std::vector<float>& buf) {
  if (dtype == kFloat32) return static_cast<const float*>(x);
  buf.resize(static_cast<size_t>(M * K));
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t i = 0; i < K; ++i) buf[m * K + i] = load_as_float(x, dtype, m * ldx + i);
  }
  return buf.data();
}

bool valid_product(int x_dtype, int64_t M, int64_t K, int64_t ldx, int64_t N, int64_t blocksize, const Codebook& cb) {
  return valid(M, K, N, blocksize, cb) && ldx >= K && valid_dtype(x_dtype);
}

RowProduct::RowProduct(const void* x, int x_dtype, int64_t M, int64_t K, int64_t ldx, int64_t N,
                       const uint8_t* packed, int64_t blocksize, const Codebook& cb, int rule,
                       const BlockScales& scales, const float* offsets, float* y)
    : k_(gemv_kernels()), x_(x), x_dtype_(x_dtype), M_(M), K_(K), ldx_(ldx), N_(N), packed_(packed),
      blocksize_(blocksize), cb_(cb), rule_(rule), scales_(scales), offsets_(offsets), y_(y) {
  const GemvKernels& k = k_;
  // Enough rows per thread that the decode of a row dominates the bookkeeping.
  min_rows_ = std::max<int64_t>(1, 65536 / std::max<int64_t>(K, 1));
  // K need not be whole chunks: a block size dividing K then divides the tail (K % 128) too,
  // which run_tail takes through the same kernel.
  const bool block_ok = K % blocksize == 0 && blocksize >= kMinFusedBlocksize && power_of_two(blocksize);
  const bool rule_ok = rule == kAbsmax || (rule == kMinmax && offsets != nullptr);
  const bool blocks = cb.bits == 4 && block_ok;
  const bool fused = blocks && rule == kAbsmax && k.gemv4 != nullptr;
  const bool affine = blocks && rule_ok && rule == kMinmax && k.gemv4_affine != nullptr;
  // 8-bit codes: a 256-entry table, looked up with VBMI byte permutes.
  const bool bytes = cb.bits == 8 && block_ok && rule_ok && k.gemv8 != nullptr && vbmi_scales_available();
  kp_ = padded_k(K);
  if (fused && x_dtype == kBFloat16 && k.gemv4_bf16 != nullptr) {
    path_ = Path::kFusedBf16;
    xb_ = bf16_pair_order_x(static_cast<const uint16_t*>(x), M, K, ldx);
  } else if (fused || affine || bytes) {
    path_ = fused ? Path::kFusedFloat : affine ? Path::kFusedAffine : Path::kFused8;
    xf_ = nibble_order_x(x, x_dtype, M, K, ldx);
    if (bytes) table_planes_ = std::make_unique<ScalePlanes>(cb.table);
  } else {
    path_ = Path::kDecodeRows;
    if (x_dtype != kFloat32) {
      float_rows(x, x_dtype, M, K, ldx, xf_);
      ldx_ = K;
    }
  }
  const bool nested = scales.values == nullptr && scales.nested_shift >= 0;
  // NVFP4's E4M3 block-16 and MXFP4's E8M0 block-32 scales: the fused kernels compute them per
  // chunk (ComputedScales in simd_avx512.h), faster than decoding 8 or 4 scales per 128 codes
  // in bulk and reading them back.
  scales_.table_kind = nested ? scale_table_kind(scales.table) : kTableRead;
  const bool computed_scales = (scales_.table_kind == kTableE4m3 && blocksize == 16) ||
                               (scales_.table_kind == kTableE8m0 && blocksize == 32);
  if (path_ != Path::kDecodeRows && !computed_scales) planes_ = scale_planes(scales, N * (K / blocksize));
}

void RowProduct::run(int64_t n0, int64_t n1) const {
  for (int64_t m = 0; m < M_; ++m) std::fill(y_ + m * N_ + n0, y_ + m * N_ + n1, 0.0f);
  const GemvKernels& k = k_;
  if (path_ == Path::kDecodeRows) {
    const QuantizeKernels& q = quantize_kernels();
    const float* xf = xf_.empty() ? static_cast<const float*>(x_) : xf_.data();
    std::vector<float> w(static_cast<size_t>(std::max<int64_t>(K_, 1)));
    for (int64_t o = n0; o < n1; ++o) {
      decode_span(q, packed_, o * K_, K_, blocksize_, cb_, rule_, scales_, offsets_, w.data(), kFloat32, false);
      k.dot_rows(xf, M_, K_, ldx_, w.data(), y_ + o, N_);
    }
    return;
  }
  // Groups of up to kGemvRows rows of x share each decoded weight. K tiles span at most 256
  // blocks of scales (the kernels' per-tile buffer; 64 chunks at block 32, 32 at block 16). The float32 kernel's
  // tiles keep a group's slice of x in L1 (~24 KiB) while all rows pass; the bfloat16 kernel
  // reads x from L2 at no measurable cost, so it takes the longest tiles (each tile ends in a
  // horizontal sum per row of x and of W, which short tiles would repeat).
  constexpr int64_t kL1Bytes = 24576;
  const int64_t max_chunks = std::min<int64_t>(64, blocksize_ * 256 / kGemvChunk);  // 256: kMaxTileBlocks
  const int64_t chunks = K_ / kGemvChunk;  // whole chunks (run_tail: the rest)
  const auto tile = [&](int64_t mb) {
    return path_ == Path::kFusedBf16
               ? max_chunks
               : std::min<int64_t>({48, max_chunks, std::max<int64_t>(1, kL1Bytes / (mb * kGemvChunk * 4))});
  };
  // Rows [o0, o1) of W (the kernels' row numbers) against every row of x.
  const auto rows = [&](const uint8_t* packed, const BlockScales& scales, const float* offsets, int64_t o0,
                        int64_t o1, float* y) {
    for_row_groups_and_tiles(M_, chunks, tile, [&](int64_t m, int64_t mb, int64_t c0, int64_t c1) {
      fused_kernel(m * kp_, mb, K_, packed, scales, offsets, o0, o1, c0, c1, y + m * N_);
    });
  };
  if (!planes_) {
    rows(packed_, scales_, offsets_, n0, n1, y_);
  } else {
    const int64_t per_row = K_ / blocksize_;
    with_bulk_scales(scales_, *planes_, per_row, n0, n1, [&](int64_t a, int64_t b, const BlockScales& plain) {
      rows(packed_ + a * K_ * cb_.bits / 8, plain, offsets_ ? offsets_ + a * per_row : nullptr, 0, b - a, y_ + a);
    });
  }
  // After the whole chunks, whose stream brought the tails into cache.
  if (K_ % kGemvChunk != 0) run_tail(n0, n1);
}

void RowProduct::fused_kernel(int64_t x_offset, int64_t mb, int64_t codes_per_row, const uint8_t* packed,
                              const BlockScales& scales, const float* offsets, int64_t o0, int64_t o1, int64_t c0,
                              int64_t c1, float* y) const {
  const GemvKernels& k = k_;
  if (path_ == Path::kFusedBf16) {
    k.gemv4_bf16(xb_.data() + x_offset, mb, codes_per_row, packed, blocksize_, cb_.table, scales, o0, o1, c0, c1, y,
                 N_);
  } else if (path_ == Path::kFusedAffine) {
    k.gemv4_affine(xf_.data() + x_offset, mb, codes_per_row, packed, blocksize_, cb_.table, scales, offsets, o0, o1,
                   c0, c1, y, N_);
  } else if (path_ == Path::kFused8) {
    k.gemv8(xf_.data() + x_offset, mb, codes_per_row, packed, blocksize_, *table_planes_, scales,
            rule_ == kMinmax ? offsets : nullptr, o0, o1, c0, c1, y, N_);
  } else {
    k.gemv4(xf_.data() + x_offset, mb, codes_per_row, packed, blocksize_, cb_.table, scales, o0, o1, c0, c1, y, N_);
  }
}

// The last t = K % 128 codes of rows [n0, n1) (t a multiple of the block size, so whole
// blocks): copied a batch of rows at a time into zero-padded one-chunk rows (64 bytes each, 128 for 8-bit codes)
// with their blocks' scales decoded beside them (0 for the padding's blocks), then multiplied
// by the same fused kernel against x's padded last chunk (zeros past K), so the padding adds
// exact zeros (the affine path's padding has offset 0 too). The copy is t/2 bytes a row (t for 8-bit codes); the
// kernel then reads it from L1.
void RowProduct::run_tail(int64_t n0, int64_t n1) const {
  constexpr int64_t kBatch = 64;
  constexpr int64_t kMaxChunkBlocks = kGemvChunk / kMinFusedBlocksize;
  const int64_t full = K_ / kGemvChunk * kGemvChunk, tail = K_ - full;
  const int64_t chunk_blocks = kGemvChunk / blocksize_, tail_blocks = tail / blocksize_;
  const int64_t blocks_per_row = K_ / blocksize_, first_block = full / blocksize_;
  const int64_t chunk_bytes = kGemvChunk * cb_.bits / 8, tail_bytes = tail * cb_.bits / 8;
  alignas(64) uint8_t codes[kBatch * kGemvChunk];  // 8-bit codes at most
  alignas(64) float scales[kBatch * kMaxChunkBlocks];
  alignas(64) float offsets[kBatch * kMaxChunkBlocks];  // the affine path's (0 in the padding too)
  const BlockScales plain{scales, nullptr, nullptr, nullptr, 1, 0.0f, 0};
  const bool affine = rule_ == kMinmax;
  // A row's tail codes and scale bytes, fetched a batch ahead: rows far apart in memory (and,
  // after a long run of rows, no longer in cache) would each wait for DRAM in the copy.
  const auto prefetch_rows = [&](int64_t r0, int64_t r1) {
    for (int64_t o = r0; o < r1; ++o) {
      __builtin_prefetch(packed_ + (o * K_ + full) * cb_.bits / 8);
      __builtin_prefetch(packed_ + (o * K_ + K_) * cb_.bits / 8 - 1);
      const int64_t b = o * blocks_per_row + first_block;
      if (scales_.values != nullptr) __builtin_prefetch(scales_.values + b);
      else __builtin_prefetch(scales_.codes + b);
    }
  };
  prefetch_rows(n0, std::min(n1, n0 + kBatch));
  for (int64_t a = n0; a < n1; a += kBatch) {
    const int64_t count = std::min(kBatch, n1 - a);
    std::fill(codes, codes + count * chunk_bytes, uint8_t{0});
    std::fill(scales, scales + count * chunk_blocks, 0.0f);
    if (affine) std::fill(offsets, offsets + count * chunk_blocks, 0.0f);
    for (int64_t r = 0; r < count; ++r) {
      const int64_t o = a + r;
      std::memcpy(codes + r * chunk_bytes, packed_ + (o * K_ + full) * cb_.bits / 8, static_cast<size_t>(tail_bytes));
      for (int64_t b = 0; b < tail_blocks; ++b) {
        scales[r * chunk_blocks + b] = block_scale(scales_, o * blocks_per_row + first_block + b);
        if (affine) offsets[r * chunk_blocks + b] = offsets_[o * blocks_per_row + first_block + b];
      }
    }
    prefetch_rows(a + count, std::min(n1, a + count + kBatch));
    for (int64_t m = 0; m < M_; m += kGemvRows) {
      const int64_t mb = std::min(kGemvRows, M_ - m);
      // The group's padded last chunk of x (at chunk index full / 128) is the one chunk here.
      fused_kernel(m * kp_ + full * mb, mb, kGemvChunk, codes, plain, offsets, 0, count, 0, 1, y_ + m * N_ + a);
    }
  }
}

}  // namespace cpu

int matmul_cpu(const void* x, int x_dtype, int64_t M, int64_t K, int64_t ldx, int64_t N, const uint8_t* packed,
               int64_t blocksize, const Codebook& cb, int rule, const BlockScales& scales, const float* offsets,
               float* y) {
  if (!cpu::valid_product(x_dtype, M, K, ldx, N, blocksize, cb)) return kInvalidArgument;
  if (M == 0 || N == 0) return kOk;
  const cpu::RowProduct product(x, x_dtype, M, K, ldx, N, packed, blocksize, cb, rule, scales, offsets, y);
  // Row chunks claimed by the threads as they go (a thread held up elsewhere takes fewer), of
  // up to 64 rows: a chunk's packed weights stay in L2 while a second group of x rows passes.
  const int64_t chunk = std::max(product.min_rows(), std::min<int64_t>(64, N / (4 * cpu::num_threads())));
  cpu::parallel_chunks(0, N, chunk, [&](int64_t n0, int64_t n1) { product.run(n0, n1); });
  return kOk;
}

int matmul_t_cpu(const float* g, int64_t M, int64_t N, int64_t K, const uint8_t* packed, int64_t blocksize,
                 const Codebook& cb, int rule, const BlockScales& scales, const float* offsets, float* gx) {
  if (!valid(M, K, N, blocksize, cb)) return kInvalidArgument;
  if (M == 0 || K == 0) return kOk;
  std::fill(gx, gx + M * K, 0.0f);
  if (N == 0) return kOk;
  const cpu::QuantizeKernels& q = cpu::quantize_kernels();
  const cpu::GemvKernels& k = cpu::gemv_kernels();
  // Column ranges: no two threads write the same output element, no reduction needed.
  cpu::parallel_for(0, K, 256, 64, [&](int64_t k0, int64_t k1) {
    std::vector<float> w(static_cast<size_t>(k1 - k0));
    for (int64_t o = 0; o < N; ++o) {
      cpu::decode_span(q, packed, o * K + k0, k1 - k0, blocksize, cb, rule, scales, offsets, w.data(), kFloat32,
                       false);
      k.axpy_rows(g + o, M, N, w.data(), k1 - k0, gx + k0, K);
    }
  });
  return kOk;
}

int cast_float_cpu(const float* src, int64_t n, void* dst, int dst_dtype) {
  if (n < 0 || !valid_dtype(dst_dtype)) return kInvalidArgument;
  cpu::parallel_for(0, n, 1 << 16, 64, [&](int64_t lo, int64_t hi) {
    if (dst_dtype == kFloat32) {
      std::copy(src + lo, src + hi, static_cast<float*>(dst) + lo);
    } else if (dst_dtype == kBFloat16) {
      uint16_t* d = static_cast<uint16_t*>(dst);
      for (int64_t i = lo; i < hi; ++i) d[i] = float_to_bf16(src[i]);
    } else {
      for (int64_t i = lo; i < hi; ++i) store_from_float(dst, dst_dtype, i, src[i]);
    }
  });
  return kOk;
}

int lora_epilogue_cpu(const void* x_in, int x_dtype, int64_t M, int64_t K, const void* a, const void* b, int ab_dtype,
                      int64_t R, int64_t N, float scale, float* y) {
  if (M < 0 || K < 0 || R < 0 || N < 0 || !valid_dtype(ab_dtype) || !valid_dtype(x_dtype)) return kInvalidArgument;
  if (M == 0 || N == 0 || R == 0) return kOk;
  const cpu::GemvKernels& k = cpu::gemv_kernels();
  std::vector<float> xbuf;
  const float* x = cpu::float_rows(x_in, x_dtype, M, K, K, xbuf);
  // t[m, j] = x[m] . a[j]: R dot products per row of x (a widened to float32 a row at a time,
  // so half-precision adapters need no conversion pass in torch).
  std::vector<float> t(static_cast<size_t>(M * R));
  std::vector<float> row(static_cast<size_t>(K));
  for (int64_t j = 0; j < R; ++j) {
    k.dot_rows(x, M, K, K, float_row(a, ab_dtype, j * K, K, row.data()), t.data() + j, R);
  }
  // y[m, o] += scale * t[m] . b[o], threads over output columns: a tile of b widened once,
  // then one short dot product per (row of x, output column).
  constexpr int64_t kTile = 256;
  cpu::parallel_for(0, N, 1024, 1, [&](int64_t o0, int64_t o1) {
    std::vector<float> bt(static_cast<size_t>(kTile * R));
    float z[kTile];
    for (int64_t c = o0; c < o1; c += kTile) {
      const int64_t rows = std::min(kTile, o1 - c);
      const float* bf = float_row(b, ab_dtype, c * R, rows * R, bt.data());
      for (int64_t m = 0; m < M; ++m) {
        k.dot_rows(bf, rows, R, R, t.data() + m * R, z, 1);
        float* ym = y + m * N + c;
        for (int64_t i = 0; i < rows; ++i) ym[i] += scale * z[i];
      }
    }
  });
  return kOk;
}

}  // namespace qengine
