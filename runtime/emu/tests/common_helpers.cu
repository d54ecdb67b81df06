// The project's real device helpers (templates/moac_common.cuh) under the emulation:
// 16-byte loads, pack/unpack of f16/bf16, subgroup sums over 8 lanes -- a small
// dot-product kernel shaped like the decode kernel (8 lanes per 64-dim row).
#include "test_util.h"
#include "../../../templates/moac_common.cuh"

template <typename T>
__global__ void row_dots(const T* __restrict__ q, const T* __restrict__ k, float* __restrict__ out,
                         T* __restrict__ k_copy, int rows) {
    constexpr int D = 64, TPR = 8;  // 8 lanes x 8 elements per row
    const int tid = threadIdx.x, rg = tid / TPR, lane = tid % TPR;
    const int row = blockIdx.x * (blockDim.x / TPR) + rg;
    float qf[8], kf[8];
    moac_unpack8<T>(moac_ldg16(q + lane * 8), qf);
    const uint4 kr = row < rows ? moac_ldg16(k + (long long)row * D + lane * 8) : moac_zero16();
    moac_unpack8<T>(kr, kf);
    float dot = 0.0f;
    for (int i = 0; i < 8; ++i) dot = fmaf(qf[i], kf[i], dot);
    dot = moac_group_sum<TPR>(dot);  // every lane takes part
    if (row < rows) {
        moac_st16(k_copy + (long long)row * D + lane * 8, moac_pack8<T>(kf));
        if (lane == 0) out[row] = dot;
    }
}

template <typename T> static int run(const char* name) {
    const int rows = 100, D = 64;
    std::vector<T> q(D), k(rows * D), kc(rows * D);
    std::vector<float> out(rows, -1);
    for (int i = 0; i < D; ++i) q[i] = T(float((i % 7) - 3) * 0.25f);
    for (int i = 0; i < rows * D; ++i) k[i] = T(float((i * 13) % 17 - 8) * 0.125f);
    // Vector storage is 16-byte aligned (std::allocator gives 16 on x86-64 glibc).
    const T* pq = q.data();
    const T* pk = k.data();
    float* po = out.data();
    T* pc = kc.data();
    int r = rows;
    void* params[] = {&pq, &pk, &po, &pc, &r};
    char err[512];
    const int rc = moac_emu::launch(row_dots<T>, dim3((rows + 15) / 16), dim3(128), params, err, sizeof err);
    expect(rc == 0, "%s: rc=%d %s", name, rc, err);
    for (int row = 0; row < rows; ++row) {
        double want = 0;
        for (int i = 0; i < D; ++i) want += double(float(q[i])) * double(float(k[row * D + i]));
        expect(std::fabs(out[row] - want) <= 1e-5 * (1 + std::fabs(want)), "%s: row %d dot %g want %g", name, row, out[row], want);
        for (int i = 0; i < D; ++i)
            expect(float(kc[row * D + i]) == float(k[row * D + i]), "%s: pack/unpack round trip", name);
    }
    // a misaligned 16-byte load through moac_ldg16 is reported
    const T* bad = q.data() + 1;
    void* pbad[] = {&bad, &pk, &po, &pc, &r};
    const int rc2 = moac_emu::launch(row_dots<T>, dim3(1), dim3(128), pbad, err, sizeof err);
    expect(rc2 == 1 && contains(err, "misaligned 16-byte __ldg load"), "%s: misaligned moac_ldg16: rc=%d %s", name, rc2, err);
    return 0;
}

int main() {
    run<__half>("f16");
    run<__nv_bfloat16>("bf16");
    expect(moac_capacity(0.0, 0.5, 1000, 128, 64) == 512, "moac_capacity");
    return finish("common_helpers");
}
