"""Depth upscaling and checkpoint averaging, checked against transformers and fp64 arithmetic."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import make_tiny_hf
from safetensors.torch import load_file, save_file

from megatron_apriel.checkpoint import average as avg
from megatron_apriel.checkpoint import upscale as up
from megatron_apriel.checkpoint.hf_io import SafetensorsReader
from megatron_apriel.models import get_preset


def _logits(folder, tokens):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens).logits


# ------------------------------------------------------------------------------------- plans
def test_plans():
    mid = up.plan_duplicate_middle(40, 10)
    assert [p.source for p in mid] == list(range(25)) + list(range(15, 40))
    assert [p.index for p in mid if p.repeated] == list(range(25, 35))
    assert up.middle_block(40, 8) == (16, 24)
    assert [p.source for p in up.plan_from_slices("0-29,10-39", 40)] == list(range(30)) + list(range(10, 40))
    assert [p.source for p in up.plan_expand_every(4, 2)] == [0, 1, 1, 2, 3, 3]
    up.check_identity_plan(up.plan_from_slices("0-29,10-39", 40), 40)
    with pytest.raises(up.UpscaleError, match="in order"):
        up.check_identity_plan(up.plan_from_slices("0-3,8-9", 10), 10)
    with pytest.raises(up.UpscaleError, match="layer 40"):
        up.plan_from_slices("0-40", 40)
    with pytest.raises(up.UpscaleError, match="bad slice"):
        up.plan_from_slices("0-3;4", 8)


def test_nemo_40_to_50_plan_gives_apriel_shapes():
    """The Apriel plan on Mistral-Nemo's config gives apriel-nemotron-15b's tensors, on meta."""
    from transformers import MistralForCausalLM

    nemo = get_preset("mistral-nemo-12b").hf_config().to_dict()
    plan = up.plan_duplicate_middle(40, 10)
    new_config, changed = up.upscale_config(nemo, plan)
    assert new_config["num_hidden_layers"] == 50 and "num_hidden_layers" in changed

    with torch.device("meta"):
        base = MistralForCausalLM(get_preset("mistral-nemo-12b").hf_config())
        want = MistralForCausalLM(get_preset("apriel-nemotron-15b").hf_config())
        got = MistralForCausalLM(type(base.config).from_dict(new_config))
    base_shapes = {n: tuple(t.shape) for n, t in base.state_dict().items()}
    # the streaming writer's output names, with the source tensor's shape
    planned = {new: base_shapes[src] for new, src, _ in up.output_names(list(base_shapes), plan, "model.layers.")}
    want_shapes = {n: tuple(t.shape) for n, t in want.state_dict().items()}
    assert planned == want_shapes
    assert {n: tuple(t.shape) for n, t in got.state_dict().items()} == want_shapes


# ---------------------------------------------------------------------------------- upscaling
def test_identity_init_keeps_logits(tmp_path, tiny_hf_dir):
    out = tmp_path / "up"
    assert up.main(["--hf", str(tiny_hf_dir), "--out", str(out), "--duplicate-middle", "2", "--init", "identity"]) == 0
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 6
    tokens = torch.randint(0, 500, (2, 17), generator=torch.Generator().manual_seed(0))
    base, new = _logits(tiny_hf_dir, tokens), _logits(out, tokens)
    torch.testing.assert_close(new, base, rtol=0, atol=1e-6)
    # the copies are not trivially identical to their sources: that is what makes the test bite
    w = load_file(out / "model.safetensors")
    assert w["model.layers.3.self_attn.o_proj.weight"].abs().sum() == 0
    assert w["model.layers.1.self_attn.o_proj.weight"].abs().sum() > 0


def test_copy_init_is_bit_identical(tmp_path, tiny_hf_dir):
    out = tmp_path / "up"
    assert up.main(["--hf", str(tiny_hf_dir), "--out", str(out), "--layers", "0-2,1-3",
                    "--max-shard-gb", "0.0001"]) == 0
    plan = up.plan_from_slices("0-2,1-3", 4)
    src = load_file(tiny_hf_dir / "model.safetensors")
    with SafetensorsReader(out) as r:  # sharded output with an index
        assert (out / "model.safetensors.index.json").exists()
        assert len(r.keys()) == len(src) + 2 * 9
        for p in plan:
            for suffix in ("self_attn.q_proj.weight", "self_attn.o_proj.weight", "mlp.down_proj.weight",
                           "mlp.gate_proj.weight", "input_layernorm.weight", "post_attention_layernorm.weight"):
                assert torch.equal(r.get(f"model.layers.{p.index}.{suffix}"), src[f"model.layers.{p.source}.{suffix}"])
        for n in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
            assert torch.equal(r.get(n), src[n])
    assert json.loads((out / "upscale_plan.json").read_text())["plan"][3] == [3, 1, True]


def test_llava_decoder_upscale(tmp_path):
    """The Pixtral on-disk layout: decoder layers planned, vision tower and projector passed through."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, PixtralVisionConfig

    text = get_preset("tiny", vocab_size=500).hf_config()
    vision = PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                 head_dim=16, image_size=64, patch_size=16)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text, image_token_index=10,
                                                      vision_feature_layer=-1, vision_feature_select_strategy="full"))
    model.save_pretrained(tmp_path / "llava")
    out = tmp_path / "up"
    assert up.main(["--hf", str(tmp_path / "llava"), "--out", str(out), "--expand-every", "2",
                    "--init", "identity"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["text_config"]["num_hidden_layers"] == 6
    src, new = load_file(tmp_path / "llava" / "model.safetensors"), load_file(out / "model.safetensors")
    for n, t in src.items():
        if n.startswith(("vision_tower.", "multi_modal_projector.")):
            assert torch.equal(new[n], t)
    assert torch.equal(new["language_model.model.layers.3.self_attn.q_proj.weight"],
                       src["language_model.model.layers.2.self_attn.q_proj.weight"])
    reloaded = LlavaForConditionalGeneration.from_pretrained(out)
    assert len(reloaded.model.language_model.layers) == 6


def test_upscale_errors(tmp_path, tiny_hf_dir, capsys):
    assert up.main(["--hf", str(tiny_hf_dir), "--out", str(tmp_path / "x"), "--layers", "0-4"]) == 2
    assert "layer 4" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert up.main(["--hf", str(tiny_hf_dir), "--out", str(tmp_path / "x"), "--layers", "0-1",
                    "--expand-every", "2"]) == 2
    assert "exactly one" in capsys.readouterr().err


# ---------------------------------------------------------------------------------- averaging
# A config the conversion's check accepts (averaging checks the first input's config)
_TINY_CONFIG = {k: v for k, v in get_preset("tiny").hf_config().to_dict().items() if k != "transformers_version"}


def _write_fake(folder, tensors, config=None, tokenizer="tok"):
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config or _TINY_CONFIG))
    (folder / "tokenizer.json").write_text(tokenizer)
    return folder


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_weighted_average_matches_fp64(tmp_path, dtype):
    g = torch.Generator().manual_seed(0)
    weights = [0.3, 0.3, 0.4]
    inputs = []
    for i in range(3):
        tensors = {"a": torch.randn(64, 48, generator=g).to(dtype),
                   "b": (torch.randn(300, generator=g) * 100).to(dtype)}
        inputs.append(_write_fake(tmp_path / f"in{i}", tensors))
    assert avg.main([*map(str, inputs), "--weights", *map(str, weights), "--out", str(tmp_path / "out")]) == 0
    got = load_file(tmp_path / "out" / "model.safetensors")
    srcs = [load_file(p / "model.safetensors") for p in inputs]
    eps = torch.finfo(dtype).eps
    for n in ("a", "b"):
        assert got[n].dtype == dtype
        ref = sum(w * s[n].double() for w, s in zip(weights, srcs))
        # within one rounding of the output dtype (plus fp32 accumulation error for fp32 inputs)
        bound = ref.abs() * eps + (1e-6 * ref.abs().max() if dtype == torch.float32 else 0) + 1e-30
        assert ((got[n].double() - ref).abs() <= bound).all(), n
    assert (tmp_path / "out" / "tokenizer.json").read_text() == "tok"

    # uniform average of real tiny models: a model transformers loads
    a, b = make_tiny_hf(tmp_path / "m0", seed=0), make_tiny_hf(tmp_path / "m1", seed=1)
    assert avg.main([str(a), str(b), "--out", str(tmp_path / "mean")]) == 0
    ta, tb, tm = (load_file(p / "model.safetensors") for p in (a, b, tmp_path / "mean"))
    for n in ta:
        torch.testing.assert_close(tm[n].double(), (ta[n].double() + tb[n].double()) / 2, rtol=0, atol=1e-6)


