#!/bin/sh
# The systemd unit contrib/unmaskd.service.in, filled in with this build's paths:
# systemd-analyze verify must accept it without a word (every key known, every command
# executable), and its offline security exposure must stay at 2.0 or below ("OK").
# Nothing is started. Skips (exit 77) where systemd-analyze is missing.
set -eu
: "${UM_TEST_SRCDIR:?run through make check}" "${UM_TEST_BUILDDIR:?}" "${UM_TEST_MODEL:?}"
: "${UM_TEST_PLUGINS:?}"

if ! command -v systemd-analyze > /dev/null 2>&1; then
    echo "systemd_unit: systemd-analyze not found (Debian package systemd), skipped"
    exit 77
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT INT TERM
unit="$tmp/unmaskd.service"
# systemd ignores paths with ".." in them, which a build in a subfolder passes here.
bindir=$(cd "$UM_TEST_BUILDDIR" && pwd -P)
modelsdir=$(cd "$UM_TEST_MODEL" && pwd -P)
pluginsdir=$(cd "$UM_TEST_PLUGINS" && pwd -P)
docdir=$(cd "$UM_TEST_SRCDIR/docs" && pwd -P)
sed -e "s|@bindir@|$bindir|g" -e "s|@modelsdir@|$modelsdir|g" \
    -e "s|@pluginsdir@|$pluginsdir|g" -e "s|@docdir@|$docdir|g" \
    "$UM_TEST_SRCDIR/contrib/unmaskd.service.in" > "$unit"

status=0
systemd-analyze verify "$unit" > "$tmp/verify.log" 2>&1 || status=$?
if [ "$status" -ne 0 ] || grep -q "unmaskd.service" "$tmp/verify.log"; then
    echo "systemd_unit: systemd-analyze verify failed (exit $status) or warned:" >&2
    cat "$tmp/verify.log" >&2
    exit 1
fi

# systemd-analyze security takes --offline and --threshold (the exposure times 10) in
# systemd 252, Debian 12's; where it lacks them, the unit is only verified.
if systemd-analyze security --help 2>&1 | grep -q -- "--offline"; then
    status=0
    systemd-analyze security --offline=yes --threshold=20 "$unit" > "$tmp/security.log" 2>&1 \
        || status=$?
    if [ "$status" -ne 0 ]; then
        echo "systemd_unit: the unit's exposure is above 2.0:" >&2
        cat "$tmp/security.log" >&2
        exit 1
    fi
    echo "systemd_unit: $(grep -o 'Overall exposure level.*' "$tmp/security.log")"
fi
echo "systemd_unit: systemd-analyze verify accepts the unit"
