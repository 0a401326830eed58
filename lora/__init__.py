"""LoRA from scratch; depends on torch.nn only."""
