// The CPU's instruction sets, the one chosen for every kernel family (once at load: the best
// this CPU and OS support, or a lower one named by QENGINE_CPU_ISA for testing), and the pick
// of a family's table row for it.
#pragma once

namespace qengine::cpu {

enum class Isa { kScalar, kAvx2, kAvx512, kAvx512Bf16, kAmx };

Isa active_isa();
const char* isa_name();
// Returns false when `name` is unknown or the CPU lacks it.
bool set_isa(const char* name);
// Comma-separated ISA names this CPU supports, best last.
const char* supported_isas();
// True where the CPU has AVX-512 VBMI (and AVX-512 F/BW) and QENGINE_NO_VBMI is unset (the
// switch keeps the gather path testable on such CPUs). Independent of the active ISA.
bool vbmi_scales_available();

// A family's table rows by ISA, filled by name; a row left out falls back to the next lower
// ISA's (amx -> avx512_bf16 -> avx512 -> avx2 -> scalar), so a family lists only the ISAs it has.
template <class Table>
struct IsaRows {
  const Table* scalar = nullptr;
  const Table* avx2 = nullptr;
  const Table* avx512 = nullptr;
  const Table* avx512_bf16 = nullptr;
  const Table* amx = nullptr;

  const Table& active() const {
    static_assert(static_cast<int>(Isa::kAmx) == 4, "by_isa lists the rows in Isa's order");
    const Table* const by_isa[] = {scalar, avx2, avx512, avx512_bf16, amx};  // Isa's order
    for (int i = static_cast<int>(active_isa()); i > 0; --i) {
      if (by_isa[i] != nullptr) return *by_isa[i];
    }
    return *scalar;
  }
};

// An IsaRows initializer's x86 rows, which exist only where they are compiled:
// {.scalar = &kScalar, QENGINE_X86_ROWS(.avx2 = &kAvx2, .avx512 = &kAvx512)}.
#if defined(__x86_64__) || defined(_M_X64)
#define QENGINE_X86_ROWS(...) __VA_ARGS__
#else
#define QENGINE_X86_ROWS(...)
#endif

}  // namespace qengine::cpu
