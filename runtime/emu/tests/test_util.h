// test_util.h -- tiny helpers shared by the emu tests (host side of each test program).
#pragma once
#include <cstdarg>
#include <cstdio>
#include <cstring>
#include <string>

static int g_failures = 0;
static int g_checks = 0;

// Records a failed check (printing at most 20 of them) and returns cond.
__attribute__((format(printf, 2, 3))) static bool expect(bool cond, const char* fmt, ...) {
    ++g_checks;
    if (!cond) {
        if (++g_failures <= 20) {
            va_list ap;
            va_start(ap, fmt);
            fprintf(stderr, "  check failed: ");
            vfprintf(stderr, fmt, ap);
            fprintf(stderr, "\n");
            va_end(ap);
        }
    }
    return cond;
}

static bool contains(const char* hay, const char* needle) { return strstr(hay, needle) != nullptr; }

static int finish(const char* name) {
    if (g_failures) {
        fprintf(stderr, "%s: %d of %d checks failed\n", name, g_failures, g_checks);
        return 1;
    }
    printf("%s: %d checks ok\n", name, g_checks);
    return 0;
}
