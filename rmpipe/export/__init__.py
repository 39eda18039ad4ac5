"""Export: a verified Hugging Face reward-model folder, its model card, the promotion gate and scoring."""
