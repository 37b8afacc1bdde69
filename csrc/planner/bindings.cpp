// helios_rt._planner: the Python face of the C++ planner. helios_rt/compile/planner.py is the
// public API; this module only moves columns of integers across the boundary.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "planner/planner.hpp"

namespace py = pybind11;
namespace hp = helios::planner;

namespace {

std::vector<hp::Buffer> to_buffers(const std::vector<int64_t>& ids, const std::vector<int64_t>& sizes,
                                   const std::vector<int64_t>& firsts,
                                   const std::vector<int64_t>& lasts) {
  const size_t n = ids.size();
  if (sizes.size() != n || firsts.size() != n || lasts.size() != n) {
    throw std::invalid_argument("ids, sizes, firsts and lasts must have the same length, got " +
                                std::to_string(n) + ", " + std::to_string(sizes.size()) + ", " +
                                std::to_string(firsts.size()) + ", " + std::to_string(lasts.size()));
  }
  std::vector<hp::Buffer> buffers(n);
  for (size_t i = 0; i < n; ++i) buffers[i] = {ids[i], sizes[i], firsts[i], lasts[i]};
  return buffers;
}

}  // namespace

PYBIND11_MODULE(_planner, m) {
  m.doc() = "Static memory planner (C++). Use helios_rt.compile.planner, not this module.";
  m.attr("DEFAULT_ALIGNMENT") = hp::kDefaultAlignment;

  py::class_<hp::Plan>(m, "Plan")
      .def_readonly("offsets", &hp::Plan::offsets)
      .def_readonly("arena_bytes", &hp::Plan::arena_bytes)
      .def_readonly("lower_bound_bytes", &hp::Plan::lower_bound_bytes)
      .def_readonly("alignment", &hp::Plan::alignment)
      .def_readonly("strategy", &hp::Plan::strategy);

  m.def(
      "plan",
      [](const std::vector<int64_t>& ids, const std::vector<int64_t>& sizes,
         const std::vector<int64_t>& firsts, const std::vector<int64_t>& lasts, int64_t alignment) {
        return hp::plan(to_buffers(ids, sizes, firsts, lasts), alignment);
      },
      py::arg("ids"), py::arg("sizes"), py::arg("firsts"), py::arg("lasts"),
      py::arg("alignment") = hp::kDefaultAlignment, py::call_guard<py::gil_scoped_release>(),
      "Plan buffer i = (ids[i], sizes[i], firsts[i]..lasts[i] inclusive); offsets follow that order.");

  m.def(
      "lower_bound",
      [](const std::vector<int64_t>& ids, const std::vector<int64_t>& sizes,
         const std::vector<int64_t>& firsts, const std::vector<int64_t>& lasts, int64_t alignment) {
        return hp::lower_bound(to_buffers(ids, sizes, firsts, lasts), alignment);
      },
      py::arg("ids"), py::arg("sizes"), py::arg("firsts"), py::arg("lasts"),
      py::arg("alignment") = hp::kDefaultAlignment, py::call_guard<py::gil_scoped_release>(),
      "Max over steps of the aligned bytes live at that step.");
}
