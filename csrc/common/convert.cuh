// Float conversions shared by the kernels, written bit-exact so the host twin and the GPU agree.
// fp32 -> bf16 rounds to nearest even as torch does; NaN stays a quiet NaN.
#pragma once
#include "common/macros.cuh"

namespace peftkern {

PK_HD uint32_t float_bits(float f) {
    union { float f; uint32_t u; } v;
    v.f = f;
    return v.u;
}

PK_HD float bits_float(uint32_t u) {
    union { float f; uint32_t u; } v;
    v.u = u;
    return v.f;
}

PK_HD uint16_t float_to_bf16_bits(float f) {
    uint32_t u = float_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) {  // NaN: keep sign, force quiet bit
        return static_cast<uint16_t>((u >> 16) | 0x0040u);
    }
    uint32_t rounding_bias = 0x7fffu + ((u >> 16) & 1u);
    return static_cast<uint16_t>((u + rounding_bias) >> 16);
}

PK_HD float bf16_bits_to_float(uint16_t b) { return bits_float(static_cast<uint32_t>(b) << 16); }

// IEEE half, round to nearest even, with subnormals, overflow to inf and NaN preserved.
PK_HD uint16_t float_to_fp16_bits(float f) {
    uint32_t u = float_bits(f);
    uint32_t sign = (u >> 16) & 0x8000u;
    uint32_t abs_u = u & 0x7fffffffu;
    if (abs_u > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);
    if (abs_u >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds to >= 65520
    if (abs_u < 0x38800000u) {  // below the smallest normal half: subnormal or zero
        if (abs_u < 0x33000000u) return static_cast<uint16_t>(sign);  // < 2^-25 rounds to zero
        uint32_t exponent = abs_u >> 23;
        uint32_t mantissa = (abs_u & 0x7fffffu) | 0x800000u;
        uint32_t shift = 126u - exponent;  // 14 + (112 - exponent) + ... maps to a 10-bit subnormal
        uint32_t half_mant = mantissa >> shift;
        uint32_t rem = mantissa & ((1u << shift) - 1u);
        uint32_t halfway = 1u << (shift - 1u);
        if (rem > halfway || (rem == halfway && (half_mant & 1u))) half_mant += 1u;
        return static_cast<uint16_t>(sign | half_mant);
    }
    uint32_t rounded = abs_u + 0x0fffu + ((abs_u >> 13) & 1u);
    return static_cast<uint16_t>(sign | ((rounded - 0x38000000u) >> 13));
}

PK_HD float fp16_bits_to_float(uint16_t h) {
    uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    uint32_t exponent = (h >> 10) & 0x1fu;
    uint32_t mantissa = h & 0x3ffu;
    if (exponent == 0x1fu) return bits_float(sign | 0x7f800000u | (mantissa << 13));
    if (exponent == 0) {
        if (mantissa == 0) return bits_float(sign);
        // subnormal: value = mantissa * 2^-24
        float v = static_cast<float>(mantissa) * 5.9604644775390625e-08f;
        return sign ? -v : v;
    }
    return bits_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

}  // namespace peftkern
