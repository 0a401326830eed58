"""Adapter files: save/load one adapter (safetensors + metadata), switch between several, merge for export.

A file holds `<module>.lora_A`, `<module>.lora_B` (and `<module>.lora_E` for the "svd" kind) for one adapter,
`<embedding>.lora_rows` when it added tokens (lora/rows.py; what they spell is the caller's metadata), and string metadata: format version, adapter name, kind, the fingerprint of the base it was trained on, the
wrapped module names with their ranks, alpha, dropout, rslora, and the caller's own metadata as JSON.
The adapter name is not part of the tensor keys, so a file can be loaded under any name.
"""
import json
import os
import re
from collections import Counter
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

# list_adapters / set_active_adapter live in inject.py (add_lora activates); re-exported here with the file API
from .inject import add_lora, list_adapters, lora_modules, replace_module, set_active_adapter  # noqa: F401
from .layers import check_adapter_name
from .rows import add_rows, rows_modules

FORMAT_VERSION = "1"
_PARTS = ("lora_A", "lora_B", "lora_E")


class AdapterMismatchError(ValueError):
    """The adapter does not belong to this model (other base weights, modules or shapes)."""


def _adapter_config(model: nn.Module, name: str) -> dict:
    modules = lora_modules(model, name)
    if not modules:
        raise KeyError(f"no adapter named {name!r} in the model; it has {list_adapters(model)}")
    specs = {n: m.specs[name] for n, m in modules.items()}
    first = next(iter(specs.values()))
    for n, s in specs.items():
        if (s.alpha, s.dropout, s.rslora, s.kind) != (first.alpha, first.dropout, first.rslora, first.kind):
            raise ValueError(f"adapter {name!r}: module {n} has alpha/dropout/rslora/kind {s} unlike the others")
    ranks = {n: s.r for n, s in specs.items()}
    counts = Counter(ranks.values())
    r = max(counts, key=lambda k: (counts[k], k))  # the usual rank; the per-module ranks stay authoritative
    return dict(targets=list(ranks), ranks=ranks, r=r, alpha=first.alpha, dropout=first.dropout,
                rslora=first.rslora, kind=first.kind)


def save_adapter(model: nn.Module, path, name: str = "default", *, base_fingerprint: str,
                 metadata: dict | None = None) -> None:
    cfg = _adapter_config(model, name)
    tensors = {}
    for mname, m in lora_modules(model, name).items():
        for part in _PARTS:
            if name in getattr(m, part):
                tensors[f"{mname}.{part}"] = getattr(m, part)[name].detach().cpu().contiguous()
    for mname, m in rows_modules(model, name).items():
        tensors[f"{mname}.lora_rows"] = m.lora_rows[name].detach().cpu().contiguous()
    meta = {"format_version": FORMAT_VERSION, "name": name, "base_fingerprint": str(base_fingerprint),
            "kind": cfg["kind"], "targets": json.dumps(cfg["targets"]), "ranks": json.dumps(cfg["ranks"]),
            "r": str(cfg["r"]), "alpha": repr(cfg["alpha"]), "dropout": repr(cfg["dropout"]),
            "rslora": json.dumps(cfg["rslora"]), "user_metadata": json.dumps(metadata or {}, sort_keys=True)}
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    save_file(tensors, tmp, metadata=meta)
    os.replace(tmp, path)  # a crash mid-write never leaves a half file under the real name


def read_adapter_metadata(path) -> dict:
    """The file's metadata, decoded: targets (list), ranks (dict), r, alpha, dropout, rslora, user_metadata."""
    raw = _open(path)[1]
    try:
        return {"format_version": raw["format_version"], "name": raw["name"], "kind": raw["kind"],
                "base_fingerprint": raw["base_fingerprint"], "targets": json.loads(raw["targets"]),
                "ranks": json.loads(raw["ranks"]), "r": int(raw["r"]), "alpha": float(raw["alpha"]),
                "dropout": float(raw["dropout"]), "rslora": json.loads(raw["rslora"]),
                "user_metadata": json.loads(raw["user_metadata"])}
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: not a LoRA adapter file of this project (metadata {e!r} missing or bad); "
                         f"write it with lora.save_adapter") from None


def audio_ctx_of(path) -> str:
    """The encoder context (--audio-ctx) an adapter was trained with, from its train.py config; "full" (whisper's
    30 s windows) for adapters that do not record one."""
    meta = read_adapter_metadata(path)["user_metadata"]
    return str(meta.get("audio_ctx") or (meta.get("config") or {}).get("audio_ctx") or "full")


def _open(path, with_tensors=False):
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"adapter file not found: {path}")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()} if with_tensors else None
    except Exception as e:  # safetensors raises its own error types for truncated/garbled files
        raise ValueError(f"{path}: cannot read adapter safetensors ({type(e).__name__}: {e}); "
                         f"the file is corrupt or not safetensors - re-save or re-download it") from None
    return tensors, meta


