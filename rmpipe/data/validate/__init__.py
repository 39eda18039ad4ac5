"""Validate: the splits against Great Expectations suites (per split and across splits) before any training."""
