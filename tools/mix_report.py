#!/usr/bin/env python
"""What a blend spec will draw from each source: see megatron_apriel/training/mix_report.py."""
import sys

from megatron_apriel.training.mix_report import main

if __name__ == "__main__":
    sys.exit(main())
