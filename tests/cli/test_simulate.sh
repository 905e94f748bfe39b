#!/usr/bin/env bash
# hilal simulate: help, files written, determinism, reproduction from
# README.txt, no-events pairs, 16-bit output, fitsverify, usage errors.
set -u
exe=${HILAL_EXE:?run through ctest}
tmp=${HILAL_TMPDIR:?}
rm -rf "$tmp" && mkdir -p "$tmp"
export HOME="$tmp" XDG_CONFIG_HOME="$tmp/xdg"
unset HILAL_CONFIG
pass=0 fail=0
check() { # check NAME STATUS
  if [ "$2" -eq 0 ]; then pass=$((pass+1)); else fail=$((fail+1)); echo "FAIL: $1"; fi
}
run() { out=$("$exe" "$@" 2>&1); rc=$?; }
same_dir() { # same_dir A B: every file of A identical in B
  local f ok=0
  for f in ref.fits sci.fits truth.csv stars.csv galaxies.csv README.txt; do
    cmp -s "$1/$f" "$2/$f" || { echo "  differs: $f"; ok=1; }
  done
  return $ok
}

# Help lists every option with its default.
run simulate --help; check "--help exits 0" $rc
for opt in --out --size --seed --bitpix --threads --pixscale --center --offset-px --rotate-deg \
           --psf --beta --fwhm-ref --fwhm-sci --psf-vary --psf-ellip --sky-sci --sky-ref \
           --sky-gradient --gain --rdnoise --saturate --bleed --no-bleed --exptime --ref-depth \
           --flux-ratio --zeropoint --mjd-ref --mjd-sci --filter --object --star-density \
           --mag-range --count-slope --galaxy-density --n-transients --snr-range --galaxy-frac \
           --n-variables --n-cosmics --bad-columns --no-events; do
  echo "$out" | grep -q -- "$opt "; check "--help lists $opt" $?
done
echo "$out" | grep -q "\[3.2\]" && echo "$out" | grep -q "\[0.8\]"; check "--help shows defaults" $?

# Files, counts and the summary line.
common=(--size 256 --n-transients 7 --n-variables 2 --n-cosmics 5 --bad-columns 1)
run simulate --out "$tmp/a" --seed 9 "${common[@]}"; check "simulate exits 0: $out" $rc
echo "$out" | grep -q "7 transients, 2 variables, 5 cosmics, 1 bad columns"; check "summary line: $out" $?
for f in ref.fits sci.fits truth.csv stars.csv galaxies.csv README.txt; do
  [ -s "$tmp/a/$f" ]; check "wrote $f" $?
done
[ "$(head -1 "$tmp/a/truth.csv")" = "id,type,x,y,ra,dec,diff_flux_adu,ideal_snr,on_galaxy,ref_flux_adu,sci_flux_adu,fwhm_px,extent_px,level_adu,star_id" ]
check "truth.csv header" $?
[ "$(tail -n +2 "$tmp/a/truth.csv" | wc -l)" -eq 15 ]; check "truth.csv has 15 rows" $?
counts=$(tail -n +2 "$tmp/a/truth.csv" | cut -d, -f2 | sort | uniq -c | awk '{printf "%s=%s ", $2, $1}')
[ "$counts" = "bad_column=1 cosmic=5 transient=7 variable=2 " ]; check "rows per type: $counts" $?
# Transient S/N within the default range, variables point at stars.csv rows.
awk -F, 'NR>1 && $2=="transient" && ($8 < 2.999 || $8 > 100.001) {bad=1} END {exit bad}' "$tmp/a/truth.csv"
check "transient ideal_snr in [3, 100]" $?
awk -F, 'NR>1 && $2=="variable" && $15 < 1 {bad=1} END {exit bad}' "$tmp/a/truth.csv"; check "variables have a star_id" $?

# Same seed: byte-identical; another seed: different pixels.
run simulate --out "$tmp/b" --seed 9 "${common[@]}"; check "second run" $rc
same_dir "$tmp/a" "$tmp/b"; check "same seed gives byte-identical files" $?
run simulate --out "$tmp/c" --seed 10 "${common[@]}"
cmp -s "$tmp/a/sci.fits" "$tmp/c/sci.fits"; [ $? -ne 0 ]; check "another seed gives other pixels" $?

