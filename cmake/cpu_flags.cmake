# Per-file ISA flags: each ISA's flag string is defined once here, and a CPU source gets the
# flags its name's suffix names (*_avx2.cpp, *_avx512.cpp, *_avx512bf16.cpp, *_avx512vbmi.cpp,
# *_avx512bf16vbmi.cpp, *_amx.cpp);
# the variant is chosen at load time (csrc/cpu/common/isa.cpp). Nothing is built with
# -march=native.
set(QENGINE_FLAGS_AVX2 -mavx2 -mfma -mf16c)
set(QENGINE_FLAGS_AVX512 ${QENGINE_FLAGS_AVX2} -mavx512f -mavx512bw -mavx512vl -mavx512dq)
# vdpbf16ps (the bfloat16 GEMVs).
set(QENGINE_FLAGS_AVX512BF16 ${QENGINE_FLAGS_AVX512} -mavx512bf16)
# AMX tiles (the gemm family's amx row; called only where Linux grants tile data, isa.cpp), with
# VBMI's byte permutes for 8-bit codes (every AMX CPU has VBMI; isa.cpp requires it for the row).
set(QENGINE_FLAGS_AMX ${QENGINE_FLAGS_AVX512BF16} -mavx512vbmi -mamx-tile -mamx-bf16)
# Byte permutes: double-quantized scales and 8-bit optimizer states without gathers (called
# only on CPUs with VBMI).
set(QENGINE_FLAGS_AVX512VBMI ${QENGINE_FLAGS_AVX512} -mavx512vbmi)
# Both: the avx512_bf16 gemm row's 8-bit panels (called only on CPUs with VBMI).
set(QENGINE_FLAGS_AVX512BF16VBMI ${QENGINE_FLAGS_AVX512BF16} -mavx512vbmi)

# Applies the flags to every source in QENGINE_CPU_SOURCES by its suffix.
function(qengine_set_isa_flags)
  if(NOT CMAKE_SYSTEM_PROCESSOR MATCHES "x86_64|AMD64|amd64")
    return()
  endif()
  foreach(src IN LISTS QENGINE_CPU_SOURCES)
    foreach(isa AMX AVX512BF16VBMI AVX512BF16 AVX512VBMI AVX512 AVX2)
      string(TOLOWER "${isa}" suffix)
      if(src MATCHES "_${suffix}\\.cpp$")
        set_source_files_properties(${src} PROPERTIES COMPILE_OPTIONS "${QENGINE_FLAGS_${isa}}")
        break()
      endif()
    endforeach()
  endforeach()
endfunction()
