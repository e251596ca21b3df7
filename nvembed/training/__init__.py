"""Training loop, batching into model inputs, checkpoints, GradCache, metrics."""
