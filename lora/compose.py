"""Compose adapters by their updates: one adapter whose update is exactly sum_i w_i * dW_i, dW_i = s_i * B_i @ A_i.

Why not average A and B separately (as PEFT's weighted merge does): (w1 B1 + w2 B2)(w1 A1 + w2 A2) has cross terms
B1 A2 and B2 A1 that neither adapter learned. Stacking the factors is exact instead:

    A = [A_1; A_2; ...]   (sum r_i rows)      B = [w_1 s_1 B_1, w_2 s_2 B_2, ...]      B @ A = sum_i w_i dW_i

at rank sum r_i; `rank=k` keeps the best rank-k approximation of each module's summed update (its SVD), and
reports the share of the update's energy (squared singular values) kept. Works on any model holding the
adapters as LoRALinear layers; a module that only some adapters wrap gets only their terms.
"""
import re

import torch
from torch import nn

from .inject import add_lora, list_adapters, lora_modules

_TERM = re.compile(r"^(?P<name>[^@]+?)(?:@(?P<weight>[-+0-9.eE]+))?$")


def parse_mix(expr: str) -> list[tuple[str, float | None]]:
    """'amdo@0.5+kham@0.5' -> [('amdo', 0.5), ('kham', 0.5)]; a term without @w has weight None (uniform or fitted)."""
    terms = []
    for part in expr.split("+"):
        m = _TERM.match(part.strip())
        if not m:
            raise ValueError(f"mix {expr!r}: term {part!r} is not NAME or NAME@WEIGHT")
        terms.append((m["name"], float(m["weight"]) if m["weight"] is not None else None))
    names = [n for n, _ in terms]
    if len(set(names)) != len(names):
        raise ValueError(f"mix {expr!r}: an adapter appears twice")
    given = [w for _, w in terms if w is not None]
    if given and len(given) != len(terms):
        raise ValueError(f"mix {expr!r}: give every term a weight, or none (uniform)")
    return terms


def module_updates(model: nn.Module, weights: dict[str, float]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module: (A, B)} stacked so that B @ A = sum_i w_i * dW_i over the adapters in `weights` (float32)."""
    missing = sorted(set(weights) - set(list_adapters(model)))
    if missing:
        raise KeyError(f"no adapter {missing[0]!r} in the model to compose; it has {list_adapters(model)}")
    out = {}
    for mname, m in lora_modules(model).items():
        As, Bs = [], []
        for name, w in weights.items():
            if name in m.specs:
                A, B = m.lora_factors(name, torch.float32)
                As.append(A.detach())
                Bs.append(B.detach() * (w * m.specs[name].scale))
        if As:
            out[mname] = (torch.cat(As), torch.cat(Bs, dim=1))
    return out


def truncate(A: torch.Tensor, B: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The best rank-`rank` factors (A', B') of B @ A (Eckart-Young), and the share of its energy they keep."""
    U, S, Vh = torch.linalg.svd(B.double() @ A.double(), full_matrices=False)
    k = min(rank, int((S > 0).sum()))
    total = float((S ** 2).sum())
    root = S[:k].sqrt()
    B2, A2 = (U[:, :k] * root).float(), (root[:, None] * Vh[:k]).float()
    return A2, B2, float((S[:k] ** 2).sum()) / total if total > 0 else 1.0


def compose(model: nn.Module, name: str, weights: dict[str, float], *, rank: int | None = None) -> dict:
    """Add adapter `name` to `model` whose update is sum_i w_i * dW_i of the adapters in `weights`.

    A single adapter at weight w is copied with B scaled by w, keeping its own alpha, rank and kind (at w = 1 it
    decodes bitwise like the original). Otherwise the factors are stacked (exact; rank = sum of ranks) or, with
    `rank`, truncated per module by SVD. Returns {module: energy kept} (1.0 everywhere when exact).
    """
    if name in list_adapters(model):
        raise ValueError(f"adapter {name!r} already exists in the model; compose under another name")
    if len(weights) == 1 and rank is None:
        return _scaled_copy(model, name, *next(iter(weights.items())))
    updates = module_updates(model, weights)
    energy = {}
    for mname, (A, B) in list(updates.items()):
        if rank is not None:
            A, B, energy[mname] = truncate(A, B, rank)
        else:
            energy[mname] = 1.0
        updates[mname] = (A, B)
    # alpha = 1 and no rsLoRA make each module's scale 1/r: B carries a factor r so that scale * B @ A is the sum
    add_lora(model, name, targets=[f"^{re.escape(n)}$" for n in updates], alpha=1.0, dropout=0.0,
             rank_pattern={f"^{re.escape(n)}$": A.shape[0] for n, (A, _) in updates.items()}, activate=False)
    with torch.no_grad():
        for mname, m in lora_modules(model, name).items():
            A, B = updates[mname]
            m.lora_A[name].copy_(A)
            m.lora_B[name].copy_(B * A.shape[0])
    return energy


def _scaled_copy(model, name, source, w) -> dict:
    modules = lora_modules(model, source)
    if not modules:
        raise KeyError(f"no adapter {source!r} in the model to compose; it has {list_adapters(model)}")
    spec = next(iter(modules.values())).specs[source]
    add_lora(model, name, targets=[f"^{re.escape(n)}$" for n in modules], r=spec.r, alpha=spec.alpha, dropout=0.0,
             rslora=spec.rslora, kind=spec.kind,
             rank_pattern={f"^{re.escape(n)}$": m.specs[source].r for n, m in modules.items()}, activate=False)
    with torch.no_grad():
        for mname, m in lora_modules(model, name).items():
            for part in ("lora_A", "lora_B", "lora_E"):
                if source in getattr(m, part):
                    src = getattr(m, part)[source]
                    getattr(m, part)[name].copy_(src * w if part == "lora_B" else src)
    return {n: 1.0 for n in modules}
