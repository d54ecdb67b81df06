// moac_emu.h -- run CUDA kernel source on the CPU (the `emu` backend of moac).
//
// Build a kernel with
//   g++ -std=c++20 -O2 -fno-strict-aliasing -fPIC -shared -DMOAC_EMU -include moac_emu.h kernel.cu
// (kernel sources guard `#include <cuda_fp16.h>` etc. with `#ifndef MOAC_EMU`). Never build
// with -ffast-math: it breaks inf/NaN handling and fp16 subnormals.
//
// Execution model
//   * A launch spreads its blocks over a small pool of OS threads (hardware_concurrency,
//     env MOAC_EMU_THREADS). Each block runs start to finish on one OS thread.
//     Blocks are handed out in linear order and a worker takes the next one only when its
//     block has finished, so the first MOAC_EMU_THREADS blocks of a grid may wait for each
//     other (tests/atomics.cu relies on it); which worker runs the rest is up to the OS.
//   * The CUDA threads of a block are user-level fibers on that OS thread. A fiber runs
//     until it reaches a barrier or a warp collective, then the next fiber runs. So threads
//     interleave ONLY at sync points: a missing __syncthreads shows up as stale reads.
//   * `__shared__` is `static thread_local`: one copy per OS thread, correct because an OS
//     thread runs one block at a time. `extern __shared__` cannot be expressed that way:
//     write MOAC_EMU_DYNAMIC_SHARED(T, name) at function scope instead (section 5b) and
//     launch with the dynamic size (launch overload / MOAC_EMU_ENTRY_DYN).
//   * Deadlocks (no fiber of a block can proceed), traps and C++ exceptions end the launch
//     with an error message naming the block and threads; the launch returns non-zero.
//
// Entry points
//   template <class... A>
//   int moac_emu::launch(void (*kernel)(A...), dim3 grid, dim3 block, void** params,
//                        char* err, size_t errlen);
//   MOAC_EMU_ENTRY(kernel) defines
//   extern "C" int moac_emu_launch_<kernel>(unsigned gx, unsigned gy, unsigned gz,
//                                           unsigned bx, unsigned by, unsigned bz,
//                                           void** params, char* err, size_t errlen);
//   MOAC_EMU_ENTRY_DYN(kernel) defines moac_emu_launch_dyn_<kernel>(..., unsigned bz,
//                                    unsigned dyn_smem_bytes, void** params, char* err, size_t errlen)
//   Return values: 0 ok, 1 the kernel failed (deadlock, trap, misaligned access,
//   exception), 2 invalid launch (configuration or params), 3 internal (out of memory).
//
// Not emulated / limitations
//   * Inline PTX, ldmatrix/mma, TMA, clusters, cooperative groups, cuda::pipeline: put
//     them behind named helpers with a portable body.
//   * Fibers are not preempted: a thread spinning on a flag that another thread of the
//     same block (or a block not yet started) must set hangs. Barriers and collectives
//     never hang: a block where no fiber can proceed is reported as a deadlock.
//   * Strict barrier rule: every thread of the block must reach __syncthreads (a thread
//     that exited makes the others' barrier a reported deadlock).
//   * A shuffle whose source lane is outside the mask returns the caller's own value
//     (undefined in CUDA). __activemask() returns the warp's non-exited lanes.
//   * __expf/__logf/rsqrtf/... are the accurate libm functions; compare with tolerances.
//   * Plain (non-__ldg) misaligned uint4/float4 accesses are only reported under
//     -fsanitize=undefined (alignment check); __ldg, the __ld*/__st* hints,
//     moac_emu_load16/store16 and __pipeline_memcpy_async check always.
//   * A fiber stack overflow hits a guard page (SIGSEGV), it is not turned into an error.
//     Raise MOAC_EMU_STACK (default 64 KiB, 256 KiB under ASan) for big local arrays.
//   * The x86-64 switch does not maintain a CET shadow stack; build with
//     -DMOAC_EMU_UCONTEXT where shadow stacks are enforced.
//   * `assert` fails the launch; a later `#include <assert.h>` in the kernel restores
//     the aborting libc macro.

#ifndef MOAC_EMU_H
#define MOAC_EMU_H

// ---- 0. Standard headers ------------------------------------------------------------
// Included BEFORE the CUDA keyword macros below: libstdc++ spells attributes such as
// `__attribute__((__noinline__))`, which our `__noinline__` macro would break.
#include <algorithm>
#include <atomic>
#include <bit>
#include <cassert>
#include <cfloat>
#include <chrono>
#include <climits>
#include <cmath>
#include <cstdarg>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
#include <limits>
#include <memory>
#include <mutex>
#include <new>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include <sys/mman.h>
#include <unistd.h>

// Context-switch backend: hand-written x86-64 switch, ucontext elsewhere (or when
// MOAC_EMU_UCONTEXT is defined, which the tests use to check the fallback).
#if defined(__x86_64__) && !defined(MOAC_EMU_UCONTEXT)
#define MOAC_EMU_ASM_SWITCH 1
#else
#define MOAC_EMU_ASM_SWITCH 0
#include <ucontext.h>
#endif

// AddressSanitizer: fiber switches are announced to ASan so it tracks the right stack.
#if defined(__SANITIZE_ADDRESS__)
#define MOAC_EMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define MOAC_EMU_ASAN 1
#endif
#endif
#ifndef MOAC_EMU_ASAN
#define MOAC_EMU_ASAN 0
#endif
#if MOAC_EMU_ASAN
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

// Kernel sources use `#pragma unroll`, which g++ does not know.
#pragma GCC diagnostic ignored "-Wunknown-pragmas"

// ---- 1. CUDA keywords ------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __constant__
#define __managed__
#define __shared__ static thread_local
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __grid_constant__
// __restrict__ is a g++ keyword already.

#ifndef MOAC_EMU
#define MOAC_EMU 1
#endif
#define MOAC_EMU_DEVICE_CODE 1

// ---- 2. Built-in vector types -------------------------------------------------------
// Aggregates with CUDA's sizes and alignments (16 bytes for the 4 x 32-bit types).
#define MOAC_EMU_VEC1(name, T, al)                                                     \
    struct __attribute__((aligned(al))) name { T x; };                                   \
    inline name make_##name(T x) { return name{x}; }
#define MOAC_EMU_VEC2(name, T, al)                                                     \
    struct __attribute__((aligned(al))) name { T x, y; };                                \
    inline name make_##name(T x, T y) { return name{x, y}; }
#define MOAC_EMU_VEC3(name, T)                                                         \
    struct name { T x, y, z; };                                                          \
    inline name make_##name(T x, T y, T z) { return name{x, y, z}; }
#define MOAC_EMU_VEC4(name, T, al)                                                     \
    struct __attribute__((aligned(al))) name { T x, y, z, w; };                          \
    inline name make_##name(T x, T y, T z, T w) { return name{x, y, z, w}; }

MOAC_EMU_VEC1(int1, int, 4)
MOAC_EMU_VEC1(uint1, unsigned, 4)
MOAC_EMU_VEC1(float1, float, 4)
MOAC_EMU_VEC2(char2, signed char, 2)
MOAC_EMU_VEC2(uchar2, unsigned char, 2)
MOAC_EMU_VEC2(short2, short, 4)
MOAC_EMU_VEC2(ushort2, unsigned short, 4)
MOAC_EMU_VEC2(int2, int, 8)
MOAC_EMU_VEC2(uint2, unsigned, 8)
MOAC_EMU_VEC2(float2, float, 8)
MOAC_EMU_VEC2(longlong2, long long, 16)
MOAC_EMU_VEC2(ulonglong2, unsigned long long, 16)
MOAC_EMU_VEC2(double2, double, 16)
MOAC_EMU_VEC3(int3, int)
MOAC_EMU_VEC3(uint3, unsigned)
MOAC_EMU_VEC3(float3, float)
MOAC_EMU_VEC4(char4, signed char, 4)
MOAC_EMU_VEC4(uchar4, unsigned char, 4)
MOAC_EMU_VEC4(short4, short, 8)
MOAC_EMU_VEC4(ushort4, unsigned short, 8)
MOAC_EMU_VEC4(int4, int, 16)
MOAC_EMU_VEC4(uint4, unsigned, 16)
MOAC_EMU_VEC4(float4, float, 16)

static_assert(sizeof(uint4) == 16 && alignof(uint4) == 16, "uint4 layout");
static_assert(sizeof(float2) == 8 && alignof(float2) == 8, "float2 layout");

struct dim3 {
    unsigned x, y, z;
    constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
    constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
    constexpr operator uint3() const { return uint3{x, y, z}; }
};

// ---- 3. Built-in variables ----------------------------------------------------------
// Per OS thread; the fiber scheduler rewrites threadIdx on every switch and the block
// variables when a block starts, so each fiber sees its own values.
inline thread_local uint3 threadIdx = {0, 0, 0};
inline thread_local uint3 blockIdx = {0, 0, 0};
inline thread_local dim3 blockDim = dim3(1, 1, 1);
inline thread_local dim3 gridDim = dim3(1, 1, 1);
constexpr int warpSize = 32;

// ---- 4. Scheduler internals ---------------------------------------------------------
#if MOAC_EMU_ASM_SWITCH
// moac_emu_ctx_switch(void** save_sp, void* load_sp): push the callee-saved registers
// (SysV: rbp rbx r12-r15) on the current stack, store rsp in *save_sp, load load_sp and
// pop the other context's registers. MXCSR and the x87 control word are not switched:
// every fiber of a worker shares them, and the worker sets IEEE defaults once (see
// FpEnv), which is cheaper than ldmxcsr/fldcw on every switch.
// moac_emu_fiber_tramp: first "return address" of a new fiber; calls r12(rbx).
// SAFETY: the initial frame built by detail::init_context must match this pop order
// exactly: [r15][r14][r13][r12][rbx][rbp][ret]. Both symbols are weak + hidden in
// a COMDAT group, so several translation units including this header link fine.
extern "C" __attribute__((visibility("hidden"))) void moac_emu_ctx_switch(void** save_sp,
                                                                         void* load_sp);
