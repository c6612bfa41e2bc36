#!/usr/bin/env bash
# The main job on a fresh machine: install, build the demo corpus + tokenizer + shards,
# train the demo MeSH model on CPU and print its validation perplexity.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)}
exec .venv/bin/mesh demo "$@"
