// AdamW's per-element math and the 8-bit blockwise state codes, for the GPU kernels (adamw.cu)
// and their CPU twin (adamw_host.cpp). The formula and its order are peftkern/reference/adamw.py's:
//   m = beta1 m + (1 - beta1) g;  v = beta2 v + (1 - beta2) g^2;  p = p * (1 - lr wd);
//   p = p - step_size * m / (sqrt(v) / sqrt(1 - beta2^t) + eps),  step_size = lr / (1 - beta1^t).
// Every operation is correctly rounded and none is contracted into an FMA, so the device and the
// host twin compute the same bits.
#pragma once
#include "common/convert.cuh"
#include "common/macros.cuh"
#if !defined(__CUDACC_RTC__)
#include <cmath>
#endif

namespace peftkern {
namespace optim {

constexpr int kQuantBlock = 256;  // elements per absmax block of an 8-bit state
constexpr int kMapSize = 256;     // values in a dynamic map (one per code)

PK_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
    return __fmul_rn(a, b);
#else
    return a * b;
#endif
}

PK_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
    return __fadd_rn(a, b);
#else
    return a + b;
#endif
}

PK_HD float sub_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
    return __fsub_rn(a, b);
#else
    return a - b;
#endif
}

PK_HD float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
    return __fdiv_rn(a, b);
#else
    return a / b;
#endif
}

PK_HD float sqrt_rn(float a) {
#if defined(__CUDA_ARCH__)
    return __fsqrt_rn(a);
#else
    return std::sqrt(a);
#endif
}

// The per-step constants, computed once on the host in double precision and rounded to fp32.
struct StepScalars {
    float beta1, one_minus_beta1, beta2, one_minus_beta2, decay, step_size, bc2_sqrt, eps;
};

// One element of one AdamW step, in place on fp32 values.
PK_HD void adamw_update(float& p, float g, float& m, float& v, const StepScalars& s) {
    m = add_rn(mul_rn(m, s.beta1), mul_rn(g, s.one_minus_beta1));
    v = add_rn(mul_rn(v, s.beta2), mul_rn(mul_rn(g, g), s.one_minus_beta2));
    p = mul_rn(p, s.decay);
    const float denom = add_rn(div_rn(sqrt_rn(v), s.bc2_sqrt), s.eps);
    p = sub_rn(p, mul_rn(s.step_size, div_rn(m, denom)));
}

// The anchored penalty's gradient joined to the loss's (EWC, or L2-SP with fisher = 1, for which
// the product is exact): g + lam * ((p - anchor) * fisher), with p the value before this step.
PK_HD float penalized_grad(float g, float p, float anchor, float fisher, float lam) {
    return add_rn(g, mul_rn(lam, mul_rn(sub_rn(p, anchor), fisher)));
}

// Midpoint i (0..254) between neighbouring values of a sorted map.
PK_HD float map_midpoint(const float* map, int i) { return mul_rn(add_rn(map[i], map[i + 1]), 0.5f); }

PK_HD float dequantize(const float* map, uint8_t code, float absmax) { return mul_rn(map[code], absmax); }

// x scaled into [-1, 1] by its block's absmax; an all-zero block maps to 0.
PK_HD float normalize(float x, float absmax) { return absmax > 0.0f ? div_rn(x, absmax) : 0.0f; }

// The code of the map value nearest to `normed`, ties to the lower code: how many of the 255 sorted
// midpoints lie below it, in eight probes.
PK_HD uint8_t nearest_code(const float* midpoints, float normed) {
    int idx = 0;
    for (int step = 128; step > 0; step >>= 1) {
        if (normed > midpoints[idx + step - 1]) idx += step;
    }
    return static_cast<uint8_t>(idx);
}

// Parameter storage: fp32 as is, fp16 and bf16 as their bit patterns (no CUDA half headers, so the
// same code builds under nvcc, NVRTC and g++).
// Where a kernel finds one element's anchored penalty: the anchor (parameter storage), and F as
// fp32, as 8-bit codes of `fisher_map` with one absmax per kQuantBlock, or neither (F = 1).
template <typename P>
struct PenaltyArgs {
    const typename P::storage* anchor;
    const float* fisher;
    const uint8_t* fisher_codes;
    const float* fisher_absmax;
    const float* fisher_map;
    float lam;

    PK_HD float fisher_at(int64_t i) const {
        if (fisher != nullptr) return fisher[i];
        if (fisher_codes != nullptr) return dequantize(fisher_map, fisher_codes[i], fisher_absmax[i / kQuantBlock]);
        return 1.0f;
    }

    PK_HD float apply(float g, float p, int64_t i) const {
        return penalized_grad(g, p, P::load(anchor[i]), fisher_at(i), lam);
    }
};

struct ParamF32 {
    using storage = float;
    static PK_HD float load(float x) { return x; }
    static PK_HD float store(float x) { return x; }
};

struct ParamF16 {
    using storage = uint16_t;
    static PK_HD float load(uint16_t x) { return fp16_bits_to_float(x); }
    static PK_HD uint16_t store(float x) { return float_to_fp16_bits(x); }
};

struct ParamBF16 {
    using storage = uint16_t;
    static PK_HD float load(uint16_t x) { return bf16_bits_to_float(x); }
    static PK_HD uint16_t store(float x) { return float_to_bf16_bits(x); }
};

}  // namespace optim
}  // namespace peftkern
