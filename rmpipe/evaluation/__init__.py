"""Evaluation: held-out accuracy and the pathology checks that catch silent reward-model failures."""
