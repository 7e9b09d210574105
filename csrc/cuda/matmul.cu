// CUDA fused dequantize-GEMV for small batches: y[M, N] = x[M, K] @ W^T with W decoded in
// registers (never written anywhere), each packed byte read once per group of up to 16 rows
// of x, float32 accumulation. Mirrors cpu/gemv/matmul.cpp's matmul_cpu.
//
// Layout: a CTA of 8 warps owns 32 consecutive output rows, 4 per warp (16 rows, 2 per warp,
// when x has more than 8 rows: the accumulators must stay in registers). The rows of x are
// staged tile by tile (along K) in shared memory, shared by all 8 warps. Within a warp, lane
// l reads 4-byte words l, l + 32, ... of each of its 4 rows (4 independent loads in flight
// per lane), so each load instruction of a warp covers 128 consecutive bytes of a row. Every
// word lies in one block (checked on the host), so it needs one scale. A word's codes are
// decoded through the codebook in shared memory, then each group of 4 decoded weights meets
// a float4 of every row of x: one shared-memory load per 4 x values, reused for the warp's 4
// weight rows. At the end a butterfly of shuffles sums each (row of x, output row) over the
// warp. MT, the rows of x per launch, is a template parameter so the accumulators live in
// registers: 1 (decode), 4, 8 and 16, the batch rounded up.
//
// Shapes where a word could straddle a block or a row (blocks that do not divide K, odd K,
// a misaligned buffer) take a general kernel that decodes element by element.
#include <cstdint>

#include "cuda/check.h"
#include "cuda/weight.cuh"

namespace qengine {
namespace {

using cuda::Weight;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// Weight rows per warp, sharing each x load from shared memory: 4, or 2 with 16 rows of x
// (64 accumulators per lane instead of 128: half the registers, twice the CTAs per SM).
template <int MT>
__host__ __device__ constexpr int rows_per_warp() { return MT >= 16 ? 2 : 4; }
template <int MT>
__host__ __device__ constexpr int rows_per_cta() { return kWarps * rows_per_warp<MT>(); }
// x tile: 32 KiB of shared memory (TK = 8192 / MT columns), so 2 CTAs fit an SM with room.
constexpr int kTileFloats = 8192;
// The general kernel handles the rows of x in groups of this many (gridDim.y groups).
constexpr int kElemRows = 4;

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int d = 16; d > 0; d >>= 1) v += __shfl_xor_sync(0xffffffffu, v, d);
  return v;
}

// Stages x[m0 + m][k0 .. k0 + len) for m < MT (rows past M as zeros) into xs[m * TK + i].
template <int MT, int TK>
__device__ __forceinline__ void load_x_tile(const float* __restrict__ x, int64_t M, int64_t ldx, int64_t m0,
                                            int64_t k0, int len, float* xs) {
  __syncthreads();  // the previous tile is consumed
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    if (m0 + m < M) {
      const float* src = x + (m0 + m) * ldx + k0;
      for (int i = threadIdx.x; i < len; i += kThreads) xs[m * TK + i] = src[i];
    } else {
      for (int i = threadIdx.x; i < len; i += kThreads) xs[m * TK + i] = 0.0f;
    }
  }
  __syncthreads();
}

// Writes the warp's sums acc[m][r] to y[(m0 + m) * N + row0 + r].
template <int MT, int R>
__device__ __forceinline__ void store_rows(float (&acc)[MT][R], int64_t M, int64_t m0, int64_t N, int64_t row0,
                                           float* __restrict__ y) {
#pragma unroll
  for (int m = 0; m < MT; ++m) {
#pragma unroll
    for (int r = 0; r < R; ++r) acc[m][r] = warp_sum(acc[m][r]);
  }
  if (threadIdx.x % 32 != 0) return;
#pragma unroll
  for (int m = 0; m < MT; ++m) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      if (m0 + m < M && row0 + r < N) y[(m0 + m) * N + row0 + r] = acc[m][r];
    }
  }
}

