"""Audit: lineage manifests, the model history, tracing a batch to the models it reached, the audit page and offline pages."""
