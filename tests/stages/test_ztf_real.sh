#!/usr/bin/env bash
# The whole chain (`hilal run`) on real ZTF alert cutouts (testdata/ztf/,
# provenance in testdata/README.md, results in docs/ztf.md).
#
# Configuration: testdata/ztf/ztf_stamps.conf (gain 6.2 e-/ADU, read noise
# 8 e-, one zero point for both images so the fluxscale fallback gives a
# ratio of 1, 16 px background meshes, stars at 3 sigma for the PSF fallback,
# align.prealigned = true because the cutouts are already on one grid and have
# no WCS, with an assumed registration RMS of 0.05 px).
#
# Asserted, per testdata/ztf/expected.txt (positions from the ZTF candidate
# xpos/ypos mapped into the stamp):
#  - real detections: a candidate within 2 px of the catalogued position whose
#    S_corr sign is the one of isdiffpos (t: > 0, f: < 0), and the strongest
#    |S_corr| candidate of the stamp is that one;
#  - truncated stamps / NaN regions ("edge"): the run completes, every
#    candidate lies inside the stamp and the catalogued candidate is
#    recovered with its sign; ("error"): the run stops with exit status 4 and
#    a message that names the stage and the science file;
#  - a stamp too starless for the default star threshold stops with a message
#    that names the science file; a stamp without GAIN and no ingest.gain
#    stops with a message naming the file and the fix.
set -u
exe=${HILAL_EXE:?run through ctest}
data=${HILAL_TESTDATA:?}
tmp=${HILAL_TMPDIR:?}
rm -rf "$tmp" && mkdir -p "$tmp"
export HOME="$tmp" XDG_CONFIG_HOME="$tmp/xdg"
unset HILAL_CONFIG
ztf=$data/ztf
conf=$ztf/ztf_stamps.conf
pass=0 fail=0
check() { # check DESCRIPTION EXIT-STATUS-OF-THE-CONDITION
  if [ "$2" -eq 0 ]; then pass=$((pass+1)); else fail=$((fail+1)); echo "FAIL: $1"; echo "$out"; fi
}
has() { printf '%s\n' "$out" | grep -qF -- "$1"; }

# Stamp size NAXIS1 NAXIS2 from the FITS header (80-character cards).
naxis() { # naxis FILE KEY
  head -c 2880 "$1" | fold -w 80 | awk -v k="$2" '$1 == k { print $3; exit }'
}

while read -r folder ex ey sign class; do
  case $folder in ''|'#'*) continue ;; esac
  sci=$ztf/$folder/science.fits
  ref=$ztf/$folder/template.fits
  h5=$tmp/$folder.h5
  out=$("$exe" -q run --config "$conf" --science "$sci" --reference "$ref" --archive "$h5" 2>&1)
  rc=$?
  if [ "$class" = error ]; then
    [ $rc -eq 4 ]; check "$folder: stops with exit 4 (got $rc)" $?
    has "stage psf"; check "$folder: message names the stage" $?
    has "$sci"; check "$folder: message names the science file" $?
    echo "$folder: $out"
    continue
  fi
  check "$folder: run exits 0 (got $rc)" $rc
  [ $rc -eq 0 ] || continue
  out=$("$exe" query "$h5" --format csv 2>&1)
  check "$folder: query exits 0" $?
  nx=$(naxis "$sci" NAXIS1)
  ny=$(naxis "$sci" NAXIS2)
  # Every candidate finite and inside the stamp.
  printf '%s\n' "$out" | awk -F, -v nx="$nx" -v ny="$ny" 'NR > 1 {
      if (!($3 >= 0.5 && $3 <= nx + 0.5 && $4 >= 0.5 && $4 <= ny + 0.5)) bad++ }
      END { exit bad > 0 }'
  check "$folder: all candidates inside the ${nx}x${ny} stamp" $?
  # The nearest candidate of the right sign within 2 px.
  best=$(printf '%s\n' "$out" | awk -F, -v x="$ex" -v y="$ey" -v s="$sign" 'NR > 1 {
      if ((s == "t" && $7 <= 0) || (s == "f" && $7 >= 0)) next
      d = sqrt(($3 - x)^2 + ($4 - y)^2)
      if (best == "" || d < best) { best = d; line = sprintf("%.2f px, S/N %.1f at (%.2f, %.2f)", d, $7, $3, $4) } }
      END { if (best != "" && best <= 2.0) { print line; exit 0 } exit 1 }')
  check "$folder ($class): candidate within 2 px of ($ex, $ey) with isdiffpos=$sign" $?
  echo "$folder: $best"
  if [ "$class" = real ]; then
    # ... and it is the most significant candidate of the stamp.
    printf '%s\n' "$out" | awk -F, -v x="$ex" -v y="$ey" 'NR > 1 {
        a = ($7 < 0 ? -$7 : $7); if (a > top) { top = a; d = sqrt(($3 - x)^2 + ($4 - y)^2) } }
        END { exit !(top > 0 && d <= 2.0) }'
    check "$folder: the catalogued candidate is the strongest of the stamp" $?
  fi
done < "$ztf/expected.txt"

# The sign convention holds where the catalogued candidate is fading: no
# brightening candidate within 2 px of it (isdiffpos f, real).
h5=$tmp/ZTF18aaxjdyr_1661382530015060001.h5
out=$("$exe" query "$h5" --sign pos --format csv 2>&1)
printf '%s\n' "$out" | awk -F, 'NR > 1 && sqrt(($3 - 31.8)^2 + ($4 - 31.74)^2) <= 2 { n++ } END { exit n > 0 }'
check "ZTF18aaxjdyr: no positive candidate at the fading variable" $?

# Default star threshold (5 sigma): the asteroid stamp has no star with a
# measurable FWHM; the PSF stage says so and names the science file.
f=ZTF18aagqxtg_396522680015025001
out=$("$exe" run --config "$conf" --set stars.thresh_sigma=5 --science "$ztf/$f/science.fits" \
      --reference "$ztf/$f/template.fits" --archive "$tmp/err.h5" 2>&1)
rc=$?
[ $rc -eq 4 ]; check "starless stamp: exit 4 (got $rc)" $?
has "stage psf"; check "starless stamp: names the stage" $?
has "$ztf/$f/science.fits"; check "starless stamp: names the science file" $?
has "lower stars.thresh_sigma"; check "starless stamp: says what to do" $?

# No GAIN keyword and no ingest.gain: stopped before any processing.
f=ZTF18aaxjlwy_472263571115090000
out=$("$exe" run --set align.prealigned=true --science "$ztf/$f/science.fits" \
      --reference "$ztf/$f/template.fits" --archive "$tmp/err2.h5" 2>&1)
rc=$?
[ $rc -ne 0 ]; check "no gain: fails (got $rc)" $?
has "$ztf/$f/science.fits"; check "no gain: names the science file" $?
has "ingest.gain"; check "no gain: names the setting" $?

echo "test_ztf_real: $pass passed, $fail failed"
[ "$fail" -eq 0 ]
