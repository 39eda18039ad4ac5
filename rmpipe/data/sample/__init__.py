"""The bundled sample: deterministic synthetic preference batches (texts, a simulated annotator crowd, the files)."""