def test_blocks_give_the_same_bytes(tmp_path, monkeypatch):
    """Averaging in row blocks written in place equals whole-tensor averaging, byte for byte."""
    g = torch.Generator().manual_seed(1)
    inputs = []
    for i in range(3):
        tensors = {"w": torch.randn(37, 29, generator=g).to(torch.bfloat16), "v": torch.randn(301, generator=g),
                   "s": torch.tensor(float(i)), "h": torch.randn(5, 3, 7, generator=g).to(torch.float16)}
        inputs.append(_write_fake(tmp_path / f"in{i}", tensors))
    args = [*map(str, inputs), "--weights", "0.2", "0.3", "0.5", "--max-shard-gb", str(2000 / 1024**3)]
    assert avg.main([*args, "--out", str(tmp_path / "whole")]) == 0
    monkeypatch.setattr(avg, "BLOCK_ELEMENTS", 64)
    assert len(avg.Checkpoint(inputs[0]).blocks("w")) == 19  # 2 rows of 29 per block
    assert avg.main([*args, "--out", str(tmp_path / "blocks")]) == 0
    files = sorted(p.name for p in (tmp_path / "whole").glob("*.safetensors"))
    assert len(files) > 1 and files == sorted(p.name for p in (tmp_path / "blocks").glob("*.safetensors"))
    for name in files + ["model.safetensors.index.json"]:
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "blocks" / name).read_bytes(), name


