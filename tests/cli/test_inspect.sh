#!/usr/bin/env bash
# hilal inspect: what it prints for real files, configuration fallbacks,
# error messages and exit codes. Expected values: see
# tests/pipeline/test_fits_edge.c and tests/stages/test_ingest.c (checked
# there against astropy).
set -u
exe=${HILAL_EXE:?run through ctest}
data=${HILAL_TESTDATA:?}
tmp=${HILAL_TMPDIR:?}
rm -rf "$tmp" && mkdir -p "$tmp"
export HOME="$tmp" XDG_CONFIG_HOME="$tmp/xdg"
unset HILAL_CONFIG
pass=0 fail=0
check() { # check DESCRIPTION EXIT-STATUS-OF-THE-CONDITION
  if [ "$2" -eq 0 ]; then pass=$((pass+1)); else fail=$((fail+1)); echo "FAIL: $1"; echo "$out"; fi
}
has() { printf '%s\n' "$out" | grep -qF -- "$1"; }
run() { out=$("$exe" "$@" 2>&1); rc=$?; }

edge=$data/fits_edge
ztf=$edge/ztf/ZTF18aaxjlwy_472263571115090000_science.fits
test0=$edge/astropy_io_fits/test0.fits

run inspect --help
check "inspect --help exits 0 (got $rc)" $rc
has "Usage: hilal inspect"; check "help has usage" $?
has "--hdu N"; check "help lists --hdu" $?

# A ZTF stamp: non-standard SIMPLE card, 1322 NaN pixels, no detector keys.
run inspect "$ztf"
check "ZTF stamp exits 0 (got $rc)" $rc
has "file:        $ztf"; check "file line" $?
has "size:        63 x 63 px (file 20160 bytes)"; check "size line" $?
has "bitpix:      -32 (BSCALE 1, BZERO 0)"; check "bitpix line" $?
has "sha256:      64cc4c21ce3e1433776ad2ade277937111cc7de6b91fe666e8023806c49c85df"; check "sha256" $?
has "gain:        unknown (no GAIN keyword and ingest.gain not set: a run stops here)"; check "gain unknown" $?
has "masked:      1322 of 3969 px"; check "masked total" $?
printf '%s\n' "$out" | grep -Eq "^  NODATA +1322$"; check "NODATA count" $?
printf '%s\n' "$out" | grep -Eq "^  SAT +0$"; check "SAT count" $?
has "wcs:         none"; check "no WCS" $?
# astropy: min 178.996063, median 198.034088, max 222.367157 of 2647 pixels
has "pixels:      min 178.99606, median 198.03409, max 222.36716 ADU (2647 unmasked px)"
check "pixel statistics" $?

# Configuration fallbacks apply, after the command name too.
run inspect --set ingest.gain=6.2 --set ingest.rdnoise=8 --set ingest.saturate=220 "$ztf"
check "with --set exits 0 (got $rc)" $rc
has "gain:        6.2 e-/ADU (ingest.gain)"; check "gain from config" $?
has "rdnoise:     8 e- (ingest.rdnoise)"; check "rdnoise from config" $?
printf '%s\n' "$out" | grep -Eq "^  SAT +1$"; check "one pixel >= 220" $?

# A multi-extension HST file: keywords from the primary header, a chosen HDU.
run inspect --set ingest.key_gain=ATODGAIN --hdu 4 "$test0"
check "test0 --hdu 4 exits 0 (got $rc)" $rc
has "hdu:         4"; check "HDU 4" $?
has "gain:        7 e-/ADU (header ATODGAIN (primary HDU))"; check "ATODGAIN from primary" $?
has "saturation:  4095 ADU (header SATURATE (primary HDU))"; check "SATURATE from primary" $?
has "exptime:     0.23 s (header EXPTIME (primary HDU))"; check "EXPTIME" $?
has "(header DATE-OBS (primary HDU) + header TIME-OBS (primary HDU) + EXPTIME/2)"; check "MJD source" $?
has "mjd:         49491.653659 (header DATE-OBS"; check "MJD = DATE-OBS + TIME-OBS + EXPTIME/2" $?
has "wcs:         RA---TAN"; check "WCS described" $?
has "pixels:      min 306, median"; check "HDU 4 statistics" $?
run inspect "$test0[3]"
has "hdu:         4"; check "extended syntax [3] is HDU 4" $?

# Several files, one of them bad: all are reported, exit code of the failure.
printf 'not a FITS file\n' > "$tmp/notes.fits"
run inspect "$ztf" "$tmp/notes.fits" "$edge/astropy_compressed/m13_rice.fits"
[ "$rc" -eq 5 ]; check "bad file exits 5 (got $rc)" $?
has "hilal: format error: $tmp/notes.fits is not a FITS file"; check "bad file message" $?
has "size:        300 x 300 px"; check "file after the bad one still inspected" $?
run inspect "$tmp/missing.fits"
[ "$rc" -eq 5 ]; check "missing file exits 5 (got $rc)" $?
has "hilal: i/o error: $tmp/missing.fits: cannot open: No such file or directory"; check "missing file message" $?
run inspect "$edge/astropy_io_fits/btable.fits"
[ "$rc" -eq 5 ]; check "table-only file exits 5 (got $rc)" $?
has "has no image HDU with data (HDU 1 is empty (NAXIS = 0), HDU 2 is a binary table)"; check "table-only message" $?

# Usage and configuration errors.
run inspect
[ "$rc" -eq 2 ]; check "no file exits 2 (got $rc)" $?
run inspect --hdu x "$ztf"
[ "$rc" -eq 2 ]; check "bad --hdu exits 2 (got $rc)" $?
run inspect --frobnicate "$ztf"
[ "$rc" -eq 2 ]; check "unknown option exits 2 (got $rc)" $?
run inspect --set ingest.gain=-1 "$ztf"
[ "$rc" -eq 3 ]; check "out-of-range gain exits 3 (got $rc)" $?

echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ] && [ "$pass" -gt 0 ]
