"""Checkpoint averaging and weighted merging: ``sum_i w_i * theta_i``, tensor by tensor.

Apriel averages equally spaced checkpoints at the end of every stage (3 after CPT, 6 after the
Pixtral upscale-training) and merges specialists with weights (C = 0.5 A + 0.5 B, final =
0.3 E + 0.3 F + 0.4 G). All of these are the linear merge, so one streaming function does them:
each tensor is processed in blocks of rows; for each block the inputs are read one at a time and
accumulated in fp32 (bf16 sums lose bits after a few adds), cast back to the input dtype and
written at its place in the output. Peak memory is a block's fp32 accumulator plus one input
block (tens of MB), never a tensor, a shard or the model. The maths is elementwise, so blocks give
the same bits as whole tensors.

Written by hand rather than with mergekit: the linear merge is ten lines, and the checks that
matter here (same architecture, same tokenizer, same names/shapes/dtypes, weights summing to 1,
equispaced selection from a Megatron run directory) are not mergekit's. The YAML form follows
mergekit's ``merge_method: linear`` schema so existing merge files read the same.

Inputs are HF folders (``model.safetensors`` or sharded with an index; blocks are row slices read
from the mapping) or megatron-core distributed checkpoints (``iter_0000100/``), read through
:class:`~megatron_apriel.checkpoint.dcp_io.DistCheckpointReader` in blocks of the stored chunks
(one layer of a stacked tensor) and written back as a model-only dist checkpoint block by block,
with the inputs' ``apriel_model.yaml`` (they must describe the same model) so that training,
conversion and a further merge read the result like any checkpoint.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from tqdm import tqdm

from megatron_apriel.checkpoint.dcp_io import (
    DTYPES,
    MODEL_META,
    ConversionError,
    DistCheckpointReader,
    LazyBlockSavePlanner,
    find_model_meta,
    read_model_meta,
    write_model_meta,
)
from megatron_apriel.checkpoint.hf_io import (
    VOCAB_FILES,
    SafetensorsReader,
    ShardedSafetensorsWriter,
    atomic_output_dir,
    copy_side_files,
)
from megatron_apriel.checkpoint.model_card import add_card_args, check_card_args, merge_card
from megatron_apriel.config import load_yaml
from megatron_apriel.errors import InputError, cli_main
from megatron_apriel.hub import parse_repo_id, resolve_model
from megatron_apriel.models.hf_config import HFConfigError, check_hf_dir

# config.json keys that may differ between checkpoints of one architecture.
VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "use_cache"}
STEP_DIR = re.compile(r"(?:iter_|checkpoint-)(\d+)")


class AverageError(InputError):
    """Inputs that cannot be averaged; the message names the file, tensor or key that differs."""


# ------------------------------------------------------------------------------------- selection
def list_run_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """``(step, folder)`` of a run directory: Megatron ``iter_0000100/`` or HF/TRL ``checkpoint-100/``."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise AverageError(f"{run_dir}: not a directory")
    found = []
    for child in run_dir.iterdir():
        m = STEP_DIR.fullmatch(child.name)
        if m and child.is_dir():
            found.append((int(m.group(1)), child))
    if not found:
        raise AverageError(f"{run_dir}: no iter_NNNNNNN/ or checkpoint-N/ folders")
    return sorted(found)


def equispaced_targets(last: int, k: int, min_step: int = 0) -> list[float]:
    """``k`` evenly spaced steps ending at ``last``: the ends of ``k`` equal parts of ``(min_step, last]``.

    A run of 16213 iterations and k=3 gives 5404.3, 10808.7, 16213. The targets depend on the run's
    length only, not on which folders retention happened to keep, so the choice is the same whether
    a run kept every checkpoint or only every ``keep_every``-th plus the last few.
    """
    if k < 1:
        raise AverageError(f"--equispaced {k}: needs at least 1 checkpoint")
    span = (last - min_step) / k
    return [last - span * (k - 1 - j) for j in range(k)]


