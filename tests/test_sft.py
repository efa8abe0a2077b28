"""SFT data: template round trip, exact assistant masks, indexed-dataset storage, response-only loss,
packed == separate documents, packing efficiency, decontamination."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_apriel.data.chat_template import APRIEL_CHAT_TEMPLATE, ROLE_TOKENS, render

REPO = Path(__file__).resolve().parents[1]

CONVERSATIONS = [
    [
        {"role": "system", "content": "You are a careful solver."},
        {"role": "user", "content": "What is 6 times 7?"},
        {"role": "assistant", "content": "42", "reasoning": "6 * 7 = 42, checking: 7 * 6 = 42."},
        {"role": "user", "content": "And 2 + 2?"},
        {"role": "assistant", "content": "4"},
    ],
    [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "",
         "tool_calls": [{"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "{\"temp\": 21}"},
        {"role": "assistant", "content": "It is 21 degrees.", "reasoning_content": "The tool says 21."},
    ],
    [
        {"role": "user", "content": "Say hello."},
        {"role": "assistant", "content": "Hello there, nice to meet you!"},
    ],
]
TOOLS = [{"type": "function", "function": {"name": "weather", "parameters": {"city": "string"}}}]


def _corpus():
    for conv in CONVERSATIONS:
        for m in conv:
            yield (m.get("content") or "") + " " + (m.get("reasoning") or "")
    yield "Here are my reasoning steps: [BEGIN FINAL RESPONSE] [END FINAL RESPONSE] tool_calls Available tools"


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    """A small byte-level BPE with the template's role markers as special tokens, saved as an HF dir."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=["<s>", "</s>", "<pad>", *ROLE_TOKENS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(_corpus()) * 20, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    hf.chat_template = APRIEL_CHAT_TEMPLATE
    path = tmp_path_factory.mktemp("sft_tok") / "tok"
    hf.save_pretrained(path)
    loaded = AutoTokenizer.from_pretrained(path)
    assert len(loaded) <= 500  # fits the tiny preset's vocabulary
    return path, loaded


def _tools(conv):
    return TOOLS if any(m.get("tool_calls") for m in conv) else None


def test_template_round_trip(hf_tokenizer):
    _, tok = hf_tokenizer
    for conv in CONVERSATIONS:
        r = render(tok, conv, tools=_tools(conv))
        # The tokenizer's own (saved) template, not the string we passed in.
        expected = tok.apply_chat_template(conv, tools=_tools(conv), tokenize=False)
        assert tok.decode(r.tokens) == expected == r.text
    text = tok.apply_chat_template(CONVERSATIONS[0], tokenize=False)
    assert "<|assistant|>\nHere are my reasoning steps:\n6 * 7 = 42" in text
    assert "[BEGIN FINAL RESPONSE]\n42\n[END FINAL RESPONSE]\n<|end|>\n<|user|>" in text


def test_mask_is_exactly_the_assistant_turns(hf_tokenizer):
    """Independent derivation: prompt prefix (add_generation_prompt) tokens, then up to <|end|>."""
    _, tok = hf_tokenizer
    end_id = tok.convert_tokens_to_ids("<|end|>")
    header_id = tok.convert_tokens_to_ids("<|assistant|>")
    for conv in CONVERSATIONS:
        r = render(tok, conv, tools=_tools(conv))
        expected = np.zeros(len(r.tokens), dtype=np.int64)
        for i, m in enumerate(conv):
            if m["role"] != "assistant":
                continue
            prompt = tok.apply_chat_template(conv[:i], tools=_tools(conv), tokenize=False, add_generation_prompt=True)
            prefix = tok(prompt, add_special_tokens=False)["input_ids"]
            assert r.tokens[: len(prefix)] == prefix
            end = r.tokens.index(end_id, len(prefix))
            expected[len(prefix) : end + 1] = 1
        mask = np.asarray(r.mask)
        np.testing.assert_array_equal(mask, expected)
        toks = np.asarray(r.tokens)
        assert mask[toks == header_id].sum() == 0  # role headers are prompt
        n_turns = sum(m["role"] == "assistant" for m in conv)
        assert mask[toks == end_id].sum() == n_turns  # each turn's end token is trained on
        assert 0 < mask.sum() < len(mask)