# README.txt records the command that reproduces the files.
cmd=$(grep -A1 "^Reproduce with:" "$tmp/a/README.txt" | tail -1 | sed 's/^ *hilal //; s/ --out DIR$//')
eval "set -- $cmd"
run "$@" --out "$tmp/r"; check "README command runs: $cmd" $rc
same_dir "$tmp/a" "$tmp/r"; check "README command reproduces the files" $?

# A noise-only pair: same stars and reference, no events.
run simulate --out "$tmp/n" --seed 9 "${common[@]}" --no-events; check "--no-events exits 0" $rc
[ "$(wc -l < "$tmp/n/truth.csv")" -eq 1 ]; check "--no-events: truth.csv has only its header" $?
cmp -s "$tmp/a/ref.fits" "$tmp/n/ref.fits"; check "--no-events: same reference" $?
cmp -s "$tmp/a/stars.csv" "$tmp/n/stars.csv"; [ $? -ne 0 ]  # variables change flux_sci
check "--no-events: stars.csv differs only through the variables" $?
diff <(cut -d, -f1-9 "$tmp/a/stars.csv") <(cut -d, -f1-9 "$tmp/n/stars.csv") > /dev/null; check "--no-events: same star positions and reference fluxes" $?

# 16-bit output, offsets, rotation, Gaussian PSF with variation.
run simulate --out "$tmp/i" --size 200x160 --bitpix 16 --offset-px 12.5,-3 --rotate-deg 2 \
    --psf gaussian --psf-vary 0.2 --psf-ellip 0.1 --n-transients 3 --seed 3
check "16-bit, non-square, offset and rotated: $out" $rc
head -c 2880 "$tmp/i/sci.fits" | grep -q "BITPIX  =                   16" \
  && head -c 2880 "$tmp/i/sci.fits" | grep -q "BZERO   =                32768" \
  && head -c 2880 "$tmp/i/sci.fits" | grep -q "NAXIS1  =                  200" \
  && head -c 2880 "$tmp/i/sci.fits" | grep -q "NAXIS2  =                  160"
check "16-bit header and size" $?
head -c 5760 "$tmp/i/sci.fits" | grep -Eq "CRPIX1  = +113\. " && head -c 5760 "$tmp/i/sci.fits" | grep -Eq "CRPIX2  = +77\.5 "; check "science CRPIX1 shifted by the offset" $?

# fitsverify (CFITSIO's checker) on every file written.
if command -v fitsverify > /dev/null; then
  for f in "$tmp/a/ref.fits" "$tmp/a/sci.fits" "$tmp/i/ref.fits" "$tmp/i/sci.fits"; do
    v=$(fitsverify -q "$f" 2>&1); echo "$v" | grep -q "verification OK"; check "fitsverify $f: $v" $?
  done
else
  echo "fitsverify not installed: skipping the FITS conformance checks (apt-get install fitsverify)"
fi

# Usage errors: exit 2 naming the option; unwritable output: exit 5.
run simulate --size 256;                  [ $rc -eq 2 ]; check "missing --out -> 2 (got $rc)" $?
echo "$out" | grep -q -- "--out DIR is required"; check "missing --out message: $out" $?
run simulate --out "$tmp/x" --fwhm-sci -1; [ $rc -eq 2 ]; check "bad --fwhm-sci -> 2 (got $rc)" $?
echo "$out" | grep -q -- "--fwhm-sci = -1 is outside \[0.8, 30\]"; check "range message: $out" $?
run simulate --out "$tmp/x" --size 12x;   [ $rc -eq 2 ]; check "bad --size -> 2" $?
run simulate --out "$tmp/x" --psf airy;   [ $rc -eq 2 ]; check "bad --psf -> 2" $?
echo "$out" | grep -q "moffat or gaussian"; check "--psf message: $out" $?
run simulate --out "$tmp/x" --frobnicate 3; [ $rc -eq 2 ]; check "unknown option -> 2" $?
echo "$out" | grep -q "unknown option '--frobnicate'"; check "unknown option message: $out" $?
run simulate --out "$tmp/x" --seed;       [ $rc -eq 2 ]; check "option without value -> 2" $?
run simulate --out "$tmp/a/truth.csv" --size 64 --n-transients 1 --n-variables 0
[ $rc -eq 5 ]; check "output path is a file -> 5 (got $rc)" $?
echo "$out" | grep -q "truth.csv"; check "unwritable output message names the path: $out" $?

echo "$pass passed, $fail failed"
[ $fail -eq 0 ]
