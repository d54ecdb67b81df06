// f16 / bf16 conversions: exhaustive over all 16-bit patterns, tie/subnormal/overflow
// cases, and random floats, against two references (g++'s _Float16 and an independent
// double-precision rounding model).
#include "test_util.h"
#include <cfenv>
#include <random>

enum Mode { RN, RZ, RD, RU };

// Reference: round x to a binary format with p significand bits, exponent range
// [emin, emax], using double arithmetic only (exact for these formats).
static double ref_round(double x, int p, int emin, int emax, Mode m) {
    if (std::isnan(x)) return x;
    if (std::isinf(x) || x == 0) return x;
    const bool neg = x < 0;
    const double ax = std::fabs(x);
    int k;
    std::frexp(ax, &k);  // ax = f * 2^k, f in [0.5, 1)
    const int e = std::max(k - 1, emin);
    const double quantum = std::ldexp(1.0, e - (p - 1));
    const double r = ax / quantum;  // exact
    double q;
    switch (m) {
    case RN: q = std::nearbyint(r); break;  // default rounding mode: ties to even
    case RZ: q = std::trunc(r); break;
    case RU: q = neg ? std::floor(r) : std::ceil(r); break;
    default: q = neg ? std::ceil(r) : std::floor(r); break;
    }
    double res = q * quantum;
    const double maxf = (2.0 - std::ldexp(1.0, 1 - p)) * std::ldexp(1.0, emax);
    if (res > maxf) {
        const bool to_inf = m == RN || (m == RU && !neg) || (m == RD && neg);
        res = to_inf ? INFINITY : maxf;
    }
    return neg ? -res : res;
}
static double ref_half(double x, Mode m = RN) { return ref_round(x, 11, -14, 15, m); }
static double ref_bf16(double x, Mode m = RN) { return ref_round(x, 8, -126, 127, m); }

static uint32_t fbits(float f) { return std::bit_cast<uint32_t>(f); }
static bool same(float a, float b) { return (std::isnan(a) && std::isnan(b)) || fbits(a) == fbits(b); }

// Decode a 16-bit pattern independently of the header (sign, exponent, mantissa).
static double decode(uint16_t h, int mbits, int ebits) {
    const int bias = (1 << (ebits - 1)) - 1;
    const bool neg = h >> 15;
    const int e = (h >> mbits) & ((1 << ebits) - 1);
    const int m = h & ((1 << mbits) - 1);
    double v;
    if (e == (1 << ebits) - 1) v = m ? NAN : INFINITY;
    else if (e == 0) v = std::ldexp(double(m), 1 - bias - mbits);
    else v = std::ldexp(double(m | (1 << mbits)), e - bias - mbits);
    return neg ? -v : v;
}

static void check_half(float f, const char* what) {
    const uint16_t got = __half_as_ushort(__float2half_rn(f));
    const float back = __half2float(__ushort_as_half(got));
    const float want = float(ref_half(f));
    expect(same(back, want), "%s: __float2half_rn(%a) = 0x%04x (%a), want %a", what, f, got, back, want);
    const float gcc = float(_Float16(f));
    expect(same(back, gcc), "%s: __float2half_rn(%a) = %a, _Float16 gives %a", what, f, back, gcc);
    if (std::isnan(f)) expect(got == 0x7fff, "NaN -> 0x%04x, want canonical 0x7fff", got);
    // directed modes against the reference
    const uint16_t rz = __half_as_ushort(__float2half_rz(f)), rd = __half_as_ushort(__float2half_rd(f)),
                   ru = __half_as_ushort(__float2half_ru(f));
    expect(same(__half2float(__ushort_as_half(rz)), float(ref_half(f, RZ))), "%s: rz(%a)", what, f);
    expect(same(__half2float(__ushort_as_half(rd)), float(ref_half(f, RD))), "%s: rd(%a)", what, f);
    expect(same(__half2float(__ushort_as_half(ru)), float(ref_half(f, RU))), "%s: ru(%a)", what, f);
}

