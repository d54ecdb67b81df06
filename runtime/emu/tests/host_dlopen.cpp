// A host that knows nothing of the header: dlopen the kernel .so and call the C-ABI
// entries, as the Rust runtime does with libloading.
#include <dlfcn.h>
#include <cstdio>
#include <cstring>
#include <cstdint>
#include <vector>

typedef int (*entry_fn)(unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, void**, char*, size_t);

static uint16_t f2h(float f) {  // simple conversion for exactly representable values
    _Float16 h = (_Float16)f;
    uint16_t u;
    memcpy(&u, &h, 2);
    return u;
}

int main(int argc, char** argv) {
    if (argc < 2) return 2;
    void* so = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    if (!so) { fprintf(stderr, "dlopen: %s\n", dlerror()); return 1; }
    auto saxpy = (entry_fn)dlsym(so, "moac_emu_launch_saxpy_half");
    auto dead = (entry_fn)dlsym(so, "moac_emu_launch_will_deadlock");
    if (!saxpy || !dead) { fprintf(stderr, "dlsym failed\n"); return 1; }
    const long long n = 1000;
    std::vector<uint16_t> x(n);
    std::vector<float> y(n, 1.0f);
    for (long long i = 0; i < n; ++i) x[i] = f2h(float(i % 64));
    const void* px = x.data();
    float* py = y.data();
    float a = 0.5f;
    long long nn = n;
    void* params[] = {&px, &py, &a, &nn};
    char err[1024] = "unset";
    int fails = 0;
    int rc = saxpy((n + 127) / 128, 1, 1, 128, 1, 1, params, err, sizeof err);
    if (rc != 0) { fprintf(stderr, "saxpy rc=%d %s\n", rc, err); ++fails; }
    for (long long i = 0; i < n; ++i)
        if (y[i] != 1.0f + 0.5f * float(i % 64)) { fprintf(stderr, "y[%lld]=%g\n", i, y[i]); ++fails; break; }
    void* p2[] = {&py};
    rc = dead(2, 1, 1, 32, 1, 1, p2, err, sizeof err);
    if (rc == 0 || !strstr(err, "deadlock")) { fprintf(stderr, "deadlock entry rc=%d err=%s\n", rc, err); ++fails; }
    char dead_msg[1024];
    snprintf(dead_msg, sizeof dead_msg, "%s", err);
    // and again, the .so stays usable
    rc = saxpy((n + 127) / 128, 1, 1, 128, 1, 1, params, err, sizeof err);
    if (rc != 0 || y[3] != 1.0f + 2 * 0.5f * 3) { fprintf(stderr, "second saxpy rc=%d y3=%g\n", rc, y[3]); ++fails; }
    dlclose(so);
    if (fails) return 1;
    printf("dlopen: ok (deadlock entry said: %s)\n", dead_msg);
    return 0;
}
