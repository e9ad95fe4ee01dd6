"""Training plumbing both training commands share: the run object, checkpoints, EMA, tracking."""
