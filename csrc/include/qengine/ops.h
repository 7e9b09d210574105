// Entry points of the native module, one declaration per op and backend. They take raw
// buffers that python/qengine/ops/ has already checked, and return a Status.
#pragma once
#include <cstdint>

#include "qengine/quant_math.h"

namespace qengine {

// Blockwise quantization of x[0..n) (dtype) in blocks of `blocksize` elements (any size >= 1;
// the last block may be partial). Writes ceil(n * bits / 8) packed bytes, one scale per
// block and, for the minmax rule, one offset per block (offsets may be null otherwise).
int quantize_cpu(const void* x, int dtype, int64_t n, int64_t blocksize, const Codebook& cb, int rule,
                 uint8_t* packed, float* scales, float* offsets);

// out[0..n) (out_dtype) = decoded packed codes; one scale per block (float32 values, or
// double-quantized codes decoded with block_scale's bits) and, for minmax, one float32 offset
// per block. `stream` allows non-temporal stores for large outputs: right for a caller's buffer
// that is not in cache, wrong for a fresh allocation whose pages the kernel has just zeroed
// through the cache.
int dequantize_cpu(const uint8_t* packed, int64_t n, int64_t blocksize, const Codebook& cb, int rule,
                   const BlockScales& scales, const float* offsets, void* out, int out_dtype, bool stream);

// out[0..count) = decoded elements first..first+count (a flat range of the quantized tensor).
int dequantize_range_cpu(const uint8_t* packed, int64_t first, int64_t count, int64_t blocksize, const Codebook& cb,
                         int rule, const BlockScales& scales, const float* offsets, void* out, int out_dtype,
                         bool stream = false);

// out[n * cols + j] = decoded element n * K + k0 + j for n < rows, j < cols (k0 + cols <= K):
// columns [k0, k0 + cols) of the quantized [rows, K] tensor as a dense [rows, cols] tile (the
// whole width: one flat range, as dequantize_range_cpu).
int dequantize_columns_cpu(const uint8_t* packed, int64_t rows, int64_t K, int64_t k0, int64_t cols,
                           int64_t blocksize, const Codebook& cb, int rule, const BlockScales& scales,
                           const float* offsets, void* out, int out_dtype);

// y[M, N] (float32) = x[M, K] (x_dtype, row stride ldx) @ W^T, W the quantized [N, K] weight
// (flat blocks over its row-major elements). Decodes each weight row once for all M rows;
// float32 accumulation. bfloat16 x may use the bfloat16 dot-product kernel, whose weights
// have bfloat16 precision (as in dense bfloat16 F.linear).
int matmul_cpu(const void* x, int x_dtype, int64_t M, int64_t K, int64_t ldx, int64_t N, const uint8_t* packed,
               int64_t blocksize, const Codebook& cb, int rule, const BlockScales& scales, const float* offsets,
               float* y);

// matmul_cpu for large batches (rows of x beyond the GEMV regime): the weight decoded a panel at
// a time straight into a blocked GEMM's layout (bfloat16 weights, as dense bfloat16 F.linear
// has them; float32 accumulation). Sets *done = false, writing nothing, where no kernel of the
// active ISA applies (gemm_applies: today bfloat16 x on an AVX512-BF16 or AMX CPU, 4-bit absmax codes,
// a power-of-two blocksize >= 16 dividing K, K % 32 == 0); the caller then takes its own path.
// lora (r = 0: none): y += scale * (x @ a^T) @ b^T, a [r, K] and b [N, R] contiguous of dtype,
// accumulated in the same float32 sum before y is stored.
struct LoraArgs {
  const void* a = nullptr;
  const void* b = nullptr;
  int dtype = 0;
  int64_t r = 0;
  float scale = 0.0f;
};
// positions: a 2:4 weight's (sparse/sparse24.h; then K % 256 == 0 and blocksize >= 32 dividing
// K / 2), or null for the dense layout.
bool gemm_applies(int x_dtype, int64_t K, int64_t blocksize, const Codebook& cb, int rule, const float* offsets,
                  bool sparse24);
// The fewest rows of x from which the active ISA's large-batch kernel beats matmul_cpu (sparse24:
// the 2:4 layout's sparse24_matmul_cpu), both applying: 17 on AVX512-BF16, fewer on AMX.
int64_t gemm_min_rows(bool sparse24);
int matmul_large_cpu(const void* x, int x_dtype, int64_t M, int64_t K, int64_t ldx, int64_t N, const uint8_t* packed,
                     const uint8_t* positions, int64_t blocksize, const Codebook& cb, int rule,
                     const BlockScales& scales, const float* offsets, const LoraArgs& lora, void* y, int y_dtype,
                     bool* done);
// matmul_t_cpu for large batches, as matmul_large_cpu: gx[M, K] = g[M, N] (g_dtype, contiguous)
// @ W; also needs N even. y / gx: y_dtype / gx_dtype kFloat32 (the float32 sums) or kBFloat16
// (each sum rounded once, as float_to_bf16: x's dtype, with no float32 copy of the output).
int matmul_t_large_cpu(const void* g, int g_dtype, int64_t M, int64_t N, int64_t K, const uint8_t* packed,
                       const uint8_t* positions, int64_t blocksize, const Codebook& cb, int rule,
                       const BlockScales& scales, const float* offsets, void* gx, int gx_dtype, bool* done);

// The LoRA side path's share of the backward of y = x @ W^T + scale * (x @ A^T) @ B^T, for
// bfloat16 g [M, N] and x [M, K] (contiguous), float32 A [r, K] and B [N, r]. Where not null:
// gx_out = bfloat16(gx_in + scale * (g @ B) @ A) (bfloat16 [M, K], one rounding),
// ga = scale * (g @ B)^T @ x (float32 [r, K]), gb = scale * g^T @ (x @ A^T) (float32 [N, r]).
// *done = false, nothing written, where the active ISA has no such kernels.
int lora_backward_cpu(const void* g, const void* x, int64_t M, int64_t N, int64_t K, const float* a, const float* b,
                      int64_t r, float scale, const void* gx_in, void* gx_out, float* ga, float* gb, bool* done);

// Its share of the forward, for the products that leave it out (the large-batch fallback):
// y_out = bfloat16(y_in + scale * (x @ A^T) @ B^T) for bfloat16 x [M, K] and y_in, y_out [M, N]
// (contiguous; y_out may be y_in), float32 A [r, K] and B [N, r], one rounding. *done = false,
// nothing written, where the active ISA has no such kernels.
int lora_add_cpu(const void* x, int64_t M, int64_t K, const float* a, const float* b, int64_t r, int64_t N,
                 float scale, const void* y_in, void* y_out, bool* done);

// gx[M, K] (float32) = g[M, N] (float32) @ W, the transposed problem of matmul_cpu (backward).
int matmul_t_cpu(const float* g, int64_t M, int64_t N, int64_t K, const uint8_t* packed, int64_t blocksize,
                 const Codebook& cb, int rule, const BlockScales& scales, const float* offsets, float* gx);

// The LoRA side path, added in place: y[M, N] += scale * (x[M, K] @ a[R, K]^T) @ b[N, R]^T
// (x and y float32; a and b contiguous, both of dtype ab_dtype).
// dst[0..n) = src[0..n) rounded to dst_dtype (threads over ranges; the matmul output in x's
// dtype without a torch op, whose OpenMP workers would then spin beside the next kernel).
int cast_float_cpu(const float* src, int64_t n, void* dst, int dst_dtype);

int lora_epilogue_cpu(const void* x, int x_dtype, int64_t M, int64_t K, const void* a, const void* b, int ab_dtype,
                      int64_t R,
                      int64_t N, float scale, float* y);

// One Lloyd step of weighted 1-D k-means on the block-normalised values v of x, each weighted
// by its block's scale^2 (so the objective is the squared error of the weights themselves):
// for each sorted codebook entry k, sums[k] += w*v and weights[k] += w over the values nearest
// to it; *sse += w * (v - code)^2. cb must be sorted (identity order).
int kmeans_accumulate_cpu(const void* x, int dtype, int64_t n, int64_t blocksize, const Codebook& cb, int rule,
                          double* sums, double* weights, double* sse);

// The 2:4 sparse layout (byte order in csrc/cpu/sparse/sparse24.h): S stored values (S even) of a
// weight with 2 * S elements, quantized blockwise over their storage order (blocksize counts
// stored values), plus ceil(S / 4) bytes of 2-bit positions. out[0 .. 2S) (out_dtype) =
// the dense weights, exact zeros at the pruned positions.
int sparse24_dequantize_cpu(const uint8_t* packed, const uint8_t* positions, int64_t S, int64_t blocksize,
                            const Codebook& cb, int rule, const BlockScales& scales, const float* offsets, void* out,
                            int out_dtype);

// Columns [k0, k0 + cols) of rows [row0, row0 + rows) of the 2:4 weight [N, K] (S = N * K / 2
// stored values) as a dense [rows, cols] tile, whole 256-weight chunks only: K, k0 and cols
// multiples of 256 (else kInvalidArgument).
int sparse24_dequantize_columns_cpu(const uint8_t* packed, const uint8_t* positions, int64_t S, int64_t row0,
                                    int64_t rows, int64_t K, int64_t k0, int64_t cols, int64_t blocksize,
                                    const Codebook& cb, int rule, const BlockScales& scales, const float* offsets,
                                    void* out, int out_dtype);

// y[M, N] (float32) = x[M, K] @ W^T for the 2:4 sparse W [N, K] (K % 4 == 0), as matmul_cpu.
int sparse24_matmul_cpu(const void* x, int x_dtype, int64_t M, int64_t K, int64_t ldx, int64_t N,
                        const uint8_t* packed, const uint8_t* positions, int64_t blocksize, const Codebook& cb,
                        int rule, const BlockScales& scales, const float* offsets, float* y);

#if defined(QENGINE_WITH_CUDA)
int cuda_device_count(int* count);
int dequantize_cuda(const uint8_t* packed, int64_t n, int64_t blocksize, const Codebook& cb, int rule,
                    const float* scales, const float* offsets, void* out, int out_dtype, void* stream);

// The CUDA counterparts of quantize_cpu, matmul_cpu and matmul_t_cpu: device buffers, the same
// arguments plus the stream every launch goes to. Double-quantized scales take their mean from
// the device (`mean`, float32 [1]; scales.mean is not read) so no launch waits for the host.
// quantize_cuda needs one int of device scratch (`flags`) and waits for the stream to return
// its status; the others only enqueue work.
int quantize_cuda(const void* x, int dtype, int64_t n, int64_t blocksize, const Codebook& cb, int rule,
                  uint8_t* packed, float* scales, float* offsets, int* flags, void* stream);
int matmul_cuda(const float* x, int64_t M, int64_t K, int64_t ldx, int64_t N, const uint8_t* packed,
                int64_t blocksize, const Codebook& cb, int rule, const BlockScales& scales, const float* mean,
                const float* offsets, float* y, void* stream);
// matmul_t_cuda splits the rows of W over several CTAs per column and adds the partial sums
// in a fixed order (deterministic): it needs matmul_t_cuda_workspace(M, N, K) floats of device
// scratch (0: none, workspace may be null).
int64_t matmul_t_cuda_workspace(int64_t M, int64_t N, int64_t K);
int matmul_t_cuda(const float* g, int64_t M, int64_t N, int64_t K, const uint8_t* packed, int64_t blocksize,
                  const Codebook& cb, int rule, const BlockScales& scales, const float* mean, const float* offsets,
                  float* workspace, int64_t workspace_floats, float* gx, void* stream);
int sparse24_dequantize_cuda(const uint8_t* packed, const uint8_t* positions, int64_t S, int64_t blocksize,
                             const Codebook& cb, int rule, const float* scales, const float* offsets, void* out,
                             int out_dtype, void* stream);
#endif

}  // namespace qengine
