"""GRPO and the rule-based reward functions."""
