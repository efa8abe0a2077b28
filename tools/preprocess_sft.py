"""Chat JSONL -> tokens + assistant loss masks (megatron-core indexed datasets).

See megatron_apriel.data.preprocess_sft.
"""

import sys

from megatron_apriel.data.preprocess_sft import main

if __name__ == "__main__":
    sys.exit(main())
