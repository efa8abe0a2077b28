"""HF configs the megatron-core model cannot compute are refused; what it can is mapped and matches
transformers' logits past the original context; corrupt safetensors folders are refused by name.

About 30 s on 2 cores (the parity cases build 2-layer models; refusals stop before any weight is read).
"""

import json
import re
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


# The config.json files of the recipe's two bases, as published (fields of older transformers included).
NEMO_CONFIG = {
    "architectures": ["MistralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2,
    "head_dim": 128, "hidden_act": "silu", "hidden_size": 5120, "initializer_range": 0.02, "intermediate_size": 14336,
    "max_position_embeddings": 1024000, "model_type": "mistral", "num_attention_heads": 32, "num_hidden_layers": 40,
    "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "sliding_window": None,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.43.0.dev0", "use_cache": True,
    "vocab_size": 131072}
PIXTRAL_CONFIG = {
    "architectures": ["LlavaForConditionalGeneration"], "ignore_index": -100, "image_seq_length": 1,
    "image_token_index": 10, "model_type": "llava", "projector_hidden_act": "gelu",
    "text_config": {"head_dim": 128, "hidden_act": "silu", "hidden_size": 5120, "intermediate_size": 14336,
                    "is_composition": True, "max_position_embeddings": 1024000, "model_type": "mistral",
                    "num_hidden_layers": 40, "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
                    "rope_theta": 1000000000.0, "sliding_window": None, "vocab_size": 131072},
    "torch_dtype": "bfloat16", "transformers_version": "4.45.0.dev0",
    "vision_config": {"head_dim": 64, "hidden_act": "silu", "image_size": 1024, "is_composition": True,
                      "model_type": "pixtral", "patch_size": 16, "rope_theta": 10000.0, "tie_word_embeddings": False},
    "vision_feature_layer": -1, "vision_feature_select_strategy": "full"}


def test_the_recipe_bases_map_exactly_onto_their_presets(tmp_path, capsys):
    from megatron_apriel.checkpoint.llava import preset_from_hf_config
    from megatron_apriel.models.hf_config import check_hf_dir

    for name, config, preset_name, build in (("nemo", NEMO_CONFIG, "mistral-nemo-12b", ModelPreset.from_hf_config),
                                             ("pixtral", PIXTRAL_CONFIG, "pixtral-12b", preset_from_hf_config)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(config))
        cfg, _ = check_hf_dir(tmp_path / name)
        assert build(cfg).function_differences(get_preset(preset_name)) == []
    err = capsys.readouterr().err  # Nemo's fields are all known; Pixtral's leftovers are listed once
    assert "nemo" not in err and err.count("ignored") == 1
    assert "text_config.is_composition, vision_config.is_composition, ignore_index" in err


def test_upscale_and_average_refuse_before_writing(hf_dir, tmp_path, capsys):
    bad = _variant(hf_dir, tmp_path / "bad", _set(sliding_window=16))
    assert up.main(["--hf", str(bad), "--out", str(tmp_path / "up"), "--duplicate-middle", "1"]) == 2
    assert "sliding_window=16" in capsys.readouterr().err and not (tmp_path / "up").exists()
    bad2 = _variant(bad, tmp_path / "bad2", lambda c: None)
    assert avg.main([str(bad), str(bad2), "--out", str(tmp_path / "avg")]) == 2
    assert "sliding_window=16" in capsys.readouterr().err and not (tmp_path / "avg").exists()
    # a truncated weights file is named by both tools too
    cut = _variant(hf_dir, tmp_path / "cut", lambda c: None)
    _truncate(cut, "model.safetensors", -8)
    assert up.main(["--hf", str(cut), "--out", str(tmp_path / "up"), "--duplicate-middle", "1"]) == 2
    assert f"{cut / 'model.safetensors'}: not a complete safetensors file" in capsys.readouterr().err
    assert avg.main([str(hf_dir), str(cut), "--out", str(tmp_path / "avg")]) == 2
    assert f"{cut / 'model.safetensors'}: not a complete safetensors file" in capsys.readouterr().err
    assert not (tmp_path / "up").exists() and not (tmp_path / "avg").exists()


def test_a_window_covering_every_position_is_no_window():
    """sliding_window >= max_position_embeddings masks nothing a valid sequence has: accepted."""
    config = get_preset("tiny").hf_config(max_position_embeddings=128, sliding_window=128)
    assert check_hf_config(config).text["max_position_embeddings"] == 128
    config.sliding_window = 127
    with pytest.raises(HFConfigError, match="sliding_window=127"):
        check_hf_config(config)


def test_every_field_of_the_supported_config_classes_is_classified():
    """A field a later transformers adds to these classes must be reviewed (mapped, refused or
    bookkeeping); until then only its default value is accepted."""
    from transformers import LlamaConfig, LlavaConfig, MistralConfig, PixtralVisionConfig

    from megatron_apriel.models import hf_config as hc

    for cls, known in ((MistralConfig, hc.TEXT_MAPPED), (LlamaConfig, hc.TEXT_MAPPED),
                       (PixtralVisionConfig, hc.VISION_MAPPED), (LlavaConfig, hc.LLAVA_MAPPED)):
        assert set(cls().to_dict()) - set(known) - hc.BOOKKEEPING == set(), cls.__name__


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


def test_llava_text_rope_scaling_matches_transformers(dist_world_of_one):
    """The Llava path maps its text_config's rope scaling the same way (images in the batch)."""
    from test_llava import SIZES, image_batch
    from transformers import LlavaForConditionalGeneration

    from megatron_apriel.checkpoint.llava import (
        V5_LAYOUT,
        hf_config,
        hf_to_mcore,
        load_canonical_into_llava,
        preset_from_hf_config,
    )
    from megatron_apriel.models.llava import LlavaModel

    scaling = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
    torch.manual_seed(0)
    hf = LlavaForConditionalGeneration(hf_config(get_preset("tiny-llava", rope_theta=10000.0, rope_scaling=scaling),
                                                 torch.float32)).eval()
    preset = preset_from_hf_config(hf.config)
    assert preset.rope_scaling == scaling
    canonical = dict(hf_to_mcore(hf.state_dict().__getitem__, preset, V5_LAYOUT))
    tokens, pixels, sizes = image_batch(preset, SIZES, seq_len=64)  # 4x the original context
    pos = torch.arange(tokens.shape[1]).unsqueeze(0).expand(tokens.shape[0], -1)
    with torch.no_grad():
        ref = hf(input_ids=tokens, pixel_values=pixels, image_sizes=sizes).logits
    for p, close in ((preset, True), (preset.replace(rope_scaling=None), False)):
        model = LlavaModel(p, p.transformer_config()).eval()
        load_canonical_into_llava([model], canonical, p)
        with torch.no_grad():
            ours = model(tokens, pos, None, pixel_values=pixels, image_sizes=sizes)[..., : p.vocab_size]
        assert (rel(ours, ref) < 1e-5) if close else (rel(ours, ref) > 1e-3)


@pytest.fixture(scope="module")
def llama3_converted(tmp_path_factory, dist_world_of_one):
    """A Llama-3-rope checkpoint with one field transformers never reads, converted to megatron-core."""
    import contextlib
    import io

    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("llama3")
    torch.manual_seed(0)
    hf = LlamaForCausalLM(_tiny_llama(**MAPPED["llama3"])).eval()
    hf.save_pretrained(root / "hf")
    cfg = json.loads((root / "hf" / "config.json").read_text())
    (root / "hf" / "config.json").write_text(json.dumps({**cfg, "my_training_note": "x"}))
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        hf_to_mcore_checkpoint(root / "hf", root / "mcore")
    return hf, root, err.getvalue()


def test_llama3_checkpoint_converts_both_ways_and_lists_ignored_fields(llama3_converted):
    """hf-to-mcore -> mcore-to-hf keeps the rope scaling: transformers' logits are identical after."""
    from transformers import AutoModelForCausalLM

    hf, root, err = llama3_converted
    assert err.count("ignored") == 1 and "my_training_note" in err, err
    mcore_to_hf_checkpoint(root / "mcore", root / "back")
    back = AutoModelForCausalLM.from_pretrained(root / "back", dtype=torch.float32).eval()
    assert back.config.rope_parameters["rope_type"] == "llama3"
    tokens = torch.randint(0, 256, (1, 80), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(back(tokens).logits, hf(tokens).logits)


def test_training_refuses_a_checkpoint_converted_as_another_model(llama3_converted, tmp_path):
    """Training from a converted checkpoint under a preset without its rope scaling is a config error."""
    from conftest import run_python
    from test_training import make_config

    from megatron_apriel.checkpoint.convert import read_model_meta

    _, root, _ = llama3_converted
    stored, _ = read_model_meta(root / "mcore")
    matching = dict(vocab_size=256, num_layers=2, ffn_hidden_size=128, rope_theta=10000.0,
                    rope_scaling=stored.rope_scaling)
    assert stored.function_differences(get_preset("tiny", **matching)) == []
    no_scaling = get_preset("tiny", **(matching | {"rope_scaling": None}))
    assert [d.split(":")[0] for d in stored.function_differences(no_scaling)] == ["rope_scaling"]
    config = make_config(tmp_path / "train.yaml", str(tmp_path / "no_corpus"), checkpoint={"load": str(root / "mcore")})
    changes = json.dumps({k: v for k, v in matching.items() if k != "rope_scaling"})
    proc = run_python(["-m", "megatron_apriel.train", "--config", config, f"model.changes={changes}"], check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    # the one difference, named with both values
    assert re.search(r"model\.changes\): rope_scaling: \{'rope_type': 'llama3'[^}]*\} vs None \(checkpoint vs config\)",
                     proc.stderr), proc.stderr[-2000:]


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
    ("shard-not-in-index", "sharded",
     lambda d: shutil.copy(d / _first_shard(d), d / "model-00099-of-00099.safetensors"),
     "model-00099-of-00099.safetensors"),
    ("config-unparsable", "single", lambda d: (d / "config.json").write_text("{"), "config.json"),
    ("config-unknown-model-type", "single", lambda d: (d / "config.json").write_text('{"model_type": "no_such_model"}'),
     "config.json"),
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
