import subprocess
import sys

import pytest
import torch

from megatron_apriel.models import PRESETS, ModelPreset, get_preset, padded_vocab_size


def hf_meta_count(preset: ModelPreset) -> tuple[int, int, int]:
    """(total, vision tower, projector) parameters of the transformers model built on the meta device."""
    from transformers import LlavaForConditionalGeneration, MistralForCausalLM

    from megatron_apriel.checkpoint import llava

    with torch.device("meta"):
        if preset.vision is None:
            return sum(p.numel() for p in MistralForCausalLM(preset.hf_config()).parameters()), 0, 0
        model = LlavaForConditionalGeneration(llava.hf_config(preset))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return count(model), count(model.model.vision_tower), count(model.model.multi_modal_projector)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_param_count_matches_transformers_and_formula(name):
    """Every preset, vision encoder and projector included (runtime: ~0.1 s each)."""
    p = get_preset(name)
    h, d, f, v = p.hidden_size, p.kv_channels, p.ffn_hidden_size, p.vocab_size
    per_layer = (h * d * (p.num_attention_heads + 2 * p.num_query_groups) + p.num_attention_heads * d * h
                 + 3 * h * f + 2 * h)
    analytic = 2 * v * h + p.num_layers * per_layer + h
    c = p.param_counts()
    assert c["decoder"] == analytic
    assert hf_meta_count(p) == (c["total"], c["vision_encoder"], c["projector"])
    assert c["total"] == analytic + c["vision_encoder"] + c["projector"]
    assert (c["vision_encoder"] > 0) == (p.vision is not None)


def test_readme_preset_table_is_the_code_s():
    from conftest import REPO

    from megatron_apriel.models.info import preset_table

    table = preset_table()
    assert table in (REPO / "README.md").read_text(), "README's preset table differs from `apriel model-info --table`"
    assert "| `pixtral-12b` |" in table and "12.68 B (decoder 12.25 B + vision 0.40 B + projector 31.47 M)" in table


def test_recipe_numbers():
    nemo, apriel = get_preset("mistral-nemo-12b"), get_preset("apriel-nemotron-15b")
    mm = get_preset("apriel-1.5-15b")
    assert (nemo.num_layers, apriel.num_layers, mm.num_layers) == (40, 50, 48)
    assert nemo.kv_channels * nemo.num_attention_heads == 4096 != nemo.hidden_size
    assert get_preset("pixtral-12b").rope_theta == 1e9 and nemo.rope_theta == 1e6
    # 12.2B and 15.0B as published
    assert round(nemo.param_counts()["total"] / 1e9, 1) == 12.2
    assert round(apriel.param_counts()["total"] / 1e9, 1) == 15.0


def test_megatron_model_has_preset_param_count(dist_world_of_one):
    from megatron_apriel.models.builder import build_gpt_model

    p = get_preset("tiny")
    model = build_gpt_model(p, p.transformer_config())
    assert sum(t.numel() for t in model.parameters()) == p.param_counts()["total"]


def test_hf_config_round_trip():
    for name in PRESETS:
        p = get_preset(name)
        back = ModelPreset.from_hf_config(p.hf_config(), name=p.name)
        for field in ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
                      "ffn_hidden_size", "vocab_size", "rope_theta", "norm_epsilon", "untie_embeddings"):
            assert getattr(back, field) == getattr(p, field), (name, field)


def test_padded_vocab_is_tp_independent():
    assert padded_vocab_size(131072, 1) == padded_vocab_size(131072, 8) == 131072
    assert padded_vocab_size(500, 1) == padded_vocab_size(500, 2) == padded_vocab_size(500, 8) == 512


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(KeyError, match="unknown model preset 'nemo'"):
        get_preset("nemo")


def test_fp8_without_gpu_is_a_clear_error():
    from megatron_apriel.models.builder import check_fp8

    with pytest.raises(ValueError, match="te-hybrid needs Transformer Engine on a CUDA GPU"):
        check_fp8("hybrid", "cpu")  # an earlier config's TE format name: still TE's hybrid recipe
    with pytest.raises(ValueError, match="must be one of none, te-hybrid"):
        check_fp8("e5m2", "cuda")


def test_model_info_cli():
    out = subprocess.run([sys.executable, "-m", "megatron_apriel", "model-info", "apriel-nemotron-15b",
                          "--tp", "4", "--dp", "8"], capture_output=True, text=True, check=True).stdout
    assert "14,974,182,400" in out
    assert "optimizer" in out and "total" in out


def test_memory_estimate_shards_optimizer_over_dp():
    from megatron_apriel.models.info import memory_estimate

    p = get_preset("apriel-nemotron-15b")
    one = memory_estimate(p, tp=4, dp=1)
    eight = memory_estimate(p, tp=4, dp=8)
    assert one["optimizer_GiB"] == pytest.approx(8 * eight["optimizer_GiB"])
    assert one["weights_GiB"] == eight["weights_GiB"]
    assert one["params_per_gpu"] == pytest.approx(p.param_counts()["total"] / 4, rel=1e-3)
