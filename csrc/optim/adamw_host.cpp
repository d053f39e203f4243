// Host-twin bindings for optim/adamw_math.cuh: the AdamW step kernels' math run serially on CPU
// buffers, composed exactly as adamw.cu composes it, so tests hold it against peftkern.reference.
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "common/host_registry.h"
#include "optim/adamw_math.cuh"

namespace py = pybind11;

namespace {

namespace po = peftkern::optim;

template <typename T>
using Array = py::array_t<T, py::array::c_style | py::array::forcecast>;

po::StepScalars to_scalars(const std::vector<float>& s) {
    if (s.size() != 8)
        throw std::invalid_argument("scalars must hold 8 values: beta1, 1-beta1, beta2, 1-beta2, decay, step_size, "
                                    "bc2_sqrt, eps; got " + std::to_string(s.size()));
    return po::StepScalars{s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]};
}

void check_size(const char* name, py::ssize_t got, py::ssize_t want) {
    if (got != want)
        throw std::invalid_argument(std::string(name) + " has " + std::to_string(got) + " elements, expected " +
                                    std::to_string(want));
}

std::array<float, po::kMapSize - 1> midpoints_of(const Array<float>& map) {
    check_size("map", map.size(), po::kMapSize);
    std::array<float, po::kMapSize - 1> mid{};
    for (int i = 0; i < po::kMapSize - 1; ++i) mid[i] = po::map_midpoint(map.data(), i);
    return mid;
}

template <typename P>
py::tuple adamw32(Array<typename P::storage> p_in, Array<typename P::storage> g, Array<float> m_in,
                  Array<float> v_in, const po::StepScalars& s, const po::PenaltyArgs<P>* pen = nullptr) {
    const py::ssize_t n = p_in.size();
    check_size("grad", g.size(), n);
    check_size("exp_avg", m_in.size(), n);
    check_size("exp_avg_sq", v_in.size(), n);
    Array<typename P::storage> p(n);
    Array<float> m(n), v(n);
    for (py::ssize_t i = 0; i < n; ++i) {
        float pf = P::load(p_in.data()[i]);
        float mf = m_in.data()[i], vf = v_in.data()[i];
        float gf = P::load(g.data()[i]);
        if (pen != nullptr) gf = pen->apply(gf, pf, i);
        po::adamw_update(pf, gf, mf, vf, s);
        p.mutable_data()[i] = P::store(pf);
        m.mutable_data()[i] = mf;
        v.mutable_data()[i] = vf;
    }
    return py::make_tuple(p, m, v);
}

template <typename P>
py::tuple adamw8bit(Array<typename P::storage> p_in, Array<typename P::storage> g, Array<uint8_t> mq_in,
                    Array<float> mabs_in, Array<uint8_t> vq_in, Array<float> vabs_in, Array<float> smap,
                    Array<float> umap, const po::StepScalars& s, const po::PenaltyArgs<P>* pen = nullptr) {
    const py::ssize_t n = p_in.size();
    const py::ssize_t blocks = (n + po::kQuantBlock - 1) / po::kQuantBlock;
    check_size("grad", g.size(), n);
    check_size("m_codes", mq_in.size(), n);
    check_size("v_codes", vq_in.size(), n);
    check_size("m_absmax", mabs_in.size(), blocks);
    check_size("v_absmax", vabs_in.size(), blocks);
    const auto smid = midpoints_of(smap);
    const auto umid = midpoints_of(umap);
    Array<typename P::storage> p(n);
    Array<uint8_t> mq(n), vq(n);
    Array<float> mabs(blocks), vabs(blocks);
    std::vector<float> mf(po::kQuantBlock), vf(po::kQuantBlock);
    for (py::ssize_t b = 0; b < blocks; ++b) {
        const py::ssize_t first = b * po::kQuantBlock;
        const py::ssize_t count = std::min<py::ssize_t>(po::kQuantBlock, n - first);
        float m_max = 0.0f, v_max = 0.0f;
        for (py::ssize_t j = 0; j < count; ++j) {
            const py::ssize_t i = first + j;
            float pf = P::load(p_in.data()[i]);
            mf[j] = po::dequantize(smap.data(), mq_in.data()[i], mabs_in.data()[b]);
            vf[j] = po::dequantize(umap.data(), vq_in.data()[i], vabs_in.data()[b]);
            float gf = P::load(g.data()[i]);
            if (pen != nullptr) gf = pen->apply(gf, pf, i);
            po::adamw_update(pf, gf, mf[j], vf[j], s);
            p.mutable_data()[i] = P::store(pf);
            m_max = std::fmax(m_max, std::fabs(mf[j]));
            v_max = std::fmax(v_max, std::fabs(vf[j]));
        }
        for (py::ssize_t j = 0; j < count; ++j) {
            mq.mutable_data()[first + j] = po::nearest_code(smid.data(), po::normalize(mf[j], m_max));
            vq.mutable_data()[first + j] = po::nearest_code(umid.data(), po::normalize(vf[j], v_max));
        }
        mabs.mutable_data()[b] = m_max;
        vabs.mutable_data()[b] = v_max;
    }
    return py::make_tuple(p, mq, mabs, vq, vabs);
}

