#!/bin/sh
# Run the daemon-level Check suites with every unmaskd they start under valgrind memcheck.
# See docs/testing.md.
#
#   tools/ci-valgrind.sh [SUITE[:CASE]...]   default: server (every case of the suite)
#
# An argument SUITE:CASE runs one TCase of the suite (Check's CK_RUN_CASE), so a
# shorter run can pick cases, e.g. server:errors server:lifecycle.
#
# The suites start the real daemon through UM_TEST_DAEMON, which here names a wrapper
# that runs unmaskd under valgrind, so the test runner itself runs natively. Each
# daemon writes its own valgrind log (BUILD_DIR/valgrind/daemon-PID.log). The run fails
# when the suite fails or when any log reports an error: an invalid read or write, a use
# of uninitialised memory, or memory definitely or indirectly lost at exit.
# tests/valgrind.supp contains the suppressions, for library internals only.
#
#   BUILD_DIR   build folder, configured here with CFLAGS="-O1 -g" when it has no
#               Makefile (default: build-valgrind in the source tree)
#   VG_TIMEOUT  seconds each suite or case may take (default 3600)
#
# Exits 0 when the suites passed with clean logs, 1 otherwise.
set -eu

src=$(cd "$(dirname "$0")/.." && pwd)
build=${BUILD_DIR:-$src/build-valgrind}
suites=${*:-server}
jobs=${JOBS:-$(nproc)}

command -v valgrind >/dev/null ||
    { echo "ci-valgrind: valgrind not found: install the Debian package valgrind" >&2; exit 1; }
[ -x "$src/configure" ] || (cd "$src" && autoreconf -fi)
mkdir -p "$build"
cd "$build"
[ -f Makefile ] || "$src/configure" --quiet CFLAGS="-O1 -g"
make -j"$jobs" >/dev/null
make -j"$jobs" check TESTS= >/dev/null

logs=$build/valgrind
rm -rf "$logs"
mkdir -p "$logs"
wrapper=$logs/unmaskd-under-valgrind
# oneDNN's AVX2 JIT matrix products make memcheck report uses of uninitialised values
# that start inside the JIT code, where valgrind cannot unwind (docs/testing.md). Its
# SSE4.1 code gives no report and runs faster, so the daemon gets ONEDNN_MAX_CPU_ISA.
# unmaskd's own SIMD kernels still run at the ISA its CPU probe picks.
# Valgrind runs one thread at a time. Without --fair-sched the worker thread, busy with
# a generation, can keep the main thread from reading a cancel for minutes.
cat > "$wrapper" <<EOF
#!/bin/sh
ONEDNN_MAX_CPU_ISA=\${ONEDNN_MAX_CPU_ISA:-SSE41}
export ONEDNN_MAX_CPU_ISA
exec valgrind --tool=memcheck --fair-sched=yes --error-exitcode=99 --leak-check=full \\
    --show-leak-kinds=definite,indirect --errors-for-leak-kinds=definite,indirect \\
    --num-callers=40 --suppressions="$src/tests/valgrind.supp" \\
    --log-file="$logs/daemon-%p.log" "$build/unmaskd" "\$@"
EOF
chmod +x "$wrapper"

# The environment make check gives the runner (AM_TESTS_ENVIRONMENT in Makefile.am).
UNMASKD_WEIGHT_DTYPE=${UNMASKD_WEIGHT_DTYPE:-f32}
UM_TEST_MODEL=$src/models/tinystories
UM_TEST_FIXTURES=$src/tests/fixtures
UM_TEST_PLUGINS=$build/build-plugins
UM_TEST_BAD_PLUGINS=$build/tests/plugins/.libs
UM_TEST_DAEMON=$wrapper
UM_TEST_CLIENT=$build/unmask
UM_TEST_GATEWAY=$build/unmask-gateway
UM_TEST_BROKER=$build/unmask-broker
UM_TEST_OUT=$build/tests/out
UM_TEST_BUILDDIR=$build
UM_TEST_SRCDIR=$src
OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
# Valgrind runs one thread at a time, so threads that spin while they wait only burn time.
OMP_WAIT_POLICY=passive
# Reply timeouts and Check's timeouts scale with this, because a daemon under valgrind is
# slow.
CK_TIMEOUT_MULTIPLIER=${CK_TIMEOUT_MULTIPLIER:-20}
export UNMASKD_WEIGHT_DTYPE UM_TEST_MODEL UM_TEST_FIXTURES UM_TEST_PLUGINS UM_TEST_BAD_PLUGINS \
    UM_TEST_DAEMON UM_TEST_CLIENT UM_TEST_GATEWAY UM_TEST_BROKER UM_TEST_OUT UM_TEST_BUILDDIR \
    UM_TEST_SRCDIR OMP_NUM_THREADS OMP_WAIT_POLICY CK_TIMEOUT_MULTIPLIER

status=0
for run in $suites; do
    suite=${run%%:*}
    case $run in
    *:*) tcase=${run#*:} ;;
    *) tcase= ;;
    esac
    echo "ci-valgrind: suite $suite${tcase:+, case $tcase}"
    start=$(date +%s)
    if [ -n "$tcase" ]; then
        CK_RUN_SUITE=$suite CK_RUN_CASE=$tcase timeout "${VG_TIMEOUT:-3600}" \
            tests/check_unmaskd || status=1
    else
        CK_RUN_SUITE=$suite timeout "${VG_TIMEOUT:-3600}" tests/check_unmaskd || status=1
    fi
    echo "ci-valgrind: $run took $(($(date +%s) - start)) s"
done

n=0
for log in "$logs"/daemon-*.log; do
    [ -f "$log" ] || continue
    n=$((n + 1))
    if ! grep -q "ERROR SUMMARY: 0 errors" "$log"; then
        echo "ci-valgrind: $log reports errors:" >&2
        cat "$log" >&2
        status=1
    fi
done
if [ "$n" -eq 0 ]; then
    echo "ci-valgrind: no daemon ran under valgrind" >&2
    status=1
fi
[ "$status" -eq 0 ] && echo "ci-valgrind: $n daemon runs under valgrind, no errors"
exit "$status"
