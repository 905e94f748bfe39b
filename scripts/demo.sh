#!/usr/bin/env bash
# Installs what is missing, builds Hilal and runs the main job on simulated
# data: a small night (two fields of three 1024 x 1024 frames each, a frame
# of a third field, and a reference library with one reference per field)
# processed by `hilal night` with two workers into one archive, followed by
# the night's summary, its most significant candidates and a rerun that
# finds nothing left to do.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$here/scripts/bootstrap.sh" "$here/build"
hilal="$here/build/hilal"
out=${HILAL_DEMO_DIR:-$here/out/demo}
rm -rf "$out" && mkdir -p "$out/night" "$out/refs" "$out/sim"

echo "== simulating a night: fields A and B (3 frames each, offset pointings) and a frame of field C"
for k in 1 2 3; do
  "$hilal" -q simulate --out "$out/sim/A$k" --size 1024 --seed 7 --center 150,2.2 \
    --offset-px "$((2 * k - 4)).5,$((3 - k)).25" --mjd-sci "60300.$((k + 1))" --object FIELD-A
  "$hilal" -q simulate --out "$out/sim/B$k" --size 1024 --seed 8 --center 151,2.5 \
    --offset-px "$((k - 2)).75,$((k - 3)).5" --mjd-sci "60300.$((k + 1))" --object FIELD-B
  cp "$out/sim/A$k/sci.fits" "$out/night/A$k.fits"
  cp "$out/sim/B$k/sci.fits" "$out/night/B$k.fits"
done
"$hilal" -q simulate --out "$out/sim/C" --size 1024 --seed 9 --center 200,-20 --object FIELD-C
cp "$out/sim/C/sci.fits" "$out/night/C1.fits"
echo "== the reference library: one deep reference per field (none for field C)"
cp "$out/sim/A1/ref.fits" "$out/refs/field-A.fits"
cp "$out/sim/B1/ref.fits" "$out/refs/field-B.fits"
ls "$out/night" "$out/refs"

echo "== the night: hilal night night/ --references refs/ --archive night.h5 --workers 2"
"$hilal" night "$out/night" --references "$out/refs" --archive "$out/night.h5" --workers 2
echo "== candidates with S/N >= 8 and real/bogus score >= 0.5 (first ten)"
"$hilal" query "$out/night.h5" --snr-min 8 --rb-min 0.5 --format table > "$out/candidates.txt"
head -n 11 "$out/candidates.txt"
echo "== the same command again: every frame is already in the archive"
"$hilal" night "$out/night" --references "$out/refs" --archive "$out/night.h5" --workers 2 \
  > "$out/rerun.txt" 2>/dev/null
head -n 1 "$out/rerun.txt"
"$hilal" info "$out/night.h5" | sed -n '1,8p'
echo "== the run report: $(ls "$out"/night.run*.report.json)"
