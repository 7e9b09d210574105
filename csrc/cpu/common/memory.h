// Memory hints for freshly allocated outputs.
#pragma once
#include <cstddef>

namespace qengine::cpu {

// Asks the OS to back the 2 MiB-aligned interior of [p, p + bytes) with transparent huge pages
// (Linux, when THP is in "madvise" mode): a fresh output then takes one page fault per 2 MiB
// instead of per 4 KiB, which is most of an allocating call's cost. Advisory: no-op elsewhere,
// for small buffers, or when the kernel declines.
void advise_huge_pages(void* p, size_t bytes);

}  // namespace qengine::cpu
