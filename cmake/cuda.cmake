# CUDA detection: QENGINE_CUDA=AUTO builds the .cu sources when nvcc is found, ON requires
# it, OFF skips it. The CUDA runtime is linked statically so a wheel needs only the driver.
set(QENGINE_WITH_CUDA OFF)
if(NOT QENGINE_CUDA STREQUAL "OFF")
  include(CheckLanguage)
  check_language(CUDA)
  if(CMAKE_CUDA_COMPILER)
    set(QENGINE_WITH_CUDA ON)
  elseif(QENGINE_CUDA STREQUAL "ON")
    message(FATAL_ERROR "QENGINE_CUDA=ON but no CUDA compiler was found (set CUDACXX or PATH)")
  else()
    message(STATUS "qengine: no CUDA compiler found, building the CPU backend only")
  endif()
endif()

if(QENGINE_WITH_CUDA)
  # Default targets: Turing, Ampere, Ada, Hopper, plus PTX of the newest for forward
  # compatibility (Blackwell and later JIT-compile it). Keep in step with pyproject.toml.
  set(QENGINE_CUDA_ARCHITECTURES "75;80;86;89;90" CACHE STRING "CUDA architectures (PTX is added for the last)")
  list(GET QENGINE_CUDA_ARCHITECTURES -1 _qengine_last_arch)
  set(_archs "")
  foreach(a IN LISTS QENGINE_CUDA_ARCHITECTURES)
    if(a STREQUAL _qengine_last_arch)
      list(APPEND _archs "${a}-real" "${a}-virtual")
    else()
      list(APPEND _archs "${a}-real")
    endif()
  endforeach()
  set(CMAKE_CUDA_ARCHITECTURES "${_archs}")
  enable_language(CUDA)
  set(CMAKE_CUDA_STANDARD 17)
  set(CMAKE_CUDA_STANDARD_REQUIRED ON)
  find_package(CUDAToolkit REQUIRED)
  message(STATUS "qengine: building CUDA kernels for ${CMAKE_CUDA_ARCHITECTURES}")
endif()

set(QENGINE_CUDA_SOURCES
  csrc/cuda/runtime.cu
  csrc/cuda/dequantize.cu
  csrc/cuda/quantize.cu
  csrc/cuda/matmul.cu
  csrc/cuda/matmul_t.cu
  csrc/cuda/optim.cu
  csrc/cuda/sparse24.cu
)

function(qengine_add_cuda_sources target)
  target_sources(${target} PRIVATE ${QENGINE_CUDA_SOURCES})
  target_compile_definitions(${target} PRIVATE QENGINE_WITH_CUDA=1)
  # No implicit FMA contraction: results must match the CPU byte for byte.
  target_compile_options(${target} PRIVATE $<$<COMPILE_LANGUAGE:CUDA>:--fmad=false>)
  set_target_properties(${target} PROPERTIES CUDA_RUNTIME_LIBRARY Static)
  target_link_libraries(${target} PRIVATE CUDA::cudart_static)
endfunction()
