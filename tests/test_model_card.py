"""Model cards of exported folders, read back as the Hub reads them (huggingface_hub.ModelCard).

One chain, about 20 s on 2 CPU cores: a tiny HF model in a Hub cache folder -> hf-to-mcore -> 4 CPT
steps -> mcore-to-hf; then an average of two folders. The figures the cards state (tokens seen,
weights, evaluation scores) are checked against what produced them.
"""

from __future__ import annotations

import json

import pytest
from conftest import make_tiny_hf, run_python
from huggingface_hub import ModelCard

from megatron_apriel.checkpoint.model_card import weights_sha256

ITERS, GBS, SEQ = 4, 8, 64  # examples/tiny/cpt.yaml's batch and sequence: 4 * 8 * 64 tokens


def verb(*args) -> int:
    """An ``apriel`` verb in this process (as the demo runs conversion and averaging): no interpreter start."""
    from megatron_apriel.cli import main

    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A base model given by its Hub repo id (found in a Hub cache, offline), trained 4 steps, exported."""
    root = tmp_path_factory.mktemp("card")
    snapshot = root / "hub" / "models--test-org--tiny-base" / "snapshots" / ("a" * 40)
    make_tiny_hf(snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("a" * 40)
    hub = {"HF_HUB_CACHE": str(root / "hub"), "HF_HUB_OFFLINE": "1"}
    run_python(["-m", "megatron_apriel.cli", "convert", "hf-to-mcore", "--hf", "test-org/tiny-base", "--out",
                root / "base_mcore"], env=hub)
    run_python(["-m", "megatron_apriel.train", "--config", "examples/tiny/cpt.yaml", f"checkpoint.save={root / 'cpt'}",
                f"checkpoint.load={root / 'base_mcore'}", f"train.train_iters={ITERS}",
                f"checkpoint.save_interval={ITERS // 2}", "logging.eval_interval=null", "model.changes.vocab_size=500"])
    extra = root / "extra.md"
    extra.write_text("## Intended use\n\nTesting the card.\n")
    out = root / "cpt_export" / "hf"
    assert verb("convert", "mcore-to-hf", "--ckpt", root / "cpt", "--out", out, "--license", "mit",
                "--model-card-extra", f"@{extra}") == 0
    return root, out, snapshot


def test_export_card_metadata_stages_and_tokens(exported):
    _, out, _ = exported
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == "test-org/tiny-base"  # the cache folder the first stage started from
    assert card.data.license == "mit" and card.data.pipeline_tag == "text-generation"
    assert card.data.library_name == "transformers" and {"megatron-apriel", "mcore-to-hf"} <= set(card.data.tags)
    assert "# cpt_export" in card.text.splitlines()  # the run's folder (out is cpt_export/hf)
    tokens = ITERS * GBS * SEQ
    assert f"1 training run(s), {tokens:,} tokens seen in all" in card.text
    row = next(line for line in card.text.splitlines() if line.startswith("| 1 |"))
    assert f"| {ITERS} | {tokens:,} | dataset `synthetic` |" in row and "base_mcore" in row
    assert "global_batch_size: 8" in card.text  # the stage's run_config.yaml
    assert card.text.rstrip().endswith("Testing the card.")


def test_export_card_carries_eval_results_of_these_weights_only(exported, capsys):
    root, out, _ = exported
    sha = weights_sha256(out)
    results = root / "results.json"  # as apriel eval writes it: per model its path, sha256 and scores
    results.write_text(json.dumps({"models": [{"path": str(out), "sha256": sha}],
                                   "results": {str(out): {"math": {"pass@1": 0.375, "pass@1_stderr": 0.125,
                                                                   "maj@4": 0.5, "n": 8}}}}))
    assert verb("convert", "mcore-to-hf", "--ckpt", root / "cpt", "--out", out, "--force",
                "--eval-results", results) == 0
    card = ModelCard.load(out / "README.md")
    got = {(r.dataset_name, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert got == {("math", "pass@1"): 0.375, ("math", "maj@4"): 0.5}
    assert card.data.model_name == "cpt_export" and "| math | pass@1 | 0.3750 ± 0.1250 |" in card.text

    other = root / "other.json"  # another model's results: refused, the folder left as it was
    other.write_text(json.dumps({"models": [{"path": "x", "sha256": "0" * 64}], "results": {"x": {}}}))
    before = (out / "README.md").read_text()
    capsys.readouterr()
    assert verb("convert", "mcore-to-hf", "--ckpt", root / "cpt", "--out", out, "--force", "--eval-results", other) == 2
    assert f"--eval-results {other}: no results for these weights" in capsys.readouterr().err
    assert (out / "README.md").read_text() == before
    assert verb("convert", "mcore-to-hf", "--ckpt", root / "cpt", "--out", root / "x", "--model-card-extra",
                "@/nonexistent.md") == 2
    assert "--model-card-extra @/nonexistent.md: no such file" in capsys.readouterr().err
    assert not (root / "x").exists()


def test_average_card_lists_inputs_weights_and_bases(exported, tmp_path):
    _, _, base = exported
    other = make_tiny_hf(tmp_path / "b", seed=1)
    merged = tmp_path / "merged"
    assert verb("average", base, other, "--weights", 0.25, 0.75, "--out", merged, "--model-card-extra", "merged.") == 0
    card = ModelCard.load(merged / "README.md")
    assert card.data.base_model == "test-org/tiny-base"  # the first input's repo (it sits in the Hub cache)
    assert card.data.license == "other" and "merge" in card.data.tags and card.data.eval_results is None
    assert f"| `{base.resolve()}` | 0.25 |" in card.text and f"| `{other.resolve()}` | 0.75 |" in card.text
    assert json.loads((merged / "merge.json").read_text())["weights"] == [0.25, 0.75]
    assert card.text.rstrip().endswith("merged.")


def test_export_of_an_average_names_it_and_the_run_behind_it(exported, tmp_path):
    root, _, _ = exported
    cpt = root / "cpt"
    assert verb("average", cpt / "iter_0000002", cpt / "iter_0000004", "--out", tmp_path / "avg_mcore") == 0
    assert verb("convert", "mcore-to-hf", "--ckpt", tmp_path / "avg_mcore", "--out", tmp_path / "avg_hf") == 0
    card = ModelCard.load(tmp_path / "avg_hf" / "README.md")
    tokens = ITERS * GBS * SEQ  # the history of the run's last checkpoint; the average adds none
    assert f"1 training run(s) and 1 average(s), {tokens:,} tokens seen in all" in card.text
    rows = [line for line in card.text.splitlines() if line.startswith(("| 1 |", "| 2 |"))]
    assert "iter_0000004" in rows[0] and f"| {tokens:,} |" in rows[0]
    assert "| - | 0 | average of 2: `iter_0000002` 0.5, `iter_0000004` 0.5 |" in rows[1]
    assert card.data.base_model == "test-org/tiny-base"
