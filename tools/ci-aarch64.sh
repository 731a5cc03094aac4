#!/bin/sh
# aarch64 stage of CI: cross-build unmaskd for aarch64 with Debian's arm64 libraries into
# build-aarch64/, then under qemu-user run the Check runner's kernel and model suites and
# one end-to-end generation with the aarch64 daemon, plugins and client.
#
#   tools/ci-aarch64.sh
#
# Installs what is missing with apt-get (as root, or through sudo). A missing tool is an
# error, never a skipped step. qemu proves correctness only, and its timings do not
# reflect the speed of a real Arm CPU.
set -eu

cd "$(dirname "$0")/.."
src=$(pwd)
build=$src/build-aarch64
started=$(date +%s)

# A plain ARMv8.0-A core (no SVE), so the NEON kernels and oneDNN's Advanced SIMD code
# run as on the oldest CPUs the build targets. "-L /" takes the dynamic loader from
# libc6:arm64, the same package as the libc that ld.so.cache points the guest to. The
# cross toolchain's /usr/aarch64-linux-gnu has its own ld.so from another glibc build (on
# Debian 12, 2.36-8cross1 while libc6:arm64 follows the point releases), and that mix
# hangs in pthread_create.
QEMU="qemu-aarch64 -cpu cortex-a72 -L /"

# Seconds per suite. On a 2-core machine the kernel suite took about 10 s under qemu and
# the model suite 30 to 60 s, so this only stops a hang.
SUITE_TIMEOUT=600

# libdnnl-dev:arm64 cannot be installed beside libdnnl-dev:amd64, which the x86 build
# needs: both ship /usr/include/oneapi/dnnl/dnnl_config.h with different contents
# (DNNL_GPU_RUNTIME is OCL on amd64 and NONE on arm64). So only its runtime is installed,
# and the headers come from the unpacked package in build-aarch64/onednn/.
PACKAGES="gcc-aarch64-linux-gnu qemu-user pkgconf:arm64 libc6:arm64 libzmq3-dev:arm64 \
libjansson-dev:arm64 libpcre2-dev:arm64 libutf8proc-dev:arm64 libmicrohttpd-dev:arm64 \
check:arm64 libdnnl2:arm64"

info() {
    echo "ci-aarch64: $*"
}

fail() {
    echo "ci-aarch64: $*" >&2
    exit 1
}

install_packages() {
    if [ "$(id -u)" -eq 0 ]; then sudo=""; else sudo="sudo"; fi
    if ! dpkg --print-foreign-architectures | grep -qx arm64; then
        info "adding the arm64 architecture to dpkg"
        $sudo dpkg --add-architecture arm64
        $sudo apt-get update -qq
    fi
    missing=""
    for p in $PACKAGES; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" \
            || missing="$missing $p"
    done
    if [ -n "$missing" ]; then
        info "installing$missing"
        $sudo apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq $missing >/dev/null \
            || fail "apt-get install failed for:$missing"
    fi
    for tool in aarch64-linux-gnu-gcc aarch64-linux-gnu-pkg-config qemu-aarch64; do
        command -v "$tool" >/dev/null \
            || fail "$tool not found after installing the packages: this stage cannot run"
    done
}

# Unpack the oneDNN headers for arm64 and give the linker a libdnnl.so that points at the
# installed runtime (the package's own symbolic link is relative and would dangle here).
unpack_onednn() {
    dir=$build/onednn
    if [ ! -f "$dir/usr/include/oneapi/dnnl/dnnl.h" ]; then
        info "unpacking libdnnl-dev:arm64 into $dir"
        rm -rf "$dir"
        mkdir -p "$dir/lib"
        (cd "$dir" && apt-get download -qq -o APT::Sandbox::User=root libdnnl-dev:arm64) \
            || fail "apt-get download libdnnl-dev:arm64 failed"
        dpkg-deb -x "$dir"/libdnnl-dev_*_arm64.deb "$dir"
        rm -f "$dir"/libdnnl-dev_*_arm64.deb
    fi
    mkdir -p "$dir/lib"
    ln -sf /usr/lib/aarch64-linux-gnu/libdnnl.so.2 "$dir/lib/libdnnl.so"
}

build() {
    [ -x configure ] || autoreconf -fi
    mkdir -p "$build"
    unpack_onednn
    cd "$build"
    if [ ! -f Makefile ]; then
        info "configuring for aarch64-linux-gnu"
        ../configure --quiet --host=aarch64-linux-gnu \
            PKG_CONFIG_PATH=/usr/lib/aarch64-linux-gnu/pkgconfig \
            DNNL_CFLAGS="-I$build/onednn/usr/include" DNNL_LIBS="-L$build/onednn/lib -ldnnl"
    fi
    info "building (make -j2)"
    make -j2 >/dev/null || fail "the aarch64 build failed (compiler output above)"
    [ -f libumkernels_neon.la ] ||
        fail "the build has no NEON kernels: configure found no usable arm_neon.h (see config.log)"
    # The test runner and the loader's fixture plugins, without running any test.
    make -j2 check TESTS= >/dev/null || fail "building the aarch64 tests failed"
    cd "$src"
}

