"""Aggregate: votes -> one row per pair (majority label, vote counts, agreement, soft label, margin) and the annotator report."""
