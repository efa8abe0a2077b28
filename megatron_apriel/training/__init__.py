"""The one training loop and its parts: optimizer, schedule, step, checkpoints, freezing, logging."""
