"""Everything the training loop calls: set-up, state, checkpoints, the run directory, optimizer, DDP, memory, augmentation, logging."""
