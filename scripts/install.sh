#!/usr/bin/env bash
# Create .venv and install the project into it. Idempotent and fast when nothing changed.
#
# CPU machines get the CPU build of torch explicitly: a plain `pip install torch`
# would pull a multi-GB CUDA build. GPU machines keep whatever torch the cluster
# provides (the pyproject range is open on purpose).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${MESH_VENV:-.venv}
PY=${PYTHON:-python3}
CPU_TORCH=${MESH_CPU_TORCH:-torch==2.13.0}

if [ ! -x "$VENV/bin/python" ]; then
  echo "[install] creating $VENV"
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)

# Re-install only when the dependency list changed.
stamp="$VENV/.mesh-install-stamp"
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "[install] up to date ($VENV)"
  exit 0
fi

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "[install] GPU found: installing torch from the default index"
    "${PIP[@]}" install torch
  else
    echo "[install] no GPU: installing the CPU build $CPU_TORCH"
    "${PIP[@]}" install "$CPU_TORCH"
  fi
fi
echo "[install] installing mesh-pretrain and its dependencies (about 2 minutes on a fresh machine)"
"${PIP[@]}" install -e ".[dev]"
if ! out=$("$VENV/bin/python" -c "import torch, megatron.core, deepspeed, mesh_model.model" 2>&1); then
  echo "$out" >&2
  echo "[install] ERROR: the installed environment does not import (see above)" >&2
  exit 1
fi
echo "$want" > "$stamp"
echo "[install] done"
