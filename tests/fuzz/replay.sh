#!/bin/sh
# make check: replay each fuzz target's regression inputs and seed corpus once, with no
# fuzzing (tests/fuzz/run.sh 0). See docs/testing.md.
exec "$(dirname "$0")/run.sh" 0
