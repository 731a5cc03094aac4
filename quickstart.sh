#!/bin/sh
# unmaskd quick start on Debian 12.
#
#   ./quickstart.sh ["PROMPT"]   install what the build needs, build, start the daemon on
#                                the bundled model and watch the client unmask a story
#   ./quickstart.sh test         install, build, run every test and make distcheck
#
# Packages are installed with apt-get when missing (as root, or through sudo).
# The build goes to ./build; the daemon listens on an ipc socket in a temporary folder
# and is stopped when the script ends.
set -eu

cd "$(dirname "$0")"
src=$(pwd)

PACKAGES="build-essential autoconf automake libtool pkg-config libzmq3-dev libjansson-dev \
libpcre2-dev libutf8proc-dev libdnnl-dev libmicrohttpd-dev check libcurl4-openssl-dev"
# libxsmm (an optional attention backend) is packaged for x86-64 only.
[ "$(uname -m)" = x86_64 ] && PACKAGES="$PACKAGES libxsmm-dev"
# Only the tests need these: headless Chromium for the playground page test (large, so
# the demo does not install it), Python to drive it, and numpy for the GGUF export test.
TEST_PACKAGES="chromium chromium-driver python3 python3-numpy"

install_packages() {
    missing=""
    for p in $PACKAGES; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" \
            || missing="$missing $p"
    done
    [ -z "$missing" ] && return 0
    echo "quickstart: installing$missing"
    if [ "$(id -u)" -eq 0 ]; then sudo=""; else sudo="sudo"; fi
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq $missing >/dev/null
}

build() {
    [ -x configure ] || autoreconf -fi
    mkdir -p build
    cd build
    [ -f Makefile ] || ../configure --quiet
    make -j"$(nproc)" >/dev/null
    cd "$src"
}

run_demo() {
    prompt=${1:-"once upon a time, there was a little girl named lily. she"}
    tmp=$(mktemp -d)
    endpoint="ipc://$tmp/unmaskd.sock"
    build/unmaskd --model models/tinystories --plugin-dir build/build-plugins \
        --bind "$endpoint" --log-level warn &
    daemon=$!
    trap 'kill $daemon 2>/dev/null; wait $daemon 2>/dev/null; rm -rf "$tmp"' EXIT INT TERM
    i=0
    until build/unmask --connect "$endpoint" --timeout 1 --info >/dev/null 2>&1; do
        i=$((i + 1))
        if [ $i -ge 30 ] || ! kill -0 $daemon 2>/dev/null; then
            echo "quickstart: unmaskd did not start; its log is above" >&2
            exit 1
        fi
        sleep 1
    done
    # The bundled model takes about 10 ms a step; --step-delay slows the view to watch it.
    build/unmask --connect "$endpoint" --gen-length 96 --steps 96 --block-length 32 \
        --temperature 0.7 --seed 7 --step-delay 40 "$prompt"
}

if [ "${1:-}" = test ]; then
    PACKAGES="$PACKAGES $TEST_PACKAGES"
fi
install_packages
case "${1:-}" in
test)
    build
    cd build
    make -j"$(nproc)" check || { cat tests/check_unmaskd.log tests/browser/playground.log; exit 1; }
    # distcheck proves the tarball builds, installs and uninstalls; the full suite has
    # just run, so inside it only the quick daemon start-up test runs again.
    echo "quickstart: make distcheck (log in build/distcheck.log)"
    make -j"$(nproc)" distcheck TESTS=tests/model_faults.sh > distcheck.log 2>&1 ||
        { tail -50 distcheck.log; exit 1; }
    # Print the Check runner's summary last, so the end of the output shows the count.
    grep -h "Checks:" tests/check_unmaskd.log
    ;;
-h | --help)
    sed -n '2,10p' "$0"
    ;;
*)
    build
    run_demo "$@"
    ;;
esac
