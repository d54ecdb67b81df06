// Built exactly like generated kernels: g++ -std=c++20 -O2 -fno-strict-aliasing -fPIC
// -shared -DMOAC_EMU -include moac_emu.h kernel_so.cu -o libkernel.so
#ifndef MOAC_EMU
#include <cuda_fp16.h>
#endif

extern "C" __global__ void __launch_bounds__(128)
saxpy_half(const __half* __restrict__ x, float* __restrict__ y, float a, long long n) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    float v = 0.0f;
    if (i < n) v = a * __half2float(x[i]);
    // warp sum so the entry exercises fibers too
    float s = v;
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    if (i < n) y[i] += v + 0.0f * s;
}
MOAC_EMU_ENTRY(saxpy_half)

extern "C" __global__ void will_deadlock(float* y) {
    if (threadIdx.x < 16) y[0] = __shfl_sync(0xffffffffu, 1.0f, 0);
}
MOAC_EMU_ENTRY(will_deadlock)
