// pybind11 binding of the grouped Mixture-of-Experts forward (qengine._C.moe_experts_cpu).
// python/qengine/_moe_ops.py checks every tensor and passes each stacked expert matrix as one
// tuple of 20 fields (see expert_matrices); the computation runs without the GIL.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "bind_args.h"
#include "qengine/moe.h"

namespace py = pybind11;

namespace {

using qengine::bind::addr;
using qengine::bind::ptr;

// (packed, blocksize, table, bits, rule, scales, nested_table, nested_absmax, nested_blocksize,
//  mean, offsets, N, K, bias, bias_dtype, lora_a, lora_b, lora_dtype, lora_rank, lora_scale)
qengine::ExpertMatrices expert_matrices(const py::tuple& t) {
  if (t.size() != 20) throw py::value_error("qengine: an expert matrix is described by 20 fields");
  auto a = [&](size_t i) { return t[i].cast<addr>(); };
  auto i64 = [&](size_t i) { return t[i].cast<int64_t>(); };
  const int bits = t[3].cast<int>();
  qengine::ExpertMatrices m{};
  m.packed = ptr<const uint8_t>(a(0));
  m.blocksize = i64(1);
  m.cb = qengine::bind::codebook(a(2), 0, 0, bits, true);
  m.rule = t[4].cast<int>();
  m.scales = qengine::bind::block_scales(a(5), a(6), a(7), i64(8), t[9].cast<float>());
  m.offsets = ptr<const float>(a(10));
  m.N = i64(11);
  m.K = i64(12);
  m.bias = ptr<const void>(a(13));
  m.bias_dtype = t[14].cast<int>();
  m.lora_a = ptr<const void>(a(15));
  m.lora_b = ptr<const void>(a(16));
  m.lora_dtype = t[17].cast<int>();
  m.lora_rank = i64(18);
  m.lora_scale = t[19].cast<float>();
  return m;
}

void moe_experts_cpu(addr x, int x_dtype, int64_t T, int64_t H, addr index, addr weights, int64_t topk, int64_t E,
                     const py::tuple& up, const py::tuple& down, int gate_layout, int activation, addr y) {
  const qengine::ExpertMatrices u = expert_matrices(up), d = expert_matrices(down);
  int status;
  {
    py::gil_scoped_release release;
    status = qengine::moe_experts_cpu(ptr<const void>(x), x_dtype, T, H, ptr<const int64_t>(index),
                                      ptr<const float>(weights), topk, E, u, d, gate_layout, activation,
                                      ptr<float>(y));
  }
  qengine::bind::raise_on_error(status);
}

}  // namespace

void bind_moe(py::module_& m) { m.def("moe_experts_cpu", &moe_experts_cpu); }
