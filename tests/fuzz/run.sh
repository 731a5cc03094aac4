#!/bin/sh
# Run the fuzz targets of tests/fuzz (docs/testing.md).
#
#   tests/fuzz/run.sh SECONDS [TARGET...]
#
# For each target (every one by default) this first replays the regression inputs in
# regress/TARGET and the seed corpus in corpus/TARGET. When SECONDS is above 0 it then
# fuzzes the target with libFuzzer for SECONDS, one process on one core. New inputs go
# to $UM_FUZZ_WORK/corpus/TARGET, never into the source tree. A finding (a crash, a
# sanitizer report, a leak, a timeout or running out of memory) fails the run, and its
# reproducer is printed: run the target program on that file to see it again.
#
#   UM_FUZZ_BIN   folder of the fuzz_* programs (default: tests/fuzz below
#                 $UM_TEST_BUILDDIR, else below the current folder)
#   UM_FUZZ_WORK  folder for logs, new corpus entries and findings
#                 (default: $UM_FUZZ_BIN/work)
#   UM_FUZZ_TIMEOUT  seconds one input may take before it counts as a finding (10)
#
# Exits 0 when every target passed, 1 when any failed, 2 on a usage error.
set -u

usage() {
    echo "usage: $0 SECONDS [TARGET...]" >&2
    exit 2
}
[ $# -ge 1 ] || usage
seconds=$1
shift
case $seconds in '' | *[!0-9]*) usage ;; esac

src=$(cd "$(dirname "$0")" && pwd)
bin=${UM_FUZZ_BIN:-${UM_TEST_BUILDDIR:-.}/tests/fuzz}
work=${UM_FUZZ_WORK:-$bin/work}
timeout=${UM_FUZZ_TIMEOUT:-10}
UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1}
export UBSAN_OPTIONS

targets=${*:-"request safetensors config bpe_load bpe_encode bpe_decode wordpiece_vocab
wordpiece_json wordpiece_encode wordpiece_decode spm_load spm_encode spm_decode"}

# The dictionary of a target, if it has one.
dict_of() {
    case $1 in
    request) echo "$src/dict/request.dict" ;;
    config) echo "$src/dict/config.dict" ;;
    safetensors) echo "$src/dict/safetensors.dict" ;;
    bpe_load | wordpiece_json) echo "$src/dict/tokenizer_json.dict" ;;
    spm_load) echo "$src/dict/spm.dict" ;;
    *_encode) echo "$src/dict/text.dict" ;;
    esac
}

# Print the input a failed replay was running: the last "Running:" line of its log.
last_input() {
    sed -n 's/^Running: //p' "$1" | tail -n 1
}

failed=""
mkdir -p "$work" || exit 1
for t in $targets; do
    prog=$bin/fuzz_$t
    if [ ! -x "$prog" ]; then
        echo "fuzz: $prog not found: build the targets (make, or make check without --enable-fuzz)" >&2
        failed="$failed $t"
        continue
    fi
    log=$work/$t.log
    mkdir -p "$work/corpus/$t" "$work/findings/$t"

    # 1. Regression inputs first, then the seeds: every file once.
    set --
    for d in "$src/regress/$t" "$src/corpus/$t"; do
        for f in "$d"/*; do
            [ -f "$f" ] && set -- "$@" "$f"
        done
    done
    start=$(date +%s)
    if ! "$prog" "$@" > "$log" 2>&1; then
        echo "FAIL $t: replay failed on $(last_input "$log"); see $log" >&2
        echo "     reproduce with: $prog $(last_input "$log")" >&2
        failed="$failed $t"
        continue
    fi
    n=$(grep -c '^Running: ' "$log")
    if [ "$seconds" -eq 0 ]; then
        echo "PASS $t: replayed $n inputs in $(($(date +%s) - start)) s"
        continue
    fi

    # 2. Fuzz for the given time.
    dict=$(dict_of "$t")
    set -- -max_total_time="$seconds" -timeout="$timeout" -rss_limit_mb=2048 \
        -print_final_stats=1 -artifact_prefix="$work/findings/$t/"
    [ -n "$dict" ] && [ -f "$dict" ] && set -- "$@" -dict="$dict"
    set -- "$@" "$work/corpus/$t" "$src/corpus/$t"
    [ -d "$src/regress/$t" ] && set -- "$@" "$src/regress/$t"
    if ! "$prog" "$@" >> "$log" 2>&1; then
        artifact=$(sed -n 's/.*Test unit written to \([^ ]*\).*/\1/p' "$log" | tail -n 1)
        echo "FAIL $t: finding after $(($(date +%s) - start)) s: ${artifact:-see the log}; log $log" >&2
        [ -n "$artifact" ] && echo "     reproduce with: $prog $artifact" >&2
        failed="$failed $t"
        continue
    fi
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    cov=$(grep -o 'cov: [0-9]*' "$log" | tail -n 1)
    echo "PASS $t: replayed $n inputs, then $runs runs in $(($(date +%s) - start)) s ($cov)"
done

if [ -n "$failed" ]; then
    echo "fuzz: failed:$failed" >&2
    exit 1
fi
exit 0
