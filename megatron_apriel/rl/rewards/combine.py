"""Per-domain weighted combination of the rule-based rewards, and the TRL reward function.

Each prompt carries a ``domain`` (math, code, tools, instructions, ...); its reward is the
weighted mean of the rewards named for that domain in the config. JSON-valued sample fields
(tests, tools, expected_call, checks) may be stored as JSON strings, which keeps a mixed-domain
dataset a single Arrow schema.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json

from megatron_apriel.config import ConfigError

from .base import Reward, completion_text
from .code import code_reward
from .format import format_reward
from .instructions import instruction_reward
from .math import math_reward
from .sandbox import SandboxLimits, SandboxUnavailable, isolation_mode, pool_size
from .tool_calls import tool_call_reward

REWARDS = {
    "format": format_reward,
    "math": math_reward,
    "code": code_reward,
    "tool_calls": tool_call_reward,
    "instructions": instruction_reward,
}
JSON_FIELDS = ("tests", "tools", "expected_call", "checks", "required_tags")


def _default_domains():
    return {
        "math": {"format": 0.2, "math": 0.8},
        "code": {"format": 0.2, "code": 0.8},
        "tools": {"format": 0.2, "tool_calls": 0.8},
        "instructions": {"format": 0.2, "instructions": 0.8},
    }


@dataclasses.dataclass
class RewardsConfig:
    domains: dict[str, dict[str, float]] = dataclasses.field(default_factory=_default_domains)
    # Required at the start of a completion only when the prompt does not end with it.
    reasoning_prefix: str = ""
    math_timeout: float = 5.0
    sandbox: SandboxLimits = dataclasses.field(default_factory=SandboxLimits)

    def validate(self):
        for domain, weights in self.domains.items():
            for name, w in weights.items():
                if name not in REWARDS:
                    raise ConfigError(f"rewards.domains.{domain}.{name}: unknown reward (known: {', '.join(REWARDS)})")
                if w < 0:
                    raise ConfigError(f"rewards.domains.{domain}.{name}: weight must be >= 0, got {w}")
            if sum(weights.values()) <= 0:
                raise ConfigError(f"rewards.domains.{domain}: weights sum to zero")
        self.sandbox.validate()

    def check_sandbox(self):
        """Refuse a run whose code reward cannot start its isolation (or the weaker mode by name).

        Not part of ``validate``: a config is also read where nothing is graded (``apriel
        grpo-info`` on a login node without bwrap), and the check starts a sandbox. The run calls
        this first, before prompts or the model are loaded."""
        if any(weights.get("code", 0) > 0 for weights in self.domains.values()):
            try:
                isolation_mode(self.sandbox)
            except SandboxUnavailable as e:
                raise ConfigError(f"rewards.sandbox.isolation: {e}") from None


def _decode(sample: dict) -> dict:
    out = dict(sample)
    for key in JSON_FIELDS:
        if isinstance(out.get(key), str):
            out[key] = json.loads(out[key]) if out[key].strip() else None
    return out


def combined_reward(completion, sample: dict, cfg: RewardsConfig) -> tuple[Reward, dict[str, Reward]]:
    sample = _decode(sample)
    domain = sample.get("domain")
    if domain not in cfg.domains:
        raise ValueError(f"sample domain {domain!r} has no reward weights (configured: {', '.join(cfg.domains)})")
    weights = cfg.domains[domain]
    extra = {"format": {"reasoning_prefix": cfg.reasoning_prefix}, "math": {"timeout": cfg.math_timeout},
             "code": {"limits": cfg.sandbox}}
    parts = {}
    for name, w in weights.items():
        if w == 0:
            continue
        kwargs = {k: v for k, v in sample.items() if k not in ("completion", "timeout", "limits")}
        parts[name] = REWARDS[name](completion_text(completion), **{**kwargs, **extra.get(name, {})})
    total = sum(weights[n] for n in parts)
    score = sum(weights[n] * r.score for n, r in parts.items()) / total
    reason = "; ".join(f"{n}={r.score:.2f} ({r.reason})" for n, r in parts.items())
    return Reward(score, reason), parts


class TRLReward:
    """``reward(prompts, completions, **columns) -> list[float]`` as GRPOTrainer calls it."""

    def __init__(self, cfg: RewardsConfig):
        self.cfg = cfg
        self.__name__ = "apriel_rules"

    def __call__(self, prompts, completions, log_metric=None, log_extra=None, **columns):
        columns = {k: v for k, v in columns.items() if isinstance(v, list) and len(v) == len(completions)}
        samples = [{k: v[i] for k, v in columns.items()} for i in range(len(completions))]
        # Completions are graded concurrently: a code sample's programs wait on sandbox processes.
        with concurrent.futures.ThreadPoolExecutor(pool_size(self.cfg.sandbox)) as pool:
            graded = list(pool.map(lambda cs: combined_reward(cs[0], cs[1], self.cfg), zip(completions, samples)))
        scores, reasons, per_part = [], [], {}
        for sample, (total, parts) in zip(samples, graded):
            scores.append(total.score)
            reasons.append(total.reason)
            for name, r in parts.items():
                per_part.setdefault(f"rewards/{sample.get('domain')}/{name}", []).append(r.score)
        # Per-domain, per-rule means and the reasons show *which* rule moves during training.
        if log_metric is not None:
            for name, values in per_part.items():
                log_metric(name, sum(values) / len(values))
        if log_extra is not None:
            log_extra("reward_reason", reasons)
        return scores
