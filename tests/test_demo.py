"""``apriel demo`` end to end at a short setting: every stage's output exists and loads, and SFT
has taught the model some of the arithmetic; on two or more cores its training is data-parallel and
the specialists train side by side.

One run (module fixture, ``--minutes 2``) serves every assertion; it takes about four and a half
minutes on 2 CPU cores (measured 262 s wall, 247 s CPU, while a default demo run shared the cores).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from conftest import REPO, REPO_PYTHONPATH, run_python

from megatron_apriel.demo.cores import Forked, data_parallel, given_cores
from megatron_apriel.demo.recipe import DemoError
from megatron_apriel.errors import InputError

MINUTES = "2"
N_TEST = 84  # --minutes 2: 28 held-out problems per family
STAGES = ["data", "preprocess", "pretrain", "upscale", "cpt", "average", "sft", "sft_a", "sft_b", "merge", "grpo",
          "final", "generate"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    proc = run_python(["-m", "megatron_apriel", "demo", "--out", out, "--minutes", MINUTES], timeout=900,
                      env={"OMP_NUM_THREADS": "1"})
    return out, proc.stdout


def test_stages_show_their_effect(demo):
    """Each stage does its job at the short setting. Measured at --minutes 2 (2 CPU cores): format
    rate 0.000 after CPT -> 1.000 after SFT, merge, GRPO and final; held-out accuracy 0.000 after
    CPT -> 0.13-0.20 after SFT, merge, GRPO and final (84 problems, 95% intervals from 0.06 up);
    SFT loss 0.09-0.10 from over 1.4; upscaled loss within 0.02 of the base's, from scratch 7.0.
    The floors keep a margin. (The default run reaches 0.86: README, "The demo".)"""
    out, _ = demo
    st = json.loads((out / "demo_summary.json").read_text())["stages"]
    up = st["upscale"]
    # copies of trained layers keep the base model's function closely; a new model is near ln(1024)
    assert abs(up["upscaled_loss"] - up["base_loss"]) < 0.15 and up["scratch_loss"] > up["base_loss"] + 3
    shares = {k: v["share"] for k, v in st["cpt"]["mix"].items()}
    assert shares == pytest.approx({"reasoning": 0.60, "cot": 0.25, "replay": 0.15}, abs=0.02)
    assert st["average"]["format_rate"] == 0.0  # the CPT model has never seen the chat template
    assert st["average"]["accuracy"] == 0.0
    for name in ("sft", "sft_a", "sft_b", "merge", "grpo", "final"):
        assert st[name]["format_rate"] >= 0.95, (name, st[name]["format_rate"])
        # at least 5 of 84 held-out problems right, where the CPT model gets none
        assert st[name]["accuracy"] >= 0.06, (name, st[name]["accuracy"])
    assert st["sft"]["loss"] < 0.3 < st["sft"]["first_loss"]
    # GRPO's held-out effect, paired over the same problems (sampled at its temperature)
    pd = st["grpo"]["sampled_paired_difference"]
    assert pd["n"] == N_TEST and pd["low"] <= pd["mean"] <= pd["high"]
    assert pd["mean"] == pytest.approx(st["grpo"]["sampled_accuracy"] - st["merge"]["sampled_accuracy"], abs=1e-9)
    # the specialists start from the generalist: from its loss, not from the CPT model's
    assert max(st["sft_a"]["first_loss"], st["sft_b"]["first_loss"]) < 0.3


def test_uses_the_cores_it_is_given(demo):
    """Training data-parallel over the cores (the same global batch: SFT's 4 rows as 2 x 2), the
    specialists side by side, the evaluations beside GRPO; one core: one process at a time."""
    out, stdout = demo
    sft_log = (out / "sft" / "log.txt").read_text()
    spec_log = (out / "sft_a" / "log.txt").read_text()
    if given_cores() < 2:
        assert "DP=1" in sft_log and "side by side" not in stdout
        return
    assert "1 micro-batches x 2 per DP rank, DP=2" in sft_log and "torch.distributed.run" in sft_log
    assert "x 4 per DP rank, DP=1" in spec_log  # one core each: the whole batch in one process
    assert "sft_a and sft_b side by side" in stdout and "[sft_b] " in stdout
    # the evaluations wait for a free core: beside GRPO (one process), then finish their stages
    assert "evaluations of pretrain, average, sft, sft_a, sft_b, merge run beside grpo" in stdout
    assert "[merge evaluation]   held-out" in stdout
    merge_done = re.search(r"^\[10/13\] merge: \d+ s, ", stdout, re.M).start()  # its figures, after GRPO ran
    assert stdout.index("merge: model made") < stdout.index("grpo: GRPO on C") < merge_done


def test_data_parallel_keeps_the_global_batch():
    assert data_parallel(2, 8) == (2, 4) and data_parallel(2, 4) == (2, 2)
    assert data_parallel(1, 8) == (1, 8) and data_parallel(3, 8) == (2, 4) and data_parallel(16, 4) == (4, 1)


def test_given_cores_follows_affinity():
    before = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {min(before)})
        assert given_cores() == 1
    finally:
        os.sched_setaffinity(0, before)
    assert given_cores() == len(before)


def _all_reduce(argv):
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method="env://")
    t = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(t)
    print(f"rank {dist.get_rank()} of {dist.get_world_size()} {argv[0]}: {t.item():g}")
    dist.destroy_process_group()
    return 0


def _one_rank_fails(argv):
    import time

    if os.environ["RANK"] == "1":
        print("rank 1: error: bad input")
        return 2
    time.sleep(600)  # as a rank waiting in a collective for the one that failed
    return 0


def _forked_ranks_check() -> None:
    from megatron_apriel.demo.cores import Ranks

    ranks = Ranks(_all_reduce, ["sum"], 2, dict(os.environ))
    assert sorted(ranks.lines()) == ["rank 0 of 2 sum: 3\n", "rank 1 of 2 sum: 3\n"] and ranks.wait() == 0
    Ranks.GRACE_S = 0.5
    ranks = Ranks(_one_rank_fails, [], 2, dict(os.environ))
    assert list(ranks.lines()) == ["rank 1: error: bad input\n"]
    assert ranks.wait() == 2 and sorted(ranks.codes.values()) == [-15, 2]  # rank 0 stopped by SIGTERM
    print("forked ranks: ok")


def test_forked_ranks_form_one_world_and_a_failure_stops_them():
    """In a fresh interpreter, as the demo's own process is: a pytest process that has joined a
    torch.distributed world (another module's fixture) would hand it down to the forked ranks."""
    proc = run_python(["-c", "import test_demo; test_demo._forked_ranks_check()"], timeout=300,
                      env={"PYTHONPATH": os.pathsep.join([REPO_PYTHONPATH, str(REPO / "tests")])})
    assert "forked ranks: ok" in proc.stdout, proc.stdout[-3000:]


def _fails():
    raise InputError("no such file: x.jsonl")


def test_forked_work_returns_its_result_or_its_error(capfd):
    assert Forked(lambda: print("hello") or {"pid": os.getpid()}, "side", DemoError).result()["pid"] != os.getpid()
    assert "[side] hello\n" in capfd.readouterr().out
    with pytest.raises(DemoError, match="^work: no such file: x.jsonl$"):
        Forked(_fails, "work", lambda label, message: DemoError(f"{label}: {message}")).result()
    with pytest.raises(DemoError, match="(?s)1 / 0.*ZeroDivisionError: division by zero"):
        Forked(lambda: 1 / 0, "work", lambda label, message: DemoError(message)).result()


def _indexed(prefix: Path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    return IndexedDataset(str(prefix))


def test_every_stage_done_and_summarised(demo):
    out, stdout = demo
    summary = json.loads((out / "demo_summary.json").read_text())
    assert list(summary["stages"]) == STAGES
    for name in STAGES:
        assert (out / name / "done.json").is_file(), name
        assert summary["stages"][name]["seconds"] >= 0
    for name in ("pretrain", "average", "sft", "sft_a", "sft_b", "merge", "grpo", "final"):
        f = summary["stages"][name]
        assert 0.0 <= f["accuracy"] <= 1.0 and 0.0 <= f["format_rate"] <= 1.0 and f["eval_n"] == N_TEST, name
        assert set(f["families"]) == {"add", "sub", "compare"}, name
    for name in ("pretrain", "cpt", "sft", "sft_a", "sft_b"):
        curve = summary["stages"][name]["loss_curve"]
        assert len(curve) == summary["stages"][name]["iterations"] > 0
        assert all(x == x and x > 0 for _, x in curve), name  # finite, positive
    for png in ("loss_curves.png", "accuracy.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    for line in ("stage", "pretrain", "final", "held-out accuracy: base", "CPT blend realised", "upscaling:"):
        assert line in stdout


def test_data_and_indexed_datasets_load(demo):
    out, _ = demo
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out / "data" / "tokenizer")
    assert len(tok) == 1024 and tok.eos_token == "<|end|>"
    for source in ("reasoning", "cot", "replay"):
        ds = _indexed(out / "preprocess" / f"{source}_text_document")
        stats = json.loads((out / "preprocess" / f"{source}.stats.json").read_text())
        assert len(ds) == stats["documents"] > 0 and stats["skipped"] == 0
        assert int(ds[0][-1]) == tok.eos_token_id  # --append-eod
        assert int(ds.sequence_lengths.sum()) == stats["tokens"]
    for spec in ("sft", "sft_a", "sft_b"):
        toks = _indexed(out / "preprocess" / f"{spec}_tokens_document")
        mask = _indexed(out / "preprocess" / f"{spec}_loss_mask_document")
        assert len(toks) == len(mask) > 0
        text = tok.decode(toks[0])
        assert "<|assistant|>" in text and "[BEGIN FINAL RESPONSE]" in text
    # no held-out question is in any training text
    test = [json.loads(line)["question"] for k in ("add", "sub", "compare")
            for line in (out / "data" / f"test_{k}.jsonl").read_text().splitlines()]
    train_text = "".join((out / "data" / f).read_text()
                         for f in ("reasoning.jsonl", "cot.jsonl", "sft.jsonl", "sft_a.jsonl", "sft_b.jsonl"))
    assert test and not [q for q in test if q in train_text]


def test_checkpoints_load(demo):
    out, _ = demo
    import torch
    from transformers import AutoModelForCausalLM

    for run in ("pretrain", "cpt", "sft", "sft_a", "sft_b"):
        latest = (out / run / "ckpt" / "latest_checkpointed_iteration.txt").read_text().strip()
        assert (out / run / "ckpt" / f"iter_{int(latest):07d}").is_dir(), run
    cpt_iters = sorted((out / "cpt" / "ckpt").glob("iter_*"))
    assert len(cpt_iters) >= 3  # the average takes 3 equispaced ones
    assert (out / "average" / "mcore" / "metadata.json").is_file()
    layers = {}
    for hf in ("pretrain/hf", "upscale/hf", "average/hf", "sft/hf", "sft_a/hf", "sft_b/hf", "merge/hf", "final/hf"):
        model = AutoModelForCausalLM.from_pretrained(out / hf)
        layers[hf] = model.config.num_hidden_layers
        logits = model(torch.tensor([[1, 5, 9]])).logits
        assert logits.shape == (1, 3, 1024) and torch.isfinite(logits).all(), hf
    assert layers["pretrain/hf"] == 4 and all(v == 5 for k, v in layers.items() if k != "pretrain/hf")
    steps = json.loads((out / "plan.json").read_text())["grpo_steps"]
    grpo = sorted((out / "grpo" / "run").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert [p.name for p in grpo] == [f"checkpoint-{steps // 2}", f"checkpoint-{steps}"]
    merge = json.loads((out / "final" / "hf" / "merge.json").read_text())
    assert merge["weights"] == [0.3, 0.3, 0.4]
    from huggingface_hub import ModelCard

    card = ModelCard.load(out / "final" / "hf" / "README.md")  # the final model's card: merge and held-out figures
    final = json.loads((out / "final" / "done.json").read_text())
    assert card.data.pipeline_tag == "text-generation" and "merge" in card.data.tags
    assert {r.metric_type: r.metric_value for r in card.data.eval_results}["accuracy"] == final["accuracy"]
    assert "| 0.4 |" in card.text and "## Recipe" in card.text


def test_rerun_skips_every_stage(demo):
    out, _ = demo
    before = {n: (out / n / "done.json").stat().st_mtime_ns for n in STAGES}
    proc = run_python(["-m", "megatron_apriel", "demo", "--out", out, "--minutes", MINUTES], timeout=300)
    assert proc.stdout.count("done before, skipped") == len(STAGES)
    assert before == {n: (out / n / "done.json").stat().st_mtime_ns for n in STAGES}


def test_other_sizes_in_same_out_is_refused(demo):
    out, _ = demo
    proc = run_python(["-m", "megatron_apriel", "demo", "--out", out, "--minutes", "2.5"], timeout=300, check=False)
    assert proc.returncode == 2 and "--force" in proc.stderr