static void check_bf16(float f, const char* what) {
    const uint16_t got = __bfloat16_as_ushort(__float2bfloat16_rn(f));
    const float back = __bfloat162float(__ushort_as_bfloat16(got));
    const float want = float(ref_bf16(f));
    expect(same(back, want), "%s: __float2bfloat16_rn(%a) = 0x%04x (%a), want %a", what, f, got, back, want);
    expect(got == __bfloat16_as_ushort(__float2bfloat16(f)), "__float2bfloat16 == _rn");
    if (std::isnan(f)) expect(got == 0x7fff, "bf16 NaN -> 0x%04x", got);
    const uint16_t rz = __bfloat16_as_ushort(__float2bfloat16_rz(f)), rd = __bfloat16_as_ushort(__float2bfloat16_rd(f)),
                   ru = __bfloat16_as_ushort(__float2bfloat16_ru(f));
    expect(same(__bfloat162float(__ushort_as_bfloat16(rz)), float(ref_bf16(f, RZ))), "%s: bf16 rz(%a)", what, f);
    expect(same(__bfloat162float(__ushort_as_bfloat16(rd)), float(ref_bf16(f, RD))), "%s: bf16 rd(%a)", what, f);
    expect(same(__bfloat162float(__ushort_as_bfloat16(ru)), float(ref_bf16(f, RU))), "%s: bf16 ru(%a)", what, f);
}

