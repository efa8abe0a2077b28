"""What the GPU tests share: the device they run on and the marker that skips them without one.

``python -m pytest -q -m gpu tests/gpu`` runs them on a CUDA machine (a few minutes on one H100).
Without CUDA every test here is skipped. ``APRIEL_GPU_TESTS_DEVICE=cpu`` runs the same code on the
CPU backend instead (bf16 where the test asks for it), which checks the tests themselves on a
machine without a GPU; it proves nothing about CUDA.
"""

from __future__ import annotations

import os

import pytest
import torch

FORCED = os.environ.get("APRIEL_GPU_TESTS_DEVICE")
DEVICE = FORCED or ("cuda" if torch.cuda.is_available() else None)

gpu = [pytest.mark.gpu,
       pytest.mark.skipif(DEVICE is None,
                          reason="needs a CUDA GPU (APRIEL_GPU_TESTS_DEVICE=cpu checks the tests on CPU)")]