def pick_by_step(steps: list[int], k: int, min_step: int = 0) -> list[int]:
    """The ``k`` checkpoint steps nearest to :func:`equispaced_targets` (ties go to the later step).

    Picking by position in the folder list would go wrong as soon as retention keeps uneven steps:
    folders 5000, 10000, 15000, 16000, 16213 would give 5000, 15000, 16213. Refuses when two targets
    land on the same checkpoint, i.e. when the run did not keep ``k`` checkpoints spread over it.
    """
    steps = sorted(s for s in steps if s >= min_step)
    if not steps:
        raise AverageError(f"no checkpoints at or after step {min_step}")
    targets = equispaced_targets(steps[-1], k, min_step)
    picked = [min(steps, key=lambda s: (abs(s - t), -s)) for t in targets]
    if len(set(picked)) != k:
        raise AverageError(
            f"--equispaced {k}: target steps {', '.join(f'{t:.0f}' for t in targets)} fall on only "
            f"{len(set(picked))} distinct checkpoints of steps {', '.join(map(str, steps))}; keep more "
            f"checkpoints (checkpoint.keep_every) or name them with --steps")
    return picked


def pick_steps(steps: list[int], wanted: list[int]) -> list[int]:
    """Exactly the steps asked for (``--steps``); a missing one is an error that lists what exists."""
    missing = sorted(set(wanted) - set(steps))
    if missing:
        raise AverageError(f"--steps: no checkpoint at step {', '.join(map(str, missing))} "
                           f"(the run has steps {', '.join(map(str, sorted(steps)))})")
    if len(set(wanted)) != len(wanted):
        raise AverageError(f"--steps: a step is named twice: {' '.join(map(str, wanted))}")
    return sorted(wanted)


# ---------------------------------------------------------------------------------------- inputs
def is_hf_folder(path: Path) -> bool:
    return (path / "model.safetensors").exists() or (path / "model.safetensors.index.json").exists()


def is_mcore_folder(path: Path) -> bool:
    return (path / ".metadata").exists() or (path / "metadata.json").exists()


# Rows per block: at most this many elements, i.e. a 64 MiB fp32 accumulator.
BLOCK_ELEMENTS = 16 * 2**20


