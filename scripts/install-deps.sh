#!/usr/bin/env bash
# Installs what rlhf needs from Debian 12's packages (idempotent: installs only what is missing) and makes the
# OpenMP build of OpenBLAS the active BLAS. Run as root.
set -euo pipefail

packages=(
  build-essential cmake pkg-config ccache git ca-certificates
  libtorch-dev libopenblas0-openmp libgoogle-perftools-dev
  libeigen3-dev doctest-dev libfmt-dev nlohmann-json3-dev libcli11-dev libpcre2-dev libsqlite3-dev
  libprotobuf-dev libboost-dev libcairo2-dev fonts-dejavu-core libtomlplusplus-dev
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "install-deps: missing packages: ${missing[*]}; run this script as root" >&2
    exit 1
  fi
  echo "install-deps: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  echo "install-deps: this downloads about 1 GB (LibTorch and its dependencies) and takes a few minutes"
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# The reference BLAS is ~50x slower and the pthread OpenBLAS fights torch's OpenMP threads: select the OpenMP build.
arch=$(dpkg-architecture -qDEB_HOST_MULTIARCH 2>/dev/null || echo x86_64-linux-gnu)
for lib in libblas.so.3 liblapack.so.3 libopenblas.so.0; do
  target=/usr/lib/$arch/openblas-openmp/$lib
  current=$(update-alternatives --query "$lib-$arch" 2>/dev/null | awk '/^Value:/ {print $2}')
  if [ -e "$target" ] && [ "$current" != "$target" ]; then
    if [ "$(id -u)" -eq 0 ]; then
      update-alternatives --quiet --set "$lib-$arch" "$target"
    else
      echo "install-deps: warning: $lib is $current, not $target (run as root to switch)" >&2
    fi
  fi
done
echo "install-deps: all dependencies present; BLAS: $(readlink -f /usr/lib/$arch/libblas.so.3), OpenBLAS: $(readlink -f /usr/lib/$arch/libopenblas.so.0)"
