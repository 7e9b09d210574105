// pybind11 bindings of qengine._C. Buffers cross as integer addresses that
// python/qengine/_ops.py has checked (device, dtype, contiguity, size); every call releases
// the GIL and turns a non-zero status into a Python exception.
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
using qengine::bind::ptr;
using qengine::bind::raise_on_error;

int quantize_cpu(addr x, int dtype, int64_t n, int64_t blocksize, addr table, addr midpoints, addr order, int bits,
                 bool identity, addr grid_lut, int rule, addr packed, addr scales, addr offsets) {
  int s = qengine::quantize_cpu(ptr<const void>(x), dtype, n, blocksize,
                                codebook(table, midpoints, order, bits, identity, grid_lut),
                                rule, ptr<uint8_t>(packed), ptr<float>(scales), ptr<float>(offsets));
  raise_on_error(s);
  return s;
}

int dequantize_cpu(addr packed, int64_t n, int64_t blocksize, addr table, int bits, int rule, addr scales,
                   addr offsets, addr out, int out_dtype, bool stream) {
  int s = qengine::dequantize_cpu(ptr<const uint8_t>(packed), n, blocksize, codebook(table, 0, 0, bits, true), rule,
                                  ptr<const float>(scales), ptr<const float>(offsets), ptr<void>(out), out_dtype,
                                  stream);
  raise_on_error(s);
  return s;
}

int dequantize_range_cpu(addr packed, int64_t first, int64_t count, int64_t blocksize, addr table, int bits, int rule,
                         addr scales, addr offsets, addr out, int out_dtype) {
  int s = qengine::dequantize_range_cpu(ptr<const uint8_t>(packed), first, count, blocksize,
                                        codebook(table, 0, 0, bits, true), rule, ptr<const float>(scales),
                                        ptr<const float>(offsets), ptr<void>(out), out_dtype);
  raise_on_error(s);
  return s;
}

int matmul_cpu(addr x, int x_dtype, int64_t M, int64_t K, int64_t ldx, int64_t N, addr packed, int64_t blocksize,
               addr table, int bits, int rule, addr scales, addr nested_table, addr nested_absmax,
               int64_t nested_blocksize, float mean, addr offsets, addr y) {
  int s = qengine::matmul_cpu(ptr<const void>(x), x_dtype, M, K, ldx, N, ptr<const uint8_t>(packed), blocksize,
                              codebook(table, 0, 0, bits, true), rule,
                              block_scales(scales, nested_table, nested_absmax, nested_blocksize, mean),
                              ptr<const float>(offsets), ptr<float>(y));
  raise_on_error(s);
  return s;
}

