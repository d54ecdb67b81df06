// ---- moac_common.cuh: portable helpers shared by every moac kernel ----------------
// Plain CUDA C++ (no template-engine syntax). Everything here must also compile in the
// CPU emulation (MOAC_EMU): no inline PTX, no ldmatrix/mma/TMA.

#ifndef MOAC_EMU
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif
#endif

#define MOAC_FULL_MASK 0xffffffffu

// __launch_bounds__ with a minimum of resident blocks (a register budget for ptxas);
// the emulation only sees the thread bound.
#ifndef MOAC_EMU
#define MOAC_LAUNCH_BOUNDS(max_threads, min_blocks) __launch_bounds__(max_threads, min_blocks)
#else
#define MOAC_LAUNCH_BOUNDS(max_threads, min_blocks) __launch_bounds__(max_threads)
#endif

// ---- element conversions ---------------------------------------------------------

__device__ __forceinline__ float moac_to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float moac_to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// Round to nearest even.
template <typename T> __device__ __forceinline__ T moac_from_float(float x);
template <> __device__ __forceinline__ __half moac_from_float<__half>(float x) {
    return __float2half_rn(x);
}
template <> __device__ __forceinline__ __nv_bfloat16 moac_from_float<__nv_bfloat16>(float x) {
    return __float2bfloat16_rn(x);
}

// ---- 16-byte memory helpers --------------------------------------------------------

// Read-only, non-coherent 16-byte global load (ld.global.nc.v4.u32). p must be 16-byte aligned.
__device__ __forceinline__ uint4 moac_ldg16(const void* p) {
    return __ldg(reinterpret_cast<const uint4*>(p));
}

// Plain 16-byte store. p must be 16-byte aligned.
__device__ __forceinline__ void moac_st16(void* p, uint4 v) {
    *reinterpret_cast<uint4*>(p) = v;
}

__device__ __forceinline__ uint4 moac_zero16() { return make_uint4(0u, 0u, 0u, 0u); }

// Unpack 8 elements of type T held in a uint4 into floats.
template <typename T>
__device__ __forceinline__ void moac_unpack8(const uint4& u, float (&f)[8]) {
    const T* e = reinterpret_cast<const T*>(&u);
#pragma unroll
    for (int i = 0; i < 8; ++i) f[i] = moac_to_float(e[i]);
}

// Pack 8 floats into 8 elements of type T (round to nearest even).
template <typename T>
__device__ __forceinline__ uint4 moac_pack8(const float (&f)[8]) {
    uint4 u;
    T* e = reinterpret_cast<T*>(&u);
#pragma unroll
    for (int i = 0; i < 8; ++i) e[i] = moac_from_float<T>(f[i]);
    return u;
}

// ---- warp collectives over aligned subgroups of WIDTH lanes (power of two, <= 32) ----
// Every lane of the warp must call these (full mask).

template <int WIDTH>
__device__ __forceinline__ float moac_group_sum(float v) {
#pragma unroll
    for (int o = WIDTH / 2; o > 0; o >>= 1) v += __shfl_xor_sync(MOAC_FULL_MASK, v, o);
    return v;
}

template <int WIDTH>
__device__ __forceinline__ float moac_group_max(float v) {
#pragma unroll
    for (int o = WIDTH / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(MOAC_FULL_MASK, v, o));
    return v;
}

// ---- capacity rule (docs/kernel-abi.md), identical on host and device ----------------
//   s = alpha + beta * N  (IEEE double, no contraction)
//   c = N if s >= N, 0 if s <= 0, else trunc(s)
//   C = ceil(max(c, min_cap) / gran) * gran
__device__ __forceinline__ int moac_capacity(double alpha, double beta, long long n,
                                             int min_cap, int gran) {
    const double nd = (double)n;
    const double s = __dadd_rn(alpha, __dmul_rn(beta, nd));
    long long c;
    if (s >= nd) {
        c = n;
    } else if (s <= 0.0) {
        c = 0;
    } else {
        c = (long long)s;  // truncation toward zero, s in (0, n)
    }
    if (c < (long long)min_cap) c = (long long)min_cap;
    const long long cap = (c + (long long)gran - 1) / (long long)gran * (long long)gran;
    return (int)cap;
}

// Position held by slot s of a KV region with ring length local_kv, for a row holding t
// tokens. Only meaningful for valid slots (s < min(t, SINK + local_kv)).
__device__ __forceinline__ int moac_slot_position(int s, int t, int sink, int local_kv) {
    if (s < sink) return s;
    const int r = s - sink;
    const int w = t - sink;
    return sink + r + local_kv * ((w - 1 - r) / local_kv);
}

// Slot of token position p (p >= 0) in a KV region; -1 if it has none (empty ring).
__device__ __forceinline__ int moac_position_slot(int p, int sink, int local_kv) {
    if (p < sink) return p;
    if (local_kv <= 0) return -1;
    return sink + (p - sink) % local_kv;
}
// ---- end moac_common.cuh ---------------------------------------------------------
