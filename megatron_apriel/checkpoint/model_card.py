"""Model cards: the README.md of an exported HF folder, with the Hub's YAML metadata.

The Hub reads a card's front matter (``base_model``, ``license``, ``pipeline_tag``, ``tags``, and
``model-index`` for evaluation results) to file a model under its base, filter it by task and show
its scores; the body says what produced the weights. Everything a card needs is already on disk
when a checkpoint is exported: each training stage's ``run_config.yaml`` (blend, sequence length)
and the consumed samples in its checkpoint, the inputs and weights of an average or merge, and
``apriel eval``'s results. The metadata is built with ``huggingface_hub.ModelCardData``, so it is
written exactly as the Hub parses it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional

import yaml

from megatron_apriel.errors import InputError

CARD = "README.md"
LIBRARY_TAGS = ["megatron-apriel", "megatron-core", "apriel"]
MAX_STAGES = 16  # a chain of checkpoint.load links longer than this is cut (and a cycle cannot loop)


def weights_sha256(hf_dir: str | os.PathLike) -> str:
    """sha256 over the weight files (names and bytes, in name order): the same weights, the same hash
    (``apriel eval`` records it per model, so results can be matched to the weights they scored)."""
    h = hashlib.sha256()
    files = sorted(p for p in Path(hf_dir).iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file())
    for p in files:
        h.update(p.name.encode() + b"\0")
        with open(p, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


def pipeline_tag(hf_dir: str | os.PathLike) -> str:
    cfg = json.loads(Path(hf_dir, "config.json").read_text())
    return "image-text-to-text" if "vision_config" in cfg else "text-generation"


# --------------------------------------------------------------------------- what produced the weights
def _blend_summary(data: dict) -> tuple[str, list[tuple[str, float]]]:
    """(a line, [(source, share)]) for a run config's ``data`` section."""
    if data.get("kind", "blend") != "blend":
        what = data.get("factory") or data.get("kind")
        return f"dataset `{what}`", []
    blend = data.get("blend") or {}
    if isinstance(blend, str):
        try:
            blend = yaml.safe_load(Path(blend).read_text()) or {}
        except OSError:
            return f"blend file `{data['blend']}` (not readable here)", []
    sources = blend.get("sources") or []
    weights = {s.get("name"): float(s.get("weight") or 1.0) for s in sources}
    stage = next((s for s in blend.get("stages") or [] if s.get("name") == blend.get("stage")), None)
    if stage:
        weights.update({k: float(v) for k, v in (stage.get("weights") or {}).items()})
    total = sum(weights.values()) or 1.0
    shares = [(name, w / total) for name, w in weights.items()]
    label = f"blend stage `{blend['stage']}`" if stage else "blend"
    return label + ": " + ", ".join(f"{n} {s:.1%}" for n, s in shares), shares


def _consumed_samples(iter_path: Path) -> Optional[int]:
    try:
        from megatron.core.dist_checkpointing.serialization import load_common_state_dict

        return int(load_common_state_dict(str(iter_path)).get("consumed_samples"))
    except Exception:  # a weights-only or converted checkpoint has none: the card says "unknown"
        return None


