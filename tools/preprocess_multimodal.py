"""Image-text JSONL + image files -> tokens, loss masks and images (megatron-core indexed datasets).

See megatron_apriel.data.preprocess_multimodal.
"""

import sys

from megatron_apriel.data.preprocess_multimodal import main

if __name__ == "__main__":
    sys.exit(main())