py::tuple quantize_blockwise(Array<float> x, Array<float> map) {
    const py::ssize_t n = x.size();
    const py::ssize_t blocks = (n + po::kQuantBlock - 1) / po::kQuantBlock;
    const auto mid = midpoints_of(map);
    Array<uint8_t> codes(n);
    Array<float> absmax(blocks);
    for (py::ssize_t b = 0; b < blocks; ++b) {
        const py::ssize_t first = b * po::kQuantBlock;
        const py::ssize_t last = std::min<py::ssize_t>(first + po::kQuantBlock, n);
        float a = 0.0f;
        for (py::ssize_t i = first; i < last; ++i) a = std::fmax(a, std::fabs(x.data()[i]));
        for (py::ssize_t i = first; i < last; ++i)
            codes.mutable_data()[i] = po::nearest_code(mid.data(), po::normalize(x.data()[i], a));
        absmax.mutable_data()[b] = a;
    }
    return py::make_tuple(codes, absmax);
}

Array<float> dequantize_blockwise(Array<uint8_t> codes, Array<float> absmax, Array<float> map) {
    const py::ssize_t n = codes.size();
    check_size("absmax", absmax.size(), (n + po::kQuantBlock - 1) / po::kQuantBlock);
    check_size("map", map.size(), po::kMapSize);
    Array<float> out(n);
    for (py::ssize_t i = 0; i < n; ++i)
        out.mutable_data()[i] = po::dequantize(map.data(), codes.data()[i], absmax.data()[i / po::kQuantBlock]);
    return out;
}

// The penalty's buffers as the kernels receive them: raw pointers, null where absent.
struct PenaltyBuffers {
    py::array anchor;
    std::optional<Array<float>> fisher;
    std::optional<Array<uint8_t>> fisher_codes;
    std::optional<Array<float>> fisher_absmax;
    Array<float> fisher_map;
    float lam;

    void check(py::ssize_t n) const {
        check_size("anchor", anchor.size(), n);
        check_size("fisher_map", fisher_map.size(), po::kMapSize);
        if (fisher && fisher_codes) throw std::invalid_argument("give fisher (fp32) or fisher_codes, not both");
        if (fisher) check_size("fisher", fisher->size(), n);
        if (fisher_codes) {
            check_size("fisher_codes", fisher_codes->size(), n);
            if (!fisher_absmax) throw std::invalid_argument("fisher_codes need fisher_absmax");
            check_size("fisher_absmax", fisher_absmax->size(), (n + po::kQuantBlock - 1) / po::kQuantBlock);
        }
    }

    template <typename P>
    po::PenaltyArgs<P> args(const Array<typename P::storage>& anchor_typed) const {
        return po::PenaltyArgs<P>{anchor_typed.data(), fisher ? fisher->data() : nullptr,
                                  fisher_codes ? fisher_codes->data() : nullptr,
                                  fisher_codes ? fisher_absmax->data() : nullptr, fisher_map.data(), lam};
    }
};

template <typename P>
py::tuple adamw32_penalized(py::array p, py::array g, Array<float> m, Array<float> v, const po::StepScalars& s,
                            const PenaltyBuffers& pen) {
    pen.check(p.size());
    Array<typename P::storage> anchor(pen.anchor);
    const auto args = pen.args<P>(anchor);
    return adamw32<P>(p, g, m, v, s, &args);
}

template <typename P>
py::tuple adamw8bit_penalized(py::array p, py::array g, Array<uint8_t> mq, Array<float> mabs, Array<uint8_t> vq,
                              Array<float> vabs, Array<float> smap, Array<float> umap, const po::StepScalars& s,
                              const PenaltyBuffers& pen) {
    pen.check(p.size());
    Array<typename P::storage> anchor(pen.anchor);
    const auto args = pen.args<P>(anchor);
    return adamw8bit<P>(p, g, mq, mabs, vq, vabs, smap, umap, s, &args);
}

void check_dtype(const std::string& dtype) {
    if (dtype != "float32" && dtype != "float16" && dtype != "bfloat16")
        throw std::invalid_argument("dtype must be 'float32', 'float16' or 'bfloat16', got '" + dtype + "'");
}

