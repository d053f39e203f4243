// peftkern._host: the csrc/ math compiled for the CPU, so tests can compare it with reference/.
#include <pybind11/pybind11.h>

#include "common/host_registry.h"

PYBIND11_MODULE(_host, m) {
    m.doc() = "CPU twin of peftkern's CUDA math headers (csrc/**/*_math.cuh), for tests";
    for (auto& bind : peftkern::host_binders()) bind(m);
}
