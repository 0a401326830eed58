"""8-bit frozen base for LoRA: Linear weights stored int8 (symmetric, one scale per output channel).

    s[o] = max_i |W[o, i]| / 127        q = round(W / s[:, None]) in [-127, 127] (int8)
    y = (x q^T) * s + b                 so |W - q s| <= s / 2 per weight, 1 byte per weight instead of 4

`Int8Linear` is a `LoRALinear` whose frozen weight is that int8 tensor: with no adapter it is an int8 linear
layer, with one it is LoRA over an int8 base (the adapter tensors stay fp32 and train as usual).
`quantize_frozen_linears(model)` turns every nn.Linear, wrapped or not, into one; `dequantize(model)` turns them
back into fp32 layers (keeping adapters), and `lora.merge_and_unload` into plain fp32 Linears with the adapter
merged: an int8 layer's merge() is deferred to its unload(), since int8 cannot absorb the update exactly.

On the CPU (and on CUDA without bitsandbytes) the product is `_Int8Matmul`: the float copy of q exists only
inside one matmul, forward or backward, so neither the module nor autograd keeps fp32 weights. On CUDA with
bitsandbytes importable it is bitsandbytes' LLM.int8() matmul over the same q and scales.

The state_dict of an Int8Linear holds the dequantised fp32 `weight` under the usual key (as torch's own
quantized modules do), and loading an fp32 `weight` quantises it: exports, fingerprints and checkpoints see an
ordinary fp32 model. Fingerprint the base *before* quantising, so adapters record the original base and load
on it unchanged.
"""
import importlib.util
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from .layers import LoRALinear

QMAX = 127


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [out, in], scale fp32 [out]) with weight ~= q * scale[:, None]; all-zero rows get scale 1."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1) / QMAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / scale[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    return q.to(dtype) * scale.to(dtype)[:, None]


