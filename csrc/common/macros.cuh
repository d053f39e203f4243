// Qualifiers that let one math header compile both under nvcc (device code) and g++ (host twin).
#pragma once
#if defined(__CUDACC_RTC__)
// NVRTC has no C++ standard headers.
typedef unsigned char uint8_t;
typedef signed char int8_t;
typedef unsigned short uint16_t;
typedef unsigned int uint32_t;
typedef int int32_t;
typedef unsigned long long uint64_t;
typedef long long int64_t;
#else
#include <cstdint>
#endif

#if defined(__CUDACC__)
#define PK_HD __host__ __device__ __forceinline__
#define PK_DEVICE __device__ __forceinline__
#else
#define PK_HD inline
#define PK_DEVICE inline
#endif
