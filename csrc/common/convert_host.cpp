// Host-twin bindings for common/convert.cuh: elementwise conversions over contiguous buffers.
#include <cstdint>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include "common/convert.cuh"
#include "common/host_registry.h"

namespace py = pybind11;

namespace {

py::array_t<uint16_t> to_bits(py::array_t<float, py::array::c_style | py::array::forcecast> x, bool bf16) {
    auto out = py::array_t<uint16_t>(x.size());
    const float* src = x.data();
    uint16_t* dst = out.mutable_data();
    for (py::ssize_t i = 0; i < x.size(); ++i)
        dst[i] = bf16 ? peftkern::float_to_bf16_bits(src[i]) : peftkern::float_to_fp16_bits(src[i]);
    return out;
}

py::array_t<float> from_bits(py::array_t<uint16_t, py::array::c_style | py::array::forcecast> x, bool bf16) {
    auto out = py::array_t<float>(x.size());
    const uint16_t* src = x.data();
    float* dst = out.mutable_data();
    for (py::ssize_t i = 0; i < x.size(); ++i)
        dst[i] = bf16 ? peftkern::bf16_bits_to_float(src[i]) : peftkern::fp16_bits_to_float(src[i]);
    return out;
}

const peftkern::RegisterHostBindings kRegister([](py::module_& m) {
    m.def("float_to_bf16_bits", [](py::array_t<float, py::array::c_style | py::array::forcecast> x) { return to_bits(x, true); },
          "fp32 array -> uint16 bf16 bit patterns (round to nearest even)");
    m.def("float_to_fp16_bits", [](py::array_t<float, py::array::c_style | py::array::forcecast> x) { return to_bits(x, false); },
          "fp32 array -> uint16 IEEE half bit patterns (round to nearest even)");
    m.def("bf16_bits_to_float", [](py::array_t<uint16_t, py::array::c_style | py::array::forcecast> x) { return from_bits(x, true); });
    m.def("fp16_bits_to_float", [](py::array_t<uint16_t, py::array::c_style | py::array::forcecast> x) { return from_bits(x, false); });
});

}  // namespace
