"""Depth upscaling of an HF checkpoint: a new decoder whose layers are copies of the old ones.

Apriel starts from Mistral-Nemo 40 -> 50 layers and from the Pixtral decoder 40 -> 48 layers by
duplicating a contiguous middle block (plain copies started at the lowest loss). SOLAR-style slices
and LLaMA-Pro block expansion are the other two plans. Everything works on HF safetensors so the
result is an ordinary HF checkpoint (convertible, servable, loadable by transformers).

Written by hand rather than with mergekit: mergekit's passthrough slices do not zero the copies
(``--init identity``) and pull in a dependency tree much larger than this file; the streaming part is
the shared :mod:`megatron_apriel.checkpoint.hf_io` reader/writer, which writes each tensor into its
shard as soon as it is read, so peak memory is about one tensor, whatever the model size.

A *plan* is a list of :class:`NewLayer` (new index -> source index, and whether it is a repeated
copy). "Repeated" means any occurrence of a source layer after its first: those are the layers that
``--init identity`` zeroes (attention ``o_proj`` and MLP ``down_proj``), which turns each of them
into an exact identity on the residual stream, so the upscaled model computes the base model's
function as long as the first occurrences keep every source layer in order.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from megatron_apriel.checkpoint.hf_io import (
    SafetensorsReader,
    ShardedSafetensorsWriter,
    atomic_output_dir,
    copy_side_files,
)
from megatron_apriel.config import load_yaml
from megatron_apriel.errors import InputError, cli_main
from megatron_apriel.hub import resolve_model
from megatron_apriel.models.hf_config import HFConfigError, check_hf_dir

# Per-layer tensors zeroed by --init identity: the two projections that write into the residual.
IDENTITY_ZERO_SUFFIXES = ("self_attn.o_proj.weight", "mlp.down_proj.weight")
# Decoder layer prefixes on disk: MistralForCausalLM and LLaVA/Pixtral (hub layout).
LAYER_PREFIXES = ("model.layers.", "language_model.model.layers.")


class UpscaleError(InputError):
    """A bad plan, flag or checkpoint; the message names what is wrong."""


@dataclass(frozen=True)
class NewLayer:
    index: int
    source: int
    repeated: bool  # a second (or later) occurrence of ``source``


# ---------------------------------------------------------------------------------------- plans
def _finish(sources: list[int], num_layers: int) -> list[NewLayer]:
    for s in sources:
        if not 0 <= s < num_layers:
            raise UpscaleError(f"plan uses layer {s} but the model has layers 0-{num_layers - 1}")
    seen: set[int] = set()
    plan = []
    for i, s in enumerate(sources):
        plan.append(NewLayer(i, s, s in seen))
        seen.add(s)
    return plan


def plan_from_slices(spec: str, num_layers: int) -> list[NewLayer]:
    """SOLAR-style slices, inclusive ranges: ``"0-23,8-31"`` (32 -> 48) or ``"0-3,2,3-5"``."""
    sources: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise UpscaleError(f"--layers: bad slice {part!r} (expected A-B or A, e.g. 0-29,10-39)")
        a = int(m.group(1))
        b = int(m.group(2)) if m.group(2) is not None else a
        if b < a:
            raise UpscaleError(f"--layers: slice {part!r} is empty (end before start)")
        sources.extend(range(a, b + 1))
    return _finish(sources, num_layers)


def middle_block(num_layers: int, k: int) -> tuple[int, int]:
    """The contiguous block of ``k`` layers centred in the decoder: ``[start, start + k)``.

    ``start = (num_layers - k) // 2``: 40 layers, k=10 -> 15-24; 40 layers, k=8 -> 16-23. The first
    and last layers (embedding-facing and output-facing) are never duplicated.
    """
    if not 0 < k <= num_layers:
        raise UpscaleError(f"--duplicate-middle {k}: must be between 1 and the layer count {num_layers}")
    start = (num_layers - k) // 2
    return start, start + k


def plan_duplicate_middle(num_layers: int, k: int) -> list[NewLayer]:
    """The Apriel default: the middle block of ``k`` layers appears twice, back to back.

    New order: ``0 .. end-1, start .. end-1 (copies), end .. n-1``, i.e. the slices
    ``0-(end-1),start-(n-1)``. Mistral-Nemo 40 -> 50: 0-24, 15-24, 25-39.
    """
    start, end = middle_block(num_layers, k)
    return _finish(list(range(end)) + list(range(start, num_layers)), num_layers)


def plan_expand_every(num_layers: int, k: int) -> list[NewLayer]:
    """LLaMA-Pro block expansion: a copy of layer i inserted after it whenever (i + 1) % k == 0."""
    if k < 1:
        raise UpscaleError(f"--expand-every {k}: must be >= 1")
    sources = []
    for i in range(num_layers):
        sources.append(i)
        if (i + 1) % k == 0:
            sources.append(i)
    return _finish(sources, num_layers)


def check_identity_plan(plan: list[NewLayer], num_layers: int) -> None:
    """``--init identity`` keeps the function only if the non-repeated layers are 0..n-1 in order."""
    firsts = [p.source for p in plan if not p.repeated]
    if firsts != list(range(num_layers)):
        raise UpscaleError(
            "--init identity needs every source layer once, in order, before its copies "
            f"(first occurrences are {format_sources(firsts)}); use --init copy for this plan"
        )


def format_sources(sources: list[int]) -> str:
    """Compact ranges: [0,1,2,5,6] -> '0-2,5-6'."""
    out, i = [], 0
    while i < len(sources):
        j = i
        while j + 1 < len(sources) and sources[j + 1] == sources[j] + 1:
            j += 1
        out.append(f"{sources[i]}" if i == j else f"{sources[i]}-{sources[j]}")
        i = j + 1
    return ",".join(out)


def describe_plan(plan: list[NewLayer], num_layers: int, init: str) -> str:
    lines = [
        f"upscale plan: {num_layers} -> {len(plan)} layers (init={init}); "
        f"sources {format_sources([p.source for p in plan])}"
    ]
    for p in plan:
        tag = ""
        if p.repeated:
            tag = "  copy" + (" (o_proj, down_proj zeroed)" if init == "identity" else "")
        lines.append(f"  new {p.index:3d} <- {p.source:3d}{tag}")
    return "\n".join(lines)


# -------------------------------------------------------------------------------- names and config
def layer_prefix(names) -> str:
    """The on-disk decoder layer prefix of a checkpoint (Mistral or LLaVA/Pixtral)."""
    for prefix in LAYER_PREFIXES[::-1]:  # the longer one first: it contains the shorter
        if any(n.startswith(prefix) for n in names):
            return prefix
    expected = " or ".join(p + "N.*" for p in LAYER_PREFIXES)
    raise UpscaleError(f"no decoder layers found (expected tensors named {expected})")


def output_names(names: list[str], plan: list[NewLayer], prefix: str, identity: bool = False
                 ) -> list[tuple[str, str, bool]]:
    """Every output tensor as (new name, source name, zero it), in checkpoint order.

    Tensors outside the decoder layers (embeddings, final norm, lm_head, vision tower, projector)
    are copied through; layer tensors follow the plan. Layers are emitted in new-layer order with
    the non-layer tensors first, so shards read naturally.
    """
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.(.+)")
    per_layer: dict[int, list[str]] = {}
    others = []
    for n in names:
        m = pattern.fullmatch(n)
        if m:
            per_layer.setdefault(int(m.group(1)), []).append(m.group(2))
        else:
            others.append(n)
    out = [(n, n, False) for n in others]
    for p in plan:
        if p.source not in per_layer:
            raise UpscaleError(f"checkpoint has no tensors for layer {p.source} ({prefix}{p.source}.*)")
        for suffix in sorted(per_layer[p.source]):
            zero = identity and p.repeated and suffix in IDENTITY_ZERO_SUFFIXES
            out.append((f"{prefix}{p.index}.{suffix}", f"{prefix}{p.source}.{suffix}", zero))
    return out


def text_config_of(config: dict) -> dict:
    return config["text_config"] if "text_config" in config else config


def upscale_config(config: dict, plan: list[NewLayer]) -> tuple[dict, list[str]]:
    """The new config.json: layer count, and every per-layer list (e.g. ``layer_types``) remapped."""
    config = json.loads(json.dumps(config))
    text = text_config_of(config)
    n = text["num_hidden_layers"]
    changed = ["num_hidden_layers"]
    for key, value in list(text.items()):
        if isinstance(value, list) and len(value) == n and key not in ("architectures",):
            text[key] = [value[p.source] for p in plan]
            changed.append(key)
    text["num_hidden_layers"] = len(plan)
    return config, changed


def build_plan(num_layers: int, layers: str | None, duplicate_middle: int | None, expand_every: int | None
               ) -> list[NewLayer]:
    given = [x is not None for x in (layers, duplicate_middle, expand_every)]
    if sum(given) != 1:
        raise UpscaleError("give exactly one of --layers, --duplicate-middle, --expand-every")
    if layers is not None:
        return plan_from_slices(layers, num_layers)
    if duplicate_middle is not None:
        return plan_duplicate_middle(num_layers, duplicate_middle)
    return plan_expand_every(num_layers, expand_every)


# ------------------------------------------------------------------------------------------ run
def upscale(hf: str | Path, out: str | Path, plan_args: dict, init: str = "copy", force: bool = False,
            max_shard_bytes: int = 5 * 1024**3, log=print) -> dict:
    """Stream ``hf`` into ``out`` following the plan. Returns a summary dict."""
    hf = Path(hf)
    if init not in ("copy", "identity"):
        raise UpscaleError(f"--init must be copy or identity, got {init!r}")
    config_path = hf / "config.json"
    if not config_path.exists():
        raise UpscaleError(f"{config_path}: missing (an HF checkpoint folder is needed)")
    try:  # an upscaled model is trained by megatron-core: refuse what it cannot compute before any work
        check_hf_dir(hf, report=True)
    except HFConfigError as e:
        raise UpscaleError(str(e)) from None
    config = json.loads(config_path.read_text())
    num_layers = text_config_of(config).get("num_hidden_layers")
    if not isinstance(num_layers, int):
        raise UpscaleError(f"{config_path}: no integer num_hidden_layers (in text_config for LLaVA)")
    plan = build_plan(num_layers, **plan_args)
    if init == "identity":
        check_identity_plan(plan, num_layers)
    log(describe_plan(plan, num_layers, init))

    t0 = time.perf_counter()
    with SafetensorsReader(hf) as reader:
        names = reader.keys()
        prefix = layer_prefix(names)
        on_disk = {int(m.group(1)) for n in names if (m := re.match(re.escape(prefix) + r"(\d+)\.", n))}
        if on_disk != set(range(num_layers)):
            raise UpscaleError(f"{hf}: config.json says {num_layers} layers, the weights have layers "
                               f"{format_sources(sorted(on_disk))}")
        todo = output_names(names, plan, prefix, identity=init == "identity")
        new_config, changed = upscale_config(config, plan)
        layout = [(new, tuple(reader.shape(src)), reader.torch_dtype(src)) for new, src, _ in todo]
        with atomic_output_dir(out, force=force) as tmp:
            # every shard is laid out up front, so each tensor goes to disk as soon as it is read
            writer = ShardedSafetensorsWriter(tmp, max_shard_bytes=max_shard_bytes, layout=layout)
            try:
                for new, src, zero in tqdm(todo, desc="upscale", unit="tensor", file=sys.stderr, mininterval=2.0):
                    t = reader.get(src)
                    reader.close()  # unmap the file once the tensor is written: RSS stays near one tensor
                    writer.add(new, torch.zeros_like(t) if zero else t)
                    del t
            except BaseException:
                writer.abort()
                raise
            writer.close()
            copied = copy_side_files(hf, tmp, skip=("config.json",))
            (tmp / "config.json").write_text(json.dumps(new_config, indent=2) + "\n")
            record = {
                "source": str(hf.resolve()),
                "init": init,
                "num_layers": [num_layers, len(plan)],
                "plan": [[p.index, p.source, p.repeated] for p in plan],
            }
            (tmp / "upscale_plan.json").write_text(json.dumps(record) + "\n")
    seconds = time.perf_counter() - t0
    summary = dict(tensors=writer.num_tensors, bytes=writer.total_bytes, seconds=seconds, layers=len(plan),
                   config_keys=changed, side_files=copied)
    log(f"wrote {out}: {writer.num_tensors} tensors, {writer.total_bytes / 1e9:.2f} GB in {seconds:.1f} s "
        f"({writer.total_bytes / 1e9 / max(seconds, 1e-9):.2f} GB/s); config: {', '.join(changed)} updated; "
        f"copied {', '.join(copied) or 'no side files'}")
    return summary


def load_plan_yaml(path: str) -> dict:
    """An upscale plan in YAML: keys hf, out, layers | duplicate_middle | expand_every, init, force."""
    data = load_yaml(path) or {}
    allowed = {"hf", "out", "layers", "duplicate_middle", "expand_every", "init", "force", "max_shard_gb"}
    for key in data:
        if key not in allowed:
            raise UpscaleError(f"{path}: unknown key {key!r} (allowed: {', '.join(sorted(allowed))})")
    return data


@cli_main(bad_input=(FileExistsError, FileNotFoundError, KeyError))
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="apriel upscale", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", help="YAML plan (keys as the flags, with underscores); flags override it")
    ap.add_argument("--hf", help="input HF folder (MistralForCausalLM or LlavaForConditionalGeneration) or Hub "
                                 "repo id org/name[@revision]")
    ap.add_argument("--out", help="output HF folder (written atomically)")
    ap.add_argument("--layers", help="SOLAR slices of source layers, inclusive: 0-29,10-39")
    ap.add_argument("--duplicate-middle", type=int,
                    help="copy the middle block of K layers once (Apriel: 10 for 40 -> 50)")
    ap.add_argument("--expand-every", type=int, help="LLaMA-Pro: insert a copy after every K-th layer")
    ap.add_argument("--init", choices=["copy", "identity"],
                    help="identity zeroes the copies' o_proj/down_proj (default copy)")
    ap.add_argument("--max-shard-gb", type=float, help="output shard size (default 5)")
    ap.add_argument("--force", action="store_true", default=None, help="replace a non-empty --out")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and the new config changes only")
    args = ap.parse_args(argv)
    opts = load_plan_yaml(args.config) if args.config else {}
    for key in ("hf", "out", "layers", "duplicate_middle", "expand_every", "init", "force", "max_shard_gb"):
        if getattr(args, key) is not None:
            opts[key] = getattr(args, key)
    if args.layers is not None or args.duplicate_middle is not None or args.expand_every is not None:
        # a plan flag on the command line replaces the YAML's plan
        for key in ("layers", "duplicate_middle", "expand_every"):
            opts[key] = getattr(args, key)
    if not opts.get("hf"):
        raise UpscaleError("--hf is required")
    opts["hf"] = resolve_model(opts["hf"], "--hf")
    plan_args = {k: (str(opts[k]) if k == "layers" and opts.get(k) is not None else opts.get(k))
                 for k in ("layers", "duplicate_middle", "expand_every")}
    if args.dry_run:
        config = json.loads((Path(opts["hf"]) / "config.json").read_text())
        n = text_config_of(config)["num_hidden_layers"]
        plan = build_plan(n, **plan_args)
        if opts.get("init", "copy") == "identity":
            check_identity_plan(plan, n)
        print(describe_plan(plan, n, opts.get("init", "copy")))
        return 0
    if not opts.get("out"):
        raise UpscaleError("--out is required")
    upscale(opts["hf"], opts["out"], plan_args, init=opts.get("init", "copy"), force=bool(opts.get("force")),
            max_shard_bytes=int(float(opts.get("max_shard_gb", 5)) * 1024**3))
    return 0


if __name__ == "__main__":
    sys.exit(main())