extern "C" __attribute__((visibility("hidden"))) void moac_emu_fiber_tramp();
asm(R"(
    .pushsection .text.moac_emu_ctx_switch,"axG",@progbits,moac_emu_ctx_switch,comdat
    .weak   moac_emu_ctx_switch
    .hidden moac_emu_ctx_switch
    .type   moac_emu_ctx_switch,@function
    .p2align 4
moac_emu_ctx_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq  %rsp, (%rdi)
    movq  %rsi, %rsp
    popq  %r15
    popq  %r14
    popq  %r13
    popq  %r12
    popq  %rbx
    popq  %rbp
    ret
    .size moac_emu_ctx_switch, .-moac_emu_ctx_switch

    .weak   moac_emu_fiber_tramp
    .hidden moac_emu_fiber_tramp
    .type   moac_emu_fiber_tramp,@function
    .p2align 4
moac_emu_fiber_tramp:
    .cfi_startproc
    .cfi_undefined rip
    xorl  %ebp, %ebp
    movq  %rbx, %rdi
    andq  $-16, %rsp
    callq *%r12
    ud2
    .cfi_endproc
    .size moac_emu_fiber_tramp, .-moac_emu_fiber_tramp
    .popsection
)");
#endif

namespace moac_emu {

// Error codes returned by launch().
enum : int { kOk = 0, kKernelError = 1, kInvalidLaunch = 2, kInternalError = 3 };

namespace detail {

// A saved execution context.
struct Context {
#if MOAC_EMU_ASM_SWITCH
    void* sp = nullptr;
#else
    ucontext_t uc;
#endif
};

enum class St : uint8_t { Ready, Barrier, Warp, Done };

enum class Op : uint8_t {
    None, SyncWarp, ShflIdx, ShflUp, ShflDown, ShflXor, Ballot, Any, All,
    MatchAny, MatchAll, RedAdd, RedMin, RedMax, RedAnd, RedOr, RedXor
};

struct PendingCopy {  // a __pipeline_memcpy_async not yet completed
    void* dst;
    const void* src;
    uint32_t size, zfill;
    uint64_t batch;
};

struct Fiber {
    Context ctx;
    char* stack_lo = nullptr;
    size_t stack_size = 0;
    uint3 tid{0, 0, 0};
    unsigned lin = 0, lane = 0, warp = 0;
    St st = St::Ready;
    // current warp collective
    Op op = Op::None;
    const char* what = "";
    unsigned mask = 0;
    int arg = 0, width = 32;
    uint64_t in = 0, out = 0;
    // __pipeline_* state
    uint64_t pipe_batch = 0;
    std::vector<PendingCopy> pending;
    void* asan_fake = nullptr;
};

struct Block {
    Fiber* f = nullptr;
    unsigned n = 0, nwarps = 0;
    unsigned live = 0;       // fibers not Done
    unsigned bar_count = 0;  // fibers waiting at __syncthreads
    unsigned bar_true = 0;   // predicate count for __syncthreads_count/and/or
    std::vector<unsigned> warp_arrived;  // per warp: lanes waiting in a collective
    uint3 idx{0, 0, 0};
    dim3 dim, grid;
    bool failed = false;
    std::string err;
    void (*invoke)(void*) = nullptr;
    void* ctx = nullptr;
};

struct Worker {
    Context sched;
    const void* sched_lo = nullptr;  // scheduler stack, learned from ASan
    size_t sched_size = 0;
    void* sched_fake = nullptr;
    Fiber* cur = nullptr;
    Block* block = nullptr;
};

inline thread_local Worker* tl_worker = nullptr;
// Dynamic shared memory of the block running on this OS thread (MOAC_EMU_DYNAMIC_SHARED).
inline thread_local unsigned char* tl_dyn_smem = nullptr;

// ---- 4a. ASan fiber annotations (no-ops without ASan) ----
inline void asan_start(void** fake_save, const void* lo, size_t size) {
#if MOAC_EMU_ASAN
    __sanitizer_start_switch_fiber(fake_save, lo, size);
#else
    (void)fake_save, (void)lo, (void)size;
#endif
}
inline void asan_finish(void* fake_save, const void** old_lo, size_t* old_size) {
#if MOAC_EMU_ASAN
    __sanitizer_finish_switch_fiber(fake_save, old_lo, old_size);
#else
    (void)fake_save, (void)old_lo, (void)old_size;
#endif
}

// ---- 4b. Raw context switch ----
inline void raw_switch(Context& from, Context& to) {
#if MOAC_EMU_ASM_SWITCH
    moac_emu_ctx_switch(&from.sp, to.sp);
#else
    swapcontext(&from.uc, &to.uc);
#endif
}

#if !MOAC_EMU_ASM_SWITCH
inline void (*uc_entry_fn)(void*) = nullptr;
inline void uc_tramp(unsigned hi, unsigned lo) {
    void* arg = reinterpret_cast<void*>((uintptr_t(hi) << 32) | uintptr_t(lo));
    uc_entry_fn(arg);
}
#endif

// Prepare `c` so that switching to it runs entry(arg) on [lo, lo+size).
inline void init_context(Context& c, char* lo, size_t size, void (*entry)(void*), void* arg) {
#if MOAC_EMU_ASM_SWITCH
    // SAFETY: the stack is ours (mmap'd, >= 16 KiB); we write 8 words below its top
    // in the order moac_emu_ctx_switch pops them.
    uintptr_t top = (reinterpret_cast<uintptr_t>(lo) + size) & ~uintptr_t(15);
    uint64_t* sp = reinterpret_cast<uint64_t*>(top);
    *--sp = 0;                                                 // keeps 16-byte alignment
    *--sp = reinterpret_cast<uint64_t>(&moac_emu_fiber_tramp);  // ret target
    *--sp = 0;                                                 // rbp
    *--sp = reinterpret_cast<uint64_t>(arg);                   // rbx -> rdi
    *--sp = reinterpret_cast<uint64_t>(entry);                 // r12 -> call target
    *--sp = 0;                                                 // r13
    *--sp = 0;                                                 // r14
    *--sp = 0;                                                 // r15
    c.sp = sp;
#else
    getcontext(&c.uc);
    c.uc.uc_stack.ss_sp = lo;
    c.uc.uc_stack.ss_size = size;
    c.uc.uc_link = nullptr;
    uc_entry_fn = entry;
    uintptr_t a = reinterpret_cast<uintptr_t>(arg);
    makecontext(&c.uc, reinterpret_cast<void (*)()>(&uc_tramp), 2, unsigned(a >> 32),
                unsigned(a & 0xffffffffu));
#endif
}

// ---- 4c. Fiber stacks: one mapping per worker, a PROT_NONE guard page below each ----
class StackPool {
  public:
    StackPool() = default;
    StackPool(const StackPool&) = delete;
    StackPool& operator=(const StackPool&) = delete;
    ~StackPool() { release(); }

    bool reserve(unsigned n, size_t stack_bytes) {
        const size_t page = size_t(sysconf(_SC_PAGESIZE));
        const size_t want = (stack_bytes + page - 1) / page * page;
        if (base_ && n <= count_ && want == size_) return true;
        release();
        const size_t slot = want + page;
        int flags = MAP_PRIVATE | MAP_ANONYMOUS;
#ifdef MAP_NORESERVE
        flags |= MAP_NORESERVE;
#endif
        void* p = mmap(nullptr, slot * n, PROT_READ | PROT_WRITE, flags, -1, 0);
        if (p == MAP_FAILED) return false;
        base_ = static_cast<char*>(p);
        count_ = n;
        size_ = want;
        page_ = page;
        // SAFETY: a stack overflow hits the guard page and faults instead of silently
        // corrupting the neighbouring fiber's stack.
        for (unsigned i = 0; i < n; ++i) mprotect(base_ + i * slot, page, PROT_NONE);
        return true;
    }
    char* lo(unsigned i) const { return base_ + i * (size_ + page_) + page_; }
    size_t size() const { return size_; }

