// pybind11 bindings of the fused optimizer step (qengine._C.adamw_cpu, qengine._C.cuda.adamw).
// python/qengine/ops/optim.py builds and checks the task and constant tables; every call
// releases the GIL and turns a non-zero status into a Python exception.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <memory>
#include <string>

#include "bind_args.h"
#include "cpu/optim/kernels.h"
#include "cpu/optim/state_encoder.h"
#include "cpu/optim/state_minifloat.h"
#include "qengine/optim.h"
#include "qengine/status.h"

#if defined(QENGINE_WITH_CUDA)
#include "cuda/check.h"
#endif

namespace py = pybind11;

namespace {

using qengine::bind::addr;
using qengine::bind::raise_on_error;

qengine::StateCode state_code(addr table, addr lut, int base, int kmax, addr encoder = 0,
                              qengine::MinifloatForm form = {}) {
  return qengine::StateCode{reinterpret_cast<const float*>(table), reinterpret_cast<const uint32_t*>(lut), base, kmax,
                            reinterpret_cast<const void*>(encoder), form};
}

// The gather-free search tables of one code (cpu/optim/state_encoder.h), owned by the Python object.
struct StateEncoderHandle {
  std::unique_ptr<qengine::cpu::StateEncoder> encoder = std::make_unique<qengine::cpu::StateEncoder>();
  bool usable = false;
};

// tasks: int64 [ntasks, 10] (OptimTask rows); hyper: float32 [nhyper, 9] (AdamHyper rows);
// for 8-bit states, the two codes' (table, lut, base, kmax), their encoders' addresses (0: none)
// and their minifloat forms (MinifloatForm's four fields each; checked, or all 0).
int adamw_cpu(addr tasks, int64_t ntasks, addr hyper, int64_t nhyper, int state_bits, addr t1, addr l1,
              int base1, int kmax1, addr t2, addr l2, int base2, int kmax2, addr e1, addr e2, int top_bits1,
              int top_binades1, int bits1, int zero1, int top_bits2, int top_binades2, int bits2, int zero2) {
  const qengine::StateCode codes[2] = {
      state_code(t1, l1, base1, kmax1, e1, {top_bits1, top_binades1, bits1, zero1}),
      state_code(t2, l2, base2, kmax2, e2, {top_bits2, top_binades2, bits2, zero2})};
  int s = qengine::adamw_cpu(reinterpret_cast<const qengine::OptimTask*>(tasks), ntasks,
                             reinterpret_cast<const qengine::AdamHyper*>(hyper), nhyper, state_bits,
                             state_bits == 8 ? codes : nullptr);
  raise_on_error(s);
  return s;
}

#if defined(QENGINE_WITH_CUDA)
int adamw_cuda(addr tasks, int64_t ntasks, addr hyper, int64_t nhyper, int state_bits, addr t1, addr l1,
               int base1, int kmax1, addr t2, addr l2, int base2, int kmax2, addr stream) {
  const qengine::StateCode codes[2] = {state_code(t1, l1, base1, kmax1),
                                       state_code(t2, l2, base2, kmax2)};
  int s = qengine::adamw_cuda(reinterpret_cast<const qengine::OptimTask*>(tasks), ntasks,
                              reinterpret_cast<const qengine::AdamHyper*>(hyper), nhyper, state_bits,
                              state_bits == 8 ? codes : nullptr, reinterpret_cast<void*>(stream));
  raise_on_error(s);
  return s;
}
#endif

}  // namespace

void bind_optim(py::module_& m) {
  using release = py::call_guard<py::gil_scoped_release>;
  m.def("adamw_cpu", &adamw_cpu, release());
  py::class_<StateEncoderHandle>(m, "StateEncoder",
                                 "The CPU's gather-free nearest-code tables of one 8-bit state code, built from its "
                                 "(table, lut, base, kmax); address is 0 where the code is too dense for them.")
      .def(py::init([](addr table, addr lut, int base, int kmax) {
             auto h = std::make_unique<StateEncoderHandle>();
             h->usable = qengine::cpu::build_state_encoder(state_code(table, lut, base, kmax), h->encoder.get());
             return h;
           }),
           py::arg("table"), py::arg("lut"), py::arg("base"), py::arg("kmax"))
      .def_property_readonly("address", [](const StateEncoderHandle& h) {
        return h.usable ? reinterpret_cast<addr>(h.encoder.get()) : addr{0};
      })
      .def(
          "encode",
          [](const StateEncoderHandle& h, addr x, int64_t n, addr out) {
            // For tests: x float32 [n] with |x| < 2, n a multiple of 64; out uint8 [n].
            if (!h.usable) throw py::value_error("this code has no gather-free encoder");
            if (n < 0 || n % 64 != 0) throw py::value_error("n must be a non-negative multiple of 64");
            if (!qengine::cpu::encode_codes_vbmi(reinterpret_cast<const float*>(x), n, *h.encoder,
                                                 reinterpret_cast<uint8_t*>(out))) {
              throw py::value_error("the gather-free encoder needs an AVX-512 VBMI CPU");
            }
          },
          py::arg("x"), py::arg("n"), py::arg("out"), py::call_guard<py::gil_scoped_release>());
  m.def(
      "check_minifloat_form",
      [](addr table, addr lut, int base, int kmax, int top_mantissa_bits, int top_binades, int mantissa_bits,
         int zero_code) {
        return qengine::cpu::check_minifloat_form(
            state_code(table, lut, base, kmax),
            qengine::MinifloatForm{top_mantissa_bits, top_binades, mantissa_bits, zero_code});
      },
      "True when (top_mantissa_bits, top_binades, mantissa_bits, zero_code) is a minifloat form of the state code "
      "(table, lut, base, kmax): its values and nearest codes equal the table's and the search's exactly (the CPU "
      "kernels then use it).",
      py::arg("table"), py::arg("lut"), py::arg("base"), py::arg("kmax"), py::arg("top_mantissa_bits"),
      py::arg("top_binades"), py::arg("mantissa_bits"), py::arg("zero_code"), release());
  m.def("adamw_cpu_spans", [] { return std::string(qengine::cpu::adamw_spans_name()); },
        "The SIMD family of the CPU AdamW step under the current ISA: scalar, avx2 or avx512.");
#if defined(QENGINE_WITH_CUDA)
  py::module_ cuda = m.attr("cuda").cast<py::module_>();
  cuda.def("adamw", &adamw_cuda, release());
#endif
}