// The word path; MT (1, 4, 8, 16) >= the rows of x of this launch.
template <int BITS, int MT>
__global__ void __launch_bounds__(kThreads) gemv_words(const float* __restrict__ x, int64_t M, int64_t ldx,
                                                       Weight w, float* __restrict__ y) {
  constexpr int TK = kTileFloats / MT;
  constexpr int VE = cuda::Word<BITS>::kElems;  // elements per word
  constexpr int GROUPS = VE / 4;                // float4 groups per word
  constexpr int R = rows_per_warp<MT>();
  static_assert(TK % (32 * VE) == 0, "x tiles hold whole warp steps");
  __shared__ cuda::SharedTables tabs;
  __shared__ __align__(16) float xs[kTileFloats];
  const Weight wt = cuda::load_tables(w, tabs);  // synchronised by the first tile load
  const int lane = threadIdx.x % 32;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * rows_per_cta<MT>() + (threadIdx.x / 32) * R;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * MT;
  const int64_t row_words = wt.K / VE;
  // 4-bit words are 8 floats of x, two float4 at a 32-byte lane stride: lanes 4..7 of each
  // quarter-warp take the halves in the other order, so the 8 lanes of a shared-memory
  // wavefront hit 32 distinct banks.
  const int swz = BITS == 4 ? (lane >> 2) & 1 : 0;
  float acc[MT][R] = {};
  for (int64_t k0 = 0; k0 < wt.K; k0 += TK) {
    const int len = static_cast<int>(wt.K - k0 < TK ? wt.K - k0 : TK);
    load_x_tile<MT, TK>(x, M, ldx, m0, k0, len, xs);
    const int words = len / VE;
    const int64_t word0 = k0 / VE;
    for (int j = lane; j < words; j += 32) {
      // The loads of the warp's rows first (independent, in flight together), then the maths.
      uint32_t code[R];
      float scale[R], addend[R];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const int64_t o = row0 + r;
        code[r] = 0;  // rows past N decode to zeros and are not stored
        scale[r] = 0.0f;
        addend[r] = 0.0f;
        if (o < wt.N) {
          const int64_t word = o * row_words + word0 + j;
          code[r] = __ldg(reinterpret_cast<const uint32_t*>(wt.packed) + word);
          const int64_t b = cuda::block_of(wt, word * VE);
          scale[r] = cuda::scale_of(wt, b);
          addend[r] = cuda::addend_of(wt, b);
        }
      }
      // Not unrolled: the body is already MT * R * 4 FMAs, and unrolling it twice
      // for 4-bit words only doubled the registers and the compile time.
#pragma unroll 1
      for (int g = 0; g < GROUPS; ++g) {
        const int h = g ^ swz;
        float wv[R][4];
#pragma unroll
        for (int r = 0; r < R; ++r) {
#pragma unroll
          for (int p = 0; p < 4; ++p) {
            wv[r][p] = cuda::decode(wt, cuda::Word<BITS>::code(code[r], 4 * h + p), scale[r], addend[r]);
          }
        }
#pragma unroll
        for (int m = 0; m < MT; ++m) {
          const float4 xv = *reinterpret_cast<const float4*>(xs + m * TK + j * VE + 4 * h);
#pragma unroll
          for (int r = 0; r < R; ++r) {
            acc[m][r] = __fmaf_rn(xv.x, wv[r][0], acc[m][r]);
            acc[m][r] = __fmaf_rn(xv.y, wv[r][1], acc[m][r]);
            acc[m][r] = __fmaf_rn(xv.z, wv[r][2], acc[m][r]);
            acc[m][r] = __fmaf_rn(xv.w, wv[r][3], acc[m][r]);
          }
        }
      }
    }
  }
  store_rows<MT>(acc, M, m0, wt.N, row0, y);
}

