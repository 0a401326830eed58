"""Small pieces train.py's loop calls: each does one thing and returns a value; the loop stays in train.py."""
import math
import resource
import sys

import torch
from torch.utils.checkpoint import checkpoint


def resolve_amp(amp: str, device: str) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None for fp32, whether a GradScaler is needed)."""
    cuda = device.startswith("cuda")
    if amp == "auto":
        amp = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "fp32"
    if amp == "fp16" and not cuda:
        raise SystemExit("error: --amp fp16 needs a CUDA device; on CPU use --amp bf16 or fp32")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": None}[amp]
    return dtype, dtype is torch.float16  # bf16 has fp32's range: no loss scaling needed


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


def peak_memory_mb(device: str) -> float:
    """CUDA peak allocated on GPU; the process's peak resident set on CPU."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def enable_grad_checkpointing(model) -> None:
    """Recompute each residual block's activations in backward instead of keeping them (training only)."""
    for block in list(model.encoder.blocks) + list(model.decoder.blocks):
        forward = block.forward

        def checkpointed(x, xa=None, mask=None, kv_cache=None, _forward=forward):
            if torch.is_grad_enabled() and kv_cache is None:
                return checkpoint(_forward, x, xa, mask, None, use_reentrant=False)
            return _forward(x, xa, mask, kv_cache)

        block.forward = checkpointed


def select_dialects(dialect: str, sampling: str | None, available: list[str]) -> tuple[list[str], str]:
    """--dialect value -> (dialects to draw from, sampling mode)."""
    if dialect == "balanced":
        include, mode = list(available), "balanced"
    elif dialect == "all":
        include, mode = list(available), "natural"
    else:
        include = [d.strip() for d in dialect.split(",") if d.strip()]
        missing = [d for d in include if d not in available]
        if missing:
            raise SystemExit(f"error: --dialect {dialect}: no training rows for {missing}; "
                             f"the data has {available} (or use balanced / all)")
        mode = "natural" if len(include) == 1 else "balanced"
    return include, sampling or mode


class ProgressLog:
    """A tqdm bar with ETA on a terminal; plain periodic lines when output goes to a file."""

    def __init__(self, total: int, initial: int = 0):
        from tqdm import tqdm

        self.tty = sys.stderr.isatty()
        self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, disable=not self.tty)
        self.total = total

    def update(self, step: int, loss: float, lr: float, samples_per_s: float) -> None:
        if self.tty:
            self.bar.n = step
            self.bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", sps=f"{samples_per_s:.1f}")
        else:
            print(f"step {step}/{self.total} loss {loss:.4f} lr {lr:.2e} {samples_per_s:.1f} samples/s", flush=True)

    def close(self) -> None:
        self.bar.close()


def init_distributed(device: str) -> tuple[int, int, int]:
    """(rank, world size, local rank); joins the process group when started by torchrun (WORLD_SIZE > 1).

    nccl on CUDA, gloo on CPU. A single process needs no process group at all.
    """
    import os

    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, 0
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and not device.startswith("cpu")
    if cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), world, local


def all_sum(value: float, world: int) -> float:
    """Sum a Python number over all processes (identity in a single process)."""
    if world == 1:
        return value
    import torch.distributed as dist

    t = torch.tensor([float(value)], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return float(t.item())


class NullWriter:
    """Stands in for the TensorBoard writer on ranks other than 0: they log nothing."""

    def __getattr__(self, name):
        return lambda *a, **kw: None
