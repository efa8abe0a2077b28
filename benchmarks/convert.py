"""Time and peak memory of HF <-> megatron-core conversion on a random >= 1B-parameter model.

The model has Mistral-Nemo's width (hidden 5120, 32/8 heads of 128, FFN 14336) with few layers, in
bf16. Each direction runs in its own process; its peak memory is read from that process's
``/proc/self/status``: VmHWM (peak resident set, including resident pages of memory-mapped
safetensors files, which the kernel may drop at will) and the peak of RssAnon sampled every 20 ms
(memory the process owns). ``ru_maxrss`` is not used: across ``exec`` it keeps the parent's peak.

    python benchmarks/convert.py --layers 2 --vocab 65536 --work /tmp/convert_bench
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def write_random_hf(folder: Path, preset, shard_bytes: int) -> int:
    """A random bf16 MistralForCausalLM folder written tensor by tensor (no model in memory)."""
    import torch

    from megatron_apriel.checkpoint.hf_io import ShardedSafetensorsWriter
    from megatron_apriel.checkpoint.mistral import hf_names

    h, d, f = preset.hidden_size, preset.kv_channels, preset.ffn_hidden_size
    q, kv = preset.num_attention_heads * d, preset.num_query_groups * d
    shapes = {"embed_tokens": (preset.vocab_size, h), "lm_head": (preset.vocab_size, h), "norm": (h,),
              "q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
              "gate_proj": (f, h), "up_proj": (f, h), "down_proj": (h, f), "layernorm": (h,)}
    gen = torch.Generator().manual_seed(0)
    writer = ShardedSafetensorsWriter(folder, max_shard_bytes=shard_bytes)
    for name in hf_names(preset):
        part = name.split(".")[-2]
        shape = shapes["layernorm" if part.endswith("layernorm") else part]
        writer.add(name, (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16))
    writer.close()
    preset.hf_config(dtype="bfloat16").save_pretrained(folder)
    return writer.total_bytes


CHILD = r"""
import json, sys, threading, time
peak = {"anon": 0}
def sample():
    while True:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    peak["anon"] = max(peak["anon"], int(line.split()[1]) * 1024)
        time.sleep(0.02)
if __name__ == "__main__":
    threading.Thread(target=sample, daemon=True).start()
    t = time.time()
    from megatron_apriel.checkpoint.convert import main
    rc = main(sys.argv[1:])
    with open("/proc/self/status") as f:
        hwm = next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))
    print("BENCH " + json.dumps([time.time() - t, hwm, peak["anon"]]))
    sys.exit(rc)
"""


def run_step(args: list[str], work: Path) -> tuple[float, float, float]:
    """Run one conversion in a child process; (seconds, peak RSS GiB, peak anonymous RSS GiB) of that child."""
    script = work / "bench_child.py"  # a file, not -c: dist_checkpointing's writer re-imports __main__
    script.write_text(CHILD)
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore", "TQDM_DISABLE": "1"}
    proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"conversion failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH ")][-1]
    secs, hwm, anon = json.loads(line[6:])
    return secs, hwm / 2**30, anon / 2**30


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=65536)
    ap.add_argument("--work", default="/tmp/convert_bench")
    ap.add_argument("--shard-gb", type=float, default=1.0)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()

    from megatron_apriel.models import get_preset

    preset = get_preset("mistral-nemo-12b", num_layers=args.layers, vocab_size=args.vocab)
    params = preset.param_counts()["total"]
    if params < 1e9:
        raise SystemExit(f"{params / 1e9:.2f} B parameters: use more --layers or a larger --vocab (>= 1B)")
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    shard = int(args.shard_gb * 1e9)
    t = time.time()
    model_bytes = write_random_hf(work / "hf", preset, shard)
    print(f"random model: {params / 1e9:.2f} B parameters, {model_bytes / 2**30:.2f} GiB bf16 "
          f"({time.time() - t:.0f} s to write)", flush=True)

    rows = []
    rows.append(("hf-to-mcore (TP=1)", *run_step(["hf-to-mcore", "--hf", str(work / "hf"), "--out", str(work / "mcore")], work)))
    rows.append(("mcore-to-hf", *run_step(["mcore-to-hf", "--ckpt", str(work / "mcore"), "--out", str(work / "back"),
                                           "--max-shard-size", f"{args.shard_gb}GB"], work)))

    # the round trip must be exact, or the timings mean nothing
    import torch

    from megatron_apriel.checkpoint.hf_io import SafetensorsReader

    with SafetensorsReader(work / "hf") as a, SafetensorsReader(work / "back") as b:
        assert set(a.keys()) == set(b.keys())
        bad = [k for k in a.keys() if not torch.equal(a.get(k), b.get(k))]
    if bad:
        raise SystemExit(f"round trip differs on {bad[:5]}")

    gib = model_bytes / 2**30
    print(f"\n| step | seconds | GiB/s | peak RSS (VmHWM) GiB | VmHWM / model size | peak anonymous RSS GiB |")
    print("|---|---|---|---|---|---|")
    for name, secs, rss, anon in rows:
        print(f"| {name} | {secs:.1f} | {gib / secs:.2f} | {rss:.2f} | {rss / gib:.2f} | {anon:.2f} |")
    print(f"\nmodel {gib:.2f} GiB ({params / 1e9:.2f} B params, bf16), shard {args.shard_gb} GB; round trip bit-identical")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
