// pybind11 bindings of qengine._C. Buffers cross as integer addresses that python/qengine/ops/
// has checked (device, dtype, contiguity, size); a quantized weight crosses as one WeightRef
// tuple (bind_args.h), sizes checked again here. Every call releases the GIL and turns a
// non-zero status into a Python exception.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "bind_args.h"
#include "cpu/common/isa.h"
#include "cpu/common/thread_pool.h"
#include "qengine/ops.h"
#include "qengine/status.h"

#if defined(QENGINE_WITH_CUDA)
#include "cuda/check.h"
#endif

namespace py = pybind11;

void bind_optim(py::module_& m);  // bind_optim.cpp
void bind_moe(py::module_& m);    // bind_moe.cpp
using qengine::Codebook;

namespace {

using qengine::bind::addr;
using qengine::bind::block_scales;
using qengine::bind::codebook;
using qengine::bind::element_count;
using qengine::bind::ptr;
using qengine::bind::raise_on_error;
using qengine::bind::weight_ref;
using qengine::bind::weight_ref_any_layout;
using qengine::bind::without_gil;
using qengine::bind::WeightRef;
using qengine::BlockScales;

int quantize_cpu(addr x, int dtype, int64_t n, int64_t blocksize, addr table, addr midpoints, addr order, int bits,
                 bool identity, addr grid_lut, int rule, addr packed, addr scales, addr offsets) {
  int s = qengine::quantize_cpu(ptr<const void>(x), dtype, n, blocksize,
                                codebook(table, midpoints, order, bits, identity, grid_lut),
                                rule, ptr<uint8_t>(packed), ptr<float>(scales), ptr<float>(offsets));
  raise_on_error(s);
  return s;
}

// Every function taking a quantized weight reads it once, as the WeightRef tuple of
// bind_args.h (checked against the values it will read), then releases the GIL.
int dequantize_cpu(const py::tuple& weight, int64_t n, addr out, int out_dtype, bool stream) {
  const WeightRef w = weight_ref(weight, n);
  return without_gil([&] {
    return qengine::dequantize_cpu(w.packed_ptr(), n, w.blocksize, w.codebook(), w.rule, w.block_scales(),
                                   w.offsets_ptr(), ptr<void>(out), out_dtype, stream);
  });
}

int dequantize_range_cpu(const py::tuple& weight, int64_t first, int64_t count, addr out, int out_dtype) {
  if (first < 0 || count < 0) throw py::value_error("qengine: dequantize_range: negative first or count");
  const WeightRef w = weight_ref(weight, first + count);
  return without_gil([&] {
    return qengine::dequantize_range_cpu(w.packed_ptr(), first, count, w.blocksize, w.codebook(), w.rule,
                                         w.block_scales(), w.offsets_ptr(), ptr<void>(out), out_dtype);
  });
}

int dequantize_columns_cpu(const py::tuple& weight, int64_t rows, int64_t K, int64_t k0, int64_t cols, addr out,
                           int out_dtype) {
  if (rows < 0 || K < 0 || k0 < 0 || cols < 0 || k0 > K || cols > K - k0) {
    throw py::value_error("qengine: dequantize_columns: columns [k0, k0 + cols) outside the rows' K");
  }
  const WeightRef w = weight_ref(weight, element_count({rows, K}));
  return without_gil([&] {
    return qengine::dequantize_columns_cpu(w.packed_ptr(), rows, K, k0, cols, w.blocksize, w.codebook(), w.rule,
                                           w.block_scales(), w.offsets_ptr(), ptr<void>(out), out_dtype);
  });
}

int matmul_cpu(addr x, int x_dtype, int64_t M, int64_t K, int64_t ldx, int64_t N, const py::tuple& weight, addr y) {
  const WeightRef w = weight_ref(weight, element_count({N, K}));
  return without_gil([&] {
    return qengine::matmul_cpu(ptr<const void>(x), x_dtype, M, K, ldx, N, w.packed_ptr(), w.blocksize, w.codebook(),
                               w.rule, w.block_scales(), w.offsets_ptr(), ptr<float>(y));
  });
}

// True when a large-batch kernel computed y (y_dtype: float32, or bfloat16 rounded once by the
// kernel); false (y untouched) where none applies.
// lora_r = 0: no side path (a, b, ab_dtype and lora_scale unused).
// A 2:4 weight (its WeightRef with positions) holds N * K / 2 codes.
bool matmul_large_cpu(addr x, int x_dtype, int64_t M, int64_t K, int64_t ldx, int64_t N, const py::tuple& weight,
                      addr a, addr b, int ab_dtype, int64_t lora_r, float lora_scale, addr y, int y_dtype) {
  const WeightRef w = weight_ref_any_layout(weight, element_count({N, K}));
  const qengine::LoraArgs lora{ptr<const void>(a), ptr<const void>(b), ab_dtype, lora_r, lora_scale};
  bool done = false;
  without_gil([&] {
    return qengine::matmul_large_cpu(ptr<const void>(x), x_dtype, M, K, ldx, N, w.packed_ptr(), w.positions_ptr(),
                                     w.blocksize, w.codebook(), w.rule, w.block_scales(), w.offsets_ptr(), lora,
                                     ptr<void>(y), y_dtype, &done);
  });
  return done;
}

// True when a large-batch kernel computed gx; false (gx untouched) where none applies.
bool matmul_t_large_cpu(addr g, int g_dtype, int64_t M, int64_t N, int64_t K, const py::tuple& weight, addr gx,
                        int gx_dtype) {
  const WeightRef w = weight_ref_any_layout(weight, element_count({N, K}));
  bool done = false;
  without_gil([&] {
    return qengine::matmul_t_large_cpu(ptr<const void>(g), g_dtype, M, N, K, w.packed_ptr(), w.positions_ptr(),
                                       w.blocksize, w.codebook(), w.rule, w.block_scales(), w.offsets_ptr(),
                                       ptr<void>(gx), gx_dtype, &done);
  });
  return done;
}

int matmul_t_cpu(addr g, int64_t M, int64_t N, int64_t K, const py::tuple& weight, addr gx) {
  const WeightRef w = weight_ref(weight, element_count({N, K}));
  return without_gil([&] {
    return qengine::matmul_t_cpu(ptr<const float>(g), M, N, K, w.packed_ptr(), w.blocksize, w.codebook(), w.rule,
                                 w.block_scales(), w.offsets_ptr(), ptr<float>(gx));
  });
}

// True when the native kernels ran (lora_backward_cpu in ops.h; a zero address: that output is
// not wanted); false, nothing written, where the CPU has none. Sizes are checked by the caller
// (qengine/ops/cpu.py), which allocates every buffer from them.
bool lora_backward_cpu(addr g, addr x, int64_t M, int64_t N, int64_t K, addr a, addr b, int64_t r, float scale,
                       addr gx_in, addr gx_out, addr ga, addr gb) {
  bool done = false;
  without_gil([&] {
    return qengine::lora_backward_cpu(ptr<const void>(g), ptr<const void>(x), M, N, K, ptr<const float>(a),
                                      ptr<const float>(b), r, scale, ptr<const void>(gx_in), ptr<void>(gx_out),
                                      ptr<float>(ga), ptr<float>(gb), &done);
  });
  return done;
}

// True when the native kernels ran (lora_add_cpu in ops.h); false, nothing written, where the
// CPU has none. Sizes are checked by the caller (qengine/ops/cpu.py), which allocates y.
bool lora_add_cpu(addr x, int64_t M, int64_t K, addr a, addr b, int64_t r, int64_t N, float scale, addr y_in,
                  addr y_out) {
  bool done = false;
  without_gil([&] {
    return qengine::lora_add_cpu(ptr<const void>(x), M, K, ptr<const float>(a), ptr<const float>(b), r, N, scale,
                                 ptr<const void>(y_in), ptr<void>(y_out), &done);
  });
  return done;
}

int lora_epilogue_cpu(addr x, int x_dtype, int64_t M, int64_t K, addr a, addr b, int ab_dtype, int64_t R, int64_t N,
                      float scale, addr y) {
  int s = qengine::lora_epilogue_cpu(ptr<const void>(x), x_dtype, M, K, ptr<const void>(a), ptr<const void>(b),
                                     ab_dtype, R, N, scale, ptr<float>(y));
  raise_on_error(s);
  return s;
}

int cast_float_cpu(addr src, int64_t n, addr dst, int dst_dtype) {
  int s = qengine::cast_float_cpu(ptr<const float>(src), n, ptr<void>(dst), dst_dtype);
  raise_on_error(s);
  return s;
}

double kmeans_accumulate_cpu(addr x, int dtype, int64_t n, int64_t blocksize, addr table, addr midpoints, int bits,
                             int rule, addr sums, addr counts) {
  double sse = 0.0;
  int s = qengine::kmeans_accumulate_cpu(ptr<const void>(x), dtype, n, blocksize,
                                         codebook(table, midpoints, 0, bits, true), rule, ptr<double>(sums),
                                         ptr<double>(counts), &sse);
  raise_on_error(s);
  return sse;
}

int sparse24_dequantize_cpu(const py::tuple& weight, int64_t S, addr out, int out_dtype) {
  const WeightRef w = weight_ref(weight, S);
  if (S > 0 && w.positions == 0) throw py::value_error("qengine: a 2:4 weight needs its positions");
  return without_gil([&] {
    return qengine::sparse24_dequantize_cpu(w.packed_ptr(), w.positions_ptr(), S, w.blocksize, w.codebook(), w.rule,
                                            w.block_scales(), w.offsets_ptr(), ptr<void>(out), out_dtype);
  });
}

int sparse24_dequantize_columns_cpu(const py::tuple& weight, int64_t row0, int64_t rows, int64_t N, int64_t K,
                                    int64_t k0, int64_t cols, addr out, int out_dtype) {
  if (row0 < 0 || rows < 0 || N < 0 || K < 0 || row0 > N || rows > N - row0 || k0 < 0 || cols < 0 || k0 > K ||
      cols > K - k0) {
    throw py::value_error("qengine: sparse24_dequantize_columns: rows or columns outside the [N, K] weight");
  }
  if (K % 256 != 0 || k0 % 256 != 0 || cols % 256 != 0) {
    throw py::value_error("qengine: sparse24_dequantize_columns: K, k0 and cols must be multiples of 256");
  }
  const WeightRef w = weight_ref(weight, element_count({N, K}) / 2);
  if (N * K > 0 && w.positions == 0) throw py::value_error("qengine: a 2:4 weight needs its positions");
  return without_gil([&] {
    return qengine::sparse24_dequantize_columns_cpu(w.packed_ptr(), w.positions_ptr(), N * K / 2, row0, rows, K, k0,
                                                    cols, w.blocksize, w.codebook(), w.rule, w.block_scales(),
                                                    w.offsets_ptr(), ptr<void>(out), out_dtype);
  });
}

int sparse24_matmul_cpu(addr x, int x_dtype, int64_t M, int64_t K, int64_t ldx, int64_t N, const py::tuple& weight,
                        addr y) {
  const WeightRef w = weight_ref(weight, element_count({N, K}) / 2);
  if (N * K > 0 && w.positions == 0) throw py::value_error("qengine: a 2:4 weight needs its positions");
  return without_gil([&] {
    return qengine::sparse24_matmul_cpu(ptr<const void>(x), x_dtype, M, K, ldx, N, w.packed_ptr(), w.positions_ptr(),
                                        w.blocksize, w.codebook(), w.rule, w.block_scales(), w.offsets_ptr(),
                                        ptr<float>(y));
  });
}

void set_isa(const std::string& name) {
  if (!qengine::cpu::set_isa(name.c_str())) {
    throw py::value_error("qengine: CPU ISA '" + name + "' is unknown or not supported here (supported: " +
                          qengine::cpu::supported_isas() + ")");
  }
}

#if defined(QENGINE_WITH_CUDA)
int cuda_device_count() {
  int count = 0;
  qengine::cuda_device_count(&count);
  return count;
}

int dequantize_cuda(const py::tuple& weight, int64_t n, addr out, int out_dtype, addr stream) {
  const WeightRef w = weight_ref(weight, n);
  const float* scales = w.float_scales("dequantize");  // before the GIL is released: it may throw
  return without_gil([&] {
    return qengine::dequantize_cuda(w.packed_ptr(), n, w.blocksize, w.codebook(), w.rule, scales,
                                    w.offsets_ptr(), ptr<void>(out), out_dtype, ptr<void>(stream));
  });
}

int quantize_cuda(addr x, int dtype, int64_t n, int64_t blocksize, addr table, addr midpoints, addr order, int bits,
                  bool identity, addr grid_lut, int rule, addr packed, addr scales, addr offsets, addr flags,
                  addr stream) {
  int s = qengine::quantize_cuda(ptr<const void>(x), dtype, n, blocksize,
                                 codebook(table, midpoints, order, bits, identity, grid_lut), rule,
                                 ptr<uint8_t>(packed), ptr<float>(scales), ptr<float>(offsets), ptr<int>(flags),
                                 ptr<void>(stream));
  raise_on_error(s);
  return s;
}

// As matmul_cpu, with the nested mean read from the weight's mean_address (a device float:
// no host synchronisation) instead of its value.
int matmul_cuda(addr x, int64_t M, int64_t K, int64_t ldx, int64_t N, const py::tuple& weight, addr y, addr stream) {
  const WeightRef w = weight_ref(weight, element_count({N, K}));
  BlockScales scales = w.block_scales();
  scales.mean = 0.0f;
  return without_gil([&] {
    return qengine::matmul_cuda(ptr<const float>(x), M, K, ldx, N, w.packed_ptr(), w.blocksize, w.codebook(), w.rule,
                                scales, ptr<const float>(w.mean_address), w.offsets_ptr(), ptr<float>(y),
                                ptr<void>(stream));
  });
}

int matmul_t_cuda(addr g, int64_t M, int64_t N, int64_t K, const py::tuple& weight, addr workspace,
                  int64_t workspace_floats, addr gx, addr stream) {
  const WeightRef w = weight_ref(weight, element_count({N, K}));
  BlockScales scales = w.block_scales();
  scales.mean = 0.0f;
  return without_gil([&] {
    return qengine::matmul_t_cuda(ptr<const float>(g), M, N, K, w.packed_ptr(), w.blocksize, w.codebook(), w.rule,
                                  scales, ptr<const float>(w.mean_address), w.offsets_ptr(), ptr<float>(workspace),
                                  workspace_floats, ptr<float>(gx), ptr<void>(stream));
  });
}

int sparse24_dequantize_cuda(const py::tuple& weight, int64_t S, addr out, int out_dtype, addr stream) {
  const WeightRef w = weight_ref(weight, S);
  if (S > 0 && w.positions == 0) throw py::value_error("qengine: a 2:4 weight needs its positions");
  const float* scales = w.float_scales("sparse24_dequantize");  // before the GIL is released: it may throw
  return without_gil([&] {
    return qengine::sparse24_dequantize_cuda(w.packed_ptr(), w.positions_ptr(), S, w.blocksize, w.codebook(), w.rule,
                                             scales, w.offsets_ptr(), ptr<void>(out), out_dtype,
                                             ptr<void>(stream));
  });
}
#endif

}  // namespace

