"""rmpipe: turn human preference batches into a reward model you can trust, reproduce and audit."""

__version__ = "0.1.0"
