"""Tokenizers, indexed-dataset writing, blends, SFT formatting and packing."""
