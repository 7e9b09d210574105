// The grouped Mixture-of-Experts forward (csrc/cpu/moe/moe.cpp): routed experts of a batch of
// tokens in one call. Each expert matrix is one quantized tensor of E stacked [N, K] weights
// (flat blocks over [E * N, K]); expert e is rows e*N .. e*N + N.
#pragma once
#include <cstdint>

#include "qengine/quant_math.h"

namespace qengine {

// How the first projection's rows hold the gate and the up projection.
enum GateLayout : int {
  kGateConcatenated = 0,  // rows [0, I): gate, rows [I, 2I): up   (Mixtral, Qwen-MoE, OLMoE)
  kGateInterleaved = 1,   // rows 2j: gate j, rows 2j + 1: up j
  kNoGate = 2,            // rows [0, I): up; h = act(up)
};

enum Activation : int { kSilu = 0, kGeluTanh = 1, kGeluErf = 2, kRelu = 3 };

struct ExpertMatrices {
  const uint8_t* packed;  // all experts' codes, [E * N * K * bits / 8] bytes
  int64_t blocksize;      // divides N * K (every expert starts on a block)
  Codebook cb;
  int rule;
  BlockScales scales;     // over all E * N * K / blocksize blocks
  const float* offsets;   // minmax formats: float32 per block, else null
  int64_t N, K;           // one expert's weight is [N, K]
  const void* bias;       // [E, N] of bias_dtype, or null
  int bias_dtype;
  const void* lora_a;     // [E, R, K] of lora_dtype, or null (then lora_b is null too)
  const void* lora_b;     // [E, N, R]
  int lora_dtype;
  int64_t lora_rank;
  float lora_scale;
};

// y[T, H] (float32, overwritten) = sum over k of weights[t, k] * expert_{index[t, k]}(x[t]),
// expert(x) = down(act(gate(x)) * up(x)) (+ biases, + per-expert LoRA on both matrices).
// x [T, H] of x_dtype (row stride H); index int64 [T, topk]; weights float32 [T, topk].
// up: N = 2I (or I with kNoGate), K = H; down: N = H, K = I. The intermediate is rounded to
// x's dtype before the down projection, as in a dense model of that dtype. Returns
// kInvalidArgument for an expert index outside [0, E) before computing anything.
int moe_experts_cpu(const void* x, int x_dtype, int64_t T, int64_t H, const int64_t* index, const float* weights,
                    int64_t topk, int64_t E, const ExpertMatrices& up, const ExpertMatrices& down, int gate_layout,
                    int activation, float* y);

}  // namespace qengine
