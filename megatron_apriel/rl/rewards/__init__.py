"""Rule-based rewards for GRPO; each is ``fn(completion, **sample) -> Reward(score, reason)``."""

from .base import Reward, completion_text, final_response
from .code import code_reward
from .combine import REWARDS, RewardsConfig, TRLReward, combined_reward
from .format import format_reward
from .instructions import instruction_reward
from .math import math_reward
from .sandbox import SandboxLimits, SandboxResult, SandboxUnavailable, run_many, run_python
from .tool_calls import tool_call_reward

__all__ = ["Reward", "completion_text", "final_response", "code_reward", "REWARDS", "RewardsConfig",
           "TRLReward", "combined_reward", "format_reward", "instruction_reward", "math_reward",
           "SandboxLimits", "SandboxResult", "SandboxUnavailable", "run_many", "run_python", "tool_call_reward"]
