// Block reduction: with __syncthreads it is right; without, the emulation runs each
// thread to its next sync point (here: to its end), so the tree reads stale shared
// memory and the sum is wrong -- the missing barrier is caught, deterministically.
#include "test_util.h"

__global__ void reduce_sync(const float* __restrict__ in, float* __restrict__ out) {
    __shared__ float s[128];
    const int t = threadIdx.x;
    s[t] = in[blockIdx.x * 128 + t];
    __syncthreads();
    for (int st = 64; st > 0; st >>= 1) {
        if (t < st) s[t] += s[t + st];
        __syncthreads();
    }
    if (t == 0) out[blockIdx.x] = s[0];
}

__global__ void reduce_nosync(const float* __restrict__ in, float* __restrict__ out) {
    __shared__ float s[128];
    const int t = threadIdx.x;
    s[t] = in[blockIdx.x * 128 + t];
    for (int st = 64; st > 0; st >>= 1) {
        if (t < st) s[t] += s[t + st];
    }
    if (t == 0) out[blockIdx.x] = s[0];
}

// 3-D block and grid: linear thread id, blockIdx/gridDim/blockDim per fiber.
__global__ void reduce_3d(const int* __restrict__ in, int* __restrict__ out, int* __restrict__ ids) {
    __shared__ int s[128];
    const int t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    const int b = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    s[t] = in[b * 128 + t];
    ids[b * 128 + t] = (int)(threadIdx.z * 10000 + threadIdx.y * 100 + threadIdx.x);
    __syncthreads();
    for (int st = 64; st > 0; st >>= 1) {
        if (t < st) s[t] += s[t + st];
        __syncthreads();
    }
    if (t == 0) out[b] = s[0];
}

// 1024 threads (32 warps), dynamic shared memory, warp shuffles + barrier.
__global__ void reduce_1024_dyn(const float* __restrict__ in, float* __restrict__ out) {
    MOAC_EMU_DYNAMIC_SHARED(float, partial);  // CUDA: extern __shared__ float partial[];
    const int t = threadIdx.x, lane = t % 32, warp = t / 32;
    float v = in[blockIdx.x * 1024 + t];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = partial[lane];
        for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
        if (lane == 0) out[blockIdx.x] = v;
    }
}
MOAC_EMU_ENTRY_DYN(reduce_1024_dyn)

int main() {
    const int nb = 16;
    std::vector<float> in(nb * 128);
    for (int i = 0; i < nb * 128; ++i) in[i] = float(i % 128 + 1 + i / 128);  // exact sums
    std::vector<float> o1(nb, -1), o2(nb, -1);
    const float* pin = in.data();
    float* po = o1.data();
    void* p1[] = {&pin, &po};
    char err[1024];
    int rc = moac_emu::launch(reduce_sync, dim3(nb), dim3(128), p1, err, sizeof err);
    expect(rc == 0, "reduce_sync rc=%d err=%s", rc, err);
    int wrong = 0;
    for (int b = 0; b < nb; ++b) {
        const float want = 128 * 129 / 2 + 128.0f * b;
        expect(o1[b] == want, "with __syncthreads: block %d sum %g, want %g", b, o1[b], want);
    }
    po = o2.data();
    void* p2[] = {&pin, &po};
    rc = moac_emu::launch(reduce_nosync, dim3(nb), dim3(128), p2, err, sizeof err);
    expect(rc == 0, "reduce_nosync rc=%d err=%s", rc, err);
    for (int b = 0; b < nb; ++b) wrong += o2[b] != o1[b];
    expect(wrong == nb, "without __syncthreads every block should be wrong, %d of %d were", wrong, nb);
    printf("  [block sum with __syncthreads %g, without %g: stale shared memory]\n", o1[0], o2[0]);

    // 3-D
    const dim3 grid(2, 3, 2), block(8, 4, 4);
    const int nb3 = 12;
    std::vector<int> in3(nb3 * 128), out3(nb3, -1), ids(nb3 * 128, -1);
    for (int i = 0; i < nb3 * 128; ++i) in3[i] = i;
    const int* pi3 = in3.data();
    int* po3 = out3.data();
    int* pids = ids.data();
    void* p3[] = {&pi3, &po3, &pids};
    rc = moac_emu::launch(reduce_3d, grid, block, p3, err, sizeof err);
    expect(rc == 0, "reduce_3d rc=%d err=%s", rc, err);
    for (int b = 0; b < nb3; ++b) {
        long long want = 0;
        for (int t = 0; t < 128; ++t) want += b * 128 + t;
        expect(out3[b] == want, "3-D block %d sum %d want %lld", b, out3[b], want);
        for (int t = 0; t < 128; ++t) {
            const int x = t % 8, y = (t / 8) % 4, z = t / 32;
            expect(ids[b * 128 + t] == z * 10000 + y * 100 + x, "threadIdx of linear thread %d", t);
        }
    }

    // 1024-thread blocks with dynamic shared memory, via launch() and the C entry
    std::vector<float> in4(4 * 1024), out4(4, -1);
    for (int i = 0; i < 4 * 1024; ++i) in4[i] = float(i % 1024);
    const float* pi4 = in4.data();
    float* po4 = out4.data();
    void* p4[] = {&pi4, &po4};
    rc = moac_emu::launch(reduce_1024_dyn, dim3(4), dim3(1024), 32 * sizeof(float), p4, err, sizeof err);
    expect(rc == 0, "reduce_1024_dyn rc=%d %s", rc, err);
    for (int b = 0; b < 4; ++b) expect(out4[b] == 1023.0f * 1024 / 2, "1024-thread block %d: %g", b, out4[b]);
    out4.assign(4, -1);
    rc = moac_emu_launch_dyn_reduce_1024_dyn(4, 1, 1, 1024, 1, 1, 128, p4, err, sizeof err);
    expect(rc == 0 && out4[3] == 1023.0f * 1024 / 2, "moac_emu_launch_dyn_ entry rc=%d %s", rc, err);
    return finish("reduce");
}