class _Int8Matmul(torch.autograd.Function):
    """y = (x q^T) * s + b; saves q and s (not a float weight) for backward, which recomputes x's gradient."""

    @staticmethod
    def forward(ctx, x, q, scale, bias):
        ctx.save_for_backward(q, scale)
        ctx.x_dtype, ctx.has_bias = x.dtype, bias is not None
        out = F.linear(x, q.to(x.dtype)) * scale.to(x.dtype)
        return out if bias is None else out + bias.to(out.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        q, scale = ctx.saved_tensors
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = ((grad_out * scale.to(grad_out.dtype)) @ q.to(grad_out.dtype)).to(ctx.x_dtype)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, None, None, grad_bias


def bitsandbytes_available() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


class Int8Linear(LoRALinear):
    """A LoRALinear over an int8 frozen weight (`weight`, int8, never trained) and its per-row `weight_scale`."""

    @classmethod
    def from_linear(cls, linear: nn.Linear, backend: str = "auto") -> "Int8Linear":
        """Quantise `linear` (a plain nn.Linear or a LoRALinear, whose adapters are kept) into a new Int8Linear."""
        if isinstance(linear, Int8Linear):
            return linear
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"Int8Linear.from_linear expects an nn.Linear, got {type(linear).__name__}")
        if isinstance(linear, LoRALinear) and linear.merged_adapter is not None:
            raise RuntimeError(f"adapter {linear.merged_adapter!r} is merged into this layer's weight; unmerge() "
                               "before quantising, or the int8 base would hold the adapter")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q, scale = quantize_per_channel(linear.weight)
        device = linear.weight.device
        self.weight = nn.Parameter(q.to(device), requires_grad=False)
        # not persistent: the state_dict carries the dequantised weight instead (see _save_to_state_dict)
        self.register_buffer("weight_scale", scale.to(device), persistent=False)
        self.bias = linear.bias
        # The module to give back on unload is rebuilt from its type: keeping the wrapped module itself would keep
        # its fp32 weight alive, which is what this class exists to free.
        wrapped = linear.__dict__["_wrapped"] if isinstance(linear, LoRALinear) else linear
        self._init_lora(wrapped=None)
        self.__dict__["_linear_type"] = type(wrapped) if wrapped is not None else nn.Linear
        if isinstance(linear, LoRALinear):  # take over its adapters (the same tensors and specs)
            self.lora_A, self.lora_B, self.lora_E = linear.lora_A, linear.lora_B, linear.lora_E
            self.lora_dropout, self.specs, self.active_adapter = linear.lora_dropout, linear.specs, linear.active_adapter
        if backend == "auto":
            backend = "bitsandbytes" if device.type == "cuda" and bitsandbytes_available() else "torch"
        if backend not in ("torch", "bitsandbytes"):
            raise ValueError(f"int8 backend {backend!r}: use auto, torch or bitsandbytes")
        self.backend = backend
        return self

    def dequantized_weight(self, dtype=torch.float32) -> torch.Tensor:
        return dequantize_weight(self.weight, self.weight_scale, dtype)

    def _initial_factors(self, spec):
        # LoRALinear's initialisation, made in the scale's float dtype: adapters never take the int8 storage type
        shape = SimpleNamespace(in_features=self.in_features, out_features=self.out_features,
                                weight=torch.empty(0, device=self.weight.device, dtype=self.weight_scale.dtype))
        return LoRALinear._initial_factors(shape, spec)

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.backend == "bitsandbytes" and x.is_cuda:
            return _bnb_matmul(self, x, bias)
        return _Int8Matmul.apply(x, self.weight, self.weight_scale, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_forward(x)
        name = self.active_adapter
        if name is None:
            return out
        A, B = self.lora_factors(name, x.dtype)
        return out + F.linear(F.linear(self.lora_dropout[name](x), A), B) * self.specs[name].scale

    # -- back to fp32 -----------------------------------------------------------------------------------
    def to_lora_linear(self) -> LoRALinear:
        """The same layer as a plain fp32 LoRALinear: dequantised weight, the same adapter tensors."""
        try:  # e.g. whisper.model.Linear, whose forward casts to the input's dtype
            fp32 = self.__dict__["_linear_type"](self.in_features, self.out_features, bias=self.bias is not None,
                                                 device="meta")
        except TypeError:  # a Linear subclass with another constructor
            fp32 = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        fp32.weight = nn.Parameter(self.dequantized_weight(), requires_grad=False)
        fp32.bias = self.bias
        plain = LoRALinear.from_linear(fp32)
        plain.lora_A, plain.lora_B, plain.lora_E = self.lora_A, self.lora_B, self.lora_E
        plain.lora_dropout, plain.specs = self.lora_dropout, dict(self.specs)
        plain.set_active(self.active_adapter)
        return plain

    def merge(self) -> None:
        """Deferred: an int8 weight cannot absorb an adapter exactly, so the adapter keeps running beside it and is
        folded into the fp32 weight that unload() returns (merge_and_unload's merge-then-unload)."""
        if self.active_adapter is not None:
            self.merged_adapter = self.active_adapter

    def unmerge(self) -> None:
        self.merged_adapter = None

    def unload(self) -> nn.Linear:
        """The plain fp32 layer: the dequantised weight, plus the merged adapter's update if there is one."""
        plain = self.to_lora_linear()
        plain.set_active(self.merged_adapter)
        plain.merge()
        return plain.unload()

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight"] = self.dequantized_weight()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "weight"
        if key in state_dict and state_dict[key].is_floating_point():
            w = state_dict[key]
            if w.shape != self.weight.shape:
                error_msgs.append(f"size mismatch for {key}: copying a param with shape {tuple(w.shape)}, "
                                  f"the shape in the current model is {tuple(self.weight.shape)}")
                return
            q, scale = quantize_per_channel(w)
            with torch.no_grad():
                self.weight_scale.copy_(scale)
            state_dict = {**state_dict, key: q}
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, int8 ({self.backend})"


def _bnb_matmul(layer: Int8Linear, x: torch.Tensor, bias):
    """bitsandbytes' LLM.int8() matmul on the layer's q and scales (its SCB is the row absmax, i.e. 127 * s)."""
    import bitsandbytes as bnb
    from bitsandbytes.autograd._functions import MatmulLtState

    state = layer.__dict__.get("_bnb_state")
    if state is None:
        state = MatmulLtState()
        state.has_fp16_weights, state.threshold = False, 6.0  # 6.0: bitsandbytes' Linear8bitLt default
        layer.__dict__["_bnb_state"] = state
    state.CB, state.SCB, state.is_training = layer.weight, layer.weight_scale * QMAX, layer.training
    return bnb.matmul(x, layer.weight, bias=bias, state=state)


def quantize_frozen_linears(model: nn.Module, backend: str = "auto", skip=()) -> list[str]:
    """Replace every nn.Linear (LoRA-wrapped or not) but those named in `skip` by an Int8Linear; returns the names.

    Their weights are frozen from then on (int8 cannot train); adapters added later train as usual.
    Embeddings and convolutions are not touched.
    """
    from .inject import replace_module

    done = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or isinstance(module, Int8Linear) or name in skip:
            continue
        replace_module(model, name, Int8Linear.from_linear(module, backend))
        done.append(name)
    return done


def dequantize(model: nn.Module) -> nn.Module:
    """Turn every Int8Linear back into an fp32 layer (a LoRALinear keeping its adapters, or the plain Linear)."""
    from .inject import replace_module

    for name, module in list(model.named_modules()):
        if isinstance(module, Int8Linear):
            plain = module.to_lora_linear()
            replace_module(model, name, plain if plain.specs else plain.unload())
    return model


def storage_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers (each tensor once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.layout != torch.strided:  # e.g. whisper's sparse alignment-head mask: its indices and values
            t = t.coalesce()
            total += sum(x.numel() * x.element_size() for x in (t.indices(), t.values()))
        elif t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total
