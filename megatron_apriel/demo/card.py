"""The model card of the demo's final model: the final merge's inputs and weights (as ``apriel
average`` writes them), the recipe that produced those inputs, and the held-out figures."""

from __future__ import annotations

from pathlib import Path

from megatron_apriel.checkpoint.model_card import merge_card

RECIPE = """## Recipe

`apriel demo` (megatron-apriel) ran the Apriel recipe on a model of about 1M parameters on CPU: a
tokenizer and synthetic arithmetic data, pretraining, depth upscaling, continual pretraining on a
blend, an average of its checkpoints, a generalist SFT and two short specialist fine-tunes merged
0.5/0.5, GRPO with the format and math rewards, and this final merge. Every stage's config, log and
figures are in the demo's output folder (`<stage>/train.yaml`, `<stage>/log.txt`, `<stage>/done.json`).
It is a demonstration of the pipeline, not a useful model."""


def write_demo_card(hf_dir: Path, inputs: list[Path], weights: list[float], figures: dict) -> Path:
    """``figures``: the demo's held-out evaluation of this folder (``Demo.evaluate``)."""
    held_out = {"accuracy": figures["accuracy"], "accuracy_stderr": figures["accuracy_stderr"],
                "format_rate": figures["format_rate"]}
    if "sampled_accuracy" in figures:
        held_out |= {"sampled_accuracy": figures["sampled_accuracy"],
                     "sampled_accuracy_stderr": figures["sampled_accuracy_stderr"]}
    results = {f"demo held-out arithmetic ({figures['eval_n']} problems)": held_out}
    return merge_card(hf_dir, inputs, weights, eval_results=results, extra=RECIPE)
