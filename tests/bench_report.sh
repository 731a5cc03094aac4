#!/bin/sh
# unmask-bench end to end in its quickest mode on the bundled model. Every part runs:
# kernels, forward, step, techniques, and serve through a real daemon on an ipc endpoint. The report
# must pass the schema check, and a few figures must hold whatever the machine's speed.
# The PyTorch peer is left out to keep the test short (docs/benchmarks.md shows it run by
# hand). With matplotlib installed, bench/compare must turn the report into a table and
# plots. make check sets the UM_TEST_* variables.
set -eu

fail() {
    echo "bench_report: FAIL: $*" >&2
    exit 1
}

: "${UM_TEST_BUILDDIR:?run through make check}" "${UM_TEST_SRCDIR:?}"
# unmask-bench and bench/compare run with Debian's Python, where python3-torch and
# python3-matplotlib install.
if [ ! -x /usr/bin/python3 ]; then
    echo "bench_report: /usr/bin/python3 not found, skipped"
    exit 77
fi

tmp=$(mktemp -d /tmp/unmaskd-bench-report-XXXXXX)
trap 'rm -rf "$tmp"' EXIT INT TERM
report=$tmp/report.json
bench=$UM_TEST_BUILDDIR/bench/unmask-bench

# One thread, so that other work on the machine cannot stall an OpenMP barrier, and few
# tokens and steps.
status=0
"$bench" --quick --threads 1 --torch no --gen-length 16 --steps 8 --block-length 16 \
    --repeat 2 --requests 4 --clients 2 --batch 2 --label "make check" --out "$report" \
    >"$tmp/out.txt" 2>"$tmp/err.txt" || status=$?
if [ "$status" -ne 0 ]; then
    cat "$tmp/out.txt" "$tmp/err.txt" >&2
    fail "unmask-bench exited with status $status"
fi
"$bench" --check "$report" || fail "the report does not match the schema"

# Figures that hold on any machine: every part ran, every request finished, and with
# low_confidence at 8 steps for 16 tokens each forward pass commits two tokens.
/usr/bin/python3 - "$report" <<'PY' || fail "the report's figures are wrong (see above)"
import json, sys
r = json.load(open(sys.argv[1]))
problems = []
for name in ("kernels", "forward", "step", "techniques", "serve"):
    if r["parts"][name]["status"] != "ok":
        problems.append(f"part {name}: {r['parts'][name]['status']}: {r['parts'][name]['reason']}")
if not problems:
    serve = r["parts"]["serve"]["result"]
    if serve["done"] != 4 or serve["errors"] != 0 or serve["clients"] != 2:
        problems.append(f"serve: {serve['done']} done, {serve['errors']} errors, "
                        f"{serve['clients']} clients; expected 4, 0 and 2")
    if abs(serve["forward_passes_per_token"] - 0.5) > 1e-9:
        problems.append(f"serve: {serve['forward_passes_per_token']} forward passes per "
                        "token, expected 0.5 (8 steps for 16 tokens)")
    lat = serve["latency_ms"]
    if not 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]:
        problems.append(f"serve: latency percentiles out of order: {lat}")
    if r["parts"]["step"]["result"]["forward_passes"] != 8:
        problems.append("step: expected 8 forward passes per generation")
    # Every variant runs; those that must not change the output give the plain path's
    # tokens, and only an early stop may save passes.
    tech = r["summary"]["techniques"]
    names = ["plain", "rows", "early_stop", "prefix", "dual", "int8", "batch", "all_alone",
             "all"]
    if list(tech) != names or r["parts"]["techniques"]["result"]["batch"] != 2:
        problems.append(f"techniques: variants {list(tech)}, expected {names} in batches of 2")
    else:
        for name in ("plain", "rows", "batch"):
            if tech[name]["tokens_equal_to_plain"] != 16:
                problems.append(f"techniques: {name} gave {tech[name]['tokens_equal_to_plain']} "
                                "of 16 tokens equal to the plain path's")
        for name, v in tech.items():
            stops = name in ("early_stop", "all_alone", "all")
            if v["forward_passes"] > 8 or (not stops and v["forward_passes"] != 8):
                problems.append(f"techniques: {name} ran {v['forward_passes']} passes of 8")
    if r["engine"]["isa"] not in r["parts"]["kernels"]["isas"] and r["engine"]["isa"] != "amx":
        problems.append(f"kernels: the selected ISA {r['engine']['isa']} was not timed")
    if r["settings"]["threads_effective"] != 1:
        problems.append("settings: --threads 1 did not reach the engine")
if r["label"] != "make check" or r["peers"]["pytorch"]["status"] != "skipped":
    problems.append("label or PyTorch peer status not as requested")
for p in problems:
    print("bench_report:", p, file=sys.stderr)
sys.exit(1 if problems else 0)
PY

# A report with a field of the wrong type must fail the check.
/usr/bin/python3 -c '
import json, sys
r = json.load(open(sys.argv[1]))
r["summary"] = []
r["parts"]["serve"]["result"]["latency_ms"]["p99"] = "slow"
json.dump(r, open(sys.argv[2], "w"))' "$report" "$tmp/broken.json"
if "$bench" --check "$tmp/broken.json" >"$tmp/check.txt" 2>&1; then
    fail "--check accepted a report with a string latency"
fi
grep -q "latency_ms.p99" "$tmp/check.txt" ||
    fail "--check did not name the bad field: $(cat "$tmp/check.txt")"

if /usr/bin/python3 -c 'import matplotlib' 2>/dev/null; then
    "$UM_TEST_SRCDIR/bench/compare" --out-dir "$tmp/compare" "$report" >/dev/null 2>&1 ||
        fail "bench/compare failed on the report"
    for f in compare.md tokens_per_second.png ms_per_step.png forward_ops.png; do
        test -s "$tmp/compare/$f" || fail "bench/compare wrote no $f"
    done
else
    echo "bench_report: matplotlib not installed, bench/compare not checked"
fi
seconds=$(/usr/bin/python3 -c \
    'import json, sys; print(json.load(open(sys.argv[1]))["duration_s"])' "$report")
echo "bench_report: ok ($seconds s of benchmarks)"
