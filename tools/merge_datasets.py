#!/usr/bin/env python
"""Megatron-LM's tools/merge_datasets.py: join indexed datasets (see megatron_apriel.data.merge)."""

import sys

from megatron_apriel.data.merge import main

if __name__ == "__main__":
    sys.exit(main())
