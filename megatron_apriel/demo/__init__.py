"""``apriel demo``: the whole Apriel recipe on a tiny model, on a CPU, in one command.

The stages and their sizes are in ``recipe.py``, the table, summary and plots in ``report.py``,
the made-up tasks and tokenizer in ``data.py``.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Optional

# The tools the demo runs in this process repeat megatron-core's "no Transformer Engine / Apex"
# notices and torch deprecation notices; on a CPU demo they are expected, not news. Set before the
# recipe imports those tools.
for _module in (r"megatron\..*", r"torch\..*", r"megatron_apriel\.runtime\..*"):
    warnings.filterwarnings("ignore", category=UserWarning, module=_module)
    warnings.filterwarnings("ignore", category=FutureWarning, module=_module)

from megatron_apriel.demo import report  # noqa: E402  (after the warning filters)
from megatron_apriel.demo.recipe import STAGES, Demo, DemoError, Plan  # noqa: E402, F401  (DemoError: the API)
from megatron_apriel.errors import InputError, cli_main  # noqa: E402

DEFAULT_MINUTES = 12.0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="apriel demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None,
                    help="output folder, one subfolder per stage (default runs/demo, runs/demo-multimodal)")
    ap.add_argument("--minutes", type=float, default=None,
                    help=f"scales steps and data (default {DEFAULT_MINUTES:g}: about 11 minutes of one core, 6.5 on 2, "
                         "1.2 GB, held-out accuracy about 0.89; 2 for a quick look: the answer format and about 0.15)")
    ap.add_argument("--force", action="store_true", help="redo every stage, even those already done")
    ap.add_argument("--multimodal", action="store_true",
                    help="the Apriel-1.5 chain on a tiny Llava instead (demo/multimodal.py; default --minutes 15)")
    return ap


@cli_main()
def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.multimodal:
        from megatron_apriel.demo import multimodal  # deferred: the text demo does not need it

        minutes = multimodal.DEFAULT_MINUTES if args.minutes is None else args.minutes
        return multimodal.run_demo(Path(args.out or "runs/demo-multimodal").resolve(), minutes, args.force)
    if args.minutes is None:
        args.minutes = DEFAULT_MINUTES
    if args.minutes <= 0:
        raise InputError(f"--minutes must be positive, got {args.minutes}")
    out = Path(args.out or "runs/demo").resolve()
    out.mkdir(parents=True, exist_ok=True)
    plan = Plan.for_minutes(args.minutes)
    prev = out / "plan.json"
    if prev.is_file() and not args.force and json.loads(prev.read_text()) != asdict(plan):
        raise InputError(f"{out} holds a run with other sizes ({prev}); pass --force or another --out")
    prev.write_text(json.dumps(asdict(plan), indent=2) + "\n")
    print(f"apriel demo -> {out}: tiny model hidden {plan.hidden_size}, {plan.num_layers} -> {plan.num_layers + 1} "
          f"layers; steps: pretrain {plan.pretrain_iters}, CPT {plan.cpt_iters}, "
          f"SFT {plan.sft_iters} + {plan.spec_iters} x 2, "
          f"GRPO {plan.grpo_steps}; {plan.n_test} held-out problems", flush=True)
    demo = Demo(out, plan, args.force)
    print(f"{demo.cores} core(s): training data-parallel over them, independent work side by side", flush=True)
    demo.run_stages(STAGES)  # a DemoError stops it: exit 1
    text = report.write(out, asdict(plan), demo.figures, [s[0] for s in STAGES], time.time() - demo.t0)
    print("\n" + text)
    return 0