int matmul_t_cpu(addr g, int64_t M, int64_t N, int64_t K, addr packed, int64_t blocksize, addr table, int bits,
                 int rule, addr scales, addr nested_table, addr nested_absmax, int64_t nested_blocksize, float mean,
                 addr offsets, addr gx) {
  int s = qengine::matmul_t_cpu(ptr<const float>(g), M, N, K, ptr<const uint8_t>(packed), blocksize,
                                codebook(table, 0, 0, bits, true), rule,
                                block_scales(scales, nested_table, nested_absmax, nested_blocksize, mean),
                                ptr<const float>(offsets), ptr<float>(gx));
  raise_on_error(s);
  return s;
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

int sparse24_dequantize_cpu(addr packed, addr positions, int64_t S, int64_t blocksize, addr table, int bits, int rule,
                            addr scales, addr offsets, addr out, int out_dtype) {
  int s = qengine::sparse24_dequantize_cpu(ptr<const uint8_t>(packed), ptr<const uint8_t>(positions), S, blocksize,
                                           codebook(table, 0, 0, bits, true), rule, ptr<const float>(scales),
                                           ptr<const float>(offsets), ptr<void>(out), out_dtype);
  raise_on_error(s);
  return s;
}

int sparse24_matmul_cpu(addr x, int x_dtype, int64_t M, int64_t K, int64_t ldx, int64_t N, addr packed,
                        addr positions, int64_t blocksize, addr table, int bits, int rule, addr scales,
                        addr nested_table, addr nested_absmax, int64_t nested_blocksize, float mean, addr offsets,
                        addr y) {
  int s = qengine::sparse24_matmul_cpu(ptr<const void>(x), x_dtype, M, K, ldx, N, ptr<const uint8_t>(packed),
                                       ptr<const uint8_t>(positions), blocksize, codebook(table, 0, 0, bits, true),
                                       rule, block_scales(scales, nested_table, nested_absmax, nested_blocksize, mean),
                                       ptr<const float>(offsets), ptr<float>(y));
  raise_on_error(s);
  return s;
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

int dequantize_cuda(addr packed, int64_t n, int64_t blocksize, addr table, int bits, int rule, addr scales,
                    addr offsets, addr out, int out_dtype, addr stream) {
  int s = qengine::dequantize_cuda(ptr<const uint8_t>(packed), n, blocksize, codebook(table, 0, 0, bits, true), rule,
                                   ptr<const float>(scales), ptr<const float>(offsets), ptr<void>(out), out_dtype,
                                   ptr<void>(stream));
  raise_on_error(s);
  return s;
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

// As matmul_cpu, with the nested mean as a device address (mean) instead of a value.
int matmul_cuda(addr x, int64_t M, int64_t K, int64_t ldx, int64_t N, addr packed, int64_t blocksize, addr table,
                int bits, int rule, addr scales, addr nested_table, addr nested_absmax, int64_t nested_blocksize,
                addr mean, addr offsets, addr y, addr stream) {
  int s = qengine::matmul_cuda(ptr<const float>(x), M, K, ldx, N, ptr<const uint8_t>(packed), blocksize,
                               codebook(table, 0, 0, bits, true), rule,
                               block_scales(scales, nested_table, nested_absmax, nested_blocksize, 0.0f),
                               ptr<const float>(mean), ptr<const float>(offsets), ptr<float>(y), ptr<void>(stream));
  raise_on_error(s);
  return s;
}

int matmul_t_cuda(addr g, int64_t M, int64_t N, int64_t K, addr packed, int64_t blocksize, addr table, int bits,
                  int rule, addr scales, addr nested_table, addr nested_absmax, int64_t nested_blocksize, addr mean,
                  addr offsets, addr workspace, int64_t workspace_floats, addr gx, addr stream) {
  int s = qengine::matmul_t_cuda(ptr<const float>(g), M, N, K, ptr<const uint8_t>(packed), blocksize,
                                 codebook(table, 0, 0, bits, true), rule,
                                 block_scales(scales, nested_table, nested_absmax, nested_blocksize, 0.0f),
                                 ptr<const float>(mean), ptr<const float>(offsets), ptr<float>(workspace),
                                 workspace_floats, ptr<float>(gx), ptr<void>(stream));
  raise_on_error(s);
  return s;
}

int sparse24_dequantize_cuda(addr packed, addr positions, int64_t S, int64_t blocksize, addr table, int bits,
                             int rule, addr scales, addr offsets, addr out, int out_dtype, addr stream) {
  int s = qengine::sparse24_dequantize_cuda(ptr<const uint8_t>(packed), ptr<const uint8_t>(positions), S, blocksize,
                                            codebook(table, 0, 0, bits, true), rule, ptr<const float>(scales),
                                            ptr<const float>(offsets), ptr<void>(out), out_dtype, ptr<void>(stream));
  raise_on_error(s);
  return s;
}
#endif

}  // namespace

PYBIND11_MODULE(_C, m) {
  using release = py::call_guard<py::gil_scoped_release>;
  m.doc() = "qengine native kernels (no libtorch dependency)";
  m.def("quantize_cpu", &quantize_cpu, release());
  m.def("dequantize_cpu", &dequantize_cpu, release());
  m.def("dequantize_range_cpu", &dequantize_range_cpu, release());
  m.def("matmul_cpu", &matmul_cpu, release());
  m.def("matmul_t_cpu", &matmul_t_cpu, release());
  m.def("lora_epilogue_cpu", &lora_epilogue_cpu, release());
  m.def("cast_float_cpu", &cast_float_cpu, release());
  m.def("kmeans_accumulate_cpu", &kmeans_accumulate_cpu, release());
  m.def("sparse24_dequantize_cpu", &sparse24_dequantize_cpu, release());
  m.def("sparse24_matmul_cpu", &sparse24_matmul_cpu, release());
  m.def("cpu_isa", [] { return std::string(qengine::cpu::isa_name()); });
  m.def("supported_isas", [] { return std::string(qengine::cpu::supported_isas()); });
  m.def("vbmi_scales", &qengine::cpu::vbmi_scales_available,
        "Whether the CPU kernels use AVX-512 VBMI byte permutes instead of gathers (matmul scales, 8-bit "
        "optimizer states; off: QENGINE_NO_VBMI=1).");
  m.def("set_isa", &set_isa);
  m.def("num_threads", &qengine::cpu::num_threads);
  m.def("set_num_threads", [](int n) {
    if (n < 1) throw py::value_error("qengine: num_threads must be >= 1");
    qengine::cpu::set_num_threads(n);
  });
#if defined(QENGINE_WITH_CUDA)
  m.attr("cuda_compiled") = true;
  py::module_ cuda = m.def_submodule("cuda", "CUDA kernels");
  cuda.def("device_count", &cuda_device_count, release());
  cuda.def("dequantize", &dequantize_cuda, release());
  cuda.def("quantize", &quantize_cuda, release());
  cuda.def("matmul", &matmul_cuda, release());
  cuda.def("matmul_t", &matmul_t_cuda, release());
  cuda.def("matmul_t_workspace", &qengine::matmul_t_cuda_workspace);
  cuda.def("sparse24_dequantize", &sparse24_dequantize_cuda, release());
#else
  m.attr("cuda_compiled") = false;
#endif
  bind_optim(m);
  bind_moe(m);
}
