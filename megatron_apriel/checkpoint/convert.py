"""HF <-> megatron-core distributed checkpoints, at any TP/PP, tensor by tensor: one driver loop
for every model family.

A family's checkpoint driver (:mod:`~megatron_apriel.checkpoint.mistral` for MistralForCausalLM,
:mod:`~megatron_apriel.checkpoint.llava` for Llava/Pixtral) is a module holding its HF config
mapping, its name table and its model loader; the two functions here run any family in one
direction each, and look it up in the model-family registry (:mod:`megatron_apriel.models.families`:
from the HF config.json one way, from the checkpoint's preset the other), which also gives the TP
rules. What the loop asks of a driver module: ``NAME``/``LABEL`` (messages), ``LAYOUT`` (the HF
layout written), ``preset_from_hf_config``, ``export_config``, ``table`` (its
:class:`~megatron_apriel.checkpoint.table.Entry` rows), ``hf_canonical`` (the lazy HF reader),
``build_chunks`` and ``load_canonical``.

``hf-to-mcore`` builds the family's model at the requested layout (no random init), copies HF
tensors into it one at a time from memory-mapped safetensors through the family's table, and saves
``{"model": model.sharded_state_dict()}`` with ``dist_checkpointing`` -- the same state the training
loop saves and loads, so megatron-core reshards it to any TP/PP. Beside it go ``apriel_model.yaml``
(the preset) and ``hf/`` (the source config, generation config and tokenizer files) so the way back
needs nothing else.

``mcore-to-hf`` never builds a model: :class:`McoreCheckpointReader` asks torch DCP for one
layer's slice of each stacked tensor at a time, and each HF tensor is written at its place in a
shard laid out up front (:class:`ShardedSafetensorsWriter` with a layout). Peak memory is one layer
plus the tensor being written, not a shard. The stored global tensors are already in canonical layout (TP
shards of qkv and of the gate/up halves of fc1 are placed by their global offsets), so reading is
independent of the TP/PP that saved the checkpoint.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Iterable, Iterator, Optional

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
from transformers import AutoTokenizer, GenerationConfig

from megatron_apriel.checkpoint import table as tbl
from megatron_apriel.checkpoint.dcp_io import (  # noqa: F401  (MODEL_META ... read_model_meta: this module's API too)
    DTYPES,
    MODEL_META,
    ConversionError,
    DistCheckpointReader,
    dtype_name,
    limited,
    parse_dtype,
    read_model_meta,
    write_model_meta,
)
from megatron_apriel.checkpoint.hf_io import (
    TOKENIZER_FILES,
    SafetensorsReader,
    ShardedSafetensorsWriter,
    atomic_output_dir,
    check_output_folder,
    copy_side_files,
    write_output_dir,
)
from megatron_apriel.checkpoint.model_card import add_card_args, check_card_args, export_card
from megatron_apriel.data.chat_template import CHAT_TEMPLATES, default_chat_template
from megatron_apriel.data.chat_tokenizer import ChatTokenizerError, assign_role_tokens, role_tokens
from megatron_apriel.errors import cli_main
from megatron_apriel.hub import check_push_target, push_folder, resolve_model
from megatron_apriel.models.families import ModelFamily, family_of, family_of_hf_config
from megatron_apriel.models.hf_config import HFConfigError, check_hf_dir
from megatron_apriel.models.presets import ModelPreset, get_preset
from megatron_apriel.outputs import ArgumentParser, check_output_dir, positive_int, signals_deferred
from megatron_apriel.runtime import init_distributed
from megatron_apriel.runtime.log import is_rank0, log0, progress

HF_SIDE = "hf"  # sub-folder of a converted dist checkpoint holding the source HF side files
_ST_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def driver_of(family: ModelFamily):
    """The checkpoint driver module a registered family names."""
    return importlib.import_module(family.checkpoint_driver)


def hf_family(hf_dir: str | os.PathLike):
    """The family driver of an HF folder, as the registry reads its config.json."""
    try:
        cfg = json.loads((Path(hf_dir) / "config.json").read_text())
    except (OSError, ValueError):
        cfg = {}  # the text family's driver then names what is wrong with the folder
    return driver_of(family_of_hf_config(cfg))


def preset_from_hf_dir(hf_dir: str | os.PathLike, family=None) -> ModelPreset:
    """The preset of an HF folder's config.json; a field the model cannot compute is a ConversionError."""
    family = family or hf_family(hf_dir)
    try:
        cfg, _ = check_hf_dir(hf_dir, report=is_rank0())
        return family.preset_from_hf_config(cfg, name=Path(hf_dir).name)
    except HFConfigError as e:
        raise ConversionError(str(e)) from None


