"""HF <-> megatron-core checkpoint conversion (see megatron_apriel/checkpoint/convert.py)."""

import sys

from megatron_apriel.checkpoint.convert import main

if __name__ == "__main__":
    sys.exit(main())
