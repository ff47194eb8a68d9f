#!/usr/bin/env bash
# The main job: installs what is missing, builds, and runs the demo on its built-in default (or on the flags given,
# e.g. --model DIR --tokenizer DIR for a Hugging Face GPT-2 folder).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
bash scripts/build.sh --target rlhf_demo rlhf_cli
exec ./build/examples/demo/rlhf_demo "$@"
