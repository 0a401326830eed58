"""Memory: peak usage, recomputing activations, and keeping freed host memory for reuse.

keep_freed_memory: keep freed host memory in the process for reuse instead of handing it back to the OS (glibc malloc).

Why: glibc serves every allocation above 32 MB (and, through its sliding threshold, many smaller ones) with
a fresh mmap and unmaps it again on free. A CPU training step frees and reallocates the same activation
sizes every step ([4, 1500, 2048] is 49 MB at base dims), so each one arrives as new pages that the kernel
must fault in and zero: 0.7-2.5 s of system time in a 6-7 s base LoRA step on 2 cores, measured here.
jemalloc or tcmalloc under LD_PRELOAD fix this as well (PyTorch's CPU tuning guide suggests them); these
two mallopt calls need no package and no restart. The cost: the process keeps its peak heap until it
exits, which a training or evaluation process reaches again every step anyway.
"""
import ctypes
import resource
import sys

import torch
from torch.utils.checkpoint import checkpoint

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc <malloc.h>


def keep_freed_memory() -> bool:
    """Serve large allocations from the heap and never trim it; False where libc is not glibc (no change)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt  # glibc's; musl and others have no libc.so.6/mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # 1 = success. No mmap at all: above 32 MB glibc ignores M_MMAP_THRESHOLD, so only this keeps big
    # tensors in the heap; allocations a thread arena cannot hold fall back to the main heap.
    return mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1


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
