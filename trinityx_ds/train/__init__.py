"""Training room: DeepSpeed engine set-up, the two stages, checkpoints, metrics."""
