// CPU blockwise dequantization driver: threads over contiguous element ranges, each split
// at block boundaries and decoded by the per-ISA kernel.
#include <algorithm>

#include "cpu/quantize/kernels.h"
#include "cpu/common/memory.h"
#include "cpu/common/thread_pool.h"
#include "qengine/ops.h"
#include "qengine/status.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

namespace qengine {

namespace cpu {

void decode_span(const QuantizeKernels& k, const uint8_t* packed, int64_t first, int64_t count, int64_t blocksize,
                 const Codebook& cb, int rule, const BlockScales& scales, const float* offsets, void* out,
                 int out_dtype, bool stream) {
  const int esz = dtype_size(out_dtype);
  for (int64_t i = first; i < first + count;) {
    const int64_t b = i / blocksize;
    const int64_t end = std::min(first + count, (b + 1) * blocksize);
    const float offset = rule == kMinmax ? offsets[b] : 0.0f;
    k.decode(packed, i, end - i, cb, block_scale(scales, b), offset, rule,
             static_cast<char*>(out) + (i - first) * esz, out_dtype, stream);
    i = end;
  }
}

}  // namespace cpu

// Outputs larger than this bypass the caches (non-temporal stores): they will not be read
// back before being evicted, and skipping the read-for-ownership saves a third of the traffic.
constexpr int64_t kStreamBytes = 8 << 20;

int dequantize_cpu(const uint8_t* packed, int64_t n, int64_t blocksize, const Codebook& cb, int rule,
                   const BlockScales& scales, const float* offsets, void* out, int out_dtype, bool stream) {
  return dequantize_range_cpu(packed, 0, n, blocksize, cb, rule, scales, offsets, out, out_dtype, stream);
}

namespace {

// Whole blocks [b, b + count) into out by the ISA's block loop. Double-quantized scales are
// decoded (block_scale's bits) into a small buffer first, kScaleBatch blocks at a time, and the
// loop runs on that buffer from its block 0.
constexpr int64_t kScaleBatch = 256;

void decode_whole_blocks(const cpu::QuantizeKernels& k, const uint8_t* packed, int64_t b, int64_t count,
                         int64_t blocksize, const Codebook& cb, int rule, const BlockScales& scales,
                         const float* offsets, char* out, int out_dtype, bool stream) {
  if (scales.values != nullptr) {
    k.decode_blocks4(packed, b, count, blocksize, cb.table, rule, scales.values, offsets, out, out_dtype, stream);
    return;
  }
  const int64_t block_bytes = static_cast<int64_t>(dtype_size(out_dtype)) * blocksize;
  float decoded[kScaleBatch];
  for (int64_t done = 0; done < count; done += kScaleBatch) {
    const int64_t first = b + done;
    const int64_t n = std::min(kScaleBatch, count - done);
    for (int64_t i = 0; i < n; ++i) decoded[i] = block_scale(scales, first + i);
    k.decode_blocks4(packed + ((first * blocksize) >> 1), 0, n, blocksize, cb.table, rule, decoded,
                     offsets != nullptr ? offsets + first : nullptr, out + done * block_bytes, out_dtype, stream);
  }
}

// Elements [i, end) into out: whole blocks by the batched path where the range reaches them,
// the partial blocks at either end one block at a time.
void decode_range(const cpu::QuantizeKernels& k, const uint8_t* packed, int64_t i, int64_t end, int64_t blocksize,
                  const Codebook& cb, int rule, const BlockScales& scales, const float* offsets, char* out,
                  int out_dtype, bool stream) {
  const int esz = dtype_size(out_dtype);
  if (k.decode_blocks4 != nullptr && cb.bits == 4 && blocksize % 32 == 0) {
    const int64_t head_end = std::min(end, (i + blocksize - 1) / blocksize * blocksize);
    cpu::decode_span(k, packed, i, head_end - i, blocksize, cb, rule, scales, offsets, out, out_dtype, stream);
    out += (head_end - i) * esz;
    i = head_end;
    const int64_t full = (end - i) / blocksize;  // whole blocks from i (a block boundary, or end)
    if (full > 0) {
      decode_whole_blocks(k, packed, i / blocksize, full, blocksize, cb, rule, scales, offsets, out, out_dtype, stream);
      out += full * blocksize * esz;
      i += full * blocksize;
    }
  }
  cpu::decode_span(k, packed, i, end - i, blocksize, cb, rule, scales, offsets, out, out_dtype, stream);
}

}  // namespace

int dequantize_range_cpu(const uint8_t* packed, int64_t first, int64_t n, int64_t blocksize, const Codebook& cb,
                         int rule, const BlockScales& scales, const float* offsets, void* out, int out_dtype,
                         bool allow_stream) {
  if (n < 0 || first < 0 || blocksize < 1 || (cb.bits != 4 && cb.bits != 8) || !valid_dtype(out_dtype)) {
    return kInvalidArgument;
  }
  if (n == 0) return kOk;
  const cpu::QuantizeKernels& k = cpu::quantize_kernels();
  const int esz = dtype_size(out_dtype);
  const bool stream = allow_stream && n * esz >= kStreamBytes;
  if (!allow_stream) cpu::advise_huge_pages(out, static_cast<size_t>(n * esz));  // a fresh output
  // Thread ranges start on block boundaries where possible (whole blocks take the batched
  // path), else on 64 elements: a whole byte and cache line.
  const int64_t align = (first == 0 && blocksize % 64 == 0) ? blocksize : 64;
  cpu::parallel_for(0, n, 32768, align, [&](int64_t lo, int64_t hi) {
    decode_range(k, packed, first + lo, first + hi, blocksize, cb, rule, scales, offsets,
                 static_cast<char*>(out) + lo * esz, out_dtype, stream);
#if defined(__x86_64__) || defined(_M_X64)
    if (stream) _mm_sfence();  // order the non-temporal stores before the caller reads
#endif
  });
  return kOk;
}

int dequantize_columns_cpu(const uint8_t* packed, int64_t rows, int64_t K, int64_t k0, int64_t cols,
                           int64_t blocksize, const Codebook& cb, int rule, const BlockScales& scales,
                           const float* offsets, void* out, int out_dtype) {
  if (rows < 0 || K < 0 || k0 < 0 || cols < 0 || k0 > K || cols > K - k0 || blocksize < 1 ||
      (cb.bits != 4 && cb.bits != 8) || !valid_dtype(out_dtype)) {
    return kInvalidArgument;
  }
  if (rows == 0 || cols == 0) return kOk;
  if (cols == K) return dequantize_range_cpu(packed, 0, rows * K, blocksize, cb, rule, scales, offsets, out, out_dtype);
  const cpu::QuantizeKernels& k = cpu::quantize_kernels();
  const int esz = dtype_size(out_dtype);
  // Rows to a thread task: at least ~32K elements each, as dequantize_range_cpu's ranges.
  const int64_t grain = std::max<int64_t>(1, 32768 / cols);
  cpu::parallel_for(0, rows, grain, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t first = r * K + k0;
      decode_range(k, packed, first, first + cols, blocksize, cb, rule, scales, offsets,
                   static_cast<char*>(out) + r * cols * esz, out_dtype, false);
    }
  });
  return kOk;
}

}  // namespace qengine
