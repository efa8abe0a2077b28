"""HF configs the megatron-core model cannot compute are refused; what it can is mapped and matches
transformers' logits past the original context; corrupt safetensors folders are refused by name.

About 25 s on 2 cores (the parity cases build 2-layer models; refusals stop before any weight is read).
"""

import json
import shutil

import pytest
import torch

from conftest import make_tiny_hf
from megatron_apriel.checkpoint import average as avg
from megatron_apriel.checkpoint import upscale as up
from megatron_apriel.checkpoint.convert import hf_to_mcore_checkpoint, main, mcore_to_hf_checkpoint
from megatron_apriel.checkpoint.mistral import hf_to_mcore, load_canonical_into_chunks
from megatron_apriel.models import get_preset
from megatron_apriel.models.hf_config import HFConfigError, check_hf_config
from megatron_apriel.models.presets import ModelPreset


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _tiny_llama(**changes):
    from transformers import LlamaConfig

    base = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=32, max_position_embeddings=128, rms_norm_eps=1e-5,
                initializer_range=0.1, tie_word_embeddings=False)
    return LlamaConfig(**(base | changes))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_tiny_hf(tmp_path_factory.mktemp("hfcfg") / "hf", seed=5)


def _variant(src, dst, edit):
    """A copy of an HF folder whose config.json is ``edit(dict)``."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    edit(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


# ------------------------------------------------------------------------------ refused fields
def _set(**kv):
    return lambda cfg: cfg.update(kv)


def _llama(**kv):
    def edit(cfg):
        cfg.update(model_type="llama", architectures=["LlamaForCausalLM"], **kv)
        cfg.pop("sliding_window", None)
    return edit


def _rope(**kv):
    return _set(rope_parameters={"rope_theta": 1e6, **kv})


REFUSED = [
    ("sliding_window", _set(sliding_window=16), "sliding_window=16"),
    ("yarn", _rope(rope_type="yarn", factor=4.0, original_max_position_embeddings=32), "rope_type='yarn'"),
    ("dynamic", _rope(rope_type="dynamic", factor=2.0), "rope_type='dynamic'"),
    ("llama3-incomplete", _rope(rope_type="llama3", factor=8.0), "low_freq_factor"),
    ("partial-rotary", _rope(rope_type="default", partial_rotary_factor=0.5), "partial_rotary_factor=0.5"),
    ("activation", _set(hidden_act="gelu"), "hidden_act='gelu'"),
    ("attention-dropout", _set(attention_dropout=0.1), "attention_dropout=0.1"),
    ("attention-bias", _llama(attention_bias=True), "attention_bias=True"),
    ("mlp-bias", _llama(mlp_bias=True), "mlp_bias=True"),
    ("qkv-bias-family", _set(model_type="qwen2", architectures=["Qwen2ForCausalLM"]), "model_type='qwen2'"),
    ("qk-norm-family", _set(model_type="qwen3", architectures=["Qwen3ForCausalLM"]), "model_type='qwen3'"),
    # transformers reads a mistral config with layer_types as Ministral (alternating sliding windows)
    ("layer-types", _set(layer_types=["full_attention", "sliding_attention"] * 2), "model_type='ministral'"),
]


@pytest.mark.parametrize("edit,needle", [r[1:] for r in REFUSED], ids=[r[0] for r in REFUSED])
def test_refused_field_exits_2_naming_it(hf_dir, tmp_path, capsys, edit, needle):
    bad = _variant(hf_dir, tmp_path / "bad", edit)
    out = tmp_path / "out"
    assert main(["hf-to-mcore", "--hf", str(bad), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert needle in err and str(bad / "config.json") in err, err
    assert err.strip().count("\n") == 0, err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_llava_text_and_vision_configs_are_checked():
    from megatron_apriel.checkpoint.llava import hf_config

    good = hf_config(get_preset("tiny-llava"))
    check_hf_config(good)
    cases = [
        (lambda c: setattr(c.text_config, "sliding_window", 16), "text_config.sliding_window=16"),
        (lambda c: setattr(c.text_config, "rope_parameters", {"rope_type": "yarn", "rope_theta": 1e6, "factor": 2.0}),
         "text_config.rope_parameters.rope_type='yarn'"),
        (lambda c: setattr(c.vision_config, "hidden_act", "relu"), "vision_config.hidden_act='relu'"),
        (lambda c: setattr(c.vision_config, "head_dim", 8), "vision_config.head_dim=8"),
        (lambda c: setattr(c, "projector_hidden_act", "relu"), "projector_hidden_act='relu'"),
        (lambda c: setattr(c, "vision_feature_layer", -2), "vision_feature_layer=-2"),
    ]
    for edit, needle in cases:
        cfg = hf_config(get_preset("tiny-llava"))
        edit(cfg)
        with pytest.raises(HFConfigError) as e:
            check_hf_config(cfg)
        assert needle in str(e.value)


def test_upscale_and_average_refuse_before_writing(hf_dir, tmp_path, capsys):
    bad = _variant(hf_dir, tmp_path / "bad", _set(sliding_window=16))
    assert up.main(["--hf", str(bad), "--out", str(tmp_path / "up"), "--duplicate-middle", "1"]) == 1
    assert "sliding_window=16" in capsys.readouterr().err and not (tmp_path / "up").exists()
    bad2 = _variant(bad, tmp_path / "bad2", lambda c: None)
    assert avg.main([str(bad), str(bad2), "--out", str(tmp_path / "avg")]) == 1
    assert "sliding_window=16" in capsys.readouterr().err and not (tmp_path / "avg").exists()


# ------------------------------------------------------------------------------ mapped fields
MAPPED = {
    # original context 32, evaluated at 96: megatron-core's _apply_scaling with the config's parameters
    "llama3": dict(rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
    # Llama-3.1's own parameters (the defaults of megatron-core's GPTModel rope scaling)
    "llama3.1": dict(rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                      "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": 8192}),
    "linear": dict(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}),
    # tied embeddings, another norm epsilon, swish (= silu) and a non-integer rope theta
    "tied-eps-swish": dict(tie_word_embeddings=True, rms_norm_eps=1e-3, hidden_act="swish",
                           rope_parameters={"rope_type": "default", "rope_theta": 12345.5}),
}


@pytest.mark.parametrize("case", list(MAPPED))
def test_mapped_field_matches_transformers_past_the_original_context(case, dist_world_of_one):
    from transformers import LlamaForCausalLM

    from megatron_apriel.models.builder import build_gpt_model

    torch.manual_seed(0)
    hf = LlamaForCausalLM(_tiny_llama(**MAPPED[case])).eval()
    preset = ModelPreset.from_hf_config(hf.config)
    canonical = dict(hf_to_mcore(hf.state_dict().__getitem__, preset))

    def logits(p):
        model = build_gpt_model(p, p.transformer_config()).eval()
        load_canonical_into_chunks([model], canonical, p)
        with torch.no_grad():
            return model(tokens, torch.arange(seq).unsqueeze(0), None)[..., : p.vocab_size]

    seq = 96  # past original_max_position_embeddings=32 of the llama3 case
    tokens = torch.randint(0, preset.vocab_size, (1, seq), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(tokens).logits
    assert rel(logits(preset), ref) < 1e-5
    if preset.rope_scaling is not None:  # negative control: the scaling dropped, as before the check
        assert rel(logits(preset.replace(rope_scaling=None)), ref) > 1e-3


def test_llama3_checkpoint_converts_both_ways_and_lists_ignored_fields(tmp_path, capsys, dist_world_of_one):
    """hf-to-mcore -> mcore-to-hf keeps the rope scaling: transformers' logits are identical after."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    torch.manual_seed(0)
    hf = LlamaForCausalLM(_tiny_llama(**MAPPED["llama3"]))
    hf.save_pretrained(tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**cfg, "my_training_note": "x"}))
    hf_to_mcore_checkpoint(tmp_path / "hf", tmp_path / "mcore")
    err = capsys.readouterr().err
    assert err.count("ignored") == 1 and "my_training_note" in err, err
    mcore_to_hf_checkpoint(tmp_path / "mcore", tmp_path / "back")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "back", dtype=torch.float32).eval()
    assert back.config.rope_parameters["rope_type"] == "llama3"
    tokens = torch.randint(0, 256, (1, 80), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(back(tokens).logits, hf.eval()(tokens).logits)


# ------------------------------------------------------------------------------ corrupt inputs
@pytest.fixture(scope="module")
def sharded_dir(hf_dir, tmp_path_factory):
    from transformers import MistralForCausalLM

    out = tmp_path_factory.mktemp("sharded") / "hf"
    MistralForCausalLM.from_pretrained(hf_dir).save_pretrained(out, max_shard_size="100KB")
    assert len(list(out.glob("model-*.safetensors"))) > 2
    return out


def _truncate(folder, name, keep):
    """Keep the first ``keep`` bytes (negative: drop the last ``-keep``)."""
    path = folder / name
    path.write_bytes(path.read_bytes()[:keep])


def _first_shard(folder):
    return sorted(p.name for p in folder.glob("model-*.safetensors"))[0]


CORRUPT = [
    ("header-truncated", "single", lambda d: _truncate(d, "model.safetensors", 20), "model.safetensors"),
    ("data-truncated", "single", lambda d: _truncate(d, "model.safetensors", -8), "model.safetensors"),
    ("shard-data-truncated", "sharded", lambda d: _truncate(d, _first_shard(d), -4), "model-00001-of-"),
    ("shard-missing", "sharded", lambda d: (d / _first_shard(d)).unlink(), "model-00001-of-"),
    ("shard-not-in-index", "sharded", lambda d: shutil.copy(d / _first_shard(d), d / "model-00099-of-00099.safetensors"),
     "model-00099-of-00099.safetensors"),
    ("index-unparsable", "sharded", lambda d: (d / "model.safetensors.index.json").write_text("{"),
     "model.safetensors.index.json"),
    ("index-names-wrong-shard", "sharded", lambda d: _move_in_index(d), "model-00001-of-"),
]


def _move_in_index(folder):
    path = folder / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    first = _first_shard(folder)
    other = next(k for k, v in index["weight_map"].items() if v != first)
    index["weight_map"][other] = first
    path.write_text(json.dumps(index))


@pytest.mark.parametrize("kind,corrupt,needle", [c[1:] for c in CORRUPT], ids=[c[0] for c in CORRUPT])
def test_corrupt_input_is_refused_naming_the_file(hf_dir, sharded_dir, tmp_path, capsys, kind, corrupt, needle):
    bad = tmp_path / "bad"
    shutil.copytree(hf_dir if kind == "single" else sharded_dir, bad)
    corrupt(bad)
    out = tmp_path / "out"
    assert main(["hf-to-mcore", "--hf", str(bad), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}/{needle}" in err and err.strip().count("\n") == 0, err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
