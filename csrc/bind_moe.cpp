// pybind11 binding of the grouped Mixture-of-Experts forward (qengine._C.moe_experts_cpu).
// python/qengine/ops/cpu.py checks every tensor and passes each stacked expert matrix as one
// tuple: its weight as one WeightRef plus its own fields (see expert_matrices); the computation
// runs without the GIL.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "bind_args.h"
#include "qengine/moe.h"

namespace py = pybind11;

namespace {

using qengine::bind::addr;
using qengine::bind::ptr;

// (weight, N, K, bias, bias_dtype, lora_a, lora_b, lora_dtype, lora_rank, lora_scale): the stacked
// weight of E experts of [N, K] as one WeightRef tuple (bind_args.h, checked to cover E * N * K
// values), then the matrix's own fields.
qengine::ExpertMatrices expert_matrices(const py::tuple& t, int64_t E) {
  if (t.size() != 10) throw py::value_error("qengine: an expert matrix is described by 10 fields");
  auto a = [&](size_t i) { return t[i].cast<addr>(); };
  auto i64 = [&](size_t i) { return t[i].cast<int64_t>(); };
  qengine::ExpertMatrices m{};
  m.N = i64(1);
  m.K = i64(2);
  if (E < 1 || m.N < 1 || m.K < 1) throw py::value_error("qengine: experts, N and K must be >= 1");
  const qengine::bind::WeightRef w =
      qengine::bind::weight_ref(t[0].cast<py::tuple>(), qengine::bind::element_count({E, m.N, m.K}));
  m.packed = w.packed_ptr();
  m.blocksize = w.blocksize;
  m.cb = w.codebook();
  m.rule = w.rule;
  m.scales = w.block_scales();
  m.offsets = w.offsets_ptr();
  m.bias = ptr<const void>(a(3));
  m.bias_dtype = t[4].cast<int>();
  m.lora_a = ptr<const void>(a(5));
  m.lora_b = ptr<const void>(a(6));
  m.lora_dtype = t[7].cast<int>();
  m.lora_rank = i64(8);
  m.lora_scale = t[9].cast<float>();
  return m;
}

void moe_experts_cpu(addr x, int x_dtype, int64_t T, int64_t H, addr index, addr weights, int64_t topk, int64_t E,
                     const py::tuple& up, const py::tuple& down, int gate_layout, int activation, addr y) {
  const qengine::ExpertMatrices u = expert_matrices(up, E), d = expert_matrices(down, E);
  qengine::bind::without_gil([&] {
    return qengine::moe_experts_cpu(ptr<const void>(x), x_dtype, T, H, ptr<const int64_t>(index),
                                    ptr<const float>(weights), topk, E, u, d, gate_layout, activation, ptr<float>(y));
  });
}

}  // namespace

void bind_moe(py::module_& m) { m.def("moe_experts_cpu", &moe_experts_cpu); }
