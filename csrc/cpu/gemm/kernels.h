// The gemm family: the large-batch dequantize-matmul (rows of x beyond the GEMV regime). Its
// per-ISA table (gemm.cpp fills it by field name) and the blocking every row shares.
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

#include "cpu/common/byte_planes.h"
#include "qengine/quant_math.h"

namespace qengine::cpu {

// Blocking of the large-batch product y = x @ W^T. W is decoded a panel at a time into the
// micro-kernel's layout: kPanelRows output rows (W rows) by kPanelK inputs as bfloat16 pairs,
// panel[k / 2][n][2] (the operand order of vdpbf16ps), never as a dense row-major tile. A task
// decodes kGroupPanels panels of one K block, then runs every kTileRows rows of x over them
// (the rows of x stay in L1 across the panels, the panels in L2 across the rows of x).
constexpr int64_t kPanelRows = 32;
constexpr int64_t kPanelK = 512;
constexpr int64_t kGroupPanels = 4;
constexpr int64_t kTileRows = 12;

// The LoRA side path in the epilogue: y[m][n] += sum_j t[m * r + j] * bt[j * ldbt + n], t the
// scaled first product (lora_down), bt = B^T (float32 [r, N]).
struct LoraSide {
  const float* t;
  const float* bt;
  int64_t r, ldbt;
};

struct GemmKernels {
  // Rows of x a tile of pack_x's layout holds.
  int64_t tile_rows = kTileRows;
  // The fewest rows of x for which this row's product beats the small-batch GEMV (gemv/), when
  // both apply; measured (bench/bench_matmul.py).
  int64_t min_rows = 17;
  // The same for the 2:4 layout (its decode costs more, its GEMV reads less).
  int64_t min_rows_sparse24 = 17;
  // The most rows of x it takes (0: any): beyond, torch's own bfloat16 GEMM on dequantized tiles
  // measured faster (the caller's fallback).
  int64_t max_rows = 0;
  // The same for the 2:4 layout, whose fallback builds a dense copy of W.
  int64_t max_rows_sparse24 = 0;
  // The fewest rows of x from which the forward takes 8-bit codes (dense layout, on a VBMI CPU; 0:
  // never), the small-batch GEMV's own byte-plane lookup being faster below.
  int64_t min_rows_bytes = 0;
  // Whether the transposed product takes them too (from min_rows_bytes rows of g).
  bool bytes_transposed = false;
  // Whether the products take minmax codes (dense layout: fma(table[q], scale, offset) a weight),
  // 8-bit ones as far as min_rows_bytes and bytes_transposed allow.
  bool minmax = false;
  // x (bfloat16 [M, K], row stride ldx) as bf16_forward reads it: tiles [t0, t1) of tile_rows rows
  // (of ceil(M / tile_rows)), K / 2 input pairs a row, into xp.
  void (*pack_x)(const uint16_t* x, int64_t M, int64_t K, int64_t ldx, int64_t t0, int64_t t1,
                 int32_t* xp) = nullptr;
  // g (bfloat16 [M, N]) as bf16_transposed reads it, as pack_x (null: pack_x's layout).
  void (*pack_g)(const uint16_t* g, int64_t M, int64_t N, int64_t ldg, int64_t t0, int64_t t1,
                 int32_t* gp) = nullptr;
  // y[M, N] (row stride N; y_dtype float32, or bfloat16: the float32 sum rounded once as
  // float_to_bf16) = x[M, K] (bfloat16) @ W^T for output rows [n0, n1) of W [N, K]: 4-bit absmax
  // codes, 8-bit ones where min_rows_bytes allows (code_planes: their table's byte planes; null
  // for 4-bit), minmax ones where minmax (offsets: float32 per block; else null),
  // blocksize a power of two >= 16 dividing K, K % 32 == 0 (gemm_applies). Null where the ISA has
  // no such kernel.
  // xp: x packed by pack_x; planes: the nested scale table's byte planes where the CPU has VBMI
  // (else null).
  // lora: the side path added before the single store of y (null: none).
  // positions: the 2:4 layout's (sparse/sparse24.h; K % 256 == 0, blocksize >= 32), or null.
  void (*bf16_forward)(const int32_t* xp, int64_t M, int64_t K, int64_t N, const uint8_t* packed,
                    const uint8_t* positions, int64_t blocksize, const float* table, const ScalePlanes* code_planes,
                    const BlockScales& scales, const float* offsets, const ScalePlanes* planes,
                    const LoraSide* lora, int64_t n0, int64_t n1, void* y, int y_dtype) = nullptr;
  // gx[M, K] (row stride K; gx_dtype float32 or bfloat16 as y above) = g[M, N] (bfloat16, packed by pack_g over N, N even) @ W
  // for the output columns [k0, k1) (multiples of 32), W as bf16_forward takes it (8-bit codes
  // where bytes_transposed); scales: W's float32 block scales (GemmVectorKernels::decode_scales);
  // code_planes and offsets as bf16_forward's.
  void (*bf16_transposed)(const int32_t* gp, int64_t M, int64_t N, int64_t K, const uint8_t* packed,
                      const uint8_t* positions, int64_t blocksize, const float* table,
                      const ScalePlanes* code_planes, const float* scales, const float* offsets, int64_t k0,
                      int64_t k1, void* gx, int gx_dtype) = nullptr;
};

// The vector kernels around the products: the scale decode before the transposed product and
// the LoRA side path (forward epilogue's first product, lora_backward_cpu). Their own table:
// every ISA from avx512_bf16 up runs the same code (the amx row falls back to avx512_bf16's).
struct GemmVectorKernels {
  // The float32 scales of blocks [0, count): the plain ones in place, else decoded into buf.
  const float* (*decode_scales)(const BlockScales& s, const ScalePlanes* planes, int64_t count,
                                std::vector<float>& buf) = nullptr;
  // t[m * r + j] = scale * (x[m] . a[j]) for m in [m0, m1): x bfloat16 (row stride ldx), a float32 [r, K].
  void (*lora_down)(const uint16_t* x, int64_t K, int64_t ldx, const float* a, int64_t r, float scale, int64_t m0,
                    int64_t m1, float* t) = nullptr;
  // The LoRA backward (lora_backward_cpu): out[j * ldo + n] = sum_m u[m * ru + j] * g[m * ldg + n] for
  // j < 16 (u's row stride ru >= 16) and n in [n0, n1); g bfloat16 [M, >= n1].
  void (*lora_reduce)(const uint16_t* g, int64_t M, int64_t ldg, const float* u, int64_t ru, int64_t n0, int64_t n1,
                      float* out, int64_t ldo) = nullptr;
  // gx[m][k] = bfloat16(gx_in[m][k] + sum_{j < r} u[m * ru + j] * a[j * K + k]) for m in [m0, m1)
  // (gx, gx_in bfloat16 [M, K]; a float32 [r, K]), each sum rounded once; gx may be gx_in.
  void (*lora_up_add)(const float* u, int64_t ru, int64_t r, const float* a, int64_t K, const uint16_t* gx_in,
                      uint16_t* gx, int64_t m0, int64_t m1) = nullptr;
};

#if defined(__x86_64__) || defined(_M_X64)
extern const GemmKernels kGemmAvx512Bf16;
extern const GemmKernels kGemmAmx;
extern const GemmVectorKernels kGemmVectorAvx512Bf16;

// The avx512_bf16 row's panel of 8-bit codes (panels_bytes_avx512bf16vbmi.cpp, VBMI byte
// permutes: call only where vbmi_scales_available()): panel[(k - k0) / 2][n - n0][2] = W[n][k],
// W[n][k + 1] as bfloat16(table[code] * scale), or bfloat16(fma(table[code], scale, offset)) with
// offsets (minmax; null for absmax), for rows [n0, n0 + 32) (zeros from n_end on) and inputs
// [k0, k0 + kc) (kc % 32 == 0) of W [N, K], one code a byte; scales: the float32 block scales from
// row first_row's first block on; offsets: the float32 block offsets from row 0's.
void decode_panel_bytes(const uint8_t* codes, int64_t K, const ScalePlanes& code_planes, int64_t blocksize,
                        const float* scales, const float* offsets, int64_t first_row, int64_t n0, int64_t n_end,
                        int64_t k0, int64_t kc, uint16_t* panel);
// Its transposed product's panel (as decode_panel_t): panel[(n - n0) / 2][k - k0][2] = W[n][k],
// W[n + 1][k] for the row pairs of [n0, n0 + nc) and columns [k0, k0 + 32); scales and offsets
// from row 0's first block.
void decode_panel_t_bytes(const uint8_t* codes, int64_t K, const ScalePlanes& code_planes, int64_t blocksize,
                          const float* scales, const float* offsets, int64_t n0, int64_t nc, int64_t k0,
                          uint16_t* panel);
#endif

// The rows of the active ISA (isa.h).
const GemmKernels& gemm_kernels();

// gemm_applies (ops.h) for row k: a caller holding one row for a whole call asks it of that row
// (4-bit absmax codes, minmax ones where the row takes them, 8-bit ones in the forward where the
// row takes them, and in the transposed product where bytes_transposed; forward: the forward).
bool gemm_applies_on(const GemmKernels& k, int x_dtype, int64_t K, int64_t blocksize, const Codebook& cb, int rule,
                     const float* offsets, bool sparse24, bool forward = false);
const GemmVectorKernels& gemm_vector_kernels();

// Rows [0, M) of x [M, K] (bfloat16, row stride ldx) packed by pack (k's pack_x or pack_g) into a
// new buffer, padded to whole tiles of k.tile_rows rows and 32 inputs; tiles packed in parallel.
std::unique_ptr<int32_t[]> packed_rows(const GemmKernels& k, decltype(GemmKernels::pack_x) pack, const void* x,
                                       int64_t M, int64_t K, int64_t ldx);

}  // namespace qengine::cpu
