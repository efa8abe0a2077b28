"""``apriel eval`` on image tasks: scores equal a count made with transformers alone
(LlavaForConditionalGeneration, PixtralProcessor, the images, the chat template), for generation and
log-likelihood; broken images are counted skips named by file and line; bad setups are one-line errors.

About 15 s on 2 CPU cores: one tiny Llava/Pixtral model, one evaluation run of two tasks.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_multimodal_data import SPECIALS, draw, pixtral_processor_class

pytest.importorskip("lm_eval")

from megatron_apriel.data.chat_template import CHAT_TEMPLATES  # noqa: E402
from megatron_apriel.eval import run as ev  # noqa: E402
from megatron_apriel.eval.images import PixtralPrompts  # noqa: E402
from megatron_apriel.rl.rewards.math import extract_answer  # noqa: E402

MAX_NEW = 12


def make_tokenizer(path: Path) -> int:
    """A byte-level BPE with Pixtral's image tokens at 10/12/13, trained on digit-rich text so that a
    random model's greedy answers hold numbers (some right, some wrong)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = [f"There are {i} circles, {i + 3} squares and {2 * i} dots: {i} + {i + 3} = {2 * i + 3}."
              for i in range(60)] + ["Which colour is the square? A. red B. blue C. green D. white"] * 5
    tok.train_from_iterator(corpus, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    hf.save_pretrained(path)
    return len(hf)


@pytest.fixture(scope="module")
def vl_dir(tmp_path_factory) -> Path:
    """A random tiny Llava (Pixtral vision, patch 4, longest edge 64) with the tokenizer above."""
    from transformers import LlavaForConditionalGeneration

    from megatron_apriel.checkpoint.llava import hf_config
    from megatron_apriel.models.presets import get_preset

    d = tmp_path_factory.mktemp("vl") / "model"
    vocab = make_tokenizer(d)
    torch.manual_seed(0)
    cfg = hf_config(get_preset("tiny-llava", vocab_size=vocab), torch.float32)
    # wide weights: greedy answers vary with the image and sometimes hold a number (at 0.02 they repeat one token)
    cfg.initializer_range = cfg.text_config.initializer_range = 0.5
    model = LlavaForConditionalGeneration(cfg)
    model.save_pretrained(d)
    return d


def _write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


SHAPES = [("rect", "red"), ("ellipse", "blue"), ("rect", "green"), ("ellipse", "yellow"), ("rect", "black")]


def draw_images(folder: Path) -> list[str]:
    """Five small images of different sizes (so batches pad pixels), one shape each."""
    folder.mkdir()
    names = []
    for i, (kind, colour) in enumerate(SHAPES):
        w, h = 12 + 4 * (i % 3), 8 + 4 * (i % 2)
        draw(folder / f"{i}.png", (w, h), [(kind, (1, 1, w - 3, h - 2), colour)])
        names.append(f"img/{i}.png")
    return names


@pytest.fixture(scope="module")
def reference(vl_dir, monkeypatch_module):
    """transformers alone: the tokenizer with the Apriel-1.5 template, PixtralProcessor, the model."""
    from transformers import AutoTokenizer, LlavaForConditionalGeneration
    from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

    tok = AutoTokenizer.from_pretrained(vl_dir)
    tok.chat_template = CHAT_TEMPLATES["apriel-1.5"]
    proc = pixtral_processor_class(monkeypatch_module)(
        image_processor=PixtralImageProcessorPil(size={"longest_edge": 64}, patch_size=4), tokenizer=tok, patch_size=4)
    model = LlavaForConditionalGeneration.from_pretrained(vl_dir, dtype=torch.float32).eval()
    return tok, proc, model


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def render(tok, text: str, n_images: int) -> str:
    """The user turn as HF chunks: images where ``<image>`` stands, or first when there is none."""
    parts = text.split("<image>") if "<image>" in text else [""] * n_images + [text]
    chunks = []
    for i, p in enumerate(parts):
        if p:
            chunks.append({"type": "text", "text": p})
        if i < len(parts) - 1:
            chunks.append({"type": "image"})
    return tok.apply_chat_template([{"role": "user", "content": chunks}], tokenize=False, add_generation_prompt=True)


@pytest.fixture(scope="module")
def evaluated(vl_dir, reference, tmp_path_factory):
    """One ``apriel eval`` run: a generation (math) task and a log-likelihood (choice_ll) one, with images,
    and bad records in the latter."""
    from PIL import Image

    tok, proc, model = reference
    d = tmp_path_factory.mktemp("vl_run")
    imgs = draw_images(d / "img")
    pil = {p: Image.open(d / p).convert("RGB") for p in imgs}
    # generation reference: greedy completions of transformers for each question and image
    questions = [(f"How many shapes are there in picture {i}?", [imgs[i]]) for i in range(5)]
    questions.append(("Compare <image> with <image>: how many shapes in all?", [imgs[0], imgs[3]]))
    texts = [("How many sides has a square?", []), ("What is 2 + 3?", [])]  # a text-only task in the same run
    completions = []
    for q, paths in questions + texts:
        enc = proc(text=render(tok, q, len(paths)), images=[pil[p] for p in paths] or None, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=tok.pad_token_id)
        completions.append(tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
    # even records ask for the number transformers answered (right), odd ones for another (wrong)
    math = [{"question": q, "images": paths, "answer": (extract_answer(c) or "7") if k % 2 == 0 else "123456"}
            for k, ((q, paths), c) in enumerate(zip(questions, completions))]
    text_only = [{"question": q, "answer": "4"} for q, _ in texts]
    mc = [{"question": "Which colour is the shape?", "images": [imgs[k]], "choices": ["red", "blue", "green",
           "yellow"], "answer": k % 4} for k in range(5)]
    mc.append({"question": "Is <image> like <image>?", "images": [imgs[1], imgs[2]], "choices": ["yes", "no"],
               "answer": 1})
    (d / "img/broken.png").write_bytes(b"not an image")
    (d / "img/cut.png").write_bytes((d / imgs[0]).read_bytes()[:60])
    bad = [{"question": "Colour?", "images": ["img/nowhere.png"], "choices": ["a", "b"], "answer": 0},
           {"question": "Colour?", "images": ["img/broken.png"], "choices": ["a", "b"], "answer": 0},
           {"question": "Colour?", "images": ["img/cut.png"], "choices": ["a", "b"], "answer": 0},
           {"question": "<image> or <image>?", "images": [imgs[0]], "choices": ["a", "b"], "answer": 0},
           {"question": "Colour?", "images": "img/0.png", "choices": ["a", "b"], "answer": 0},
           {"question": "What does [IMG] mean?", "images": [imgs[0]], "choices": ["a", "b"], "answer": 0}]
    _write_jsonl(d / "math.jsonl", math)
    _write_jsonl(d / "text.jsonl", text_only)
    _write_jsonl(d / "mc.jsonl", mc[:3] + bad + mc[3:])
    logs = []
    settings = ev.Settings(max_gen_toks=MAX_NEW, chat_template="apriel-1.5", batch_size=2,
                           require_final_response=False)
    result = ev.run([str(vl_dir)], [f"math={d / 'math.jsonl'}", f"choice_ll={d / 'mc.jsonl'}",
                                    f"math={d / 'text.jsonl'}"],
                    str(d / "results.json"), settings, log=logs.append)
    return dict(result=result, completions=completions, math=math, mc=mc, pil=pil, out=d, logs=logs)


def test_generation_accuracy_equals_transformers_count(evaluated, vl_dir):
    r = evaluated["result"]["results"][str(vl_dir)]["math"]
    completions = evaluated["completions"][:len(evaluated["math"])]
    expected = [extract_answer(c) is not None and extract_answer(c) == str(rec["answer"])
                for c, rec in zip(completions, evaluated["math"])]
    assert sum(expected) >= 2 and not all(expected)  # right and wrong both occur under transformers' own output
    assert r["pass@1"] == pytest.approx(sum(expected) / len(expected))
    samples = evaluated["result"]["samples"][str(vl_dir)]["math"]
    assert [s["completions"][0] for s in samples] == completions
    assert [s["correct"][0] for s in samples] == expected
    assert samples[-1]["images"] == evaluated["math"][-1]["images"]
    # a text-only task in the same run (lm-eval sends all tasks' requests in one call) is answered without images
    text = evaluated["result"]["samples"][str(vl_dir)]["text"]
    assert [s["completions"][0] for s in text] == evaluated["completions"][len(completions):]


def test_loglikelihood_accuracy_equals_transformers_count(evaluated, reference, vl_dir):
    tok, proc, model = reference
    n_right, lls_all = 0, []
    for rec in evaluated["mc"]:
        text = rec["question"] + "\n\n" + "\n".join(f"{'ABCD'[i]}. {c}" for i, c in enumerate(rec["choices"]))
        ctx = render(tok, text + "\nAnswer:", len(rec["images"]))
        images = [evaluated["pil"][p] for p in rec["images"]]
        n_ctx = proc(text=ctx.rstrip(), images=images, return_tensors="pt")["input_ids"].shape[1]
        lls = []
        for choice in rec["choices"]:  # the prompt's trailing newline is scored with the choice, as lm-eval does
            enc = proc(text=ctx + choice, images=images, return_tensors="pt")
            ids = enc["input_ids"][0]
            with torch.no_grad():
                logp = torch.log_softmax(model(**enc).logits[0].float(), -1)
            lls.append(sum(logp[i - 1, ids[i]].item() for i in range(n_ctx, len(ids))))
        lls_all.append(lls)
        n_right += max(range(len(lls)), key=lls.__getitem__) == rec["answer"]
    r = evaluated["result"]["results"][str(vl_dir)]["mc"]
    assert r["records"] == len(evaluated["mc"])
    assert r["acc"] == pytest.approx(n_right / len(evaluated["mc"]))
    samples = evaluated["result"]["samples"][str(vl_dir)]["mc"]
    for s, lls in zip(samples, lls_all):
        assert s["loglikelihoods"] == pytest.approx(lls, abs=1e-4)
    # the images matter: the same question and choices about different pictures score differently
    assert max(abs(a - b) for a, b in zip(samples[0]["loglikelihoods"], samples[1]["loglikelihoods"])) > 1e-3


def test_broken_images_are_counted_skips(evaluated, vl_dir):
    r = evaluated["result"]["results"][str(vl_dir)]["mc"]
    reasons = {s["line"]: s["reason"] for s in r["skipped"]}
    assert sorted(reasons) == [4, 5, 6, 7, 8, 9]  # lines of the bad records, between good ones
    assert reasons[4].startswith("image_missing: img/nowhere.png")
    assert reasons[5].startswith("image_unreadable: img/broken.png")
    assert reasons[6].startswith(("image_truncated: img/cut.png", "image_unreadable: img/cut.png"))
    assert reasons[7].startswith("placeholder_mismatch")
    assert "'images' must be a list" in reasons[8]
    assert reasons[9].startswith("image_token_in_text")
    assert r["skip_reasons"] == {"image_missing": 1, "image_unreadable": 1 + reasons[6].startswith("image_unreadable"),
                                 "placeholder_mismatch": 1, "invalid_record": 1, "image_token_in_text": 1,
                                 **({"image_truncated": 1} if reasons[6].startswith("image_truncated") else {})}
    line = next(m for m in evaluated["logs"] if "skipped 6 bad record(s)" in m)
    assert f"{evaluated['out'] / 'mc.jsonl'}:4: image_missing" in line


def test_pixtral_prompts_equal_pixtral_processor(vl_dir, reference, evaluated):
    """The backend's prompts, token for token and pixel for pixel, are transformers' PixtralProcessor's."""
    from transformers import AutoTokenizer

    tok, proc, _ = reference
    ours = PixtralPrompts(vl_dir, AutoTokenizer.from_pretrained(vl_dir))
    images = list(evaluated["pil"].values())
    texts = ["<s>two [IMG] and [IMG] here", "[IMG]three[IMG]"]
    tok.padding_side = ours.tokenizer.padding_side = "left"  # as lm-eval batches prompts for generation
    tok.pad_token = ours.tokenizer.pad_token = "<unk>"  # as lm-eval sets it on a tokenizer without one
    got, want = ours(text=texts, images=images[:4]), proc(text=texts, images=images[:4], return_tensors="pt",
                                                            padding="longest")
    assert torch.equal(got["input_ids"], want["input_ids"]) and torch.equal(got["attention_mask"],
                                                                            want["attention_mask"])
    assert torch.equal(got["image_sizes"], want["image_sizes"])
    torch.testing.assert_close(got["pixel_values"], want["pixel_values"], rtol=0, atol=0)


def test_image_tasks_need_a_vision_model_and_template(vl_dir, tiny_hf_dir, tmp_path, capsys):
    d = tmp_path
    draw(d / "a.png", (8, 8), [("rect", (1, 1, 5, 5), "red")])
    task = _write_jsonl(d / "t.jsonl", [{"question": "Colour?", "images": ["a.png"], "choices": ["r", "b"],
                                         "answer": 0}])
    assert ev.main(["--hf", str(tiny_hf_dir), "--tasks", f"choice_ll={task}", "--out", str(d / "o.json")]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and str(tiny_hf_dir) in err and "vision tower" in err
    assert ev.main(["--hf", str(vl_dir), "--tasks", f"choice_ll={task}", "--out", str(d / "o.json"),
                    "--chat-template", "apriel"]) == 2
    assert "--chat-template apriel-1.5" in capsys.readouterr().err
    with pytest.raises(ev.EvalError, match="image tasks run on --backend hf"):
        ev.check_image_models([{"path": str(vl_dir)}], [str(task)], "vllm")
    assert not (d / "o.json").exists()
