#!/usr/bin/env bash
# Installs the Debian 12 packages Hilal needs (when missing) and builds it.
# Usage: scripts/bootstrap.sh [BUILD_DIR] [extra cmake args...]
# Run as root (or with sudo) on a fresh machine; later runs skip the install.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
build=${1:-$here/build}
shift || true

packages=(
  build-essential cmake pkg-config
  libcfitsio-dev libcfitsio-bin fitsverify
  libfftw3-dev
  libhdf5-dev hdf5-tools
  wcslib-dev
  libsep-dev
  libssl-dev
  libpng-dev
  librdkafka-dev libavro-dev libxml2-dev libxml2-utils zlib1g-dev
  libopenmpi-dev openmpi-bin
  python3 python3-h5py python3-astropy python3-numpy
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "hilal bootstrap: installing ${missing[*]}"
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

cmake -S "$here" -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo "$@" >/dev/null
cmake --build "$build" -j"$(nproc)"
