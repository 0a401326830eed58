"""Rank strategies: how many LoRA ranks each layer gets, and how that changes during training.

    fixed    one r everywhere (sweep 4..256)
    mixed    r per layer group from a short spec, e.g. "encoder=8,decoder=32" or "decoder.blocks.2-3=64"
    warmup   HighRankWarmup: train at a high r, then at `switch_step` truncate every B@A by SVD to r
    dynamic  DynamicRankAllocator (AdaLoRA): SVD-form adapters, importance per singular value, a global
             rank budget shrinking on a cubic schedule; the least important singular values are masked

train.py builds any of them with one call and gets back a hook (None for fixed/mixed):

    hook = apply_rank_strategy(model, cfg.rank_strategy, name=..., targets=..., r=..., alpha=...,
                               dropout=..., rslora=..., **cfg.rank_args)
    mark_only_lora_trainable(model); optimizer = build_optimizer(model)
    for step in ...:
        loss = cross_entropy(...) + (hook.regularizer() if hook else 0.0)
        loss.backward(); optimizer.step()
        if hook is not None and hook.update_and_allocate(step):  # True: adapter tensors were replaced,
            optimizer = build_optimizer(model)                    # the old optimizer holds dead tensors
        optimizer.zero_grad(set_to_none=True)                     # after the hook: it reads the gradients

Each hook also has current_ranks() -> {module name: active rank} for logging, and state_dict()/load_state_dict()
for exact resume (load the hook's state before the model's, so the tensors have the right shapes).
"""
import math
import re

import torch
from torch import nn

from .inject import add_lora, lora_modules
from .layers import LoRALinear

STRATEGIES = ("fixed", "mixed", "warmup", "dynamic")


# -- mixed --------------------------------------------------------------------------------------------------
def parse_rank_spec(spec: str) -> dict[str, int]:
    """"encoder=8,decoder.blocks.0-1=16" -> rank_pattern {regex: r} over module-name prefixes.

    Each key is a dotted module-name prefix; a component `N-M` means blocks N..M. Later entries override earlier.
    """
    pattern = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip() or not value.strip().isdigit():
            raise ValueError(f"rank spec item {item!r} is not PREFIX=R (e.g. 'encoder=8,decoder=32')")
        parts = []
        for comp in key.strip().split("."):
            m = re.fullmatch(r"(\d+)-(\d+)", comp)
            if m:
                lo, hi = int(m[1]), int(m[2])
                if lo > hi:
                    raise ValueError(f"rank spec item {item!r}: range {comp} is empty; write low-high")
                parts.append("(" + "|".join(str(i) for i in range(lo, hi + 1)) + ")")
            else:
                parts.append(re.escape(comp))
        pattern[r"^" + r"\.".join(parts) + r"(\.|$)"] = int(value)
    if not pattern:
        raise ValueError(f"rank spec {spec!r} is empty; write e.g. 'encoder=8,decoder=32'")
    return pattern


# -- high-rank warm-up ---------------------------------------------------------------------------------------
def truncate_adapter(module: LoRALinear, name: str, r: int) -> None:
    """Replace adapter `name` by the best rank-r approximation of its update (top-r SVD of scale*B@A).

    The factors are rescaled so that the new scale (alpha/r, or alpha/sqrt(r)) times B'@A' equals exactly the
    top-r part of the old update: truncation changes the adapter's rank, not what it has learned.
    """
    spec = module.specs[name]
    if spec.kind != "lora":
        raise ValueError(f"truncate_adapter: adapter {name!r} is kind {spec.kind!r}; only 'lora' can be truncated")
    if not 1 <= r <= spec.r:
        raise ValueError(f"truncate_adapter: target r={r} must be in 1..{spec.r} (the current rank)")
    dtype = module.lora_A[name].dtype
    A, B = module.lora_factors(name, torch.float64)
    U, S, Vh = torch.linalg.svd(B @ A, full_matrices=False)
    new_scale = spec.alpha / (math.sqrt(r) if spec.rslora else r)
    root = torch.sqrt(S[:r] * (spec.scale / new_scale))  # split the singular values evenly between B and A
    module.set_rank(name, (root[:, None] * Vh[:r]).to(dtype), (U[:, :r] * root).to(dtype))


class HighRankWarmup:
    """Train at the high rank the adapter was built with; at `switch_step` truncate every module to `target_r`."""

    def __init__(self, model: nn.Module, name: str, *, target_r: int, switch_step: int):
        self.model, self.name, self.target_r, self.switch_step = model, name, int(target_r), int(switch_step)
        if not lora_modules(model, name):
            raise KeyError(f"HighRankWarmup: no adapter {name!r} in the model; add it with add_lora first")
        self.truncated = False

    def update_and_allocate(self, global_step: int) -> bool:
        """True exactly once, at the switch: the adapter tensors are new, rebuild the optimizer."""
        if self.truncated or global_step < self.switch_step:
            return False
        self.truncate()
        return True

    def truncate(self) -> None:
        for m in lora_modules(self.model, self.name).values():
            truncate_adapter(m, self.name, min(self.target_r, m.specs[self.name].r))
        self.truncated = True

    def regularizer(self):
        return 0.0

    def current_ranks(self) -> dict[str, int]:
        return {n: m.specs[self.name].r for n, m in lora_modules(self.model, self.name).items()}

    def state_dict(self) -> dict:
        return {"truncated": self.truncated}

    def load_state_dict(self, state: dict) -> None:
        if state["truncated"] and not self.truncated:
            self.truncate()  # reshape to the low rank so the checkpointed tensors fit


