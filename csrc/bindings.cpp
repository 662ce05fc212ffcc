// The one pybind11 module of the project: kernels._C.
// Each native op lives in its own .cpp with raw-pointer entry points (no torch headers, so it
// compiles in seconds) and a `register_<op>(module)` function declared in registry.h.
#include <pybind11/pybind11.h>

#include "registry.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "Native (C++/CUDA) kernels of the engine. Use them through `kernels`, not directly.";
  py::dict info;
#ifdef _OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
#ifdef KERNELS_WITH_CUDA
  info["cuda"] = true;
#else
  info["cuda"] = false;
#endif
  m.attr("build_info") = info;
  register_masks(m);
  register_sparse_conv(m);
  register_masked_bn(m);
}