def training_stages(ckpt_dir: str | os.PathLike) -> list[dict]:
    """The training runs behind a dist checkpoint, newest first: each run's ``run_config.yaml``
    (beside its iteration folder) and consumed samples, then the run it loaded, and so on, until a
    checkpoint without a run config (a converted HF model: the base)."""
    from megatron_apriel.checkpoint.dcp_io import resolve_load_dir

    stages, seen = [], set()
    path = ckpt_dir
    while path and len(stages) < MAX_STAGES:
        try:
            iter_path, iteration = resolve_load_dir(str(path))
        except (FileNotFoundError, OSError, ValueError):
            break
        iter_path = Path(iter_path).resolve()
        cfg_file = iter_path / "run_config.yaml"
        if iter_path in seen:
            break
        seen.add(iter_path)
        merge_file = iter_path / "merge.json"
        if merge_file.is_file():  # `apriel average` of dist checkpoints: no tokens of its own
            rec = json.loads(merge_file.read_text())
            shares = ", ".join(f"`{Path(p).name}` {w:g}" for p, w in zip(rec["inputs"], rec["weights"]))
            stages.append({"checkpoint": str(iter_path), "iteration": "-", "config": None, "tokens": 0,
                           "start": ", ".join(f"`{p}`" for p in rec["inputs"]),
                           "data": f"average of {len(rec['inputs'])}: {shares}"})
            # the inputs of one run's average share its history; the last input has the longest
            path = rec["inputs"][-1] if rec["inputs"] else None
            continue
        if not cfg_file.is_file():
            break
        cfg = yaml.safe_load(cfg_file.read_text()) or {}
        train = cfg.get("train") or {}
        seq = int(train.get("seq_length") or 0)
        consumed = _consumed_samples(iter_path)
        line, shares = _blend_summary(cfg.get("data") or {})
        start = (cfg.get("checkpoint") or {}).get("load")
        stages.append({"checkpoint": str(iter_path), "iteration": iteration, "config": cfg,
                       "start": f"`{start}`" if start else "random initialisation",
                       "seq_length": seq, "consumed_samples": consumed,
                       "tokens": consumed * seq if consumed is not None and seq else None,
                       "data": line, "blend": shares})
        path = (cfg.get("checkpoint") or {}).get("load")
    return stages


def stages_markdown(stages: list[dict]) -> str:
    """The card section for :func:`training_stages`, oldest stage first, each with its config."""
    if not stages:
        return ""
    lines = ["## Training", "", "| stage | started from | checkpoint | iterations | tokens seen | data |",
             "|---|---|---|---|---|---|"]
    for i, s in enumerate(reversed(stages), 1):
        tokens = f"{s['tokens']:,}" if s["tokens"] is not None else "unknown"
        lines.append(f"| {i} | {s['start']} | `{s['checkpoint']}` | {s['iteration']} | {tokens} | {s['data']} |")
    for i, s in enumerate(reversed(stages), 1):
        if s["config"] is None:
            continue
        lines += ["", f"<details><summary>stage {i}: run_config.yaml</summary>", "", "```yaml",
                  yaml.safe_dump(s["config"], sort_keys=False).rstrip(), "```", "", "</details>"]
    return "\n".join(lines)


def merge_markdown(inputs: list[str], weights: list[float], method: str = "linear") -> str:
    lines = ["## Merge", "", f"A {method} merge of {len(inputs)} checkpoints (`apriel average`):", "",
             "| input | weight |", "|---|---|"]
    lines += [f"| `{p}` | {w:g} |" for p, w in zip(inputs, weights)]
    return "\n".join(lines)


# --------------------------------------------------------------------------- evaluation results
def eval_results_for(results_file: str | os.PathLike, hf_dir: str | os.PathLike) -> dict[str, dict]:
    """{task: scores} that an ``apriel eval`` results JSON (or ``apriel merge-search``'s
    merge_search.json) holds for the weights in ``hf_dir``, matched by their sha256: results of
    other weights are not this model's, so none matching is an error."""
    path = Path(results_file)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"--eval-results {results_file}: not a readable results JSON ({e})") from None
    sha = weights_sha256(hf_dir)
    if "candidates" in data:  # merge_search.json
        for row in data["candidates"]:
            if row.get("sha256") == sha:
                return row["scores"]
    else:
        for model in data.get("models", []):
            if model.get("sha256") == sha:
                scores = data.get("results", {}).get(model.get("path"))
                if scores is None:  # older files key results by the path given on the command line
                    scores = next((v for k, v in data.get("results", {}).items() if Path(k).name ==
                                   Path(model.get("path", "")).name), None)
                if scores is not None:
                    return scores
    raise InputError(f"--eval-results {results_file}: no results for these weights (sha256 {sha[:12]}...); "
                     "evaluate this folder with apriel eval, or leave the flag out")


def _headline_metrics(scores: dict) -> list[tuple[str, float]]:
    return [(k, float(v)) for k, v in scores.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not k.endswith("_stderr")
            and k not in ("n", "samples", "seconds")]