def _safetensors_dtype(reader: SafetensorsReader, name: str) -> torch.dtype:
    st = reader.dtype(name)
    if st not in _ST_DTYPES:
        raise ConversionError(f"{reader.folder}: unsupported tensor dtype {st}")
    return _ST_DTYPES[st]


# --------------------------------------------------------------------------- HF -> mcore
def hf_to_mcore_checkpoint(hf_dir: str | os.PathLike, out_dir: str | os.PathLike, tp: int = 1, pp: int = 1,
                           dtype: Optional[str | torch.dtype] = None, tokenizer: Optional[str] = None,
                           force: bool = False) -> dict:
    """Write a megatron-core dist checkpoint of the HF model in ``hf_dir`` to ``out_dir``.

    Run in one process (TP=PP=1) or under torchrun with ``tp * pp`` processes (each rank loads only
    its shards). ``dtype`` defaults to the dtype of the HF tensors. Returns a summary dict.
    """
    start = time.time()
    family = hf_family(hf_dir)
    preset = preset_from_hf_dir(hf_dir, family)
    reader = SafetensorsReader(hf_dir)
    canonical = family.hf_canonical(reader, preset)
    if isinstance(dtype, str):
        dtype = parse_dtype(dtype)
    dtype = dtype or _safetensors_dtype(reader, canonical.entries[tbl.EMBEDDING].hf[0])
    for what, n in family_of(preset).tp_divides(preset):
        if n % tp:
            raise ConversionError(f"tp={tp} does not divide {what} ({n}) of {hf_dir}")
    if preset.num_layers % pp:
        raise ConversionError(f"pp={pp} does not divide num_layers={preset.num_layers}")
    out = Path(out_dir)
    n_out = canonical.hf_bytes * dtype.itemsize // max(_safetensors_dtype(
        reader, canonical.entries[tbl.EMBEDDING].hf[0]).itemsize, 1)
    if is_rank0():  # before the model is built: the folder, its free space for the tensors
        check_output_folder(out, force, n_out)

    init_distributed(tp=tp, pp=pp, device="cpu", seed=None)
    config = preset.transformer_config(tp=tp, pp=pp, params_dtype=dtype, bf16=dtype == torch.bfloat16,
                                       fp16=dtype == torch.float16, device="cpu", perform_initialization=False)
    chunks = family.build_chunks(preset, config)
    n_params = sum(1 for c in chunks for _ in c.parameters())
    bar = progress(n_params, "hf-to-mcore" + family.LABEL)

    # the loader asks for each parameter once; count them for the progress bar.
    class _Tracked:
        def __contains__(self, name):
            return name in canonical

        def __getitem__(self, name):
            t = canonical[name]
            bar.update(1)
            return t

    family.load_canonical(chunks, _Tracked(), preset)
    bar.close()
    reader.close()
    state = {"model": chunks[0].sharded_state_dict(), "checkpoint_version": 3.0}

    def write(tmp: Path) -> None:
        # megatron-core writes the shards from forked workers through a multiprocessing manager; a
        # Ctrl-C that reaches them mid-way leaves this process waiting on the dead manager forever. So
        # SIGINT/SIGTERM wait (the workers inherit the mask) until the shards are written, then act.
        with signals_deferred():
            dist_checkpointing.save(state, str(tmp), get_default_save_sharded_strategy("torch_dist"))
        if is_rank0():
            write_model_meta(tmp, preset, dtype, source=str(Path(hf_dir).resolve()), saved_tp=tp, saved_pp=pp)
            side = tmp / HF_SIDE
            side.mkdir()
            copy_side_files(hf_dir, side)
            if tokenizer:
                _copy_tokenizer(tokenizer, side)

    write_output_dir(out, write, force=force, expected_bytes=n_out)
    summary = {"tensors": n_params, "bytes": canonical.hf_bytes, "dtype": dtype_name(dtype), "tp": tp, "pp": pp,
               "seconds": round(time.time() - start, 2)}
    log0(f"hf-to-mcore{family.LABEL}: {n_params} tensors per rank, {canonical.hf_bytes / 1e9:.3f} GB read, "
         f"{summary['dtype']}, tp={tp} pp={pp}, {summary['seconds']:.1f} s -> {out}")
    return summary


