"""Collect: batch files in any supported shape -> one normalized vote table, every bad row quarantined with a reason."""
