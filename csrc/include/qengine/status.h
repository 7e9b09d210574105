// Status codes returned by every native entry point; bind.cpp turns them into exceptions.
#pragma once

namespace qengine {

enum Status : int {
  kOk = 0,
  kNonFiniteInput = 1,    // NaN or Inf in the values to quantize
  kScaleOverflow = 2,     // a block's range (max - min) overflows float32
  kInvalidArgument = 3,   // sizes or codes the Python checks should have caught
  kCudaError = 4,         // a CUDA runtime call or launch failed
  kCodeOutOfRange = 5,    // a packed code indexes past the codebook
};

inline const char* status_message(int s) {
  switch (s) {
    case kOk: return "ok";
    case kNonFiniteInput: return "input contains NaN or Inf values; qengine does not quantize non-finite weights";
    case kScaleOverflow: return "a block's range (max - min) overflows float32";
    case kInvalidArgument: return "invalid argument passed to a native kernel";
    case kCudaError: return "CUDA error";
    case kCodeOutOfRange: return "a packed code is larger than the codebook (corrupt quantized data)";
    default: return "unknown qengine status";
  }
}

}  // namespace qengine
