"""What a demo run shows: the table of stages, ``demo_summary.json`` and the two plots.

Kept apart from the recipe (``recipe.py``) so the presentation can change without touching how
the stages run; everything here reads only the stages' figures (their ``done.json``).
"""

from __future__ import annotations

import json
from pathlib import Path

FAMILIES = ("add", "sub", "compare")
# The stages whose model is trained (loss curves) and those that are scored (accuracy bars).
TRAINING = ("pretrain", "cpt", "sft", "sft_a", "sft_b", "grpo")
SCORED = ("pretrain", "average", "sft", "sft_a", "sft_b", "merge", "grpo", "final")


def interval(acc: float, stderr: float) -> tuple[float, float]:
    """95% normal interval from the standard error ``apriel eval`` reports, clipped to [0, 1]."""
    return max(0.0, acc - 1.96 * stderr), min(1.0, acc + 1.96 * stderr)


def _fmt(v, spec=".3f") -> str:
    return "-" if v is None else format(v, spec)


def brief(f: dict) -> str:
    """One line of a finished stage's figures, for the progress log."""
    parts = [f"{f.get('seconds', 0):.0f} s"]
    if f.get("loss") is not None:
        parts.append(f"loss {f['loss']:.3f}")
    if "accuracy" in f:
        fam = ", ".join(f"{k} {v:.2f}" for k, v in f.get("families", {}).items())
        parts.append(f"held-out accuracy {f['accuracy']:.3f} ({fam})"
                     + (f", format {f['format_rate']:.3f}" if "format_rate" in f else ""))
    return ", ".join(parts)


def _with_interval(f: dict, key: str) -> str:
    if f.get(key) is None:
        return "-"
    lo, hi = interval(f[key], f.get(key + "_stderr", 0.0))
    return f"{f[key]:.3f} [{lo:.2f}, {hi:.2f}]"


