#!/usr/bin/env bash
# Set up ./.venv for himae-dist.   Usage: bash launch/setup.sh [--test]
#
# The venv sees the system's site-packages, so an installed torch (a GPU user's CUDA build) is
# used as it is: it is pinned as a constraint and never replaced. Only where no torch exists at
# all is the CPU build installed (torch==2.13.0). The [baselines] extra (aeon, the probe's MiniRocket
# baseline) is installed for the demo and the tests; --test adds pytest (with xdist), moto's S3 server
# and triton.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
extras="[baselines]"
[ "${1:-}" = "--test" ] && extras="[test,baselines]"

[ -x .venv/bin/python ] || "$PY" -m venv --system-site-packages .venv
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "[setup] no torch found: installing the CPU build torch==2.13.0"
  .venv/bin/pip install -q "torch==2.13.0"
fi
torch_version=$(.venv/bin/python -c "import torch; print(torch.__version__)")
floor=2.4  # as in pyproject.toml: the oldest torch whose APIs the code uses
if ! .venv/bin/python -c "import sys, torch; v = lambda s: tuple(int(x) for x in s.split('+')[0].split('.')[:2]); sys.exit(v(torch.__version__) < v('$floor'))"; then
  echo "[setup] error: the installed torch $torch_version is older than himae-dist's floor torch>=$floor; upgrade it (keep your CUDA build: pip install 'torch>=$floor' --index-url <your CUDA wheel index>) and run this again" >&2
  exit 2
fi
echo "[setup] using torch $torch_version (kept as installed)"
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
echo "torch==$torch_version" > "$constraints"
.venv/bin/pip install -q -c "$constraints" -e ".$extras"
.venv/bin/python -c "import deepspeed, webdataset, h5py, s3fs; print('[setup] ok: deepspeed', deepspeed.__version__, '| webdataset', webdataset.__version__)"
# one tiny MiniRocket fit compiles aeon's numba kernels into their on-disk cache (~40 s once), so the
# probe, the demo and the tests do not each pay for it
.venv/bin/python -c "import aeon, numpy; from aeon.transformations.collection.convolution_based import MiniRocket; MiniRocket(n_kernels=84, random_state=0).fit_transform(numpy.random.default_rng(0).standard_normal((20, 1, 100)).astype('float32')); print('[setup] ok: aeon', aeon.__version__, '(MiniRocket baseline) | numpy', numpy.__version__)"
