// ISA detection and the active ISA (isa.h), decided here once for every kernel family.
#include "cpu/common/isa.h"

#include <atomic>
#include <cstdlib>
#include <cstring>

#if defined(__linux__) && (defined(__x86_64__) || defined(_M_X64))
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

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

#if defined(__linux__) && (defined(__x86_64__) || defined(_M_X64))
// AMX-TILE and AMX-BF16 (CPUID leaf 7: EDX bits 24 and 22), the OS saving the tile state (XCR0
// bits 17 and 18), and Linux's permission for this process to use tile data, which it grants on
// request (arch_prctl ARCH_REQ_XCOMP_PERM, feature 18) and which every thread then shares.
// Asked once; a refusal (e.g. a signal stack too small for the tile state) leaves AMX off.
bool amx_permitted() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (__get_cpuid_count(7, 0, &a, &b, &c, &d) == 0) return false;
  if ((d & (1u << 24)) == 0 || (d & (1u << 22)) == 0) return false;
  if (__get_cpuid(1, &a, &b, &c, &d) == 0 || (c & (1u << 27)) == 0) return false;  // OSXSAVE
  unsigned lo = 0, hi = 0;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  if ((lo & (3u << 17)) != (3u << 17)) return false;
  constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
}

bool cpu_has_amx() {
  // VBMI too: the amx row's files are compiled with it (cpu_flags.cmake); every AMX CPU has it.
  static const bool has = cpu_has_avx512_bf16() && __builtin_cpu_supports("avx512vbmi") && amx_permitted();
  return has;
}
#else
bool cpu_has_amx() { return false; }
#endif

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
                           {"avx512_bf16", Isa::kAvx512Bf16, cpu_has_avx512_bf16},
                           {"amx", Isa::kAmx, cpu_has_amx}};

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
  if (cpu_has_amx()) return "scalar,avx2,avx512,avx512_bf16,amx";
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
