// Picks the CPU kernel table once, when the module loads: the best ISA this CPU and OS
// support, or a lower one named by QENGINE_CPU_ISA (scalar|avx2|avx512|avx512_bf16) for testing.
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>

#include "cpu/kernels.h"
#include "cpu/nested_scales.h"

namespace qengine::cpu {
namespace {

bool cpu_has_avx2() {
#if defined(__x86_64__) || defined(_M_X64)
  // __builtin_cpu_supports also checks that the OS saves the wide registers (XCR0).
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

bool cpu_has_avx512() {
#if defined(__x86_64__) || defined(_M_X64)
  return cpu_has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#else
  return false;
#endif
}

bool cpu_has_avx512_bf16() {
#if defined(__x86_64__) || defined(_M_X64)
  return cpu_has_avx512() && __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

const Kernels* table_for(const char* name) {
  if (std::strcmp(name, "scalar") == 0) return &kScalarKernels;
#if defined(__x86_64__) || defined(_M_X64)
  if (std::strcmp(name, "avx2") == 0 && cpu_has_avx2()) return &kAvx2Kernels;
  if (std::strcmp(name, "avx512") == 0 && cpu_has_avx512()) return &kAvx512Kernels;
  if (std::strcmp(name, "avx512_bf16") == 0 && cpu_has_avx512_bf16()) return &kAvx512Bf16Kernels;
#endif
  return nullptr;
}

const Kernels* best_table() {
#if defined(__x86_64__) || defined(_M_X64)
  if (cpu_has_avx512_bf16()) return &kAvx512Bf16Kernels;
  if (cpu_has_avx512()) return &kAvx512Kernels;
  if (cpu_has_avx2()) return &kAvx2Kernels;
#endif
  return &kScalarKernels;
}

const Kernels* initial_table() {
  const char* env = std::getenv("QENGINE_CPU_ISA");
  if (env != nullptr && *env != '\0') {
    if (const Kernels* k = table_for(env)) return k;
  }
  return best_table();
}

std::atomic<const Kernels*> g_kernels{initial_table()};

}  // namespace

const Kernels& kernels() { return *g_kernels.load(std::memory_order_acquire); }

const char* isa_name() { return kernels().name; }

bool set_isa(const char* name) {
  const Kernels* k = table_for(name);
  if (k == nullptr) return false;
  g_kernels.store(k, std::memory_order_release);
  return true;
}

const char* supported_isas() {
  if (cpu_has_avx512_bf16()) return "scalar,avx2,avx512,avx512_bf16";
  if (cpu_has_avx512()) return "scalar,avx2,avx512";
  if (cpu_has_avx2()) return "scalar,avx2";
  return "scalar";
}

bool vbmi_scales_available() {
#if defined(__x86_64__) || defined(_M_X64)
  static const bool available = cpu_has_avx512() && __builtin_cpu_supports("avx512vbmi") &&
                                std::getenv("QENGINE_NO_VBMI") == nullptr;
  return available;
#else
  return false;
#endif
}

ScalePlanes::ScalePlanes(const float* table) {
  for (int e = 0; e < 256; ++e) {
    uint32_t bits;
    std::memcpy(&bits, table + e, 4);
    for (int p = 0; p < 4; ++p) bytes[p * 256 + e] = static_cast<uint8_t>(bits >> (8 * p));
  }
}

}  // namespace qengine::cpu
