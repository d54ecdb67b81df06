// Built with -fsanitize=address,undefined: an out-of-bounds global read in a kernel
// (on a fiber stack) must be reported by ASan. run.sh expects a failing exit and the
// "heap-buffer-overflow" report.
#include "test_util.h"

__global__ void oob(const float* __restrict__ in, float* __restrict__ out, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    __syncthreads();
    out[i % n] = in[i];  // reads in[n .. 63]: past the end
}

int main() {
    const int n = 50;
    float* in = new float[n];
    float* out = new float[n];
    for (int i = 0; i < n; ++i) in[i] = float(i);
    int nn = n;
    void* params[] = {&in, &out, &nn};
    char err[512];
    const int rc = moac_emu::launch(oob, dim3(2), dim3(32), params, err, sizeof err);
    printf("oob launch returned %d without an ASan report\n", rc);
    delete[] in;
    delete[] out;
    return 0;
}
