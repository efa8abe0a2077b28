"""The recipe's example configs form one chain per model, and their retention keeps what averaging picks.

Every checkpoint a config or a documented command (the ``#   apriel ...`` lines at the top of the
example YAMLs) reads under ``runs/`` must be written by another config or documented command, with
no cycle, and every ``runs/`` path of a model folder is ``runs/<that folder>/...``. The only inputs
from outside are the base models the upscale plans read. Each ``apriel average --equispaced K
--run-dir D`` is replayed on a run directory holding exactly the iterations that D's training config
saves and keeps, through the real selection and retention functions. Runtime: under 2 s.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
from conftest import REPO

from megatron_apriel.checkpoint import average as avg
from megatron_apriel.config import load_config, load_yaml
from megatron_apriel.rl.grpo import GRPORunConfig
from megatron_apriel.training.checkpointing import retained
from megatron_apriel.training.config import TrainConfig, stage_load

MODELS = ("apriel_nemotron_15b", "apriel_1p5_15b")


def documented_commands(path: Path) -> list[list[str]]:
    """The commands in a YAML's leading comment lines (``#   cmd \\`` continuations joined), as argv lists."""
    cmds, current = [], ""
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            continue
        text = line[1:]
        if current:
            current += " " + text.strip()
        elif text.startswith("   ") and text.strip().split(" ")[0] in ("apriel", "sbatch", "accelerate", "python"):
            current = text.strip()
        if current and not current.endswith("\\"):
            cmds.append(shlex.split(current, comments=True))
            current = ""
        elif current:
            current = current[:-1]
    return cmds


