# Per-file ISA flags: each *_avx2.cpp / *_avx512.cpp is compiled for that ISA only, and the
# variant is chosen at load time (csrc/cpu/dispatch.cpp). Nothing is built with -march=native.
function(qengine_set_isa_flags)
  if(CMAKE_SYSTEM_PROCESSOR MATCHES "x86_64|AMD64|amd64")
    set_source_files_properties(csrc/cpu/kernels_avx2.cpp PROPERTIES
      COMPILE_OPTIONS "-mavx2;-mfma;-mf16c")
    set_source_files_properties(csrc/cpu/kernels_avx512.cpp csrc/cpu/gemv_avx512.cpp PROPERTIES
      COMPILE_OPTIONS "-mavx512f;-mavx512bw;-mavx512vl;-mavx512dq;-mavx2;-mfma;-mf16c")
    set_source_files_properties(csrc/cpu/gemv_avx512bf16.cpp PROPERTIES
      COMPILE_OPTIONS "-mavx512f;-mavx512bw;-mavx512vl;-mavx512dq;-mavx512bf16;-mavx2;-mfma;-mf16c")
    # Bulk decode of double-quantized scales and the 8-bit optimizer step without gathers
    # (called only on CPUs with VBMI).
    set_source_files_properties(csrc/cpu/nested_scales_vbmi.cpp csrc/cpu/optim_avx512vbmi.cpp PROPERTIES
      COMPILE_OPTIONS "-mavx512f;-mavx512bw;-mavx512vl;-mavx512dq;-mavx512vbmi;-mavx2;-mfma;-mf16c")
    # The fused optimizer step (optim.cpp dispatches on the same ISA choice).
    set_source_files_properties(csrc/cpu/optim_avx2.cpp PROPERTIES COMPILE_OPTIONS "-mavx2;-mfma;-mf16c")
    set_source_files_properties(csrc/cpu/optim_avx512.cpp PROPERTIES
      COMPILE_OPTIONS "-mavx512f;-mavx512bw;-mavx512vl;-mavx512dq;-mavx2;-mfma;-mf16c")
    # The 2:4 sparse layout's GEMVs (sparse24.cpp picks them by the active table's name).
    set_source_files_properties(csrc/cpu/sparse24_avx512.cpp PROPERTIES
      COMPILE_OPTIONS "-mavx512f;-mavx512bw;-mavx512vl;-mavx512dq;-mavx2;-mfma;-mf16c")
    set_source_files_properties(csrc/cpu/sparse24_avx512bf16.cpp PROPERTIES
      COMPILE_OPTIONS "-mavx512f;-mavx512bw;-mavx512vl;-mavx512dq;-mavx512bf16;-mavx2;-mfma;-mf16c")
  endif()
endfunction()
