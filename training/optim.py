"""The optimizer and the learning-rate schedule."""
import math

import torch


def build_optimizer(model, lr: float, weight_decay: float, device: str) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; no decay on biases, norms and LoRA's 1-D tensors."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    if not decay and not no_decay:
        raise SystemExit("error: nothing to train: every parameter is frozen")
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused: one kernel per step instead of ~10 small ops per tensor (torch's CPU default is that for-loop)
    return torch.optim.AdamW(groups, lr=lr, fused=torch.device(device).type in ("cuda", "cpu"))


def lr_at(step: int, total: int, peak: float, warmup: int, schedule: str) -> float:
    """Linear warm-up to `peak`, then linear or cosine decay to zero at `total` (or constant)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    if schedule == "constant":
        return peak
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "cosine":
        return peak * 0.5 * (1 + math.cos(math.pi * progress))
    return peak * (1 - progress)
