"""megatron-apriel: the Apriel training recipe on megatron-core."""

import logging
import warnings

# megatron-core warns at import, once per module that looks for them (four to six lines per command,
# `--help` included), that Transformer Engine and Apex are not installed. Without them (a CPU machine,
# a GPU one without the wheels) this project uses megatron-core's local layer spec and torch
# fallbacks on purpose; `apriel train` says so in one line of its own ("torch fusions (no TE/apex)").
warnings.filterwarnings("ignore", message=r"(Transformer Engine and Apex are|Apex is) not installed",
                        category=UserWarning)
# and, for every TransformerConfig built without CUDA graphs (conversion included), that a default it
# sets itself is deprecated: nothing a user can act on
warnings.filterwarnings("ignore", message=r"full scope is deprecated", category=UserWarning)

__version__ = "0.1.0"

# torchao (imported by transformers and the fp8 path) logs one "Failed to load .../_C_*.so" line per
# CUDA kernel library it cannot load on a machine without those GPUs: expected, and nothing to act on.
logging.getLogger("torchao").addFilter(
    lambda record: not (record.getMessage().startswith("Failed to load") and "/torchao/_C" in record.getMessage()))