def test_weights_must_sum_to_one(tmp_path, capsys):
    t = {"a": torch.ones(4)}
    ins = [str(_write_fake(tmp_path / f"in{i}", t)) for i in range(2)]
    assert avg.main([*ins, "--weights", "0.5", "0.6", "--out", str(tmp_path / "o")]) == 2
    assert "sum to 1.1" in capsys.readouterr().err and not (tmp_path / "o").exists()
    assert avg.main([*ins, "--weights", "0.5", "0.6", "--allow-unnormalised", "--out", str(tmp_path / "o")]) == 0
    assert torch.allclose(load_file(tmp_path / "o" / "model.safetensors")["a"], torch.full((4,), 1.1))
    assert avg.main([*ins, "--weights", "1", "--out", str(tmp_path / "o2")]) == 2
    assert "1 weights for 2" in capsys.readouterr().err


@pytest.mark.parametrize("change,message", [
    (dict(tensors={"a": torch.ones(5)}), "shape"),
    (dict(tensors={"a": torch.ones(4, dtype=torch.bfloat16)}), "dtype"),
    (dict(tensors={"b": torch.ones(4)}), "names differ"),
    (dict(config={**_TINY_CONFIG, "num_hidden_layers": 2}), "num_hidden_layers: 4 vs 2"),
    (dict(tokenizer="other"), "tokenizers differ.*tokenizer.json"),
])
def test_mismatch_is_a_clear_error(tmp_path, capsys, change, message):
    a = _write_fake(tmp_path / "a", {"a": torch.ones(4)})
    b = _write_fake(tmp_path / "b", change.pop("tensors", {"a": torch.ones(4)}), **change)
    assert avg.main([str(a), str(b), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and __import__("re").search(message, err), err
    assert not (tmp_path / "o").exists()


def test_equispaced_and_yaml(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    for step in range(100, 1100, 100):  # 10 checkpoints
        _write_fake(run / f"iter_{step:07d}", {"a": torch.full((3,), float(step))})
    (run / "latest_checkpointed_iteration.txt").write_text("1000")
    # targets 333, 667, 1000 -> nearest steps
    assert avg.main(["--equispaced", "3", "--run-dir", str(run), "--out", str(tmp_path / "o")]) == 0
    assert "picked steps 300, 700, 1000 nearest to steps 333, 667, 1000" in capsys.readouterr().out
    assert torch.allclose(load_file(tmp_path / "o" / "model.safetensors")["a"], torch.full((3,), 2000.0 / 3))
    assert avg.main(["--steps", "100", "500", "--run-dir", str(run), "--out", str(tmp_path / "s")]) == 0
    assert torch.allclose(load_file(tmp_path / "s" / "model.safetensors")["a"], torch.full((3,), 300.0))
    # --min-step 600: targets 800, 1000
    assert avg.select_from_run(run, 2, None, min_step=600) == [run / "iter_0000800", run / "iter_0001000"]
    capsys.readouterr()
    for argv, message in [
        (["--equispaced", "11"], "target steps 91, 182, .* fall on only 10 distinct checkpoints"),
        (["--steps", "100", "150"], "--steps: no checkpoint at step 150 \\(the run has steps 100, 200,"),
        (["--steps", "100", "--equispaced", "2"], "give one of --equispaced K or --steps"),
    ]:
        assert avg.main(argv + ["--run-dir", str(run), "--out", str(tmp_path / "x")]) == 2  # bad input
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and __import__("re").search(message, err), err
    assert not (tmp_path / "x").exists()

    monkeypatch.chdir(tmp_path)
    shutil.copytree(run / "iter_0000100", tmp_path / "E")
    shutil.copytree(run / "iter_0000200", tmp_path / "F")
    (tmp_path / "m.yaml").write_text(
        "merge_method: linear\nmodels:\n  - model: E\n    parameters: {weight: 0.5}\n"
        "  - model: F\n    parameters:\n      weight: 0.5\nout: merged\n")
    assert avg.main(["--config", "m.yaml"]) == 0
    assert torch.allclose(load_file(tmp_path / "merged" / "model.safetensors")["a"], torch.full((3,), 150.0))
    (tmp_path / "bad.yaml").write_text("models:\n  - model: E\n    parameters: {wieght: 1}\n")
    assert avg.main(["--config", "bad.yaml", "--out", "x"]) == 2
    assert "models[0].parameters: unknown key 'wieght'" in capsys.readouterr().err


def test_example_configs_parse():
    from conftest import REPO

    merges = [p for p in REPO.glob("examples/*/*.yaml") if "merge_method:" in p.read_text()]
    assert {"merge_final.yaml", "merge_e.yaml"} <= {p.name for p in merges}
    for p in merges:
        spec = avg.load_merge_yaml(str(p))
        avg.check_weights(spec["weights"], len(spec["inputs"]), spec["allow_unnormalised"])
    final = avg.load_merge_yaml(str(REPO / "examples/apriel_nemotron_15b/merge_final.yaml"))
    assert final["weights"] == [0.3, 0.3, 0.4]
    plan = up.load_plan_yaml(str(REPO / "examples/apriel_nemotron_15b/upscale_plan.yaml"))
    assert len(up.build_plan(40, plan.get("layers"), plan.get("duplicate_middle"), plan.get("expand_every"))) == 50


MCORE_SCRIPT = '''
import sys, torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
from megatron_apriel.checkpoint.average import main as average
from megatron_apriel.models import get_preset
from megatron_apriel.models.builder import build_model_chunks
from megatron_apriel.runtime import init_distributed

if __name__ == "__main__":
    root = sys.argv[1]
    init_distributed(device="cpu", seed=0)
    preset = get_preset("tiny", num_layers=2)
    def model(seed):
        torch.manual_seed(seed)
        return build_model_chunks(preset, preset.transformer_config(device="cpu"))[0]
    models = [model(s) for s in (1, 2)]
    import os
    for i, m in enumerate(models):
        os.makedirs(f"{root}/iter_000000{i + 1}")
        dist_checkpointing.save({"model": m.sharded_state_dict()}, f"{root}/iter_000000{i + 1}",
                                get_default_save_sharded_strategy("torch_dist"))
    assert average([f"{root}/iter_0000001", f"{root}/iter_0000002", "--weights", "0.25", "0.75",
                    "--out", f"{root}/avg"]) == 0
    target = model(3)
    for p in target.parameters():
        p.data.fill_(float("nan"))
    loaded = dist_checkpointing.load({"model": target.sharded_state_dict()}, f"{root}/avg")
    target.load_state_dict(loaded["model"])
    n = 0
    for (name, p), p1, p2 in zip(target.named_parameters(), models[0].parameters(), models[1].parameters()):
        ref = 0.25 * p1.detach().double() + 0.75 * p2.detach().double()
        assert ((p.detach().double() - ref).abs() <= ref.abs() * 2e-7 + 1e-12).all(), name
        n += 1
    assert n == len(list(models[0].parameters())) >= 9, n

    # the same average written block by block (one layer of each stacked tensor per block) is
    # stored in several chunks and loads to the same bits
    import torch.distributed.checkpoint as dcp
    from megatron_apriel.checkpoint import average as avg_mod
    avg_mod.BLOCK_ELEMENTS = 1000
    assert average([f"{root}/iter_0000001", f"{root}/iter_0000002", "--weights", "0.25", "0.75",
                    "--out", f"{root}/avg_blocks"]) == 0
    metadata = dcp.FileSystemReader(f"{root}/avg_blocks").read_metadata()
    chunks = metadata.state_dict_metadata["decoder.layers.mlp.linear_fc1.weight"].chunks
    assert len(chunks) == 2, chunks
    blocked = model(4)
    loaded = dist_checkpointing.load({"model": blocked.sharded_state_dict()}, f"{root}/avg_blocks")
    blocked.load_state_dict(loaded["model"])
    for (name, p), q in zip(target.named_parameters(), blocked.parameters()):
        assert torch.equal(p, q), name
    print("checked", n, "parameters")
'''


def test_average_mcore_dist_checkpoints(tmp_path):
    """Two megatron-core dist checkpoints -> their weighted average, loaded back by dist_checkpointing."""
    from conftest import run_python

    script = tmp_path / "mcore_avg.py"
    script.write_text(MCORE_SCRIPT)
    proc = run_python([script, tmp_path], timeout=300, env={"OMP_NUM_THREADS": "1"})
    assert "parameters" in proc.stdout.splitlines()[-1], proc.stdout