def load_adapter(model: nn.Module, path, name: str | None = None, *, base_fingerprint: str,
                 activate: bool = True) -> str:
    """Load an adapter file into `model` (adding the LoRA modules it needs) and return its name."""
    meta = read_adapter_metadata(path)
    if meta["base_fingerprint"] != str(base_fingerprint):
        raise AdapterMismatchError(
            f"{path} was trained on base {meta['base_fingerprint']} but this model is {base_fingerprint}; "
            f"load the base it was trained on, or retrain the adapter on this one")
    tensors, _ = _open(path, with_tensors=True)
    name = check_adapter_name(name or meta["name"])
    ranks = meta["ranks"]
    missing = [n for n in ranks if not isinstance(_get(model, n), nn.Linear)]
    if missing:
        raise AdapterMismatchError(f"{path}: model has no Linear layer {missing[0]} (and {len(missing) - 1} more); "
                                   f"this adapter is for another architecture")
    existing = lora_modules(model, name)
    if existing and set(existing) != set(ranks):
        raise AdapterMismatchError(f"{path}: adapter {name!r} already in the model on other modules; "
                                   f"load under another name")
    if not existing:
        add_lora(model, name, targets=[re.escape(n) for n in ranks], r=meta["r"], alpha=meta["alpha"],
                 dropout=meta["dropout"], rslora=meta["rslora"],
                 rank_pattern={f"^{re.escape(n)}$": r for n, r in ranks.items()}, kind=meta["kind"],
                 activate=False)
    for mname, m in lora_modules(model, name).items():
        for part in _PARTS:
            if name not in getattr(m, part):
                continue
            p, t = getattr(m, part)[name], tensors.get(f"{mname}.{part}")
            if t is None or t.shape != p.shape:
                raise AdapterMismatchError(f"{path}: {mname}.{part} has shape {None if t is None else tuple(t.shape)}, "
                                           f"model expects {tuple(p.shape)}")
            with torch.no_grad():
                p.copy_(t)
    _load_rows(model, path, name, tensors)
    if activate:
        set_active_adapter(model, name)
    return name


def _load_rows(model, path, name: str, tensors: dict) -> None:
    """The adapter's added embedding rows (`<embedding>.lora_rows`), if it has any; files without them load as before."""
    for key, t in tensors.items():
        mname = key.removesuffix(".lora_rows")
        if mname == key:
            continue
        module = _get(model, mname)
        try:
            add_rows(model, mname, name, t)
        except (ValueError, AttributeError) as e:
            raise AdapterMismatchError(f"{path}: added rows {key} do not fit this model "
                                       f"({type(module).__name__}: {e})") from None


def _get(model, name):
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def merge_and_unload(model: nn.Module, name: str) -> nn.Module:
    """Fold adapter `name` into the base weights and put the original layers back (all adapters dropped)."""
    if name not in list_adapters(model):
        raise KeyError(f"no adapter named {name!r} to merge; the model has {list_adapters(model)}")
    for mname, m in lora_modules(model).items():
        m.set_active(name if name in m.specs else None)
        m.merge()
        replace_module(model, mname, m.unload())
    for mname, m in rows_modules(model).items():  # the adapter's added rows become plain embedding rows
        m.set_active(name)
        replace_module(model, mname, m.unload())
    return model


def peft_factors(module, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with delta W = peft_scale * B @ A at the adapter's effective rank (zeroed "svd" ranks dropped)."""
    spec = module.specs[name]
    A, B = module.lora_factors(name, torch.float32)
    if spec.kind == "svd":
        keep = module.lora_E[name].detach() != 0
        A, B = A[keep], B[:, keep]
        r = int(keep.sum())
        if r == 0:
            return A, B
        peft_scale = spec.alpha / (r ** 0.5 if spec.rslora else r)
        B = B * (spec.scale / peft_scale)  # AdaLoRA scales by its initial r; peft will scale by r kept
    return A.detach().contiguous(), B.detach().contiguous()


def export_peft(model: nn.Module, out_dir, name: str, *, module_name_map: Callable[[str], str],
                base_model_name_or_path: str = "") -> None:
    """Write adapter_config.json + adapter_model.safetensors that `peft.PeftModel.from_pretrained` reads."""
    cfg = _adapter_config(model, name)
    tensors, ranks = {}, {}
    for mname, m in lora_modules(model, name).items():
        A, B = peft_factors(m, name)
        if A.shape[0] == 0:
            continue  # every singular value pruned: the module adds nothing
        hf = module_name_map(mname)
        ranks[hf] = A.shape[0]
        tensors[f"base_model.model.{hf}.lora_A.weight"] = A
        tensors[f"base_model.model.{hf}.lora_B.weight"] = B
    counts = Counter(ranks.values())
    r = max(counts, key=lambda k: (counts[k], k))
    config = {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model_name_or_path or None,
              "r": r, "lora_alpha": cfg["alpha"], "lora_dropout": cfg["dropout"], "bias": "none",
              "target_modules": sorted(ranks), "use_rslora": cfg["rslora"], "fan_in_fan_out": False,
              "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
              # peft matches pattern keys as regexes against the end of the module name
              "rank_pattern": {re.escape(k): v for k, v in sorted(ranks.items()) if v != r}, "alpha_pattern": {}}
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    save_file(tensors, os.path.join(out_dir, "adapter_model.safetensors"), metadata={"format": "pt"})
