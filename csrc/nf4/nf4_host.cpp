// Host-twin bindings for nf4/nf4_math.cuh: the CUDA dequantization math run on CPU buffers.
#include <cstdint>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include "common/host_registry.h"
#include "nf4/nf4_math.cuh"

namespace py = pybind11;

namespace {

using U8 = py::array_t<uint8_t, py::array::c_style | py::array::forcecast>;
using F32 = py::array_t<float, py::array::c_style | py::array::forcecast>;

py::array_t<float> dequantize(U8 packed, F32 absmax, int64_t n, int32_t blocksize) {
    if (packed.size() < (n + 1) / 2 || absmax.size() < (n + blocksize - 1) / blocksize)
        throw std::invalid_argument("nf4_dequantize: buffers too small for n");
    auto out = py::array_t<float>(n);
    float* dst = out.mutable_data();
    for (int64_t i = 0; i < n; ++i)
        dst[i] = peftkern::nf4::dequantize_element(packed.data(), absmax.data(), nullptr, nullptr, 0.0f, i,
                                                   blocksize, 1, false);
    return out;
}

py::array_t<float> dequantize_nested(U8 packed, U8 qabsmax, F32 nested_absmax, F32 nested_code, float offset,
                                     int64_t n, int32_t blocksize, int32_t nested_blocksize) {
    const int64_t blocks = (n + blocksize - 1) / blocksize;
    if (packed.size() < (n + 1) / 2 || qabsmax.size() < blocks || nested_code.size() != 256 ||
        nested_absmax.size() < (blocks + nested_blocksize - 1) / nested_blocksize)
        throw std::invalid_argument("nf4_dequantize_nested: buffers too small for n");
    auto out = py::array_t<float>(n);
    float* dst = out.mutable_data();
    for (int64_t i = 0; i < n; ++i)
        dst[i] = peftkern::nf4::dequantize_element(packed.data(), qabsmax.data(), nested_absmax.data(),
                                                   nested_code.data(), offset, i, blocksize, nested_blocksize, true);
    return out;
}

const peftkern::RegisterHostBindings kRegister([](py::module_& m) {
    m.def("nf4_code_value", [](uint32_t c) { return peftkern::nf4::code_value(c & 15u); },
          "the NF4 value of a 4-bit code");
    m.def("nf4_nearest_code", [](F32 x) {
        auto out = py::array_t<uint8_t>(x.size());
        for (py::ssize_t i = 0; i < x.size(); ++i)
            out.mutable_data()[i] = static_cast<uint8_t>(peftkern::nf4::nearest_code(x.data()[i]));
        return out;
    }, "fp32 values in [-1, 1] -> nearest NF4 code (ties to the lower)");
    m.def("nf4_dequantize", &dequantize, "packed uint8, fp32 absmax, n, blocksize -> fp32 [n]");
    m.def("nf4_dequantize_nested", &dequantize_nested,
          "packed, uint8 absmax, nested absmax, nested code [256], offset, n, blocksize, nested blocksize -> fp32 [n]");
});

}  // namespace
