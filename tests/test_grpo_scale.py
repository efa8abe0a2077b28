"""GRPO at the recipe's scale: the FSDP accelerate config, the per-GPU memory estimate of the 15B
config, the KL term with a reference model, online filtering (dynamic sampling), and GRPO on the math
reward raising a held-out reward, and the same with the code reward through the sandbox.

Runtime: the KL and dynamic-sampling tests share one 3-step tiny run (45 s on a loaded 2-core
machine), the math-reward run takes 11-45 s, the code-reward run ~100 s (marked slow), the rest well
under a second."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import REPO_PYTHONPATH
from test_grpo import toy_config

from megatron_apriel.config import load_config
from megatron_apriel.models.presets import get_preset
from megatron_apriel.rl.grpo import GRPORunConfig, train
from megatron_apriel.rl.memory import GiB, grpo_memory
from megatron_apriel.rl.memory import main as grpo_info

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


@pytest.mark.bwrap
def test_kl_with_reference_model(kl_dynamic_run):
    s = kl_dynamic_run
    assert s["reference_model"] and len(s["kl"]) == 3
    # The first step compares the policy with its own copy; after updates the KL term is positive.
    assert s["kl"][0] == pytest.approx(0.0, abs=1e-6)
    assert s["kl"][1] > 1e-4 and s["kl"][2] > 1e-4, s["kl"]


@pytest.mark.bwrap
def test_dynamic_sampling_drops_and_refills(kl_dynamic_run):
    t = kl_dynamic_run["dynamic_sampling"]
    # Groups of the always-solved prompt all get reward 1: they are dropped and refilled.
    assert t["groups"] >= 6 and t["dropped"] >= 1 and t["refill_rounds"] >= 1, t
    # Every group trained on has a non-zero advantage, except slots filled with dropped groups when the
    # refill rounds ran out (counted).
    assert t["trained_zero_advantage"] == t["filled_with_dropped"], t


def test_dynamic_sampling_needs_whole_groups_per_rank():
    from megatron_apriel.config import ConfigError

    with pytest.raises(ConfigError, match=r"whole groups per rank: .* \(12 x 1\) .* num_generations \(8\)"):
        load_config(GRPORunConfig, REPO / "examples/tiny/grpo.yaml", ["model.path=x", "data.train_file=x",
                    "grpo.dynamic_sampling=true", "grpo.per_device_train_batch_size=12"])


DIGITS = "0123456789"


def make_chars_model(path: Path, chars: str, seed: int = 0, fuse: bool = True):
    """A random tiny Mistral with one token per character of ``chars`` plus the special tokens, and its fast
    tokenizer (saved in ``path``; the model is saved too and returned with the tokenizer). ``fuse``: decode
    characters to the text they came from, else space-separated (WordLevel's default)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import MistralForCausalLM, PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2} | {c: i + 3 for i, c in enumerate(dict.fromkeys(chars))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    if fuse:
        tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(path)
    torch.manual_seed(seed)
    cfg = get_preset("tiny", vocab_size=len(vocab), num_layers=2).hf_config(pad_token_id=0, bos_token_id=1,
                                                                            eos_token_id=2)
    model = MistralForCausalLM(cfg)
    model.save_pretrained(path)
    return model, fast


def make_digit_model(path: Path, seed: int = 0) -> Path:
    """A random tiny Mistral over digits, '=' and space (decoded space-separated, as the math test was
    measured with)."""
    make_chars_model(path, " =" + DIGITS, seed, fuse=False)
    return path


def digit_prompts(rng, n: int, seen=frozenset()) -> list[dict]:
    """Math prompts 'xyz=' whose answer is the last digit z, graded by the math reward; z is 3 or 7, so a
    policy can gain by answering with one of them before it learns to copy."""
    out = []
    while len(out) < n:
        s = "".join(rng.choice(DIGITS) for _ in range(2)) + rng.choice("37")
        if s not in seen:
            out.append({"prompt": s + "=", "domain": "digits", "answer": s[-1]})
    return out


def sampled_reward(model_dir, records: list[dict], cfg: GRPORunConfig, k: int = 8) -> float:
    """Mean combined reward of k seeded samples per prompt, generated as in training."""
    import torch

    from megatron_apriel.rl.grpo import load_model_and_tokenizer
    from megatron_apriel.rl.rewards import combined_reward

    probe = load_config(GRPORunConfig, REPO / "examples/tiny/grpo.yaml",
                        [f"model.path={model_dir}", "data.train_file=x"])
    model, tok = load_model_and_tokenizer(probe)
    tok.padding_side = "left"
    torch.manual_seed(0)
    enc = tok([r["prompt"] for r in records], return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, do_sample=True, temperature=cfg.grpo.temperature, num_return_sequences=k,
                             max_new_tokens=cfg.grpo.max_completion_length, pad_token_id=tok.pad_token_id)
    texts = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return sum(combined_reward(t, records[i // k], cfg.rewards)[0].score for i, t in enumerate(texts)) / len(texts)


@pytest.mark.bwrap
def test_grpo_on_math_reward_raises_heldout_reward(tmp_path):
    """GRPO with the math reward alone (answer extraction + exact comparison) on a random tiny model:
    the mean reward on 64 held-out prompts rises. 15 steps of 8 prompts x 8 rollouts: 11 s
    here when the machine was quiet, up to ~45 s under load. Measured: 0.092 -> 0.680."""
    import random

    rng = random.Random(0)
    train_recs = digit_prompts(rng, 64)
    held = digit_prompts(rng, 64, seen=frozenset(r["prompt"][:-1] for r in train_recs))
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in train_recs))
    model = make_digit_model(tmp_path / "model")
    cfg = load_config(GRPORunConfig, REPO / "examples/tiny/grpo.yaml",
                      [f"out_dir={tmp_path / 'run'}", f"model.path={model}", f"data.train_file={prompts}",
                       "rewards.domains.digits.math=1.0", "grpo.max_completion_length=2", "grpo.learning_rate=5e-3",
                       "grpo.max_steps=15", "grpo.per_device_train_batch_size=64", "grpo.save_steps=1000"])
    before = sampled_reward(model, held, cfg)
    summary = train(cfg)
    after = sampled_reward(summary["final"], held, cfg)
    print(f"held-out math reward {before:.3f} -> {after:.3f}")
    assert after > before + 0.3, (before, after, summary["rewards"])


FENCE = "```"
CODE_CHARS = DIGITS + " \n`#+-*=:()fdexrtunpyho"


def fn_program(op: str, k: str) -> str:
    return f"{FENCE}python\ndef f(x):\n return x{op}{k}\n{FENCE}"


def fn_prompts(rng, n: int, seen=frozenset()) -> list[dict]:
    """Tasks "write f(x) = x op k" ('#42 x*7:', 42 a task number) graded by one assert in the sandbox; k is 3
    or 7, so a policy gains by writing either before it learns to copy the right one."""
    out, seen = [], set(seen)
    while len(out) < n:
        op, k = rng.choice("+-*"), rng.choice("37")
        prompt = f"#{rng.randrange(100):02d} x{op}{k}:"
        if prompt not in seen:
            seen.add(prompt)
            out.append({"prompt": prompt, "domain": "fn", "tests": [{"assert": f"assert f(5)=={eval(f'5{op}{k}')}"}]})
    return out


def sft_code_format(model, tok, rng, steps: int = 300, right: float = 0.3):
    """Teach a random model the answer's shape: a ```python block defining f with the prompt's operation, the
    prompt's constant in 30% of the examples and a random digit otherwise: the format is learnt, the task
    only partly, which leaves GRPO successes and failures in the same group to learn from."""
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        texts = []
        for _ in range(32):
            op, tag, k = rng.choice("+-*"), f"{rng.randrange(100):02d}", rng.choice(DIGITS)
            shown = k if rng.random() < right else rng.choice(DIGITS)
            texts.append(f"#{tag} x{op}{k}:" + fn_program(op, shown) + "</s>")
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        labels[:, :8] = -100  # the prompt (8 characters) is context, not a target
        model(**enc, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    return model


@pytest.mark.slow
@pytest.mark.bwrap
def test_grpo_on_code_reward_raises_heldout_reward(tmp_path):
    """GRPO with the code reward alone, each completion's program run in the bubblewrap sandbox against an
    assert: a tiny model SFT'd on the answer format (300 steps) then 40 GRPO steps of 8 prompts
    x 8 rollouts at lr 1e-3 raise the mean reward on 32 held-out tasks. ~150 s on the 2-core machine
    at moderate load. Measured: 0.074 -> 0.324. (With the current transformers/TRL releases the SFT'd
    model starts lower than it did, 0.074 against 0.156, and 20 steps at 3e-4 reached only 0.121, the
    same with the one-process grader as with the two-process one: the sandbox's rewards are equal on
    the same completions.)"""
    import random

    rng = random.Random(0)
    model, tok = make_chars_model(tmp_path / "model", CODE_CHARS)
    sft_code_format(model, tok, rng).save_pretrained(tmp_path / "model")
    train_recs = fn_prompts(rng, 64)
    held = fn_prompts(rng, 32, seen=frozenset(r["prompt"] for r in train_recs))
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in train_recs))
    cfg = load_config(GRPORunConfig, REPO / "examples/tiny/grpo.yaml",
                      [f"out_dir={tmp_path / 'run'}", f"model.path={tmp_path / 'model'}", f"data.train_file={prompts}",
                       "rewards.domains.fn.code=1.0", "grpo.max_completion_length=40", "grpo.learning_rate=1e-3",
                       "grpo.max_steps=40", "grpo.per_device_train_batch_size=64", "grpo.save_steps=1000"])
    before = sampled_reward(tmp_path / "model", held, cfg)
    summary = train(cfg)
    after = sampled_reward(summary["final"], held, cfg)
    print(f"held-out code reward {before:.3f} -> {after:.3f}")
    assert 0.02 < before < 0.35, before  # the SFT'd model writes f, sometimes right: GRPO has a signal
    assert after > before + 0.15, (before, after, summary["rewards"])


def test_fsdp2_two_gloo_processes_match_one_process(tmp_path):
    """accelerate (1.15) picks FSDP only for accelerator devices; on CPU it falls back to DDP
    (MULTI_CPU), so the shipped config cannot be run here. The nearest real check: torch's FSDP2
    ``fully_shard``, wrapped as the config does (each MistralDecoderLayer, then the root), on two gloo
    processes, 3 AdamW steps of the GRPO objective at ratio 1 (-advantage x token log-prob) with half
    of a fixed batch per rank, against one process on the whole batch: parameters equal within 5e-5
    (measured 8.5e-6; Adam's normalisation amplifies reduction-order differences of tiny gradients).
    ~30 s (two interpreters starting)."""
    import os
    import subprocess
    import sys

    import torch
    from fsdp_grpo_check import train_steps

    out = tmp_path / "fsdp.pt"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--standalone", str(REPO / "tests" / "fsdp_grpo_check.py"), str(out)],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": REPO_PYTHONPATH})  # this checkout, installed or not
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "rank 0: DTensor shard torch.Size([8, 64]) of torch.Size([16, 64])" in proc.stdout, proc.stdout
    sharded, single, start = torch.load(out), train_steps(None), train_steps(None, steps=0)
    assert sharded.keys() == single.keys()
    assert sum(not torch.equal(single[k], start[k]) for k in single) > len(single) // 2  # the steps moved it
    for k in single:
        torch.testing.assert_close(sharded[k], single[k], rtol=0, atol=5e-5, msg=k)
    print("max |FSDP - single|:", max((sharded[k] - single[k]).abs().max().item() for k in single))


@pytest.mark.bwrap(False)
def test_without_a_sandbox_grpo_info_works_and_grpo_stops_first(monkeypatch, tmp_path, capsys):
    """On a machine where bwrap cannot run (a login node; here: PATH without it), the memory estimate
    of a config with a code reward still prints, and the run stops before it reads anything, naming
    the sandbox and the weaker mode's key."""
    from megatron_apriel.rl.grpo import main as grpo_main
    from megatron_apriel.rl.rewards import sandbox

    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    monkeypatch.setattr(sandbox, "_CHECKED", {})
    assert grpo_info(["--config", str(RECIPE)]) == 0
    assert "FSDP over 16 GPUs" in capsys.readouterr().out
    out = tmp_path / "run"
    tiny = REPO / "examples/tiny/grpo.yaml"
    assert grpo_main(["--config", str(tiny), f"out_dir={out}", "model.path=/nonexistent",
                      "data.train_file=/nonexistent.jsonl"]) == 2
    err = capsys.readouterr().err
    # the sandbox is named, not the prompt file or the model: nothing was read before the check
    assert "rewards.sandbox.isolation" in err and "bubblewrap" in err and "rlimits-only" in err, err
    assert "prompt file" not in err and not out.exists()
