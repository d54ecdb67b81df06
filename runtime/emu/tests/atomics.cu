// Atomics from many blocks running on several OS threads (run with MOAC_EMU_THREADS=4).
#include "test_util.h"
#include <set>

struct Counters {
    int i;
    unsigned u;
    unsigned long long ull;
    float f;
    double d;
    int imax, imin;
    int lock;
    int guarded;  // incremented under a spin lock built from atomicCAS/atomicExch
    unsigned inc;
    int last_block;  // threadfence reduction: the last block to finish
    unsigned done;
};

static std::mutex g_mu;
static std::set<std::thread::id> g_threads;

__global__ void atomics(Counters* c, float* partial, float* total) {
    const int t = threadIdx.x, b = blockIdx.x;
    atomicAdd(&c->i, 1);
    atomicAdd(&c->u, 2u);
    atomicAdd(&c->ull, 3ull);
    atomicAdd(&c->f, 1.0f);
    atomicAdd(&c->d, 0.5);
    atomicMax(&c->imax, b * 1000 + t);
    atomicMin(&c->imin, -(b * 1000 + t));
    atomicInc(&c->inc, 1u << 30);
    if (t == 0) {
        while (atomicCAS(&c->lock, 0, 1) != 0) {
        }
        c->guarded += 1;  // plain read-modify-write under the lock
        __threadfence();
        atomicExch(&c->lock, 0);
        std::lock_guard<std::mutex> lk(g_mu);  // host code is fine in the emulation
        g_threads.insert(std::this_thread::get_id());
    }
    // threadfence reduction: each block writes a partial, the last one sums them
    __shared__ bool is_last;
    if (t == 0) {
        partial[b] = float(b);
        __threadfence();
        const unsigned ticket = atomicAdd(&c->done, 1u);
        is_last = ticket == gridDim.x - 1;
    }
    __syncthreads();
    if (is_last && t == 0) {
        __threadfence();
        float s = 0;
        for (unsigned i = 0; i < gridDim.x; ++i) s += ((volatile float*)partial)[i];
        *total = s;
        c->last_block = b;
    }
}

int main() {
    const int nb = 512, nt = 128;
    Counters c{};
    c.imax = INT_MIN;
    c.imin = INT_MAX;
    std::vector<float> partial(nb, -1);
    float total = -1;
    Counters* pc = &c;
    float* pp = partial.data();
    float* pt = &total;
    void* params[] = {&pc, &pp, &pt};
    char err[1024];
    const int rc = moac_emu::launch(atomics, dim3(nb), dim3(nt), params, err, sizeof err);
    expect(rc == 0, "rc=%d err=%s", rc, err);
    const long long n = (long long)nb * nt;
    expect(c.i == n, "atomicAdd int %d want %lld", c.i, n);
    expect(c.u == 2 * n, "atomicAdd unsigned");
    expect(c.ull == 3ull * n, "atomicAdd ull");
    expect(c.f == float(n), "atomicAdd float %g want %lld", c.f, n);
    expect(c.d == 0.5 * n, "atomicAdd double");
    expect(c.imax == (nb - 1) * 1000 + nt - 1, "atomicMax %d", c.imax);
    expect(c.imin == -((nb - 1) * 1000 + nt - 1), "atomicMin %d", c.imin);
    expect(c.inc == unsigned(n), "atomicInc");
    expect(c.guarded == nb && c.lock == 0, "CAS spin lock: %d", c.guarded);
    expect(total == float(nb) * (nb - 1) / 2, "threadfence reduction total %g", total);
    expect(g_threads.size() > 1, "blocks ran on %zu OS thread(s), want several", g_threads.size());
    printf("  [%d blocks ran on %zu OS threads]\n", nb, g_threads.size());
    return finish("atomics");
}
