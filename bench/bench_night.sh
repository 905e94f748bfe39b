#!/usr/bin/env bash
# Frames per minute of `hilal night` on 2048 x 2048 frames: two fields of
# three simulated frames each (a reference per field), processed with 1 and
# then 2 workers (pipeline.threads = 0: cores / workers FFT threads each).
# Prints each night's summary line and the peak resident memory.
# Usage: bench/bench_night.sh [BUILD_DIR] [WORK_DIR]
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
hilal=${1:-$here/build}/hilal
work=${2:-$(mktemp -d)}
size=${HILAL_BENCH_SIZE:-2048}
mkdir -p "$work/night" "$work/refs"
for k in 1 2 3; do
  "$hilal" -q simulate --out "$work/sim/A$k" --size "$size" --seed 7 --center 150,2.2 \
    --offset-px "$((2 * k - 4)).5,$((3 - k)).25" --mjd-sci "60300.$k" --object FIELD-A
  "$hilal" -q simulate --out "$work/sim/B$k" --size "$size" --seed 8 --center 151,2.5 \
    --offset-px "$((k - 2)).75,$((k - 3)).5" --mjd-sci "60300.$k" --object FIELD-B
  cp "$work/sim/A$k/sci.fits" "$work/night/A$k.fits"
  cp "$work/sim/B$k/sci.fits" "$work/night/B$k.fits"
done
cp "$work/sim/A1/ref.fits" "$work/refs/A.fits"
cp "$work/sim/B1/ref.fits" "$work/refs/B.fits"
echo "$(nproc) cores; load average $(cut -d' ' -f1-3 /proc/loadavg)"
for w in 1 2; do
  rm -f "$work/w$w.h5"
  echo "== hilal night $work/night --references $work/refs --archive $work/w$w.h5 --workers $w"
  /usr/bin/time -f "peak resident memory: %M kB" \
    "$hilal" night "$work/night" --references "$work/refs" --archive "$work/w$w.h5" --workers "$w" \
    2>&1 | grep -E "frames/min|stage time|peak resident"
done
