#!/usr/bin/env bash
# Install what the tests need and run the whole suite (slow multi-process tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
# DeepSpeed JIT-compiles a small op on first use; keep it in a cache that survives runs.
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/mesh-pretrain/torch_extensions}
exec .venv/bin/python -m pytest "$@"