  private:
    void release() {
        if (!base_) return;
#if MOAC_EMU_ASAN
        // Fibers abandoned mid-frame (deadlock, trap) leave poisoned redzones in the
        // shadow; clear them so a later mapping at the same address starts clean.
        for (unsigned i = 0; i < count_; ++i) __asan_unpoison_memory_region(lo(i), size_);
#endif
        munmap(base_, count_ * (size_ + page_));
        base_ = nullptr;
        count_ = 0;
    }
    char* base_ = nullptr;
    unsigned count_ = 0;
    size_t size_ = 0, page_ = 4096;
};

// ---- 4d. Messages ----
inline std::string fmt(const char* f, ...) __attribute__((format(printf, 1, 2)));
inline std::string fmt(const char* f, ...) {
    char buf[1024];
    va_list ap;
    va_start(ap, f);
    vsnprintf(buf, sizeof buf, f, ap);
    va_end(ap);
    return buf;
}

inline std::string thread_str(const Block& b, unsigned lin) {
    const Fiber& f = b.f[lin];
    return fmt("(%u,%u,%u)", f.tid.x, f.tid.y, f.tid.z);
}

// "(0,0,0)..(15,0,0), (17,0,0)" from sorted linear ids.
inline std::string thread_set(const Block& b, const std::vector<unsigned>& ids) {
    std::string s;
    size_t runs = 0;
    for (size_t i = 0; i < ids.size();) {
        size_t j = i;
        while (j + 1 < ids.size() && ids[j + 1] == ids[j] + 1) ++j;
        if (runs == 6) {
            s += ", ...";
            break;
        }
        if (runs) s += ", ";
        s += thread_str(b, ids[i]);
        if (j > i) s += ".." + thread_str(b, ids[j]);
        ++runs;
        i = j + 1;
    }
    return s;
}

inline std::string block_str(const Block& b) {
    return fmt("block (%u,%u,%u)", b.idx.x, b.idx.y, b.idx.z);
}

inline std::string describe_deadlock(const Block& b) {
    std::vector<unsigned> bar, done;
    for (unsigned i = 0; i < b.n; ++i) {
        if (b.f[i].st == St::Barrier) bar.push_back(i);
        if (b.f[i].st == St::Done) done.push_back(i);
    }
    std::string s = "deadlock in " + block_str(b) + ": no thread can proceed";
    if (!bar.empty()) {
        s += fmt("; %zu thread(s) wait at __syncthreads [", bar.size()) + thread_set(b, bar) + "]";
        if (!done.empty())
            s += " but thread(s) [" + thread_set(b, done) +
                 "] exited without reaching it (every thread of the block must arrive)";
    }
    for (unsigned w = 0; w < b.nwarps; ++w) {
        const unsigned base = w * 32, wn = std::min(32u, b.n - base);
        bool seen[32] = {};
        for (unsigned l = 0; l < wn; ++l) {
            const Fiber& f = b.f[base + l];
            if (f.st != St::Warp || seen[l]) continue;
            std::vector<unsigned> waiting, exited, atbar, other;
            for (unsigned k = l; k < wn; ++k) {
                const Fiber& g = b.f[base + k];
                if (g.st == St::Warp && g.op == f.op && g.mask == f.mask) {
                    waiting.push_back(base + k);
                    seen[k] = true;
                }
            }
            for (unsigned k = 0; k < wn; ++k) {
                if (!((f.mask >> k) & 1)) continue;
                const Fiber& g = b.f[base + k];
                if (g.st == St::Warp && g.op == f.op && g.mask == f.mask) continue;
                (g.st == St::Done ? exited : g.st == St::Barrier ? atbar : other).push_back(base + k);
            }
            s += fmt("; warp %u: thread(s) [", w) + thread_set(b, waiting) +
                 fmt("] wait in %s(mask=0x%08x)", f.what, f.mask);
            if (!exited.empty()) s += " but [" + thread_set(b, exited) + "] exited";
            if (!atbar.empty()) s += " but [" + thread_set(b, atbar) + "] wait at __syncthreads";
            if (!other.empty())
                s += " but [" + thread_set(b, other) + "] wait in another warp collective";
        }
    }
    return s;
}

// ---- 4e. Leaving a fiber ----
// Fibers run in thread order within a pass: a fiber that blocks (or ends) switches
// straight to the next Ready fiber after it, and to the scheduler only at the end of
// the pass; the scheduler then starts the next pass from thread 0. This is the same
// order as a scheduler loop visiting every fiber, with half the switches.
inline Fiber* next_ready(Block& b, unsigned from) {
    for (unsigned i = from; i < b.n; ++i)
        if (b.f[i].st == St::Ready) return &b.f[i];
    return nullptr;
}

// Switch away from fiber f, whose state is already updated. Returns when f is resumed,
// never when `final` (f has ended).
inline void leave(Worker& w, Fiber& f, bool final) {
    void** fake = final ? nullptr : &f.asan_fake;  // nullptr tells ASan f is gone
    Fiber* nx = w.block->failed ? nullptr : next_ready(*w.block, f.lin + 1);
    if (nx) {
        w.cur = nx;
        threadIdx = nx->tid;
        asan_start(fake, nx->stack_lo, nx->stack_size);
        raw_switch(f.ctx, nx->ctx);
    } else {
        w.cur = nullptr;
        asan_start(fake, w.sched_lo, w.sched_size);
        raw_switch(f.ctx, w.sched);
    }
    // Resumed: whoever switched here has set w.cur and threadIdx for us.
    asan_finish(f.asan_fake, nullptr, nullptr);
}

// SAFETY: the fiber's stack is abandoned (never resumed), so no destructors run past
// this point; callers keep no owning objects alive (messages are copied into the Block
// before the switch).
[[noreturn]] inline void exit_fiber(Worker& w, Fiber& f) {
    f.st = St::Done;
    w.block->live--;
    leave(w, f, true);
    __builtin_unreachable();
}

// Record an error for the current block and end the current fiber (never returns).
[[noreturn]] inline void fail_here(const char* msg) {
    Worker* w = tl_worker;
    if (!w || !w->cur) {
        fprintf(stderr, "moac_emu: %s (outside a kernel launch)\n", msg);
        abort();
    }
    Block& b = *w->block;
    if (!b.failed) {
        b.failed = true;
        b.err = block_str(b) + " thread " + thread_str(b, w->cur->lin) + ": " + msg;
    }
    exit_fiber(*w, *w->cur);
}

// Block the running fiber until it is Ready again.
inline void yield(Worker& w, Fiber& f) { leave(w, f, false); }

inline void fiber_main(void* arg) {
    Fiber& f = *static_cast<Fiber*>(arg);
    Worker& w = *tl_worker;
    // The first fiber a worker ever runs is entered from the scheduler: learn the
    // scheduler's stack from ASan then (later fibers may be entered from a fiber).
    const void* from_lo = nullptr;
    size_t from_size = 0;
    asan_finish(nullptr, &from_lo, &from_size);
    if (!w.sched_lo) {
        w.sched_lo = from_lo;
        w.sched_size = from_size;
    }
    Block& b = *w.block;
    char msg[512] = {0};
    try {
        b.invoke(b.ctx);
    } catch (const std::exception& e) {
        snprintf(msg, sizeof msg, "C++ exception in kernel: %s", e.what());
    } catch (...) {
        snprintf(msg, sizeof msg, "unknown C++ exception in kernel");
    }
    if (msg[0]) fail_here(msg);
    exit_fiber(w, f);
}

// ---- 4f. Barriers and warp collectives (called on a fiber) ----
inline Worker& current(const char* what) {
    Worker* w = tl_worker;
    if (!w || !w->cur) {
        fprintf(stderr, "moac_emu: %s called outside a kernel launch\n", what);
        abort();
    }
    return *w;
}

// __syncthreads and variants: every thread of the block must arrive. Returns the number
// of arriving threads whose predicate was non-zero.
inline unsigned block_barrier(int pred, const char* what) {
    Worker& w = current(what);
    Fiber& f = *w.cur;
    Block& b = *w.block;
    f.st = St::Barrier;
    f.what = what;
    b.bar_true += pred != 0;
    if (++b.bar_count == b.n) {
        for (unsigned i = 0; i < b.n; ++i) {
            b.f[i].st = St::Ready;
            b.f[i].out = b.bar_true;
        }
        b.bar_count = 0;
        b.bar_true = 0;
    }
    yield(w, f);
    return unsigned(f.out);
}

// Compute the results of a complete warp collective (all lanes in `mask` arrived).
inline void complete_collective(Fiber* wf, unsigned mask, Op op) {
    uint64_t acc = 0;
    switch (op) {
    case Op::SyncWarp: break;
    case Op::ShflIdx:
    case Op::ShflUp:
    case Op::ShflDown:
    case Op::ShflXor:
        // PTX shfl.sync semantics with c = ((32 - width) << 8) | clamp.
        for (unsigned i = 0; i < 32; ++i) {
            if (!((mask >> i) & 1)) continue;
            Fiber& d = wf[i];
            const int w = d.width, lane = int(i), b = d.arg & 31;
            const int base = lane & ~(w - 1), top = base + w - 1;
            int j = lane;
            bool ok = true;
            switch (op) {
            case Op::ShflIdx: j = base | (b & (w - 1)); break;
            case Op::ShflUp: j = lane - b; ok = j >= base; break;
            case Op::ShflDown: j = lane + b; ok = j <= top; break;
            default: j = lane ^ b; ok = j <= top; break;
            }
            // A source lane outside the mask is undefined in CUDA; we return the lane's
            // own value, like an out-of-segment source.
            if (!ok || !((mask >> j) & 1)) j = lane;
            d.out = wf[j].in;
        }
        return;
    case Op::Ballot:
    case Op::Any:
    case Op::All: {
        unsigned bal = 0;
        for (unsigned i = 0; i < 32; ++i)
            if (((mask >> i) & 1) && wf[i].in) bal |= 1u << i;
        acc = op == Op::Ballot ? bal : op == Op::Any ? (bal != 0) : (bal == mask);
        break;
    }
    case Op::MatchAny:
        for (unsigned i = 0; i < 32; ++i) {
            if (!((mask >> i) & 1)) continue;
            unsigned m = 0;
            for (unsigned j = 0; j < 32; ++j)
                if (((mask >> j) & 1) && wf[j].in == wf[i].in) m |= 1u << j;
            wf[i].out = m;
        }
        return;
    case Op::MatchAll: {
        bool same = true;
        uint64_t v = wf[std::countr_zero(mask)].in;
        for (unsigned j = 0; j < 32; ++j)
            if (((mask >> j) & 1) && wf[j].in != v) same = false;
        acc = same ? (uint64_t(mask) | (uint64_t(1) << 32)) : 0;
        break;
    }
    case Op::RedAdd:
    case Op::RedMin:
    case Op::RedMax:
    case Op::RedAnd:
    case Op::RedOr:
    case Op::RedXor: {
        const bool is_signed = wf[std::countr_zero(mask)].arg != 0;
        bool first = true;
        for (unsigned j = 0; j < 32; ++j) {
            if (!((mask >> j) & 1)) continue;
            const uint32_t v = uint32_t(wf[j].in);
            if (first) { acc = v; first = false; continue; }
            const uint32_t a = uint32_t(acc);
            uint32_t r = a;
            switch (op) {
            case Op::RedAdd: r = a + v; break;
            case Op::RedMin: r = is_signed ? uint32_t(std::min(int32_t(a), int32_t(v))) : std::min(a, v); break;
            case Op::RedMax: r = is_signed ? uint32_t(std::max(int32_t(a), int32_t(v))) : std::max(a, v); break;
            case Op::RedAnd: r = a & v; break;
            case Op::RedOr: r = a | v; break;
            default: r = a ^ v; break;
            }
            acc = r;
        }
        break;
    }
    default: break;
    }
    for (unsigned i = 0; i < 32; ++i)
        if ((mask >> i) & 1) wf[i].out = acc;
}

// A warp collective: the caller waits until every lane named in `mask` has arrived at a
// collective of the same kind with the same mask; then each lane gets its result.
inline uint64_t warp_collective(Op op, unsigned mask, uint64_t in, int arg, int width,
                                const char* what) {
    Worker& w = current(what);
    Fiber& f = *w.cur;
    Block& b = *w.block;
    char msg[256];
    if (!((mask >> f.lane) & 1)) {
        snprintf(msg, sizeof msg, "%s(mask=0x%08x) called by lane %u, which is not in the mask",
                 what, mask, f.lane);
        fail_here(msg);
    }
    const unsigned base = f.warp * 32, wn = std::min(32u, b.n - base);
    if (wn < 32 && (mask >> wn) != 0) {
        snprintf(msg, sizeof msg,
                 "%s(mask=0x%08x) names lanes that do not exist (warp %u has %u threads)", what,
                 mask, f.warp, wn);
        fail_here(msg);
    }
    if (width <= 0 || width > 32 || (width & (width - 1))) {
        snprintf(msg, sizeof msg, "%s: width %d is not a power of two in [1, 32]", what, width);
        fail_here(msg);
    }
    f.op = op;
    f.mask = mask;
    f.in = in;
    f.arg = arg;
    f.width = width;
    f.what = what;
    f.st = St::Warp;
    unsigned& arrived = b.warp_arrived[f.warp];
    arrived |= 1u << f.lane;
    if ((arrived & mask) == mask) {
        Fiber* wf = b.f + base;
        for (unsigned i = 0; i < wn; ++i) {
            if (!((mask >> i) & 1)) continue;
            if (wf[i].op != op || wf[i].mask != mask) {
                snprintf(msg, sizeof msg,
                         "mismatched warp collective: lane %u is in %s(mask=0x%08x) while lane %u "
                         "is in %s(mask=0x%08x)",
                         f.lane, what, mask, i, wf[i].what, wf[i].mask);
                fail_here(msg);
            }
        }
        complete_collective(wf, mask, op);
        for (unsigned i = 0; i < wn; ++i)
            if ((mask >> i) & 1) wf[i].st = St::Ready;
        arrived &= ~mask;
    }
    yield(w, f);
    return f.out;
}

template <class T> inline uint64_t to_bits(const T& v) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>,
                  "warp shuffles move at most 8 bytes");
    uint64_t r = 0;
    std::memcpy(&r, &v, sizeof(T));
    return r;
}
template <class T> inline T from_bits(uint64_t r) {
    T v;
    std::memcpy(&v, &r, sizeof(T));
    return v;
}

