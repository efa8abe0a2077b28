#!/usr/bin/env bash
# The Python packages a GPU machine without network needs beyond its own torch stack, as wheels in
# .whl/ of this checkout (ignored by git), for Python 3.12 on x86-64 Linux (PYVER to change it):
# megatron-core and transformers at the tested versions, and torchao for model.fp8: torchao-*.
#
#   bash benchmarks/offline_wheels.sh            # here, with network
#   pip install --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site   # there
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
exclude="$(git rev-parse --git-common-dir)/info/exclude"
grep -qxF '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "${PYVER:-3.12}" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
    megatron-core==0.16.1 transformers==5.24.0 torchao==0.18.0
ls -la .whl
