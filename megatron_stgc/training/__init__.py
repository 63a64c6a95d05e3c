"""Training: model/optimizer setup, one step, the loop, checkpoints, logging."""