const peftkern::RegisterHostBindings kRegister([](py::module_& m) {
    m.def(
        "adamw32_step",
        [](py::array p, py::array g, Array<float> m_, Array<float> v, const std::string& dtype,
           const std::vector<float>& scalars) {
            check_dtype(dtype);
            const auto s = to_scalars(scalars);
            if (dtype == "float32") return adamw32<po::ParamF32>(p, g, m_, v, s);
            if (dtype == "float16") return adamw32<po::ParamF16>(p, g, m_, v, s);
            return adamw32<po::ParamBF16>(p, g, m_, v, s);
        },
        "AdamW step on flat buffers -> (param, exp_avg, exp_avg_sq); param/grad are float32, or uint16 bit "
        "patterns for float16/bfloat16; scalars = (beta1, 1-beta1, beta2, 1-beta2, decay, step_size, bc2_sqrt, eps)");
    m.def(
        "adamw8bit_step",
        [](py::array p, py::array g, Array<uint8_t> mq, Array<float> mabs, Array<uint8_t> vq, Array<float> vabs,
           Array<float> smap, Array<float> umap, const std::string& dtype, const std::vector<float>& scalars) {
            check_dtype(dtype);
            const auto s = to_scalars(scalars);
            if (dtype == "float32") return adamw8bit<po::ParamF32>(p, g, mq, mabs, vq, vabs, smap, umap, s);
            if (dtype == "float16") return adamw8bit<po::ParamF16>(p, g, mq, mabs, vq, vabs, smap, umap, s);
            return adamw8bit<po::ParamBF16>(p, g, mq, mabs, vq, vabs, smap, umap, s);
        },
        "8-bit AdamW step -> (param, m_codes, m_absmax, v_codes, v_absmax), as the CUDA kernel computes it");
    m.def(
        "adamw32_penalty_step",
        [](py::array p, py::array g, Array<float> m_, Array<float> v, py::array anchor,
           std::optional<Array<float>> fisher, std::optional<Array<uint8_t>> fisher_codes,
           std::optional<Array<float>> fisher_absmax, Array<float> fisher_map, float lam, const std::string& dtype,
           const std::vector<float>& scalars) {
            check_dtype(dtype);
            const auto s = to_scalars(scalars);
            const PenaltyBuffers pen{anchor, fisher, fisher_codes, fisher_absmax, fisher_map, lam};
            if (dtype == "float32") return adamw32_penalized<po::ParamF32>(p, g, m_, v, s, pen);
            if (dtype == "float16") return adamw32_penalized<po::ParamF16>(p, g, m_, v, s, pen);
            return adamw32_penalized<po::ParamBF16>(p, g, m_, v, s, pen);
        },
        "AdamW step with the anchored penalty (EWC / L2-SP) -> (param, exp_avg, exp_avg_sq); anchor in param's "
        "storage; fisher fp32, or fisher_codes + fisher_absmax of fisher_map, or neither (F = 1)");
    m.def(
        "adamw8bit_penalty_step",
        [](py::array p, py::array g, Array<uint8_t> mq, Array<float> mabs, Array<uint8_t> vq, Array<float> vabs,
           Array<float> smap, Array<float> umap, py::array anchor, std::optional<Array<float>> fisher,
           std::optional<Array<uint8_t>> fisher_codes, std::optional<Array<float>> fisher_absmax, float lam,
           const std::string& dtype, const std::vector<float>& scalars) {
            check_dtype(dtype);
            const auto s = to_scalars(scalars);
            const PenaltyBuffers pen{anchor, fisher, fisher_codes, fisher_absmax, umap, lam};
            if (dtype == "float32") return adamw8bit_penalized<po::ParamF32>(p, g, mq, mabs, vq, vabs, smap, umap, s, pen);
            if (dtype == "float16") return adamw8bit_penalized<po::ParamF16>(p, g, mq, mabs, vq, vabs, smap, umap, s, pen);
            return adamw8bit_penalized<po::ParamBF16>(p, g, mq, mabs, vq, vabs, smap, umap, s, pen);
        },
        "8-bit AdamW step with the anchored penalty (F's codes use the unsigned map umap), as the CUDA kernel");
    m.def("optim_quantize_blockwise", &quantize_blockwise,
          "fp32 [n] -> (uint8 codes [n], fp32 absmax [ceil(n/256)]): nearest map value per element, ties low");
    m.def("optim_dequantize_blockwise", &dequantize_blockwise, "codes, absmax, map -> fp32: map[code] * absmax");
});

}  // namespace
