// Atomics from many blocks running on several OS threads (run with MOAC_EMU_THREADS=4).
//
// Which worker takes which block is up to the OS scheduler: on a busy machine one worker
// can take all 512 blocks before the others start. So concurrency is not checked by
// watching where blocks ran. Instead the first W = MOAC_EMU_THREADS blocks wait for each
// other before they hammer shared counters. The header hands blocks out in linear order
// and a worker takes a new block only when its current one has finished, so these W
// blocks are running at once, on W different OS threads, whatever the scheduling: the
// atomics are checked under real contention, and a header that ran blocks one after
// another (or on fewer threads than asked) fails the rendezvous with a message.
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
    int arrived;  // rendezvous of the first W blocks
    // hammered by the W blocks while all of them are running
    int h_i;
    unsigned long long h_ull;
    float h_f;
    double h_d;
    int h_cas;  // incremented with an atomicCAS retry loop
};

constexpr int kMaxResident = 64;
constexpr int kHammer = 256;  // iterations per thread of a resident block
constexpr int kRendezvousSeconds = 60;  // only a broken header waits this long

static std::mutex g_mu;
static std::set<std::thread::id> g_threads;
static std::thread::id g_resident[kMaxResident];

__global__ void atomics(Counters* c, float* partial, float* total, int resident) {
    const int t = threadIdx.x, b = blockIdx.x;
    if (b < resident) {
        if (t == 0) {
            // Host code in a kernel is fine in the emulation. A fiber is not preempted,
            // so this OS thread runs nothing else while it waits: the other blocks can
            // only arrive from other OS threads.
            atomicAdd(&c->arrived, 1);
            const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(kRendezvousSeconds);
            while (atomicAdd(&c->arrived, 0) < resident) {
                if (std::chrono::steady_clock::now() > deadline) {
                    char msg[160];
                    snprintf(msg, sizeof msg,
                             "rendezvous: %d of the first %d blocks were running at once after %d s",
                             atomicAdd(&c->arrived, 0), resident, kRendezvousSeconds);
                    moac_emu_fail(msg);
                }
                std::this_thread::yield();
            }
            g_resident[b] = std::this_thread::get_id();
        }
        __syncthreads();
        for (int k = 0; k < kHammer; ++k) {
            atomicAdd(&c->h_i, 1);
            atomicAdd(&c->h_ull, 1ull << 33);  // carries into the high word
            atomicAdd(&c->h_f, 1.0f);
            atomicAdd(&c->h_d, 0.25);
            int old = *(volatile int*)&c->h_cas, assumed;  // possibly stale: the loop retries
            do {
                assumed = old;
                old = atomicCAS(&c->h_cas, assumed, assumed + 1);
            } while (old != assumed);
        }
    }
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
        std::lock_guard<std::mutex> lk(g_mu);
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
    // run.sh sets MOAC_EMU_THREADS; run by hand, default to 4 workers rather than to the
    // machine's core count (which may be 1).
    setenv("MOAC_EMU_THREADS", "4", 0);
    const int resident = std::min(atoi(getenv("MOAC_EMU_THREADS")), kMaxResident);
    if (!expect(resident >= 2, "MOAC_EMU_THREADS=%s: this test needs at least 2", getenv("MOAC_EMU_THREADS")))
        return finish("atomics");
    const int nb = 512, nt = 128;
    Counters c{};
    c.imax = INT_MIN;
    c.imin = INT_MAX;
    std::vector<float> partial(nb, -1);
    float total = -1;
    Counters* pc = &c;
    float* pp = partial.data();
    float* pt = &total;
    int res = resident;
    void* params[] = {&pc, &pp, &pt, &res};
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
    // Under contention: every update counted once (all values stay exact in float/double).
    const long long h = (long long)resident * nt * kHammer;
    expect(c.arrived == resident, "rendezvous: %d of %d blocks arrived", c.arrived, resident);
    expect(c.h_i == h, "contended atomicAdd int %d want %lld", c.h_i, h);
    expect(c.h_ull == (unsigned long long)h << 33, "contended atomicAdd ull %llu", c.h_ull);
    expect(c.h_f == float(h), "contended atomicAdd float %g want %lld", c.h_f, h);
    expect(c.h_d == 0.25 * h, "contended atomicAdd double %g", c.h_d);
    expect(c.h_cas == h, "contended atomicCAS loop %d want %lld", c.h_cas, h);
    // Implied by the rendezvous (a waiting block holds its OS thread); checked all the same.
    const std::set<std::thread::id> res_threads(g_resident, g_resident + resident);
    expect(res_threads.size() == size_t(resident) && !res_threads.count(std::thread::id()),
           "the %d waiting blocks ran on %zu distinct OS threads", resident, res_threads.size());
    // Information only: how the other blocks spread is up to the OS scheduler.
    printf("  [%d blocks ran on %zu OS threads; %d of the first %d ran at once]\n", nb, g_threads.size(),
           c.arrived, resident);
    return finish("atomics");
}