# -- dynamic allocation (AdaLoRA) ----------------------------------------------------------------------------
class DynamicRankAllocator:
    """AdaLoRA's rank allocator over the "svd" adapters `name` (delta W = scale * B diag(E) A).

    Importance of each parameter: sensitivity s = |w * grad|, smoothed I = EMA_beta1(s), uncertainty
    U = EMA_beta2(|s - I|), score = I * U. A singular value's score is its own plus the mean score of its row
    of A and column of B. The total number of unmasked singular values follows
        budget(t) = init_total                                    t <= warmup_steps
                  = target + (init_total - target) * (1 - p)^3    p = (t - warmup) / (total - final - warmup)
                  = target_total                                  t >  total_steps - final_steps
    and every update_and_allocate masks (zeroes) the lowest-scoring singular values down to budget(t).
    In the final phase the mask is frozen, as in AdaLoRA, so the last steps fine-tune a fixed rank pattern.
    Scores are read from .grad, so call update_and_allocate after optimizer.step() (after the GradScaler has
    unscaled, so scores are comparable across steps) and before zero_grad(); it raises if the gradients are gone.
    """

    def __init__(self, model: nn.Module, name: str, *, target_total: int, total_steps: int, warmup_steps: int = 0,
                 final_steps: int = 0, beta1: float = 0.85, beta2: float = 0.85, orth_reg_weight: float = 0.1):
        self.model, self.name = model, name
        self.modules = lora_modules(model, name)
        if not self.modules or any(m.specs[name].kind != "svd" for m in self.modules.values()):
            raise ValueError(f"DynamicRankAllocator: adapter {name!r} must exist and be kind 'svd' "
                             f"(add_lora(..., kind='svd'))")
        self.init_total = sum(m.specs[name].r for m in self.modules.values())
        self.target_total = int(target_total)
        if not 0 < self.target_total <= self.init_total:
            raise ValueError(f"target_total={target_total} must be in 1..{self.init_total} (the initial total rank)")
        if warmup_steps + final_steps >= total_steps:
            raise ValueError(f"warmup_steps {warmup_steps} + final_steps {final_steps} must be < total_steps "
                             f"{total_steps}, or the budget never shrinks")
        self.total_steps, self.warmup_steps, self.final_steps = total_steps, warmup_steps, final_steps
        self.beta1, self.beta2, self.orth_reg_weight = beta1, beta2, orth_reg_weight
        self.ipt: dict[str, torch.Tensor] = {}  # EMA sensitivity per parameter, keyed "<module>.<part>"
        self.unc: dict[str, torch.Tensor] = {}  # EMA uncertainty
        self.masks = {n: torch.ones(m.specs[name].r, dtype=torch.bool) for n, m in self.modules.items()}
        self.final_frozen = False

    def budget(self, step: int) -> int:
        if step <= self.warmup_steps:
            return self.init_total
        if step > self.total_steps - self.final_steps:
            return self.target_total
        progress = (step - self.warmup_steps) / (self.total_steps - self.final_steps - self.warmup_steps)
        return int(self.target_total + (self.init_total - self.target_total) * (1 - progress) ** 3)

    def _params(self, mname, m):
        return {f"{mname}.{part}": getattr(m, part)[self.name] for part in ("lora_A", "lora_B", "lora_E")}

    @torch.no_grad()
    def _update_importance(self) -> None:
        for mname, m in self.modules.items():
            for key, p in self._params(mname, m).items():
                if p.grad is None:
                    raise RuntimeError(f"DynamicRankAllocator: {key} has no gradient; call update_and_allocate "
                                       f"after optimizer.step() and before optimizer.zero_grad()")
                s = (p * p.grad).abs().float()
                if key not in self.ipt:
                    self.ipt[key], self.unc[key] = torch.zeros_like(s), torch.zeros_like(s)
                self.ipt[key].mul_(self.beta1).add_(s, alpha=1 - self.beta1)
                self.unc[key].mul_(self.beta2).add_((s - self.ipt[key]).abs(), alpha=1 - self.beta2)

    def _scores(self) -> dict[str, torch.Tensor]:
        """One score per singular value of each module (shape (r,))."""
        out = {}
        for mname in self.modules:
            score = {part: self.ipt[f"{mname}.{part}"] * self.unc[f"{mname}.{part}"]
                     for part in ("lora_A", "lora_B", "lora_E")}
            out[mname] = score["lora_E"] + score["lora_A"].mean(dim=1) + score["lora_B"].mean(dim=0)
        return out

    @torch.no_grad()
    def _apply_masks(self) -> None:
        for mname, m in self.modules.items():
            E = m.lora_E[self.name]
            E.masked_fill_(~self.masks[mname].to(E.device), 0.0)

    def update_and_allocate(self, global_step: int) -> bool:
        """Update importance from the current gradients and mask down to budget(step). Never replaces tensors."""
        if self.final_frozen:
            self._apply_masks()
            return False
        self._update_importance()
        if global_step <= self.warmup_steps:
            return False
        budget = self.budget(global_step)
        scores = self._scores()
        flat = torch.cat([scores[n].cpu() for n in self.modules])
        n_drop = flat.numel() - budget
        if n_drop > 0:
            threshold = torch.kthvalue(flat, n_drop).values
            # ties at the threshold are dropped too: the budget is an upper bound
            self.masks = {n: scores[n].cpu() > threshold for n in self.modules}
        self._apply_masks()
        if global_step > self.total_steps - self.final_steps:
            self.final_frozen = True
        return False

    def orth_reg(self) -> torch.Tensor:
        """weight * mean over modules of ||A A^T - I||_F + ||B^T B - I||_F (keeps P, Q near-orthogonal)."""
        total = 0.0
        for m in self.modules.values():
            A, B = m.lora_A[self.name], m.lora_B[self.name]
            eye = torch.eye(A.shape[0], device=A.device, dtype=A.dtype)
            total = total + torch.linalg.norm(A @ A.T - eye) + torch.linalg.norm(B.T @ B - eye)
        return self.orth_reg_weight * total / len(self.modules)

    def regularizer(self) -> torch.Tensor:
        return self.orth_reg()

    def current_ranks(self) -> dict[str, int]:
        return {n: int(mask.sum()) for n, mask in self.masks.items()}

    def state_dict(self) -> dict:
        return {"ipt": dict(self.ipt), "unc": dict(self.unc), "masks": dict(self.masks),
                "final_frozen": self.final_frozen}

    def load_state_dict(self, state: dict) -> None:
        self.ipt, self.unc = dict(state["ipt"]), dict(state["unc"])
        self.masks, self.final_frozen = dict(state["masks"]), bool(state["final_frozen"])


