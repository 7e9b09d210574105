// The 2:4 sparse layout's byte order and its family table (sparse24.cpp and its ISA rows).
//
// A weight [N, K] (K % 4 == 0) keeps 2 values of every group of 4 consecutive weights. The
// kept values in natural order (v = 2g + k: group g, k = 0 the one at the lower position)
// form S = N*K/2 stored values, quantized blockwise by the dense machinery over their
// *storage* order, which permutes each full chunk of 128 stored values (256 weights):
//   storage element e = 4i + kPairOrder24[j] of a chunk holds chunk-relative v = 32j + i
// (i < 32, j < 4), so the bfloat16 GEMV reading the chunk as 32 words of 4 nibbles finds, at
// step j, the kept values of groups 16j..16j+15: all draw from the 64 weights 64j..64j+63.
// A trailing partial chunk (S % 128 values) is stored in natural order.
// Positions (0..3 within the group, 2 bits each) take S/4 bytes (rounded up): byte i, bits
// 2j..2j+1 of a full chunk's 32 bytes hold the position of v = 32j + i (word i, step j, as
// the codes); in the tail, byte t bits 2j..2j+1 hold the position of v = 4t + j.
#pragma once
#include <cstdint>

#include "cpu/common/isa.h"
#include "qengine/quant_math.h"

namespace qengine::cpu {

constexpr int64_t kChunk24 = 128;  // stored values per chunk (256 weights)
constexpr int kPairOrder24[4] = {1, 0, 3, 2};

// Chunk-relative natural index of storage element e (full chunks).
inline int natural_of_storage24(int e) {
  const int i = e >> 2;
  const int r = e & 3;
  const int j = r ^ 1;  // kPairOrder24 is its own inverse
  return 32 * j + i;
}

// Chunk c of row o (ks stored values a row): its 32 position bytes, with the bytes half of
// `ahead` beyond them prefetched (the positions run at half the codes' rate).
inline const uint8_t* chunk_positions24(const uint8_t* positions, int64_t ks, int64_t o, int64_t c, int64_t ahead) {
  const uint8_t* pos = positions + (o * ks >> 2) + c * 32;
  __builtin_prefetch(pos + (ahead >> 1), 0, 3);  // prefetcht0, as the codes'
  return pos;
}

// The 2:4 family's per-ISA table (rows by field name in sparse24_avx512.cpp; the scalar row is
// empty: the portable path of sparse24.cpp decodes rows and uses the gemv family's dot_rows).
// Both kernels: y[m * ldy + o] += dot(x[m], W[o]) for m < M <= 8, rows o in [o0, o1), 256-weight
// chunks [c0, c1) of each row; 4-bit absmax codes, K % 256 == 0, (K / 2) % blocksize == 0,
// blocksize a power of two >= 32, c1 - c0 <= 64; x rows of stride ldx elements.
struct Sparse24Kernels {
  // float32 x (exact float32 weights, as the dense float32 GEMV).
  void (*gemv)(const float* x, int64_t M, int64_t ldx, int64_t K, const uint8_t* packed, const uint8_t* positions,
               int64_t blocksize, const float* table, const BlockScales& scales, int64_t o0, int64_t o1, int64_t c0,
               int64_t c1, float* y, int64_t ldy) = nullptr;
  // bfloat16 x: table values rounded to bfloat16, float32 accumulation.
  void (*gemv_bf16)(const uint16_t* x, int64_t M, int64_t ldx, int64_t K, const uint8_t* packed,
                    const uint8_t* positions, int64_t blocksize, const float* table, const BlockScales& scales,
                    int64_t o0, int64_t o1, int64_t c0, int64_t c1, float* y, int64_t ldy) = nullptr;
};

#if defined(__x86_64__) || defined(_M_X64)
extern const Sparse24Kernels kSparse24Avx512;
extern const Sparse24Kernels kSparse24Avx512Bf16;
// sparse24_avx512bf16.cpp: the gemv_bf16 of the avx512_bf16 row.
void sparse24_gemv_avx512bf16(const uint16_t* x, int64_t M, int64_t ldx, int64_t K, const uint8_t* packed,
                              const uint8_t* positions, int64_t blocksize, const float* table,
                              const BlockScales& scales, int64_t o0, int64_t o1, int64_t c0, int64_t c1, float* y,
                              int64_t ldy);
#endif

// The ISA rows copy x into their own order a K span at a time, into a stack buffer of
// `chunk_rows` 256-weight chunk-rows: f(cs, ce) over consecutive spans [cs, ce) of chunks
// [c0, c1), each at most chunk_rows / M chunks (M <= 8 < chunk_rows). The drivers' K tiles are
// that size, so this is one span.
template <class F>
inline void for_buffered_spans(int64_t M, int64_t chunk_rows, int64_t c0, int64_t c1, F&& f) {
  const int64_t span = chunk_rows / M;
  for (int64_t cs = c0; cs < c1; cs += span) f(cs, c1 - cs < span ? c1 : cs + span);
}

// The row of the active ISA (isa.h).
const Sparse24Kernels& sparse24_kernels();

}  // namespace qengine::cpu
