"""HF <-> megatron-core dist checkpoint conversion against transformers and megatron-core's loader."""

import dataclasses
import json

import pytest
import torch
from conftest import REPO, make_tiny_hf, run_torchrun
from safetensors import safe_open

from megatron_apriel.checkpoint.convert import (
    ConversionError,
    hf_to_mcore_checkpoint,
    load_mcore_canonical,
    main,
    mcore_to_hf_checkpoint,
)
from megatron_apriel.checkpoint.hf_io import SafetensorsReader


def make_tokenizer(folder, vocab_size=500):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"w{i}": i for i in range(3, vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(folder)
    return fast


def hf_tensors(folder):
    with SafetensorsReader(folder) as r:
        return {k: r.get(k) for k in r.keys()}


def assert_same_tensors(a_dir, b_dir):
    a, b = hf_tensors(a_dir), hf_tensors(b_dir)
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = make_tiny_hf(tmp_path_factory.mktemp("convert") / "hf", seed=3)
    make_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def tp1(hf_dir, tmp_path_factory, dist_world_of_one):
    """HF -> mcore (TP=1) -> HF with the Apriel chat template."""
    root = tmp_path_factory.mktemp("tp1")
    summary = hf_to_mcore_checkpoint(hf_dir, root / "mcore")
    assert summary["tensors"] == 3 + 4 * 6  # embedding, final norm, output + 6 per layer
    mcore_to_hf_checkpoint(root / "mcore", root / "hf", chat_template="apriel")
    return root


def test_round_trip_tp1_is_bit_identical(hf_dir, tp1):
    assert_same_tensors(hf_dir, tp1 / "hf")
    assert json.loads((hf_dir / "config.json").read_text()) == json.loads((tp1 / "hf" / "config.json").read_text())
    assert (tp1 / "hf" / "generation_config.json").is_file()


def test_canonical_reader_matches_mapping(hf_dir, tp1):
    from megatron_apriel.checkpoint.convert import preset_from_hf_dir
    from megatron_apriel.checkpoint.mistral import hf_to_mcore
    from megatron_apriel.models.presets import padded_vocab_size

    preset = preset_from_hf_dir(hf_dir)
    expected = dict(hf_to_mcore(hf_tensors(hf_dir).__getitem__, preset))
    got = dict(load_mcore_canonical(tp1 / "mcore"))
    assert set(got) == set(expected)
    for k, v in expected.items():
        g = got[k]
        if k in ("embedding.word_embeddings.weight", "output_layer.weight"):
            assert g.shape[0] == padded_vocab_size(preset.vocab_size)
            assert not g[preset.vocab_size:].any()
            g = g[: preset.vocab_size]
        assert torch.equal(g, v), k
    only = dict(load_mcore_canonical(tp1 / "mcore", names=["decoder.layers.2.mlp.linear_fc1.weight"]))
    assert list(only) == ["decoder.layers.2.mlp.linear_fc1.weight"]


def test_export_loads_with_transformers_and_generates_the_same(hf_dir, tp1):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_apriel.data.chat_template import APRIEL_CHAT_TEMPLATE

    out = tp1 / "hf"
    ref = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ours = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template == APRIEL_CHAT_TEMPLATE
    text = tok.apply_chat_template([{"role": "user", "content": "w5 w6"}], tokenize=False, add_generation_prompt=False)
    assert "<|user|>\nw5 w6\n<|end|>" in text
    ids = tok("w5 w17 w300 w42", return_tensors="pt").input_ids
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    a = ref.generate(ids, **kw)
    b = ours.generate(ids, **kw)
    assert a.shape[1] == ids.shape[1] + 12
    assert torch.equal(a, b)


def _import_at_layout(hf_dir, tp1, tmp_path, tp: int, pp: int = 1):
    """Convert at TP x PP (tp * pp processes) and reshard the TP=1 checkpoint to it; both must give
    transformers' logits. Returns the written checkpoint."""
    from transformers import MistralForCausalLM

    ckpt = tmp_path / f"tp{tp}pp{pp}"
    run_torchrun(REPO / "tests/dist/convert_check.py", ["--hf", hf_dir, "--ckpt", ckpt, "--out", tmp_path / "r.pt",
                                                        "--tp", tp, "--pp", pp, "--load", tp1 / "mcore"], nproc=tp * pp)
    res = torch.load(tmp_path / "r.pt")
    ref = MistralForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = ref(res["tokens"]).logits
    assert len(res["logits"]) == 2
    for logits in res["logits"].values():
        assert logits.shape == expected.shape
        assert rel(logits, expected) < 1e-5
    return ckpt


def test_tp2_import_logits_and_export(hf_dir, tp1, tmp_path):
    """Written at TP=2 and loaded at TP=2 (and the TP=1 checkpoint resharded to TP=2): logits
    match transformers; the TP=2 checkpoint exported to HF is the original, bit for bit."""
    from transformers import MistralForCausalLM

    ckpt = _import_at_layout(hf_dir, tp1, tmp_path, tp=2)
    # small shards: the export is a sharded folder with an index, as for the real models
    mcore_to_hf_checkpoint(ckpt, tmp_path / "hf", max_shard_bytes=200_000)
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    assert_same_tensors(hf_dir, tmp_path / "hf")
    assert MistralForCausalLM.from_pretrained(tmp_path / "hf").config.num_hidden_layers == 4


@pytest.mark.slow
def test_tp2_pp2_import_logits_and_export(hf_dir, tp1, tmp_path):
    """TP=2 x PP=2 (4 processes, ~1.5 min on 2 cores): written at that layout and the TP=1 checkpoint
    resharded to it, both give transformers' logits; the export of the TP x PP checkpoint is the
    original, bit for bit."""
    ckpt = _import_at_layout(hf_dir, tp1, tmp_path, tp=2, pp=2)
    mcore_to_hf_checkpoint(ckpt, tmp_path / "hf")
    assert_same_tensors(hf_dir, tmp_path / "hf")


def test_pp2_import_logits(hf_dir, tmp_path):
    from transformers import MistralForCausalLM

    run_torchrun(REPO / "tests/dist/convert_check.py",
                 ["--hf", hf_dir, "--ckpt", tmp_path / "pp2", "--out", tmp_path / "r.pt", "--pp", 2])
    res = torch.load(tmp_path / "r.pt")
    ref = MistralForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = ref(res["tokens"]).logits
    (logits,) = res["logits"].values()
    assert rel(logits, expected) < 1e-5


def test_bf16_import_export(hf_dir, tmp_path, dist_world_of_one):
    hf_to_mcore_checkpoint(hf_dir, tmp_path / "m", dtype="bf16")
    mcore_to_hf_checkpoint(tmp_path / "m", tmp_path / "h")
    with safe_open(tmp_path / "h" / "model.safetensors", "pt") as f:
        t = f.get_tensor("model.layers.1.self_attn.k_proj.weight")
    orig = hf_tensors(hf_dir)["model.layers.1.self_attn.k_proj.weight"]
    assert t.dtype == torch.bfloat16 and torch.equal(t, orig.to(torch.bfloat16))
    assert json.loads((tmp_path / "h" / "config.json").read_text())["dtype"] == "bfloat16"


def test_export_writes_the_tokenizers_pad_id_into_the_config(hf_dir, tp1, tmp_path):
    """A tokenizer with a pad token gives config.json its id (what TRL writes when it saves, what
    vLLM and generate read); one without leaves the field as the source config had it."""
    from transformers import AutoTokenizer

    tok = make_tokenizer(tmp_path / "tok")
    tok.add_special_tokens({"pad_token": "<pad>"})
    tok.save_pretrained(tmp_path / "tok")
    assert tok.pad_token_id == 500
    mcore_to_hf_checkpoint(tp1 / "mcore", tmp_path / "h", tokenizer=str(tmp_path / "tok"), chat_template="apriel")
    cfg = json.loads((tmp_path / "h" / "config.json").read_text())
    assert cfg["pad_token_id"] == AutoTokenizer.from_pretrained(tmp_path / "h").pad_token_id == 500
    assert json.loads((tp1 / "hf" / "config.json").read_text()).get("pad_token_id") == \
        json.loads((hf_dir / "config.json").read_text()).get("pad_token_id")
    assert_same_tensors(tp1 / "hf", tmp_path / "h")


def test_bad_inputs_are_refused_and_nothing_is_written(hf_dir, tmp_path, dist_world_of_one, capsys):
    from safetensors.torch import save_file

    bad = tmp_path / "bad"
    bad.mkdir()
    tensors = hf_tensors(hf_dir)
    tensors["model.layers.0.mlp.extra_proj.weight"] = torch.zeros(2)
    del tensors["model.layers.3.mlp.up_proj.weight"]
    for name in ("config.json",):
        (bad / name).write_bytes((hf_dir / name).read_bytes())
    save_file(tensors, str(bad / "model.safetensors"))
    with pytest.raises(ConversionError, match=r"missing.*model\.layers\.3\.mlp\.up_proj\.weight"):
        hf_to_mcore_checkpoint(bad, tmp_path / "out")
    del tensors["model.layers.0.mlp.extra_proj.weight"]
    tensors["model.layers.3.mlp.up_proj.weight"] = hf_tensors(hf_dir)["model.layers.3.mlp.up_proj.weight"]
    tensors["model.layers.0.mlp.extra_proj.weight"] = torch.zeros(2)
    save_file(tensors, str(bad / "model.safetensors"))
    assert main(["hf-to-mcore", "--hf", str(bad), "--out", str(tmp_path / "out")]) == 2
    assert "model.layers.0.mlp.extra_proj.weight" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    assert main(["hf-to-mcore", "--hf", str(hf_dir), "--out", str(busy)]) == 2
    assert "--force" in capsys.readouterr().err
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]
    assert main(["mcore-to-hf", "--ckpt", str(hf_dir), "--out", str(tmp_path / "x")]) == 2
    assert "distributed checkpoint" in capsys.readouterr().err


