"""``megatron_apriel.train`` under torchrun (tests/test_training.py): same arguments, same exit code."""

import sys

if __name__ == "__main__":
    from megatron_apriel.training.loop import main

    sys.exit(main(sys.argv[1:]))