def eval_markdown(results: dict[str, dict]) -> str:
    lines = ["## Evaluation", "", "| task | metric | value |", "|---|---|---|"]
    for task, scores in results.items():
        for metric, value in _headline_metrics(scores):
            err = scores.get(metric + "_stderr")
            lines.append(f"| {task} | {metric} | {value:.4f}" + (f" ± {err:.4f}" if isinstance(err, float) else "")
                         + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- the card
def write_model_card(out_dir: str | os.PathLike, *, title: str, what: str, sections: list[str] = (),
                     base_model: Optional[str | list[str]] = None, license: Optional[str] = None,
                     tags: list[str] = (), eval_results: Optional[dict[str, dict]] = None,
                     extra: Optional[str] = None) -> Path:
    """Write ``out_dir/README.md``: the Hub metadata, then ``what`` and the sections.

    ``base_model``: Hub repo id(s) the weights derive from (local paths are left out: the Hub
    links only repo ids). ``license``: an SPDX-like Hub id; default ``other``. ``extra``: text
    (``--model-card-extra``: a string, or ``@FILE``) appended as it is."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    bases = [base_model] if isinstance(base_model, str) else list(base_model or [])
    bases = [b for b in bases if b and not Path(b).exists() and looks_like_repo_id(b)]
    evals = [EvalResult(task_type=pipeline_tag(out_dir), dataset_type=task, dataset_name=task,
                        metric_type=metric, metric_value=value)
             for task, scores in (eval_results or {}).items() for metric, value in _headline_metrics(scores)]
    name = model_name(out_dir)
    data = ModelCardData(
        base_model=(bases[0] if len(bases) == 1 else bases) or None, license=license or "other",
        library_name="transformers", pipeline_tag=pipeline_tag(out_dir),
        tags=list(dict.fromkeys([*LIBRARY_TAGS, *tags])), model_name=name if evals else None,
        eval_results=evals or None)
    body = [f"# {title}", "", what.strip()]
    body += ["", *[s for s in sections if s]] if any(sections) else []
    if eval_results:
        body += ["", eval_markdown(eval_results)]
    if extra:
        body += ["", read_extra(extra).strip()]
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body) + "\n")
    path = Path(out_dir) / CARD
    card.save(path)
    return path


def model_name(out_dir: str | os.PathLike) -> str:
    """The folder's name (the name it is being written under, for hf_io.atomic_output_dir's temporary
    folder), or its parent's for a folder named ``hf`` (``runs/final/hf`` -> ``final``)."""
    import re

    path = Path(out_dir).resolve()
    name = re.sub(r"^\.(.+)\.tmp-\d+$", r"\1", path.name)  # the folder being written atomically
    return path.parent.name if name == "hf" else name


def read_extra(extra: str) -> str:
    """``--model-card-extra``: the text itself, or ``@FILE`` for a file's contents."""
    if extra.startswith("@"):
        try:
            return Path(extra[1:]).read_text(encoding="utf-8")
        except OSError as e:
            raise InputError(f"--model-card-extra {extra}: cannot read ({e.strerror})") from None
    return extra


def looks_like_repo_id(text: str) -> bool:
    """``org/name`` (optionally ``@revision``): two non-empty parts of Hub-legal characters."""
    import re

    return re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*(@[^\s@]+)?", text) is not None


def check_card_args(extra: Optional[str], eval_results: Optional[str] = None) -> None:
    """Before work starts: the card's inputs exist (``@FILE`` of --model-card-extra, --eval-results)."""
    if extra and extra.startswith("@") and not Path(extra[1:]).is_file():
        raise InputError(f"--model-card-extra {extra}: no such file")
    if eval_results and not Path(eval_results).is_file():
        raise InputError(f"--eval-results {eval_results}: no such file")


def add_card_args(ap, eval_results: bool = True) -> None:
    """The flags every exporting verb shares."""
    ap.add_argument("--license", default=None, help="the card's license (a Hub license id; default: other)")
    ap.add_argument("--base-model", default=None, help="Hub repo id the weights derive from (the card's base_model)")
    ap.add_argument("--model-card-extra", default=None, metavar="TEXT|@FILE",
                    help="text appended to the written README.md (model card)")
    if eval_results:
        ap.add_argument("--eval-results", default=None, metavar="JSON",
                        help="apriel eval results (or merge_search.json); the scores of these weights, matched "
                             "by sha256, go into the card")


