"""Checkpoint averaging and weighted merging: ``sum_i w_i * theta_i``, tensor by tensor.

Apriel averages equally spaced checkpoints at the end of every stage (3 after CPT, 6 after the
Pixtral upscale-training) and merges specialists with weights (C = 0.5 A + 0.5 B, final =
0.3 E + 0.3 F + 0.4 G). All of these are the linear merge, so one streaming function does them:
for each tensor, inputs are read one at a time from memory-mapped safetensors and accumulated in
fp32 (bf16 sums lose bits after a few adds), then cast back to the input dtype. Peak memory is the
fp32 accumulator plus one input tensor, never the model.

Written by hand rather than with mergekit: the linear merge is ten lines, and the checks that
matter here (same architecture, same tokenizer, same names/shapes/dtypes, weights summing to 1,
equispaced selection from a Megatron run directory) are not mergekit's. The YAML form follows
mergekit's ``merge_method: linear`` schema so existing merge files read the same.

Inputs are HF folders (``model.safetensors`` or sharded with an index). Megatron-core distributed
checkpoints (``iter_0000100/``) are read with ``torch.distributed.checkpoint`` in
:func:`mcore_tensors`; see its docstring for what is supported.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import sys
import time
from pathlib import Path

import torch

from megatron_apriel.checkpoint.hf_io import (
    SafetensorsReader,
    ShardedSafetensorsWriter,
    atomic_output_dir,
    copy_side_files,
)

# Files whose bytes define the vocabulary; tokenizer_config.json is left out because SFT often
# only adds a chat template there, which does not change token ids.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tekken.json")
# config.json keys that may differ between checkpoints of one architecture.
VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "use_cache"}
STEP_DIR = re.compile(r"(?:iter_|checkpoint-)(\d+)")


class AverageError(ValueError):
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


def pick_equispaced(steps: list[int], k: int) -> list[int]:
    """Indices of ``k`` checkpoints, equally spaced, ending at the latest.

    The spacing is the widest the list allows, ``(n - 1) // (k - 1)`` positions: 10 checkpoints,
    k=3 -> positions 1, 5, 9. With a uniform save interval that is equal spacing in steps.
    """
    n = len(steps)
    if not 1 <= k <= n:
        raise AverageError(f"--equispaced {k}: the run has {n} checkpoints")
    if k == 1:
        return [n - 1]
    gap = (n - 1) // (k - 1)
    return [n - 1 - gap * j for j in reversed(range(k))]


# ---------------------------------------------------------------------------------------- inputs
def is_hf_folder(path: Path) -> bool:
    return (path / "model.safetensors").exists() or (path / "model.safetensors.index.json").exists()


def is_mcore_folder(path: Path) -> bool:
    return (path / ".metadata").exists() or (path / "metadata.json").exists()


def mcore_tensors(path: Path) -> tuple[dict[str, tuple[list[int], torch.dtype]], "callable"]:
    """The model tensors of a megatron-core ``torch_dist`` checkpoint and a loader of one tensor.

    Reads the torch.distributed.checkpoint metadata (global shapes) and loads one full tensor per
    call with ``no_dist=True``, so no process group is needed. Optimizer, RNG and rerun state are
    skipped: an average is a model, and averaging Adam moments is meaningless. Layer-stacked
    tensors (``decoder.layers.*`` with the layer dimension first) are loaded whole, so peak memory
    is one stacked tensor per input rather than one layer.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(str(path))
    meta = reader.read_metadata()
    tensors = {}
    for key, md in meta.state_dict_metadata.items():
        if key.startswith(("optimizer.", "rng_state", "rerun_state")) or not isinstance(md, TensorStorageMetadata):
            continue
        tensors[key] = (list(md.size), md.properties.dtype)

    def load(key: str) -> torch.Tensor:
        shape, dtype = tensors[key]
        sd = {key: torch.empty(shape, dtype=dtype)}
        dcp.load(sd, storage_reader=dcp.FileSystemReader(str(path)), no_dist=True)
        return sd[key]

    return tensors, load