PYBIND11_MODULE(_C, m) {
  using release = py::call_guard<py::gil_scoped_release>;
  m.doc() = "qengine native kernels (no libtorch dependency)";
  m.def("quantize_cpu", &quantize_cpu, release());
  m.def("dequantize_cpu", &dequantize_cpu);  // releases the GIL itself
  m.def("dequantize_range_cpu", &dequantize_range_cpu);  // releases the GIL itself
  m.def("dequantize_columns_cpu", &dequantize_columns_cpu);  // releases the GIL itself
  m.def("matmul_cpu", &matmul_cpu);  // releases the GIL itself
  m.def("matmul_large_cpu", &matmul_large_cpu);  // releases the GIL itself
  m.def("gemm_min_rows", &qengine::gemm_min_rows, py::arg("sparse24") = false,
        "The fewest rows of x from which the active ISA's large-batch kernel (matmul_large_cpu) beats the GEMV "
        "(sparse24: of the 2:4 layout).");
  m.def("matmul_t_cpu", &matmul_t_cpu);  // releases the GIL itself
  m.def("matmul_t_large_cpu", &matmul_t_large_cpu);  // releases the GIL itself
  m.def("lora_epilogue_cpu", &lora_epilogue_cpu, release());
  m.def("lora_backward_cpu", &lora_backward_cpu);  // releases the GIL itself
  m.def("lora_add_cpu", &lora_add_cpu);  // releases the GIL itself
  m.def("cast_float_cpu", &cast_float_cpu, release());
  m.def("kmeans_accumulate_cpu", &kmeans_accumulate_cpu, release());
  m.def("sparse24_dequantize_cpu", &sparse24_dequantize_cpu);  // releases the GIL itself
  m.def("sparse24_dequantize_columns_cpu", &sparse24_dequantize_columns_cpu);  // releases the GIL itself
  m.def("sparse24_matmul_cpu", &sparse24_matmul_cpu);  // releases the GIL itself
  m.def("cpu_isa", [] { return std::string(qengine::cpu::isa_name()); });
  m.def("supported_isas", [] { return std::string(qengine::cpu::supported_isas()); });
  m.def("vbmi_scales", &qengine::cpu::vbmi_scales_available,
        "Whether the CPU kernels use AVX-512 VBMI byte permutes instead of gathers (matmul scales, 8-bit "
        "optimizer states; off: QENGINE_NO_VBMI=1).");
  m.def("set_isa", &set_isa);
  m.def("num_threads", &qengine::cpu::num_threads);
  m.def("use_openmp_runtime", [](const std::string& path) { return qengine::cpu::use_openmp_runtime(path.c_str()); });
  m.def("openmp_runtime", [] { return std::string(qengine::cpu::openmp_runtime()); });
  m.def("set_num_threads", [](int n) {
    if (n < 1) throw py::value_error("qengine: num_threads must be >= 1");
    qengine::cpu::set_num_threads(n);
  });
#if defined(QENGINE_WITH_CUDA)
  m.attr("cuda_compiled") = true;
  py::module_ cuda = m.def_submodule("cuda", "CUDA kernels");
  cuda.def("device_count", &cuda_device_count, release());
  cuda.def("dequantize", &dequantize_cuda);  // releases the GIL itself
  cuda.def("quantize", &quantize_cuda, release());
  cuda.def("matmul", &matmul_cuda);  // releases the GIL itself
  cuda.def("matmul_t", &matmul_t_cuda);  // releases the GIL itself
  cuda.def("matmul_t_workspace", &qengine::matmul_t_cuda_workspace);
  cuda.def("sparse24_dequantize", &sparse24_dequantize_cuda);  // releases the GIL itself
#else
  m.attr("cuda_compiled") = false;
#endif
  bind_optim(m);
  bind_moe(m);
}
