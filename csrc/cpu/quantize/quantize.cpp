// CPU blockwise quantization driver: threads over blocks, per-ISA encode, nibble packing.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>

#include "cpu/quantize/kernels.h"
#include "cpu/common/memory.h"
#include "cpu/common/thread_pool.h"
#include "qengine/ops.h"
#include "qengine/status.h"

namespace qengine {
namespace {

// Elements encoded per inner step: the codes stay in L1 before they are packed.
constexpr int64_t kChunk = 1024;

// Writes codes[0..count) as nibbles of elements first..first+count. A byte shared with the
// previous element (odd first) is read-modify-written; a trailing lone element writes its
// high nibble and clears the low one (the next element, if any, is written by the same
// thread later, see the alignment in quantize_cpu).
void pack_nibbles(const uint8_t* codes, int64_t count, uint8_t* packed, int64_t first) {
  int64_t j = 0;
  if ((first & 1) && count > 0) {
    uint8_t& b = packed[first >> 1];
    b = static_cast<uint8_t>((b & 0xf0) | codes[0]);
    j = 1;
  }
  uint8_t* dst = packed + ((first + j) >> 1);
  int64_t pairs = (count - j) / 2;
  for (int64_t k = 0; k < pairs; ++k) dst[k] = pack_pair(codes[j + 2 * k], codes[j + 2 * k + 1]);
  j += 2 * pairs;
  if (j < count) dst[pairs] = static_cast<uint8_t>(codes[j] << 4);
}

// The grid rule (bitsandbytes' quantize_blockwise): x * (1 / absmax) for every block, looked
// up on a 65536-point grid; an all-zero block gets code 0 everywhere.
int quantize_grid_block(const cpu::QuantizeKernels& k, const char* src, int dtype, int64_t len, const Codebook& cb,
                        uint8_t* codes_out, float* scale_out) {
  BlockStats st;
  k.block_stats(src, dtype, len, &st);
  if (st.nonfinite) return kNonFiniteInput;
  *scale_out = st.absmax;
  if (st.absmax == 0.0f) {
    std::memset(codes_out, 0, static_cast<size_t>(len));
    return kOk;
  }
  const float inv = 1.0f / st.absmax;
  for (int64_t i = 0; i < len; ++i) codes_out[i] = cb.grid_lut[grid_index(load_as_float(src, dtype, i) * inv)];
  return kOk;
}

}  // namespace

int quantize_cpu(const void* x, int dtype, int64_t n, int64_t blocksize, const Codebook& cb, int rule,
                 uint8_t* packed, float* scales, float* offsets) {
  if (n < 0 || blocksize < 1 || (cb.bits != 4 && cb.bits != 8)) return kInvalidArgument;
  if (cb.grid_lut != nullptr && (cb.bits != 8 || rule != kAbsmax)) return kInvalidArgument;
  if (n == 0) return kOk;
  const cpu::QuantizeKernels& k = cpu::quantize_kernels();
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
  const int esz = dtype_size(dtype);
  std::atomic<int> status{kOk};
  cpu::advise_huge_pages(packed, static_cast<size_t>((n * cb.bits + 7) / 8));  // a fresh output
  // With odd block sizes two blocks can share a byte: ranges start at even blocks so a shared
  // byte is always written by one thread.
  const int64_t align = (cb.bits == 4 && (blocksize & 1)) ? 2 : 1;
  const int64_t min_blocks = (16384 + blocksize - 1) / blocksize;
  cpu::parallel_for(0, nblocks, min_blocks, align, [&](int64_t b0, int64_t b1) {
    alignas(64) uint8_t codes[kChunk];
    int64_t b = b0;
    if (k.quantize_blocks4 != nullptr && cb.bits == 4 && cb.grid_lut == nullptr && blocksize % 32 == 0) {
      const int64_t full_end = std::min(b1, n / blocksize);  // the fast path takes full blocks only
      if (full_end > b) {
        int s = k.quantize_blocks4(x, dtype, blocksize, b, full_end, cb, rule, packed, scales, offsets);
        if (s != kOk) {
          status.store(s);
          return;
        }
        b = full_end;
      }
    }
    for (; b < b1; ++b) {
      const int64_t start = b * blocksize;
      const int64_t len = std::min(blocksize, n - start);
      const char* src = static_cast<const char*>(x) + start * esz;
      if (cb.grid_lut != nullptr) {  // 8-bit only (checked by the caller)
        int s = quantize_grid_block(k, src, dtype, len, cb, packed + start, scales + b);
        if (s != kOk) {
          status.store(s);
          return;
        }
        continue;
      }
      BlockStats st;
      k.block_stats(src, dtype, len, &st);
      if (st.nonfinite) {
        status.store(kNonFiniteInput);
        return;
      }
      BlockNorm norm = make_block_norm(st, rule, len < blocksize);
      if (!std::isfinite(norm.scale)) {
        status.store(kScaleOverflow);
        return;
      }
      scales[b] = norm.scale;
      if (rule == kMinmax) offsets[b] = norm.offset;
      for (int64_t c = 0; c < len; c += kChunk) {
        const int64_t m = std::min(kChunk, len - c);
        k.encode(src + c * esz, dtype, m, norm, rule, cb, codes);
        if (cb.bits == 8) std::memcpy(packed + start + c, codes, m);
        else pack_nibbles(codes, m, packed, start + c);
      }
    }
  });
  // An odd count leaves a padding nibble: bitsandbytes pads with the code of 0.0.
  if (status.load() == kOk && cb.bits == 4 && (n & 1)) {
    uint8_t& last = packed[n >> 1];
    last = static_cast<uint8_t>((last & 0xf0) | encode_value(0.0f, cb));
  }
  return status.load();
}

}  // namespace qengine
