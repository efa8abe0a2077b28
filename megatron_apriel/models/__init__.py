"""Model presets (RECIPE.md) and builders of megatron-core models."""

from megatron_apriel.models.presets import PRESETS, ModelPreset, VisionPreset, get_preset, padded_vocab_size

__all__ = ["PRESETS", "ModelPreset", "VisionPreset", "get_preset", "padded_vocab_size"]
