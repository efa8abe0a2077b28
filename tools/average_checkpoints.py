#!/usr/bin/env python
"""Command-line entry point; see megatron_apriel.checkpoint.average (also `apriel average`)."""

import sys

from megatron_apriel.checkpoint.average import main

if __name__ == "__main__":
    sys.exit(main())
