#!/bin/sh
# Build unmaskd with AddressSanitizer and UndefinedBehaviorSanitizer in a folder of its
# own and run the whole test suite there (make check). See docs/testing.md.
#
#   tools/ci-sanitize.sh [BUILD_DIR]        default BUILD_DIR: build-asan in the source tree
#
# CC selects the compiler (default gcc, the one these runs were checked with). make
# check also replays the fuzz targets' regression inputs and seed corpora
# (tests/fuzz/replay.sh) in this build.
# Every process the tests start, daemons included, writes its sanitizer reports to
# BUILD_DIR/sanitizer/ rather than to stderr, where a test may not look: a daemon that a
# test stops with SIGTERM reports its leaks there too. The run fails when make check
# fails or when any report is there. LeakSanitizer reads tests/lsan.supp when it exists.
#
#   JOBS              make -j (default: nproc)
#   SANITIZE_TIMEOUT  seconds each test program may take (default 3600)
#
# Exits 0 when the suite passed with no report, 1 otherwise.
set -eu

src=$(cd "$(dirname "$0")/.." && pwd)
build=${1:-$src/build-asan}
jobs=${JOBS:-$(nproc)}
flags="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer -O1 -g"

[ -x "$src/configure" ] || (cd "$src" && autoreconf -fi)
mkdir -p "$build"
cd "$build"
if [ ! -f Makefile ]; then
    "$src/configure" --quiet CC="${CC:-gcc}" CFLAGS="$flags" LDFLAGS="-fsanitize=address,undefined"
fi
make -j"$jobs" >/dev/null

reports=$build/sanitizer
rm -rf "$reports"
mkdir -p "$reports"
# detect_leaks is the default on x86-64 Linux. It is spelled out because the leak check
# of every process is the point of this run.
# Use-after-return detection moves locals to a fake stack whose frames libasan aligns to
# only 32 bytes (fixed in LLVM's compiler-rt by llvm-project pull request 153142 in
# August 2025, not in Debian 12's GCC 12). AVX-512 code keeps 64-byte-aligned locals
# there, and its aligned stores fault. So it is on only where the CPU has no AVX-512 and
# the kernels run AVX2 at most.
uar=1
if grep -qw avx512f /proc/cpuinfo 2>/dev/null; then
    uar=0
    echo "ci-sanitize: AVX-512 host: use-after-return detection is off (see the comment above)"
fi
ASAN_OPTIONS="log_path=$reports/asan:detect_leaks=1:strict_string_checks=1:detect_stack_use_after_return=$uar"
UBSAN_OPTIONS="log_path=$reports/ubsan:print_stacktrace=1"
LSAN_OPTIONS=""
[ -f "$src/tests/lsan.supp" ] && LSAN_OPTIONS="suppressions=$src/tests/lsan.supp"
export ASAN_OPTIONS UBSAN_OPTIONS LSAN_OPTIONS

# The sanitizers slow the suite down several times, so the runner's 20-minute bound
# (LOG_COMPILER in Makefile.am) is raised.
status=0
make -j"$jobs" check LOG_COMPILER="timeout ${SANITIZE_TIMEOUT:-3600}" || status=1
if [ "$status" -ne 0 ]; then
    for trs in tests/*.trs tests/*/*.trs; do
        grep -q ':test-result: \(FAIL\|ERROR\)' "$trs" 2>/dev/null && cat "${trs%.trs}.log"
    done
fi

found=$(find "$reports" -type f | sort)
if [ -n "$found" ]; then
    echo "ci-sanitize: sanitizer reports in $reports:" >&2
    for f in $found; do
        echo "==> $f" >&2
        cat "$f" >&2
    done
    status=1
fi
[ "$status" -eq 0 ] && echo "ci-sanitize: make check passed with no sanitizer report"
exit "$status"