# -- one entry point for train.py ---------------------------------------------------------------------------
def apply_rank_strategy(model: nn.Module, strategy: str, *, name: str = "default", targets="qv", r: int = 16,
                        alpha: float = 32, dropout: float = 0.0, rslora: bool = False, **strategy_args):
    """Add adapter `name` as `strategy` wants and return its per-step hook (None when there is nothing to do).

    fixed:   no args.
    mixed:   spec="encoder=8,decoder=32" (or rank_pattern={regex: r}); r is the rank for unmatched modules.
    warmup:  warmup_r (high rank, default 4*r), switch_step (required); truncates to r.
    dynamic: total_steps (required), init_r (default ceil(1.5*r)), warmup_steps, final_steps, beta1, beta2,
             orth_reg_weight; the budget shrinks from init_r to r per module on average.
    """
    common = dict(targets=targets, alpha=alpha, dropout=dropout, rslora=rslora)
    args = dict(strategy_args)

    def done():
        if args:
            raise TypeError(f"rank strategy {strategy!r} does not take {sorted(args)}; see lora.rank docs")

    if strategy == "fixed":
        done()
        add_lora(model, name, r=r, **common)
        return None
    if strategy == "mixed":
        spec, pattern = args.pop("spec", None), args.pop("rank_pattern", None)
        done()
        if (spec is None) == (pattern is None):
            raise ValueError("rank strategy 'mixed' needs exactly one of spec='encoder=8,decoder=32' or rank_pattern")
        add_lora(model, name, r=r, rank_pattern=parse_rank_spec(spec) if spec is not None else pattern, **common)
        return None
    if strategy == "warmup":
        warmup_r, switch_step = args.pop("warmup_r", 4 * r), args.pop("switch_step", None)
        done()
        if switch_step is None:
            raise ValueError("rank strategy 'warmup' needs switch_step (the step at which to truncate to r)")
        add_lora(model, name, r=warmup_r, **common)
        return HighRankWarmup(model, name, target_r=r, switch_step=switch_step)
    if strategy == "dynamic":
        init_r = args.pop("init_r", math.ceil(1.5 * r))
        total_steps = args.pop("total_steps", None)
        if total_steps is None:
            raise ValueError("rank strategy 'dynamic' needs total_steps (the budget schedule spans the run)")
        kw = {k: args.pop(k) for k in ("warmup_steps", "final_steps", "beta1", "beta2", "orth_reg_weight")
              if k in args}
        done()
        wrapped = add_lora(model, name, r=init_r, kind="svd", **common)
        return DynamicRankAllocator(model, name, target_total=r * len(wrapped), total_steps=total_steps, **kw)
    raise ValueError(f"unknown rank strategy {strategy!r}; use one of {STRATEGIES}")
