"""HF MistralForCausalLM vs megatron-core GPTModel built from our preset, fp32 on CPU."""

import pytest
import torch

from megatron_apriel.checkpoint.mistral import (
    hf_to_mcore,
    load_canonical_into_chunks,
    mcore_to_hf,
    pack_qkv,
    shard_tp,
    unpack_qkv,
    unshard_tp,
)
from megatron_apriel.models.presets import ModelPreset


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def hf_and_mcore(tiny_hf_dir, dist_world_of_one):
    from transformers import MistralForCausalLM

    from megatron_apriel.models.builder import build_gpt_model

    hf = MistralForCausalLM.from_pretrained(tiny_hf_dir, torch_dtype=torch.float32).eval()
    preset = ModelPreset.from_hf_config(hf.config)
    assert preset.kv_channels * preset.num_attention_heads != preset.hidden_size  # the Nemo trap
    assert preset.num_query_groups < preset.num_attention_heads  # GQA
    model = build_gpt_model(preset, preset.transformer_config()).eval()
    load_canonical_into_chunks([model], dict(hf_to_mcore(hf.state_dict().__getitem__, preset)), preset)
    return hf, model, preset


def test_logits_match_transformers(hf_and_mcore):
    hf, model, preset = hf_and_mcore
    tokens = torch.randint(0, preset.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(48).unsqueeze(0).expand(2, -1)
    with torch.no_grad():
        ref = hf(tokens).logits
        ours = model(tokens, pos, None)[..., : preset.vocab_size]
    assert ours.shape == ref.shape
    assert rel(ours, ref) < 1e-5


def test_wrong_qkv_layout_is_detected(hf_and_mcore):
    """Negative control: a plausible wrong layout (q, k, v concatenated, not grouped) is far off."""
    hf, model, preset = hf_and_mcore
    sd = hf.state_dict()
    canonical = dict(hf_to_mcore(sd.__getitem__, preset))
    for i in range(preset.num_layers):
        p = f"model.layers.{i}.self_attn."
        canonical[f"decoder.layers.{i}.self_attention.linear_qkv.weight"] = torch.cat(
            [sd[p + "q_proj.weight"], sd[p + "k_proj.weight"], sd[p + "v_proj.weight"]])
    from megatron_apriel.models.builder import build_gpt_model

    wrong = build_gpt_model(preset, preset.transformer_config()).eval()
    load_canonical_into_chunks([wrong], canonical, preset)
    tokens = torch.randint(0, preset.vocab_size, (1, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(tokens).logits
        bad = wrong(tokens, torch.arange(32).unsqueeze(0), None)[..., : preset.vocab_size]
    assert rel(bad, ref) > 1e-2


def test_mapping_round_trip_is_exact(tiny_hf_dir):
    from safetensors.torch import load_file

    sd = load_file(str(tiny_hf_dir / "model.safetensors"))
    from transformers import AutoConfig

    preset = ModelPreset.from_hf_config(AutoConfig.from_pretrained(tiny_hf_dir))
    canonical = dict(hf_to_mcore(sd.__getitem__, preset))
    back = dict(mcore_to_hf(canonical.__getitem__, preset))
    assert set(back) == set(sd)
    for k in sd:
        assert torch.equal(back[k], sd[k]), k


@pytest.mark.parametrize("tp", [2, 4])
def test_tp_shard_round_trip_is_exact(tp):
    from megatron_apriel.models import get_preset

    p = get_preset("tiny", num_query_groups=4)
    g = torch.Generator().manual_seed(0)
    h, d = p.hidden_size, p.kv_channels
    q = torch.randn(p.num_attention_heads * d, h, generator=g)
    k = torch.randn(p.num_query_groups * d, h, generator=g)
    v = torch.randn(p.num_query_groups * d, h, generator=g)
    qkv = pack_qkv(q, k, v, p)
    assert all(torch.equal(a, b) for a, b in zip(unpack_qkv(qkv, p), (q, k, v)))
    fc1 = torch.randn(2 * p.ffn_hidden_size, h, generator=g)
    for name, full in [("decoder.layers.0.self_attention.linear_qkv.weight", qkv),
                       ("decoder.layers.0.mlp.linear_fc1.weight", fc1),
                       ("decoder.layers.0.self_attention.linear_proj.weight", torch.randn(h, 4 * d, generator=g))]:
        shards = [shard_tp(name, full, r, tp) for r in range(tp)]
        assert torch.equal(unshard_tp(name, shards), full)
    # a TP shard of fc1 is [gate_shard; up_shard]
    gate, up = fc1.chunk(2)
    assert torch.equal(shard_tp("decoder.layers.0.mlp.linear_fc1.weight", fc1, 1, tp),
                       torch.cat([gate.chunk(tp)[1], up.chunk(tp)[1]]))
