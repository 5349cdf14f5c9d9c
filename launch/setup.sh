#!/usr/bin/env bash
# bash launch/setup.sh
# Creates .venv in the repository root and installs dece_ds with everything it needs.
# Idempotent: a second run only checks that the environment is complete.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
if ! "$VPY" -c "import dece_ds, torch, deepspeed, transformers, datasets, pydantic, mpi4py, pytest" 2>/dev/null; then
  "$VPY" -m pip install --quiet --upgrade pip
  # torch first and pinned: on this machine 2.13.0 is a CPU wheel on local disk; a CUDA machine
  # resolves its own build of the same version.
  "$VPY" -m pip install --quiet "torch==2.13.0"
  # mpich provides libmpi + mpiexec for mpi4py (no system MPI needed).
  "$VPY" -m pip install --quiet mpich
  DS_BUILD_OPS=0 "$VPY" -m pip install --quiet -e ".[test]"
fi
"$VPY" -c "import torch, deepspeed, transformers; print('dece_ds env ready: torch', torch.__version__, 'deepspeed', deepspeed.__version__, 'transformers', transformers.__version__)"
