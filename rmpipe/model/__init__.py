"""The model: backbones, rendering text to token ids, batching and packing, the reward model and its loss, candidate sampling."""
