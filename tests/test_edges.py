"""Every verb at its edges: hostile flags, output paths, encodings, truncated files, interrupts and
full or read-only disks. Each case asserts the exit code, one stderr line with ``error:`` that names
the flag, file or path, and what is (not) left at the output location.

The table runs each verb's ``main`` in this process (``apriel VERB ...`` through megatron_apriel.cli).
Signals and disks need processes of their own: tests/edge_driver.py runs many verbs in one process
(so the imports are paid once), sending itself SIGINT/SIGTERM while a verb's output is half-written,
or under bubblewrap with a tiny tmpfs (disk full) and a read-only bind mount.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import zstandard
from conftest import REPO, REPO_PYTHONPATH, make_tiny_hf

from megatron_apriel.cli import main as apriel

TEXTS = [f"Record {i}: the quick brown fox {i} jumps over {3 * i} lazy dogs." for i in range(40)]
CHATS = [[{"role": "user", "content": f"What is {i} + {i}?"}, {"role": "assistant", "content": f"{2 * i}"}]
         for i in range(6)]


def _jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _with_bad_byte(path: Path, good: list[dict], at: int) -> Path:
    """``good`` as JSONL with line ``at`` (1-based) replaced by a record holding a byte that is not UTF-8."""
    lines = [json.dumps(r).encode() for r in good]
    lines[at - 1] = lines[at - 1][:-2] + b"\xff\xfe" + lines[at - 1][-2:]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny model with its tokenizer, inputs of every kind (good, non-UTF-8, truncated), a
    preprocessed dataset and a truncated copy, a blend spec of each, a dist checkpoint, a model whose
    weights disagree with its config, and a math task file."""
    from PIL import Image

    from megatron_apriel.checkpoint.convert import hf_to_mcore_checkpoint
    from megatron_apriel.data import preprocess as pp
    from megatron_apriel.demo.data import train_tokenizer

    r = tmp_path_factory.mktemp("edges")
    corpus = _jsonl(r / "corpus.jsonl", [{"text": t} for t in TEXTS] +
                    [{"text": f"{m['content']}"} for c in CHATS for m in c])
    info = train_tokenizer([corpus], r / "model", vocab_size=300)
    make_tiny_hf(r / "model", vocab_size=info["vocab_size"])
    _jsonl(r / "text.jsonl", [{"text": t} for t in TEXTS])
    _with_bad_byte(r / "text_bad.jsonl", [{"text": t} for t in TEXTS[:5]], at=3)
    raw = (r / "text.jsonl").read_bytes() * 20
    (r / "text.jsonl.gz").write_bytes(gzip.compress(raw)[:-200])  # a partial download
    (r / "text.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(raw)[:-200])
    _jsonl(r / "chat.jsonl", [{"messages": c} for c in CHATS])
    _with_bad_byte(r / "chat_bad.jsonl", [{"messages": c} for c in CHATS], at=2)
    Image.new("RGB", (40, 30), "red").save(r / "red.png")
    mm = [{"images": ["red.png"], "prompt": "<image> What colour?", "response": f"Red {i}."} for i in range(4)]
    _jsonl(r / "mm.jsonl", mm)
    _with_bad_byte(r / "mm_bad.jsonl", mm, at=2)
    # a dataset, and the same dataset with its .bin cut short (an .idx copied whole, a .bin not)
    tok = ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(r / "model")]
    assert pp.main(["--input", str(r / "text.jsonl"), "--output-prefix", str(r / "data" / "d"), *tok,
                    "--workers", "0", "--quiet"]) == 0
    (r / "trunc").mkdir()
    shutil.copy(r / "data" / "d_text_document.idx", r / "trunc" / "d_text_document.idx")
    data = (r / "data" / "d_text_document.bin").read_bytes()
    (r / "trunc" / "d_text_document.bin").write_bytes(data[: len(data) // 2])
    for name, folder in (("blend.yaml", "data"), ("blend_trunc.yaml", "trunc")):
        source = {"name": "web", "prefixes": [str(r / folder / "d_text_document")]}
        (r / name).write_text(json.dumps({"sources": [source], "seq_length": 16, "steps": 4}))
    hf_to_mcore_checkpoint(r / "model", r / "mcore")
    # weights that disagree with config.json: the config says a wider MLP than the tensors have
    shutil.copytree(r / "model", r / "bad_shapes")
    cfg = json.loads((r / "bad_shapes" / "config.json").read_text())
    cfg["intermediate_size"] += 8
    (r / "bad_shapes" / "config.json").write_text(json.dumps(cfg))
    _jsonl(r / "math.jsonl", [{"question": "What is 2 + 2?", "answer": "4"}, {"question": "1 + 1?", "answer": "2"}])
    _with_bad_byte(r / "math_bad.jsonl", [{"question": "What is 2 + 2?", "answer": "4"}], at=1)
    return r


def _format(item, w: Path, o: Path):
    return item.format(W=w, O=o, M=w / "model")


TOK = "--tokenizer-type HuggingFaceTokenizer --tokenizer-model {M}"
PP = "preprocess --input {W}/text.jsonl --output-prefix {O}/out/p --workers 0 --quiet " + TOK
SFT = "preprocess-sft --input {W}/chat.jsonl --output-prefix {O}/out/s --tokenizer-model {M} --chat-template apriel"
MM = ("preprocess-multimodal --input {W}/mm.jsonl --output-prefix {O}/out/m --image-size 32 --patch-size 16 " + TOK)
H2M = "convert hf-to-mcore --hf {M}"
M2H = "convert mcore-to-hf --ckpt {W}/mcore"
UP = "upscale --hf {M} --duplicate-middle 2"
AVG = "average {M} {M}"
MIX = "mix-report {W}/blend.yaml"
EVAL = "eval --hf {M} --tasks math={W}/math.jsonl --max-gen-toks 4"
MS = "merge-search --config {O}/merge.yaml --tasks math={W}/math.jsonl"
GEN = "generate --hf {M} --prompt hi"

# (id, command line, exit code, words the one stderr line must hold besides "error:")
# {W}: the shared fixtures, {M}: the tiny model (and its tokenizer), {O}: this case's own folder,
# which holds a regular file "file", an empty folder "dir" and a non-empty folder "full"; after the
# case it must hold nothing more (nothing half-written, no temporary files).
CASES = [
    # ---- preprocess: numbers, output prefix, inputs, tokenizers
    ("pp-block-bytes-0", PP + " --block-bytes 0", 2, ["--block-bytes"]),
    ("pp-log-interval-0", PP + " --log-interval 0", 2, ["--log-interval"]),
    ("pp-workers-negative", PP + " --workers -1", 2, ["--workers"]),
    ("pp-log-seconds-negative", PP + " --log-seconds -1", 2, ["--log-seconds"]),
    ("pp-slow-doc-seconds-negative", PP + " --slow-doc-seconds -1", 2, ["--slow-doc-seconds"]),
    ("pp-prefix-under-file", PP.replace("{O}/out/p", "{O}/file/p"), 2, ["{O}/file", "is a file"]),
    ("pp-prefix-is-dir", PP.replace("{O}/out/p", "{O}/dir"), 2, ["--output-prefix", "folder"]),
    ("pp-bin-is-dir", PP.replace("{O}/out/p", "{O}/full/x"), 2, ["{O}/full/x_text_document.bin", "directory"]),
    ("pp-truncated-gz", PP.replace("text.jsonl", "text.jsonl.gz"), 2, ["{W}/text.jsonl.gz", "truncated"]),
    ("pp-truncated-zst", PP.replace("text.jsonl", "text.jsonl.zst"), 2, ["{W}/text.jsonl.zst", "truncated"]),
    ("pp-missing-input", PP.replace("text.jsonl", "nope.jsonl"), 2, ["--input", "nope.jsonl"]),
    ("pp-strict-bad-utf8", PP.replace("text.jsonl", "text_bad.jsonl") + " --strict", 2, ["{W}/text_bad.jsonl:3"]),
    ("pp-tokenizer-not-a-folder", PP.replace("{M}", "{O}/dir"), 2, ["--tokenizer-model", "{O}/dir"]),
    ("pp-sentencepiece-wrong-kind",
     PP.replace("HuggingFaceTokenizer", "SentencePieceTokenizer").replace("{M}", "{W}/text.jsonl"), 2,
     ["--tokenizer-model", "SentencePiece"]),
    ("pp-tiktoken-wrong-kind", PP.replace("HuggingFaceTokenizer", "TikTokenizer").replace("{M}", "{W}/text.jsonl"), 2,
     ["--tokenizer-model", "TikTokenizer"]),
    ("pp-unknown-tokenizer-type", PP.replace("HuggingFaceTokenizer", "GPT2BPETokenizer"), 2, ["--tokenizer-type"]),
    # ---- preprocess-sft
    ("sft-seq-length-0", SFT + " --seq-length 0", 2, ["--seq-length"]),
    ("sft-subset-fraction-1.5", SFT + " --subset-fraction 1.5", 2, ["--subset-fraction"]),
    ("sft-subset-fraction-0", SFT + " --subset-fraction 0", 2, ["--subset-fraction"]),
    ("sft-preset-typo", SFT + " --preset apriel-nemotron-15B", 2, ["--preset", "apriel-nemotron-15b"]),
    ("sft-chat-template-typo", SFT.replace("apriel", "apriel-nemo"), 2, ["--chat-template", "apriel-nemo"]),
    ("sft-log-interval-negative", SFT + " --log-interval -5", 2, ["--log-interval"]),
    ("sft-overlong-choice", SFT + " --overlong cut", 2, ["--overlong"]),
    ("sft-prefix-is-dir", SFT.replace("{O}/out/s", "{O}/dir/"), 2, ["--output-prefix", "folder"]),
    ("sft-prefix-under-file", SFT.replace("{O}/out/s", "{O}/file/s"), 2, ["{O}/file", "is a file"]),
    ("sft-missing-input", SFT.replace("chat.jsonl", "nope.jsonl"), 2, ["nope.jsonl"]),
    ("sft-strict-bad-utf8", SFT.replace("chat.jsonl", "chat_bad.jsonl") + " --strict", 2, ["{W}/chat_bad.jsonl:2"]),
    ("sft-tokenizer-not-a-folder", SFT.replace("{M}", "{O}/dir"), 2, ["--tokenizer-model", "{O}/dir"]),
    # ---- preprocess-multimodal
    ("mm-patch-size-0", MM.replace("--patch-size 16", "--patch-size 0"), 2, ["--patch-size"]),
    ("mm-image-size-0", MM.replace("--image-size 32", "--image-size 0"), 2, ["--image-size"]),
    ("mm-image-size-not-multiple", MM.replace("--image-size 32", "--image-size 40"), 2,
     ["--image-size", "--patch-size"]),
    ("mm-seq-length-0", MM + " --seq-length 0", 2, ["--seq-length"]),
    ("mm-max-image-pixels-0", MM + " --max-image-pixels 0", 2, ["--max-image-pixels"]),
    ("mm-workers-negative", MM + " --workers -2", 2, ["--workers"]),
    ("mm-token-id-negative", MM + " --image-token-id -1", 2, ["--image-token-id"]),
    ("mm-prefix-is-dir", MM.replace("{O}/out/m", "{O}/dir"), 2, ["--output-prefix", "folder"]),
    ("mm-strict-bad-utf8", MM.replace("mm.jsonl", "mm_bad.jsonl") + " --strict", 2, ["{W}/mm_bad.jsonl:2", "UTF-8"]),
    # ---- convert
    ("h2m-tp-0", H2M + " --out {O}/out --tp 0", 2, ["--tp"]),
    ("h2m-pp-negative", H2M + " --out {O}/out --pp -1", 2, ["--pp"]),
    ("h2m-tp-3-does-not-divide", H2M + " --out {O}/out --tp 3", 2, ["tp=3"]),
    ("h2m-out-is-file", H2M + " --out {O}/file", 2, ["--out", "{O}/file", "is a file"]),
    ("h2m-out-under-file", H2M + " --out {O}/file/ckpt", 2, ["{O}/file", "is a file"]),
    ("h2m-out-not-empty", H2M + " --out {O}/full", 2, ["{O}/full", "--force"]),
    ("h2m-dtype-choice", H2M + " --out {O}/out --dtype fp8", 2, ["--dtype"]),
    ("m2h-shard-size-0", M2H + " --out {O}/out --max-shard-size 0", 2, ["--max-shard-size"]),
    ("m2h-shard-size-words", M2H + " --out {O}/out --max-shard-size big", 2, ["--max-shard-size"]),
    ("m2h-out-is-file", M2H + " --out {O}/file", 2, ["--out", "{O}/file"]),
    ("m2h-chat-template-typo", M2H + " --out {O}/out --chat-template apriel-1.6", 2, ["--chat-template"]),
    ("m2h-preset-typo", M2H + " --out {O}/out --preset tiny-upscale", 2, ["tiny-upscale"]),
    # ---- upscale
    ("up-duplicate-middle-0", UP.replace("2", "0") + " --out {O}/out", 2, ["--duplicate-middle"]),
    ("up-expand-every-negative", "upscale --hf {M} --expand-every -1 --out {O}/out", 2, ["--expand-every"]),
    ("up-max-shard-gb-0", UP + " --out {O}/out --max-shard-gb 0", 2, ["--max-shard-gb"]),
    ("up-out-is-file", UP + " --out {O}/file", 2, ["{O}/file", "is a file"]),
    ("up-out-not-empty", UP + " --out {O}/full", 2, ["{O}/full", "--force"]),
    ("up-shapes-disagree-with-config", "upscale --hf {W}/bad_shapes --duplicate-middle 2 --out {O}/out", 2,
     ["{W}/bad_shapes", "mlp", "config.json"]),
    # ---- average
    ("avg-max-shard-gb-negative", AVG + " --out {O}/out --max-shard-gb -1", 2, ["--max-shard-gb"]),
    ("avg-equispaced-0", "average --run-dir {W} --equispaced 0 --out {O}/out", 2, ["--equispaced"]),
    ("avg-weights-not-numbers", AVG + " --out {O}/out --weights a b", 2, ["--weights"]),
    ("avg-out-is-file", AVG + " --out {O}/file", 2, ["{O}/file", "is a file"]),
    ("avg-out-under-file", AVG + " --out {O}/file/m", 2, ["{O}/file", "is a file"]),
    ("avg-shapes-disagree-with-config", "average {W}/bad_shapes {W}/bad_shapes --out {O}/out", 2,
     ["{W}/bad_shapes", "config.json"]),
    # ---- mix-report
    ("mix-png-is-dir", MIX + " --png {O}/dir", 2, ["--png", "{O}/dir", "directory"]),
    ("mix-png-under-file", MIX + " --png {O}/file/mix.png", 2, ["{O}/file", "is a file"]),
    ("mix-json-is-dir", MIX + " --png {O}/m.png --json {O}/dir", 2, ["--json", "{O}/dir"]),
    ("mix-global-batch-size-0", MIX + " --png {O}/m.png --global-batch-size 0", 2, ["--global-batch-size"]),
    ("mix-first-negative", MIX + " --png {O}/m.png --first -1", 2, ["--first"]),
    ("mix-truncated-bin", "mix-report {W}/blend_trunc.yaml --png {O}/m.png", 2,
     ["{W}/trunc/d_text_document.bin", "truncated"]),
    # ---- eval and merge-search: the output is checked before any model is loaded
    ("eval-out-is-dir", EVAL + " --out {O}/dir", 2, ["--out", "{O}/dir", "directory"]),
    ("eval-out-under-file", EVAL + " --out {O}/file/r.json", 2, ["{O}/file", "is a file"]),
    ("eval-plot-is-dir", EVAL + " --out {O}/r.json --plot {O}/dir", 2, ["--plot", "{O}/dir"]),
    ("eval-temperature-negative", EVAL + " --out {O}/r.json --temperature -1", 2, ["--temperature"]),
    ("eval-top-p-0", EVAL + " --out {O}/r.json --top-p 0", 2, ["--top-p"]),
    ("eval-samples-0", EVAL + " --out {O}/r.json --samples 0", 2, ["--samples"]),
    ("eval-max-gen-toks-0", EVAL.replace("--max-gen-toks 4", "--max-gen-toks 0") + " --out {O}/r.json", 2,
     ["--max-gen-toks"]),
    ("eval-batch-size-0", EVAL + " --out {O}/r.json --batch-size 0", 2, ["--batch-size"]),
    ("eval-limit-0", EVAL + " --out {O}/r.json --limit 0", 2, ["--limit"]),
    ("eval-task-file-not-utf8", EVAL.replace("math.jsonl", "math_bad.jsonl") + " --out {O}/r.json", 2,
     ["{W}/math_bad.jsonl", "line 1"]),
    ("eval-preset-typo", EVAL + " --out {O}/r.json --preset tiny2", 2, ["--preset", "tiny2"]),
    ("ms-out-dir-is-file", MS + " --out-dir {O}/file", 2, ["--out-dir", "{O}/file", "is a file"]),
    ("ms-grid-0", MS + " --out-dir {O}/out --grid 0", 2, ["--grid"]),
    ("ms-grid-above-1", MS + " --out-dir {O}/out --grid 1.5", 2, ["--grid"]),
    # ---- generate and model-info
    ("gen-temperature-negative", GEN + " --temperature -2", 2, ["--temperature"]),
    ("gen-max-new-tokens-negative", GEN + " --max-new-tokens -3", 2, ["--max-new-tokens"]),
    ("gen-top-p-above-1", GEN + " --top-p 1.5", 2, ["--top-p"]),
    ("gen-preset-typo", GEN + " --chat --preset apriel-nemotron-15B", 2, ["--preset"]),
    ("gen-chat-template-typo", GEN + " --chat --chat-template aprel", 2, ["--chat-template", "aprel"]),
    ("info-tp-0", "model-info tiny --tp 0", 2, ["--tp"]),
    ("info-tp-5-of-32-heads", "model-info apriel-nemotron-15b --tp 5", 2, ["--tp 5", "32"]),
    ("info-pp-3-of-4-layers", "model-info tiny --pp 3", 2, ["--pp 3"]),
    ("info-seq-0", "model-info tiny --seq 0", 2, ["--seq"]),
    ("info-unknown-preset", "model-info tiny-large", 2, ["tiny-large"]),
]


def _prepare(o: Path, w: Path) -> None:
    (o / "file").write_text("not a folder\n")
    (o / "dir").mkdir()
    (o / "full").mkdir()
    (o / "full" / "keep.txt").write_text("keep\n")
    (o / "full" / "x_text_document.bin").mkdir()  # a folder where a .bin goes
    (o / "merge.yaml").write_text(json.dumps({"merge_method": "linear", "out": str(o / "merged"),
                                              "models": [{"model": str(w / "model"), "parameters": {"weight": 0.5}},
                                                         {"model": str(w / "model"), "parameters": {"weight": 0.5}}]}))


def _listing(root: Path) -> dict:
    return {str(p.relative_to(root)): p.stat().st_size if p.is_file() else None for p in sorted(root.rglob("*"))}


def run_verb(argv: list[str], capsys) -> tuple[int, str]:
    try:
        rc = apriel(argv)
    except SystemExit as e:  # argparse's errors
        rc = e.code
    return rc, capsys.readouterr().err


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one stderr line, got:\n{err}"
    assert "error:" in lines[0] and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_hostile_input(case, world, tmp_path, capsys):
    _, line, code, words = case
    _prepare(tmp_path, world)
    before = _listing(tmp_path)
    fixtures = _listing(world)
    rc, err = run_verb([_format(a, world, tmp_path) for a in line.split()], capsys)
    assert rc == code, err
    msg = one_error_line(err)
    for word in words:
        assert _format(word, world, tmp_path) in msg, msg
    after = _listing(tmp_path)
    # nothing written, nothing half-written, nothing removed (an output's empty parent folder may stay)
    assert {k: v for k, v in after.items() if k in before} == before
    assert all(v is None and not any((tmp_path / k).iterdir()) for k, v in after.items() if k not in before), after
    assert _listing(world) == fixtures  # inputs untouched


def test_at_least_sixty_cases_over_every_writing_verb():
    verbs = {c[1].split()[0] + (" " + c[1].split()[1] if c[1].startswith("convert") else "") for c in CASES}
    assert len(CASES) >= 60
    assert verbs >= {"preprocess", "preprocess-sft", "preprocess-multimodal", "convert hf-to-mcore",
                     "convert mcore-to-hf", "upscale", "average", "mix-report", "eval", "merge-search", "generate",
                     "model-info"}


# ---------------------------------------------------------------- nothing lost: undecodable lines are skips


def test_undecodable_lines_are_counted_skips_named_by_file_and_line(world, tmp_path, capsys):
    w, o = world, tmp_path
    assert run_verb(_format(PP.replace("text.jsonl", "text_bad.jsonl"), w, o).split(), capsys)[0] == 0
    stats = json.loads((o / "out" / "p.stats.json").read_text())
    assert stats["documents"] == 4 and stats["skipped"] == 1
    assert stats["skipped_examples"]["bad_json"] == [f"{w}/text_bad.jsonl:3"]

    assert run_verb(_format(SFT.replace("chat.jsonl", "chat_bad.jsonl"), w, o).split(), capsys)[0] == 0
    report = json.loads((o / "out" / "s_report.json").read_text())
    assert report["kept"] == len(CHATS) - 1 and report["skipped_bad"] == 1
    assert report["skipped_records"][0].startswith(f"{w}/chat_bad.jsonl:2: ")

    assert run_verb(_format(MM.replace("mm.jsonl", "mm_bad.jsonl"), w, o).split(), capsys)[0] == 0
    meta = json.loads((o / "out" / "m_multimodal.json").read_text())
    assert meta["kept"] == 3 and meta["skipped_by_reason"] == {"invalid_utf8": 1}
    assert meta["skipped_records"][0].startswith(f"{w}/mm_bad.jsonl:2: ")


def test_a_rerun_removes_a_killed_runs_leftovers(world, tmp_path, capsys):
    """What a SIGKILL (nothing can clean up) leaves, removed by the next run with the same output."""
    w, o = world, tmp_path
    dead = 4194303  # above any pid this machine has handed out (checked below)
    assert not Path(f"/proc/{dead}").exists()
    (o / "out").mkdir()
    left = [o / "out" / f"s_tokens_document.tmp{dead}.bin", o / "out" / f"s_loss_mask_document.tmp{dead}.idx",
            o / "out" / "p_text_document.bin.tmp", o / "out" / "p_text_document.len.tmp"]
    for p in left:
        p.write_bytes(b"half")
    (o / f".up.tmp-{dead}").mkdir()
    (o / f".up.tmp-{dead}" / "model-00001.safetensors").write_bytes(b"half")
    assert run_verb(_format(SFT, w, o).split(), capsys)[0] == 0
    assert run_verb(_format(PP, w, o).split(), capsys)[0] == 0
    assert run_verb(_format(UP + " --out {O}/up", w, o).split(), capsys)[0] == 0
    assert not any(p.exists() for p in left) and not (o / f".up.tmp-{dead}").exists()
    assert {p.name for p in o.iterdir()} == {"out", "up"}


def test_truncated_bin_is_named_by_the_dry_run(world, tmp_path, capsys):
    blend = {"sources": [{"name": "web", "prefixes": [str(world / "trunc" / "d_text_document")]}],
             "seq_length": 64, "steps": 4}
    rc, err = run_verb(["train", "--dry-run", "--config", str(REPO / "examples/tiny/cpt.yaml"), "data.kind=blend",
                        f"data.blend={json.dumps(blend)}"], capsys)
    assert rc == 2
    line = [x for x in err.splitlines() if "error" in x]
    assert len(line) == 1 and f"{world}/trunc/d_text_document.bin" in line[0] and "truncated" in line[0], err


def test_training_data_build_names_a_truncated_bin(world):
    from megatron_apriel.config import ConfigError, from_dict
    from megatron_apriel.data.blends import BlendSpec, build_datasets

    spec = from_dict(BlendSpec, json.loads((world / "blend_trunc.yaml").read_text()), "data.blend")
    with pytest.raises(ConfigError, match=r"trunc/d_text_document\.bin is \d[\d,]* bytes but its \.idx needs"):
        build_datasets(spec, global_batch_size=2)


def test_apriel_preprocess_exits_2_and_the_megatron_tool_1(world, tmp_path, capsys):
    from megatron_apriel.data.preprocess import tool_main

    argv = _format(PP.replace("text.jsonl", "nope.jsonl"), world, tmp_path).split()[1:]
    assert run_verb(["preprocess", *argv], capsys)[0] == 2
    assert tool_main(argv) == 1
    assert "nope.jsonl" in one_error_line(capsys.readouterr().err)


# ---------------------------------------------------------------- processes of their own


def _driver(jobs: list[dict], tmp: Path, prefix: list[str] = (), timeout: int = 300):
    (tmp / "jobs.json").write_text(json.dumps(jobs))
    out = tmp / "results.json"
    proc = subprocess.run([*prefix, sys.executable, str(REPO / "tests" / "edge_driver.py"), str(tmp / "jobs.json"),
                           str(out)], capture_output=True, text=True, timeout=timeout, cwd=REPO, start_new_session=True,
                          env={**os.environ, "PYTHONPATH": REPO_PYTHONPATH})
    results = json.loads(out.read_text()) if out.exists() else []
    assert len(results) == len(jobs), proc.stderr[-4000:]
    return proc, results


def _writers(w: Path, o: Path, interrupted: bool = False) -> list[tuple]:
    """(name, command line, marker of a path it writes while working) of every writing verb.
    ``interrupted``: without mix-report, whose run on the tiny blend spends its time in megatron-core's
    index building before it writes (its PNG goes through the same temporary-name-and-rename)."""
    writers = [
        ("preprocess", PP, "{O}/out/p_text_document.bin.tmp"),
        ("preprocess-sft", SFT, "{O}/out/s_tokens_document.tmp"),
        ("preprocess-multimodal", MM, "{O}/out/m_tokens_document.tmp"),
        # the dist checkpoint's shards are written by forked workers; its metadata by this process
        ("hf-to-mcore", H2M + " --out {O}/ck", ["{O}/.ck.tmp-", "apriel_model"]),
        ("mcore-to-hf", M2H + " --out {O}/hf", "{O}/.hf.tmp-"),
        ("upscale", UP + " --out {O}/up", "{O}/.up.tmp-"),
        ("average", AVG + " --out {O}/avg", "{O}/.avg.tmp-"),
        ("mix-report", MIX + " --png {O}/mix.png", "{O}/.tmp-"),
        ("eval", EVAL + " --out {O}/results.json --chat-template none", "{O}/.tmp-"),
    ]
    return [x for x in writers if not (interrupted and x[0] == "mix-report")]


@pytest.mark.parametrize("sig,code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_an_interrupt_while_writing_leaves_nothing(world, tmp_path, sig, code):
    """Every writer, signalled while its output is half-written: one line, 130 or 143, nothing left.
    The last job ends the process with the verb's code, which the caller sees as the exit status."""
    jobs, folders = [], []
    for i, (name, line, marker) in enumerate(_writers(world, tmp_path, interrupted=True)):
        o = tmp_path / f"{i}-{name}"
        o.mkdir()
        folders.append(o)
        marker = [_format(m, world, o) for m in marker] if isinstance(marker, list) else _format(marker, world, o)
        jobs.append({"argv": _format(line, world, o).split(), "signal": sig, "marker": marker})
    jobs[-1]["exit"] = True
    proc, results = _driver(jobs, tmp_path)
    assert proc.returncode == code, proc.stderr[-3000:]
    for (name, _, _), o, res in zip(_writers(world, tmp_path, interrupted=True), folders, results):
        assert res["fired"], f"{name}: never wrote its output"
        assert res["rc"] == code, f"{name}: {res}"
        line = [x for x in res["stderr"].splitlines() if sig in x]
        assert len(line) == 1 and "Traceback" not in res["stderr"], f"{name}: {res['stderr']}"
        assert _listing(o) in ({}, {"out": None}), f"{name} left {_listing(o)}"


def _bwrap_works() -> bool:
    if shutil.which("bwrap") is None:
        return False
    probe = subprocess.run(["bwrap", "--dev-bind", "/", "/", "--tmpfs", "/mnt", "true"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _bwrap_works(), reason="bubblewrap missing or unable to mount here: "
                    "sudo scripts/install-system-packages.sh (apt-get install bubblewrap)")
def test_full_and_read_only_disks_give_one_line_and_exit_1(world, tmp_path):
    """Under bubblewrap: a read-only bind mount, a tmpfs filled to the last byte (every writer stops
    up front) and a 256 KiB tmpfs (full part way through writing a model or a large dataset)."""
    ro, full, small = tmp_path / "ro", tmp_path / "full", tmp_path / "small"
    for d in (ro, full, small):
        d.mkdir()
    jobs, expect = [{"fill": str(full / "filler")}], [None]
    for name, line, _ in _writers(world, tmp_path):
        for where, cause in ((ro, "read-only file system"), (full, "no space left on device")):
            o = where / name
            jobs.append({"argv": _format(line, world, o).split()})
            expect.append((name, o, cause))
    big = tmp_path / "big.jsonl"
    _jsonl(big, [{"text": " ".join(TEXTS)}] * 300)
    for name, line in (("preprocess", PP.replace("{W}/text.jsonl", str(big))), ("upscale", UP + " --out {O}/up"),
                       ("hf-to-mcore", H2M + " --out {O}/ck"), ("average", AVG + " --out {O}/avg")):
        o = small / name
        jobs.append({"argv": _format(line, world, o).split()})
        expect.append((name + " (small disk)", o, "no space left on device"))
    jobs += [{"list": str(d)} for d in (full, small)]
    prefix = ["bwrap", "--dev-bind", "/", "/", "--size", str(256 << 10), "--tmpfs", str(full),
              "--size", str(256 << 10), "--tmpfs", str(small), "--ro-bind", str(ro), str(ro)]
    _, results = _driver(jobs, tmp_path, prefix)
    for exp, res in zip(expect[1:], results[1:len(expect)]):
        name, o, cause = exp
        assert res["rc"] == 1, f"{name} in {o}: {res}"
        if name.startswith("hf-to-mcore (small"):  # megatron-core's worker logs its own line first
            res["stderr"] = res["stderr"].rstrip().splitlines()[-1]
        line = one_error_line(res["stderr"])
        assert cause in line and str(o.parent) in line, f"{name}: {line}"
    # no file half-written, no temporary file (an empty output folder may stay): listed inside the
    # mounts, which end with the process
    assert results[-2]["listing"] == ["filler"] and results[-1]["listing"] == [], results[-2:]
    assert not any(ro.iterdir())


def test_no_transformer_engine_warnings_even_for_help():
    for argv in (["convert", "--help"], ["train", "--help"]):
        proc = subprocess.run([sys.executable, "-m", "megatron_apriel", *argv], capture_output=True, text=True,
                              cwd=REPO, env={**os.environ, "PYTHONPATH": REPO_PYTHONPATH}, timeout=120)
        assert proc.returncode == 0 and "usage:" in proc.stdout
        assert "Transformer Engine" not in proc.stderr and "Apex" not in proc.stderr, proc.stderr
