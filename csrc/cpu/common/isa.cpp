// ISA detection and the active ISA (isa.h), decided here once for every kernel family.
#include "cpu/common/isa.h"

#include <atomic>
#include <cstdlib>
#include <cstring>

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

struct Named {
  const char* name;
  Isa isa;
  bool (*supported)();
};

bool always() { return true; }

// Lowest first; QENGINE_CPU_ISA and set_isa take these names.
constexpr Named kIsas[] = {{"scalar", Isa::kScalar, always},
                           {"avx2", Isa::kAvx2, cpu_has_avx2},
                           {"avx512", Isa::kAvx512, cpu_has_avx512},
                           {"avx512_bf16", Isa::kAvx512Bf16, cpu_has_avx512_bf16}};

const Named* find(const char* name) {
  for (const Named& n : kIsas) {
    if (std::strcmp(n.name, name) == 0) return n.supported() ? &n : nullptr;
  }
  return nullptr;
}

const Named* best() {
  const Named* b = &kIsas[0];
  for (const Named& n : kIsas) {
    if (n.supported()) b = &n;
  }
  return b;
}

const Named* initial() {
  const char* env = std::getenv("QENGINE_CPU_ISA");
  if (env != nullptr && *env != '\0') {
    if (const Named* n = find(env)) return n;
  }
  return best();
}

std::atomic<const Named*> g_active{initial()};

}  // namespace

Isa active_isa() { return g_active.load(std::memory_order_acquire)->isa; }

const char* isa_name() { return g_active.load(std::memory_order_acquire)->name; }

bool set_isa(const char* name) {
  const Named* n = find(name);
  if (n == nullptr) return false;
  g_active.store(n, std::memory_order_release);
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

}  // namespace qengine::cpu
