"""Experiments run on the model: the dialect study and its report, N-best robustness (NPRR)."""
