#!/usr/bin/env bash
# Tests of the CUDA CPU emulation (runtime/emu/moac_emu.h).
# Builds every test kernel with the flags the emu backend uses and checks the results;
# prints one line per test and a final "N passed, M failed"; exits non-zero on failure.
#
#   runtime/emu/tests/run.sh                # all tests
#   runtime/emu/tests/run.sh shuffle        # only tests whose name contains "shuffle"
#   runtime/emu/tests/run.sh --exact NAME   # only the test called NAME (tests/runtime/emu_header.rs)
#   runtime/emu/tests/run.sh --list         # the test names, one a line
# A name filter that selects no test is a failure: a renamed test must not turn a caller's
# check into a silent "0 passed".
#
# Environment: CXX (default g++), KEEP=1 keeps the build directory.
set -u

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
EMU="$(cd "$HERE/.." && pwd)"
CXX="${CXX:-g++}"
MODE=substring
FILTER=""
case "${1:-}" in
--exact)
    MODE=exact
    FILTER="${2:?--exact needs a test name}"
    ;;
--list) MODE=list ;;
-*)
    echo "usage: $0 [FILTER | --exact NAME | --list]" >&2
    exit 2
    ;;
*) FILTER="${1:-}" ;;
esac
if [[ $MODE != list ]]; then
    BUILD="$(mktemp -d "${TMPDIR:-/tmp}/moac_emu_tests.XXXXXX")"
    if [[ "${KEEP:-0}" != 1 ]]; then trap 'rm -rf "$BUILD"' EXIT; else echo "build dir: $BUILD"; fi
fi

# The emu backend's flags (docs/kernel-abi.md, DESIGN.md); tests add -pthread and build
# executables, the .so tests add -shared exactly as the runtime does.
BASE=(-std=c++20 -O2 -fno-strict-aliasing -fPIC -DMOAC_EMU -include "$EMU/moac_emu.h")
SAN=(-std=c++20 -O1 -g -fno-omit-frame-pointer -fno-strict-aliasing -fPIC -DMOAC_EMU
     -include "$EMU/moac_emu.h" -fsanitize=address,undefined -fno-sanitize-recover=all)
TIMEOUT=180

PASSED=0
FAILED=0
FAILED_NAMES=()

# run_test NAME FUNCTION: FUNCTION writes its log to $LOG and returns 0 on success.
run_test() {
    local name="$1" fn="$2"
    case $MODE in
    list)
        echo "$name"
        return
        ;;
    exact) if [[ "$name" != "$FILTER" ]]; then return; fi ;;
    substring) if [[ -n "$FILTER" && "$name" != *"$FILTER"* ]]; then return; fi ;;
    esac
    LOG="$BUILD/$name.log"
    local t0=$SECONDS
    if "$fn" >"$LOG" 2>&1; then
        PASSED=$((PASSED + 1))
        local note
        note="$(grep -h '^  \[' "$LOG" | sed 's/^  //' | tr '\n' ' ')"
        printf 'PASS  %-28s %3ss  %s\n' "$name" $((SECONDS - t0)) "$note"
    else
        FAILED=$((FAILED + 1))
        FAILED_NAMES+=("$name")
        printf 'FAIL  %-28s %3ss\n' "$name" $((SECONDS - t0))
        tail -n 25 "$LOG" | sed 's/^/      | /'
    fi
}

# build OUT SRC [extra flags...]: an executable with the emu flags.
build() {
    local out="$1" src="$2"
    shift 2
    "$CXX" "${BASE[@]}" "$@" -pthread -x c++ "$src" -o "$out"
}
build_san() {
    local out="$1" src="$2"
    shift 2
    "$CXX" "${SAN[@]}" "$@" -pthread -x c++ "$src" -o "$out"
}
# run_ok BIN: must exit 0 within the timeout.
run_ok() { timeout "$TIMEOUT" "$@"; }

# ---- plain builds --------------------------------------------------------------------
t_convert() { build "$BUILD/convert" "$HERE/convert.cu" && run_ok "$BUILD/convert"; }
t_reduce() { build "$BUILD/reduce" "$HERE/reduce.cu" && run_ok "$BUILD/reduce"; }
t_shuffle() { build "$BUILD/shuffle" "$HERE/shuffle.cu" && run_ok "$BUILD/shuffle"; }
t_atomics() { build "$BUILD/atomics" "$HERE/atomics.cu" && MOAC_EMU_THREADS=4 run_ok "$BUILD/atomics"; }
# errors: deadlocks must come back as errors, so a hang is a failure (timeout).
t_errors() { build "$BUILD/errors" "$HERE/errors.cu" && MOAC_EMU_THREADS=3 timeout 60 "$BUILD/errors"; }
t_args() { build "$BUILD/args" "$HERE/args.cu" && run_ok "$BUILD/args"; }
t_pipeline() { build "$BUILD/pipeline" "$HERE/pipeline.cu" && run_ok "$BUILD/pipeline"; }
t_common() { build "$BUILD/common" "$HERE/common_helpers.cu" && run_ok "$BUILD/common"; }
t_stack_env() {  # a smaller fiber stack and a single OS thread still work
    build "$BUILD/shuffle_env" "$HERE/shuffle.cu" &&
        MOAC_EMU_STACK=32k MOAC_EMU_THREADS=1 run_ok "$BUILD/shuffle_env"
}

