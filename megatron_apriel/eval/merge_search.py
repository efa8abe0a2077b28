"""``apriel merge-search``: evaluate a grid of weighted merges and write the best as a merge YAML.

The recipe's merge weights (0.5/0.5 for the specialists, 0.3/0.3/0.4 after GRPO) are evaluation
decisions. This verb makes each candidate with the project's averaging code
(:func:`megatron_apriel.checkpoint.average.average`), scores it with ``apriel eval``'s engine on the
given tasks, prints the table, draws it, and writes the winner as a mergekit-style YAML that
``apriel average --config`` turns into the same checkpoint.

    apriel merge-search --config examples/.../merge_final.yaml --grid 0.1 \\
        --tasks math=aime.jsonl choice=gpqa.jsonl --out-dir runs/merge_search

The objective is the mean over tasks of each task's headline score (pass@1, or acc for
log-likelihood tasks); ties go to the candidate nearest the YAML's own weights.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import shutil
import sys
from pathlib import Path

import yaml

from megatron_apriel.checkpoint.average import average, load_merge_yaml
from megatron_apriel.checkpoint.model_card import add_card_args, check_card_args, merge_card
from megatron_apriel.errors import cli_main
from megatron_apriel.eval.run import (
    EvalError,
    _write_json_atomic,
    add_settings_args,
    check_models,
    evaluate_model,
    headline,
    model_hash,
    settings_from_args,
)
from megatron_apriel.eval.tasks import TaskSpec, parse_task_arg, read_records
from megatron_apriel.hub import resolve_model

MAX_CANDIDATES = 200


def weight_grid(k: int, step: float) -> list[tuple[float, ...]]:
    """Every k-vector of non-negative multiples of ``step`` that sums to 1 (each input kept > 0)."""
    units = round(1 / step)
    if units < k or abs(units * step - 1) > 1e-9:
        raise EvalError(f"--grid {step}: 1 must be a multiple of the step and leave each of {k} models a share")
    out = []
    for parts in itertools.product(range(1, units), repeat=k - 1):
        last = units - sum(parts)
        if last >= 1:
            out.append(tuple(round(p / units, 10) for p in (*parts, last)))
    return out


def objective(scores: dict) -> float:
    values = [h[1] for h in (headline(s) for s in scores.values()) if h]
    return sum(values) / len(values) if values else float("nan")


def search(config: str, task_args: list[str], grid: float, out_dir: str, settings, keep: bool = False,
           log=print, card: dict | None = None) -> dict:
    spec = load_merge_yaml(config)
    inputs = [resolve_model(str(p), "models[].model") for p in spec["inputs"]]  # folders or Hub repo ids
    check_models(inputs)
    tasks = [parse_task_arg(a, settings.samples, settings.require_final_response) for a in task_args]
    for t in tasks:
        if isinstance(t, TaskSpec):
            read_records(t.path, t.kind)
    candidates = weight_grid(len(inputs), grid)
    base = tuple(spec["weights"])
    if abs(sum(base) - 1) < 1e-6 and base not in candidates:  # the YAML's own weights are always tried
        candidates.append(base)
    if len(candidates) > MAX_CANDIDATES:
        raise EvalError(f"--grid {grid} gives {len(candidates)} candidates for {len(inputs)} models "
                        f"(at most {MAX_CANDIDATES}); use a coarser grid")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log(f"merge search over {len(candidates)} weightings of {len(inputs)} models, {len(tasks)} task(s) -> {out}")
    rows = []
    for i, w in enumerate(candidates, 1):
        name = "w_" + "_".join(f"{x:.3f}" for x in w)
        path = out / "candidates" / name
        log(f"[{i}/{len(candidates)}] weights {', '.join(f'{x:g}' for x in w)}")
        if path.exists():
            shutil.rmtree(path)  # a candidate left by an interrupted search is rebuilt, never trusted
        average(inputs, path, list(w), log=lambda *_: None, card=card)
        scores, _, runtime = evaluate_model(str(path), tasks, settings, log=log)
        if keep:  # a kept candidate's card carries its scores
            merge_card(path, inputs, list(w), eval_results=scores, **(card or {}))
        rows.append({"weights": list(w), "objective": objective(scores), "sha256": model_hash(path),
                     "scores": scores, "seconds": runtime["seconds"]})
        log(f"  objective {rows[-1]['objective']:.4f}")
        if not keep:
            shutil.rmtree(path)
    best = max(rows, key=lambda r: (r["objective"], -sum((a - b) ** 2 for a, b in zip(r["weights"], base))))
    merge_yaml = {"merge_method": "linear",
                  "models": [{"model": p, "parameters": {"weight": w}} for p, w in zip(inputs, best["weights"])]}
    if spec["out"]:
        merge_yaml["out"] = spec["out"]

    yaml_path = out / "best_merge.yaml"
    tmp = yaml_path.with_name(yaml_path.name + ".tmp")
    tmp.write_text(f"# apriel merge-search: best of {len(rows)} merges, mean task score {best['objective']:.4f}\n"
                   + yaml.safe_dump(merge_yaml, sort_keys=False))
    tmp.replace(yaml_path)
    result = {"config": str(config), "inputs": inputs, "grid": grid, "settings": dataclasses.asdict(settings),
              "candidates": rows, "best": best}
    _write_json_atomic(out / "merge_search.json", result)
    table = format_table(rows, inputs, best)
    (out / "merge_search.txt").write_text(table + "\n")
    draw_search(rows, inputs, out / "merge_search.png")
    log(table)
    log(f"best: weights {best['weights']} objective {best['objective']:.4f}; wrote {yaml_path}, "
        f"{out / 'merge_search.json'}, {out / 'merge_search.png'}")
    return result


def format_table(rows: list[dict], inputs: list[str], best: dict) -> str:
    tasks = sorted({t for r in rows for t in r["scores"]})
    head = "  ".join(f"w{i + 1:<5}" for i in range(len(inputs))) + "  " + \
        "  ".join(f"{t[:14]:>14}" for t in tasks) + f"  {'objective':>9}"
    lines = ["  ".join(f"w{i + 1} = {p}" for i, p in enumerate(inputs)), head]
    for r in sorted(rows, key=lambda r: -r["objective"]):
        cells = [f"{headline(r['scores'].get(t, {}))[1]:>14.4f}" if headline(r["scores"].get(t, {})) else f"{'-':>14}"
                 for t in tasks]
        lines.append("  ".join(f"{w:<6.3f}" for w in r["weights"]) + "  " + "  ".join(cells) +
                     f"  {r['objective']:>9.4f}" + ("  <- best" if r is best else ""))
    return "\n".join(lines)


def draw_search(rows: list[dict], inputs: list[str], png: Path) -> None:
    """Two inputs: objective against the first weight. More: one bar per candidate, best first."""
    import matplotlib  # deferred: only the plot needs it, and it takes a second to import

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    if len(inputs) == 2:
        pts = sorted((r["weights"][0], r["objective"]) for r in rows)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-")
        ax.set_xlabel(f"weight of {Path(inputs[0]).name or inputs[0]}")
    else:
        ranked = sorted(rows, key=lambda r: -r["objective"])[:30]
        ax.bar(range(len(ranked)), [r["objective"] for r in ranked])
        ax.set_xticks(range(len(ranked)), ["/".join(f"{w:g}" for w in r["weights"]) for r in ranked],
                      rotation=90, fontsize=6)
    ax.set_ylabel("mean task score")
    fig.tight_layout()
    tmp = png.with_name(png.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(png)


@cli_main(bad_input=(FileNotFoundError,))
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="apriel merge-search", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="merge YAML (as apriel average --config reads it)")
    ap.add_argument("--grid", type=float, default=0.1, help="weight step; each candidate's weights sum to 1")
    ap.add_argument("--out-dir", required=True, help="table, JSON, PNG and best_merge.yaml go here")
    ap.add_argument("--keep", action="store_true",
                    help="keep every candidate checkpoint (default: deleted once scored)")
    add_settings_args(ap)
    add_card_args(ap, eval_results=False)
    args = ap.parse_args(argv)
    check_card_args(args.model_card_extra)
    search(args.config, args.tasks, args.grid, args.out_dir, settings_from_args(args), keep=args.keep,
           card=dict(license=args.license, base_model=args.base_model, extra=args.model_card_extra))
    return 0


if __name__ == "__main__":
    sys.exit(main())
