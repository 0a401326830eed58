"""LoRALinear: an nn.Linear that carries named low-rank adapters next to its frozen base weight.

    y = x W^T + b + scale * dropout(x) A^T B^T          kind "lora": A (r, in), B (out, r)
    y = x W^T + b + scale * dropout(x) (A * E)^T B^T    kind "svd":  AdaLoRA's P Λ Q, E (r,) the singular values

The wrapper shares the wrapped layer's `weight`/`bias` Parameters under the same names, so the base
state_dict keys are unchanged, and every adapter tensor is named `<module>.lora_{A,B,E}.<adapter name>`.
B (kind "lora") or E (kind "svd") starts at zero, so a freshly wrapped model computes exactly the base.
"""
import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

KINDS = ("lora", "svd")
_NAME_RE = re.compile(r"[A-Za-z0-9_\-]+")


@dataclass(frozen=True)
class AdapterSpec:
    r: int
    alpha: float
    dropout: float = 0.0
    rslora: bool = False
    kind: str = "lora"

    @property
    def scale(self) -> float:
        # rsLoRA: alpha/sqrt(r) keeps the update's magnitude stable as r grows, alpha/r shrinks it
        return self.alpha / math.sqrt(self.r) if self.rslora else self.alpha / self.r


def check_adapter_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ValueError(f"adapter name {name!r} is not allowed: use letters, digits, '_' or '-' (it becomes a "
                         f"state_dict key component)")
    if hasattr(nn.ParameterDict(), name) or hasattr(nn.ModuleDict(), name):
        raise ValueError(f"adapter name {name!r} clashes with a torch.nn container attribute; pick another name")
    return name


