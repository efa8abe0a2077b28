"""megatron-apriel: the Apriel training recipe on megatron-core."""

__version__ = "0.1.0"