# The variables make check sets (Makefile.am, AM_TESTS_ENVIRONMENT), for the aarch64 tree.
export_test_environment() {
    export UNMASKD_WEIGHT_DTYPE="${UNMASKD_WEIGHT_DTYPE:-f32}"
    export UM_TEST_MODEL="$src/models/tinystories"
    export UM_TEST_FIXTURES="$src/tests/fixtures"
    export UM_TEST_PLUGINS="$build/build-plugins"
    export UM_TEST_BAD_PLUGINS="$build/tests/plugins/.libs"
    export UM_TEST_DAEMON="$build/unmaskd"
    export UM_TEST_CLIENT="$build/unmask"
    export UM_TEST_GATEWAY="$build/unmask-gateway"
    export UM_TEST_BUILDDIR="$build"
    export UM_TEST_SRCDIR="$src"
    export UM_TEST_OUT="$build/tests/out"
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
    # Check's fork mode hangs under qemu-user. The runner defaults to no-fork already.
    export CK_FORK=no
    mkdir -p "$UM_TEST_OUT"
}

# Run one Check suite under qemu, with its output in build-aarch64/tests/SUITE-aarch64.log.
run_suite() {
    suite=$1
    log=$build/tests/$suite-aarch64.log
    info "running the $suite suite under qemu"
    if ! CK_RUN_SUITE=$suite timeout $SUITE_TIMEOUT $QEMU "$build/tests/check_unmaskd" \
        >"$log" 2>&1; then
        cat "$log"
        fail "the $suite suite failed under qemu-aarch64 (log above, also in $log)"
    fi
    grep -q "Checks: [1-9]" "$log" || { cat "$log"; fail "the $suite suite ran no test"; }
}

# Start the aarch64 daemon on an ipc socket, generate 32 tokens with the aarch64 client,
# check that text came back and that the NEON kernels served it, then stop the daemon.
run_generation() {
    tmp=$(mktemp -d)
    endpoint="ipc://$tmp/unmaskd.sock"
    info "end-to-end generation under qemu on $endpoint"
    $QEMU "$build/unmaskd" --model "$src/models/tinystories" \
        --plugin-dir "$build/build-plugins" --bind "$endpoint" --log-level info \
        >"$tmp/daemon.log" 2>&1 &
    daemon=$!
    trap 'kill $daemon 2>/dev/null; wait $daemon 2>/dev/null; rm -rf "$tmp"' EXIT INT TERM

    i=0
    until $QEMU "$build/unmask" --connect "$endpoint" --timeout 2 --info >/dev/null 2>&1; do
        i=$((i + 1))
        if [ $i -ge 60 ] || ! kill -0 $daemon 2>/dev/null; then
            cat "$tmp/daemon.log"
            fail "the aarch64 unmaskd did not start; its log is above"
        fi
        sleep 1
    done

    prompt="once upon a time, there was a little girl named lily. she"
    if ! $QEMU "$build/unmask" --connect "$endpoint" --timeout 120 --gen-length 32 \
        --steps 8 --seed 7 --json "$prompt" >"$tmp/reply.json" 2>"$tmp/client.log"; then
        cat "$tmp/client.log" "$tmp/daemon.log"
        fail "the aarch64 unmask client failed; its and the daemon's logs are above"
    fi
    # The final reply is one JSON object: "type":"done" and the generated "text".
    if ! grep -q '"type":"done"' "$tmp/reply.json" ||
        ! grep -Eq '"text":" *[^" ]' "$tmp/reply.json"; then
        cat "$tmp/reply.json"
        fail "the generation returned no text"
    fi
    grep -q "kernels: ISA neon" "$tmp/daemon.log" \
        || { cat "$tmp/daemon.log"; fail "the daemon did not select the NEON kernels"; }
    info "generated:$(sed 's/.*"text":"\([^"]*\)".*/\1/' "$tmp/reply.json")"

    kill -TERM $daemon
    status=0
    wait $daemon || status=$?
    trap - EXIT INT TERM
    if [ $status -ne 0 ]; then
        cat "$tmp/daemon.log"
        fail "unmaskd exited with status $status after SIGTERM; its log is above"
    fi
    rm -rf "$tmp"
}

# A quick unmask-bench report marked as emulated: it proves the benchmark path on
# aarch64, and its timings are qemu's, not an Arm CPU's.
run_bench() {
    info "unmask-bench --quick under qemu"
    report="$build/bench-aarch64.json"
    if ! UNMASKD_BENCH_RUNNER="$QEMU" python3 "$build/bench/unmask-bench" --quick \
        --threads 1 --gen-length 16 --steps 8 --block-length 16 --repeat 2 --requests 4 \
        --clients 2 --batch 2 --torch no --out "$report" >"$build/bench-aarch64.log" 2>&1; then
        cat "$build/bench-aarch64.log"
        fail "unmask-bench failed under qemu; its output is above"
    fi
    python3 "$build/bench/unmask-bench" --check "$report" >/dev/null \
        || fail "the emulated bench report $report does not match the schema"
    grep -q '"emulated": true' "$report" || fail "the bench report is not marked as emulated"
}

install_packages
build
export_test_environment
run_suite kernels
run_suite model
run_generation
run_bench
info "aarch64 stage passed in $(( $(date +%s) - started )) s"
# Check's own summary lines, so the end of the output shows the counts.
grep -h "Checks:" "$build/tests/kernels-aarch64.log" "$build/tests/model-aarch64.log"