class LoRALinear(nn.Linear):
    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_lora(wrapped=None)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "LoRALinear":
        """Wrap `linear` without copying: the same weight/bias Parameters, so optimizers and ties still hold."""
        if isinstance(linear, LoRALinear):
            raise TypeError("from_linear: this layer is already a LoRALinear; add another adapter with add_adapter")
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self._init_lora(wrapped=linear)
        self.train(linear.training)  # a model already in eval() must not get dropout switched on
        return self

    def _init_lora(self, wrapped):
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_E = nn.ParameterDict()  # only "svd" adapters have an entry
        self.lora_dropout = nn.ModuleDict()
        self.specs: dict[str, AdapterSpec] = {}
        self.active_adapter: str | None = None
        self.merged_adapter: str | None = None
        # Kept outside the module tree (no duplicate state_dict keys) so unload() can put back the very
        # module that was wrapped, e.g. whisper.model.Linear with its dtype-casting forward.
        self.__dict__["_wrapped"] = wrapped

    # -- adapters ---------------------------------------------------------------------------------------
    def add_adapter(self, name: str, spec: AdapterSpec) -> None:
        check_adapter_name(name)
        if name in self.specs:
            raise ValueError(f"adapter {name!r} already exists on this layer; pick another name or remove it first")
        if spec.kind not in KINDS:
            raise ValueError(f"adapter kind {spec.kind!r} unknown; use one of {KINDS}")
        if spec.r < 1:
            raise ValueError(f"adapter rank r={spec.r} must be >= 1")
        self.specs[name] = spec
        # in this layer's mode: a new nn.Dropout starts in training mode, which in an eval()'d model would
        # leave dropout on while decoding
        self.lora_dropout[name] = (nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()).train(self.training)
        self._set_factors(name, *self._initial_factors(spec))

    def _initial_factors(self, spec):
        kw = dict(device=self.weight.device, dtype=self.weight.dtype)
        A = torch.empty(spec.r, self.in_features, **kw)
        B = torch.zeros(self.out_features, spec.r, **kw)
        if spec.kind == "lora":
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))  # as loralib; B = 0 makes the update zero
            return A, B, None
        # AdaLoRA: P and Q small random, Λ = 0, so the update is zero but every factor gets gradient later
        nn.init.normal_(A, std=0.02)
        nn.init.normal_(B, std=0.02)
        return A, B, torch.zeros(spec.r, **kw)

    def _set_factors(self, name, A, B, E=None):
        """(Re)place the adapter tensors; new Parameters, so an optimizer holding the old ones must be rebuilt."""
        self.lora_A[name] = nn.Parameter(A)
        self.lora_B[name] = nn.Parameter(B)
        if E is not None:
            self.lora_E[name] = nn.Parameter(E)

    def set_rank(self, name: str, A: torch.Tensor, B: torch.Tensor, E: torch.Tensor | None = None) -> None:
        """Replace adapter `name` by factors of a new rank; scale follows the new r (alpha/r or alpha/sqrt(r))."""
        if self.merged_adapter == name:
            raise RuntimeError(f"adapter {name!r} is merged into the weight; unmerge() before changing its rank")
        r = A.shape[0]
        if A.shape != (r, self.in_features) or B.shape != (self.out_features, r):
            raise ValueError(f"set_rank: A {tuple(A.shape)} / B {tuple(B.shape)} do not fit a "
                             f"{self.out_features}x{self.in_features} layer")
        spec = self.specs[name]
        self.specs[name] = AdapterSpec(r, spec.alpha, spec.dropout, spec.rslora, spec.kind)
        self._set_factors(name, A.detach().clone(), B.detach().clone(), None if E is None else E.detach().clone())

    def remove_adapter(self, name: str) -> None:
        if self.merged_adapter == name:
            self.unmerge()
        for d in (self.lora_A, self.lora_B, self.lora_E, self.lora_dropout):
            if name in d:
                del d[name]
        del self.specs[name]
        if self.active_adapter == name:
            self.active_adapter = None

    def set_active(self, name: str | None) -> None:
        if name is not None and name not in self.specs:
            raise KeyError(f"adapter {name!r} not on this layer (has {sorted(self.specs)})")
        if self.merged_adapter is not None and self.merged_adapter != name:
            self.unmerge()
        self.active_adapter = name

    # -- math -------------------------------------------------------------------------------------------
    def lora_factors(self, name: str, dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(A_eff, B) with delta W = scale * B @ A_eff; for "svd" the singular values are folded into A."""
        A, B = self.lora_A[name], self.lora_B[name]
        if dtype is not None:
            A, B = A.to(dtype), B.to(dtype)
        if self.specs[name].kind == "svd":
            A = A * self.lora_E[name].to(A.dtype)[:, None]
        return A, B

    def delta_weight(self, name: str) -> torch.Tensor:
        """scale * B @ A in fp32 (the exact update this adapter adds to the weight)."""
        A, B = self.lora_factors(name, torch.float32)
        return (B @ A) * self.specs[name].scale

    def merge(self) -> None:
        """Add the active adapter into the weight, so inference costs one matmul; unmerge() undoes it."""
        name = self.active_adapter
        if name is None or self.merged_adapter == name:
            return
        if self.merged_adapter is not None:
            self.unmerge()
        with torch.no_grad():
            self.weight.copy_((self.weight.float() + self.delta_weight(name)).to(self.weight.dtype))
        self.merged_adapter = name

    def unmerge(self) -> None:
        name = self.merged_adapter
        if name is None:
            return
        with torch.no_grad():
            self.weight.copy_((self.weight.float() - self.delta_weight(name)).to(self.weight.dtype))
        self.merged_adapter = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # cast like whisper.model.Linear, so an fp16 model runs without autocast
        weight, bias = self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype)
        name = self.active_adapter
        if name is None or self.merged_adapter == name:
            return F.linear(x, weight, bias)
        A, B = self.lora_factors(name, x.dtype)
        drop = self.lora_dropout[name]
        if isinstance(drop, nn.Dropout) and drop.training and drop.p > 0:
            h = _DropoutDown.apply(x, A, drop.p)
        else:
            h = F.linear(x, A)
        # The base output is a fresh 2-d tensor that no backward reads, so one in-place addmm_ adds
        # scale * h B^T to it: no copy of [..., out] and no second buffer of that size.
        out = F.linear(x.reshape(-1, x.shape[-1]), weight, bias)
        out.addmm_(h.reshape(-1, h.shape[-1]).to(out.dtype), B.t().to(out.dtype), alpha=self.specs[name].scale)
        return out.view(*x.shape[:-1], out.shape[-1])

    def unload(self) -> nn.Linear:
        """The plain layer (the originally wrapped module when there is one) holding the current weight."""
        base = self.__dict__["_wrapped"]
        if base is None:
            base = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        base.weight = self.weight
        base.bias = self.bias
        return base

    def extra_repr(self) -> str:
        ads = ", ".join(f"{n}:{s.kind} r={s.r}" for n, s in self.specs.items())
        return f"{super().extra_repr()}, adapters=[{ads}], active={self.active_adapter}, merged={self.merged_adapter}"


class _DropoutDown(torch.autograd.Function):
    """h = dropout(x, p) A^T, keeping x and a 1-byte mask for backward instead of float copies.

    F.dropout on the CPU keeps its float32 mask, and autograd keeps the dropped copy of x for A's gradient:
    8 bytes per input element per adapted layer. This keeps a bool mask and x itself, which is shared by
    the layers reading the same input (q and v of one attention, the cross-attention values of every
    decoder block), and recomputes the dropped input in backward. The mask comes from `keep_mask`, seeded
    by torch's generator like F.dropout, but faster to draw. Under autocast the product is
    taken in the autocast dtype, as F.linear would be, and the gradients come back in the inputs' dtypes.
    """

    @staticmethod
    def forward(ctx, x, A, p):
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        keep, scale = keep_mask(x, p)
        with torch.autocast(device, enabled=False):
            h = F.linear(torch.where(keep, x, 0).to(dtype), A.to(dtype)) * scale  # where: no float copy of the mask
        ctx.save_for_backward(x, A, keep)
        ctx.scale, ctx.dtype = scale, dtype
        return h

    @staticmethod
    def backward(ctx, grad_h):
        x, A, keep = ctx.saved_tensors
        g = grad_h.to(ctx.dtype) * ctx.scale  # the dropout's scale, on the small [..., r] side
        grad_x = grad_A = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.where(keep, g @ A.to(ctx.dtype), 0).to(x.dtype)
        if ctx.needs_input_grad[1]:
            dropped = torch.where(keep, x, 0).to(ctx.dtype)
            grad_A = (g.reshape(-1, g.shape[-1]).t() @ dropped.reshape(-1, x.shape[-1])).to(A.dtype)
        return grad_x, grad_A, None


def keep_mask(x: torch.Tensor, p: float) -> tuple[torch.Tensor, float]:
    """(bool mask of x's shape, True with probability 1 - p, and the scale 1 / that probability).

    Every element compares 16 random bits with a threshold, so p is rounded to a multiple of 1/65536 (0.05
    becomes 0.0500031) and the scale is that of the rounded p, which keeps the dropout unbiased. Four
    16-bit lanes come from one 64-bit draw of torch's generator (seeded as usual): ~4x faster on the CPU
    than bernoulli_, which draws one number per element and cost ~5 ns each, ~80 ms of a 1.4 s LoRA step.
    """
    kept = min(65536, max(1, round(65536 * (1 - p))))  # out of 65536
    n = x.numel()
    words = torch.randint(-2**63, 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=x.device)
    keep = words.view(torch.int16)[:n] < kept - 32768  # int16 lanes are uniform on [-32768, 32767]
    return keep.view(x.shape), 65536 / kept
