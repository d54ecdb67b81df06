// moac_emu::launch unpacks void** params exactly like cuLaunchKernel's kernelParams:
// params[i] points at a value of the i-th parameter type.
#include "test_util.h"

struct Pair {
    int a;
    float b;
};

__global__ void mixed(int* __restrict__ oi, long long* __restrict__ oll, float* __restrict__ of,
                      double* __restrict__ od, const __half* __restrict__ h, int a, long long n,
                      float scale, double alpha, unsigned char c, Pair pr, unsigned short us,
                      bool flag) {
    if (threadIdx.x != 0 || blockIdx.x != 0) return;
    oi[0] = a;
    oi[1] = c;
    oi[2] = pr.a;
    oi[3] = us;
    oi[4] = flag;
    oll[0] = n;
    of[0] = scale;
    of[1] = pr.b;
    of[2] = __half2float(h[1]);
    od[0] = alpha;
}
MOAC_EMU_ENTRY(mixed)

__global__ void no_args() {}
MOAC_EMU_ENTRY(no_args)

int main() {
    int oi[5] = {};
    long long oll[1] = {};
    float of[3] = {};
    double od[1] = {};
    __half hs[2] = {__float2half(1.0f), __float2half(-0.375f)};
    int* poi = oi;
    long long* poll = oll;
    float* pof = of;
    double* pod = od;
    const __half* ph = hs;
    int a = -123456;
    long long n = 5000000000LL;
    float scale = 0.088388f;
    double alpha = 1.0 / 3.0;
    unsigned char c = 200;
    Pair pr{42, 2.5f};
    unsigned short us = 65535;
    bool flag = true;
    void* params[] = {&poi, &poll, &pof, &pod, &ph, &a, &n, &scale, &alpha, &c, &pr, &us, &flag};
    char err[512];
    int rc = moac_emu::launch(mixed, dim3(2, 1, 1), dim3(32), params, err, sizeof err);
    expect(rc == 0, "launch rc=%d %s", rc, err);
    auto check = [&](const char* via) {
        expect(oi[0] == a && oi[1] == 200 && oi[2] == 42 && oi[3] == 65535 && oi[4] == 1,
               "%s: ints %d %d %d %d %d", via, oi[0], oi[1], oi[2], oi[3], oi[4]);
        expect(oll[0] == n, "%s: long long %lld", via, oll[0]);
        expect(of[0] == scale && of[1] == 2.5f && of[2] == -0.375f, "%s: floats", via);
        expect(od[0] == alpha, "%s: double", via);
    };
    check("launch");
    std::memset(oi, 0, sizeof oi);
    oll[0] = 0;
    of[0] = of[1] = of[2] = 0;
    od[0] = 0;
    rc = moac_emu_launch_mixed(1, 1, 1, 64, 1, 1, params, err, sizeof err);
    expect(rc == 0, "entry rc=%d %s", rc, err);
    check("moac_emu_launch_mixed");
    rc = moac_emu_launch_no_args(4, 1, 1, 32, 1, 1, nullptr, err, sizeof err);
    expect(rc == 0, "no-arg kernel with null params rc=%d %s", rc, err);
    return finish("args");
}
