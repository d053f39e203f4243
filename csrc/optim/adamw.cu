// AdamW step kernels: 32-bit states (one thread per element) and 8-bit blockwise states (one
// 256-thread block per 256-element quantization block, looping over blocks so the maps are
// staged in shared memory once per CUDA block). Launched from peftkern/ops/adamw.py through
// cuda-python with raw pointers; blockDim.x must be 256 for the 8-bit kernels. The *_penalty_*
// kernels add the anchored penalty (EWC / L2-SP) to the gradient in the same pass: one more read of
// the anchor and of F (fp32, 8-bit codes, or none for F = 1: null pointers choose).
#pragma once
#include "optim/adamw_math.cuh"

namespace peftkern {
namespace optim {
namespace kernels {

template <typename P, bool kPenalty>
PK_DEVICE void adamw32_body(typename P::storage* __restrict__ p, const typename P::storage* __restrict__ g,
                            float* __restrict__ m, float* __restrict__ v, int64_t n, const StepScalars& s,
                            const PenaltyArgs<P>& pen) {
    const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float pf = P::load(p[i]);
    float mf = m[i];
    float vf = v[i];
    float gf = P::load(g[i]);
    if (kPenalty) gf = pen.apply(gf, pf, i);
    adamw_update(pf, gf, mf, vf, s);
    p[i] = P::store(pf);
    m[i] = mf;
    v[i] = vf;
}

PK_DEVICE float warp_max(float x) {
    for (int offset = 16; offset > 0; offset >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
    return x;
}

template <typename P, bool kPenalty>
PK_DEVICE void adamw8bit_body(typename P::storage* __restrict__ p, const typename P::storage* __restrict__ g,
                              uint8_t* __restrict__ mq, float* __restrict__ mabs, uint8_t* __restrict__ vq,
                              float* __restrict__ vabs, const float* __restrict__ smap,
                              const float* __restrict__ umap, int64_t n, const StepScalars& s,
                              const PenaltyArgs<P>& pen) {
    __shared__ float s_smap[kMapSize], s_umap[kMapSize], s_smid[kMapSize - 1], s_umid[kMapSize - 1];
    __shared__ float s_mmax[kQuantBlock / 32], s_vmax[kQuantBlock / 32];
    const int t = threadIdx.x;
    s_smap[t] = smap[t];
    s_umap[t] = umap[t];
    __syncthreads();
    if (t < kMapSize - 1) {
        s_smid[t] = map_midpoint(s_smap, t);
        s_umid[t] = map_midpoint(s_umap, t);
    }
    __syncthreads();
    const int64_t blocks = (n + kQuantBlock - 1) / kQuantBlock;
    for (int64_t b = blockIdx.x; b < blocks; b += gridDim.x) {
        const int64_t i = b * kQuantBlock + t;
        const bool inside = i < n;
        float pf = 0.0f, mf = 0.0f, vf = 0.0f;
        if (inside) {
            pf = P::load(p[i]);
            mf = dequantize(s_smap, mq[i], mabs[b]);
            vf = dequantize(s_umap, vq[i], vabs[b]);
            float gf = P::load(g[i]);
            if (kPenalty) gf = pen.apply(gf, pf, i);
            adamw_update(pf, gf, mf, vf, s);
        }
        float m_max = warp_max(inside ? fabsf(mf) : 0.0f);
        float v_max = warp_max(inside ? fabsf(vf) : 0.0f);
        if ((t & 31) == 0) {
            s_mmax[t >> 5] = m_max;
            s_vmax[t >> 5] = v_max;
        }
        __syncthreads();  // every thread has read mabs[b], vabs[b] before thread 0 rewrites them
        m_max = s_mmax[0];
        v_max = s_vmax[0];
        for (int w = 1; w < kQuantBlock / 32; ++w) {
            m_max = fmaxf(m_max, s_mmax[w]);
            v_max = fmaxf(v_max, s_vmax[w]);
        }
        if (inside) {
            p[i] = P::store(pf);
            mq[i] = nearest_code(s_smid, normalize(mf, m_max));
            vq[i] = nearest_code(s_umid, normalize(vf, v_max));
        }
        if (t == 0) {
            mabs[b] = m_max;
            vabs[b] = v_max;
        }
        __syncthreads();  // s_mmax / s_vmax are reused by the next block
    }
}

}  // namespace kernels
}  // namespace optim
}  // namespace peftkern

#define PEFTKERN_ADAMW_SCALAR_PARAMS                                                                    \
    float beta1, float one_minus_beta1, float beta2, float one_minus_beta2, float decay, float step_size, \
        float bc2_sqrt, float eps
#define PEFTKERN_ADAMW_SCALARS \
    peftkern::optim::StepScalars{beta1, one_minus_beta1, beta2, one_minus_beta2, decay, step_size, bc2_sqrt, eps}

#define PEFTKERN_ADAMW_NO_PENALTY(PARAM) \
    peftkern::optim::PenaltyArgs<PARAM> { nullptr, nullptr, nullptr, nullptr, nullptr, 0.0f }

#define PEFTKERN_DEFINE_ADAMW_KERNELS(SUFFIX, PARAM)                                                              \
    extern "C" __global__ void peftkern_adamw32_step_##SUFFIX(                                                    \
        PARAM::storage* p, const PARAM::storage* g, float* m, float* v, int64_t n, PEFTKERN_ADAMW_SCALAR_PARAMS) { \
        peftkern::optim::kernels::adamw32_body<PARAM, false>(p, g, m, v, n, PEFTKERN_ADAMW_SCALARS,             \
                                                             PEFTKERN_ADAMW_NO_PENALTY(PARAM));                   \
    }                                                                                                             \
    extern "C" __global__ void peftkern_adamw32_penalty_step_##SUFFIX(                                            \
        PARAM::storage* p, const PARAM::storage* g, float* m, float* v, const PARAM::storage* anchor,             \
        const float* fisher, const uint8_t* fisher_codes, const float* fisher_absmax, const float* fisher_map,     \
        float lam, int64_t n, PEFTKERN_ADAMW_SCALAR_PARAMS) {                                                      \
        peftkern::optim::kernels::adamw32_body<PARAM, true>(                                                      \
            p, g, m, v, n, PEFTKERN_ADAMW_SCALARS,                                                                 \
            peftkern::optim::PenaltyArgs<PARAM>{anchor, fisher, fisher_codes, fisher_absmax, fisher_map, lam});    \
    }                                                                                                             \
    extern "C" __global__ void __launch_bounds__(256) peftkern_adamw8bit_step_##SUFFIX(                           \
        PARAM::storage* p, const PARAM::storage* g, uint8_t* mq, float* mabs, uint8_t* vq, float* vabs,           \
        const float* smap, const float* umap, int64_t n, PEFTKERN_ADAMW_SCALAR_PARAMS) {                          \
        peftkern::optim::kernels::adamw8bit_body<PARAM, false>(p, g, mq, mabs, vq, vabs, smap, umap, n,          \
                                                               PEFTKERN_ADAMW_SCALARS,                            \
                                                               PEFTKERN_ADAMW_NO_PENALTY(PARAM));                 \
    }                                                                                                             \
    extern "C" __global__ void __launch_bounds__(256) peftkern_adamw8bit_penalty_step_##SUFFIX(                   \
        PARAM::storage* p, const PARAM::storage* g, uint8_t* mq, float* mabs, uint8_t* vq, float* vabs,           \
        const float* smap, const float* umap, const PARAM::storage* anchor, const float* fisher,                   \
        const uint8_t* fisher_codes, const float* fisher_absmax, float lam, int64_t n,                             \
        PEFTKERN_ADAMW_SCALAR_PARAMS) {                                                                            \
        peftkern::optim::kernels::adamw8bit_body<PARAM, true>(                                                    \
            p, g, mq, mabs, vq, vabs, smap, umap, n, PEFTKERN_ADAMW_SCALARS,                                       \
            peftkern::optim::PenaltyArgs<PARAM>{anchor, fisher, fisher_codes, fisher_absmax, umap, lam});          \
    }

PEFTKERN_DEFINE_ADAMW_KERNELS(f32, peftkern::optim::ParamF32)
PEFTKERN_DEFINE_ADAMW_KERNELS(f16, peftkern::optim::ParamF16)
PEFTKERN_DEFINE_ADAMW_KERNELS(bf16, peftkern::optim::ParamBF16)

#undef PEFTKERN_DEFINE_ADAMW_KERNELS
#undef PEFTKERN_ADAMW_NO_PENALTY
#undef PEFTKERN_ADAMW_SCALARS
#undef PEFTKERN_ADAMW_SCALAR_PARAMS