def _write_jsonl(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")


@pytest.fixture(scope="module")
def sft_prefix(hf_tokenizer, tmp_path_factory):
    from megatron_apriel.data.sft import main

    tok_path, _ = hf_tokenizer
    root = tmp_path_factory.mktemp("sft_data")
    long_conv = [{"role": "user", "content": "Repeat."}, {"role": "assistant", "content": "hello " * 400}]
    records = [{"messages": c, "tools": _tools(c), "id": i} for i, c in enumerate(CONVERSATIONS * 4)]
    records += ["{not json", {"messages": [{"role": "bot", "content": "x"}]}, {"messages": long_conv}]
    _write_jsonl(root / "chat.jsonl", records)
    prefix = root / "sft"
    rc = main(["--input", str(root / "chat.jsonl"), "--output-prefix", str(prefix), "--tokenizer-model",
               str(tok_path), "--seq-length", "256", "--skip-bad"])
    assert rc == 0
    return prefix, records


def test_preprocess_stores_tokens_and_masks(sft_prefix, hf_tokenizer):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    prefix, records = sft_prefix
    _, tok = hf_tokenizer
    report = json.loads(Path(f"{prefix}_report.json").read_text())
    assert report["read"] == len(records)
    assert report["kept"] == 12 and report["skipped_bad"] == 2 and report["dropped_overlong"] == 1
    assert ":13:" in report["skipped_records"][0] and "bot" in report["skipped_records"][1]
    toks = IndexedDataset(f"{prefix}_tokens_document")
    masks = IndexedDataset(f"{prefix}_loss_mask_document")
    assert len(toks) == len(masks) == 12
    for i in range(12):
        conv = records[i]["messages"]
        r = render(tok, conv, tools=_tools(conv))
        assert toks[i].tolist() == r.tokens
        assert masks[i].tolist() == r.mask


def test_preprocess_bad_record_fails_cleanly(hf_tokenizer, tmp_path, capsys):
    from megatron_apriel.data.sft import main

    tok_path, _ = hf_tokenizer
    _write_jsonl(tmp_path / "bad.jsonl", [{"messages": CONVERSATIONS[0]}, {"messages": [{"role": "user", "content": "x"}]}])
    rc = main(["--input", str(tmp_path / "bad.jsonl"), "--output-prefix", str(tmp_path / "out"),
               "--tokenizer-model", str(tok_path)])
    assert rc != 0
    assert "bad.jsonl:2" in capsys.readouterr().err
    assert not list(tmp_path.glob("out*"))  # nothing half-written


def test_truncate_flag(hf_tokenizer, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_apriel.data.sft import main

    tok_path, _ = hf_tokenizer
    long_conv = [{"role": "user", "content": "Repeat."}, {"role": "assistant", "content": "hello " * 400}]
    _write_jsonl(tmp_path / "c.jsonl", [{"messages": long_conv}])
    assert main(["--input", str(tmp_path / "c.jsonl"), "--output-prefix", str(tmp_path / "t"), "--tokenizer-model",
                 str(tok_path), "--seq-length", "64", "--overlong", "truncate"]) == 0
    assert json.loads((tmp_path / "t_report.json").read_text())["truncated"] == 1
    assert len(IndexedDataset(str(tmp_path / "t_tokens_document"))[0]) == 65


@pytest.fixture(scope="module")
def tiny_model(dist_world_of_one):
    from megatron_apriel.models import get_preset
    from megatron_apriel.models.builder import build_gpt_model

    torch.manual_seed(0)
    preset = get_preset("tiny")
    return build_gpt_model(preset, preset.transformer_config()).eval()


def test_loss_is_mean_ce_over_assistant_tokens(sft_prefix, tiny_model, hf_tokenizer):
    from megatron_apriel.data.sft import SFTDataset
    from megatron_apriel.training.step import gpt_forward_step

    prefix, records = sft_prefix
    _, tok = hf_tokenizer
    ds = SFTDataset(str(prefix), seq_length=256, pack=False, seed=3)
    batch = torch.utils.data.default_collate([ds[i] for i in range(4)])
    # loss_mask[i] is the mask of the label token: the assistant tokens, shifted by one.
    for row in range(4):
        doc = ds.bins[row][0]
        r = render(tok, records[doc]["messages"], tools=_tools(records[doc]["messages"]))
        n = len(r.tokens) - 1
        assert batch["loss_mask"][row, :n].tolist() == [float(m) for m in r.mask[1:]]
        assert batch["loss_mask"][row, n:].sum() == 0
    with torch.no_grad():
        output, loss_func = gpt_forward_step(iter([batch]), tiny_model)
        loss_sum, num_tokens, _ = loss_func(output)
        logits = tiny_model(batch["tokens"], batch["position_ids"], None).float()
    sel = batch["loss_mask"].bool()
    direct = torch.nn.functional.cross_entropy(logits[sel], batch["labels"][sel])
    assert int(num_tokens) == int(sel.sum())
    torch.testing.assert_close(loss_sum / num_tokens, direct, rtol=1e-5, atol=1e-6)


def test_packed_batch_equals_documents_alone(sft_prefix, tiny_model):
    from megatron_apriel.data.packing import flatten_packed_batch
    from megatron_apriel.data.sft import SFTDataset

    prefix, _ = sft_prefix
    ds = SFTDataset(str(prefix), seq_length=256, pack=True, seed=0)
    assert len(ds) < 12 and max(len(b) for b in ds.bins) >= 2
    batch = torch.utils.data.default_collate([ds[0], ds[1]])  # two rows, flattened to [1, 2*256]
    flat = flatten_packed_batch(batch)
    with torch.no_grad():
        packed_logits = tiny_model(flat["tokens"], flat["position_ids"], None,
                                   packed_seq_params=flat["packed_seq_params"]).float()
        packed_ce = torch.nn.functional.cross_entropy(packed_logits[0], flat["labels"][0], reduction="none")
    cu = flat["packed_seq_params"].cu_seqlens_q.tolist()
    assert cu[0] == 0 and cu[-1] == 512 and len(cu) >= 4
    checked = 0
    for a, b in zip(cu[:-1], cu[1:]):
        mask = flat["loss_mask"][0, a:b]
        if mask.sum() == 0:  # padding tail
            continue
        tokens = flat["tokens"][:, a:b]
        assert flat["position_ids"][0, a:b].tolist() == list(range(b - a))
        with torch.no_grad():
            alone = tiny_model(tokens, torch.arange(b - a).unsqueeze(0), None).float()
        torch.testing.assert_close(packed_logits[:, a:b], alone, rtol=1e-5, atol=1e-5)
        ce_alone = torch.nn.functional.cross_entropy(alone[0], flat["labels"][0, a:b], reduction="none")
        loss_packed = (packed_ce[a:b] * mask).sum() / mask.sum()
        loss_alone = (ce_alone * mask).sum() / mask.sum()
        torch.testing.assert_close(loss_packed, loss_alone, rtol=1e-5, atol=1e-6)
        checked += 1
    assert checked == sum(len(ds.bins[i]) for i in (0, 1))


def test_packing_plan_is_valid_and_dense():
    from megatron_apriel.data.packing import packing_efficiency, plan_bins

    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(mean=np.log(1500), sigma=0.9, size=20000).astype(int), 16, 8192)
    bins = plan_bins(lengths, 8192, seed=1)
    placed = sorted(i for b in bins for i in b)
    assert placed == list(range(len(lengths)))
    assert max(sum(int(lengths[i]) for i in b) for b in bins) <= 8192
    assert packing_efficiency(lengths, bins, 8192) >= 0.95
    assert plan_bins(lengths, 8192, seed=1) == bins  # deterministic per seed
    with pytest.raises(ValueError, match="capacity"):
        plan_bins([10, 9000], 8192)


def test_packed_seq_params_semantics():
    from megatron_apriel.data.packing import cu_seqlens_from_lengths, packed_seq_params_from_batch

    cu = torch.from_numpy(np.stack([cu_seqlens_from_lengths([3, 4], 10, 4), cu_seqlens_from_lengths([10], 10, 4)]))
    assert cu[0].tolist() == [0, 3, 7, 10, -1, -1]
    p = packed_seq_params_from_batch({"tokens": torch.zeros(2, 10, dtype=torch.long), "cu_seqlens": cu})
    assert p.qkv_format == "thd"
    assert p.cu_seqlens_q.tolist() == [0, 3, 7, 10, 20] and p.cu_seqlens_q.dtype == torch.int32
    assert p.max_seqlen_q == 10 and p.max_seqlen_kv == 10


def test_decontaminate(tmp_path):
    from megatron_apriel.config import atomic_write_text  # noqa: F401  (package importable)

    sys.path.insert(0, str(REPO))
    from data_prep.decontaminate import main

    question = ("A train leaves the station at nine and travels at sixty miles per hour toward a city "
                "two hundred miles away; when does it arrive")
    evals = tmp_path / "gsm.jsonl"
    _write_jsonl(evals, [{"question": question, "answer": "12:20"}, {"question": "too short"}])
    train = tmp_path / "train.jsonl"
    _write_jsonl(train, [
        {"id": "a", "messages": [{"role": "user", "content": "Solve: " + question.upper() + "!"},
                                 {"role": "assistant", "content": "12:20"}]},
        {"id": "b", "messages": [{"role": "user", "content": "A train leaves the station."},
                                 {"role": "assistant", "content": "ok"}]},
        {"id": "c", "text": "Unrelated text about cooking pasta with tomatoes and basil for dinner tonight friends."},
    ])
    out = tmp_path / "clean.jsonl"
    report = tmp_path / "report.json"
    assert main(["--input", str(train), "--eval", str(evals), "--output", str(out), "--report", str(report)]) == 0
    kept = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    assert kept == ["b", "c"]
    rep = json.loads(report.read_text())
    assert rep["dropped"] == 1 and rep["kept"] == 2
    assert rep["per_eval_set"]["gsm"]["dropped"] == 1 and rep["per_eval_set"]["gsm"]["ids"] == ["a"]
    assert rep["per_eval_set"]["gsm"]["eval_records_shorter_than_n"] == 1


def test_stratified_subset(hf_tokenizer, tmp_path):
    from megatron_apriel.data.sft import main

    tok_path, _ = hf_tokenizer
    records = [{"messages": CONVERSATIONS[2], "source": src, "id": i}
               for i, src in enumerate(["math"] * 8 + ["code"] * 4)]
    _write_jsonl(tmp_path / "c.jsonl", records)
    assert main(["--input", str(tmp_path / "c.jsonl"), "--output-prefix", str(tmp_path / "s"), "--tokenizer-model",
                 str(tok_path), "--subset-fraction", "0.25", "--stratify-key", "source"]) == 0
    report = json.loads((tmp_path / "s_report.json").read_text())
    assert report["kept"] == 3 and report["not_in_subset"] == 9  # 2 of 8 math + 1 of 4 code


SFT_CONFIGS = sorted(str(p.relative_to(REPO)) for p in [*REPO.glob("examples/*/sft*.yaml"), *REPO.glob("examples/*/merge_c.yaml")])


@pytest.mark.parametrize("path", SFT_CONFIGS)
def test_sft_configs_load(path):
    import inspect

    from megatron_apriel.config import load_config
    from megatron_apriel.data.sft import SFTDataset
    from megatron_apriel.models import get_preset
    from megatron_apriel.training.config import TrainConfig

    if "merge_method" in (REPO / path).read_text():
        from megatron_apriel.checkpoint.average import load_merge_yaml

        spec = load_merge_yaml(str(REPO / path))
        assert spec["weights"] == [0.5, 0.5] and len(spec["inputs"]) == 2
        return
    cfg = load_config(TrainConfig, str(REPO / path), [])
    assert cfg.data.factory == "megatron_apriel.data.sft:SFTDataset"
    accepted = set(inspect.signature(SFTDataset).parameters)
    assert set(cfg.data.factory_args) <= accepted and "prefix" in cfg.data.factory_args
    get_preset(cfg.model.preset)


def test_tiny_sft_config_trains(sft_prefix, dist_world_of_one, capsys):
    """examples/tiny/sft.yaml runs through the training loop on packed rows (THD)."""
    from megatron_apriel.config import load_config
    from megatron_apriel.training.config import TrainConfig
    from megatron_apriel.training.loop import train

    prefix, _ = sft_prefix
    # train(), not main(): main() tears down the process group the other in-process tests share.
    cfg = load_config(TrainConfig, str(REPO / "examples/tiny/sft.yaml"),
                      [f"data.factory_args.prefix={prefix}", "data.factory_args.epochs=4", "model.device=cpu",
                       "train.train_iters=2"])
    rc = train(cfg)
    assert rc == 0
    out = capsys.readouterr().out
    assert "step 2/2" in out


@pytest.mark.slow
def test_packed_sft_under_tp2_sp_and_pp2(sft_prefix, tmp_path):
    """Packed rows (THD: cu_seqlens, loss on assistant tokens) through the training loop: TP=2 with
    sequence parallelism and PP=2 give TP=1's loss and grad norm at every step, all three started from
    the same TP=1 weights. Runtime: ~2 min on 2 cores (one init run, one reference, two torchrun pairs)."""
    from conftest import run_python, run_torchrun
    from test_training import SCRIPT, metrics

    prefix, _ = sft_prefix
    common = ["--config", str(REPO / "examples/tiny/sft.yaml"), f"data.factory_args.prefix={prefix}",
              "data.factory_args.epochs=4", "model.device=cpu", "train.train_iters=3"]
    env = {"OMP_NUM_THREADS": "1"}
    init = tmp_path / "init"
    run_python(["-m", "megatron_apriel.train", *common, "train.train_iters=0", f"checkpoint.save={init}"], env=env)
    run = [*common, f"checkpoint.load={init}"]
    run_python(["-m", "megatron_apriel.train", *run, f"logging.log_dir={tmp_path / 'ref'}"], env=env)
    ref = metrics(tmp_path / "ref")
    assert sorted(ref) == [1, 2, 3] and all(r["tokens"] > 0 for r in ref.values())
    for name, layout in {"tp2_sp": ["model.tp=2", "model.sequence_parallel=true"], "pp2": ["model.pp=2"]}.items():
        run_torchrun(SCRIPT, [*run, *layout, f"logging.log_dir={tmp_path / name}"])
        got = metrics(tmp_path / name)
        assert sorted(got) == [1, 2, 3], name
        for it, r in ref.items():
            assert got[it]["tokens"] == r["tokens"], (name, it)
            assert got[it]["loss"] == pytest.approx(r["loss"], rel=1e-5), (name, it)
            assert got[it]["grad_norm"] == pytest.approx(r["grad_norm"], rel=1e-4), (name, it)
