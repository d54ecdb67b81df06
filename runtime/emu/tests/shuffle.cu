// Warp collectives: shuffles (idx/up/down/xor, widths 32/16/8, several value types),
// partial masks, ballot/any/all, match, reduce, __syncwarp, __syncthreads_count.
#include "test_util.h"

constexpr int NT = 96;   // 3 warps
constexpr int NTEST = 40;

__device__ int val(int lane, int warp) { return lane * 3 + warp * 1000 + 7; }

__global__ void shuffles(int* out, float* fout, double* dout, long long* llout) {
    __shared__ int xs[NT];
    const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    const int v = val(lane, warp);
    int* o = out + tid;
    const unsigned full = 0xffffffffu;
    o[0 * NT] = __shfl_xor_sync(full, v, 5);
    o[1 * NT] = __shfl_xor_sync(full, v, 16, 16);   // xor leaves the segment for low half
    o[2 * NT] = __shfl_xor_sync(full, v, 3, 8);
    o[3 * NT] = __shfl_down_sync(full, v, 3);
    o[4 * NT] = __shfl_down_sync(full, v, 3, 16);
    o[5 * NT] = __shfl_down_sync(full, v, 5, 8);
    o[6 * NT] = __shfl_up_sync(full, v, 2);
    o[7 * NT] = __shfl_up_sync(full, v, 2, 16);
    o[8 * NT] = __shfl_up_sync(full, v, 3, 8);
    o[9 * NT] = __shfl_sync(full, v, (lane * 7) % 32);
    o[10 * NT] = __shfl_sync(full, v, 5, 16);
    o[11 * NT] = __shfl_sync(full, v, lane + 3, 8);  // srcLane wraps within the segment
    o[12 * NT] = __shfl_sync(full, v, -1);            // bits [4:0] of -1 = lane 31
    fout[tid] = __shfl_xor_sync(full, float(v) + 0.5f, 1);
    dout[tid] = __shfl_down_sync(full, double(v) * 1e10, 1);
    llout[tid] = __shfl_up_sync(full, (long long)v << 33, 1);
    o[13 * NT] = (int)__shfl_xor_sync(full, (unsigned)v * 2u, 2);

    // partial masks: lower half-warp and upper half-warp run different collectives
    if (lane < 16) o[14 * NT] = __shfl_xor_sync(0x0000ffffu, v, 1);
    else o[14 * NT] = __shfl_down_sync(0xffff0000u, v, 1);  // lane 31: source outside mask -> own
    // odd lanes only
    if (lane & 1) o[15 * NT] = __shfl_sync(0xaaaaaaaau, v, 1);
    else o[15 * NT] = -1;

    // votes
    o[16 * NT] = (int)__ballot_sync(full, lane % 3 == 0);
    o[17 * NT] = __any_sync(full, lane == 17 && warp == 1);
    o[18 * NT] = __all_sync(full, lane < 32);
    o[19 * NT] = __all_sync(full, lane < 31);
    if (lane < 8) o[20 * NT] = (int)__ballot_sync(0xffu, lane & 1);
    else o[20 * NT] = (int)__ballot_sync(0xffffff00u, lane >= 24);
    o[21 * NT] = __any_sync(full, 0);

    // warp sum with shfl_down, as kernels write it
    int s = v;
    for (int off = 16; off > 0; off >>= 1) s += __shfl_down_sync(full, s, off);
    o[22 * NT] = __shfl_sync(full, s, 0);
    // butterfly max over width 8
    int m = v * (lane % 5 == 0 ? -1 : 1);
    for (int off = 4; off > 0; off >>= 1) m = max(m, __shfl_xor_sync(full, m, off, 8));
    o[23 * NT] = m;

    // __syncwarp orders shared-memory exchange inside a warp
    xs[tid] = v;
    __syncwarp();
    o[24 * NT] = xs[warp * 32 + (lane + 1) % 32];
    __syncwarp();

    o[25 * NT] = __reduce_add_sync(full, v);
    o[26 * NT] = (int)__match_any_sync(full, lane / 4);
    int pred = 0;
    o[27 * NT] = (int)__match_all_sync(full, warp, &pred);
    o[28 * NT] = pred;
    o[29 * NT] = __reduce_max_sync(full, lane % 2 ? -v : v);
    o[30 * NT] = __reduce_min_sync(full, lane % 2 ? -v : v);
    o[31 * NT] = __syncthreads_count(tid % 3 == 0);
    o[32 * NT] = __syncthreads_or(tid == 95);
    o[33 * NT] = __syncthreads_and(tid != 50);
    o[34 * NT] = (int)__activemask();
    // __half through a shuffle
    const __half h = __float2half(float(lane));
    o[35 * NT] = (int)__half2float(__shfl_xor_sync(full, h, 1));
}

// CUDA-documented semantics, written independently of the header.
static int src_idx(int lane, int s, int w) { return (lane / w) * w + (s & (w - 1)); }
static int src_up(int lane, int d, int w) { return (lane % w) >= d ? lane - d : lane; }
static int src_down(int lane, int d, int w) { return (lane % w) + d < w ? lane + d : lane; }
static int src_xor(int lane, int m, int w) { const int j = lane ^ m; return j < (lane / w) * w + w ? j : lane; }

