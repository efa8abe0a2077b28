"""``apriel demo --multimodal``: the Apriel-1.5 chain on a tiny Llava/Pixtral model, on a CPU.

data (drawn pictures, questions, text, BPE) -> preprocess -> text base (decoder trained on text,
vision encoder and projector frozen) -> its vision encoder pretrained (``multimodal_vision``: what
Pixtral's encoder brings to the recipe, made here since nothing is downloaded) -> depth upscaling
4 -> 5 layers with replay -> projector realignment (vision encoder and decoder frozen, captions)
-> CPT stage 1 (text + image captions, everything trainable; average of 3 equispaced checkpoints)
-> CPT stage 2 (the synthetic visual tasks of ``data_prep/synthetic_visual.py`` plus four-choice
visual questions, vision encoder frozen; its last checkpoint, not averaged, as the recipe has it)
-> text-only SFT in the Apriel-1.5 format -> HF export (the final model).

Beside the chain, in the same run, two controls from the same checkpoints: the chain without CPT
stage 2 (SFT from the stage-1 average) and the text-only chain (SFT from the upscaled model), so
the stage-2 effect and the text kept are measured, not assumed.

Every model is scored by ``apriel eval``'s engine (``choice_ll``, log-likelihood of each choice,
raw prompts) on held-out four-choice visual questions (colour, count, position, matching) about
pictures the training never saw and on held-out text problems.

The vision encoder is pretrained on its own before the chain (patch colours, training-split
pictures only), trained again in CPT stage 1 (the one stage of the chain where it is not frozen),
and frozen everywhere else, as in the recipe.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from transformers.utils import logging as hf_logging

from megatron_apriel.demo.multimodal_data import VISUAL_KINDS, Sizes, make_all, train_tokenizer
from megatron_apriel.demo.multimodal_vision import pretrain_encoder
from megatron_apriel.demo.recipe import IN_PROCESS, Demo
from megatron_apriel.demo.report import interval
from megatron_apriel.errors import InputError
from megatron_apriel.eval.run import Settings, run

SYNTHETIC_VISUAL = Path(__file__).resolve().parents[2] / "data_prep" / "synthetic_visual.py"
TEXT_SOURCES = ("text", "words")  # indexed text datasets (apriel preprocess)
TASKS = (*VISUAL_KINDS, "text")
CHANCE = 0.25  # every question has four choices
DEFAULT_MINUTES = 15.0


@dataclass
class MMPlan:
    """Sizes of one run; ``--minutes`` scales the steps and the data, not the model."""

    minutes: float
    seq_length: int = 128
    batch: int = 8
    hidden_size: int = 128
    ffn_hidden_size: int = 384
    num_layers: int = 4
    base_lr: float = 3e-3
    upscale_lr: float = 1e-3
    realign_lr: float = 3e-3
    cpt1_lr: float = 3e-3
    cpt2_lr: float = 1e-3
    sft_lr: float = 3e-4
    base_iters: int = 0
    vision_iters: int = 0
    upscale_iters: int = 0
    realign_iters: int = 0
    cpt1_iters: int = 0
    cpt2_iters: int = 0
    sft_iters: int = 0
    n_test: int = 0

    @classmethod
    def for_minutes(cls, minutes: float) -> "MMPlan":
        s = minutes / DEFAULT_MINUTES
        # CPT stage 2 scales with the square root of the budget, the rest linearly: seeing is learned
        # there, so a short run keeps more of its steps
        # the encoder's pretraining stands for a pretrained Pixtral: it does not shrink with the budget
        # (150 steps, 7 s; at 50 steps a quarter of held-out squares got the wrong colour)
        return cls(minutes=minutes, base_iters=max(20, round(200 * s)), vision_iters=150,
                   upscale_iters=max(8, round(40 * s)),
                   realign_iters=max(8, round(60 * s)), cpt1_iters=max(12, round(400 * s)),
                   cpt2_iters=max(12, round(1500 * math.sqrt(s))), sft_iters=max(6, round(60 * s)),
                   n_test=100)  # scoring is cheap next to training: full-size intervals at every setting

    def sizes(self) -> Sizes:
        rows = self.batch
        return Sizes(train_pictures=max(400, (self.realign_iters + self.cpt1_iters) * rows),
                     stage2_pictures=max(400, self.cpt2_iters * rows // 2),
                     text_docs=max(400, (self.base_iters + self.upscale_iters + self.cpt1_iters) * rows),
                     sft=max(200, self.sft_iters * rows), n_test=self.n_test)


class MMDemo(Demo):
    """The text demo's plumbing (stages in fresh processes, done.json, logs) with this chain's stages."""

    # The verbs run in forked children, as the text demo's do: this process never joins the
    # torch.distributed world a conversion makes, so every training stage's ranks are forked from it
    # (a fresh torchrun process instead costs each stage its imports).
    def shown(self, verb: str) -> str:
        if verb == "synthetic-visual":
            return f"python {SYNTHETIC_VISUAL.relative_to(SYNTHETIC_VISUAL.parents[1])}"
        return super().shown(verb)

    def changes(self, layers: Optional[int] = None) -> dict:
        tok, p = self.figures["data"]["tokenizer"], self.plan
        return {"num_layers": layers or p.num_layers, "hidden_size": p.hidden_size,
                "ffn_hidden_size": p.ffn_hidden_size, "num_attention_heads": 4, "num_query_groups": 2,
                "kv_channels": 32, "rope_theta": 1e4, "vocab_size": tok["vocab_size"], "bos_token_id": 1,
                "eos_token_id": tok["eos_token_id"]}

    def cfg(self, stage: str, data: dict, iters: int, lr: float, freeze: list[str], load: Optional[Path] = None,
            saves: int = 1) -> dict:
        p = self.plan
        return {
            "model": {"preset": "tiny-llava", "changes": self.changes(p.num_layers if stage == "base"
                                                                      else p.num_layers + 1), "device": "cpu"},
            "data": {**data, "eod_token": self.figures["data"]["tokenizer"]["eos_token_id"]},
            "train": {"seq_length": p.seq_length, "micro_batch_size": p.batch, "global_batch_size": p.batch,
                      "train_iters": iters, "seed": 1234, "freeze": freeze,
                      "optim": {"lr": lr, "min_lr": lr / 10, "weight_decay": 0.01, "clip_grad": 1.0,
                                "use_distributed_optimizer": True},
                      "schedule": {"warmup_iters": max(1, iters // 20), "decay_style": "cosine"}},
            "checkpoint": {"save": str(self.d(stage) / "ckpt"), "load": str(load) if load else None,
                           "load_mode": "weights", "save_interval": max(1, iters // saves)},
            "logging": {"log_interval": max(1, iters // 10)},
        }

    def prefix(self, source: str) -> str:
        pp = self.d("preprocess")
        return str(pp / (f"{source}_text_document" if source in TEXT_SOURCES else source))

    def blend(self, stage: str, weights: dict, iters: int) -> dict:
        """``image-text-blend`` over text and image-text prefixes (packed rows, loss masks kept)."""
        spec = {"sources": [{"name": s, "weight": w, "prefixes": [self.prefix(s)]} for s, w in weights.items()],
                "seq_length": self.plan.seq_length, "steps": iters, "seed": 1234, "split": "99,1,0",
                "cache_dir": str(self.d(stage) / "index_cache")}
        return {"kind": "dataset", "factory": "image-text-blend",
                "factory_args": {"blend": spec, "global_batch_size": self.plan.batch, "pack": True,
                                 "pad_token_id": self.figures["data"]["tokenizer"]["pad_token_id"]}}

    def to_hf(self, stage: str, ckpt: Path, out: Path) -> None:
        self.call(stage, "convert", ["mcore-to-hf", "--ckpt", ckpt, "--out", out, "--tokenizer",
                                     self.d("data") / "tokenizer", "--chat-template", "apriel-1.5"])

    def evaluate(self, hf: Path, sampled: bool = False) -> dict:
        """Held-out accuracy per question kind and over the visual kinds, by ``apriel eval``."""
        hf_logging.disable_progress_bar()
        files = {k: self.d("data") / f"test_{k}.jsonl" for k in TASKS}
        settings = Settings(batch_size=64, chat_template="none")
        r = run([str(hf)], [f"choice_ll={p}" for p in files.values()], str(hf.parent / "eval.json"), settings,
                log=lambda *_: None)
        scores = r["results"][str(hf)]
        fam = {k: scores[f"test_{k}"]["acc"] for k in TASKS}
        se = {k: scores[f"test_{k}"]["acc_stderr"] for k in TASKS}
        vis = VISUAL_KINDS
        acc = sum(fam[k] for k in vis) / len(vis)
        # the kinds' question sets are independent and equal in size: the mean's standard error is
        # the root of the summed squared errors over the number of kinds
        acc_se = math.sqrt(sum(se[k] ** 2 for k in vis)) / len(vis)
        print(f"  held-out: visual {acc:.3f} (" + ", ".join(f"{k} {fam[k]:.2f}" for k in vis)
              + f"), text {fam['text']:.3f}; {scores['test_text']['records']} questions per kind", flush=True)
        return {"accuracy": acc, "accuracy_stderr": acc_se, "text_accuracy": fam["text"],
                "text_accuracy_stderr": se["text"], "families": {k: fam[k] for k in vis},
                "families_stderr": {k: se[k] for k in vis}, "eval_n": scores["test_text"]["records"]}

    def train_and_score(self, stage: str, cfg: dict, average: int = 0) -> dict:
        fig = self.train(stage, cfg)
        ckpt = self.d(stage) / "ckpt"
        if average:
            self.call(stage, "average", ["--equispaced", average, "--run-dir", ckpt, "--out", self.d(stage) / "avg"])
            ckpt = self.d(stage) / "avg"
        self.to_hf(stage, ckpt, self.d(stage) / "hf")
        return {**fig, **self.evaluate(self.d(stage) / "hf")}

    # ------------------------------------------------------------------ stages
    def s_data(self) -> dict:
        d = self.d("data")
        counts = make_all(d, self.plan.sizes())
        # CPT stage 2's synthetic tasks: the project's generator, on the drawn pictures and their boxes
        self.call("data", "synthetic-visual", [
            "--images", d / "stage2_raw", "--annotations", d / "stage2_coco.json",
            "--out", d / "synthetic"])
        counts["synthetic"] = json.loads((d / "synthetic" / "report.json").read_text())["samples"]
        for k, v in counts.items():
            print(f"  {k}: {v} records", flush=True)
        tok = train_tokenizer([d / f for f in ("text.jsonl", "words.jsonl", "captions.jsonl",
                                               "stage2_questions.jsonl", "synthetic/samples.jsonl")],
                              d / "tokenizer")
        print(f"  tokenizer: byte-level BPE, {tok['vocab_size']} tokens, [IMG] 10, [IMG_BREAK] 12, [IMG_END] 13, "
              f"eos <|end|> = {tok['eos_token_id']} -> {d / 'tokenizer'}", flush=True)
        return {"records": counts, "tokenizer": tok}

    def s_preprocess(self) -> dict:
        d, out, tok = self.d("data"), self.d("preprocess"), self.d("data") / "tokenizer"
        tokens = {}
        for s in TEXT_SOURCES:
            self.call("preprocess", "preprocess", [
                "--input", d / f"{s}.jsonl", "--output-prefix", out / s, "--tokenizer-type", "HuggingFaceTokenizer",
                "--tokenizer-model", tok, "--append-eod", "--workers", "0", "--strict"])
            tokens[s] = json.loads((out / f"{s}.stats.json").read_text()).get("tokens")
        inputs = {"captions": d / "captions.jsonl", "synthetic": d / "synthetic" / "samples.jsonl",
                  "stage2_questions": d / "stage2_questions.jsonl"}
        for s, path in inputs.items():
            self.call("preprocess", "preprocess-multimodal", [
                "--input", path, "--output-prefix", out / s, "--tokenizer-type", "HuggingFaceTokenizer",
                "--tokenizer-model", tok, "--image-size", 16, "--patch-size", 4, "--workers", 0,
                "--seq-length", self.plan.seq_length, "--log-interval", 0,
                # no BOS: scoring with raw prompts (--chat-template none) starts at the first image
                # token too, and the first position should read the same in training and scoring
                "--no-bos"])
            meta = json.loads((out / f"{s}_multimodal.json").read_text())
            tokens[s] = meta.get("tokens", meta.get("kept"))
        self.call("preprocess", "preprocess-sft", [
            "--input", d / "sft.jsonl", "--output-prefix", out / "sft", "--tokenizer-model", tok,
            "--chat-template", "apriel-1.5", "--seq-length", self.plan.seq_length * 2, "--log-interval", 100000])
        tokens["sft"] = json.loads((out / "sft_report.json").read_text())["tokens"]
        print("  tokens: " + ", ".join(f"{k} {v}" for k, v in tokens.items()), flush=True)
        return {"tokens": tokens}

    def s_base(self) -> dict:
        p = self.plan
        return self.train_and_score("base", self.cfg("base", self.blend("base", {"text": 70, "words": 30},
                                                                        p.base_iters),
                                                     p.base_iters, p.base_lr, ["vision_encoder", "projector"]))

    def s_vision(self) -> dict:
        fig = pretrain_encoder(self.d("base") / "hf", self.d("vision") / "hf", self.plan.vision_iters)
        return {**fig, **self.evaluate(self.d("vision") / "hf")}

    def s_upscale(self) -> dict:
        d, p = self.d("upscale"), self.plan
        self.call("upscale", "upscale", ["--hf", self.d("vision") / "hf", "--out", d / "upscaled_hf",
                                         "--duplicate-middle", 1])
        self.call("upscale", "convert", ["hf-to-mcore", "--hf", d / "upscaled_hf", "--out", d / "upscaled"])
        # upscale training: the base's own text as replay, vision encoder and projector frozen
        cfg = self.cfg("upscale", self.blend("upscale", {"text": 70, "words": 30}, p.upscale_iters),
                       p.upscale_iters, p.upscale_lr, ["vision_encoder", "projector"], load=d / "upscaled")
        return {"layers": f"{p.num_layers} -> {p.num_layers + 1}", **self.train_and_score("upscale", cfg)}

    def s_realign(self) -> dict:
        p = self.plan
        cfg = self.cfg("realign", self.blend("realign", {"captions": 100}, p.realign_iters), p.realign_iters,
                       p.realign_lr, ["vision_encoder", "embeddings", "decoder", "output_layer"],
                       load=self.d("upscale") / "ckpt")
        return self.train_and_score("realign", cfg)

    def s_cpt1(self) -> dict:
        p = self.plan
        cfg = self.cfg("cpt1", self.blend("cpt1", {"captions": 70, "text": 30}, p.cpt1_iters),
                       p.cpt1_iters, p.cpt1_lr, [], load=self.d("realign") / "ckpt", saves=3)
        return self.train_and_score("cpt1", cfg, average=3)

    def s_cpt2(self) -> dict:
        p = self.plan
        cfg = self.cfg("cpt2", self.blend("cpt2", {"stage2_questions": 50, "synthetic": 20, "text": 30}, p.cpt2_iters),
                       p.cpt2_iters, p.cpt2_lr, ["vision_encoder"], load=self.d("cpt1") / "avg")
        # the last checkpoint: the recipe averages stage 1, not stage 2 (an average of 3 equispaced
        # checkpoints would mix in early ones that have not learned to see yet)
        return self.train_and_score("cpt2", cfg)

    def s_sft(self, start: str, stage: str) -> dict:
        p = self.plan
        pad = self.figures["data"]["tokenizer"]["pad_token_id"]
        data = {"kind": "dataset", "factory": "sft",
                "factory_args": {"prefix": str(self.d("preprocess") / "sft"), "epochs": 1, "seed": 0, "pack": True,
                                 "pad_token_id": pad}}
        cfg = self.cfg(stage, data, p.sft_iters, p.sft_lr, ["vision_encoder"],
                       load=self.d(start) / ("avg" if start == "cpt1" else "ckpt"))
        cfg["train"]["seq_length"] = 2 * p.seq_length
        return {"from": start, **self.train_and_score(stage, cfg)}

    def stage_fn(self, name: str, method: Optional[str]):
        if name in SFT_STARTS:
            return lambda: self.s_sft(SFT_STARTS[name], name)
        return getattr(self, method)


SFT_STARTS = {"sft": "cpt2", "sft_no_stage2": "cpt1", "sft_text_only": "upscale"}
STAGES = [
    ("data", "drawn pictures, questions, text problems, synthetic visual tasks, BPE tokenizer", "s_data"),
    ("preprocess", "apriel preprocess / preprocess-multimodal / preprocess-sft", "s_preprocess"),
    ("base", "text base: tiny Llava, decoder trained on text (vision encoder, projector frozen)", "s_base"),
    ("vision", "the base's vision encoder pretrained on patch colours (Pixtral's comes pretrained)", "s_vision"),
    ("upscale", "depth upscaling 4 -> 5 layers, then training with replay", "s_upscale"),
    ("realign", "projector realignment on captions (vision encoder and decoder frozen)", "s_realign"),
    ("cpt1", "CPT stage 1: text + image captions, everything trainable; average of 3", "s_cpt1"),
    ("cpt2", "CPT stage 2: synthetic visual tasks + visual questions, encoder frozen", "s_cpt2"),
    ("sft", "text-only SFT (Apriel-1.5 format) from stage 2: the final model, HF", None),
    ("sft_no_stage2", "control: the same SFT from CPT stage 1 (no stage 2)", None),
    ("sft_text_only", "control: the same SFT from the upscaled text model (no image stages)", None),
]
SCORED = [s[0] for s in STAGES[2:]]


def effects(figures: dict) -> list[str]:
    g = figures.get
    out = []
    if all(k in figures for k in ("sft", "sft_no_stage2")):
        d = g("sft")["accuracy"] - g("sft_no_stage2")["accuracy"]
        out.append(f"stage 2 effect on held-out visual accuracy: {g('sft_no_stage2')['accuracy']:.3f} without -> "
                   f"{g('sft')['accuracy']:.3f} with ({d:+.3f}; chance {CHANCE:.2f})")
    if all(k in figures for k in ("sft", "sft_text_only")):
        out.append(f"text kept: held-out text accuracy {g('sft')['text_accuracy']:.3f} after the multimodal chain, "
                   f"{g('sft_text_only')['text_accuracy']:.3f} after the text-only chain")
    if "realign" in figures and "upscale" in figures:
        out.append(f"realignment: visual {g('upscale')['accuracy']:.3f} -> {g('realign')['accuracy']:.3f} "
                   "(projector only)")
    return out


def _ci(f: dict, key: str) -> str:
    if f.get(key) is None:
        return "-"
    lo, hi = interval(f[key], f.get(key + "_stderr", 0.0))
    return f"{f[key]:.3f} [{lo:.2f}, {hi:.2f}]"


def table(figures: dict) -> str:
    head = ("stage", "seconds", "loss", "visual acc [95% CI]", *VISUAL_KINDS, "text acc [95% CI]")
    rows = [head]
    for name, *_ in STAGES:
        f = figures.get(name, {})
        fam = f.get("families", {})
        rows.append((name, f"{f.get('seconds', 0):.0f}", "-" if f.get("loss") is None else f"{f['loss']:.3f}",
                     _ci(f, "accuracy"), *("-" if k not in fam else f"{fam[k]:.2f}" for k in VISUAL_KINDS),
                     _ci(f, "text_accuracy")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plot(figures: dict, path: Path) -> None:
    """Held-out accuracy per scored stage: each visual kind and text, with 95% intervals, chance marked."""
    import matplotlib  # deferred: only the plot needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = [s for s in SCORED if "accuracy" in figures.get(s, {})]
    groups = (*VISUAL_KINDS, "text")
    fig, ax = plt.subplots(figsize=(1.5 * len(stages) + 2, 3.6))
    w = 0.8 / len(groups)
    for i, grp in enumerate(groups):
        ys, lo, hi = [], [], []
        for s in stages:
            f = figures[s]
            acc = f["text_accuracy"] if grp == "text" else f["families"][grp]
            se = f["text_accuracy_stderr"] if grp == "text" else f["families_stderr"][grp]
            a, b = interval(acc, se)
            ys.append(acc)
            lo.append(acc - a)
            hi.append(b - acc)
        ax.bar([j + i * w for j in range(len(stages))], ys, w, label=grp, yerr=[lo, hi], capsize=2)
    ax.axhline(CHANCE, color="grey", linestyle=":", linewidth=1, label="chance")
    ax.set_xticks([j + w * (len(groups) - 1) / 2 for j in range(len(stages))], stages, fontsize=7)
    ax.set_ylabel("held-out accuracy")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7, ncol=len(groups) + 1)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


def write_report(out: Path, plan: dict, figures: dict, wall: float) -> str:
    summary = {"plan": plan, "stages": figures, "wall_seconds": round(wall, 1), "effects": effects(figures)}
    tmp = out / "demo_summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    tmp.replace(out / "demo_summary.json")
    plot(figures, out / "accuracy.png")
    return "\n".join([table(figures), "", *effects(figures),
                      f"wall time {wall:.0f} s; {out / 'demo_summary.json'}, {out / 'accuracy.png'}"])


def run_demo(out: Path, minutes: float, force: bool) -> int:
    if minutes <= 0:
        raise InputError(f"--minutes must be positive, got {minutes}")
    if not SYNTHETIC_VISUAL.is_file():  # CPT stage 2's generator is a script of the source tree
        raise InputError(f"{SYNTHETIC_VISUAL}: missing; the multimodal demo runs from a source checkout")
    out.mkdir(parents=True, exist_ok=True)
    plan = MMPlan.for_minutes(minutes)
    prev = out / "plan.json"
    if prev.is_file() and not force and json.loads(prev.read_text()) != asdict(plan):
        raise InputError(f"{out} holds a run with other sizes ({prev}); pass --force or another --out")
    prev.write_text(json.dumps(asdict(plan), indent=2) + "\n")
    print(f"apriel demo --multimodal -> {out}: tiny Llava (decoder hidden {plan.hidden_size}, {plan.num_layers} -> "
          f"{plan.num_layers + 1} layers; Pixtral encoder 2 layers, 16x16 pictures at patch 4); steps: base "
          f"{plan.base_iters}, vision encoder {plan.vision_iters}, upscale {plan.upscale_iters}, "
          f"realign {plan.realign_iters}, CPT1 {plan.cpt1_iters}, "
          f"CPT2 {plan.cpt2_iters}, SFT {plan.sft_iters} x 3; {plan.n_test} held-out questions per kind", flush=True)
    demo = MMDemo(out, plan, force)
    for i, (name, what, method) in enumerate(STAGES, 1):
        demo.stage(i, len(STAGES), name, what, demo.stage_fn(name, method))
    text = write_report(out, asdict(plan), demo.figures, time.time() - demo.t0)
    print("\n" + text)
    return 0


def _synthetic_visual(argv: list[str]) -> int:
    """``data_prep/synthetic_visual.py``'s main: a script beside the package, loaded from its file."""
    spec = importlib.util.spec_from_file_location("synthetic_visual", SYNTHETIC_VISUAL)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module.main(argv)


def _preprocess_multimodal(argv: list[str]) -> int:
    from megatron_apriel.data import preprocess_multimodal  # deferred: only the preprocess stage needs it

    return preprocess_multimodal.main(argv)


# the verbs this chain adds to those the text demo runs in its own process
MM_IN_PROCESS = {**IN_PROCESS, "preprocess-multimodal": _preprocess_multimodal, "synthetic-visual": _synthetic_visual}
MMDemo.verbs = MM_IN_PROCESS
