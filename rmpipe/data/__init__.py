"""Preference data, from annotation batches to validated splits: collect, aggregate, split, validate, retractions, the batch engine and the bundled sample."""
