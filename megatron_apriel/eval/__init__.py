"""Evaluation of HF checkpoints on lm-evaluation-harness with the project's task kinds (``apriel eval``)
and the search over weighted merges that it scores (``apriel merge-search``)."""