// ---- 4g. Running a grid ----
inline size_t env_size(const char* name, size_t dflt) {
    const char* s = getenv(name);
    if (!s || !*s) return dflt;
    char* end = nullptr;
    unsigned long long v = strtoull(s, &end, 10);
    if (end && (*end == 'k' || *end == 'K')) v <<= 10;
    if (end && (*end == 'm' || *end == 'M')) v <<= 20;
    return v ? size_t(v) : dflt;
}

inline void write_err(char* err, size_t errlen, const std::string& msg) {
    if (err && errlen) snprintf(err, errlen, "%s", msg.c_str());
}

struct GridState {
    std::atomic<uint64_t> next{0};
    std::atomic<bool> stop{false};
    std::mutex mu;
    int code = kOk;
    std::string msg;
    void set_error(int c, std::string m) {
        std::lock_guard<std::mutex> lk(mu);
        if (code == kOk) {
            code = c;
            msg = std::move(m);
        }
        stop.store(true);
    }
};

// Run one block to completion (or failure) on the calling OS thread.
inline bool run_block(Worker& w, Block& b) {
    blockIdx = b.idx;
    blockDim = b.dim;
    gridDim = b.grid;
    b.live = b.n;
    b.bar_count = b.bar_true = 0;
    b.failed = false;
    std::fill(b.warp_arrived.begin(), b.warp_arrived.end(), 0u);
    for (unsigned i = 0; i < b.n; ++i) {
        Fiber& f = b.f[i];
        f.st = St::Ready;
        f.op = Op::None;
        f.pipe_batch = 0;
        f.pending.clear();
        f.asan_fake = nullptr;
        // Stack colouring: stacks are a multiple of 4 KiB apart, so without an offset
        // every fiber's hot top-of-stack lines would fall in the same cache sets.
        const size_t colour = size_t((i * 4 + i / 16) % 64) * 64;
        init_context(f.ctx, f.stack_lo, f.stack_size - colour, &fiber_main, &f);
    }
    w.block = &b;
    while (b.live > 0) {
        // One pass: run the first Ready fiber; it hands over to the next ones itself.
        Fiber* f = next_ready(b, 0);
        if (!f) {  // every live fiber waits for something that cannot happen
            b.err = describe_deadlock(b);
            b.failed = true;
            return false;
        }
        w.cur = f;
        threadIdx = f->tid;
        asan_start(&w.sched_fake, f->stack_lo, f->stack_size);
        raw_switch(w.sched, f->ctx);
        asan_finish(w.sched_fake, nullptr, nullptr);
        w.cur = nullptr;
        if (b.failed) return false;
    }
    return true;
}

// IEEE floating-point defaults (round to nearest, no flush-to-zero / denormals-are-zero)
// for the worker's lifetime, whatever the host thread uses; restored afterwards.
struct FpEnv {
#if defined(__x86_64__)
    unsigned mxcsr;
    unsigned short x87;
    FpEnv() {
        asm volatile("stmxcsr %0" : "=m"(mxcsr));
        asm volatile("fnstcw %0" : "=m"(x87));
        unsigned dflt = 0x1F80;
        unsigned short dflt87 = 0x037F;
        asm volatile("ldmxcsr %0" : : "m"(dflt));
        asm volatile("fldcw %0" : : "m"(dflt87));
    }
    ~FpEnv() {
        asm volatile("ldmxcsr %0" : : "m"(mxcsr));
        asm volatile("fldcw %0" : : "m"(x87));
    }
#endif
};

inline void worker_loop(GridState& gs, dim3 grid, dim3 block, void (*invoke)(void*), void* ctx,
                        size_t stack_bytes, size_t dyn_smem) {
    FpEnv fp_env;
    try {
        Worker w;
        // 128-byte aligned like the GPU's shared window; one buffer per OS thread.
        std::unique_ptr<unsigned char[]> dyn_store(new unsigned char[dyn_smem + 128]());
        unsigned char* dyn = reinterpret_cast<unsigned char*>(
            (reinterpret_cast<uintptr_t>(dyn_store.get()) + 127) & ~uintptr_t(127));
        Worker* saved = tl_worker;
        unsigned char* saved_dyn = tl_dyn_smem;
        tl_worker = &w;
        tl_dyn_smem = dyn;
        struct Restore {
            Worker* s;
            unsigned char* d;
            ~Restore() { tl_worker = s; tl_dyn_smem = d; }
        } restore{saved, saved_dyn};
        const unsigned n = block.x * block.y * block.z;
        StackPool pool;
        if (!pool.reserve(n, stack_bytes)) {
            gs.set_error(kInternalError, fmt("cannot map %u fiber stacks of %zu bytes", n, stack_bytes));
            return;
        }
        std::vector<Fiber> fibers(n);
        for (unsigned i = 0; i < n; ++i) {
            Fiber& f = fibers[i];
            f.lin = i;
            f.tid = uint3{i % block.x, (i / block.x) % block.y, i / (block.x * block.y)};
            f.lane = i & 31;
            f.warp = i >> 5;
            f.stack_lo = pool.lo(i);
            f.stack_size = pool.size();
        }
        Block b;
        b.f = fibers.data();
        b.n = n;
        b.nwarps = (n + 31) / 32;
        b.warp_arrived.assign(b.nwarps, 0u);
        b.dim = block;
        b.grid = grid;
        b.invoke = invoke;
        b.ctx = ctx;
        const uint64_t nblocks = uint64_t(grid.x) * grid.y * grid.z;
        while (!gs.stop.load(std::memory_order_relaxed)) {
            const uint64_t id = gs.next.fetch_add(1);
            if (id >= nblocks) break;
            b.idx = uint3{unsigned(id % grid.x), unsigned((id / grid.x) % grid.y),
                          unsigned(id / (uint64_t(grid.x) * grid.y))};
            if (!run_block(w, b)) {
                gs.set_error(kKernelError, b.err);
                break;
            }
        }
    } catch (const std::exception& e) {
        gs.set_error(kInternalError, fmt("internal error: %s", e.what()));
    }
}

#if MOAC_EMU_ASAN
// When ASan/UBSan kill the process, say which CUDA thread was running.
inline void sanitizer_death_note() {
    Worker* w = tl_worker;
    if (w && w->cur && w->block)
        fprintf(stderr, "moac_emu: the sanitizer report above happened in %s thread %s\n",
                block_str(*w->block).c_str(), thread_str(*w->block, w->cur->lin).c_str());
}
#endif

inline int run_grid(dim3 grid, dim3 block, size_t dyn_smem, void (*invoke)(void*), void* ctx,
                    char* err, size_t errlen) {
#if MOAC_EMU_ASAN
    static std::once_flag death_note_once;
    std::call_once(death_note_once, [] { __sanitizer_set_death_callback(&sanitizer_death_note); });
#endif
    const uint64_t nthreads = uint64_t(block.x) * block.y * block.z;
    if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 0x7fffffffu || grid.y > 65535 ||
        grid.z > 65535) {
        write_err(err, errlen, fmt("invalid grid (%u,%u,%u)", grid.x, grid.y, grid.z));
        return kInvalidLaunch;
    }
    if (nthreads == 0 || nthreads > 1024 || block.z > 64) {
        write_err(err, errlen, fmt("invalid block (%u,%u,%u): 1..1024 threads, z <= 64",
                                   block.x, block.y, block.z));
        return kInvalidLaunch;
    }
    if (dyn_smem > (64u << 20)) {
        write_err(err, errlen, fmt("dynamic shared memory of %zu bytes is too large", dyn_smem));
        return kInvalidLaunch;
    }
    const uint64_t nblocks = uint64_t(grid.x) * grid.y * grid.z;
    unsigned hw = std::max(1u, std::thread::hardware_concurrency());
    size_t want = env_size("MOAC_EMU_THREADS", hw);
    unsigned nworkers = unsigned(std::min<uint64_t>(std::min<size_t>(want, 256), nblocks));
#if MOAC_EMU_ASAN
    const size_t dflt_stack = 256 << 10;  // ASan frames are larger
#else
    const size_t dflt_stack = 64 << 10;
