#!/bin/sh
# The plugin SDK end to end. Install the SDK (headers and pkg-config file) into a
# staging folder and build the example policy out of tree with only
# `cc -shared $(pkg-config --cflags unmaskd-plugin)`. Then drop it into the plugin
# folder of a daemon that is already serving, and select it by name from the unmask
# client. The daemon is neither rebuilt nor restarted. make check sets UM_TEST_*.
set -eu

fail() {
    echo "sdk_test: FAIL: $*" >&2
    exit 1
}

for v in UM_TEST_BUILDDIR UM_TEST_SRCDIR UM_TEST_PKGCONFIGDIR UM_TEST_DAEMON UM_TEST_CLIENT \
         UM_TEST_MODEL UM_TEST_PLUGINS; do
    eval "test -n \"\${$v:-}\"" || fail "$v is not set: run the tests with make check"
done

tmp=$(mktemp -d /tmp/unmaskd-sdk-XXXXXX)
pid=
cleanup() {
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid"
        wait "$pid" 2>/dev/null || true
    fi
    rm -rf "$tmp"
}
trap cleanup EXIT INT TERM

# 1. Install only the SDK, as `make install` would, into a staging root.
${MAKE:-make} -s -C "$UM_TEST_BUILDDIR" install-unmaskdincludeHEADERS install-pkgconfigDATA \
    DESTDIR="$tmp/root" >"$tmp/install.log" 2>&1 || { cat "$tmp/install.log" >&2; fail "SDK install"; }
test -f "$tmp/root$UM_TEST_PKGCONFIGDIR/unmaskd-plugin.pc" || fail "no unmaskd-plugin.pc installed"

# 2. Build the example out of tree: a copy of its source, the installed headers only.
mkdir -p "$tmp/src" "$tmp/plugins"
cp "$UM_TEST_SRCDIR/examples/plugins/left_to_right.c" "$tmp/src/"
cflags=$(PKG_CONFIG_PATH="$tmp/root$UM_TEST_PKGCONFIGDIR" PKG_CONFIG_SYSROOT_DIR="$tmp/root" \
         pkg-config --cflags unmaskd-plugin) || fail "pkg-config --cflags unmaskd-plugin"
case "$cflags" in
    *"$tmp/root"*) ;;
    *) fail "pkg-config gave \"$cflags\", not the staged include folder" ;;
esac
(cd "$tmp/src" && ${CC:-cc} -shared -fPIC -fvisibility=hidden -Wall -Wextra -Wno-unused-parameter -Werror $cflags \
    left_to_right.c -o left_to_right.so) || fail "the example does not build against the SDK"
exports=$(nm -D --defined-only "$tmp/src/left_to_right.so" | awk '$2 == "T" { print $3 }')
test "$exports" = "um_plugin_describe" || fail "the example exports \"$exports\""

# 3. Start a daemon whose plugin folders are the bundled plugins and an empty folder.
endpoint="ipc://$tmp/unmaskd.sock"
"$UM_TEST_DAEMON" --model "$UM_TEST_MODEL" --plugin-dir "$UM_TEST_PLUGINS" \
    --plugin-dir "$tmp/plugins" --bind "$endpoint" --threads 1 --log-level info \
    2>"$tmp/daemon.log" &
pid=$!
tries=0
until "$UM_TEST_CLIENT" --connect "$endpoint" --info --json --timeout 1 >"$tmp/info.json" 2>/dev/null; do
    tries=$((tries + 1))
    kill -0 "$pid" 2>/dev/null || { cat "$tmp/daemon.log" >&2; fail "the daemon exited"; }
    test "$tries" -lt 60 || fail "the daemon did not answer info within 60 tries"
done

# 4. Before the drop the name is unknown.
if "$UM_TEST_CLIENT" --connect "$endpoint" --plain --remasking left_to_right --gen-length 4 \
    "once" >/dev/null 2>"$tmp/before.err"; then
    fail "left_to_right was selectable before it was installed"
fi
grep -q unknown_plugin "$tmp/before.err" || fail "expected unknown_plugin, got: $(cat "$tmp/before.err")"

# 5. Drop the plugin in and select it by name, with a parameter.
cp "$tmp/src/left_to_right.so" "$tmp/plugins/"
"$UM_TEST_CLIENT" --connect "$endpoint" --json --remasking left_to_right --param lookahead=0 \
    --gen-length 8 --steps 8 --seed 1 "once upon a time" >"$tmp/reply.json" 2>"$tmp/reply.err" \
    || fail "generate with left_to_right failed: $(cat "$tmp/reply.err")"
grep -q '"type":"done"' "$tmp/reply.json" || fail "no done reply: $(cat "$tmp/reply.json")"
"$UM_TEST_CLIENT" --connect "$endpoint" --info --json >"$tmp/info.json" || fail "info"
grep -q '"name":"left_to_right"' "$tmp/info.json" || fail "info does not list left_to_right"
grep -q '"name":"lookahead"' "$tmp/info.json" || fail "info does not list lookahead"

# A parameter outside its range gets an error naming it.
if "$UM_TEST_CLIENT" --connect "$endpoint" --plain --remasking left_to_right \
    --param lookahead=-1 --gen-length 4 "once" >/dev/null 2>"$tmp/range.err"; then
    fail "lookahead -1 was accepted"
fi
grep -q "remasking_params.lookahead" "$tmp/range.err" || fail "error lacks the field: $(cat "$tmp/range.err")"

# 6. The same daemon process served it all.
kill -0 "$pid" 2>/dev/null || fail "the daemon is gone"
grep -q "loaded remask plugin left_to_right" "$tmp/daemon.log" || fail "the daemon did not log the load"
echo "sdk_test: PASS: built out of tree, loaded by a running daemon, selected by name"
