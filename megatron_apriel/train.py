"""``python -m megatron_apriel.train --config X.yaml [key=value ...]``: see megatron_apriel.training.loop."""

import sys

from megatron_apriel.training.loop import main

if __name__ == "__main__":
    sys.exit(main())
