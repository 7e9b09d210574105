// CUDA blockwise quantization: a statistics pass (scales, offsets, error flags) and an encode
// pass (packed codes). Mirrors cpu/quantize/quantize.cpp through the shared maths of quant_math.h, so
// the bytes (codes, float32 scales, offsets, odd-count padding) equal the CPU's.
#include <cstdint>

#include "cuda/check.h"
#include "qengine/ops.h"

namespace qengine {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// Blocks up to this size get one warp each (8 blocks per CTA: block sizes 32..1024 keep every
// lane busy); larger ones (per-row, per-tensor) get the whole CTA so one block is not a
// single warp's serial walk over thousands of elements.
constexpr int64_t kWarpBlockMax = 1024;
// Grid caps (grid-stride loops cover the rest): far below gridDim.x's 2^31 - 1 and enough
// CTAs to fill any current GPU many times over.
constexpr int64_t kMaxGrid = 1 << 20;

// Error flags, OR-ed by the statistics pass; the host turns them into a Status afterwards.
constexpr int kFlagNonFinite = 1;
constexpr int kFlagOverflow = 2;

struct Stats {
  float mn, mx;
  bool nonfinite;
};

// Folds o into s with the CPU's comparisons: min/max are exact, so any order gives the CPU's
// values (up to the sign of a zero minimum, which no ISA fixes either); NaN is only flagged.
__device__ __forceinline__ void merge(Stats& s, const Stats& o) {
  s.mn = o.mn < s.mn ? o.mn : s.mn;
  s.mx = o.mx > s.mx ? o.mx : s.mx;
  s.nonfinite = s.nonfinite || o.nonfinite;
}

__device__ __forceinline__ Stats warp_reduce(Stats s) {
  for (int d = 16; d > 0; d >>= 1) {
    Stats o;
    o.mn = __shfl_xor_sync(0xffffffffu, s.mn, d);
    o.mx = __shfl_xor_sync(0xffffffffu, s.mx, d);
    o.nonfinite = __shfl_xor_sync(0xffffffffu, static_cast<int>(s.nonfinite), d) != 0;
    merge(s, o);
  }
  return s;
}

// One group of `group_warps` warps (1 or kWarps) per quantization block. Writes the block's
// stored scale (and offset) exactly as quantize_cpu does, or raises a flag.
__global__ void __launch_bounds__(kThreads) stats_kernel(const void* __restrict__ x, int dtype, int64_t n,
                                                         int64_t blocksize, int64_t nblocks, int rule, bool grid_rule,
                                                         int group_warps, float* __restrict__ scales,
                                                         float* __restrict__ offsets, int* __restrict__ flags) {
  __shared__ Stats partial[kWarps];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int groups = kWarps / group_warps;          // blocks per CTA per round
  const int group = warp / group_warps;
  const int t = threadIdx.x - group * group_warps * 32;  // thread index within the group
  const int group_threads = group_warps * 32;
  // The loop bound is uniform across a multi-warp group (groups == 1), so __syncthreads is safe.
  for (int64_t b0 = static_cast<int64_t>(blockIdx.x) * groups; b0 < nblocks; b0 += static_cast<int64_t>(gridDim.x) * groups) {
    const int64_t b = b0 + group;
    const bool active = b < nblocks;
    const int64_t start = b * blocksize;
    const int64_t len = active ? (n - start < blocksize ? n - start : blocksize) : 0;
    Stats s{__int_as_float(0x7f800000), __int_as_float(0xff800000), false};  // +inf, -inf
    for (int64_t i = t; i < len; i += group_threads) {
      const float v = load_as_float(x, dtype, start + i);
      s.nonfinite = s.nonfinite || !isfinite(v);
      s.mn = v < s.mn ? v : s.mn;
      s.mx = v > s.mx ? v : s.mx;
    }
    s = warp_reduce(s);
    if (group_warps > 1) {
      if (lane == 0) partial[warp] = s;
      __syncthreads();
      if (t == 0) {
        for (int w = 1; w < group_warps; ++w) merge(s, partial[w]);
      }
      __syncthreads();  // partial is reused by the next round
    }
    if (!active || t != 0) continue;
    if (s.nonfinite) {
      atomicOr(flags, kFlagNonFinite);
      continue;
    }
    const float absmax = fmaxf(fabsf(s.mn), fabsf(s.mx));
    if (grid_rule) {  // quantize_grid_block: the raw absmax, never clamped
      scales[b] = absmax;
      continue;
    }
    const BlockNorm norm = make_block_norm(BlockStats{absmax, s.mn, s.mx, false}, rule, len < blocksize);
    if (!isfinite(norm.scale)) atomicOr(flags, kFlagOverflow);
    scales[b] = norm.scale;
    if (rule == kMinmax) offsets[b] = norm.offset;
  }
}

struct EncodeArgs {
  const void* x;
  int dtype;
  int64_t n;
  int64_t blocksize;
  int block_shift;  // log2(blocksize) when a power of two, else -1
  int64_t nblocks;
  int rule;
  Codebook cb;  // global pointers; the kernel copies midpoints and order to shared memory
  const float* scales;
  const float* offsets;
  uint8_t* packed;
};

// Storage code of element e, its block's normalisation rebuilt from the stored parameters.
__device__ __forceinline__ uint8_t encode_element(const EncodeArgs& a, const Codebook& cb, int64_t e) {
  const int64_t b = a.block_shift >= 0 ? e >> a.block_shift : e / a.blocksize;
  const float v = load_as_float(a.x, a.dtype, e);
  if (cb.grid_lut != nullptr) return grid_code(v, a.scales[b], cb.grid_lut);
  const bool partial = (b + 1) * a.blocksize > a.n;
  const BlockNorm norm = block_norm_from_stored(a.scales[b], a.rule == kMinmax ? a.offsets[b] : 0.0f, a.rule, partial);
  return encode_value(normalise(v, norm, a.rule), cb);
}

// One thread per output byte (two elements for 4 bits, each with its own block, so blocks
// of odd size that share a byte need no coordination); the midpoints and the sorted-to-code
// map sit in shared memory for the binary search, the 64 KiB grid table stays in L1/L2.
__global__ void __launch_bounds__(kThreads) encode_kernel(EncodeArgs a) {
  __shared__ float mids[256];
  __shared__ uint8_t order[256];
  const int ncodes = 1 << a.cb.bits;
  for (int i = threadIdx.x; i < ncodes; i += blockDim.x) {
    mids[i] = a.cb.midpoints[i];
    order[i] = a.cb.identity_order ? static_cast<uint8_t>(i) : a.cb.sorted_to_code[i];
  }
  __syncthreads();
  Codebook cb = a.cb;
  cb.midpoints = mids;
  cb.sorted_to_code = order;
  const int64_t nbytes = a.cb.bits == 4 ? (a.n + 1) / 2 : a.n;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < nbytes; i += stride) {
    if (cb.bits == 8) {
      a.packed[i] = encode_element(a, cb, i);
      continue;
    }
    const uint8_t hi = encode_element(a, cb, 2 * i);
    // An odd count leaves a padding nibble: the code of 0.0, as quantize_cpu (and bitsandbytes).
    const uint8_t lo = 2 * i + 1 < a.n ? encode_element(a, cb, 2 * i + 1) : encode_value(0.0f, cb);
    a.packed[i] = pack_pair(hi, lo);
  }
}

