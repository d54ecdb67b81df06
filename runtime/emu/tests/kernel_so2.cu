// A second kernel translation unit linked into the same .so as kernel_so.cu: the
// header's inline variables and the COMDAT context-switch code must not clash.
extern "C" __global__ void scale_in_place(float* y, float a, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    __syncthreads();
    if (i < n) y[i] *= a;
}
MOAC_EMU_ENTRY(scale_in_place)
