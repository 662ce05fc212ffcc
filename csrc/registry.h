// Registration hooks: one per native source file, called from bindings.cpp.
#pragma once
#include <pybind11/pybind11.h>

void register_masks(pybind11::module_& m);
void register_sparse_conv(pybind11::module_& m);
void register_masked_bn(pybind11::module_& m);