def _copy_tokenizer(src: str | os.PathLike, dst: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        p = Path(src) / name
        if p.is_file():
            (dst / name).write_bytes(p.read_bytes())
            copied.append(name)
    if not copied:
        raise ConversionError(f"{src}: no tokenizer files ({', '.join(TOKENIZER_FILES[:4])}, ...)")
    return copied


# --------------------------------------------------------------------------- reading dist checkpoints
class McoreCheckpointReader(DistCheckpointReader):
    """A GPT (or Llava) dist checkpoint read by canonical names: this converter's output, a training
    ``iter_*`` folder or save root.

    ``get`` returns one layer's full tensor at a time (see
    :class:`~megatron_apriel.checkpoint.dcp_io.DistCheckpointReader`);
    :meth:`keys` lists the decoder's canonical names in streaming order. Embedding and output rows
    are the padded vocabulary as stored (``mcore_to_hf`` drops the padding).
    """

    def __init__(self, ckpt_dir: str | os.PathLike):
        super().__init__(ckpt_dir)
        layer_keys = [k for k in self.meta if k.startswith("decoder.layers.")]
        if tbl.EMBEDDING not in self.meta or not layer_keys:
            raise ConversionError(f"{self.path}: no GPT model tensors (found {limited(self.meta, 8)})")
        self.num_layers: int = self.meta[layer_keys[0]].global_shape[0]

    def keys(self) -> list[str]:
        names = [tbl.EMBEDDING]
        for i in range(self.num_layers):
            names += [n for s in tbl.LAYER_SUFFIXES for n in [f"decoder.layers.{i}.{s}"]
                      if self.stored_key(n)[0] in self.meta]
        names.append(tbl.FINAL_NORM)
        if tbl.OUTPUT in self.meta:
            names.append(tbl.OUTPUT)
        return names

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.keys():
            yield name, self.get(name)


def load_mcore_canonical(ckpt_dir: str | os.PathLike, names: Optional[Iterable[str]] = None
                         ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (canonical name, full tensor) from a dist checkpoint, streaming one layer at a time.

    ``names`` restricts (and orders) what is read; by default every tensor, layer by layer. For
    averaging, iterate several checkpoints' generators in lock-step. Initialises a one-process
    CPU world if torch.distributed is not running.
    """
    if not torch.distributed.is_initialized():
        init_distributed(device="cpu", seed=None)
    reader = McoreCheckpointReader(ckpt_dir)
    for name in (list(names) if names is not None else reader.keys()):
        yield name, reader.get(name)


# --------------------------------------------------------------------------- mcore -> HF
def mcore_to_hf_checkpoint(ckpt_dir: str | os.PathLike, out_dir: str | os.PathLike,
                           preset: Optional[str | ModelPreset] = None, tokenizer: Optional[str] = None,
                           chat_template: Optional[str] = None, dtype: Optional[str | torch.dtype] = None,
                           max_shard_bytes: int = 5 * 1024**3, force: bool = False, card: Optional[dict] = None
                           ) -> dict:
    """Write an HF folder (MistralForCausalLM, or LlavaForConditionalGeneration for a multimodal
    checkpoint) from a dist checkpoint, streaming tensor by tensor.

    ``preset``: a preset name or object; default: ``apriel_model.yaml`` beside the checkpoint.
    ``tokenizer``: folder with tokenizer files; default: those stored at conversion time.
    ``chat_template``: a template name (``apriel``, ``apriel-nemotron``, ``apriel-1.5``; its role tokens then
    take reserved special slots of the exported tokenizer) or a path to a .jinja file, written as
    ``chat_template.jinja``; default: the released format of the preset (apriel-nemotron-15b,
    apriel-1.5-15b), else the tokenizer's own.
    ``card``: the model card's options (:func:`megatron_apriel.checkpoint.model_card.export_card`).
    """
    start = time.time()
    if not torch.distributed.is_initialized():
        init_distributed(device="cpu", seed=None)
    reader = McoreCheckpointReader(ckpt_dir)
    if isinstance(preset, str):
        preset = get_preset(preset)
    if preset is None:
        preset, _ = read_model_meta(reader.path)

    chat_template = default_chat_template(chat_template, preset.name, fallback=None, who="mcore-to-hf")
    if preset.num_layers != reader.num_layers:
        raise ConversionError(f"{reader.path}: {reader.num_layers} layers stored but preset {preset.name} "
                              f"has {preset.num_layers}")
    family = driver_of(family_of(preset))
    if isinstance(dtype, str):
        dtype = parse_dtype(dtype)
    dtype = dtype or reader.meta[tbl.EMBEDDING].dtype
    side = Path(reader.path) / HF_SIDE
    side = side if side.is_dir() else None
    template = read_chat_template(chat_template)

    # The HF names and shapes, from the stored metadata alone (the mapping run on meta tensors),
    # let the writer lay out every shard up front and write each tensor as soon as it is read.
    entries = family.table(preset, family.LAYOUT)
    layout = [(name, tuple(t.shape), dtype) for name, t in tbl.mcore_to_hf(
        lambda n: torch.empty(reader.shape_dtype(n)[0], dtype=reader.shape_dtype(n)[1], device="meta"), entries)]
    n_out = sum(math.prod(shape) for _, shape, _ in layout) * dtype.itemsize
    with atomic_output_dir(out_dir, force=force, expected_bytes=n_out) as tmp:
        writer = ShardedSafetensorsWriter(tmp, max_shard_bytes=max_shard_bytes, layout=layout)
        bar = progress(len(layout), "mcore-to-hf" + family.LABEL)
        try:
            for name, t in tbl.mcore_to_hf(reader.get, entries):
                writer.add(name, t.to(dtype).contiguous())
                del t
                bar.update(1)
        except BaseException:
            writer.abort()
            raise
        writer.close()
        bar.close()
        config = family.export_config(preset, side, dtype)
        copied = write_hf_side_files(tmp, out_dir, preset, side, tokenizer, template)
        pad = _tokenizer_pad_id(tmp) if copied else None
        if pad is not None and getattr(config, "pad_token_id", None) is None:
            # HF trainers (TRL's GRPO among them) write the tokenizer's pad id into config.json when
            # they save, and vLLM and transformers' generate read it from there: the export carries it
            # too, so a folder trained from it keeps the same config (merges compare configs) and
            # serving needs no pad id passed by hand.
            config.pad_token_id = pad
        config.save_pretrained(tmp)
        export_card(tmp, reader.path, preset.name, dtype_name(dtype), **(card or {}))
    summary = {"tensors": writer.num_tensors, "bytes": writer.total_bytes, "dtype": dtype_name(dtype),
               "seconds": round(time.time() - start, 2), "tokenizer_files": copied}
    log0(f"mcore-to-hf{family.LABEL}: {writer.num_tensors} tensors, {writer.total_bytes / 1e9:.3f} GB, "
         f"{summary['dtype']}, {summary['seconds']:.1f} s -> {out_dir}")
    return summary


def read_chat_template(chat_template: Optional[str]) -> Optional[str]:
    """A template name (``apriel``, ``apriel-nemotron``, ``apriel-1.5``) -> that template; a path -> that file's
    text; None -> None."""
    if chat_template in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[chat_template]
    return Path(chat_template).read_text(encoding="utf-8") if chat_template else None


def write_hf_side_files(tmp: Path, out_dir, preset: ModelPreset, side: Optional[Path], tokenizer: Optional[str],
                        template: Optional[str]) -> list[str]:
    """Everything of an exported HF folder but its tensors and config: the generation config (the
    stored one, else the preset's special tokens), the tokenizer (``tokenizer`` or the files stored at
    conversion time) with an image processor's files when there are any, and the chat template.
    Returns the tokenizer files copied."""
    if side is not None and (side / "generation_config.json").is_file():
        GenerationConfig.from_pretrained(side).save_pretrained(tmp)
    else:
        GenerationConfig(bos_token_id=preset.bos_token_id, eos_token_id=preset.eos_token_id).save_pretrained(tmp)
    tok_src = Path(tokenizer) if tokenizer else side
    copied = []
    if tok_src is not None:
        for f in ("preprocessor_config.json", "processor_config.json"):  # a Llava's image processor travels too
            if (tok_src / f).is_file():
                (tmp / f).write_bytes((tok_src / f).read_bytes())
        try:
            copied = _copy_tokenizer(tok_src, tmp)
        except ConversionError:
            if tokenizer:
                raise
    if not copied:
        print(f"warning: no tokenizer files written to {out_dir}; pass --tokenizer DIR", file=sys.stderr)
    if template is not None:
        _role_tokens_for(tmp, template)
        (tmp / "chat_template.jinja").write_text(template, encoding="utf-8")
        cfg_path = tmp / "tokenizer_config.json"
        if cfg_path.is_file():  # one source of truth for the template
            tok_cfg = json.loads(cfg_path.read_text())
            if tok_cfg.pop("chat_template", None) is not None:
                cfg_path.write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False))
    return copied


def _tokenizer_pad_id(folder: Path) -> Optional[int]:
    """The pad token id of the tokenizer written to ``folder``, None when it defines none."""
    return AutoTokenizer.from_pretrained(folder).pad_token_id


def _role_tokens_for(tok_dir: Path, template: str) -> None:
    """A named Apriel format's role tokens take reserved special slots of the exported tokenizer (see
    megatron_apriel.data.chat_tokenizer), so the folder renders and encodes turns as the format does;
    a tokenizer without free slots is exported as it is, with a warning."""
    if template not in CHAT_TEMPLATES.values() or not (tok_dir / "tokenizer.json").is_file():
        return
    try:
        ids = assign_role_tokens(tok_dir, role_tokens(template))
    except ChatTokenizerError as e:
        print(f"warning: {e}: the exported chat template's role tokens are encoded as text", file=sys.stderr)
        return
    print("chat template role tokens: " + ", ".join(f"{t}={i}" for t, i in ids.items()), file=sys.stderr)


# --------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    ap = ArgumentParser(prog="apriel convert", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("hf-to-mcore", help="HF safetensors folder -> megatron-core dist checkpoint")
    a.add_argument("--hf", required=True, help="HF folder (config.json + safetensors) or Hub repo id org/name[@rev]")
    a.add_argument("--out", required=True)
    a.add_argument("--tp", type=positive_int, default=1, help="run under torchrun with tp*pp processes when > 1")
    a.add_argument("--pp", type=positive_int, default=1)
    a.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: the HF tensors' dtype")
    a.add_argument("--tokenizer", default=None, help="tokenizer folder to store instead of the HF folder's")
    a.add_argument("--force", action="store_true", help="replace a non-empty --out")
    b = sub.add_parser("mcore-to-hf", help="megatron-core dist checkpoint -> HF folder")
    b.add_argument("--ckpt", required=True, help="dist checkpoint folder, iter_* folder or training save root")
    b.add_argument("--out", required=True)
    b.add_argument("--preset", default=None, help=f"default: {MODEL_META} beside the checkpoint")
    b.add_argument("--tokenizer", default=None, help="default: the tokenizer stored at conversion")
    b.add_argument("--chat-template", default=None,
                   help="'apriel', 'apriel-nemotron', 'apriel-1.5' or a .jinja file (default: the released format of "
                        "the preset, apriel-nemotron-15b -> apriel-nemotron, apriel-1.5-15b -> apriel-1.5; else the "
                        "tokenizer's own)")
    b.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: the stored dtype")
    b.add_argument("--max-shard-size", default="5GB", type=shard_size, help="safetensors shard size (e.g. 5GB, 500MB)")
    b.add_argument("--force", action="store_true")
    add_card_args(b)
    b.add_argument("--push-to-hub", default=None, metavar="REPO",
                   help="then upload the folder to this Hub model repo (org/name; created private if missing; "
                        "token from HF_TOKEN or `hf auth login`)")
    return ap


def parse_size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    t = text.strip().upper()
    for unit in sorted(units, key=len, reverse=True):
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * units[unit])
    return int(t)


def shard_size(text: str) -> int:
    """``--max-shard-size``: a positive size such as 5GB or 500MB."""
    try:
        n = parse_size(text)
    except ValueError:
        n = 0
    if n <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive size such as 5GB or 500MB, got {text!r}")
    return n


@cli_main(bad_input=(FileExistsError, FileNotFoundError, KeyError))
def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    check_output_dir(args.out, "--out")  # before torch.distributed starts and the checkpoint is read
    if args.tokenizer:
        args.tokenizer = resolve_model(args.tokenizer, "--tokenizer")
    if args.cmd == "hf-to-mcore":
        args.hf = resolve_model(args.hf, "--hf")
        hf_to_mcore_checkpoint(args.hf, args.out, tp=args.tp, pp=args.pp, dtype=args.dtype,
                               tokenizer=args.tokenizer, force=args.force)
    else:
        check_card_args(args.model_card_extra, args.eval_results)
        check_push_target(args.push_to_hub)
        card = dict(license=args.license, base_model=args.base_model, extra=args.model_card_extra,
                    eval_results=args.eval_results)
        mcore_to_hf_checkpoint(args.ckpt, args.out, preset=args.preset, tokenizer=args.tokenizer,
                               chat_template=args.chat_template, dtype=args.dtype,
                               max_shard_bytes=args.max_shard_size, force=args.force, card=card)
        if args.push_to_hub:
            push_folder(args.out, args.push_to_hub)
    return 0


if __name__ == "__main__":
    sys.exit(main())
