"""Training checkpoints: atomic writes, keep-last-K plus best, and everything an exact resume needs.

A checkpoint is one `torch.save` dict of tensors and plain values (loadable with weights_only=True):
model (or LoRA-only) state, optimizer, scaler, scheduler, sampler position, RNG states, counters.
It is written to a temp file, fsynced, then renamed over `ckpt-STEP.pt`, so a crash while writing
leaves the previous checkpoint as the latest good one.
"""
import glob
import os
import re
import shutil

import torch

from whisper_ft.models import _atomic_path

_NAME = re.compile(r"ckpt-(\d+)\.pt$")


def save_checkpoint(run_dir, state: dict, step: int, *, keep_last: int = 2, is_best: bool = False) -> str:
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    path = os.path.join(ckpt_dir, f"ckpt-{step:08d}.pt")
    with _atomic_path(path) as tmp:
        torch.save(state, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    if is_best:
        with _atomic_path(os.path.join(ckpt_dir, "best.pt")) as tmp:
            shutil.copyfile(path, tmp)
    for old in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
        os.remove(old)
    return path


def list_checkpoints(run_dir) -> list[str]:
    """Step checkpoints of a run, oldest first (temp files of an interrupted write are not listed)."""
    found = [p for p in glob.glob(os.path.join(run_dir, "checkpoints", "ckpt-*.pt")) if _NAME.search(p)]
    return sorted(found, key=lambda p: int(_NAME.search(p).group(1)))


def latest_checkpoint(run_dir) -> str | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def load_checkpoint(path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint gets the same clear message
        raise ValueError(f"checkpoint {path} is unreadable ({str(e).splitlines()[0][:200]}); "
                         "delete it to resume from the one before") from None


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
