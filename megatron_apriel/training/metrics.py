"""Training observability: the per-interval log line, TensorBoard, wandb and a metrics.jsonl.

TensorBoard (always) and wandb (when ``logging.wandb_project`` is set; ``wandb_mode: offline``
needs no network) receive the same scalars. ``metrics.jsonl`` holds one record per step with the
exact float loss, which resume and parity checks compare bit for bit. Only global rank 0 writes.
"""

from __future__ import annotations

import json
import os
import time
from typing import Optional

from megatron_apriel.errors import RunError
from megatron_apriel.runtime.log import is_rank0


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


class MetricsWriter:
    def __init__(self, log_dir: Optional[str], config_dict: dict, wandb_project: Optional[str] = None,
                 wandb_run_name: Optional[str] = None, wandb_mode: str = "online"):
        self.enabled = is_rank0()
        self.tb = None
        self.wandb = None
        self.jsonl = None
        if not self.enabled or not log_dir:
            return
        os.makedirs(log_dir, exist_ok=True)
        from torch.utils.tensorboard import SummaryWriter  # deferred: rank 0 only, and tensorboard is slow to import

        self.tb = SummaryWriter(log_dir=os.path.join(log_dir, "tensorboard"))
        self.jsonl = open(os.path.join(log_dir, "metrics.jsonl"), "a")
        if wandb_project and wandb_mode != "disabled":
            try:
                import wandb  # optional (extra "wandb")
            except ImportError:
                raise RunError("logging.wandb_project is set but wandb is not installed (pip install wandb)") from None
            self.wandb = wandb.init(project=wandb_project, name=wandb_run_name, mode=wandb_mode,
                                    dir=log_dir, config=config_dict, resume="allow")

    def scalars(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        if self.tb is not None:
            for k, v in values.items():
                if v is not None:
                    self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in values.items() if v is not None}, step=step)

    def record(self, record: dict) -> None:
        if self.jsonl is not None:
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.jsonl is not None:
            self.jsonl.close()
        if self.wandb is not None:
            self.wandb.finish()


class Throughput:
    """Step timing, tokens/s per GPU, MFU and ETA over the last log interval."""

    def __init__(self, flops_per_token: float, tokens_per_step: int, world_size: int, peak_flops: Optional[float]):
        self.fpt = flops_per_token
        self.tokens_per_step = tokens_per_step
        self.world = world_size
        self.peak = peak_flops
        self.t0 = time.perf_counter()
        self.steps = 0

    def tick(self) -> None:
        self.steps += 1

    def read(self, remaining_steps: int) -> dict:
        now = time.perf_counter()
        dt = (now - self.t0) / max(self.steps, 1)
        self.t0, self.steps = now, 0
        tps = self.tokens_per_step / dt / self.world
        mfu = tps * self.fpt / self.peak if self.peak else None
        return {"step_time": dt, "tokens_per_s_per_gpu": tps, "mfu": mfu, "eta_s": dt * remaining_steps}
