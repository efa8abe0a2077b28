"""Multimodal Apriel-1.5 (Pixtral/LLaVA): parity with transformers, conversion, frozen realignment."""

import json
from pathlib import Path

import pytest
import torch

from megatron_apriel.models.presets import get_preset

PRESET = "tiny-llava"


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def make_tiny_llava_hf(path: Path, seed: int = 0, preset_name: str = PRESET) -> Path:
    """A random tiny LlavaForConditionalGeneration (Pixtral vision) saved in the hub layout.

    Norm weights and projector biases are drawn at random too, so a norm or bias mapped to the
    wrong place changes the logits.
    """
    from transformers import LlavaForConditionalGeneration

    from megatron_apriel.checkpoint.llava import hf_config

    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(hf_config(get_preset(preset_name), torch.float32)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "ln_pre" in name or name.endswith(".bias"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p) if name.endswith("weight") else 0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    return path


def image_batch(preset, sizes_per_sample, seq_len: int, seed: int = 0):
    """tokens [b, s] with PixtralProcessor's placeholder layout, and padded pixel_values / image_sizes."""
    v = preset.vision
    g = torch.Generator().manual_seed(seed)
    rows, sizes = [], []
    for sample in sizes_per_sample:
        toks = [1]
        for h, w in sample:
            sizes.append((h, w))
            for r in range(h // v.patch_size):
                toks += [v.image_token_id] * (w // v.patch_size)
                toks.append(v.image_end_token_id if r == h // v.patch_size - 1 else v.image_break_token_id)
            toks += torch.randint(20, preset.vocab_size, (3,), generator=g).tolist()
        toks += torch.randint(20, preset.vocab_size, (seq_len - len(toks),), generator=g).tolist()
        rows.append(toks)
    hmax, wmax = max(h for h, _ in sizes), max(w for _, w in sizes)
    pixels = torch.zeros(len(sizes), 3, hmax, wmax)
    for i, (h, w) in enumerate(sizes):
        pixels[i, :, :h, :w] = torch.randn(3, h, w, generator=g)
    return torch.tensor(rows), pixels, torch.tensor(sizes, dtype=torch.int64)


@pytest.fixture(scope="module")
def tiny_llava_dir(tmp_path_factory):
    return make_tiny_llava_hf(tmp_path_factory.mktemp("llava") / "hf")


@pytest.fixture(scope="module")
def hf_and_ours(tiny_llava_dir, dist_world_of_one):
    from transformers import LlavaForConditionalGeneration

    from megatron_apriel.checkpoint.llava import (
        V5_LAYOUT,
        hf_to_mcore,
        load_canonical_into_llava,
        preset_from_hf_config,
    )
    from megatron_apriel.models.llava import LlavaModel

    hf = LlavaForConditionalGeneration.from_pretrained(tiny_llava_dir, dtype=torch.float32).eval()
    preset = preset_from_hf_config(hf.config)
    assert preset.vision == get_preset(PRESET).vision
    model = LlavaModel(preset, preset.transformer_config()).eval()
    load_canonical_into_llava([model], dict(hf_to_mcore(hf.state_dict().__getitem__, preset, V5_LAYOUT)), preset)
    return hf, model, preset


# Two samples, three images of two different sizes (2x3 and 4x2 patches); the first sample holds two.
SIZES = [[(8, 12), (16, 8)], [(16, 8)]]


def test_logits_match_transformers(hf_and_ours):
    hf, model, preset = hf_and_ours
    tokens, pixels, sizes = image_batch(preset, SIZES, seq_len=40)
    pos = torch.arange(tokens.shape[1]).unsqueeze(0).expand(tokens.shape[0], -1)
    with torch.no_grad():
        ref = hf(input_ids=tokens, pixel_values=pixels, image_sizes=sizes).logits
        ours = model(tokens, pos, None, pixel_values=pixels, image_sizes=sizes)
        text_only = model(tokens.clamp(min=20), pos, None)
    ours = ours[..., : preset.vocab_size] if ours.shape[-1] != ref.shape[-1] else ours
    assert ours.shape == ref.shape
    assert rel(ours, ref) < 1e-5
    # The images matter: the same tokens without them are far off (guards against a no-op merge).
    assert rel(text_only[..., : preset.vocab_size], ref) > 1e-2


def test_single_image_and_block_mask(hf_and_ours):
    """Each image attends only to itself: an image's features do not depend on its neighbours."""
    _, model, preset = hf_and_ours
    _, pixels, sizes = image_batch(preset, SIZES, seq_len=40)
    with torch.no_grad():
        both = model.vision_model(pixels, sizes)
        first = model.vision_model(pixels[:1, :, :8, :12], sizes[:1])
    assert torch.allclose(both[: first.shape[0]], first, rtol=1e-5, atol=1e-6)


def test_patch_count_mismatch_is_an_error(hf_and_ours):
    _, model, preset = hf_and_ours
    tokens, pixels, sizes = image_batch(preset, SIZES, seq_len=40)
    pos = torch.arange(tokens.shape[1]).unsqueeze(0).expand(tokens.shape[0], -1)
    with pytest.raises(ValueError, match="image tokens"):
        model(tokens, pos, None, pixel_values=pixels[:2], image_sizes=sizes[:2])


def hf_tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module")
def converted(tiny_llava_dir, tmp_path_factory, dist_world_of_one):
    """HF -> mcore (TP=1) -> HF through the `apriel convert` entry points."""
    from megatron_apriel.checkpoint.convert import main

    root = tmp_path_factory.mktemp("llava_convert")
    assert main(["hf-to-mcore", "--hf", str(tiny_llava_dir), "--out", str(root / "mcore")]) == 0
    assert main(["mcore-to-hf", "--ckpt", str(root / "mcore"), "--out", str(root / "hf"),
                 "--chat-template", "apriel"]) == 0
    return root


def test_round_trip_is_bit_identical(tiny_llava_dir, converted):
    from transformers import AutoConfig, LlavaForConditionalGeneration

    a, b = hf_tensors(tiny_llava_dir), hf_tensors(converted / "hf")
    assert set(a) == set(b) and any(k.startswith("vision_tower.transformer.") for k in a)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    src, out = AutoConfig.from_pretrained(tiny_llava_dir), AutoConfig.from_pretrained(converted / "hf")
    assert out.vision_config.to_dict() == src.vision_config.to_dict()
    assert out.text_config.num_hidden_layers == src.text_config.num_hidden_layers
    LlavaForConditionalGeneration.from_pretrained(converted / "hf")  # loads with no missing/unexpected keys
    from megatron_apriel.data.chat_template import APRIEL_CHAT_TEMPLATE

    assert (converted / "hf" / "chat_template.jinja").read_text(encoding="utf-8") == APRIEL_CHAT_TEMPLATE


def test_checkpoint_keys_and_reader(tiny_llava_dir, converted):
    """Decoder keys are a text GPTModel's (text tools read them); vision keys are prefixed."""
    from megatron_apriel.checkpoint.convert import McoreCheckpointReader
    from megatron_apriel.checkpoint.llava import HUB_LAYOUT, hf_to_mcore

    reader = McoreCheckpointReader(converted / "mcore")
    assert reader.num_layers == get_preset(PRESET).num_layers
    assert "vision_model.transformer.layers.self_attention.linear_qkv.weight" in reader.meta
    assert not any(k.startswith("language_model.") for k in reader.meta)
    preset = get_preset(PRESET)
    expected = dict(hf_to_mcore(hf_tensors(tiny_llava_dir).__getitem__, preset, HUB_LAYOUT))
    for name in ("decoder.layers.1.self_attention.linear_qkv.weight", "vision_model.patch_conv.weight",
                 "vision_projection.encoder.linear_fc1.bias"):
        assert torch.equal(reader.get(name)[: expected[name].shape[0]], expected[name]), name


def test_bad_llava_inputs(tiny_llava_dir, tmp_path, dist_world_of_one, capsys):
    """An unknown tensor or an unsupported feature layer is refused with the file named; nothing written."""
    import shutil

    from safetensors.torch import save_file

    from megatron_apriel.checkpoint.convert import main

    bad = tmp_path / "extra"
    shutil.copytree(tiny_llava_dir, bad)
    tensors = hf_tensors(bad)
    tensors["vision_tower.transformer.layers.0.attention.extra.weight"] = torch.zeros(2)
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    assert main(["hf-to-mcore", "--hf", str(bad), "--out", str(tmp_path / "o1")]) == 2
    assert "attention.extra.weight" in capsys.readouterr().err
    assert not (tmp_path / "o1").exists()

    cfg_dir = tmp_path / "layer"
    shutil.copytree(tiny_llava_dir, cfg_dir)
    cfg = json.loads((cfg_dir / "config.json").read_text())
    cfg["vision_feature_layer"] = -2
    (cfg_dir / "config.json").write_text(json.dumps(cfg))
    assert main(["hf-to-mcore", "--hf", str(cfg_dir), "--out", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert "config.json" in err and "vision_feature_layer" in err
    assert not (tmp_path / "o2").exists()


REALIGN = """
model: {{preset: tiny-llava, device: cpu}}
data:
  kind: dataset
  factory: synthetic-image-text
  factory_args: {{num_samples: 64, seed: 0, images_per_sample: 2, loss_on_text: false}}
train:
  seq_length: 40
  micro_batch_size: 2
  global_batch_size: 4
  train_iters: 4
  seed: 1
  freeze: [{freeze}]
  optim: {{lr: 1.0e-2, min_lr: 1.0e-3, weight_decay: 0.0, clip_grad: 1.0, use_distributed_optimizer: true}}
  schedule: {{warmup_iters: 0, decay_style: constant}}
checkpoint: {{load: {load}, load_mode: weights, save: {save}, save_interval: 4}}
logging: {{log_interval: 1}}
"""


def stored(path) -> dict:
    from megatron_apriel.checkpoint.convert import McoreCheckpointReader

    reader = McoreCheckpointReader(path)
    return {k: reader.read(k) for k in reader.meta}


def test_realignment_trains_only_the_projector(converted, tmp_path):
    """Realignment through the real training loop: encoder and decoder bit-identical, projector changed."""
    from conftest import run_python

    cfg = tmp_path / "realign.yaml"
    cfg.write_text(REALIGN.format(freeze="vision_encoder, embeddings, decoder, output_layer",
                                  load=converted / "mcore", save=tmp_path / "run"))
    proc = run_python(["-m", "megatron_apriel.train", "--config", cfg], env={"OMP_NUM_THREADS": "1"})
    assert "step 4/4" in proc.stdout
    lines = (tmp_path / "run" / "logs" / "metrics.jsonl").read_text().splitlines()
    losses = [json.loads(line)["loss"] for line in lines if "loss" in json.loads(line)]
    assert len(losses) == 4 and all(x == x for x in losses)  # no NaN
    before, after = stored(converted / "mcore"), stored(tmp_path / "run")
    proj = [k for k in before if k.startswith("vision_projection.")]
    frozen = [k for k in before if k not in proj]
    assert len(proj) == 4 and any(k.startswith("vision_model.transformer.") for k in frozen)
    assert any(k.startswith("decoder.layers.") for k in frozen) and "output_layer.weight" in frozen
    for k in frozen:
        assert torch.equal(before[k], after[k]), f"{k} changed although frozen"
    for k in proj:
        assert not torch.equal(before[k], after[k]), f"{k} did not train"


def test_upscaled_llava_loads_in_transformers_and_ours(tiny_llava_dir, tmp_path, dist_world_of_one):
    """The 40 -> 48 plan scaled down (4 -> 5, middle layer duplicated) through `apriel upscale`."""
    from megatron.core import dist_checkpointing
    from transformers import LlavaForConditionalGeneration

    from megatron_apriel.checkpoint import upscale
    from megatron_apriel.checkpoint.convert import main as convert
    from megatron_apriel.models.llava import LlavaModel

    out = tmp_path / "up"
    assert upscale.main(["--hf", str(tiny_llava_dir), "--out", str(out), "--duplicate-middle", "1",
                         "--init", "copy"]) == 0
    hf = LlavaForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    assert hf.config.text_config.num_hidden_layers == 5
    assert convert(["hf-to-mcore", "--hf", str(out), "--out", str(tmp_path / "mcore")]) == 0
    preset = get_preset("tiny-llava-upscaled")
    model = LlavaModel(preset, preset.transformer_config()).eval()
    for p in model.parameters():  # a tensor the load misses cannot pass by accident
        p.data.fill_(float("nan"))
    state = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(tmp_path / "mcore"))
    model.load_state_dict(state["model"])
    tokens, pixels, sizes = image_batch(preset, SIZES, seq_len=40, seed=1)
    pos = torch.arange(tokens.shape[1]).unsqueeze(0).expand(tokens.shape[0], -1)
    with torch.no_grad():
        ref = hf(input_ids=tokens, pixel_values=pixels, image_sizes=sizes).logits
        ours = model(tokens, pos, None, pixel_values=pixels, image_sizes=sizes)
    assert rel(ours, ref) < 1e-5


def test_example_configs_load():
    from megatron_apriel.config import load_config
    from megatron_apriel.training.config import TrainConfig

    root = Path(__file__).resolve().parents[1] / "examples" / "apriel_1p5_15b"
    freezes = {}
    for name in ("realign", "cpt_stage1", "cpt_stage2"):
        cfg = load_config(TrainConfig, str(root / f"{name}.yaml"), [])
        assert get_preset(cfg.model.preset).vision is not None
        freezes[name] = set(cfg.train.freeze)
    assert freezes == {"realign": {"vision_encoder", "embeddings", "decoder", "output_layer"},
                       "cpt_stage1": set(), "cpt_stage2": {"vision_encoder"}}


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2), pytest.param(2, 2, marks=pytest.mark.slow)])
def test_tp_pp_conversion_and_logits(hf_and_ours, tiny_llava_dir, tmp_path, tp, pp):
    """hf-to-mcore under torchrun at TP=2 / PP=2 / TP=2 x PP=2 (4 processes, ~1.5 min on 2 cores): the
    sharded model gives HF's logits on images, its gathered weights are exactly the table's, and the
    TP x PP checkpoint exported back to HF is the original, bit for bit."""
    from conftest import REPO, run_torchrun

    hf, _, preset = hf_and_ours
    run_torchrun(REPO / "tests/dist/llava_check.py", ["--hf", tiny_llava_dir, "--ckpt", tmp_path / "ckpt",
                                                      "--out", tmp_path / "out.pt", "--tp", tp, "--pp", pp],
                 nproc=tp * pp)
    if tp * pp == 4:
        from megatron_apriel.checkpoint.convert import mcore_to_hf_checkpoint

        mcore_to_hf_checkpoint(tmp_path / "ckpt", tmp_path / "hf")
        a, b = hf_tensors(tiny_llava_dir), hf_tensors(tmp_path / "hf")
        assert set(a) == set(b) and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    got = torch.load(tmp_path / "out.pt")
    assert got["mismatched"] == [] and got["compared"] > 40
    tokens, pixels, sizes = image_batch(preset, SIZES, seq_len=40)
    with torch.no_grad():
        ref = hf(input_ids=tokens, pixel_values=pixels, image_sizes=sizes).logits
    assert rel(got["logits"], ref) < 1e-5