# ---- the .so path: exact build flags, dlopen from a host that never saw the header ----
t_dlopen() {
    "$CXX" "${BASE[@]}" -shared -x c++ "$HERE/kernel_so.cu" -x c++ "$HERE/kernel_so2.cu" \
        -o "$BUILD/libkernels.so" &&
        nm -D --defined-only "$BUILD/libkernels.so" | grep -q ' T moac_emu_launch_saxpy_half$' &&
        nm -D --defined-only "$BUILD/libkernels.so" | grep -q ' T moac_emu_launch_scale_in_place$' &&
        ! nm -D --defined-only "$BUILD/libkernels.so" | grep -q 'moac_emu_ctx_switch' &&
        "$CXX" -O2 "$HERE/host_dlopen.cpp" -o "$BUILD/host_dlopen" -ldl &&
        run_ok "$BUILD/host_dlopen" "$BUILD/libkernels.so"
}
t_warnings() {  # the header itself is warning-free
    printf '%s\n' '__global__ void k(float* o) { __shared__ float s[32]; s[threadIdx.x] = 1; __syncthreads();' \
        '  o[threadIdx.x] = __shfl_xor_sync(0xffffffffu, s[31 - threadIdx.x], 1); }' 'MOAC_EMU_ENTRY(k)' \
        >"$BUILD/warn.cu" &&
        "$CXX" "${BASE[@]}" -shared -Wall -Wextra -Wpedantic -Werror -x c++ "$BUILD/warn.cu" -o "$BUILD/warn.so"
}

# ---- the portable ucontext backend ------------------------------------------------------
t_ucontext() {
    for t in reduce shuffle errors; do
        build "$BUILD/uc_$t" "$HERE/$t.cu" -DMOAC_EMU_UCONTEXT && MOAC_EMU_THREADS=2 timeout 60 "$BUILD/uc_$t" || return 1
    done
}

# ---- sanitizers -----------------------------------------------------------------------
# No false positives from fiber switching, abandoned (deadlocked) fibers or stack reuse.
t_asan_clean() {
    for t in reduce shuffle errors atomics pipeline; do
        build_san "$BUILD/san_$t" "$HERE/$t.cu" && MOAC_EMU_THREADS=3 timeout "$TIMEOUT" "$BUILD/san_$t" || return 1
    done
}
# An out-of-bounds global read in a kernel is caught by ASan: expect a failing exit,
# the ASan report, and the emulation's note naming the CUDA block and thread.
t_asan_oob() {
    build_san "$BUILD/asan_oob" "$HERE/asan_oob.cu" || return 1
    timeout 60 "$BUILD/asan_oob" >"$BUILD/asan_oob.out" 2>&1
    local rc=$?
    cat "$BUILD/asan_oob.out"
    [[ $rc -ne 0 && $rc -ne 124 ]] &&
        grep -q 'ERROR: AddressSanitizer: heap-buffer-overflow' "$BUILD/asan_oob.out" &&
        grep -q 'in oob(' "$BUILD/asan_oob.out" &&
        grep -q 'moac_emu: the sanitizer report above happened in block (1,0,0) thread (18,0,0)' "$BUILD/asan_oob.out"
}
# A plain misaligned uint4 load (not through __ldg) is caught by UBSan's alignment check.
t_ubsan_misaligned() {
    build_san "$BUILD/ubsan_mis" "$HERE/ubsan_misaligned.cu" || return 1
    timeout 60 "$BUILD/ubsan_mis" >"$BUILD/ubsan_mis.out" 2>&1
    local rc=$?
    cat "$BUILD/ubsan_mis.out"
    [[ $rc -ne 0 && $rc -ne 124 ]] && grep -q 'misaligned address .* uint4' "$BUILD/ubsan_mis.out"
}

# ---- speed ---------------------------------------------------------------------------------
t_bench() { build "$BUILD/bench" "$HERE/bench.cu" && run_ok "$BUILD/bench"; }

run_test convert t_convert
run_test reduce_missing_sync t_reduce
run_test shuffle t_shuffle
run_test atomics_4_threads t_atomics
run_test errors_deadlock_trap t_errors
run_test launch_args t_args
run_test pipeline t_pipeline
run_test common_helpers t_common
run_test env_stack_threads t_stack_env
run_test dlopen_entry t_dlopen
run_test header_warnings t_warnings
run_test ucontext_fallback t_ucontext
run_test asan_ubsan_clean t_asan_clean
run_test asan_oob_detected t_asan_oob
run_test ubsan_misaligned t_ubsan_misaligned
run_test bench t_bench

if [[ $MODE == list ]]; then exit 0; fi
echo "$PASSED passed, $FAILED failed"
if ((PASSED + FAILED == 0)); then
    echo "no test matches \"$FILTER\" ($MODE match); see $0 --list"
    exit 1
fi
if ((FAILED > 0)); then
    echo "failed: ${FAILED_NAMES[*]}"
    exit 1
fi
exit 0
