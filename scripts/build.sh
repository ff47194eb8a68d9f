#!/usr/bin/env bash
# Configures and builds the project into build/ (Release, ccache when present, -j = cores, at most 2 per 12 GiB).
set -euo pipefail
cd "$(dirname "$0")/.."
build_dir=${RLHF_BUILD_DIR:-build}
jobs=${RLHF_JOBS:-$(nproc)}
cmake -S . -B "$build_dir" -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$build_dir" -j "$jobs" "$@"