#endif
    const size_t stack_bytes = std::max<size_t>(env_size("MOAC_EMU_STACK", dflt_stack), 16 << 10);
    GridState gs;
    std::vector<std::thread> pool;
    try {
        for (unsigned i = 1; i < nworkers; ++i)
            pool.emplace_back(worker_loop, std::ref(gs), grid, block, invoke, ctx, stack_bytes, dyn_smem);
    } catch (const std::system_error&) {
        // fewer OS threads than asked: the others share the work
    }
    worker_loop(gs, grid, block, invoke, ctx, stack_bytes, dyn_smem);  // the calling thread works too
    for (auto& t : pool) t.join();
    if (gs.code != kOk) write_err(err, errlen, gs.msg);
    else write_err(err, errlen, "");
    return gs.code;
}

}  // namespace detail

// ---- 5. Launch API ------------------------------------------------------------------
// Unpacks params[i] as *static_cast<A_i*>(params[i]) (cuLaunchKernel's kernelParams),
// runs the whole grid and returns 0, or non-zero with a message in err.
template <class... A>
int launch(void (*kernel)(A...), dim3 grid, dim3 block, size_t dyn_smem, void** params, char* err,
           size_t errlen) {
    using Tup = std::tuple<std::decay_t<A>...>;
    constexpr size_t N = sizeof...(A);
    try {
        if constexpr (N > 0) {
            if (!params) {
                detail::write_err(err, errlen, detail::fmt("params is null but the kernel takes %zu arguments", N));
                return kInvalidLaunch;
            }
            for (size_t i = 0; i < N; ++i)
                if (!params[i]) {
                    detail::write_err(err, errlen, detail::fmt("params[%zu] is null", i));
                    return kInvalidLaunch;
                }
        }
        Tup args = [&]<size_t... I>(std::index_sequence<I...>) {
            return Tup{*static_cast<std::tuple_element_t<I, Tup>*>(params[I])...};
        }(std::index_sequence_for<A...>{});
        struct Call {
            void (*k)(A...);
            Tup* a;
        } call{kernel, &args};
        auto invoke = [](void* p) {
            Call* c = static_cast<Call*>(p);
            std::apply(c->k, *c->a);
        };
        return detail::run_grid(grid, block, dyn_smem, invoke, &call, err, errlen);
    } catch (const std::exception& e) {
        detail::write_err(err, errlen, detail::fmt("internal error: %s", e.what()));
        return kInternalError;
    }
}

// The same without dynamic shared memory.
template <class... A>
int launch(void (*kernel)(A...), dim3 grid, dim3 block, void** params, char* err,
           size_t errlen) {
    return launch(kernel, grid, block, size_t(0), params, err, errlen);
}

// This block's dynamic shared memory (the size given at launch, zero-filled per launch).
inline void* dynamic_shared() { return detail::tl_dyn_smem; }

}  // namespace moac_emu

#define MOAC_EMU_ENTRY(kernel)                                                                  \
    extern "C" __attribute__((visibility("default"))) int moac_emu_launch_##kernel(             \
        unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,           \
        void** params, char* err, size_t errlen) {                                              \
        return ::moac_emu::launch(kernel, dim3(gx, gy, gz), dim3(bx, by, bz), params, err,      \
                                  errlen);                                                      \
    }
#define MOAC_EMU_ENTRY_DYN(kernel)                                                              \
    extern "C" __attribute__((visibility("default"))) int moac_emu_launch_dyn_##kernel(         \
        unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,           \
        unsigned dyn_smem_bytes, void** params, char* err, size_t errlen) {                     \
        return ::moac_emu::launch(kernel, dim3(gx, gy, gz), dim3(bx, by, bz),                   \
                                  size_t(dyn_smem_bytes), params, err, errlen);                 \
    }

// ---- 5b. Dynamic shared memory ----
// CUDA:  extern __shared__ __align__(16) T name[];
// emu:   MOAC_EMU_DYNAMIC_SHARED(T, name);   (function scope; `name` is a T*)
#define MOAC_EMU_DYNAMIC_SHARED(T, name) T* const name = static_cast<T*>(::moac_emu::dynamic_shared())

// ---- 6. Traps, assert, alignment checks ---------------------------------------------
// Ends the calling CUDA thread and fails the launch with `msg`.
[[noreturn]] inline void moac_emu_fail(const char* msg) { moac_emu::detail::fail_here(msg); }
[[noreturn]] inline void __trap() { moac_emu_fail("__trap() called"); }
inline void __brkpt() { moac_emu_fail("__brkpt() called"); }

[[noreturn]] inline void moac_emu_assert_fail(const char* expr, const char* file, int line) {
    char msg[512];
    snprintf(msg, sizeof msg, "assertion `%s` failed at %s:%d", expr, file, line);
    moac_emu_fail(msg);
}
// Device-side assert fails the launch instead of aborting the process. (A later
// `#include <assert.h>` in the kernel source restores the libc macro.)
#undef assert
#ifdef NDEBUG
#define assert(e) ((void)0)
#else
#define assert(e) ((e) ? (void)0 : ::moac_emu_assert_fail(#e, __FILE__, __LINE__))
#endif

// Fails the launch if p is not `align`-byte aligned (CUDA faults on misaligned access).
inline void moac_emu_check_align(const void* p, size_t align, const char* what = "access") {
    if (reinterpret_cast<uintptr_t>(p) & (align - 1)) {
        char msg[160];
        snprintf(msg, sizeof msg, "misaligned %zu-byte %s at %p", align, what, p);
        moac_emu_fail(msg);
    }
}

// ---- 7. Synchronization ---------------------------------------------------------------
inline void __syncthreads() { moac_emu::detail::block_barrier(0, "__syncthreads"); }
inline int __syncthreads_count(int p) { return int(moac_emu::detail::block_barrier(p, "__syncthreads_count")); }
inline int __syncthreads_and(int p) { return moac_emu::detail::block_barrier(p, "__syncthreads_and") == blockDim.x * blockDim.y * blockDim.z; }
inline int __syncthreads_or(int p) { return moac_emu::detail::block_barrier(p, "__syncthreads_or") != 0; }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
    moac_emu::detail::warp_collective(moac_emu::detail::Op::SyncWarp, mask, 0, 0, 32, "__syncwarp");
}

// Other blocks run on other OS threads; device-wide fences are real fences.
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_system() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_signal_fence(std::memory_order_seq_cst); }

// Lanes of the caller's warp that exist and have not exited (convergence is not modelled).
inline unsigned __activemask() {
    auto& w = moac_emu::detail::current("__activemask");
    const auto& b = *w.block;
    const unsigned base = w.cur->warp * 32, wn = std::min(32u, b.n - base);
    unsigned m = 0;
    for (unsigned i = 0; i < wn; ++i)
        if (b.f[base + i].st != moac_emu::detail::St::Done) m |= 1u << i;
    return m;
}

