// CUDA transposed dequantize-product for small batches (the backward of matmul for x):
// gx[M, K] = g[M, N] @ W with W decoded in registers. Mirrors cpu/gemv/matmul.cpp's matmul_t_cpu.
//
// Layout: each output column needs a sum over all N weight rows, so a CTA owns a strip of
// columns (one word per lane: 256 columns at 4 bits, 128 at 8) and walks rows; its 8 warps
// take interleaved rows (4 at a time per lane, for loads in flight) and each lane keeps the
// sums of its word's columns for MT rows of g. One strip alone is too little work for a GPU
// when K is small, so the rows are also split over gridDim.y; each split writes its partial
// sums to a workspace that a second kernel adds up in split order. The warps of a CTA are
// combined through shared memory in warp order too: the result is deterministic.
// The g values of a chunk of rows are staged in shared memory ([row][MT], float4-readable),
// where every lane of a warp reads the same address (a broadcast).
#include <cstdint>

#include "cuda/check.h"
#include "cuda/weight.cuh"

namespace qengine {
namespace {

using cuda::Weight;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kRowUnroll = 4;   // weight rows in flight per lane
constexpr int kChunkRows = 256;  // rows of g staged per pass
// Split heuristics: aim for this many CTAs, each with at least kMinSplitRows rows.
constexpr int64_t kTargetCtas = 512;
constexpr int64_t kMinSplitRows = 64;
constexpr int64_t kMaxSplits = 64;
constexpr int64_t kMaxGrid = 1 << 20;

// Columns per lane: a word (WORDS) or a single element (the general path).
template <int BITS, bool WORDS>
struct Cols {
  static constexpr int kPerLane = WORDS ? cuda::Word<BITS>::kElems : 1;
  static constexpr int kStrip = 32 * kPerLane;
};

template <int BITS, int MT, bool WORDS>
__global__ void __launch_bounds__(kThreads) gemv_t(const float* __restrict__ g, int64_t M, Weight w,
                                                   int64_t rows_per_split, float* __restrict__ out) {
  constexpr int VE = Cols<BITS, WORDS>::kPerLane;
  constexpr int STRIP = Cols<BITS, WORDS>::kStrip;
  static_assert(MT == 1 || MT % 4 == 0, "g rows are read as float4");
  __shared__ cuda::SharedTables tabs;
  __shared__ __align__(16) float gs[kChunkRows * MT];
  __shared__ __align__(16) float red[kWarps * STRIP];
  const Weight wt = cuda::load_tables(w, tabs);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * STRIP + lane * VE;  // first column of this lane
  const bool live_col = col < wt.K;
  const int64_t o_begin = static_cast<int64_t>(blockIdx.y) * rows_per_split;
  const int64_t o_end = o_begin + rows_per_split < wt.N ? o_begin + rows_per_split : wt.N;
  const int64_t m0 = static_cast<int64_t>(blockIdx.z) * MT;
  const int64_t row_words = wt.K / VE;  // word path only
  float acc[MT][VE] = {};
  for (int64_t c0 = o_begin; c0 < o_end; c0 += kChunkRows) {
    const int rows = static_cast<int>(o_end - c0 < kChunkRows ? o_end - c0 : kChunkRows);
    __syncthreads();  // the previous chunk is consumed (and the tables are loaded)
#pragma unroll
    for (int m = 0; m < MT; ++m) {  // coalesced reads along each row of g
      if (m0 + m < M) {
        const float* src = g + (m0 + m) * wt.N + c0;
        for (int j = threadIdx.x; j < rows; j += kThreads) gs[j * MT + m] = src[j];
      } else {
        for (int j = threadIdx.x; j < rows; j += kThreads) gs[j * MT + m] = 0.0f;
      }
    }
    __syncthreads();
    for (int j0 = warp; j0 < rows; j0 += kWarps * kRowUnroll) {
      // Loads first (kRowUnroll rows), then the arithmetic.
      uint32_t code[kRowUnroll];
      float scale[kRowUnroll], addend[kRowUnroll];
#pragma unroll
      for (int u = 0; u < kRowUnroll; ++u) {
        const int j = j0 + u * kWarps;
        code[u] = 0;
        scale[u] = 0.0f;
        addend[u] = 0.0f;
        if (WORDS && j < rows && live_col) {
          const int64_t word = (c0 + j) * row_words + col / VE;
          code[u] = __ldg(reinterpret_cast<const uint32_t*>(wt.packed) + word);
          const int64_t b = cuda::block_of(wt, word * VE);
          scale[u] = cuda::scale_of(wt, b);
          addend[u] = cuda::addend_of(wt, b);
        }
      }
#pragma unroll
      for (int u = 0; u < kRowUnroll; ++u) {
        const int j = j0 + u * kWarps;
        if (j >= rows) break;  // uniform across the warp
        float wv[VE];
        if constexpr (WORDS) {
#pragma unroll
          for (int p = 0; p < VE; ++p) {
            wv[p] = cuda::decode(wt, cuda::Word<BITS>::code(code[u], p), scale[u], addend[u]);
          }
        } else {
          wv[0] = live_col ? cuda::element<BITS>(wt, (c0 + j) * wt.K + col) : 0.0f;
        }
        const float* gj = gs + j * MT;
#pragma unroll
        for (int m4 = 0; m4 < MT; m4 += 4) {
          float gv[4];
          if constexpr (MT == 1) {
            gv[0] = gj[0];
          } else {
            const float4 t = *reinterpret_cast<const float4*>(gj + m4);
            gv[0] = t.x, gv[1] = t.y, gv[2] = t.z, gv[3] = t.w;
          }
#pragma unroll
          for (int mm = 0; mm < (MT < 4 ? MT : 4); ++mm) {
#pragma unroll
            for (int p = 0; p < VE; ++p) acc[m4 + mm][p] = __fmaf_rn(gv[mm], wv[p], acc[m4 + mm][p]);
          }
        }
      }
    }
  }
  // Deterministic combination of the 8 warps (warp order), one row of g at a time.
  const int64_t split = blockIdx.y;
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    __syncthreads();
#pragma unroll
    for (int p = 0; p < VE; ++p) red[warp * STRIP + lane * VE + p] = acc[m][p];
    __syncthreads();
    if (m0 + m >= M) continue;  // uniform across the CTA
    for (int c = threadIdx.x; c < STRIP; c += kThreads) {
      float sum = red[c];
      for (int q = 1; q < kWarps; ++q) sum += red[q * STRIP + c];
      const int64_t k = static_cast<int64_t>(blockIdx.x) * STRIP + c;
      if (k < wt.K) out[(split * M + m0 + m) * wt.K + k] = sum;
    }
  }
}

// gx[i] = sum over s of partial[s][i], in split order.
__global__ void __launch_bounds__(kThreads) sum_splits(const float* __restrict__ partial, int64_t splits,
                                                       int64_t count, float* __restrict__ gx) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += stride) {
    float sum = partial[i];
    for (int64_t s = 1; s < splits; ++s) sum += partial[s * count + i];
    gx[i] = sum;
  }
}

