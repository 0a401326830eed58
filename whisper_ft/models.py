"""Load a base Whisper model from any form users have it in, export it, and fingerprint it."""
import dataclasses
import hashlib
import os
import tempfile

import torch

LORA_KEY = "lora_"  # every LoRA tensor name contains this; the fingerprint ignores them


def fingerprint(model: torch.nn.Module) -> str:
    """Short hash of the base weights (LoRA tensors excluded), so adapters can refuse the wrong base.

    Hashes fp32 bytes, so the same weights loaded as fp16 or fp32 from the same source agree only when
    the values are equal; a merged adapter changes the weights and therefore the fingerprint.
    """
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if LORA_KEY in name:
            continue
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def export_openai(model, path) -> None:
    """Write `{"dims", "model_state_dict"}` that plain `whisper.load_model(path)` loads (LoRA keys dropped)."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items() if LORA_KEY not in k}
    payload = {"dims": dataclasses.asdict(model.dims), "model_state_dict": state}
    _atomic_torch_save(payload, path)


def _atomic_torch_save(obj, path) -> None:
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
