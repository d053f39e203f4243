// Host twin plumbing: each csrc/<op>/<op>_host.cpp registers a function that adds its bindings,
// so adding an op never edits host_twin.cpp.
#pragma once
#include <functional>
#include <vector>
#include <pybind11/pybind11.h>

namespace peftkern {

using HostBinder = std::function<void(pybind11::module_&)>;

inline std::vector<HostBinder>& host_binders() {
    static std::vector<HostBinder> binders;
    return binders;
}

struct RegisterHostBindings {
    explicit RegisterHostBindings(HostBinder binder) { host_binders().push_back(std::move(binder)); }
};

}  // namespace peftkern
