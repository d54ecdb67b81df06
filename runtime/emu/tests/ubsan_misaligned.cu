// Built with -fsanitize=address,undefined -fno-sanitize-recover=all: a plain misaligned
// uint4 load (not through __ldg) is reported by UBSan's alignment check.
#include "test_util.h"

__global__ void misaligned(const char* base, uint4* out) {
    out[threadIdx.x] = *reinterpret_cast<const uint4*>(base + 4);
}

int main() {
    alignas(16) static char buf[64];
    std::vector<uint4> out(32);
    const char* pb = buf;
    uint4* po = out.data();
    void* params[] = {&pb, &po};
    char err[512];
    const int rc = moac_emu::launch(misaligned, dim3(1), dim3(32), params, err, sizeof err);
    printf("misaligned launch returned %d without a UBSan report\n", rc);
    return 0;
}
