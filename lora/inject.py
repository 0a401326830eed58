"""Put LoRA adapters on the Linear layers chosen by name, freeze the rest, count what trains.

Module-name knowledge (which layers are query/value, encoder or decoder) lives only in the regexes below.
A target is a regex matched against the whole module name (re.fullmatch), e.g. `encoder.blocks.0.attn.query`;
a rank_pattern key is searched anywhere in the name (re.search), since overrides usually pick a region such as
`^decoder\\.`; when several keys match, the last one wins, so later entries refine earlier ones.
"""
import re
from typing import Iterable

from torch import nn

from .layers import AdapterSpec, LoRALinear
from .rows import rows_modules

_ATTN = r"(encoder\.blocks\.\d+\.attn|decoder\.blocks\.\d+\.(attn|cross_attn))"
TARGET_PRESETS: dict[str, list[str]] = {
    "qv": [rf"{_ATTN}\.(query|value)"],
    "attn": [rf"{_ATTN}\.(query|key|value|out)"],
    "all-linear": [rf"{_ATTN}\.(query|key|value|out)", r"(encoder|decoder)\.blocks\.\d+\.mlp\.(0|2)"],
}


def target_patterns(targets: str | Iterable[str]) -> list[str]:
    if isinstance(targets, str):
        if targets not in TARGET_PRESETS:
            raise ValueError(f"unknown LoRA target preset {targets!r}: use one of {sorted(TARGET_PRESETS)} "
                             f"or a list of regexes over module names")
        return list(TARGET_PRESETS[targets])
    patterns = list(targets)
    if not patterns:
        raise ValueError("LoRA targets is an empty list: give a preset name or at least one regex")
    return patterns


def find_targets(model: nn.Module, targets: str | Iterable[str]) -> list[str]:
    """Names of the nn.Linear modules matched by `targets`; every pattern must match at least one."""
    patterns = target_patterns(targets)
    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    for p in patterns:
        if not any(re.fullmatch(p, n) for n in linear):
            raise ValueError(f"LoRA target {p!r} matches no Linear layer; names look like {linear[:3]}")
    return [n for n in linear if any(re.fullmatch(p, n) for p in patterns)]


def rank_for(module_name: str, r: int, rank_pattern: dict[str, int] | None) -> int:
    for pattern, pr in (rank_pattern or {}).items():
        if re.search(pattern, module_name):
            r = pr
    return int(r)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def add_lora(model: nn.Module, name: str = "default", targets="qv", r: int = 16, alpha: float = 32,
             dropout: float = 0.0, rslora: bool = False, rank_pattern: dict[str, int] | None = None,
             *, kind: str = "lora", activate: bool = True) -> list[str]:
    """Add adapter `name` to the targeted Linear layers (wrapping them in place); returns the wrapped names.

    rank_pattern {regex: r} overrides r per module; r = 0 leaves a module out. The wrapper replaces the layer
    at the same attribute, so hooks installed afterwards (whisper's KV cache) see the LoRA output.
    """
    wrapped = []
    for module_name in find_targets(model, targets):
        mr = rank_for(module_name, r, rank_pattern)
        if mr < 0:
            raise ValueError(f"rank {mr} for {module_name} is negative; use 0 to skip the module")
        if mr == 0:
            continue
        module = model.get_submodule(module_name)
        if not isinstance(module, LoRALinear):
            module = LoRALinear.from_linear(module)
            replace_module(model, module_name, module)
        module.add_adapter(name, AdapterSpec(mr, float(alpha), float(dropout), bool(rslora), kind))
        wrapped.append(module_name)
    if not wrapped:
        raise ValueError(f"add_lora: every targeted module got rank 0 from rank_pattern={rank_pattern}; nothing added")
    if activate:
        set_active_adapter(model, name)
    return wrapped


def lora_modules(model: nn.Module, name: str | None = None) -> dict[str, LoRALinear]:
    """{module name: LoRALinear}, only those holding adapter `name` when it is given."""
    return {n: m for n, m in model.named_modules()
            if isinstance(m, LoRALinear) and (name is None or name in m.specs)}


def list_adapters(model: nn.Module) -> list[str]:
    return sorted({a for m in lora_modules(model).values() for a in m.specs})


def set_active_adapter(model: nn.Module, name: str | None) -> None:
    """Make `name` the adapter every LoRA layer uses (layers without it run the base); None = pure base."""
    if name is not None and name not in list_adapters(model):
        raise KeyError(f"no adapter named {name!r} in the model; it has {list_adapters(model)}")
    for m in lora_modules(model).values():
        m.set_active(name if name in m.specs else None)
    for m in rows_modules(model).values():  # an adapter's added embedding rows (lora/rows.py) switch with it
        m.set_active(name)


def mark_only_lora_trainable(model: nn.Module) -> None:
    """requires_grad on LoRA tensors only (names containing `lora_`); biases and everything else frozen."""
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    params = list(model.parameters())  # deduplicated: tied/shared tensors count once
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def describe_trainable(model: nn.Module) -> str:
    trainable, total = count_parameters(model)
    return f"trainable {trainable:,} / {total:,} ({100 * trainable / max(total, 1):.2f}%)"


def remove_adapter(model: nn.Module, name: str) -> None:
    """Drop adapter `name` from every layer that holds it (the layers stay wrapped)."""
    for m in lora_modules(model, name).values():
        m.remove_adapter(name)
    for m in rows_modules(model, name).values():
        m.remove_adapter(name)
