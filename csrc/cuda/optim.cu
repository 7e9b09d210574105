// The fused AdamW step on CUDA, mirroring cpu/optim/optim.cpp: the same adamw_element, block
// scales (m_signed_scale for m, absmax for v) and encode_state from qengine/optim_math.h (built with --fmad=false), so the bytes match the
// CPU kernels. One launch per task; 32-bit states: one thread per element; 8-bit states: one
// 256-thread CUDA block per 256-element state block (absmax by a block reduction).
#include <cstdint>

#include "cuda/check.h"
#include "qengine/optim.h"

namespace qengine {
namespace {

constexpr int kThreads = 256;
static_assert(kThreads == kOptimBlock, "one thread per element of an 8-bit state block");
constexpr int64_t kMaxGrid = 65535LL * 8;

__global__ void adamw32_kernel(OptimTask t, AdamHyper h) {
  void* p = reinterpret_cast<void*>(t.param);
  const void* g = reinterpret_cast<const void*>(t.grad);
  float* m = reinterpret_cast<float*>(t.state1);
  float* v = reinterpret_cast<float*>(t.state2);
  const int dt = static_cast<int>(t.dtype);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < t.n; i += stride) {
    float pi = load_as_float(p, dt, i), mi = m[i], vi = v[i];
    adamw_element(load_as_float(g, dt, i), pi, mi, vi, h);
    store_from_float(p, dt, i, pi);
    m[i] = mi;
    v[i] = vi;
  }
}

// absmax_step's combination of two partial maxima (NaN wins, as on the CPU).
__device__ __forceinline__ float absmax_merge(float a, float b) {
  if (a != a || b != b) return bits_float(0x7fc00000u);
  return a > b ? a : b;
}

// posmax_step's combination of two partial maxima (neither is NaN: posmax_step never takes one).
__device__ __forceinline__ float posmax_merge(float a, float b) { return posmax_step(a, b); }

// The block-wide reduction of the threads' partial values x with merge (dead lanes pass 0).
template <class Merge>
__device__ float block_reduce(float x, float* shared, Merge merge) {
  float r = x;
  for (int off = 16; off > 0; off >>= 1) r = merge(r, __shfl_down_sync(0xffffffffu, r, off));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) shared[warp] = r;
  __syncthreads();
  if (warp == 0) {
    r = lane < kThreads / 32 ? shared[lane] : 0.0f;
    for (int off = 16; off > 0; off >>= 1) r = merge(r, __shfl_down_sync(0xffffffffu, r, off));
    if (lane == 0) shared[0] = r;
  }
  __syncthreads();
  r = shared[0];
  __syncthreads();  // shared is reused by the next reduction
  return r;
}

__device__ float block_absmax(float x, float* shared) {
  return block_reduce(absmax_step(0.0f, x), shared, [](float a, float b) { return absmax_merge(a, b); });
}

// m_signed_scale of the block (optim_math.h), as the CPU kernels compute it.
__device__ float block_m_scale(float x, float* shared) {
  const float amax = block_absmax(x, shared);
  const float pmax = block_reduce(posmax_step(0.0f, x), shared, [](float a, float b) { return posmax_merge(a, b); });
  return m_signed_scale(amax, pmax);
}

__global__ void adamw8_kernel(OptimTask t, AdamHyper h, StateCode c1, StateCode c2) {
  __shared__ float red[kThreads / 32];
  void* p = reinterpret_cast<void*>(t.param);
  const void* g = reinterpret_cast<const void*>(t.grad);
  uint8_t* q1 = reinterpret_cast<uint8_t*>(t.state1);
  uint8_t* q2 = reinterpret_cast<uint8_t*>(t.state2);
  float* a1 = reinterpret_cast<float*>(t.absmax1);
  float* a2 = reinterpret_cast<float*>(t.absmax2);
  const int dt = static_cast<int>(t.dtype);
  const int64_t nblocks = (t.n + kOptimBlock - 1) / kOptimBlock;
  for (int64_t b = blockIdx.x; b < nblocks; b += gridDim.x) {  // uniform per CUDA block
    const int64_t i = b * kOptimBlock + threadIdx.x;
    const bool live = i < t.n;
    float mi = 0.0f, vi = 0.0f;
    if (live) {
      float pi = load_as_float(p, dt, i);
      mi = c1.table[q1[i]] * a1[b];
      vi = c2.table[q2[i]] * a2[b];
      adamw_element(load_as_float(g, dt, i), pi, mi, vi, h);
      store_from_float(p, dt, i, pi);
    }
    const float n1 = block_m_scale(mi, red);  // dead lanes contribute 0, which never wins
    const float n2 = block_absmax(vi, red);
    if (threadIdx.x == 0) {
      a1[b] = n1;
      a2[b] = n2;
    }
    if (live) {
      q1[i] = encode_state(mi * state_inv_scale(n1), c1);
      q2[i] = encode_state(vi * state_inv_scale(n2), c2);
    }
  }
}

bool valid_code(const StateCode& c) {
  return c.table != nullptr && c.lut != nullptr && c.lut_kmax >= 0 && c.lut_base >= 0;
}

}  // namespace

int adamw_cuda(const OptimTask* tasks, int64_t ntasks, const AdamHyper* hyper, int64_t nhyper, int state_bits,
               const StateCode* codes, void* stream) {
  if (ntasks < 0 || (ntasks > 0 && (tasks == nullptr || hyper == nullptr))) return kInvalidArgument;
  if (state_bits != 32 && state_bits != 8) return kInvalidArgument;
  if (state_bits == 8 && (codes == nullptr || !valid_code(codes[0]) || !valid_code(codes[1]))) return kInvalidArgument;
  for (int64_t k = 0; k < ntasks; ++k) {  // every task is checked before anything is launched
    const OptimTask& t = tasks[k];
    if (t.n < 0 || t.dtype < kFloat32 || t.dtype > kBFloat16 || t.hyper < 0 || t.hyper >= nhyper) {
      return kInvalidArgument;
    }
    if (t.n > 0 && (t.param == 0 || t.grad == 0 || t.state1 == 0 || t.state2 == 0)) return kInvalidArgument;
    if (t.n > 0 && state_bits == 8 && (t.absmax1 == 0 || t.absmax2 == 0)) return kInvalidArgument;
  }
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  for (int64_t k = 0; k < ntasks; ++k) {
    const OptimTask& t = tasks[k];
    if (t.n == 0) continue;
    if (state_bits == 32) {
      const int64_t blocks = (t.n + kThreads - 1) / kThreads;
      adamw32_kernel<<<static_cast<unsigned>(blocks < kMaxGrid ? blocks : kMaxGrid), kThreads, 0, s>>>(
          t, hyper[t.hyper]);
    } else {
      const int64_t blocks = (t.n + kOptimBlock - 1) / kOptimBlock;
      adamw8_kernel<<<static_cast<unsigned>(blocks < kMaxGrid ? blocks : kMaxGrid), kThreads, 0, s>>>(
          t, hyper[t.hyper], codes[0], codes[1]);
    }
    QE_CUDA_CHECK(cudaGetLastError());
  }
  return kOk;
}

}  // namespace qengine