def test_streamed_shards_are_the_bytes_save_file_writes(tmp_path):
    """Shards laid out up front and written tensor by tensor (or in row blocks) equal save_file's."""
    from safetensors.torch import save_file

    from megatron_apriel.checkpoint.hf_io import ShardedSafetensorsWriter

    g = torch.Generator().manual_seed(0)
    tensors = {"z.w": torch.randn(7, 5, generator=g).bfloat16(), "a.b": torch.randn(3, generator=g),
               "m": torch.tensor(3.0), "i": torch.arange(5), "h": torch.randn(4, 4, generator=g).half(),
               "e": torch.zeros(0, 3), "k": torch.randint(0, 9, (6,), dtype=torch.int8),
               "t": torch.tensor([True, False])}
    save_file(tensors, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
    for shard in (10**9, 60):
        held = ShardedSafetensorsWriter(tmp_path / f"held{shard}", max_shard_bytes=shard)
        streamed = ShardedSafetensorsWriter(tmp_path / f"streamed{shard}", max_shard_bytes=shard,
                                            layout=[(k, tuple(v.shape), v.dtype) for k, v in tensors.items()])
        for k, v in tensors.items():
            held.add(k, v)
            if v.dim() and v.shape[0] > 2:
                streamed.add_parts(k, [v[:2], v[2:]])
            else:
                streamed.add(k, v)
        held.close()
        streamed.close()
        files = sorted(p.name for p in (tmp_path / f"held{shard}").iterdir())
        assert files == sorted(p.name for p in (tmp_path / f"streamed{shard}").iterdir())
        for name in files:
            held, streamed = tmp_path / f"held{shard}" / name, tmp_path / f"streamed{shard}" / name
            assert held.read_bytes() == streamed.read_bytes()
    one_file = tmp_path / "streamed1000000000" / "model.safetensors"
    assert one_file.read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    assert len(files) == 4  # 3 shards + index at 60 bytes

    bad = ShardedSafetensorsWriter(tmp_path / "bad", layout=[("a", (2, 3), torch.float32)])
    with pytest.raises(ValueError, match="shape"):
        bad.add("a", torch.zeros(3, 2))
    with pytest.raises(ValueError, match="short"):
        bad.add_parts("a", [torch.zeros(1, 3)])
    bad.abort()
    with pytest.raises(ValueError, match="never written"):
        ShardedSafetensorsWriter(tmp_path / "bad2", layout=[("a", (2,), torch.float32)]).close()


def test_reader_reads_row_ranges(tp1):
    from megatron_apriel.checkpoint.convert import McoreCheckpointReader

    reader = McoreCheckpointReader(tp1 / "mcore")
    key = "decoder.layers.mlp.linear_fc1.weight"
    full = reader.read(key)
    assert full.shape[0] == reader.num_layers == 4 and reader.row_starts(key) == [0, 1, 2, 3]
    assert torch.equal(reader.read(key, 1, 3), full[1:3])
    assert torch.equal(reader.get("decoder.layers.2.mlp.linear_fc1.weight"), full[2])
    with pytest.raises(ConversionError, match="outside"):
        reader.read(key, 3, 9)


def test_average_writes_the_model_description_training_accepts(tp1, tmp_path, capsys):
    """Averaging dist checkpoints writes the apriel_model.yaml its inputs share (field for field), so
    training starts from it without --preset; inputs describing different models are refused."""
    import shutil

    import yaml

    from megatron_apriel.checkpoint.average import main as average
    from megatron_apriel.checkpoint.dcp_io import MODEL_META, read_model_meta, write_model_meta
    from megatron_apriel.config import ConfigError
    from megatron_apriel.training.plan import check_loaded_model

    run = tmp_path / "run"  # a training save root: the description beside the iter_* folders
    for it in ("iter_0000001", "iter_0000002"):
        shutil.copytree(tp1 / "mcore", run / it)
        (run / it / MODEL_META).unlink()
    preset, dtype = read_model_meta(tp1 / "mcore")
    write_model_meta(run, preset, torch.float32)
    assert average(["--equispaced", "2", "--run-dir", str(run), "--out", str(tmp_path / "avg")]) == 0
    written = yaml.safe_load((tmp_path / "avg" / MODEL_META).read_text())
    assert written == yaml.safe_load((run / MODEL_META).read_text())
    assert read_model_meta(tmp_path / "avg") == (preset, dtype) == (preset, "float32")
    check_loaded_model(str(tmp_path / "avg"), preset, preset.name)  # what training checks before a load
    with pytest.raises(ConfigError, match="rope_theta"):
        check_loaded_model(str(tmp_path / "avg"), dataclasses.replace(preset, rope_theta=1.0), "other")

    # an input that describes another model: refused with both files named, nothing written
    write_model_meta(run / "iter_0000002", dataclasses.replace(preset, rope_theta=1.0), torch.float32)
    capsys.readouterr()
    assert average([str(run / "iter_0000001"), str(run / "iter_0000002"), "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert "models differ" in err and "rope_theta" in err and str(run / MODEL_META) in err, err
    assert not (tmp_path / "bad").exists()
    # ... and so is an input without one beside inputs that have it
    shutil.copytree(tp1 / "mcore", tmp_path / "bare")
    (tmp_path / "bare" / MODEL_META).unlink()
    assert average([str(run / "iter_0000001"), str(tmp_path / "bare"), "--out", str(tmp_path / "bad")]) == 2
    assert f"{tmp_path / 'bare'}: no {MODEL_META}" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