def _flag(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def _overrides(argv: list[str]) -> list[str]:
    return [a for a in argv if "=" in a and not a.startswith("-")]


def steps_of(folder: Path) -> list[dict]:
    """Each config and documented command of a model folder as {name, reads, writes}."""
    steps = []
    for path in sorted(folder.glob("*.yaml")):
        raw = load_yaml(path)
        name = path.name
        if "merge_method" in raw:
            spec = avg.load_merge_yaml(str(path))
            steps.append(dict(name=name, reads=[str(p.relative_to(Path.cwd())) for p in spec["inputs"]],
                              writes=[spec["out"]]))
        elif "duplicate_middle" in raw or "layers" in raw or "expand_every" in raw:
            steps.append(dict(name=name, reads=[], external=[raw["hf"]], writes=[raw["out"]]))
        elif "grpo" in raw:
            pass  # the documented grpo commands below name model.path and out_dir
        elif "checkpoint" in raw:
            cfg = load_config(TrainConfig, path)
            load = cfg.checkpoint.load or stage_load(cfg)
            steps.append(dict(name=name, reads=[load] if load else [], writes=[cfg.checkpoint.save], cfg=cfg))
        for argv in documented_commands(path):
            where = f"{name}: {' '.join(argv[:3])}"
            if argv[:2] == ["apriel", "convert"]:
                src = _flag(argv, "--hf") or _flag(argv, "--ckpt")
                steps.append(dict(name=where, reads=[src], writes=[_flag(argv, "--out")]))
            elif argv[:2] == ["apriel", "average"] and "--run-dir" in argv:
                steps.append(dict(name=where, reads=[_flag(argv, "--run-dir")], writes=[_flag(argv, "--out")],
                                  average=argv))
            elif "megatron_apriel.rl.grpo" in argv or argv[:2] == ["apriel", "grpo"]:
                grpo = load_config(GRPORunConfig, REPO / _flag(argv, "--config"), _overrides(argv))
                steps.append(dict(name=where, reads=[grpo.model.path], writes=[grpo.out_dir]))
            elif argv[:2] == ["sbatch", "slurm/grpo.sh"]:  # the GRPO launcher: CONFIG then overrides
                grpo = load_config(GRPORunConfig, REPO / argv[2], [a for a in argv[3:] if "=" in a])
                steps.append(dict(name=where, reads=[grpo.model.path], writes=[grpo.out_dir]))
            elif argv[0] == "sbatch":
                assert (REPO / argv[2]).is_file(), f"{where}: no config {argv[2]}"
    return steps


def _under(path: str, roots: set[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


@pytest.mark.parametrize("model", MODELS)
def test_every_load_is_produced_by_an_earlier_stage(model, monkeypatch):
    monkeypatch.chdir(REPO)
    steps = steps_of(REPO / "examples" / model)
    for s in steps:
        for p in s["reads"] + s["writes"]:
            assert p and p.startswith(f"runs/{model}/"), f"{s['name']}: {p!r} is not under runs/{model}/"
    produced, pending, order = set(), list(steps), []
    while pending:
        ready = [s for s in pending if all(_under(p, produced) for p in s["reads"])]
        assert ready, "nothing produces " + "; ".join(
            f"{s['name']} reads {[p for p in s['reads'] if not _under(p, produced)]}" for s in pending)
        for s in ready:
            produced.update(s["writes"])
            order.append(s["name"])
            pending.remove(s)
    # the chain ends in one final model that nothing reads
    read = {p for s in steps for p in s["reads"]}
    finals = {p for s in steps for p in s["writes"] if not _under(p, read) and not any(_under(r, {p}) for r in read)}
    assert finals == {"nemotron": {"runs/apriel_nemotron_15b/final"},
                      "1p5": {"runs/apriel_1p5_15b/sft_final"}}["nemotron" if "nemotron" in model else "1p5"], finals


def saved_iterations(cfg: TrainConfig) -> list[int]:
    """What the training loop leaves in checkpoint.save: every save_interval and the last iteration,
    pruned after each save by the loop's own retention rule."""
    t, ck = cfg.train, cfg.checkpoint
    on_disk: list[int] = []
    for it in sorted({*range(ck.save_interval, t.train_iters + 1, ck.save_interval), t.train_iters}):
        on_disk.append(it)
        keep = retained(on_disk, ck.keep_last, ck.keep_every) | {it}
        on_disk = [i for i in on_disk if i in keep]
    return on_disk


@pytest.mark.parametrize("model", MODELS)
def test_retention_keeps_what_the_average_picks(model, monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(REPO)
    steps = steps_of(REPO / "examples" / model)
    by_save = {s["writes"][0]: s["cfg"] for s in steps if "cfg" in s}
    averages = [s["average"] for s in steps if "average" in s]
    assert len(averages) == (2 if "nemotron" in model else 3)  # upscale + CPT; upscale + CPT 1 + CPT 2
    for argv in averages:
        run, k = _flag(argv, "--run-dir"), int(_flag(argv, "--equispaced"))
        cfg = by_save[run]
        kept = saved_iterations(cfg)
        run_dir = tmp_path / run
        for it in kept:
            (run_dir / f"iter_{it:07d}").mkdir(parents=True)
        picked = avg.select_from_run(run_dir, k, None)
        steps_picked = sorted(int(p.name[5:]) for p in picked)
        assert len(steps_picked) == k and steps_picked[-1] == cfg.train.train_iters
        spacing = cfg.train.train_iters / k
        for s, t in zip(steps_picked, avg.equispaced_targets(cfg.train.train_iters, k)):
            assert abs(s - t) <= 0.05 * spacing, f"{run}: step {s} for target {t:.0f} (kept {kept})"
        assert f"picked steps {', '.join(map(str, steps_picked))}" in capsys.readouterr().out


def test_nemotron_cpt_average_picks_by_step():
    """cpt.yaml's 16213 iterations: the picks are the retained steps nearest 5404, 10809, 16213."""
    cfg = load_config(TrainConfig, REPO / "examples/apriel_nemotron_15b/cpt.yaml")
    kept = saved_iterations(cfg)
    assert kept == [5500, 11000, 16000, 16213]
    assert avg.pick_by_step(kept, 3) == [5500, 11000, 16213]
    # the old keep_every 5000 layout: by position 5000, 15000, 16213 were averaged; by step it is 5000, 10000, 16213
    assert avg.pick_by_step([5000, 10000, 15000, 16000, 16213], 3) == [5000, 10000, 16213]