int main() {
    std::vector<int> out(NTEST * NT, -12345);
    std::vector<float> fout(NT);
    std::vector<double> dout(NT);
    std::vector<long long> llout(NT);
    int* po = out.data();
    float* pf = fout.data();
    double* pd = dout.data();
    long long* pl = llout.data();
    void* params[] = {&po, &pf, &pd, &pl};
    char err[1024];
    const int rc = moac_emu::launch(shuffles, dim3(2), dim3(NT), params, err, sizeof err);
    expect(rc == 0, "launch rc=%d err=%s", rc, err);
    for (int tid = 0; tid < NT; ++tid) {
        const int lane = tid % 32, warp = tid / 32;
        auto V = [&](int l) { return val(l, warp); };
        auto O = [&](int t) { return out[t * NT + tid]; };
        expect(O(0) == V(src_xor(lane, 5, 32)), "xor 5 lane %d", lane);
        expect(O(1) == V(src_xor(lane, 16, 16)), "xor 16 width 16 lane %d got %d", lane, O(1));
        expect(O(2) == V(src_xor(lane, 3, 8)), "xor 3 width 8 lane %d", lane);
        expect(O(3) == V(src_down(lane, 3, 32)), "down 3 lane %d", lane);
        expect(O(4) == V(src_down(lane, 3, 16)), "down 3 width 16 lane %d", lane);
        expect(O(5) == V(src_down(lane, 5, 8)), "down 5 width 8 lane %d", lane);
        expect(O(6) == V(src_up(lane, 2, 32)), "up 2 lane %d", lane);
        expect(O(7) == V(src_up(lane, 2, 16)), "up 2 width 16 lane %d", lane);
        expect(O(8) == V(src_up(lane, 3, 8)), "up 3 width 8 lane %d", lane);
        expect(O(9) == V(src_idx(lane, (lane * 7) % 32, 32)), "idx lane %d", lane);
        expect(O(10) == V(src_idx(lane, 5, 16)), "idx 5 width 16 lane %d", lane);
        expect(O(11) == V(src_idx(lane, lane + 3, 8)), "idx lane+3 width 8 lane %d", lane);
        expect(O(12) == V(31), "idx -1 lane %d", lane);
        expect(fout[tid] == float(V(lane ^ 1)) + 0.5f, "float xor lane %d", lane);
        expect(dout[tid] == double(V(src_down(lane, 1, 32))) * 1e10, "double down lane %d", lane);
        expect(llout[tid] == ((long long)V(src_up(lane, 1, 32)) << 33), "long long up lane %d", lane);
        expect(O(13) == int(unsigned(V(lane ^ 2)) * 2u), "unsigned xor lane %d", lane);
        if (lane < 16) expect(O(14) == V(lane ^ 1), "partial lower xor lane %d", lane);
        else expect(O(14) == V(lane == 31 ? 31 : lane + 1), "partial upper down lane %d got %d", lane, O(14));
        expect(O(15) == ((lane & 1) ? V(1) : -1), "odd-lane mask lane %d", lane);
        unsigned bal = 0;
        for (int l = 0; l < 32; ++l) bal |= (l % 3 == 0) ? 1u << l : 0;
        expect(unsigned(O(16)) == bal, "ballot lane %d", lane);
        expect(O(17) == (warp == 1), "any lane %d", lane);
        expect(O(18) == 1 && O(19) == 0, "all lane %d", lane);
        expect(unsigned(O(20)) == (lane < 8 ? 0xaau : 0xff000000u), "partial ballot lane %d: %08x", lane, O(20));
        expect(O(21) == 0, "any(0)");
        int sum = 0;
        for (int l = 0; l < 32; ++l) sum += V(l);
        expect(O(22) == sum, "shfl_down warp sum lane %d: %d want %d", lane, O(22), sum);
        int mx = INT_MIN;
        for (int l = lane / 8 * 8; l < lane / 8 * 8 + 8; ++l) mx = std::max(mx, V(l) * (l % 5 == 0 ? -1 : 1));
        expect(O(23) == mx, "width-8 max lane %d", lane);
        expect(O(24) == V((lane + 1) % 32), "__syncwarp exchange lane %d", lane);
        expect(O(25) == sum, "__reduce_add_sync");
        expect(unsigned(O(26)) == (0xfu << (lane / 4 * 4)), "__match_any_sync lane %d: %08x", lane, O(26));
        expect(unsigned(O(27)) == 0xffffffffu && O(28) == 1, "__match_all_sync");
        int rmax = INT_MIN, rmin = INT_MAX;
        for (int l = 0; l < 32; ++l) { const int x = l % 2 ? -V(l) : V(l); rmax = std::max(rmax, x); rmin = std::min(rmin, x); }
        expect(O(29) == rmax && O(30) == rmin, "__reduce_max/min_sync");
        expect(O(31) == 32 && O(32) == 1 && O(33) == 0, "__syncthreads_count/or/and: %d %d %d", O(31), O(32), O(33));
        expect(unsigned(O(34)) == 0xffffffffu, "__activemask");
        expect(O(35) == (lane ^ 1), "__half shuffle");
    }
    return finish("shuffle");
}