def table(figures: dict, stages: list[str]) -> str:
    """Seconds, last training loss, held-out accuracy with its 95% interval, per-family accuracy,
    format rate and (around GRPO) the accuracy of answers sampled at GRPO's temperature, as aligned text."""
    head = ("stage", "seconds", "loss", "held-out acc [95% CI]", *FAMILIES, "format", "sampled acc [95% CI]")
    rows = [head]
    for name in stages:
        f = figures.get(name, {})
        fam = f.get("families", {})
        rows.append((name, _fmt(f.get("seconds"), ".0f"), _fmt(f.get("loss")), _with_interval(f, "accuracy"),
                     *(_fmt(fam.get(k), ".2f") for k in FAMILIES), _fmt(f.get("format_rate")),
                     _with_interval(f, "sampled_accuracy")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def effects(figures: dict) -> list[str]:
    """The sentence per stage a reader checks the recipe by: what each stage changed."""
    g = figures.get
    out = []
    up = g("upscale", {})
    if "base_loss" in up:
        out.append(f"upscaling: held-out text loss base {up['base_loss']:.3f} -> upscaled {up['upscaled_loss']:.3f} "
                   f"(a from-scratch model of the same size: {up['scratch_loss']:.3f})")
    mix = g("cpt", {}).get("mix")
    if mix:
        out.append("CPT blend realised: " + ", ".join(f"{k} {100 * v['share']:.1f}% (target {100 * v['target']:.0f}%)"
                                                       for k, v in mix.items()))
    if all(k in figures and "accuracy" in figures[k] for k in ("average", "sft", "sft_a", "sft_b", "merge")):
        out.append(f"SFT: accuracy {g('average')['accuracy']:.3f} -> generalist {g('sft')['accuracy']:.3f} -> "
                   f"specialists A {g('sft_a')['accuracy']:.3f}, B {g('sft_b')['accuracy']:.3f} -> merge "
                   f"{g('merge')['accuracy']:.3f}")
        kept = []
        for k in FAMILIES:
            best = max(g("sft_a")["families"][k], g("sft_b")["families"][k])
            kept.append(f"{k} {g('merge')['families'][k] / best:.2f}" if best else f"{k} -")
        out.append("merge keeps of the better specialist, per family: " + ", ".join(kept))
    gr = g("grpo", {})
    if "accuracy" in gr and "merge" in figures:
        sampled = ""
        if "sampled_accuracy" in gr and "sampled_accuracy" in g("merge"):
            sampled = (f"; sampled at its temperature {_with_interval(g('merge'), 'sampled_accuracy')} -> "
                       f"{_with_interval(gr, 'sampled_accuracy')}")
            pd = gr.get("sampled_paired_difference")
            if pd:
                sampled += f" (paired difference {pd['mean']:+.3f} [{pd['low']:+.3f}, {pd['high']:+.3f}])"
        out.append(f"GRPO: held-out greedy accuracy {_with_interval(g('merge'), 'accuracy')} -> "
                   f"{_with_interval(gr, 'accuracy')}{sampled}; mean training reward "
                   f"{_fmt(gr.get('first_reward'))} (first quarter of steps) -> {_fmt(gr.get('last_reward'))} "
                   "(last quarter)")
    if "final" in figures and "pretrain" in figures:
        out.append(f"held-out accuracy: base {g('pretrain')['accuracy']:.3f} -> final {g('final')['accuracy']:.3f}; "
                   f"format rate before SFT {g('average')['format_rate']:.3f} -> final {g('final')['format_rate']:.3f}")
    return out


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt  # deferred: see plot_losses

    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


def plot_losses(figures: dict, path: Path) -> None:
    """One panel per training stage; the CPT panel also marks where the upscaled model started
    (its loss at step 0 next to the base model's and a from-scratch model's of the same size)."""
    import matplotlib  # deferred: only the plots need it, and it takes a second to import

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(TRAINING), figsize=(4 * len(TRAINING), 3.2))
    for ax, name in zip(axes, TRAINING):
        f = figures.get(name, {})
        curve = f.get("loss_curve") or []
        if curve:
            ax.plot([c[0] for c in curve], [c[1] for c in curve], label="loss")
        if f.get("reward_curve"):
            ax.plot([c[0] for c in f["reward_curve"]], [c[1] for c in f["reward_curve"]], label="mean reward")
        up = figures.get("upscale", {})
        if name == "cpt" and "base_loss" in up:
            for key, label, marker in (("scratch_loss", "from scratch, same size", "x"),
                                       ("base_loss", "base (4 layers)", "o"), ("upscaled_loss", "upscaled (5)", "^")):
                ax.scatter([0], [up[key]], marker=marker, label=f"{label}: {up[key]:.2f}", zorder=3)
            ax.set_yscale("log")
        if name in ("cpt", "grpo"):
            ax.legend(fontsize=7)
        ax.set_title(name)
        ax.set_xlabel("step")
    axes[0].set_ylabel("training loss")
    fig.tight_layout()
    _save(fig, path)


def plot_accuracy(figures: dict, path: Path) -> None:
    """Held-out accuracy per scored stage: all problems and each family, with 95% intervals."""
    import matplotlib  # deferred: only the plots need it, and it takes a second to import

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = [s for s in SCORED if "accuracy" in figures.get(s, {})]
    groups = ("all", *FAMILIES)
    fig, ax = plt.subplots(figsize=(1.4 * len(stages) + 2, 3.5))
    w = 0.8 / len(groups)
    for i, grp in enumerate(groups):
        ys, errs = [], []
        for s in stages:
            f = figures[s]
            acc = f["accuracy"] if grp == "all" else f["families"][grp]
            se = f.get("accuracy_stderr" if grp == "all" else "families_stderr", 0.0)
            se = se if grp == "all" else se.get(grp, 0.0)
            lo, hi = interval(acc, se)
            ys.append(acc)
            errs.append((acc - lo, hi - acc))
        ax.bar([j + i * w for j in range(len(stages))], ys, w, label=grp,
               yerr=[[e[0] for e in errs], [e[1] for e in errs]], capsize=2)
    ax.set_xticks([j + w * (len(groups) - 1) / 2 for j in range(len(stages))], stages)
    ax.set_ylabel("held-out accuracy")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, ncol=len(groups))
    fig.tight_layout()
    _save(fig, path)


def write(out: Path, plan: dict, figures: dict, stages: list[str], wall: float) -> str:
    """``demo_summary.json`` (atomically) and both plots; returns the text to print."""
    # in the recipe's order: evaluations that run beside later stages finish out of it
    figures = {**{s: figures[s] for s in stages if s in figures}, **figures}
    summary = {"plan": plan, "stages": figures, "wall_seconds": round(wall, 1), "effects": effects(figures)}
    tmp = out / "demo_summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    tmp.replace(out / "demo_summary.json")
    plot_losses(figures, out / "loss_curves.png")
    plot_accuracy(figures, out / "accuracy.png")
    return "\n".join([table(figures, stages), "", *effects(figures),
                      f"wall time {wall:.0f} s; {out / 'demo_summary.json'}, {out / 'loss_curves.png'}, "
                      f"{out / 'accuracy.png'}"])
