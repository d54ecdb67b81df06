// __pipeline_memcpy_async is deferred until a __pipeline_wait_prior covering its batch.
#include "test_util.h"

__global__ void pipe(const int* __restrict__ src, int* __restrict__ out) {
    __shared__ __align__(16) int buf[3][4];
    const int t = threadIdx.x;
    if (t == 0) {
        for (int s = 0; s < 3; ++s)
            for (int i = 0; i < 4; ++i) buf[s][i] = -1;
        __pipeline_memcpy_async(&buf[0][0], src, 16);      // batch 0
        __pipeline_commit();
        __pipeline_memcpy_async(&buf[1][0], src + 4, 16);  // batch 1
        __pipeline_commit();
        __pipeline_memcpy_async(&buf[2][0], src + 8, 8, 4);  // batch 2: 4 bytes + 4 zero-filled
        __pipeline_commit();
        out[0] = buf[0][0];  // not waited yet: stale
        __pipeline_wait_prior(2);
        out[1] = buf[0][3];  // batch 0 done
        out[2] = buf[1][0];  // batch 1 still pending
        __pipeline_wait_prior(0);
        out[3] = buf[1][3];
        out[4] = buf[2][0];
        out[5] = buf[2][1];  // zero-filled
    }
    __syncthreads();
}

int main() {
    int src[12];
    for (int i = 0; i < 12; ++i) src[i] = 100 + i;
    int out[6] = {};
    const int* ps = src;
    int* po = out;
    void* params[] = {&ps, &po};
    char err[512];
    const int rc = moac_emu::launch(pipe, dim3(1), dim3(32), params, err, sizeof err);
    expect(rc == 0, "rc=%d %s", rc, err);
    expect(out[0] == -1, "before wait: %d", out[0]);
    expect(out[1] == 103, "batch 0 after wait_prior(2): %d", out[1]);
    expect(out[2] == -1, "batch 1 pending after wait_prior(2): %d", out[2]);
    expect(out[3] == 107 && out[4] == 108, "after wait_prior(0): %d %d", out[3], out[4]);
    expect(out[5] == 0, "zero fill: %d", out[5]);
    return finish("pipeline");
}
