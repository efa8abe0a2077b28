#!/usr/bin/env python
"""Megatron-LM's tools/preprocess_data.py: corpora -> indexed datasets (see megatron_apriel.data.preprocess)."""

import sys

from megatron_apriel.data.preprocess import tool_main as main

if __name__ == "__main__":
    sys.exit(main())
