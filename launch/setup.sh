#!/usr/bin/env bash
# bash launch/setup.sh
# Creates .venv in the repository root and installs dece_ds with everything it needs (idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPY=.venv/bin/python
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first, pinned: on this machine 2.13.0 is a CPU wheel on local disk; a CUDA machine resolves
# its own build of the same version from PyPI.
"$VPY" -m pip install --quiet "torch==2.13.0"
# mpich: libmpi + mpiexec for mpi4py (no system MPI needed). DS_BUILD_OPS=0: DeepSpeed JIT-builds ops.
"$VPY" -m pip install --quiet mpich
DS_BUILD_OPS=0 "$VPY" -m pip install --quiet -e ".[test,megatron]"
"$VPY" -c "import torch, deepspeed, transformers; print('dece_ds environment ready: torch', torch.__version__, '| deepspeed', deepspeed.__version__, '| transformers', transformers.__version__)"