// The general path: element by element (flat element index, its own block), rows of x in
// groups of kElemRows along gridDim.y. Lanes take consecutive columns, so the x reads from
// shared memory are conflict-free and the code reads coalesce.
template <int BITS>
__global__ void __launch_bounds__(kThreads) gemv_elements(const float* __restrict__ x, int64_t M, int64_t ldx,
                                                          Weight w, float* __restrict__ y) {
  constexpr int MT = kElemRows;
  constexpr int TK = kTileFloats / MT;
  constexpr int R = rows_per_warp<MT>();
  __shared__ cuda::SharedTables tabs;
  __shared__ float xs[kTileFloats];
  const Weight wt = cuda::load_tables(w, tabs);
  const int lane = threadIdx.x % 32;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * rows_per_cta<MT>() + (threadIdx.x / 32) * R;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * MT;
  float acc[MT][R] = {};
  for (int64_t k0 = 0; k0 < wt.K; k0 += TK) {
    const int len = static_cast<int>(wt.K - k0 < TK ? wt.K - k0 : TK);
    load_x_tile<MT, TK>(x, M, ldx, m0, k0, len, xs);
    for (int i = lane; i < len; i += 32) {
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const int64_t o = row0 + r;
        if (o >= wt.N) continue;
        const float wv = cuda::element<BITS>(wt, o * wt.K + k0 + i);
#pragma unroll
        for (int m = 0; m < MT; ++m) acc[m][r] = __fmaf_rn(xs[m * TK + i], wv, acc[m][r]);
      }
    }
  }
  store_rows<MT>(acc, M, m0, wt.N, row0, y);
}

// One launch over all N rows and all M rows of x (in groups of MT along gridDim.y).
template <int MT, typename Kernel>
int launch(Kernel kernel, cudaStream_t s, const float* x, int64_t M, int64_t ldx, const Weight& w, float* y) {
  const int64_t ctas = (w.N + rows_per_cta<MT>() - 1) / rows_per_cta<MT>();
  const int64_t groups = (M + MT - 1) / MT;
  if (ctas > 0x7fffffff || groups > 65535) return kInvalidArgument;  // grid limits
  kernel<<<dim3(static_cast<unsigned>(ctas), static_cast<unsigned>(groups)), kThreads, 0, s>>>(x, M, ldx, w, y);
  QE_CUDA_CHECK(cudaGetLastError());
  return kOk;
}

template <int BITS>
int launch_words(cudaStream_t s, const float* x, int64_t M, int64_t ldx, const Weight& w, float* y) {
  // The smallest instantiated MT that holds the rows (few padding rows of zeros; each
  // instantiation costs compile time); more than 16 rows run in groups of 16.
  if (M == 1) return launch<1>(gemv_words<BITS, 1>, s, x, M, ldx, w, y);
  if (M <= 4) return launch<4>(gemv_words<BITS, 4>, s, x, M, ldx, w, y);
  if (M <= 8) return launch<8>(gemv_words<BITS, 8>, s, x, M, ldx, w, y);
  return launch<16>(gemv_words<BITS, 16>, s, x, M, ldx, w, y);
}

}  // namespace

int matmul_cuda(const float* x, int64_t M, int64_t K, int64_t ldx, int64_t N, const uint8_t* packed,
                int64_t blocksize, const Codebook& cb, int rule, const BlockScales& scales, const float* mean,
                const float* offsets, float* y, void* stream) {
  if (M < 0 || K < 0 || N < 0 || ldx < K || blocksize < 1 || (cb.bits != 4 && cb.bits != 8) ||
      (scales.values == nullptr && mean == nullptr)) {
    return kInvalidArgument;
  }
  if (M == 0 || N == 0) return kOk;
  const Weight w{packed, N, K, blocksize, cuda::shift_of(blocksize), cb.bits, rule, cb.table, scales, mean, offsets};
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (cuda::word_layout(w)) {
    return cb.bits == 4 ? launch_words<4>(s, x, M, ldx, w, y) : launch_words<8>(s, x, M, ldx, w, y);
  }
  return cb.bits == 4 ? launch<kElemRows>(gemv_elements<4>, s, x, M, ldx, w, y)
                      : launch<kElemRows>(gemv_elements<8>, s, x, M, ldx, w, y);
}

}  // namespace qengine
