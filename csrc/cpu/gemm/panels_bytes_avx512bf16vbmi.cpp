// The avx512_bf16 row's 8-bit weight panels: 8-bit codes (absmax: int8, dynamic8, fp8_e4m3, GGUF
// Q8_0 / Q6_K; minmax: uint8, GGUF Q5_K) decoded a 128-input chunk at a time by ByteChunks (VBMI byte permutes on the
// table's byte planes, as the amx row decodes them) into the panels of gemm_avx512bf16.cpp. Its
// own file because it needs VBMI, which not every AVX512-BF16 CPU has (gemm_applies_on asks). The
// transposed product's panels decode 32 columns of two rows at a time, one byte-plane lookup for
// both (decode_panel_t_bytes).
#if defined(__x86_64__) || defined(_M_X64)
#include "cpu/gemm/byte_chunks_vbmi.h"
#include "cpu/gemm/kernels.h"

namespace qengine::cpu {

void decode_panel_bytes(const uint8_t* codes, int64_t K, const ScalePlanes& code_planes, int64_t blocksize,
                        const float* scales, const float* offsets, int64_t first_row, int64_t n0, int64_t n_end,
                        int64_t k0, int64_t kc, uint16_t* panel) {
  const ByteChunks bytes(&code_planes, blocksize);
  const int64_t per_row = K >> bytes.log2_blocksize;
  const auto row = [&](int64_t n) { return codes + n * K; };
  const auto rs = [&](int64_t n) { return scales + (n - first_row) * per_row; };
  const auto os = [&](int64_t n) { return offsets == nullptr ? nullptr : offsets + n * per_row; };
  decode_panel_by([&](int64_t n, int64_t k, __m512i st[4]) { bytes.chunk(row(n), rs(n), k, st, os(n)); },
                  [&](int64_t n, int64_t k) { return bytes.segment(row(n), rs(n), k, os(n)); }, true, n0, n_end, k0,
                  kc, panel);
}

void decode_panel_t_bytes(const uint8_t* codes, int64_t K, const ScalePlanes& code_planes, int64_t blocksize,
                          const float* scales, const float* offsets, int64_t n0, int64_t nc, int64_t k0,
                          uint16_t* panel) {
  const ByteChunks bytes(&code_planes, blocksize);
  const PlaneRegs regs(code_planes);
  const int64_t per_row = K >> bytes.log2_blocksize;
  const auto os = [&](int64_t n) { return offsets == nullptr ? nullptr : offsets + n * per_row; };
  decode_panel_t_by(
      [&](int64_t n, int64_t k, __m512i& a, __m512i& b) {
        bytes.segment_pair(regs, codes + n * K, codes + (n + 1) * K, scales + n * per_row, scales + (n + 1) * per_row,
                           os(n), os(n + 1), k, a, b);
      },
      n0, nc, k0, panel);
}

}  // namespace qengine::cpu
#endif