class Checkpoint:
    """One input: names, shapes, dtypes and readers of a tensor or of its row blocks, whatever the format."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if is_hf_folder(self.path):
            self.kind = "hf"
            self._reader = SafetensorsReader(self.path)
            self.names = self._reader.keys()
            self.shapes = {n: self._reader.shape(n) for n in self.names}
            self.dtypes = {n: self._reader.torch_dtype(n) for n in self.names}
        elif is_mcore_folder(self.path):
            self.kind = "mcore"
            try:
                self._mcore = DistCheckpointReader(self.path)
            except (ConversionError, FileNotFoundError) as e:
                raise AverageError(str(e)) from None
            self.names = list(self._mcore.meta)
            self.shapes = {n: list(m.global_shape) for n, m in self._mcore.meta.items()}
            self.dtypes = {n: m.dtype for n, m in self._mcore.meta.items()}
        else:
            raise AverageError(f"{self.path}: neither an HF safetensors folder nor a megatron-core distributed "
                               "checkpoint")

    def get(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The tensor, or its rows ``rows[0]:rows[1]``."""
        if self.kind == "mcore":
            return self._mcore.read(name, *(rows or (None, None)))
        t = self._reader.get(name) if rows is None else self._reader.get_rows(name, *rows)
        # Closing the file handles after each read unmaps the file once the tensor is freed, so
        # pages of tensors already merged do not accumulate in the resident set (RSS would otherwise
        # grow to the sum of the input sizes, reclaimable but alarming on a shared node).
        self._reader.close()
        return t

    def blocks(self, name: str) -> list[tuple[int, int] | None]:
        """Row ranges covering ``name``, each of at most :data:`BLOCK_ELEMENTS` elements where possible.

        Dist checkpoints are cut only where stored chunks start (a layer of a stacked tensor, a TP
        shard): DCP reads whole stored chunks, so a finer cut would re-read one for every block.
        """
        shape = self.shapes[name]
        if not shape or shape[0] == 0 or not self.dtypes[name].is_floating_point:
            return [None]
        per_row = math.prod(shape[1:])
        if self.kind == "mcore":
            cuts = self._mcore.row_starts(name) + [shape[0]]
        else:
            cuts = list(range(0, shape[0], max(1, BLOCK_ELEMENTS // max(per_row, 1)))) + [shape[0]]
        out, start, end = [], 0, 0
        for cut in cuts[1:]:
            # grow a block over whole ranges while it stays within the budget
            if end > start and (cut - start) * per_row > BLOCK_ELEMENTS:
                out.append((start, end))
                start = end
            end = cut
        out.append((start, end))
        return [None] if out == [(0, shape[0])] else out

    def config(self) -> dict | None:
        p = self.path / "config.json"
        return json.loads(p.read_text()) if p.exists() else None

    def tokenizer_hashes(self) -> dict[str, str]:
        return {n: hashlib.sha256((self.path / n).read_bytes()).hexdigest()[:16]
                for n in VOCAB_FILES if (self.path / n).exists()}

    def close(self):
        if self.kind == "hf":
            self._reader.close()


def _config_diff(a: dict, b: dict, where: str = "") -> list[str]:
    diffs = []
    for key in sorted(set(a) | set(b)):
        if key in VOLATILE_CONFIG_KEYS:
            continue
        va, vb = a.get(key, "<missing>"), b.get(key, "<missing>")
        if isinstance(va, dict) and isinstance(vb, dict):
            diffs += _config_diff(va, vb, f"{where}{key}.")
        elif va != vb:
            diffs.append(f"{where}{key}: {va!r} vs {vb!r}")
    return diffs


def check_compatible(ckpts: list[Checkpoint]) -> None:
    """Raise :class:`AverageError` naming the first thing that differs from the first input.

    The first HF input's config also goes through the conversion's check (the others must equal
    it): a merge is trained or converted next, so what megatron-core cannot compute is refused now.
    """
    ref = ckpts[0]
    ref_cfg, ref_tok = ref.config(), ref.tokenizer_hashes()
    if ref.kind == "hf" and ref_cfg is not None:
        try:
            check_hf_dir(ref.path, report=True)
        except HFConfigError as e:
            raise AverageError(str(e)) from None
    for c in ckpts[1:]:
        if c.kind != ref.kind:
            raise AverageError(f"{c.path} is a {c.kind} checkpoint but {ref.path} is {ref.kind}")
        cfg = c.config()
        if (cfg is None) != (ref_cfg is None):
            raise AverageError(f"config.json present in only one of {ref.path} and {c.path}")
        if cfg is not None:
            diffs = _config_diff(ref_cfg, cfg)
            if diffs:
                raise AverageError(f"architectures differ, config.json of {ref.path} vs {c.path}: "
                                   f"{'; '.join(diffs[:5])}")
        tok = c.tokenizer_hashes()
        if tok != ref_tok:
            files = sorted(n for n in set(tok) | set(ref_tok) if tok.get(n) != ref_tok.get(n))
            raise AverageError(f"tokenizers differ between {ref.path} and {c.path}: {', '.join(files)}")
        missing = sorted(set(ref.names) - set(c.names))
        extra = sorted(set(c.names) - set(ref.names))
        if missing or extra:
            raise AverageError(f"tensor names differ: {c.path} lacks {missing[:3]} and has extra {extra[:3]} "
                               f"compared with {ref.path}")
        for n in ref.names:
            if c.shapes[n] != ref.shapes[n]:
                raise AverageError(f"tensor {n}: shape {c.shapes[n]} in {c.path} vs {ref.shapes[n]} in {ref.path}")
            if c.dtypes[n] != ref.dtypes[n]:
                raise AverageError(f"tensor {n}: dtype {c.dtypes[n]} in {c.path} vs {ref.dtypes[n]} in {ref.path}")


def check_weights(weights: list[float], n: int, allow_unnormalised: bool) -> list[float]:
    if len(weights) != n:
        raise AverageError(f"{len(weights)} weights for {n} checkpoints")
    if any(not math.isfinite(w) for w in weights):
        raise AverageError(f"weights must be finite numbers, got {weights}")
    total = math.fsum(weights)
    if not allow_unnormalised and abs(total - 1.0) > 1e-6:
        raise AverageError(f"weights {weights} sum to {total:g}, not 1 "
                           "(pass --allow-unnormalised to use them as given)")
    return [float(w) for w in weights]


# ------------------------------------------------------------------------------------------ merge
def weighted_tensor(ckpts: list[Checkpoint], weights: list[float], name: str,
                    rows: tuple[int, int] | None = None) -> torch.Tensor:
    """``sum_i w_i * t_i`` (of rows ``rows`` only, if given) accumulated in fp32 (fp64 for fp64
    inputs), in the inputs' dtype."""
    dtype = ckpts[0].dtypes[name]
    if not dtype.is_floating_point:
        # integer buffers (rare in LM checkpoints) cannot be averaged: they must agree
        first = ckpts[0].get(name, rows)
        for c in ckpts[1:]:
            if not torch.equal(first, c.get(name, rows)):
                raise AverageError(f"non-float tensor {name} differs between {ckpts[0].path} and {c.path}")
        return first
    acc_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    # copy=True: never scale in place a tensor that may still view the input file's mapping
    acc = ckpts[0].get(name, rows).to(acc_dtype, copy=True).mul_(weights[0])
    for c, w in zip(ckpts[1:], weights[1:]):
        # add_ upcasts element by element: no full-size fp32 copy of the input
        acc.add_(c.get(name, rows), alpha=w)
    return acc.to(dtype)


def average(inputs: list[str | Path], out: str | Path, weights: list[float] | None = None,
            allow_unnormalised: bool = False, force: bool = False, max_shard_bytes: int = 5 * 1024**3,
            log=print, card: dict | None = None) -> dict:
    """Write the weighted average of ``inputs`` (HF folders) to ``out`` as an HF folder, with a model
    card (``card``: its options, see :func:`megatron_apriel.checkpoint.model_card.merge_card`)."""
    if len(inputs) < 2:
        raise AverageError(f"need at least 2 checkpoints, got {len(inputs)}")
    weights = check_weights(weights if weights is not None else [1.0 / len(inputs)] * len(inputs),
                            len(inputs), allow_unnormalised)
    ckpts = [Checkpoint(p) for p in inputs]
    try:
        check_compatible(ckpts)
        if ckpts[0].kind == "mcore":
            return _average_mcore(ckpts, weights, out, force, log)
        for c, w in zip(ckpts, weights):
            log(f"  {w:8.4f} x {c.path}")
        t0 = time.perf_counter()
        ref = ckpts[0]
        layout = [(n, tuple(ref.shapes[n]), ref.dtypes[n]) for n in ref.names]
        with atomic_output_dir(out, force=force) as tmp:
            # shards laid out up front: each block goes to its place in the output as it is computed
            writer = ShardedSafetensorsWriter(tmp, max_shard_bytes=max_shard_bytes, layout=layout)
            try:
                for name in tqdm(ref.names, desc="average", unit="tensor", file=sys.stderr, mininterval=2.0):
                    blocks = ref.blocks(name)
                    if blocks == [None]:
                        writer.add(name, weighted_tensor(ckpts, weights, name))
                    else:
                        writer.add_parts(name, (weighted_tensor(ckpts, weights, name, b) for b in blocks))
            except BaseException:
                writer.abort()
                raise
            writer.close()
            copied = copy_side_files(ckpts[0].path, tmp)
            record = {"method": "linear", "inputs": [str(Path(p).resolve()) for p in inputs], "weights": weights}
            (tmp / "merge.json").write_text(json.dumps(record, indent=2) + "\n")
            merge_card(tmp, inputs, weights, **(card or {}))
        seconds = time.perf_counter() - t0
    finally:
        for c in ckpts:
            c.close()
    log(f"wrote {out}: {writer.num_tensors} tensors, {writer.total_bytes / 1e9:.2f} GB, average of {len(inputs)} "
        f"in {seconds:.1f} s; copied {', '.join(copied) or 'no side files'}")
    return dict(tensors=writer.num_tensors, bytes=writer.total_bytes, seconds=seconds)


def agreed_model_meta(ckpts: list[Checkpoint]) -> tuple | None:
    """(preset, dtype) of the ``apriel_model.yaml`` every dist checkpoint input has (beside it or in
    its save root), or None when none has one; inputs that describe different models, or that have
    it only in part, are an :class:`AverageError`."""
    found = [find_model_meta(c.path) for c in ckpts]
    if not any(found):
        return None
    if not all(found):
        lacking = next(c.path for c, f in zip(ckpts, found) if f is None)
        raise AverageError(f"{lacking}: no {MODEL_META} here or in its parent, but {next(f for f in found if f)} "
                           "describes another input; average checkpoints of one model")
    try:
        metas = [read_model_meta(c.path) for c in ckpts]
    except ConversionError as e:
        raise AverageError(str(e)) from None
    (ref_preset, ref_dtype), ref_path = metas[0], found[0]
    for (preset, dtype), path in zip(metas[1:], found[1:]):
        diffs = ([f"dtype: {ref_dtype} vs {dtype}"] if dtype != ref_dtype else [])
        diffs += ref_preset.function_differences(preset)
        if diffs:
            raise AverageError(f"models differ, {ref_path} vs {path}: {'; '.join(diffs[:5])}")
    # the first input's description (the others compute the same model); a file without a dtype
    # (written by hand) gets the stored embedding's
    dtypes = ckpts[0].dtypes
    if ref_dtype:
        return ref_preset, DTYPES[ref_dtype]
    return ref_preset, dtypes.get("embedding.word_embeddings.weight", next(iter(dtypes.values())))


def _average_mcore(ckpts: list[Checkpoint], weights: list[float], out, force: bool, log) -> dict:
    """Average megatron-core dist checkpoints into a model-only dist checkpoint, block by block.

    torch.distributed.checkpoint writes a checkpoint in one ``save`` call from a state dict; here
    the plan lists every output block (a chunk of a tensor's global shape: one layer of a stacked
    tensor, as megatron-core stores them) and :func:`~megatron_apriel.checkpoint.dcp_io.LazyBlockSavePlanner`
    computes each block only when the writer asks for it. The model description (``apriel_model.yaml``)
    is the one the inputs agree on. Non-tensor model entries (``_extra_state`` objects) and the side
    files (``metadata.json``, ``common.pt``, the saved run config) come from the first input, so
    megatron-core's ``dist_checkpointing.load`` reads the result like any checkpoint; it has no
    optimizer state, so load it as weights only.
    """
    t0 = time.perf_counter()
    model_meta = agreed_model_meta(ckpts)
    ref = ckpts[0]
    blocks = [(name, b) for name in ref.names for b in ref.blocks(name)]
    objects = ref._mcore.read_objects()
    bar = tqdm(total=len(blocks), desc="average (mcore)", unit="block", file=sys.stderr, mininterval=2.0)
    planner = LazyBlockSavePlanner(blocks, ref.shapes, ref.dtypes,
                                   lambda name, rows: weighted_tensor(ckpts, weights, name, rows),
                                   lambda: bar.update(1))
    first = ref.path
    with atomic_output_dir(out, force=force) as tmp:
        dcp.save(objects, storage_writer=dcp.FileSystemWriter(str(tmp)), planner=planner, no_dist=True)
        for side in first.iterdir():
            if side.is_file() and side.suffix != ".distcp" and side.name != ".metadata":
                shutil.copyfile(side, tmp / side.name)  # the mode from the umask, not the input's
        if model_meta is not None:
            write_model_meta(tmp, *model_meta)
        record = {"method": "linear", "inputs": [str(c.path.resolve()) for c in ckpts], "weights": weights}
        (tmp / "merge.json").write_text(json.dumps(record, indent=2) + "\n")
    bar.close()
    seconds = time.perf_counter() - t0
    log(f"wrote {out}: {len(ref.names)} tensors in {len(blocks)} blocks (megatron-core dist checkpoint, model only) "
        f"in {seconds:.1f} s")
    return dict(tensors=len(ref.names), seconds=seconds)


# ------------------------------------------------------------------------------------------- YAML
def load_merge_yaml(path: str) -> dict:
    """A mergekit-style linear merge::

        merge_method: linear
        models:
          - model: runs/E
            parameters: {weight: 0.3}
        out: runs/final            # optional, --out overrides
        allow_unnormalised: false  # optional
    """
    data = load_yaml(path) or {}
    allowed = {"merge_method", "models", "out", "allow_unnormalised"}
    for key in data:
        if key not in allowed:
            raise AverageError(f"{path}: unknown key {key!r} (allowed: {', '.join(sorted(allowed))})")
    if data.get("merge_method", "linear") != "linear":
        raise AverageError(f"{path}: merge_method {data['merge_method']!r} not supported (only linear)")
    models = data.get("models")
    if not isinstance(models, list) or not models:
        raise AverageError(f"{path}: 'models' must be a non-empty list of {{model: PATH, parameters: {{weight: W}}}}")
    paths, weights = [], []
    for i, m in enumerate(models):
        where = f"{path}: models[{i}]"
        if not isinstance(m, dict) or "model" not in m:
            raise AverageError(f"{where}: needs a 'model' key")
        unknown = set(m) - {"model", "parameters"}
        if unknown:
            raise AverageError(f"{where}: unknown key {sorted(unknown)[0]!r}")
        params = m.get("parameters") or {}
        if set(params) - {"weight"}:
            raise AverageError(f"{where}.parameters: unknown key {sorted(set(params) - {'weight'})[0]!r}")
        if "weight" not in params:
            raise AverageError(f"{where}.parameters.weight is required")
        try:
            weights.append(float(params["weight"]))
        except (TypeError, ValueError):
            raise AverageError(f"{where}.parameters.weight: not a number ({params['weight']!r})") from None
        model = Path(str(m["model"]))
        if not model.exists() and parse_repo_id(str(m["model"])):
            paths.append(str(m["model"]))  # a Hub repo id: the callers resolve it (megatron_apriel.hub)
            continue
        paths.append(model if model.is_absolute() else Path.cwd() / model)
    return dict(inputs=paths, weights=weights, out=data.get("out"),
                allow_unnormalised=bool(data.get("allow_unnormalised", False)))


def select_from_run(run_dir, k: int | None, steps: list[int] | None, min_step: int = 0,
                    inputs: list | None = None) -> list[Path]:
    """The folders of ``run_dir`` that ``--equispaced K`` or ``--steps`` choose; prints the choice."""
    if inputs:
        raise AverageError("--equispaced/--steps pick the inputs from --run-dir; do not also list them")
    if (k is None) == (not steps):
        raise AverageError("give one of --equispaced K or --steps")
    if not run_dir:
        raise AverageError("--equispaced/--steps need --run-dir")
    found = dict(list_run_checkpoints(run_dir))
    try:
        picked = pick_steps(list(found), steps) if steps else pick_by_step(list(found), k, min_step)
    except AverageError as e:
        raise AverageError(f"{run_dir}: {e}") from None
    kept = sorted(s for s in found if s >= min_step)
    targets = [] if steps else equispaced_targets(kept[-1], k, min_step)
    how = "" if steps else (" nearest to steps " + ", ".join(f"{t:.0f}" for t in targets))
    print(f"{len(found)} checkpoints in {run_dir} (steps {min(found)}..{max(found)}); "
          f"picked steps {', '.join(map(str, picked))}{how}")
    return [found[s] for s in picked]


@cli_main(bad_input=(FileExistsError, FileNotFoundError))
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="apriel average", description=__doc__.split("\n\n")[0])
    ap.add_argument("inputs", nargs="*", help="checkpoint folders (HF or megatron-core dist) or Hub repo ids")
    ap.add_argument("--out", help="output folder (written atomically)")
    ap.add_argument("--weights", type=float, nargs="+", help="one weight per input (default uniform)")
    ap.add_argument("--allow-unnormalised", action="store_true", help="accept weights that do not sum to 1")
    ap.add_argument("--equispaced", type=int, metavar="K",
                    help="from --run-dir, the K checkpoints whose steps are nearest to K evenly spaced steps "
                         "ending at the last one")
    ap.add_argument("--steps", type=int, nargs="+", metavar="STEP", help="from --run-dir, exactly these steps")
    ap.add_argument("--run-dir", help="training run directory with iter_NNNNNNN/ (Megatron) or checkpoint-N/ (HF/TRL)")
    ap.add_argument("--min-step", type=int, default=0, help="with --equispaced: ignore checkpoints before this step")
    ap.add_argument("--config", help="mergekit-style YAML (merge_method: linear, models: [...])")
    ap.add_argument("--max-shard-gb", type=float, default=5.0)
    ap.add_argument("--force", action="store_true", help="replace a non-empty --out")
    add_card_args(ap)
    args = ap.parse_args(argv)
    check_card_args(args.model_card_extra, args.eval_results)
    inputs, weights, allow = list(args.inputs), args.weights, args.allow_unnormalised
    out = args.out
    if args.config:
        if inputs or args.equispaced or args.steps:
            raise AverageError("--config names the models; do not also give inputs, --equispaced or --steps")
        spec = load_merge_yaml(args.config)
        inputs = spec["inputs"]
        weights = args.weights or spec["weights"]
        allow = allow or spec["allow_unnormalised"]
        out = out or spec["out"]
    elif args.equispaced is not None or args.steps:
        inputs = select_from_run(args.run_dir, args.equispaced, args.steps, args.min_step, inputs)
    if not out:
        raise AverageError("--out is required")
    inputs = [resolve_model(p, "input") for p in inputs]
    print(f"linear merge of {len(inputs)} checkpoints -> {out}")
    average(inputs, out, weights, allow_unnormalised=allow, force=args.force,
            max_shard_bytes=int(args.max_shard_gb * 1024**3),
            card=dict(license=args.license, base_model=args.base_model, extra=args.model_card_extra,
                      eval_results=args.eval_results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
