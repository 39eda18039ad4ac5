"""Training: the DeepSpeed loop, its config, checkpoints with a resume fingerprint, and rank collectives."""