// ---- 8. Warp shuffles and votes ------------------------------------------------------
// Any trivially copyable type of at most 8 bytes (int, unsigned, float, long long,
// unsigned long long, double, __half, __half2, ...). Default width 32.
template <class T> inline T __shfl_sync(unsigned mask, T var, int src_lane, int width = warpSize) {
    using namespace moac_emu::detail;
    return from_bits<T>(warp_collective(Op::ShflIdx, mask, to_bits(var), src_lane, width, "__shfl_sync"));
}
template <class T> inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
    using namespace moac_emu::detail;
    return from_bits<T>(warp_collective(Op::ShflUp, mask, to_bits(var), int(delta), width, "__shfl_up_sync"));
}
template <class T> inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
    using namespace moac_emu::detail;
    return from_bits<T>(warp_collective(Op::ShflDown, mask, to_bits(var), int(delta), width, "__shfl_down_sync"));
}
template <class T> inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize) {
    using namespace moac_emu::detail;
    return from_bits<T>(warp_collective(Op::ShflXor, mask, to_bits(var), lane_mask, width, "__shfl_xor_sync"));
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
    using namespace moac_emu::detail;
    return unsigned(warp_collective(Op::Ballot, mask, pred != 0, 0, 32, "__ballot_sync"));
}
inline int __any_sync(unsigned mask, int pred) {
    using namespace moac_emu::detail;
    return int(warp_collective(Op::Any, mask, pred != 0, 0, 32, "__any_sync"));
}
inline int __all_sync(unsigned mask, int pred) {
    using namespace moac_emu::detail;
    return int(warp_collective(Op::All, mask, pred != 0, 0, 32, "__all_sync"));
}
template <class T> inline unsigned __match_any_sync(unsigned mask, T value) {
    using namespace moac_emu::detail;
    return unsigned(warp_collective(Op::MatchAny, mask, to_bits(value), 0, 32, "__match_any_sync"));
}
template <class T> inline unsigned __match_all_sync(unsigned mask, T value, int* pred) {
    using namespace moac_emu::detail;
    const uint64_t r = warp_collective(Op::MatchAll, mask, to_bits(value), 0, 32, "__match_all_sync");
    *pred = int(r >> 32);
    return unsigned(r);
}
#define MOAC_EMU_REDUCE(name, op)                                                              \
    inline unsigned name(unsigned mask, unsigned v) {                                          \
        using namespace moac_emu::detail;                                                      \
        return unsigned(warp_collective(Op::op, mask, v, 0, 32, #name));                       \
    }                                                                                          \
    inline int name(unsigned mask, int v) {                                                    \
        using namespace moac_emu::detail;                                                      \
        return int(uint32_t(warp_collective(Op::op, mask, uint32_t(v), 1, 32, #name)));        \
    }
MOAC_EMU_REDUCE(__reduce_add_sync, RedAdd)
MOAC_EMU_REDUCE(__reduce_min_sync, RedMin)
MOAC_EMU_REDUCE(__reduce_max_sync, RedMax)
#undef MOAC_EMU_REDUCE
inline unsigned __reduce_and_sync(unsigned mask, unsigned v) {
    using namespace moac_emu::detail;
    return unsigned(warp_collective(Op::RedAnd, mask, v, 0, 32, "__reduce_and_sync"));
}
inline unsigned __reduce_or_sync(unsigned mask, unsigned v) {
    using namespace moac_emu::detail;
    return unsigned(warp_collective(Op::RedOr, mask, v, 0, 32, "__reduce_or_sync"));
}
inline unsigned __reduce_xor_sync(unsigned mask, unsigned v) {
    using namespace moac_emu::detail;
    return unsigned(warp_collective(Op::RedXor, mask, v, 0, 32, "__reduce_xor_sync"));
}

// ---- 9. Atomics -----------------------------------------------------------------------
// Blocks run on several OS threads, so these are real atomic read-modify-writes.
namespace moac_emu::detail {
template <class T, class F> inline T atomic_update(T* p, F f) {
    // CAS loop on the bit pattern (floats, min/max of any type).
    using U = std::conditional_t<sizeof(T) == 2, uint16_t, std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>>;
    static_assert(sizeof(T) == sizeof(U), "atomic size");
    U* up = reinterpret_cast<U*>(p);
    U old = __atomic_load_n(up, __ATOMIC_RELAXED);
    for (;;) {
        T o;
        std::memcpy(&o, &old, sizeof(T));
        T n = f(o);
        U nb;
        std::memcpy(&nb, &n, sizeof(T));
        if (__atomic_compare_exchange_n(up, &old, nb, false, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED)) return o;
    }
}
}  // namespace moac_emu::detail

#define MOAC_EMU_ATOMIC_INT(T)                                                                      \
    inline T atomicAdd(T* p, T v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }           \
    inline T atomicSub(T* p, T v) { return __atomic_fetch_sub(p, v, __ATOMIC_SEQ_CST); }           \
    inline T atomicAnd(T* p, T v) { return __atomic_fetch_and(p, v, __ATOMIC_SEQ_CST); }           \
    inline T atomicOr(T* p, T v) { return __atomic_fetch_or(p, v, __ATOMIC_SEQ_CST); }             \
    inline T atomicXor(T* p, T v) { return __atomic_fetch_xor(p, v, __ATOMIC_SEQ_CST); }           \
    inline T atomicExch(T* p, T v) { return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST); }         \
    inline T atomicMax(T* p, T v) {                                                                \
        return moac_emu::detail::atomic_update(p, [v](T o) { return o < v ? v : o; });             \
    }                                                                                              \
    inline T atomicMin(T* p, T v) {                                                                \
        return moac_emu::detail::atomic_update(p, [v](T o) { return v < o ? v : o; });             \
    }                                                                                              \
    inline T atomicCAS(T* p, T cmp, T v) {                                                         \
        __atomic_compare_exchange_n(p, &cmp, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);        \
        return cmp;                                                                                \
    }
MOAC_EMU_ATOMIC_INT(int)
MOAC_EMU_ATOMIC_INT(unsigned)
MOAC_EMU_ATOMIC_INT(long long)
MOAC_EMU_ATOMIC_INT(unsigned long long)
#undef MOAC_EMU_ATOMIC_INT
inline float atomicAdd(float* p, float v) {
    return moac_emu::detail::atomic_update(p, [v](float o) { return o + v; });
}
inline double atomicAdd(double* p, double v) {
    return moac_emu::detail::atomic_update(p, [v](double o) { return o + v; });
}
inline float atomicExch(float* p, float v) {
    return moac_emu::detail::atomic_update(p, [v](float) { return v; });
}
inline float atomicMax(float* p, float v) {  // sm_90 float max (NaN-free inputs)
    return moac_emu::detail::atomic_update(p, [v](float o) { return fmaxf(o, v); });
}
inline float atomicMin(float* p, float v) {
    return moac_emu::detail::atomic_update(p, [v](float o) { return fminf(o, v); });
}
inline unsigned atomicInc(unsigned* p, unsigned lim) {
    return moac_emu::detail::atomic_update(p, [lim](unsigned o) { return o >= lim ? 0u : o + 1; });
}
inline unsigned atomicDec(unsigned* p, unsigned lim) {
    return moac_emu::detail::atomic_update(p, [lim](unsigned o) { return (o == 0 || o > lim) ? lim : o - 1; });
}
inline unsigned short atomicCAS(unsigned short* p, unsigned short cmp, unsigned short v) {
    __atomic_compare_exchange_n(p, &cmp, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    return cmp;
}
#define atomicAdd_block atomicAdd
#define atomicAdd_system atomicAdd
#define atomicMax_block atomicMax
#define atomicMin_block atomicMin
#define atomicCAS_block atomicCAS
#define atomicExch_block atomicExch

// ---- 10. Bit casts and integer intrinsics ----------------------------------------------
inline float __int_as_float(int x) { return std::bit_cast<float>(x); }
inline int __float_as_int(float x) { return std::bit_cast<int>(x); }
inline float __uint_as_float(unsigned x) { return std::bit_cast<float>(x); }
inline unsigned __float_as_uint(float x) { return std::bit_cast<unsigned>(x); }
inline double __longlong_as_double(long long x) { return std::bit_cast<double>(x); }
inline long long __double_as_longlong(double x) { return std::bit_cast<long long>(x); }
inline int __double2hiint(double x) { return int(std::bit_cast<uint64_t>(x) >> 32); }
inline int __double2loint(double x) { return int(uint32_t(std::bit_cast<uint64_t>(x))); }
inline double __hiloint2double(int hi, int lo) {
    return std::bit_cast<double>((uint64_t(uint32_t(hi)) << 32) | uint32_t(lo));
}

inline int __popc(unsigned x) { return std::popcount(x); }
inline int __popcll(unsigned long long x) { return std::popcount(x); }
inline int __clz(int x) { return std::countl_zero(unsigned(x)); }
inline int __clzll(long long x) { return std::countl_zero((unsigned long long)x); }
inline int __ffs(int x) { return x ? std::countr_zero(unsigned(x)) + 1 : 0; }
inline int __ffsll(long long x) { return x ? std::countr_zero((unsigned long long)x) + 1 : 0; }
inline unsigned __brev(unsigned x) {
    unsigned r = 0;
    for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
    return r;
}
inline unsigned long long __brevll(unsigned long long x) {
    return (uint64_t(__brev(unsigned(x))) << 32) | __brev(unsigned(x >> 32));
}
inline int __mulhi(int a, int b) { return int((int64_t(a) * b) >> 32); }
inline unsigned __umulhi(unsigned a, unsigned b) { return unsigned((uint64_t(a) * b) >> 32); }
__extension__ typedef __int128 moac_emu_i128;
__extension__ typedef unsigned __int128 moac_emu_u128;
inline long long __mul64hi(long long a, long long b) { return (long long)((moac_emu_i128(a) * b) >> 64); }
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
    return (unsigned long long)((moac_emu_u128(a) * b) >> 64);
}
inline int __mul24(int a, int b) { return int(uint32_t((a << 8) >> 8) * uint32_t((b << 8) >> 8)); }
inline unsigned __umul24(unsigned a, unsigned b) { return (a & 0xffffff) * (b & 0xffffff); }
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
    const uint64_t v = (uint64_t(y) << 32) | x;
    unsigned r = 0;
    for (int i = 0; i < 4; ++i) r |= unsigned((v >> (((s >> (4 * i)) & 7) * 8)) & 0xff) << (8 * i);
    return r;
}
inline unsigned __funnelshift_l(unsigned lo, unsigned hi, unsigned s) {
    return unsigned(((uint64_t(hi) << 32 | lo) << (s & 31)) >> 32);
}
inline unsigned __funnelshift_r(unsigned lo, unsigned hi, unsigned s) {
    return unsigned((uint64_t(hi) << 32 | lo) >> (s & 31));
}

// ---- 11. Math ---------------------------------------------------------------------------
// expf/logf/sqrtf/fmaxf/... come from <cmath> (glibc, correctly rounded or within 1 ulp).
// The fast intrinsics map to the accurate functions: results are closer to exact than
// the GPU's, so compare with tolerances.
inline float __expf(float x) { return expf(x); }
inline float __exp10f(float x) { return exp10f(x); }
inline float __logf(float x) { return logf(x); }
inline float __log2f(float x) { return log2f(x); }
inline float __log10f(float x) { return log10f(x); }
inline float __powf(float a, float b) { return powf(a, b); }
inline float __sinf(float x) { return sinf(x); }
inline float __cosf(float x) { return cosf(x); }
inline float __tanf(float x) { return tanf(x); }
inline void __sincosf(float x, float* s, float* c) { *s = sinf(x); *c = cosf(x); }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __frsqrt_rn(float x) { return 1.0f / sqrtf(x); }
inline float __fsqrt_rn(float x) { return sqrtf(x); }
inline float __saturatef(float x) { return x >= 1.0f ? 1.0f : x > 0.0f ? x : 0.0f; }  // NaN -> 0
// The _rn arithmetic intrinsics are never contracted into FMAs. g++ contracts only with
// hardware FMA enabled (-mfma / -march=native), which the emu build does not use.
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __ddiv_rn(double a, double b) { return a / b; }
inline double __fma_rn(double a, double b, double c) { return fma(a, b, c); }
inline double __drcp_rn(double x) { return 1.0 / x; }
inline double __dsqrt_rn(double x) { return sqrt(x); }

// Float -> int conversions saturate and map NaN to 0, like cvt.*.f32 on the GPU.
namespace moac_emu::detail {
template <class I, class F> inline I sat_cvt(F r) {
    if (r != r) return 0;
    if (r <= F(std::numeric_limits<I>::min())) return std::numeric_limits<I>::min();
    if (r >= F(std::numeric_limits<I>::max())) return std::numeric_limits<I>::max();
    return I(r);
}
}  // namespace moac_emu::detail
inline int __float2int_rn(float x) { return moac_emu::detail::sat_cvt<int>(nearbyintf(x)); }
inline int __float2int_rz(float x) { return moac_emu::detail::sat_cvt<int>(truncf(x)); }
inline int __float2int_rd(float x) { return moac_emu::detail::sat_cvt<int>(floorf(x)); }
inline int __float2int_ru(float x) { return moac_emu::detail::sat_cvt<int>(ceilf(x)); }
inline unsigned __float2uint_rn(float x) { return moac_emu::detail::sat_cvt<unsigned>(nearbyintf(x)); }
inline unsigned __float2uint_rz(float x) { return moac_emu::detail::sat_cvt<unsigned>(truncf(x)); }
inline long long __float2ll_rn(float x) { return moac_emu::detail::sat_cvt<long long>(nearbyintf(x)); }
inline long long __float2ll_rz(float x) { return moac_emu::detail::sat_cvt<long long>(truncf(x)); }
inline int __double2int_rn(double x) { return moac_emu::detail::sat_cvt<int>(nearbyint(x)); }
inline int __double2int_rz(double x) { return moac_emu::detail::sat_cvt<int>(trunc(x)); }
inline long long __double2ll_rn(double x) { return moac_emu::detail::sat_cvt<long long>(nearbyint(x)); }
inline long long __double2ll_rz(double x) { return moac_emu::detail::sat_cvt<long long>(trunc(x)); }
inline float __int2float_rn(int x) { return float(x); }
inline float __uint2float_rn(unsigned x) { return float(x); }
inline float __ll2float_rn(long long x) { return float(x); }
inline double __int2double_rn(int x) { return double(x); }
inline double __ll2double_rn(long long x) { return double(x); }
inline float __double2float_rn(double x) { return float(x); }

// min/max overloads as CUDA's device headers declare them.
#define MOAC_EMU_MINMAX(R, A, B)                                                        \
    inline R min(A a, B b) { return static_cast<R>(a) < static_cast<R>(b) ? a : b; }      \
    inline R max(A a, B b) { return static_cast<R>(a) > static_cast<R>(b) ? a : b; }
MOAC_EMU_MINMAX(int, int, int)
MOAC_EMU_MINMAX(unsigned, unsigned, unsigned)
MOAC_EMU_MINMAX(unsigned, int, unsigned)
MOAC_EMU_MINMAX(unsigned, unsigned, int)
MOAC_EMU_MINMAX(long, long, long)
MOAC_EMU_MINMAX(unsigned long, unsigned long, unsigned long)
MOAC_EMU_MINMAX(long long, long long, long long)
MOAC_EMU_MINMAX(unsigned long long, unsigned long long, unsigned long long)
MOAC_EMU_MINMAX(unsigned long long, long long, unsigned long long)
MOAC_EMU_MINMAX(unsigned long long, unsigned long long, long long)
#undef MOAC_EMU_MINMAX
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline double max(double a, double b) { return fmax(a, b); }
inline double min(float a, double b) { return fmin(a, b); }
inline double max(float a, double b) { return fmax(a, b); }
inline double min(double a, float b) { return fmin(a, b); }
inline double max(double a, float b) { return fmax(a, b); }

inline long long clock64() {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(
               std::chrono::steady_clock::now().time_since_epoch())
        .count();
}
inline void __nanosleep(unsigned) {}

// ---- 12. Half and bfloat16 --------------------------------------------------------------
// 16-bit storage types. Conversions round to nearest even (or the named mode) and handle
// subnormals, overflow to infinity and NaN (a float NaN becomes the canonical 0x7fff, as
// in cuda_fp16.hpp / cuda_bf16.hpp). Arithmetic goes through float and rounds once,
// which is exact for + - * / (float has more than 2*11+2 and 2*8+2 bits).
namespace moac_emu::detail {
enum class Rnd { N, Z, D, U };

// Round a double to the 16-bit format with M mantissa bits and E exponent bits.
template <int M, int E> inline uint16_t f64_to_small(double d, Rnd mode) {
    constexpr int bias = (1 << (E - 1)) - 1, emin = 1 - bias;
    constexpr uint16_t inf_bits = uint16_t(((1u << E) - 1) << M);
    constexpr uint16_t max_bits = uint16_t(inf_bits - 1);
    const uint64_t x = std::bit_cast<uint64_t>(d);
    const bool neg = x >> 63;
    const uint16_t sign = neg ? 0x8000 : 0;
    const uint64_t ax = x & 0x7fffffffffffffffull;
    if (ax > 0x7ff0000000000000ull) return 0x7fff;  // NaN
    const bool away = mode == Rnd::N || (mode == Rnd::U && !neg) || (mode == Rnd::D && neg);
    const uint16_t overflow = sign | (away ? inf_bits : max_bits);
    if (ax == 0x7ff0000000000000ull) return sign | inf_bits;
    const int eb = int(ax >> 52);
    const int ue = eb - 1023;
    if (ue > bias) return overflow;
    uint64_t mant = ax & ((1ull << 52) - 1);
    if (eb == 0) {
        // double subnormal: far below the smallest 16-bit subnormal
        if (mant == 0) return sign;
        return sign | uint16_t((mode == Rnd::U && !neg) || (mode == Rnd::D && neg) ? 1 : 0);
    }
    mant |= 1ull << 52;
    // Units of the result's last place: 2^(ue-M) for normals, 2^(emin-M) for subnormals.
    const int shift = 52 - M + std::max(0, emin - ue);
    uint64_t q, rem, halfway;
    if (shift >= 64) {
        q = 0, rem = mant, halfway = ~0ull;  // less than half an ulp (shift 64+ never ties)
    } else {
        q = mant >> shift;
        rem = mant & ((1ull << shift) - 1);
        halfway = 1ull << (shift - 1);
    }
    bool up = false;
    if (rem) {
        switch (mode) {
        case Rnd::N: up = rem > halfway || (rem == halfway && (q & 1)); break;
        case Rnd::Z: up = false; break;
        case Rnd::U: up = !neg; break;
        case Rnd::D: up = neg; break;
        }
    }
    q += up;
    uint32_t bits = ue >= emin ? (uint32_t(ue + bias - 1) << M) + uint32_t(q) : uint32_t(q);
    if (bits >= inf_bits) return overflow;
    return sign | uint16_t(bits);
}

inline float f16_to_f32(uint16_t h) {
    const uint32_t sign = uint32_t(h & 0x8000) << 16;
    const uint32_t e = (h >> 10) & 0x1f, m = h & 0x3ff;
    if (e == 0x1f) return std::bit_cast<float>(sign | 0x7f800000u | (m << 13));
    if (e == 0) {
        const float v = float(m) * 0x1p-24f;  // exact
        return sign ? -v : v;
    }
    return std::bit_cast<float>(sign | ((e + 112) << 23) | (m << 13));
}
inline float bf16_to_f32(uint16_t h) { return std::bit_cast<float>(uint32_t(h) << 16); }
inline uint16_t f32_to_f16(float f, Rnd m = Rnd::N) { return f64_to_small<10, 5>(double(f), m); }
inline uint16_t f32_to_bf16(float f, Rnd m = Rnd::N) {
    if (m == Rnd::N) {  // the classic bit trick; identical to f64_to_small<7, 8>
        const uint32_t u = std::bit_cast<uint32_t>(f);
        if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fff;
        return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    }
    return f64_to_small<7, 8>(double(f), m);
}
}  // namespace moac_emu::detail

struct __half_raw { unsigned short x; };
struct __nv_bfloat16_raw { unsigned short x; };

struct __half {
    unsigned short __x;
    __half() = default;
    constexpr __half(__half_raw r) : __x(r.x) {}
    __half(float f) : __x(moac_emu::detail::f32_to_f16(f)) {}
    __half(double d) : __x(moac_emu::detail::f64_to_small<10, 5>(d, moac_emu::detail::Rnd::N)) {}
    __half(int i) : __half(double(i)) {}
    __half(unsigned i) : __half(double(i)) {}
    __half(long long i) : __half(double(i)) {}
    operator float() const { return moac_emu::detail::f16_to_f32(__x); }
    operator __half_raw() const { return __half_raw{__x}; }
    __half& operator=(float f) { __x = moac_emu::detail::f32_to_f16(f); return *this; }
};

struct __nv_bfloat16 {
    unsigned short __x;
    __nv_bfloat16() = default;
    constexpr __nv_bfloat16(__nv_bfloat16_raw r) : __x(r.x) {}
    __nv_bfloat16(float f) : __x(moac_emu::detail::f32_to_bf16(f)) {}
    __nv_bfloat16(double d) : __x(moac_emu::detail::f64_to_small<7, 8>(d, moac_emu::detail::Rnd::N)) {}
    __nv_bfloat16(int i) : __nv_bfloat16(double(i)) {}
    __nv_bfloat16(unsigned i) : __nv_bfloat16(double(i)) {}
    __nv_bfloat16(long long i) : __nv_bfloat16(double(i)) {}
    operator float() const { return moac_emu::detail::bf16_to_f32(__x); }
    operator __nv_bfloat16_raw() const { return __nv_bfloat16_raw{__x}; }
    __nv_bfloat16& operator=(float f) { __x = moac_emu::detail::f32_to_bf16(f); return *this; }
};

struct __attribute__((aligned(4))) __half2 {
    __half x, y;
    __half2() = default;
    constexpr __half2(__half a, __half b) : x(a), y(b) {}
};
struct __attribute__((aligned(4))) __nv_bfloat162 {
    __nv_bfloat16 x, y;
    __nv_bfloat162() = default;
    constexpr __nv_bfloat162(__nv_bfloat16 a, __nv_bfloat16 b) : x(a), y(b) {}
};
static_assert(sizeof(__half) == 2 && sizeof(__half2) == 4 && sizeof(__nv_bfloat162) == 4, "16-bit layouts");
static_assert(std::is_trivially_default_constructible_v<__half>, "__shared__ __half needs trivial init");
typedef __half half;
typedef __half2 half2;
typedef __nv_bfloat16 nv_bfloat16;
typedef __nv_bfloat162 nv_bfloat162;

#define MOAC_EMU_16BIT_API(H, H2, NAME, TOFLOAT, TOF, FROMF, M, E)                                     \
    inline float TOFLOAT(H h) { return moac_emu::detail::TOF(h.__x); }                                \
    inline H __float2##NAME(float f) { return __ushort_as_##NAME(moac_emu::detail::FROMF(f)); }        \
    inline H __float2##NAME##_rn(float f) { return __ushort_as_##NAME(moac_emu::detail::FROMF(f)); }   \
    inline H __float2##NAME##_rz(float f) { return __ushort_as_##NAME(moac_emu::detail::FROMF(f, moac_emu::detail::Rnd::Z)); } \
    inline H __float2##NAME##_rd(float f) { return __ushort_as_##NAME(moac_emu::detail::FROMF(f, moac_emu::detail::Rnd::D)); } \
    inline H __float2##NAME##_ru(float f) { return __ushort_as_##NAME(moac_emu::detail::FROMF(f, moac_emu::detail::Rnd::U)); } \
    inline H __double2##NAME(double d) {                                                              \
        return __ushort_as_##NAME(moac_emu::detail::f64_to_small<M, E>(d, moac_emu::detail::Rnd::N)); \
    }                                                                                                 \
    inline float __low2float(H2 v) { return TOFLOAT(v.x); }                                      \
    inline float __high2float(H2 v) { return TOFLOAT(v.y); }                                     \
    inline H2 __floats2##NAME##2_rn(float a, float b) { return H2(__float2##NAME(a), __float2##NAME(b)); } \
    inline H2 __float2##NAME##2_rn(float a) { return H2(__float2##NAME(a), __float2##NAME(a)); }      \
    inline float2 __##NAME##22float2(H2 v) { return make_float2(TOFLOAT(v.x), TOFLOAT(v.y)); } \
    inline H2 __float22##NAME##2_rn(float2 v) { return H2(__float2##NAME(v.x), __float2##NAME(v.y)); } \
    inline H __low2##NAME(H2 v) { return v.x; }                                                       \
    inline H __high2##NAME(H2 v) { return v.y; }                                                      \
    inline H2 __halves2##NAME##2(H a, H b) { return H2(a, b); }                                       \
    inline H2 __##NAME##2##NAME##2(H a) { return H2(a, a); }                                          \
    inline H2 __lows2##NAME##2(H2 a, H2 b) { return H2(a.x, b.x); }                                   \
    inline H2 __highs2##NAME##2(H2 a, H2 b) { return H2(a.y, b.y); }                                  \
    inline H2 __low2##NAME##2(H2 a) { return H2(a.x, a.x); }                                          \
    inline H2 __high2##NAME##2(H2 a) { return H2(a.y, a.y); }                                         \
    inline H __hadd(H a, H b) { return H(float(a) + float(b)); }                                     \
    inline H __hsub(H a, H b) { return H(float(a) - float(b)); }                                     \
    inline H __hmul(H a, H b) { return H(float(a) * float(b)); }                                     \
    inline H __hdiv(H a, H b) { return H(float(a) / float(b)); }                                     \
    inline H __hfma(H a, H b, H c) { return H(fmaf(float(a), float(b), float(c))); }                 \
    inline H __hneg(H a) { H r; r.__x = a.__x ^ 0x8000; return r; }                                  \
    inline H __habs(H a) { H r; r.__x = a.__x & 0x7fff; return r; }                                  \
    inline H __hmax(H a, H b) { return H(fmaxf(float(a), float(b))); }                              \
    inline H __hmin(H a, H b) { return H(fminf(float(a), float(b))); }                              \
    inline bool __heq(H a, H b) { return float(a) == float(b); }                                     \
    inline bool __hne(H a, H b) { return float(a) != float(b); }                                     \
    inline bool __hlt(H a, H b) { return float(a) < float(b); }                                      \
    inline bool __hle(H a, H b) { return float(a) <= float(b); }                                     \
    inline bool __hgt(H a, H b) { return float(a) > float(b); }                                      \
    inline bool __hge(H a, H b) { return float(a) >= float(b); }                                     \
    inline bool __hisnan(H a) { return std::isnan(float(a)); }                                       \
    inline int __hisinf(H a) { float f = float(a); return std::isinf(f) ? (f < 0 ? -1 : 1) : 0; }   \
    inline H2 __hadd2(H2 a, H2 b) { return H2(__hadd(a.x, b.x), __hadd(a.y, b.y)); }                \
    inline H2 __hsub2(H2 a, H2 b) { return H2(__hsub(a.x, b.x), __hsub(a.y, b.y)); }                \
    inline H2 __hmul2(H2 a, H2 b) { return H2(__hmul(a.x, b.x), __hmul(a.y, b.y)); }                \
    inline H2 __hfma2(H2 a, H2 b, H2 c) { return H2(__hfma(a.x, b.x, c.x), __hfma(a.y, b.y, c.y)); } \
    inline H2 __hmax2(H2 a, H2 b) { return H2(__hmax(a.x, b.x), __hmax(a.y, b.y)); }                \
    inline H operator+(H a, H b) { return __hadd(a, b); }                                            \
    inline H operator-(H a, H b) { return __hsub(a, b); }                                            \
    inline H operator*(H a, H b) { return __hmul(a, b); }                                            \
    inline H operator/(H a, H b) { return __hdiv(a, b); }                                            \
    inline H operator-(H a) { return __hneg(a); }                                                    \
    inline H& operator+=(H& a, H b) { return a = __hadd(a, b); }                                     \
    inline H& operator-=(H& a, H b) { return a = __hsub(a, b); }                                     \
    inline H& operator*=(H& a, H b) { return a = __hmul(a, b); }                                     \
    inline H& operator/=(H& a, H b) { return a = __hdiv(a, b); }                                     \
    inline bool operator==(H a, H b) { return __heq(a, b); }                                         \
    inline bool operator!=(H a, H b) { return __hne(a, b); }                                         \
    inline bool operator<(H a, H b) { return __hlt(a, b); }                                          \
    inline bool operator<=(H a, H b) { return __hle(a, b); }                                         \
    inline bool operator>(H a, H b) { return __hgt(a, b); }                                          \
    inline bool operator>=(H a, H b) { return __hge(a, b); }                                         \
    inline H2 operator+(H2 a, H2 b) { return __hadd2(a, b); }                                        \
    inline H2 operator*(H2 a, H2 b) { return __hmul2(a, b); }

inline __half __ushort_as_half(unsigned short u) { __half h; h.__x = u; return h; }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline __half __short_as_half(short s) { __half h; h.__x = (unsigned short)s; return h; }
inline short __half_as_short(__half h) { return (short)h.__x; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) { __nv_bfloat16 h; h.__x = u; return h; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.__x; }
inline __nv_bfloat16 __short_as_bfloat16(short s) { __nv_bfloat16 h; h.__x = (unsigned short)s; return h; }
inline short __bfloat16_as_short(__nv_bfloat16 h) { return (short)h.__x; }

// __half2float / __float2half_rn / __half22float2 / __floats2half2_rn / __hadd ...
MOAC_EMU_16BIT_API(__half, __half2, half, __half2float, f16_to_f32, f32_to_f16, 10, 5)
// __bfloat162float / __float2bfloat16_rn / __bfloat1622float2 / __floats2bfloat162_rn ...
MOAC_EMU_16BIT_API(__nv_bfloat16, __nv_bfloat162, bfloat16, __bfloat162float, bf16_to_f32, f32_to_bf16, 7, 8)
#undef MOAC_EMU_16BIT_API

// ---- 13. Loads, stores and the async-copy pipeline -------------------------------------
// __ldg and the cache-hint loads/stores are plain accesses, checked for natural alignment
// (a misaligned uint4/float4 access faults on the GPU).
template <class T> inline T __ldg(const T* p) {
    if constexpr (alignof(T) > 1) moac_emu_check_align(p, alignof(T), "__ldg load");
    return *p;
}
template <class T> inline T __ldcg(const T* p) { moac_emu_check_align(p, alignof(T), "__ldcg load"); return *p; }
template <class T> inline T __ldca(const T* p) { moac_emu_check_align(p, alignof(T), "__ldca load"); return *p; }
template <class T> inline T __ldcs(const T* p) { moac_emu_check_align(p, alignof(T), "__ldcs load"); return *p; }
template <class T> inline T __ldlu(const T* p) { moac_emu_check_align(p, alignof(T), "__ldlu load"); return *p; }
template <class T> inline T __ldcv(const T* p) { moac_emu_check_align(p, alignof(T), "__ldcv load"); return *p; }
template <class T> inline void __stcg(T* p, T v) { moac_emu_check_align(p, alignof(T), "__stcg store"); *p = v; }
template <class T> inline void __stcs(T* p, T v) { moac_emu_check_align(p, alignof(T), "__stcs store"); *p = v; }
template <class T> inline void __stwb(T* p, T v) { moac_emu_check_align(p, alignof(T), "__stwb store"); *p = v; }
template <class T> inline void __stwt(T* p, T v) { moac_emu_check_align(p, alignof(T), "__stwt store"); *p = v; }

// Checked 16-byte accessors for generated code (the CUDA build maps them to plain
// uint4 accesses).
inline uint4 moac_emu_load16(const void* p) {
    moac_emu_check_align(p, 16, "load");
    return *static_cast<const uint4*>(p);
}
inline void moac_emu_store16(void* p, uint4 v) {
    moac_emu_check_align(p, 16, "store");
    *static_cast<uint4*>(p) = v;
}

// cp.async emulation: each copy is deferred until a __pipeline_wait_prior that covers its
// batch, so reading the destination before waiting sees stale data, as it may on the GPU.
inline void __pipeline_memcpy_async(void* dst, const void* src, size_t size_and_align,
                                    size_t zfill = 0) {
    auto& w = moac_emu::detail::current("__pipeline_memcpy_async");
    if (!(size_and_align == 4 || size_and_align == 8 || size_and_align == 16) || zfill > size_and_align)
        moac_emu_fail("__pipeline_memcpy_async: size must be 4, 8 or 16 and zfill <= size");
    moac_emu_check_align(dst, size_and_align, "__pipeline_memcpy_async destination");
    moac_emu_check_align(src, size_and_align, "__pipeline_memcpy_async source");
    auto& f = *w.cur;
    f.pending.push_back({dst, src, uint32_t(size_and_align), uint32_t(zfill), f.pipe_batch});
}
inline void __pipeline_commit() { moac_emu::detail::current("__pipeline_commit").cur->pipe_batch++; }
inline void __pipeline_wait_prior(size_t n) {
    auto& f = *moac_emu::detail::current("__pipeline_wait_prior").cur;
    // complete every copy whose batch is older than the newest n committed batches
    const uint64_t limit = f.pipe_batch >= n ? f.pipe_batch - n : 0;
    size_t keep = 0;
    for (size_t i = 0; i < f.pending.size(); ++i) {
        auto& c = f.pending[i];
        if (c.batch < limit) {
            std::memcpy(c.dst, c.src, c.size - c.zfill);
            std::memset(static_cast<char*>(c.dst) + (c.size - c.zfill), 0, c.zfill);
        } else {
            f.pending[keep++] = c;
        }
    }
    f.pending.resize(keep);
}

#endif  // MOAC_EMU_H
