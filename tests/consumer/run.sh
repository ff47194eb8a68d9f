#!/usr/bin/env bash
# Builds and runs a consumer project: `run.sh installed BUILD_DIR` (after installing rlhf into BUILD_DIR/prefix) or
# `run.sh subdirectory BUILD_DIR`.
set -euo pipefail
kind=$1
work=$2/consumer-$kind
source_dir=$(cd "$(dirname "$0")/../.." && pwd)
rm -rf "$work"
mkdir -p "$work"
launcher=()
command -v ccache >/dev/null && launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
if [ "$kind" = installed ]; then
  cmake --install "$2" --prefix "$work/prefix" >/dev/null
  test -f "$work/prefix/lib/cmake/rlhf/rlhfConfig.cmake"
  test -f "$work/prefix/lib/cmake/rlhf/rlhfConfigVersion.cmake"
  test -f "$work/prefix/include/rlhf/rlhf.hpp"
  test -f "$work/prefix/share/rlhf/reviews.txt"      # the main job's data, found by the installed tool
  test -f "$work/prefix/share/rlhf/sentiment_words.json"
  test -x "$work/prefix/bin/rlhf"
  cmake -S "$source_dir/tests/consumer/installed" -B "$work/build" -DCMAKE_PREFIX_PATH="$work/prefix" \
    -DCMAKE_BUILD_TYPE=Release "${launcher[@]}" >/dev/null
else
  cmake -S "$source_dir/tests/consumer/subdirectory" -B "$work/build" -DRLHF_SOURCE_DIR="$source_dir" \
    -DCMAKE_BUILD_TYPE=Release "${launcher[@]}" >/dev/null
  # Only the library target comes along: the project's own tests and tools stay off when not top level.
  if [ -e "$work/build/rlhf/tests" ] || [ -e "$work/build/rlhf/examples" ]; then
    echo "tests or examples were configured in a consumer build" >&2
    exit 1
  fi
fi
cmake --build "$work/build" -j 2
"$work/build/consumer"
