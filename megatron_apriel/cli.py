"""The ``apriel`` command: one verb per stage, each the ``main(argv)`` of the stage's module.

Modules are imported only when their verb runs, so ``apriel model-info`` does not pay for
importing transformers and TRL, and a missing optional dependency only affects its own verb.
"""

from __future__ import annotations

import importlib
import sys

from megatron_apriel.errors import EXIT_BAD_INPUT, EXIT_OK, InputError, cli_main

VERBS: dict[str, tuple[str, str]] = {
    "demo": ("megatron_apriel.demo", "run the whole recipe on a tiny model on CPU"),
    "model-info": ("megatron_apriel.models.info", "parameters, bytes and training memory of a preset"),
    "preprocess": ("megatron_apriel.data.preprocess", "JSONL/parquet corpora -> Megatron indexed datasets"),
    "merge-datasets": ("megatron_apriel.data.merge", "join several indexed datasets into one"),
    "preprocess-sft": ("megatron_apriel.data.preprocess_sft", "chat JSONL -> tokens + loss masks (indexed datasets)"),
    "chat-tokenizer": ("megatron_apriel.data.chat_tokenizer", "an HF tokenizer with a chat format's role tokens"),
    "preprocess-multimodal": ("megatron_apriel.data.preprocess_multimodal",
                              "image-text JSONL + images -> indexed datasets"),
    "mix-report": ("megatron_apriel.training.mix_report", "what a blend spec will draw from each source"),
    "train": ("megatron_apriel.training.loop", "upscale-training, CPT and SFT on megatron-core"),
    "convert": ("megatron_apriel.checkpoint.convert", "HF <-> megatron-core distributed checkpoints"),
    "upscale": ("megatron_apriel.checkpoint.upscale", "depth upscaling of an HF checkpoint"),
    "average": ("megatron_apriel.checkpoint.average", "average or weighted-merge checkpoints"),
    "eval": ("megatron_apriel.eval.run", "score HF checkpoints on local task files (lm-evaluation-harness)"),
    "merge-search": ("megatron_apriel.eval.merge_search", "evaluate a grid of weighted merges, write the best"),
    "generate": ("megatron_apriel.generate", "generate with an HF checkpoint (transformers)"),
    "grpo": ("megatron_apriel.rl.grpo", "GRPO with rule-based rewards on an HF checkpoint"),
    "grpo-info": ("megatron_apriel.rl.memory", "memory per GPU of a GRPO config under FSDP"),
}


def usage() -> str:
    width = max(len(v) for v in VERBS)
    lines = ["usage: apriel VERB [ARGS...]", "", "verbs:"]
    lines += [f"  {verb:<{width}}  {text}" for verb, (_, text) in VERBS.items()]
    lines += ["", "apriel VERB --help shows the verb's own flags."]
    return "\n".join(lines)


@cli_main()
def main(argv: list[str] | None = None) -> int:
    """Run one verb; its own ``main`` (wrapped by :func:`megatron_apriel.errors.cli_main`) reports its errors."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return EXIT_OK
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        print(f"error: unknown verb {verb!r}\n\n{usage()}", file=sys.stderr)
        return EXIT_BAD_INPUT
    module_name, _ = VERBS[verb]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and (e.name == module_name or module_name.startswith(e.name + ".")):
            raise InputError(f"verb {verb!r} is not available in this installation ({e})") from e
        raise
    return module.main(rest)


if __name__ == "__main__":
    sys.exit(main())
