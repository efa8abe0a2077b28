"""The demo's recipe: its sizes (``Plan``), its stages and how each runs (``Demo``).

make sources -> tokenizer -> preprocess -> pretrain base -> depth upscale (4 -> 5 layers, the
40 -> 50 plan scaled down) -> CPT on the 60/25/15 blend -> average of 3 equispaced checkpoints
-> HF -> SFT generalist on every family (chat template, loss on answers) -> specialists A
(addition, comparison) and B (subtraction, comparison), short fine-tunes of the generalist ->
merge C = 0.5 A + 0.5 B ->
GRPO on C with the format and math rewards (checkpoints F, G) -> final = 0.3 C + 0.3 F + 0.4 G ->
generate.

Each stage is the project's own tool, run as ``python -m megatron_apriel.<module>`` in a fresh
process (megatron-core keeps global state per process), with its output streamed. Each stage
writes into ``<out>/<stage>/`` and finishes by writing ``done.json`` (its figures); a rerun skips
stages that have it unless ``--force``. What the figures show is ``report.py``'s business.

The demo uses every core it is given (``cores.py``): megatron-core training runs data-parallel
over them, the two specialists train side by side, and the evaluations of the merge and of GRPO
run beside the next stage. On one core everything runs in turn, as the same recipe.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import yaml
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from megatron_apriel.checkpoint import average, convert, upscale
from megatron_apriel.config import load_config
from megatron_apriel.data import preprocess, preprocess_sft
from megatron_apriel.demo.card import write_demo_card
from megatron_apriel.demo.cores import Forked, Ranks, can_fork, data_parallel, given_cores, launcher
from megatron_apriel.demo.data import KINDS, make_sources, train_tokenizer
from megatron_apriel.demo.evaluate import evaluate, load_test, paired_difference
from megatron_apriel.demo.report import brief
from megatron_apriel.errors import RunError
from megatron_apriel.training import loop, mix_report
from megatron_apriel.training.config import TrainConfig
from megatron_apriel.training.plan import make_plan

DONE = "done.json"
SOURCES = ("reasoning", "cot", "replay")
CPT_WEIGHTS = {"reasoning": 60, "cot": 25, "replay": 15}
BASE_WEIGHTS = {"reasoning": 60, "cot": 20, "replay": 20}  # a base model that already knows the arithmetic
# The recipe's SFT: a generalist on every family, then specialists fine-tuned briefly from it on
# their own family with a replay of the others. Two short fine-tunes of one model stay close in
# weight space, so their average keeps nearly all of each; two long SFTs from the CPT model each
# went their own way (their 0.5/0.5 merge kept about 70% of the better one's accuracy per family).
# Every set is one epoch of fresh problems: more epochs over fewer problems fit the training set
# and generalise less (3 epochs reached 0.73 held-out, 8 epochs 0.68, at the same step count).
SFT_SETS = {  # name: (kinds in turn, the checkpoint it starts from)
    "sft": (KINDS, "average"),
    # comparison, whose answer is a copy of whichever operand is larger, is the family the
    # generalist learns last: both specialists give it 2/5 of their problems
    "sft_a": (("add", "compare", "add", "compare", "sub"), "sft"),
    "sft_b": (("sub", "compare", "sub", "compare", "add"), "sft"),
}
CONVERSATIONS_PER_ROW = 4.5  # a 256-token packed row holds 4-5 of the demo's conversations


# The verbs the demo runs in this process, by their main (the apriel dispatcher lies above the demo)
IN_PROCESS = {"preprocess": preprocess.main, "preprocess-sft": preprocess_sft.main, "mix-report": mix_report.main,
              "upscale": upscale.main, "convert": convert.main, "average": average.main}

# The tools the demo forks from this process as training ranks, by module (``Demo.run``)
FORKED_MAINS = {"megatron_apriel.train": loop.main}

# One thread per process unless OMP_NUM_THREADS says otherwise: the demo's model is too small for
# a second thread to pay, so further cores go to further processes (data-parallel training, work
# side by side: ``cores.py``). Measured: GRPO's generation-bound steps (20 of 4 prompts x 8
# completions) 88 s with two threads on a loaded machine, 18 s with one; SFT steps 205 ms with
# two, 191 ms with one, 133 ms as two data-parallel processes of one thread (same losses);
# pretraining steps 106-116 ms with two threads, 134 ms with one.
THREADS = "1"
# Problems per generate() call of an evaluation: a tiny model's decoding step costs about the same
# at 64 or 256 sequences. Measured on 510 problems, CPU seconds: greedy 6.4 at 64, 4.6 at 256;
# four sampled answers each 24.7 at 64, 19.8 at 256.
EVAL_BATCH = 256
# Stages that need only what came before them and not each other: run side by side, on a share of
# the cores each, where there are two or more.
SIDE_BY_SIDE = (("sft_a", "sft_b"),)
# Stages of one process: the evaluations left for later run beside them, on the other core
ONE_PROCESS = ("grpo", "final", "generate")

GRPO_PROMPTS_PER_STEP, GRPO_GENERATIONS, GRPO_TEMPERATURE = 8, 8, 0.7
# Sampled answers per held-out problem around GRPO: the paired difference over problems of one
# answer each had an interval of +-0.047; more answers per problem narrow it.
SAMPLED_ANSWERS = 4


class DemoError(RunError):
    """A stage failed: its command, exit status and the last lines of its log."""


@dataclass
class Later:
    """An evaluation of ``hf`` left for later (``Demo.evaluate_later``): it runs as item ``index``
    of the forked ``batch``."""

    hf: Path
    sampled: bool = False
    then: Optional[Callable[[], dict]] = None
    batch: Optional[Forked] = None
    index: int = 0


@dataclass
class Plan:
    """Sizes of one run; ``--minutes`` scales the steps and the data, not the model.

    Small batches and many steps: a tiny model learns the digit facts and the fixed-offset copies
    of the traces per step far more than per token. Measured on SFT alone from scratch (hidden 128,
    5 layers): 150 steps of 16 packed rows reached 3% held-out accuracy, 600 steps of 4 rows (the
    same tokens) 25%. In the demo the generalist SFT reached 0.67 after 1100 steps of 4 rows and
    0.80 after 1400 (the rest of the run unchanged): the steps go to SFT. SFT at lr 2e-3 instead
    of 1e-3: 0.58 after 1100 steps. GRPO (30 steps of 8 prompts x 8) at temperature 1.0 left the
    held-out accuracy of answers sampled at that temperature where it was (0.594 -> 0.588); at 0.7
    it raised it (one answer per problem: 0.684 -> 0.727, paired +0.043 [-0.004, +0.090]; four:
    0.694 -> 0.716, paired +0.023 [+0.001, +0.044]; greedy 0.857 -> 0.863). At lr 5e-5 instead of 2e-5 greedy
    accuracy fell (0.78 -> 0.72); two optimisation passes per batch at 3e-5: 0.857 -> 0.798.
    """

    minutes: float
    seq_length: int = 128  # pretraining and CPT (documents of a few problems)
    sft_seq_length: int = 256  # packed conversations
    global_batch_size: int = 8
    micro_batch_size: int = 8
    hidden_size: int = 128
    ffn_hidden_size: int = 384
    num_layers: int = 4
    rope_theta: float = 1e4  # 128-token documents: the long-context base of the real presets is no help here
    pretrain_lr: float = 3e-3
    cpt_lr: float = 1e-3
    sft_lr: float = 1e-3
    spec_lr: float = 3e-4  # the specialists: a short fine-tune that stays near the generalist
    grpo_lr: float = 2e-5  # 1e-4 took the merge from 0.55 to 0.37 held-out accuracy in 20 steps
    pretrain_iters: int = 0
    cpt_iters: int = 0
    cpt_saves: int = 6
    sft_iters: int = 0
    spec_iters: int = 0
    sft_batch: int = 4
    grpo_steps: int = 0
    grpo_prompts: int = 0
    n_test: int = 0

    @classmethod
    def for_minutes(cls, minutes: float) -> "Plan":
        s = minutes / 12.0
        # SFT steps scale with the square root of the budget, the others linearly: accuracy comes
        # from SFT steps, so a short run keeps more of them
        r = math.sqrt(s)
        return cls(minutes=minutes, pretrain_iters=max(12, round(450 * s)), cpt_iters=max(12, round(150 * s)),
                   sft_iters=max(6, round(1400 * r)), spec_iters=max(4, round(100 * r)),
                   grpo_steps=max(2, 2 * round(15 * s)),
                   grpo_prompts=max(GRPO_PROMPTS_PER_STEP, round(GRPO_PROMPTS_PER_STEP * 30 * s)),
                   n_test=max(48, min(510, 3 * round(170 * s))))

    def model_changes(self, vocab_size: int, eos_token_id: int, num_layers: Optional[int] = None) -> dict:
        return {"num_layers": num_layers or self.num_layers, "hidden_size": self.hidden_size,
                "ffn_hidden_size": self.ffn_hidden_size, "num_attention_heads": 4, "num_query_groups": 2,
                "kv_channels": 32, "rope_theta": self.rope_theta, "vocab_size": vocab_size, "bos_token_id": 1,
                "eos_token_id": eos_token_id}


class Demo:
    def __init__(self, out: Path, plan: Plan, force: bool, cores: Optional[int] = None):
        self.out, self.plan, self.force = out, plan, force
        # the evaluations and conversions that run in this process: the same one thread
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or THREADS))
        # the cores the current stage may use: all of them, or a share in a side-by-side child
        self.cores = cores or given_cores()
        self.figures: dict[str, dict] = {}
        # evaluations are left for later (a free core) where cores can be shared
        self.later = self.cores >= 2 and can_fork()
        self.redoing = False  # a stage was redone: every later one is redone too
        # stages whose model is made and whose evaluation is left for later: name -> (figures,
        # the evaluation, the stage's seconds so far, its number)
        self.pending: dict[str, tuple[dict, Later, float, int]] = {}
        self.t0 = time.time()

    # ------------------------------------------------------------------ plumbing
    def d(self, stage: str) -> Path:
        return self.out / stage

    def run(self, stage: str, module: str, args: list[str], processes: int = 1) -> None:
        """``python -m module args`` with its output streamed (indented) and kept in <stage>/log.txt;
        with ``processes`` > 1, the world ``torchrun --nproc-per-node=processes`` would start. The
        training tool's ranks are forked from this process (``cores.Ranks``: its imports are done)."""
        args = [str(a) for a in args]
        cmd = [*launcher(processes), "-m", module, *args]
        shown = "python" if processes == 1 else f"torchrun --nproc-per-node={processes}"
        print(f"  $ apriel-demo: {shown} -m {module} {' '.join(args)}", flush=True)
        env = {"OMP_NUM_THREADS": THREADS, **os.environ, "PYTHONUNBUFFERED": "1"}
        log = self.d(stage) / "log.txt"
        with open(log, "a", encoding="utf-8") as f:
            f.write("$ " + " ".join(cmd) + "\n")
            ranks = None
            if module in FORKED_MAINS and can_fork() and not torch.distributed.is_initialized():
                ranks = Ranks(FORKED_MAINS[module], args, processes, env)
                lines, finish = ranks.lines(), ranks.wait
            else:
                proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
                lines, finish = proc.stdout, proc.wait
            tail: list[str] = []
            try:
                for line in lines:
                    f.write(line)
                    tail = (tail + [line.rstrip()])[-30:]
                    if _worth_showing(line):
                        print("    " + line.rstrip()[:160], flush=True)
            except BaseException:  # stopped (SIGTERM, Ctrl-C): forked ranks stop with it
                if ranks is not None:
                    ranks.stop()
                raise
            code = finish()
        if code != 0:
            raise DemoError(f"stage {stage}: python -m {module} exited with {code}; last lines:\n"
                            + "\n".join(tail) + f"\n(full log: {log})")

    def call(self, stage: str, verb: str, args: list) -> None:
        """An ``apriel VERB`` in a fork of this process: for the tools that keep no global state
        (data tools, conversion, upscaling, averaging), which saves a Python start-up and imports
        per call. Forked, so that this process never joins the torch.distributed world of one that
        conversion makes, and can still fork training ranks (``run``)."""
        args = [str(a) for a in args]
        shown = self.shown(verb)
        print(f"  $ {shown} {' '.join(args)}", flush=True)
        with open(self.d(stage) / "log.txt", "a", encoding="utf-8") as f:
            f.write(f"$ {shown} {' '.join(args)}\n")
        code = Forked(lambda: self.verbs[verb](args), None, _failed).result()
        if code != 0:
            raise DemoError(f"stage {stage}: {shown} exited with {code} (see the lines above)")

    verbs = IN_PROCESS  # what ``call`` runs, by verb

    def shown(self, verb: str) -> str:
        """How the log shows a verb's command."""
        return f"apriel {verb}"

    def done_before(self, i: int, n: int, name: str) -> bool:
        """Whether a rerun skips the stage: it has its figures, and so has every stage before it (a
        stage redone means every later one is redone: an evaluation that runs beside later stages
        can fail after they are done)."""
        done = self.d(name) / DONE
        if self.redoing or not done.is_file() or self.force:
            self.redoing = True
            return False
        self.figures[name] = json.loads(done.read_text())
        print(f"[{i}/{n}] {name}: done before, skipped ({brief(self.figures[name])}; --force to redo)", flush=True)
        return True

    def stage(self, i: int, n: int, name: str, what: str, fn: Callable[[], dict]) -> None:
        """Run one stage unless it is done. ``fn`` may leave its evaluation for later (``later``,
        see ``evaluate_later``): the stage is then finished by ``settle``."""
        if self.done_before(i, n, name):
            return
        folder = self.d(name)
        if folder.exists():  # an unfinished or forced stage starts clean
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        print(f"\n[{i}/{n}] {name}: {what}  (demo time {time.time() - self.t0:.0f} s)", flush=True)
        start = time.time()
        figures = fn()
        later = figures.pop("later", None)
        if later is None:
            self.finish(i, n, name, figures, time.time() - start)
        else:
            print(f"[{i}/{n}] {name}: model made; it is evaluated beside a stage that leaves a core free",
                  flush=True)
            self.pending[name] = (figures, later, time.time() - start, i)

    def evaluate_queued(self, beside: Optional[str] = None) -> None:
        """Start the evaluations left for later, one after another in one forked child, beside
        ``beside`` (a stage of one process: the child has the other core)."""
        queued = {name: p[1] for name, p in self.pending.items() if p[1].batch is None}
        if not queued:
            return
        where = f"run beside {beside}" if beside else "run now"
        print(f"\n  evaluations of {', '.join(queued)} {where}", flush=True)
        batch = Forked.each([(f"{name} evaluation", self.evaluation(job)) for name, job in queued.items()], _failed)
        for k, job in enumerate(queued.values()):
            job.batch, job.index = batch, k

    def settle(self, *names: str) -> None:
        """Wait for the evaluations of ``names`` (every pending stage if none) and finish those stages."""
        for name in [k for k in self.pending if not names or k in names]:
            if self.pending[name][1].batch is None:
                self.evaluate_queued()
            figures, later, seconds, i = self.pending.pop(name)
            extra = later.batch.result()[later.index]
            self.finish(i, len(STAGES), name, {**figures, **extra}, seconds + extra.pop("seconds"))

    def finish(self, i: int, n: int, name: str, figures: dict, seconds: float) -> None:
        figures["seconds"] = round(seconds, 1)
        done = self.d(name) / DONE
        tmp = done.with_name(DONE + ".tmp")
        tmp.write_text(json.dumps(figures, indent=2) + "\n")
        tmp.replace(done)
        self.figures[name] = figures
        print(f"[{i}/{n}] {name}: {brief(figures)}", flush=True)

    def run_stages(self, stages: list[tuple[str, str, Optional[str]]]) -> None:
        """Every stage in order; a group of ``SIDE_BY_SIDE`` runs at once, a forked child per
        stage on an equal share of the cores, where there are cores to share; the evaluations left
        for later run beside the first stage of ``ONE_PROCESS`` that comes."""
        n, order = len(stages), {s[0]: i for i, s in enumerate(stages, 1)}
        groups = {g[0]: g for g in SIDE_BY_SIDE}
        skip: set[str] = set()
        for i, (name, what, method) in enumerate(stages, 1):
            if name in skip:
                continue
            group = groups.get(name, (name,))
            skip.update(group)
            todo = [g for g in group if not self.done_before(order[g], n, g)]
            if name in ONE_PROCESS and todo:
                self.evaluate_queued(name)
            if len(todo) < 2 or self.cores < 2 or not can_fork():
                for g in todo:
                    self.stage(order[g], n, g, stages[order[g] - 1][1], self.stage_fn(g, stages[order[g] - 1][2]))
                continue
            share = max(1, self.cores // len(todo))
            print(f"\n{' and '.join(todo)} side by side, {share} core(s) each", flush=True)
            children = [Forked(self._side(order[g], n, g, stages[order[g] - 1][1], stages[order[g] - 1][2], share),
                               g, _failed) for g in todo]
            for g, child in zip(todo, children):
                left = child.result()  # an evaluation the child left for later is this process's to run
                if left is None:
                    self.figures[g] = json.loads((self.d(g) / DONE).read_text())
                else:
                    figures, hf, sampled, seconds, k = left
                    self.pending[g] = (figures, Later(Path(hf), sampled), seconds, k)
        self.settle()

    def _side(self, i: int, n: int, name: str, what: str, method: Optional[str], cores: int) -> Callable[[], tuple]:
        def go() -> Optional[tuple]:
            self.cores = cores
            self.stage(i, n, name, what, self.stage_fn(name, method))
            if name not in self.pending:
                return None
            figures, job, seconds, k = self.pending[name]
            return figures, str(job.hf), job.sampled, seconds, k
        return go

    def meta(self, key: str):
        return self.figures[key]

    def changes(self, layers: Optional[int] = None) -> dict:
        tok = self.figures["data"]["tokenizer"]
        return self.plan.model_changes(tok["vocab_size"], tok["eos_token_id"], layers)

    def train(self, stage: str, cfg: dict) -> dict:
        """One training run of the stage. Its run plan is made here first, as ``apriel train`` makes
        it (a config the run would refuse stops the demo before it starts a process); the run writes
        ``apriel_model.yaml`` beside its checkpoints, which ``convert mcore-to-hf`` reads."""
        # data-parallel over the cores: each process takes its slice of the same global batch
        processes, cfg["train"]["micro_batch_size"] = data_parallel(self.cores, cfg["train"]["micro_batch_size"])
        path = self.d(stage) / "train.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        plan = make_plan(load_config(TrainConfig, path), world=processes)
        self.run(stage, "megatron_apriel.train", ["--config", path], processes=processes)
        losses = _losses(Path(plan.cfg.checkpoint.save) / "logs" / "metrics.jsonl")
        k = max(1, len(losses) // 10)
        return {"loss": sum(loss for _, loss in losses[-k:]) / k, "first_loss": losses[0][1] if losses else None,
                "iterations": len(losses), "loss_curve": losses}

    def to_hf(self, stage: str, ckpt: Path, out: Path) -> None:
        self.call(stage, "convert", ["mcore-to-hf", "--ckpt", ckpt, "--out", out, "--tokenizer",
                                     self.d("data") / "tokenizer", "--chat-template", "apriel"])

    def evaluate_later(self, hf: Path, sampled: bool = False, then: Optional[Callable[[], dict]] = None) -> dict:
        """``evaluate`` (and ``then()``'s figures), left for later where there are cores to share
        (``run_stages`` starts it beside a stage of one process; the figures hold ``later``), else
        at once. The training stages leave both cores to their ranks; GRPO and the final merge
        each leave one free, long enough for every evaluation before them."""
        job = Later(hf, sampled, then)
        if not self.later:
            figures = self.evaluation(job)()
            figures.pop("seconds")
            return figures
        return {"later": job}

    def evaluation(self, job: Later) -> Callable[[], dict]:
        def go() -> dict:
            start = time.time()
            figures = self.evaluate(job.hf, job.sampled)
            return {**figures, **(job.then() if job.then else {}), "seconds": time.time() - start}
        return go

    def evaluate(self, hf: Path, sampled: bool = False) -> dict:
        """Greedy held-out figures; with ``sampled`` also the accuracy of ``SAMPLED_ANSWERS`` answers
        per problem sampled at GRPO's temperature, the held-out counterpart of the reward GRPO raises."""
        tests = {k: self.d("data") / f"test_{k}.jsonl" for k in KINDS}
        extra = {}
        if sampled:
            t = evaluate(hf, tests, results=hf.parent / "eval_sampled.json", temperature=GRPO_TEMPERATURE,
                         samples=SAMPLED_ANSWERS, batch_size=EVAL_BATCH)
            extra = {"sampled_accuracy": t["accuracy"], "sampled_accuracy_stderr": t["accuracy_stderr"]}
            print(f"  held-out, sampled at temperature {GRPO_TEMPERATURE:g}: accuracy {t['accuracy']:.3f}", flush=True)
        r = evaluate(hf, tests, results=hf.parent / "eval.json", batch_size=EVAL_BATCH)
        s = r["samples"][0]
        print(f"  held-out: accuracy {r['accuracy']:.3f} ("
              + ", ".join(f"{k} {v:.3f}" for k, v in r["families"].items())
              + f"), format-reward rate {r['format_rate']:.3f} on {r['n']} problems; "
              f"e.g. {s['question']!r} -> {s['completion'][:120]!r}", flush=True)
        return {"accuracy": r["accuracy"], "accuracy_stderr": r["accuracy_stderr"], "format_rate": r["format_rate"],
                "families": r["families"], "families_stderr": r["families_stderr"], "eval_n": r["n"],
                "eval_samples": r["samples"], **extra}

    def train_cfg(self, save: Path, data: dict, iters: int, lr: float, min_lr: Optional[float] = None,
                  layers: Optional[int] = None,
                  load: Optional[Path] = None, save_interval: Optional[int] = None, mbs: Optional[int] = None,
                  gbs: Optional[int] = None, seq: Optional[int] = None) -> dict:
        p = self.plan
        return {
            "model": {"preset": "tiny", "changes": self.changes(layers), "device": "cpu"},
            "data": {**data, "eod_token": self.figures["data"]["tokenizer"]["eos_token_id"]},
            "train": {"seq_length": seq or p.seq_length, "micro_batch_size": mbs or p.micro_batch_size,
                      "global_batch_size": gbs or p.global_batch_size, "train_iters": iters, "seed": 1234,
                      "optim": {"lr": lr, "min_lr": lr / 10 if min_lr is None else min_lr, "weight_decay": 0.01,
                                "clip_grad": 1.0, "use_distributed_optimizer": True},
                      "schedule": {"warmup_iters": max(1, iters // 20), "decay_style": "cosine"}},
            "checkpoint": {"save": str(save), "load": str(load) if load else None, "load_mode": "weights",
                           "save_interval": save_interval},
            "logging": {"log_interval": max(1, iters // 10)},
        }

    def blend(self, stage: str, weights: dict, iters: int) -> dict:
        pre = self.d("preprocess")
        return {"kind": "blend", "blend": {
            "sources": [{"name": s, "weight": weights[s], "prefixes": [str(pre / f"{s}_text_document")]}
                        for s in SOURCES],
            "seq_length": self.plan.seq_length, "steps": iters, "seed": 1234, "split": "99,1,0",
            "cache_dir": str(self.d(stage) / "index_cache")}}

    # ------------------------------------------------------------------ stages
    def s_data(self) -> dict:
        p = self.plan
        d = self.d("data")
        sft = {name: (math.ceil(self.sft_iters(name) * p.sft_batch * CONVERSATIONS_PER_ROW), kinds)
               for name, (kinds, _) in SFT_SETS.items()}
        counts = make_sources(d, n_reasoning_docs=max(200, p.pretrain_iters * 8),
                              n_cot_docs=max(100, p.pretrain_iters * 4),
                              replay_chars=max(200_000, p.pretrain_iters * 5_000),
                              sft=sft, n_grpo=p.grpo_prompts, n_test=p.n_test)
        for k, v in counts.items():
            print(f"  {k}: {v} records -> {d / (k + '.jsonl')}", flush=True)
        tok = train_tokenizer([d / f"{s}.jsonl" for s in SOURCES], d / "tokenizer")
        print(f"  tokenizer: byte-level BPE, {tok['vocab_size']} tokens, eos <|end|> = {tok['eos_token_id']} "
              f"-> {d / 'tokenizer'}", flush=True)
        return {"records": counts, "tokenizer": tok}

    def s_preprocess(self) -> dict:
        d, out, tok = self.d("data"), self.d("preprocess"), self.d("data") / "tokenizer"

        def text() -> None:
            for s in SOURCES:
                self.call("preprocess", "preprocess", [
                    "--input", d / f"{s}.jsonl", "--output-prefix", out / s, "--tokenizer-type",
                    "HuggingFaceTokenizer", "--tokenizer-model", tok, "--append-eod", "--workers", "0", "--strict"])
        # the pretraining text beside the SFT sets where there is a second core
        beside = Forked(text, None, _failed) if self.cores >= 2 and can_fork() else None
        for s in SFT_SETS:
            self.call("preprocess", "preprocess-sft", [
                "--input", d / f"{s}.jsonl", "--output-prefix", out / s, "--tokenizer-model", tok,
                "--seq-length", self.plan.sft_seq_length, "--log-interval", 100000])
        if beside:
            beside.result()
        else:
            text()
        tokens = {**{s: json.loads((out / f"{s}.stats.json").read_text()).get("tokens") for s in SOURCES},
                  **{s: json.loads((out / f"{s}_report.json").read_text())["tokens"] for s in SFT_SETS}}
        print("  tokens: " + ", ".join(f"{k} {v}" for k, v in tokens.items()), flush=True)
        return {"tokens": tokens}

    def s_pretrain(self) -> dict:
        p, d = self.plan, self.d("pretrain")
        fig = self.train("pretrain", self.train_cfg(d / "ckpt", self.blend("pretrain", BASE_WEIGHTS, p.pretrain_iters),
                                                   p.pretrain_iters, lr=p.pretrain_lr))
        self.to_hf("pretrain", d / "ckpt", d / "hf")
        return {**fig, **self.evaluate_later(d / "hf")}

    def s_upscale(self) -> dict:
        d = self.d("upscale")
        self.call("upscale", "upscale", [
            "--hf", self.d("pretrain") / "hf", "--out", d / "hf", "--duplicate-middle", 1])
        self.call("upscale", "convert", ["hf-to-mcore", "--hf", d / "hf", "--out", d / "mcore"])
        losses = self.upscale_losses(d / "hf")
        print(f"  loss on CPT-blend text: base {losses['base_loss']:.3f}, upscaled {losses['upscaled_loss']:.3f}, "
              f"from scratch (same size) {losses['scratch_loss']:.3f}", flush=True)
        return {"layers": f"{self.plan.num_layers} -> {self.plan.num_layers + 1}", **losses}

    def upscale_losses(self, upscaled: Path, n_docs: int = 16) -> dict:
        """Mean next-token loss of the base, the upscaled and a freshly initialised model of the
        upscaled size on the same documents of each CPT source: the upscaled model should start
        where the base ended, not where a new model starts."""
        tok = AutoTokenizer.from_pretrained(self.d("data") / "tokenizer")
        texts = [r["text"] for s in SOURCES for r in load_test(self.d("data") / f"{s}.jsonl", n_docs)]
        batch = tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=self.plan.seq_length)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        torch.manual_seed(0)
        models = {"base_loss": AutoModelForCausalLM.from_pretrained(self.d("pretrain") / "hf"),
                  "upscaled_loss": AutoModelForCausalLM.from_pretrained(upscaled),
                  "scratch_loss": AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(upscaled))}
        with torch.no_grad():
            return {k: round(float(m(**batch, labels=labels).loss), 4) for k, m in models.items()}

    def s_cpt(self) -> dict:
        p, d = self.plan, self.d("cpt")
        every = max(1, p.cpt_iters // p.cpt_saves)
        cfg = self.train_cfg(d / "ckpt", self.blend("cpt", CPT_WEIGHTS, p.cpt_iters), p.cpt_iters, lr=p.cpt_lr,
                             layers=p.num_layers + 1, load=self.d("upscale") / "mcore", save_interval=every)
        fig = self.train("cpt", cfg)
        # the curriculum as drawn, not as asked for: the blend's realised shares over the stage
        self.call("cpt", "mix-report", [d / "train.yaml", "--json", d / "mix.json", "--png", d / "mix.png"])
        rows = json.loads((d / "mix.json").read_text())["sources"]
        return {**fig, "mix": {r["source"]: {"target": r["target"], "share": r["share_stage"], "epochs": r["epochs"]}
                               for r in rows}}

    def s_average(self) -> dict:
        d = self.d("average")
        self.call("average", "average", [
            "--equispaced", 3, "--run-dir", self.d("cpt") / "ckpt", "--out", d / "mcore"])
        self.to_hf("average", d / "mcore", d / "hf")
        return self.evaluate_later(d / "hf")

    def sft_iters(self, name: str) -> int:
        return self.plan.sft_iters if name == "sft" else self.plan.spec_iters

    def s_sft(self, name: str) -> Callable[[], dict]:
        def go() -> dict:
            p, d = self.plan, self.d(name)
            start = SFT_SETS[name][1]
            data = {"kind": "dataset", "factory": "sft",
                    "factory_args": {"prefix": str(self.d("preprocess") / name), "epochs": 1, "seed": 0,
                                     "pack": True, "pad_token_id": self.figures["data"]["tokenizer"]["pad_token_id"]}}
            fig = self.train(name, self.train_cfg(
                d / "ckpt", data, self.sft_iters(name), lr=p.sft_lr if name == "sft" else p.spec_lr,
                layers=p.num_layers + 1, load=self.d(start) / ("mcore" if start == "average" else "ckpt"),
                mbs=p.sft_batch, gbs=p.sft_batch, seq=p.sft_seq_length))
            self.to_hf(name, d / "ckpt", d / "hf")
            return {**fig, **self.evaluate_later(d / "hf")}
        return go

    def s_merge(self) -> dict:
        d = self.d("merge")
        self.call("merge", "average", [
            self.d("sft_a") / "hf", self.d("sft_b") / "hf", "--weights", 0.5, 0.5, "--out", d / "hf"])
        return self.evaluate_later(d / "hf", sampled=True)

    def s_grpo(self) -> dict:
        p, d = self.plan, self.d("grpo")
        cfg = {
            "out_dir": str(d / "run"),
            "model": {"path": str(self.d("merge") / "hf"), "dtype": "float32", "chat_template": "apriel"},
            "data": {"train_file": str(self.d("data") / "grpo_prompts.jsonl")},
            "grpo": {"num_generations": GRPO_GENERATIONS, "beta": 0.0, "epsilon": 0.2, "max_completion_length": 72,
                     "temperature": GRPO_TEMPERATURE, "learning_rate": p.grpo_lr,
                     "per_device_train_batch_size": GRPO_PROMPTS_PER_STEP * GRPO_GENERATIONS,
                     "gradient_accumulation_steps": 1, "max_steps": p.grpo_steps, "save_steps": p.grpo_steps // 2,
                     "save_only_model": True, "logging_steps": 1, "use_vllm": "false",
                     "gradient_checkpointing": False, "report_to": "none", "seed": 1234},
            "rewards": {"domains": {"math": {"format": 0.2, "math": 0.8}}},
        }
        path = d / "grpo.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        self.run("grpo", "megatron_apriel.rl.grpo", ["--config", path])
        state = json.loads((d / "run" / f"checkpoint-{p.grpo_steps}" / "trainer_state.json").read_text())
        hist = [h for h in state["log_history"] if "reward" in h]
        curve = [(h["step"], h.get("loss", 0.0)) for h in hist]
        rewards = [(h["step"], h["reward"]) for h in hist]
        q = max(1, len(rewards) // 4)  # one step's reward is a few prompts: compare quarters of the run
        self.settle()  # the paired difference below needs the merge's answers (evaluated beside GRPO)

        def paired() -> dict:
            return {"sampled_paired_difference": paired_difference(self.d("merge") / "eval_sampled.json",
                                                                   d / "run" / "eval_sampled.json")}
        # beside the final merge, which needs only the checkpoints
        held_out = self.evaluate_later(d / "run" / f"checkpoint-{p.grpo_steps}", sampled=True, then=paired)
        return {"loss": curve[-1][1] if curve else None, "loss_curve": curve, "reward_curve": rewards,
                "first_reward": sum(r for _, r in rewards[:q]) / q if rewards else None,
                "last_reward": sum(r for _, r in rewards[-q:]) / q if rewards else None,
                **held_out}

    def s_final(self) -> dict:
        p, d = self.plan, self.d("final")
        run = self.d("grpo") / "run"
        self.call("final", "average", [
            self.d("merge") / "hf", run / f"checkpoint-{p.grpo_steps // 2}", run / f"checkpoint-{p.grpo_steps}",
            "--weights", 0.3, 0.3, 0.4, "--out", d / "hf"])
        figures = self.evaluate(d / "hf", sampled=True)
        write_demo_card(d / "hf", [self.d("merge") / "hf", run / f"checkpoint-{p.grpo_steps // 2}",
                                   run / f"checkpoint-{p.grpo_steps}"], [0.3, 0.3, 0.4], figures)
        return figures

    def s_generate(self) -> dict:
        test = [load_test(self.d("data") / f"test_{k}.jsonl", 1)[0] for k in KINDS]
        args = ["--hf", self.d("final") / "hf", "--chat", "--chat-template", "apriel", "--max-new-tokens", 72]
        for r in test:
            args += ["--prompt", r["question"]]
        self.run("generate", "megatron_apriel.generate", args)
        return {"prompts": [r["question"] for r in test]}


    def stage_fn(self, name: str, method: Optional[str]) -> Callable[[], dict]:
        return getattr(self, method) if method else self.s_sft(name)


STAGES = [
    ("data", "curriculum sources, SFT/GRPO tasks, held-out test set, BPE tokenizer", "s_data"),
    ("preprocess", "JSONL -> indexed datasets (apriel preprocess, apriel preprocess-sft)", "s_preprocess"),
    ("pretrain", "tiny base model from scratch (apriel train), -> HF", "s_pretrain"),
    ("upscale", "depth upscaling 4 -> 5 layers (apriel upscale), HF -> megatron-core", "s_upscale"),
    ("cpt", "continual pretraining on the 60/25/15 reasoning/cot/replay blend", "s_cpt"),
    ("average", "average of 3 equispaced CPT checkpoints (apriel average), -> HF", "s_average"),
    ("sft", "SFT generalist: every family, chat template, loss on answers", None),
    ("sft_a", "SFT specialist A from the generalist: addition and comparison, some subtraction", None),
    ("sft_b", "SFT specialist B from the generalist: subtraction and comparison, some addition", None),
    ("merge", "C = 0.5 A + 0.5 B", "s_merge"),
    ("grpo", "GRPO on C with the format and math rewards (TRL)", "s_grpo"),
    ("final", "final = 0.3 C + 0.3 GRPO mid-run + 0.4 GRPO last", "s_final"),
    ("generate", "answers of the final model (apriel generate)", "s_generate"),
]


def _failed(label: str, message: str) -> DemoError:
    return DemoError(f"{label} failed: {message}")


def _worth_showing(line: str) -> bool:
    """Stage output kept on screen: log lines and summaries, not the full config dumps."""
    s = line.strip()
    if not s or s.startswith(("{", "}", "\"", "[", "]")) or s.endswith((",", "{", "[")):
        return False
    if "Warning" in s or "warnings.warn" in s or "\r" in line or "%|" in s:
        return False
    if re.match(r"(\[rank\d+\]:)?[WI]\d{4} ", s):  # torch's own log lines (glog style), from any rank
        return False
    if line.startswith((" ", "\t")) and not s.startswith("###"):
        return False
    return not s.endswith(":") or s.startswith("config")


def _losses(path: Path) -> list[tuple[int, float]]:
    if not path.is_file():
        return []
    out = {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        if "loss" in r and "iteration" in r:
            out[int(r["iteration"])] = float(r["loss"])
    return sorted(out.items())