class Checkpoint:
    """One input: names, shapes, dtypes and a one-tensor loader, whatever the on-disk format."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if is_hf_folder(self.path):
            self.kind = "hf"
            self._reader = SafetensorsReader(self.path)
            self.names = self._reader.keys()
            self.shapes = {n: self._reader.shape(n) for n in self.names}
            self.dtypes = {n: _st_dtype(self._reader.dtype(n)) for n in self.names}
            self.get = self._get_hf
        elif is_mcore_folder(self.path):
            self.kind = "mcore"
            tensors, self.get = mcore_tensors(self.path)
            self.names = list(tensors)
            self.shapes = {n: s for n, (s, _) in tensors.items()}
            self.dtypes = {n: d for n, (_, d) in tensors.items()}
        else:
            raise AverageError(f"{self.path}: neither an HF safetensors folder nor a megatron-core distributed checkpoint")

    def _get_hf(self, name: str) -> torch.Tensor:
        # Closing the file handles after each read unmaps the file once the tensor is freed, so
        # pages of tensors already merged do not accumulate in the resident set (RSS would otherwise
        # grow to the sum of the input sizes, reclaimable but alarming on a shared node).
        t = self._reader.get(name)
        self._reader.close()
        return t

    def config(self) -> dict | None:
        p = self.path / "config.json"
        return json.loads(p.read_text()) if p.exists() else None

    def tokenizer_hashes(self) -> dict[str, str]:
        return {n: hashlib.sha256((self.path / n).read_bytes()).hexdigest()[:16]
                for n in TOKENIZER_FILES if (self.path / n).exists()}

    def close(self):
        if self.kind == "hf":
            self._reader.close()


def _st_dtype(name: str) -> torch.dtype:
    table = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool}
    return table[name]


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
    """Raise :class:`AverageError` naming the first thing that differs from the first input."""
    ref = ckpts[0]
    ref_cfg, ref_tok = ref.config(), ref.tokenizer_hashes()
    for c in ckpts[1:]:
        if c.kind != ref.kind:
            raise AverageError(f"{c.path} is a {c.kind} checkpoint but {ref.path} is {ref.kind}")
        cfg = c.config()
        if (cfg is None) != (ref_cfg is None):
            raise AverageError(f"config.json present in only one of {ref.path} and {c.path}")
        if cfg is not None:
            diffs = _config_diff(ref_cfg, cfg)
            if diffs:
                raise AverageError(f"architectures differ, config.json of {ref.path} vs {c.path}: {'; '.join(diffs[:5])}")
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
        raise AverageError(f"weights {weights} sum to {total:g}, not 1 (pass --allow-unnormalised to use them as given)")
    return [float(w) for w in weights]


# ------------------------------------------------------------------------------------------ merge
def weighted_tensor(ckpts: list[Checkpoint], weights: list[float], name: str) -> torch.Tensor:
    """``sum_i w_i * t_i`` accumulated in fp32 (fp64 for fp64 inputs), in the inputs' dtype."""
    dtype = ckpts[0].dtypes[name]
    if not dtype.is_floating_point:
        # integer buffers (rare in LM checkpoints) cannot be averaged: they must agree
        first = ckpts[0].get(name)
        for c in ckpts[1:]:
            if not torch.equal(first, c.get(name)):
                raise AverageError(f"non-float tensor {name} differs between {ckpts[0].path} and {c.path}")
        return first
    acc_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    # copy=True: never scale in place a tensor that may still view the input file's mapping
    acc = ckpts[0].get(name).to(acc_dtype, copy=True).mul_(weights[0])
    for c, w in zip(ckpts[1:], weights[1:]):
        # add_ upcasts element by element: no full-size fp32 copy of the input
        acc.add_(c.get(name), alpha=w)
    return acc.to(dtype)


def average(inputs: list[str | Path], out: str | Path, weights: list[float] | None = None,
            allow_unnormalised: bool = False, force: bool = False, max_shard_bytes: int = 5 * 1024**3,
            log=print) -> dict:
    """Write the weighted average of ``inputs`` (HF folders) to ``out`` as an HF folder."""
    from tqdm import tqdm

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
        names = ckpts[0].names
        with atomic_output_dir(out, force=force) as tmp:
            writer = ShardedSafetensorsWriter(tmp, max_shard_bytes=max_shard_bytes)
            for name in tqdm(names, desc="average", unit="tensor", file=sys.stderr, mininterval=2.0):
                writer.add(name, weighted_tensor(ckpts, weights, name))
            writer.close()
            copied = copy_side_files(ckpts[0].path, tmp)
            record = {"method": "linear", "inputs": [str(Path(p).resolve()) for p in inputs], "weights": weights}
            (tmp / "merge.json").write_text(json.dumps(record, indent=2) + "\n")
        seconds = time.perf_counter() - t0
    finally:
        for c in ckpts:
            c.close()
    log(f"wrote {out}: {writer.num_tensors} tensors, {writer.total_bytes / 1e9:.2f} GB, average of {len(inputs)} "
        f"in {seconds:.1f} s; copied {', '.join(copied) or 'no side files'}")
    return dict(tensors=writer.num_tensors, bytes=writer.total_bytes, seconds=seconds)


