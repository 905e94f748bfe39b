#!/usr/bin/env bash
# Detection quality on simulated 2048 x 2048 pairs that are not aligned and
# whose PSF varies across the field, against aligned pairs with a constant
# PSF from the same seeds: completeness at ideal S/N >= 8 and detections
# matching no injected event (all of them, and those with rb >= 0.5).
#   varying: --offset-px 20,0 --rotate-deg 0.3 --psf-vary 0.3
#   aligned: no offset, no rotation, constant PSF
# scripts/score_truth.py scores each archive (matching radius 2 px; cosmic
# rays and bad columns count as matched). Needs /usr/bin/python3 with h5py.
# Usage: bench/quality_vary.sh [BUILD_DIR] [WORK_DIR] [SEEDS...]
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
hilal=${1:-$here/build}/hilal
work=${2:-$(mktemp -d)}
shift $(($# > 2 ? 2 : $#))
seeds=${*:-5 6 7 8 9 10}
size=${HILAL_BENCH_SIZE:-2048}
declare -A n8 f8 nfalse nfalse_rb
for mode in aligned varying; do
  n8[$mode]=0; f8[$mode]=0; nfalse[$mode]=0; nfalse_rb[$mode]=0
done
for seed in $seeds; do
  for mode in aligned varying; do
    d=$work/$mode$seed
    opts=()
    [ "$mode" = varying ] && opts=(--offset-px 20,0 --rotate-deg 0.3 --psf-vary 0.3)
    rm -rf "$d"
    "$hilal" -q simulate --out "$d" --size "$size" --seed "$seed" "${opts[@]}"
    "$hilal" -q run --science "$d/sci.fits" --reference "$d/ref.fits" --archive "$d/a.h5"
    out=$(/usr/bin/python3 "$here/scripts/score_truth.py" "$d/a.h5" "$d/truth.csv")
    # "ideal S/N 8-20: k/n ..." and "ideal S/N 20+: k/n ..."
    while read -r k n; do
      f8[$mode]=$((f8[$mode] + k)); n8[$mode]=$((n8[$mode] + n))
    done < <(echo "$out" | sed -n -E 's/.*ideal S\/N (8-20|20\+): ([0-9]+)\/([0-9]+).*/\2 \3/p')
    read -r a b < <(echo "$out" | sed -n -E 's/.*matching no injected event: ([0-9]+) \(([0-9]+) with.*/\1 \2/p')
    nfalse[$mode]=$((nfalse[$mode] + a)); nfalse_rb[$mode]=$((nfalse_rb[$mode] + b))
    printf '%-8s seed %-3s %s\n' "$mode" "$seed" \
      "$(echo "$out" | grep -E 'matching no' | sed 's/^ *//')"
  done
done
for mode in aligned varying; do
  awk -v m="$mode" -v s="$seeds" -v f="${f8[$mode]}" -v n="${n8[$mode]}" \
    -v a="${nfalse[$mode]}" -v b="${nfalse_rb[$mode]}" 'BEGIN {
      printf "%-8s seeds %s: S/N >= 8 found %d/%d (%.1f%%), false detections %d (%d with rb >= 0.5)\n",
        m, s, f, n, (n > 0 ? 100 * f / n : 0), a, b }'
done
