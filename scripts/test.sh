#!/usr/bin/env bash
# Installs what is missing, builds Hilal twice (optimised, and with
# AddressSanitizer + UndefinedBehaviorSanitizer) and runs every test in both,
# then builds it with MPI (-DHILAL_MPI=ON) and runs the MPI night test.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
jobs=$(nproc)

bash "$here/scripts/bootstrap.sh" "$here/build"
echo "== tests (optimised build)"
ctest --test-dir "$here/build" --output-on-failure -j"$jobs"

bash "$here/scripts/bootstrap.sh" "$here/build-asan" -DHILAL_SANITIZE=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo -DHILAL_BUILD_BENCH=OFF
echo "== tests (AddressSanitizer + UndefinedBehaviorSanitizer build)"
ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 LSAN_OPTIONS=suppressions=$here/tests/lsan.supp UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
  ctest --test-dir "$here/build-asan" --output-on-failure -j"$jobs"

echo "== MPI night (build with -DHILAL_MPI=ON, 3 ranks on this machine)"
cmake -S "$here" -B "$here/build-mpi" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DHILAL_MPI=ON -DHILAL_BUILD_BENCH=OFF >/dev/null
cmake --build "$here/build-mpi" -j"$jobs" --target hilal
ctest --test-dir "$here/build-mpi" --output-on-failure -R night_mpi
