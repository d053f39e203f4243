// NF4 with double quantization: the per-element math shared by the CUDA kernels (nf4.cu) and the
// CPU host twin (nf4_host.cpp). The format is bitsandbytes' (peftkern/reference/nf4.py):
// element i's 4-bit code sits in byte i/2, high nibble for even i; block b = i / blocksize has an
// fp32 absmax, or with double quant an 8-bit index into a 256-entry code, a nested fp32 absmax per
// nested_blocksize blocks and an offset: absmax = code2[q] * nested_absmax + offset.
#pragma once
#include "common/macros.cuh"

namespace peftkern {
namespace nf4 {

// The 16 NF4 values, selected by the code's bits (no table in memory: no local-memory array on
// the GPU, identical fp32 constants on the host).
PK_HD float code_value(uint32_t c) {
    const bool b3 = c & 8u, b2 = c & 4u, b1 = c & 2u, b0 = c & 1u;
    if (b3) {
        if (b2) {
            if (b1) return b0 ? 1.0f : 0.7229568362236023f;
            return b0 ? 0.5626170039176941f : 0.44070982933044434f;
        }
        if (b1) return b0 ? 0.33791524171829224f : 0.24611230194568634f;
        return b0 ? 0.16093020141124725f : 0.07958029955625534f;
    }
    if (b2) {
        if (b1) return b0 ? 0.0f : -0.09105003625154495f;
        return b0 ? -0.18477343022823334f : -0.28444138169288635f;
    }
    if (b1) return b0 ? -0.39491748809814453f : -0.5250730514526367f;
    return b0 ? -0.6961928009986877f : -1.0f;
}

// The 4-bit code of element i.
PK_HD uint32_t code_at(const uint8_t* packed, int64_t i) {
    const uint32_t byte = packed[i >> 1];
    return (i & 1) ? (byte & 15u) : (byte >> 4);
}

// The fp32 absmax of NF4 block `block`, decoded from its double-quantized parts when `nested`.
PK_HD float block_absmax(const void* absmax, const float* nested_absmax, const float* nested_code, float offset,
                         int64_t block, int32_t nested_blocksize, bool nested) {
    if (!nested) return static_cast<const float*>(absmax)[block];
    const uint8_t q = static_cast<const uint8_t*>(absmax)[block];
    const float scaled = nested_code[q] * nested_absmax[block / nested_blocksize];
    return scaled + offset;
}

// fp32 value of element i: code * absmax, in that order, rounded once by the caller.
PK_HD float dequantize_element(const uint8_t* packed, const void* absmax, const float* nested_absmax,
                               const float* nested_code, float offset, int64_t i, int32_t blocksize,
                               int32_t nested_blocksize, bool nested) {
    const float scale = block_absmax(absmax, nested_absmax, nested_code, offset, i / blocksize, nested_blocksize, nested);
    return code_value(code_at(packed, i)) * scale;
}

// Index of the NF4 value nearest to x (x in [-1, 1]); a tie goes to the lower value, as
// bitsandbytes' quantizer picks it.
PK_HD uint32_t nearest_code(float x) {
    uint32_t lo = 0, hi = 15;
    while (lo < hi) {  // first code whose midpoint with the next one is >= x
        const uint32_t mid = (lo + hi) >> 1;
        const float midpoint = (code_value(mid) + code_value(mid + 1)) * 0.5f;
        if (x <= midpoint) hi = mid; else lo = mid + 1;
    }
    return lo;
}

}  // namespace nf4
}  // namespace peftkern
