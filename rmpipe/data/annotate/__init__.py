"""Label Studio in the loop: push annotation tasks, pull finished judgements as batches (`rmpipe annotate`)."""
