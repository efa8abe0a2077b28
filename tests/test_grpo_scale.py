"""GRPO at the recipe's scale: the FSDP accelerate config, the per-GPU memory estimate of the 15B
config, the KL term with a reference model, and online filtering (dynamic sampling).

Runtime: the two training tests share one 3-step tiny run (45 s on a loaded 2-core machine); the
rest take well under a second."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_apriel.config import load_config
from megatron_apriel.models.presets import get_preset
from megatron_apriel.rl.grpo import GRPORunConfig, train
from megatron_apriel.rl.memory import GiB, grpo_memory
from megatron_apriel.rl.memory import main as grpo_info
from test_grpo import toy_config

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "examples/apriel_nemotron_15b/grpo.yaml"
PRESET = get_preset("apriel-nemotron-15b")


def recipe(*overrides):
    return load_config(GRPORunConfig, RECIPE, ["model.path=x", "data.train_file=x", *overrides]).grpo


def test_accelerate_fsdp_config_is_what_accelerate_reads():
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    c = load_config_from_file(str(REPO / "examples/apriel_nemotron_15b/accelerate_fsdp.yaml"))
    assert c.distributed_type == DistributedType.FSDP and c.mixed_precision == "bf16"
    assert c.fsdp_config["fsdp_version"] == 2
    assert c.fsdp_config["fsdp_transformer_layer_cls_to_wrap"] == "MistralDecoderLayer"
    # Checkpoints must be whole HF models: the recipe averages them.
    assert c.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"


def test_memory_estimate_sharding_and_recipe_fit():
    P = PRESET.param_counts()["total"]
    g = recipe()
    m16 = grpo_memory(PRESET, g, gpus=16)
    # fp32 weights + grads + Adam m, v = 16 bytes/param, sharded over the 16 GPUs.
    assert m16["states"] == pytest.approx(16 * P / 16 / GiB)
    assert grpo_memory(PRESET, g, gpus=1)["states"] == pytest.approx(16 * P / GiB) and 16 * P / 1e9 > 239
    assert m16["fits"] and m16["peak"] < 70, m16
    assert m16["reference"] == 0 and grpo_memory(PRESET, recipe("grpo.beta=0.01"), 16)["reference"] > 0
    # Each vLLM TP rank holds half a bf16 copy, and the rest of its reservation is KV cache for several
    # whole 34k-token rollouts.
    assert m16["vllm_weights"] == pytest.approx(P / GiB)
    assert m16["kv_cache_tokens"] > 4 * 34816
    # The configuration this one replaced (8 completions per micro-batch, one whole vLLM copy in 30% of a
    # GPU) does not fit, and a whole bf16 copy of vLLM's weights does not fit in its reservation.
    old = grpo_memory(PRESET, recipe("grpo.per_device_train_batch_size=8", "grpo.vllm_tensor_parallel_size=1",
                                     "grpo.vllm_gpu_memory_utilization=0.3", "grpo.vllm_enable_sleep_mode=false"), 16)
    assert not old["fits"] and old["kv_cache_tokens"] == 0


def test_grpo_info_prints_the_table(capsys):
    assert grpo_info(["--config", str(RECIPE)]) == 0
    out = capsys.readouterr().out
    assert "FSDP over 16 GPUs" in out and "fits in 80 GiB" in out and "sharded fp32 weights+grads+Adam" in out
    assert grpo_info(["--config", str(RECIPE), "--gpus", "8", "grpo.vllm_enable_sleep_mode=false"]) == 0
    assert "does NOT fit" in capsys.readouterr().out
    assert grpo_info(["--config", str(RECIPE), "grpo.bogus=1"]) == 2
    assert "grpo.bogus" in capsys.readouterr().err


@pytest.fixture(scope="module")
def kl_dynamic_run(tmp_path_factory):
    """3 GRPO steps with beta > 0 and dynamic sampling, on prompts half of which every rollout solves."""
    tmp = tmp_path_factory.mktemp("grpo_kl_ds")
    cfg = toy_config(tmp, ["grpo.max_steps=3", "grpo.beta=0.05", "grpo.dynamic_sampling=true",
                           "grpo.save_steps=100"])
    toy = Path(cfg.data.train_file).read_text().splitlines()[:8]
    always = json.dumps({"prompt": "abcd ", "domain": "toy",
                         "checks": [{"type": "exclude_keywords", "keywords": ["zzz"]}]})
    Path(cfg.data.train_file).write_text("\n".join(toy + [always] * 8) + "\n")
    return train(cfg)


def test_kl_with_reference_model(kl_dynamic_run):
    s = kl_dynamic_run
    assert s["reference_model"] and len(s["kl"]) == 3
    # The first step compares the policy with its own copy; after updates the KL term is positive.
    assert s["kl"][0] == pytest.approx(0.0, abs=1e-6)
    assert s["kl"][1] > 1e-4 and s["kl"][2] > 1e-4, s["kl"]


def test_dynamic_sampling_drops_and_refills(kl_dynamic_run):
    t = kl_dynamic_run["dynamic_sampling"]
    # Groups of the always-solved prompt all get reward 1: they are dropped and refilled.
    assert t["groups"] >= 6 and t["dropped"] >= 1 and t["refill_rounds"] >= 1, t
    # Every group trained on has a non-zero advantage, except slots filled with dropped groups when the
    # refill rounds ran out (counted).
    assert t["trained_zero_advantage"] == t["filled_with_dropped"], t
