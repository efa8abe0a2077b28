"""HF <-> Megatron checkpoint mappings, conversion, upscaling, averaging and merging."""