int grid_for(int64_t work, int64_t per_cta) {
  const int64_t g = (work + per_cta - 1) / per_cta;
  return static_cast<int>(g < kMaxGrid ? (g > 0 ? g : 1) : kMaxGrid);
}

}  // namespace

int quantize_cuda(const void* x, int dtype, int64_t n, int64_t blocksize, const Codebook& cb, int rule,
                  uint8_t* packed, float* scales, float* offsets, int* flags, void* stream) {
  if (n < 0 || blocksize < 1 || (cb.bits != 4 && cb.bits != 8) || (rule != kAbsmax && rule != kMinmax)) {
    return kInvalidArgument;
  }
  if (cb.grid_lut != nullptr && (cb.bits != 8 || rule != kAbsmax)) return kInvalidArgument;
  if (n == 0) return kOk;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
  int shift = -1;
  for (int k = 0; k < 63; ++k) {
    if ((int64_t{1} << k) == blocksize) shift = k;
  }
  QE_CUDA_CHECK(cudaMemsetAsync(flags, 0, sizeof(int), s));
  const int group_warps = blocksize <= kWarpBlockMax ? 1 : kWarps;
  stats_kernel<<<grid_for(nblocks, kWarps / group_warps), kThreads, 0, s>>>(
      x, dtype, n, blocksize, nblocks, rule, cb.grid_lut != nullptr, group_warps, scales, offsets, flags);
  QE_CUDA_CHECK(cudaGetLastError());
  const EncodeArgs args{x, dtype, n, blocksize, shift, nblocks, rule, cb, scales, offsets, packed};
  encode_kernel<<<grid_for(cb.bits == 4 ? (n + 1) / 2 : n, kThreads), kThreads, 0, s>>>(args);
  QE_CUDA_CHECK(cudaGetLastError());
  // The flags decide the status: one small copy, then wait for the stream (quantization is an
  // offline step; a status must not be returned before the kernels have run).
  int host_flags = 0;
  QE_CUDA_CHECK(cudaMemcpyAsync(&host_flags, flags, sizeof(int), cudaMemcpyDeviceToHost, s));
  QE_CUDA_CHECK(cudaStreamSynchronize(s));
  if (host_flags & kFlagNonFinite) return kNonFiniteInput;
  if (host_flags & kFlagOverflow) return kScaleOverflow;
  return kOk;
}

}  // namespace qengine
