"""A third model family, registered in this one module: a Mistral-shaped decoder stored under its own
HF class and tensor names (``transformer.blocks.N.*``, ``head.weight``). Importing it registers the
family, its checkpoint driver (this module) and its preset ``tiny-toy``; conversion, training and the
dry run then find it through the registry (tests/test_model_families.py)."""

from __future__ import annotations

import dataclasses

from megatron_apriel.checkpoint import mistral
from megatron_apriel.checkpoint import table as tbl
from megatron_apriel.models import families
from megatron_apriel.models.presets import PRESETS, ModelPreset

ARCH = "ToyForCausalLM"

# --- the config: a preset of the family
PRESETS["tiny-toy"] = PRESETS["tiny"].replace(name="tiny-toy", hf_architecture=ARCH, description="toy family")

# --- the checkpoint driver (what checkpoint/convert.py asks of one): Mistral's table at another layout
NAME, LABEL = "Toy", " (toy)"
LAYOUT = ("transformer", "head.weight")
build_chunks = mistral.build_chunks
load_canonical = mistral.load_canonical


def table(preset: ModelPreset, layout=LAYOUT):
    return [dataclasses.replace(e, hf=tuple(h.replace(".layers.", ".blocks.") for h in e.hf))
            for e in mistral.table(preset, layout)]


def preset_from_hf_config(cfg, name: str = "from-hf") -> ModelPreset:
    return ModelPreset.from_hf_config(cfg, name=name)


def export_config(preset, side, dtype):
    cfg = mistral.export_config(preset, side, dtype)
    cfg.architectures = [ARCH]
    return cfg


def hf_canonical(reader, preset):
    return tbl.HFCanonical(reader, table(preset), NAME, preset.num_layers)


# --- the family
FAMILY = families.register(families.ModelFamily(
    name="toy", description="Mistral decoder under its own names",
    claims=lambda p: p.hf_architecture == ARCH, claims_hf_config=lambda cfg: cfg.get("architectures") == [ARCH],
    build_chunks=families.TEXT.build_chunks, tp_divides=families.TEXT.tp_divides,
    freeze_groups=families.TEXT.freeze_groups, checkpoint_driver=__name__))
