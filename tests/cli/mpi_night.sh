#!/usr/bin/env bash
# `mpirun -n 3 hilal night` (rank 0 hands out frames, ranks 1 and 2 process
# them into shards that rank 0 merges) must give the same candidates as the
# single-process night, leave one archive and no shards, and a rerun must
# merge shards a killed run left and then skip every frame. Registered by
# the top-level CMakeLists.txt only in builds with -DHILAL_MPI=ON.
set -u
exe=${HILAL_EXE:?run through ctest}
tmp=${HILAL_TMPDIR:?}
rm -rf "$tmp" && mkdir -p "$tmp/night" "$tmp/refs"
export HOME="$tmp" XDG_CONFIG_HOME="$tmp/xdg"
unset HILAL_CONFIG
pass=0 fail=0
check() { # check NAME CONDITION-EXIT-STATUS
  if [ "$2" -eq 0 ]; then pass=$((pass+1)); else fail=$((fail+1)); echo "FAIL: $1"; fi
}
mpi=(mpirun --allow-run-as-root --oversubscribe -n 3)
cd "$tmp" || exit 1

# The night of tests/pipeline/test_night_data.h: two fields of three frames,
# a reference each, a corrupt file, a frame without reference.
sim() { "$exe" -q simulate --size 256 --star-density 6000 --threads 1 "$@" >/dev/null; }
for k in 1 2 3; do
  sim --out "sim/a$k" --seed 101 --center 150,2.2 --offset-px "$(awk -v k=$k 'BEGIN{printf "%g,%g", 1.3*k-2, -0.7*k+1}')" --mjd-sci "6030$k" --object FIELD-A
  sim --out "sim/b$k" --seed 202 --center 151,2.5 --offset-px "$(awk -v k=$k 'BEGIN{printf "%g,%g", -1.1*k+1, 0.9*k-1}')" --mjd-sci "6030$k" --object FIELD-B
  cp "sim/a$k/sci.fits" "night/a$k.fits"; cp "sim/b$k/sci.fits" "night/b$k.fits"
done
sim --out sim/c --seed 303 --center 200,-20 --object FIELD-C
cp sim/c/sci.fits night/c_noref.fits
cp sim/a1/ref.fits refs/refA.fits; cp sim/b1/ref.fits refs/refB.fits
head -c 20000 night/a1.fits > night/bad.fits

# Candidates of an archive as sorted "frame_id x y snr" lines.
cands() { "$exe" query "$1" --format csv | awk -F, 'NR == 1 { for (i = 1; i <= NF; i++) c[$i] = i; next }
  { printf "%s %.4f %.4f %.4f\n", $c["frame_id"], $c["x"], $c["y"], $c["snr"] }' | sort; }

"$exe" night night --references refs --archive single.h5 --set pipeline.threads=1 --no-mpi > single.out 2>&1
rc=$?; [ $rc -eq 4 ]; check "single-process night exits 4 (corrupt file), got $rc" $?

"${mpi[@]}" "$exe" night night --references refs --archive mpi.h5 --set pipeline.threads=1 > mpi.out 2>&1
rc=$?; [ $rc -eq 4 ]; check "MPI night exits 4 like the single-process one, got $rc: $(tail -5 mpi.out)" $?
grep -q "8 frames: 6 done, 0 already done, 1 failed, 1 skipped" mpi.out; check "MPI summary: $(grep frames: mpi.out)" $?
grep -q "on each of 2 MPI ranks" mpi.out; check "two worker ranks" $?
[ "$(grep -c 'frames:' mpi.out)" -eq 1 ]; check "only rank 0 prints the summary" $?
ls mpi.h5.shard* >/dev/null 2>&1; [ $? -ne 0 ]; check "shards merged and removed" $?
cands single.h5 > single.txt; cands mpi.h5 > mpi.txt
n=$(wc -l < single.txt)
[ "$n" -gt 0 ] && cmp -s single.txt mpi.txt; check "MPI candidates equal the single-process ones ($n vs $(wc -l < mpi.txt))" $?
grep -q '"ranks": 2' mpi.run1.report.json && grep -q '"rank": 2' mpi.run1.report.json
check "report names the ranks" $?
"$exe" info mpi.h5 > info.out; grep -q "frames: 6 current, 0 superseded, 1 failed" info.out
check "one archive with every frame once: $(grep frames: info.out)" $?

# A killed MPI run leaves shards: the next run merges them and skips their frames.
cp single.h5 again.h5.shard7.h5
"${mpi[@]}" "$exe" night night --references refs --archive again.h5 --set pipeline.threads=1 > again.out 2>&1
grep -q "0 done, 6 already done" again.out; check "leftover shard merged, frames skipped: $(grep frames: again.out)" $?
cands again.h5 > again.txt; cmp -s single.txt again.txt; check "merged leftover has the same candidates" $?
[ ! -e again.h5.shard7.h5 ]; check "leftover shard removed" $?

echo "$pass passed, $fail failed"
[ $fail -eq 0 ] && [ $pass -gt 0 ]