template <int BITS, int MT, bool WORDS>
cudaError_t launch(dim3 grid, cudaStream_t s, const float* g, int64_t M, const Weight& w, int64_t rows_per_split,
                   float* out) {
  gemv_t<BITS, MT, WORDS><<<grid, kThreads, 0, s>>>(g, M, w, rows_per_split, out);
  return cudaGetLastError();
}

template <int BITS>
cudaError_t launch_bits(bool words, bool single_row, dim3 grid, cudaStream_t s, const float* g, int64_t M,
                        const Weight& w, int64_t rows_per_split, float* out) {
  if (!words) return launch<BITS, 8, false>(grid, s, g, M, w, rows_per_split, out);
  return single_row ? launch<BITS, 1, true>(grid, s, g, M, w, rows_per_split, out)
                    : launch<BITS, 8, true>(grid, s, g, M, w, rows_per_split, out);
}

// Row splits for W [N, K]: enough CTAs to fill a GPU, never fewer than kMinSplitRows rows each.
int64_t splits_for(int64_t N, int64_t K) {
  const int64_t strips = (K + 255) / 256;  // CTAs per split on the 4-bit word path
  int64_t splits = (kTargetCtas + strips - 1) / strips;
  const int64_t by_rows = (N + kMinSplitRows - 1) / kMinSplitRows;
  splits = splits < by_rows ? splits : by_rows;
  splits = splits < kMaxSplits ? splits : kMaxSplits;
  return splits > 1 ? splits : 1;
}

}  // namespace

int64_t matmul_t_cuda_workspace(int64_t M, int64_t N, int64_t K) {
  const int64_t splits = splits_for(N, K);
  return splits > 1 ? splits * M * K : 0;
}

int matmul_t_cuda(const float* g, int64_t M, int64_t N, int64_t K, const uint8_t* packed, int64_t blocksize,
                  const Codebook& cb, int rule, const BlockScales& scales, const float* mean, const float* offsets,
                  float* workspace, int64_t workspace_floats, float* gx, void* stream) {
  if (M < 0 || K < 0 || N < 0 || blocksize < 1 || (cb.bits != 4 && cb.bits != 8) ||
      (scales.values == nullptr && mean == nullptr)) {
    return kInvalidArgument;
  }
  if (M == 0 || K == 0) return kOk;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (N == 0) {
    QE_CUDA_CHECK(cudaMemsetAsync(gx, 0, static_cast<size_t>(M * K) * sizeof(float), s));
    return kOk;
  }
  const int64_t splits = splits_for(N, K);
  if (splits > 1 && (workspace == nullptr || workspace_floats < splits * M * K)) return kInvalidArgument;
  const int64_t rows_per_split = (N + splits - 1) / splits;
  const Weight w{packed, N, K, blocksize, cuda::shift_of(blocksize), cb.bits, rule, cb.table, scales, mean, offsets};
  const bool words = cuda::word_layout(w);
  const int64_t strip = words ? 32 * (32 / cb.bits) : 32;
  const int mt = M == 1 && words ? 1 : 8;  // the general path is instantiated for MT = 8 only
  const int64_t strips = (K + strip - 1) / strip;
  const int64_t groups = (M + mt - 1) / mt;
  if (strips > 0x7fffffff || groups > 65535) return kInvalidArgument;
  const dim3 grid(static_cast<unsigned>(strips), static_cast<unsigned>(splits), static_cast<unsigned>(groups));
  float* out = splits > 1 ? workspace : gx;
  QE_CUDA_CHECK(cb.bits == 4 ? launch_bits<4>(words, mt == 1, grid, s, g, M, w, rows_per_split, out)
                             : launch_bits<8>(words, mt == 1, grid, s, g, M, w, rows_per_split, out));
  if (splits > 1) {
    const int64_t count = M * K;
    const int64_t ctas = (count + kThreads - 1) / kThreads;
    sum_splits<<<static_cast<int>(ctas < kMaxGrid ? ctas : kMaxGrid), kThreads, 0, s>>>(workspace, splits, count, gx);
    QE_CUDA_CHECK(cudaGetLastError());
  }
  return kOk;
}

}  // namespace qengine