int main() {
    // 1. every 16-bit pattern decodes exactly and round-trips
    for (uint32_t u = 0; u < 65536; ++u) {
        const uint16_t h = uint16_t(u);
        const float f = __half2float(__ushort_as_half(h));
        expect(same(f, float(decode(h, 10, 5))), "__half2float(0x%04x) = %a", h, f);
        expect(same(f, float(std::bit_cast<_Float16>(h))), "__half2float(0x%04x) vs _Float16", h);
        const uint16_t rt = __half_as_ushort(__float2half(f));
        if (std::isnan(f)) expect(rt == 0x7fff, "half NaN 0x%04x -> 0x%04x", h, rt);
        else expect(rt == h, "half round trip 0x%04x -> %a -> 0x%04x", h, f, rt);

        const float g = __bfloat162float(__ushort_as_bfloat16(h));
        expect(same(g, float(decode(h, 7, 8))), "__bfloat162float(0x%04x) = %a", h, g);
        const uint16_t rtb = __bfloat16_as_ushort(__float2bfloat16(g));
        if (std::isnan(g)) expect(rtb == 0x7fff, "bf16 NaN 0x%04x -> 0x%04x", h, rtb);
        else expect(rtb == h, "bf16 round trip 0x%04x -> %a -> 0x%04x", h, g, rtb);
    }

    // 2. midpoints between neighbours (ties to even) and their float neighbours
    for (uint32_t u = 0; u < 0x7c00; ++u) {
        const double a = decode(uint16_t(u), 10, 5), b = decode(uint16_t(u + 1), 10, 5);
        const float mid = float((a + b) / 2);  // exact in float
        for (float f : {mid, std::nextafter(mid, 0.0f), std::nextafter(mid, INFINITY)}) {
            check_half(f, "half midpoint");
            check_half(-f, "half -midpoint");
        }
    }
    for (uint32_t u = 0; u < 0x7f80; ++u) {
        const double a = decode(uint16_t(u), 7, 8), b = decode(uint16_t(u + 1), 7, 8);
        const float mid = float((a + b) / 2);
        for (float f : {mid, std::nextafter(mid, 0.0f), std::nextafter(mid, INFINITY)}) {
            check_bf16(f, "bf16 midpoint");
            check_bf16(-f, "bf16 -midpoint");
        }
    }

    // 3. chosen cases
    struct Case { float f; uint16_t h; const char* what; };
    const Case hc[] = {
        {1.0f + 0x1p-11f, 0x3c00, "1+2^-11 ties to even (down)"},
        {1.0f + 3 * 0x1p-11f, 0x3c02, "1+3*2^-11 ties to even (up)"},
        {65504.0f, 0x7bff, "max half"},
        {65519.0f, 0x7bff, "65519 rounds down"},
        {65520.0f, 0x7c00, "65520 overflows to inf"},
        {1e10f, 0x7c00, "large overflows to inf"},
        {-65520.0f, 0xfc00, "-65520 overflows to -inf"},
        {INFINITY, 0x7c00, "inf"},
        {0x1p-24f, 0x0001, "min subnormal"},
        {0x1p-25f, 0x0000, "2^-25 ties to even (0)"},
        {0x1.000002p-25f, 0x0001, "just above 2^-25"},
        {3 * 0x1p-25f, 0x0002, "3*2^-25 ties to even (2)"},
        {5 * 0x1p-25f, 0x0002, "5*2^-25 ties to even (2)"},
        {0x1p-14f, 0x0400, "min normal"},
        {0x1.ff8p-15f, 0x03ff, "max subnormal"},
        {0x1.ffcp-15f, 0x0400, "max subnormal + half ulp ties to min normal (even)"},
        {0x1.ffbp-15f, 0x03ff, "just below that tie"},
        {-0.0f, 0x8000, "-0"},
        {1e-30f, 0x0000, "tiny to 0"},
        {NAN, 0x7fff, "NaN canonical"},
    };
    for (const Case& c : hc) {
        const uint16_t got = __half_as_ushort(__float2half_rn(c.f));
        expect(got == c.h, "half %s: %a -> 0x%04x, want 0x%04x", c.what, c.f, got, c.h);
    }
    const Case bc[] = {
        {1.0f + 0x1p-8f, 0x3f80, "bf16 1+2^-8 ties to even (down)"},
        {1.0f + 3 * 0x1p-8f, 0x3f82, "bf16 1+3*2^-8 ties to even (up)"},
        {FLT_MAX, 0x7f80, "FLT_MAX rounds to inf"},
        {0x1p-133f, 0x0001, "bf16 min subnormal"},
        {0x1p-134f, 0x0000, "bf16 2^-134 ties to even (0)"},
        {3 * 0x1p-134f, 0x0002, "bf16 3*2^-134 ties to even (2)"},
        {-INFINITY, 0xff80, "-inf"},
        {NAN, 0x7fff, "bf16 NaN canonical"},
    };
    for (const Case& c : bc) {
        const uint16_t got = __bfloat16_as_ushort(__float2bfloat16_rn(c.f));
        expect(got == c.h, "%s: %a -> 0x%04x, want 0x%04x", c.what, c.f, got, c.h);
    }

    // 4. random float bit patterns
    std::mt19937 rng(12345);
    for (int i = 0; i < 3000000; ++i) {
        const float f = std::bit_cast<float>(uint32_t(rng()));
        check_half(f, "random");
        check_bf16(f, "random");
    }
    // doubles straight to half / bf16 (no double rounding through float)
    for (int i = 0; i < 1000000; ++i) {
        const double d = std::ldexp(double(rng()) / 4294967296.0 + 0.5, int(rng() % 60) - 40) * ((rng() & 1) ? -1 : 1);
        expect(same(__half2float(__double2half(d)), float(ref_half(d))), "__double2half(%a)", d);
        expect(same(__bfloat162float(__double2bfloat16(d)), float(ref_bf16(d))), "__double2bfloat16(%a)", d);
    }

    // 5. paired helpers
    const __half2 h2 = __floats2half2_rn(1.5f, -2.25f);
    expect(__low2float(h2) == 1.5f && __high2float(h2) == -2.25f, "__floats2half2_rn / __low2float / __high2float");
    const float2 f2 = __half22float2(h2);
    expect(f2.x == 1.5f && f2.y == -2.25f, "__half22float2");
    const __nv_bfloat162 b2 = __floats2bfloat162_rn(3.0f, 0.5f);
    const float2 g2 = __bfloat1622float2(b2);
    expect(g2.x == 3.0f && g2.y == 0.5f && __low2float(b2) == 3.0f && __high2float(b2) == 0.5f, "bf16 pairs");
    expect(float(__hadd(__float2half(1.0f), __float2half(0x1p-11f))) == 1.0f, "__hadd rounds to even");
    expect(sizeof(__half2) == 4 && alignof(__half2) == 4 && sizeof(__nv_bfloat16) == 2, "16-bit layouts");
    return finish("convert");
}