# --------------------------------------------------------------------------- per verb
def repo_id_of_path(path: str | os.PathLike) -> Optional[str]:
    """``org/name`` of a folder inside a Hub cache (``.../models--org--name/snapshots/<sha>``), else None."""
    for part in Path(path).parts:
        if part.startswith("models--") and part.count("--") >= 2:
            org, name = part[len("models--"):].split("--", 1)
            return f"{org}/{name}"
    return None


def card_base_models(hf_dir: str | os.PathLike) -> list[str]:
    """The base_model of an HF folder: its own card's, else its Hub repo id when it sits in the Hub cache."""
    from huggingface_hub import ModelCard

    card = Path(hf_dir) / CARD
    if card.is_file():
        base = ModelCard.load(card).data.base_model
        if base:
            return [base] if isinstance(base, str) else list(base)
    repo = repo_id_of_path(Path(hf_dir).resolve())
    return [repo] if repo else []


def export_card(out_dir: str | os.PathLike, ckpt_dir: str | os.PathLike, preset_name: str, dtype: str,
                license: Optional[str] = None, base_model: Optional[str] = None, extra: Optional[str] = None,
                eval_results: Optional[str] = None) -> Path:
    """The card of ``apriel convert mcore-to-hf``: the training stages behind ``ckpt_dir`` (each run's
    config, blend and tokens seen) and the base the first stage started from."""
    from megatron_apriel.checkpoint.dcp_io import find_model_meta

    stages = training_stages(ckpt_dir)
    if base_model is None:  # the first stage's starting checkpoint, converted from an HF model
        first = stages[-1]["config"] if stages else None
        start = (first.get("checkpoint") or {}).get("load") if first else None if stages else ckpt_dir
        meta = find_model_meta(start) if start and Path(start).exists() else None
        source = (yaml.safe_load(meta.read_text()) or {}).get("source") if meta else None
        base_model = (card_base_models(source) or [None])[0] if source and Path(source).is_dir() else None
    tokens = [s["tokens"] for s in stages]
    what = (f"Exported with `apriel convert mcore-to-hf` (megatron-apriel) from the megatron-core checkpoint "
            f"`{Path(ckpt_dir).resolve()}`: preset `{preset_name}`, {dtype}.")
    if stages:
        seen = f"{sum(tokens):,} tokens" if all(t is not None for t in tokens) else "tokens partly unknown"
        runs = sum(s["config"] is not None for s in stages)
        averages = f" and {len(stages) - runs} average(s)" if len(stages) > runs else ""
        what += f" {runs} training run(s){averages}, {seen} seen in all."
    return write_model_card(out_dir, title=model_name(out_dir), what=what, sections=[stages_markdown(stages)],
                            base_model=base_model, license=license, tags=["mcore-to-hf"],
                            eval_results=eval_results_for(eval_results, out_dir) if eval_results else None,
                            extra=extra)


def merge_card(out_dir: str | os.PathLike, inputs: list, weights: list[float], license: Optional[str] = None,
               base_model: Optional[str] = None, extra: Optional[str] = None,
               eval_results: Optional[str | dict] = None) -> Path:
    """The card of ``apriel average`` (and each candidate of ``apriel merge-search``): the inputs with
    their weights; base_model: given, else the inputs' own bases. ``eval_results``: a results file
    (matched by sha256) or the scores themselves."""
    bases = [base_model] if base_model else list(dict.fromkeys(b for p in inputs for b in card_base_models(p)))
    if isinstance(eval_results, str):
        eval_results = eval_results_for(eval_results, out_dir)
    what = (f"A weighted average of {len(inputs)} checkpoints, made with `apriel average` (megatron-apriel); "
            "every tensor is the weighted sum of the inputs' tensors.")
    return write_model_card(out_dir, title=model_name(out_dir), what=what,
                            sections=[merge_markdown([str(Path(p).resolve()) for p in inputs], weights)],
                            base_model=bases, license=license, tags=["merge"], eval_results=eval_results,
                            extra=extra)
