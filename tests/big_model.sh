#!/bin/sh
# LLaDA-8B within 24 GB: write a random-weight checkpoint of LLaDA-8B's exact shapes in
# bf16 (16 GB, four shards) with tools/make_bench_model.py, start the real daemon on it,
# generate through the real client, and check the daemon's peak resident memory.
# Prints load time, peak memory and seconds per step. Run by `make check-big` (CI runs
# it; it is not part of make check). Exits 77 (skip) without the room it needs.
set -eu
: "${UM_TEST_DAEMON:?run through make check-big}" "${UM_TEST_CLIENT:?}" "${UM_TEST_PLUGINS:?}"
: "${UM_TEST_TOOLS:?}"
limit_mb=24576

tmp=$(mktemp -d "${TMPDIR:-/tmp}/um-big-XXXXXX")
daemon=""
cleanup() {
    [ -n "$daemon" ] && kill "$daemon" 2>/dev/null && wait "$daemon" 2>/dev/null
    rm -rf "$tmp"
}
trap cleanup EXIT INT TERM

free_disk_mb=$(df -Pm "$tmp" | awk 'NR == 2 {print $4}')
avail_mem_mb=$(awk '/^MemAvailable:/ {print int($2 / 1024)}' /proc/meminfo)
if [ "$free_disk_mb" -lt 17500 ] || [ "$avail_mem_mb" -lt 18000 ]; then
    echo "big_model: skipping: needs 17.5 GB free in $tmp (has $free_disk_mb MB) and 18 GB" \
         "of available memory (has $avail_mem_mb MB)"
    exit 77
fi
if ! /usr/bin/python3 -c 'import numpy' 2>/dev/null; then
    echo "big_model: python3-numpy is missing: apt-get install python3-numpy" >&2
    exit 1
fi

start=$(date +%s)
/usr/bin/python3 "$UM_TEST_TOOLS/make_bench_model.py" --size 8b --out "$tmp/8b" --shards 4
echo "big_model: wrote the checkpoint in $(( $(date +%s) - start )) s"

endpoint="ipc://$tmp/unmaskd.sock"
t0=$(date +%s%N)
"$UM_TEST_DAEMON" --model "$tmp/8b" --plugin-dir "$UM_TEST_PLUGINS" --bind "$endpoint" \
    --weight-dtype bf16 --log-level info 2>"$tmp/daemon.log" &
daemon=$!
i=0
until "$UM_TEST_CLIENT" --connect "$endpoint" --timeout 2 --info >/dev/null 2>&1; do
    i=$((i + 1))
    if [ $i -ge 300 ] || ! kill -0 "$daemon" 2>/dev/null; then
        echo "big_model: unmaskd did not start:" >&2
        cat "$tmp/daemon.log" >&2
        exit 1
    fi
    sleep 1
done
load_ms=$(( ($(date +%s%N) - t0) / 1000000 ))

"$UM_TEST_CLIENT" --connect "$endpoint" --json --no-live --timeout 1200 --gen-length 8 \
    --steps 4 --block-length 8 --temperature 0 "once upon a time" > "$tmp/reply.json"
peak_mb=$(awk '/^VmHWM:/ {print int($2 / 1024)}' "/proc/$daemon/status")
ms_per_step=$(sed -n 's/.*"ms_per_step":\([0-9.]*\).*/\1/p' "$tmp/reply.json")
grep -h "bound" "$tmp/daemon.log" | sed 's/^.*model: /big_model: daemon: /'

echo "big_model: load $load_ms ms (until the daemon answers), peak resident memory" \
     "$peak_mb MB, $ms_per_step ms per denoising step (12 positions)"
if ! grep -q '"type":"done"' "$tmp/reply.json"; then
    echo "big_model: the generation failed:" >&2
    cat "$tmp/reply.json" "$tmp/daemon.log" >&2
    exit 1
fi
if [ "$peak_mb" -ge "$limit_mb" ]; then
    echo "big_model: peak resident memory $peak_mb MB is over the $limit_mb MB bound" >&2
    exit 1
fi
echo "big_model: within the $limit_mb MB bound"
