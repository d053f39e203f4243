// NF4 dequantization kernel: one thread per two elements (one packed byte), raw pointers only,
// launched from peftkern/ops/nf4.py through peftkern/_cuda.py.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "nf4/nf4_math.cuh"

// out_kind: 0 fp32, 1 fp16, 2 bf16. absmax is fp32 [blocks], or uint8 [blocks] when nested != 0
// (then nested_absmax and nested_code are read). Each value is computed in fp32 and rounded once.
extern "C" __global__ void pk_nf4_dequantize(const uint8_t* __restrict__ packed, const void* __restrict__ absmax,
                                             const float* __restrict__ nested_absmax,
                                             const float* __restrict__ nested_code, float offset, int64_t n,
                                             int32_t blocksize, int32_t nested_blocksize, int32_t nested,
                                             int32_t out_kind, void* __restrict__ out) {
    const int64_t pair = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    const int64_t first = pair * 2;
    for (int64_t i = first; i < first + 2 && i < n; ++i) {
        const float v = peftkern::nf4::dequantize_element(packed, absmax, nested_absmax, nested_code, offset, i,
                                                          blocksize, nested_blocksize, nested != 0);
        if (out_kind == 0) {
            static_cast<float*>(out)[i] = v;
        } else if (out_kind == 1) {
            static_cast<__half*>(out)[i] = __float2half_rn(v);
        } else {
            static_cast<__nv_bfloat16*>(out)[i] = __float2bfloat16_rn(v);
        }
    }
}
