#!/usr/bin/env python
"""Command-line entry point; see megatron_apriel.checkpoint.upscale (also `apriel upscale`)."""

import sys

from megatron_apriel.checkpoint.upscale import main

if __name__ == "__main__":
    sys.exit(main())
