// Failures are reported by the launch (non-zero + message), never hang or crash:
// deadlocks, early exit before __syncthreads, traps, asserts, misaligned 16-byte loads,
// mask errors, exceptions, invalid launches. The emulation stays usable afterwards.
#include "test_util.h"

__global__ void half_warp_shfl(float* out) {
    float v = threadIdx.x;
    if (blockIdx.x == 1 && threadIdx.x < 16) v = __shfl_xor_sync(0xffffffffu, v, 1);
    out[blockIdx.x * 64 + threadIdx.x] = v;
}
__global__ void early_exit(float* out) {
    __shared__ float s[64];
    if (threadIdx.x == 5) return;
    s[threadIdx.x] = 1.0f;
    __syncthreads();
    out[threadIdx.x] = s[63 - threadIdx.x];
}
__global__ void shfl_vs_barrier(float* out) {
    float v = threadIdx.x;
    if (threadIdx.x == 0) __syncthreads();
    else v = __shfl_xor_sync(0xffffffffu, v, 1);
    out[threadIdx.x] = v;
}
__global__ void traps(float* out) {
    if (blockIdx.x == 2 && threadIdx.x == 7) __trap();
    out[0] = 1;
}
__global__ void custom_fail(float*) {
    if (threadIdx.x == 3) moac_emu_fail("custom failure message");
    __syncthreads();
}
__global__ void asserts(float* out) {
    assert(threadIdx.x < 40);
    out[threadIdx.x] = 1;
}
__global__ void misaligned_ldg(const char* base, uint4* out) {
    out[threadIdx.x] = __ldg(reinterpret_cast<const uint4*>(base + 4 + 16 * threadIdx.x));
}
__global__ void misaligned_load16(const char* base, uint4* out) {
    out[threadIdx.x] = moac_emu_load16(base + 8);
}
__global__ void mismatched(float* out) {
    float v = threadIdx.x;
    if (threadIdx.x == 0) v = __shfl_xor_sync(0x3u, v, 1);
    else v = __shfl_xor_sync(0xffffffffu, v, 1);
    out[threadIdx.x] = v;
}
__global__ void not_in_mask(float* out) {
    out[threadIdx.x] = __shfl_sync(0x1u, 1.0f, 0);
}
__global__ void throws(float*) {
    if (threadIdx.x == 1) throw std::runtime_error("boom");
}
__global__ void missing_lanes(float* out) {  // 48 threads: warp 1 has 16 lanes
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
}
__global__ void ok_kernel(float* out) {
    __syncthreads();
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, float(threadIdx.x), 1);
}

template <class... A>
static void expect_error(const char* name, void (*k)(A...), dim3 g, dim3 b, void** p, int want_rc,
                         std::initializer_list<const char*> needles) {
    char err[2048] = "";
    const auto t0 = std::chrono::steady_clock::now();
    const int rc = moac_emu::launch(k, g, b, p, err, sizeof err);
    const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    expect(rc == want_rc, "%s: rc=%d, want %d (err: %s)", name, rc, want_rc, err);
    for (const char* n : needles) expect(contains(err, n), "%s: message lacks \"%s\": %s", name, n, err);
    printf("  %-18s rc=%d %.1f ms: %s\n", name, rc, ms, err);
}

int main() {
    std::vector<float> out(4096);
    float* po = out.data();
    void* p[] = {&po};
    expect_error("half-warp shfl", half_warp_shfl, dim3(3), dim3(64), p, 1,
                 {"deadlock", "block (1,0,0)", "(0,0,0)..(15,0,0)", "__shfl_xor_sync(mask=0xffffffff)",
                  "(16,0,0)..(31,0,0)] exited"});
    expect_error("early exit", early_exit, dim3(1), dim3(64), p, 1,
                 {"deadlock", "block (0,0,0)", "63 thread(s) wait at __syncthreads", "(5,0,0)", "exited without reaching it"});
    expect_error("shfl vs barrier", shfl_vs_barrier, dim3(1), dim3(32), p, 1,
                 {"deadlock", "wait at __syncthreads [(0,0,0)]", "(1,0,0)..(31,0,0)"});
    expect_error("trap", traps, dim3(4), dim3(32), p, 1, {"block (2,0,0) thread (7,0,0)", "__trap"});
    expect_error("moac_emu_fail", custom_fail, dim3(1), dim3(32), p, 1, {"thread (3,0,0)", "custom failure message"});
    expect_error("assert", asserts, dim3(1), dim3(64), p, 1, {"thread (40,0,0)", "assertion", "threadIdx.x < 40"});
    alignas(16) static char buf[64 * 16 + 64];
    std::vector<uint4> vout(64);
    const char* pb = buf;
    uint4* pv = vout.data();
    void* pa[] = {&pb, &pv};
    expect_error("misaligned __ldg", misaligned_ldg, dim3(1), dim3(32), pa, 1, {"misaligned 16-byte __ldg load", "thread (0,0,0)"});
    expect_error("misaligned load16", misaligned_load16, dim3(1), dim3(32), pa, 1, {"misaligned 16-byte load"});
    expect_error("mismatched masks", mismatched, dim3(1), dim3(32), p, 1, {"mismatched warp collective"});
    expect_error("lane not in mask", not_in_mask, dim3(1), dim3(32), p, 1, {"not in the mask", "thread (1,0,0)"});
    expect_error("exception", throws, dim3(1), dim3(32), p, 1, {"C++ exception", "boom", "thread (1,0,0)"});
    expect_error("missing lanes", missing_lanes, dim3(1), dim3(48), p, 1, {"do not exist", "warp 1 has 16 threads"});
    expect_error("block too big", ok_kernel, dim3(1), dim3(2048), p, 2, {"invalid block"});
    expect_error("zero grid", ok_kernel, dim3(0), dim3(32), p, 2, {"invalid grid"});
    expect_error("null params", ok_kernel, dim3(1), dim3(32), nullptr, 2, {"params is null"});
    void* pn[] = {nullptr};
    expect_error("null param", ok_kernel, dim3(1), dim3(32), pn, 2, {"params[0] is null"});
    // the emulation is still fine after all that
    expect_error("ok after errors", ok_kernel, dim3(8), dim3(64), p, 0, {});
    for (int i = 0; i < 64; ++i) expect(out[i] == float(i ^ 1), "ok kernel result %d", i);
    return finish("errors");
}