def _average_mcore(ckpts: list[Checkpoint], weights: list[float], out, force: bool, log) -> dict:
    """Average megatron-core dist checkpoints into a model-only dist checkpoint.

    torch.distributed.checkpoint writes a checkpoint in one ``save`` call, so the output state dict
    is held in memory (one model in the input dtype); inputs are still read one tensor at a time.
    Non-tensor model entries (``_extra_state`` objects) and the side files (``metadata.json``,
    ``common.pt``, the saved run config) come from the first input, so megatron-core's
    ``dist_checkpointing.load`` reads the result like any checkpoint; it has no optimizer state,
    so load it as weights only.
    """
    import io
    import shutil

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata
    from tqdm import tqdm

    t0 = time.perf_counter()
    state: dict = {}
    for name in tqdm(ckpts[0].names, desc="average (mcore)", unit="tensor", file=sys.stderr, mininterval=2.0):
        state[name] = weighted_tensor(ckpts, weights, name)
    first = ckpts[0].path
    meta = dcp.FileSystemReader(str(first)).read_metadata()
    objects = {k: io.BytesIO() for k, md in meta.state_dict_metadata.items()
               if isinstance(md, BytesStorageMetadata) and not k.startswith(("optimizer.", "rng_state", "rerun_state"))}
    if objects:
        dcp.load(objects, storage_reader=dcp.FileSystemReader(str(first)), no_dist=True)
        state.update(objects)
    with atomic_output_dir(out, force=force) as tmp:
        dcp.save(state, storage_writer=dcp.FileSystemWriter(str(tmp)), no_dist=True)
        for side in first.iterdir():
            if side.is_file() and side.suffix != ".distcp" and side.name != ".metadata":
                shutil.copy2(side, tmp / side.name)
        record = {"method": "linear", "inputs": [str(c.path.resolve()) for c in ckpts], "weights": weights}
        (tmp / "merge.json").write_text(json.dumps(record, indent=2) + "\n")
    seconds = time.perf_counter() - t0
    log(f"wrote {out}: {len(state) - len(objects)} tensors (megatron-core dist checkpoint, model only) in {seconds:.1f} s")
    return dict(tensors=len(state) - len(objects), seconds=seconds)


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
    from megatron_apriel.config import load_yaml

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
        paths.append(model if model.is_absolute() else Path.cwd() / model)
    return dict(inputs=paths, weights=weights, out=data.get("out"),
                allow_unnormalised=bool(data.get("allow_unnormalised", False)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="apriel average", description=__doc__.split("\n\n")[0])
    ap.add_argument("inputs", nargs="*", help="checkpoint folders (HF or megatron-core dist)")
    ap.add_argument("--out", help="output folder (written atomically)")
    ap.add_argument("--weights", type=float, nargs="+", help="one weight per input (default uniform)")
    ap.add_argument("--allow-unnormalised", action="store_true", help="accept weights that do not sum to 1")
    ap.add_argument("--equispaced", type=int, metavar="K", help="pick K equally spaced checkpoints from --run-dir")
    ap.add_argument("--run-dir", help="training run directory with iter_NNNNNNN/ (Megatron) or checkpoint-N/ (HF/TRL)")
    ap.add_argument("--min-step", type=int, default=0, help="with --equispaced: ignore checkpoints before this step")
    ap.add_argument("--config", help="mergekit-style YAML (merge_method: linear, models: [...])")
    ap.add_argument("--max-shard-gb", type=float, default=5.0)
    ap.add_argument("--force", action="store_true", help="replace a non-empty --out")
    args = ap.parse_args(argv)
    try:
        inputs, weights, allow = list(args.inputs), args.weights, args.allow_unnormalised
        out = args.out
        if args.config:
            if inputs or args.equispaced:
                raise AverageError("--config names the models; do not also give inputs or --equispaced")
            spec = load_merge_yaml(args.config)
            inputs = spec["inputs"]
            weights = args.weights or spec["weights"]
            allow = allow or spec["allow_unnormalised"]
            out = out or spec["out"]
        elif args.equispaced is not None:
            if inputs:
                raise AverageError("--equispaced picks the inputs from --run-dir; do not also list them")
            if not args.run_dir:
                raise AverageError("--equispaced needs --run-dir")
            found = [(s, p) for s, p in list_run_checkpoints(args.run_dir) if s >= args.min_step]
            if not found:
                raise AverageError(f"{args.run_dir}: no checkpoints at or after step {args.min_step}")
            picked = [found[i] for i in pick_equispaced([s for s, _ in found], args.equispaced)]
            print(f"{len(found)} checkpoints in {args.run_dir} (steps {found[0][0]}..{found[-1][0]}); "
                  f"picked steps {', '.join(str(s) for s, _ in picked)}")
            inputs = [p for _, p in picked]
        if not out:
            raise AverageError("--out is required")
        print(f"linear merge of {len(inputs)} checkpoints -> {out}")
        average(inputs, out, weights, allow_unnormalised=allow, force=args.force,
                max_shard_bytes=int(args.max_shard_gb * 1024**3))
    except (AverageError, FileExistsError, FileNotFoundError) as e:
        print(f"apriel average: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
