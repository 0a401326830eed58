"""Embedding rows added per adapter over a frozen nn.Embedding: new tokens that train in LoRA mode.

The base rows stay frozen, as every base weight does; each adapter owns its appended rows (`lora_rows[name]`,
trainable like PEFT's `trainable_token_indices` / `modules_to_save`, saved in its adapter file). `weight` is
what the active adapter sees: the base rows, then its own; with no adapter (or one without rows) it is the
base alone, so the base decodes exactly as before. Whisper ties its output projection to this weight, so the
logits grow and shrink with it.
"""
import torch
import torch.nn.functional as F
from torch import nn


class AddedRows(nn.Module):
    def __init__(self, base: nn.Embedding):
        super().__init__()
        self.base = base
        self.lora_rows = nn.ParameterDict()  # "lora_" in the name: trained, saved and skipped as LoRA tensors are
        self.active: str | None = None
        self._frozen = None  # (key, weight): the concatenation, reused while nothing trains or changes

    @property
    def embedding_dim(self) -> int:
        return self.base.embedding_dim

    @property
    def num_embeddings(self) -> int:
        return self.base.num_embeddings + (len(self.lora_rows[self.active]) if self.active else 0)

    def add_adapter(self, name: str, rows: torch.Tensor) -> None:
        if rows.ndim != 2 or rows.shape[1] != self.embedding_dim:
            raise ValueError(f"rows of shape {tuple(rows.shape)} for an embedding of width {self.embedding_dim}")
        w = self.base.weight
        self.lora_rows[name] = nn.Parameter(rows.detach().to(w.device, w.dtype).clone())

    def remove_adapter(self, name: str) -> None:
        self.lora_rows.pop(name, None)
        if self.active == name:
            self.active = None

    def set_active(self, name: str | None) -> None:
        self.active = name if name in self.lora_rows else None

    @property
    def weight(self) -> torch.Tensor:
        if self.active is None:
            return self.base.weight
        rows, base = self.lora_rows[self.active], self.base.weight
        if torch.is_grad_enabled() and (rows.requires_grad or base.requires_grad):
            return torch.cat([base, rows.to(base.dtype)])  # built per forward, so gradients reach the rows
        # decoding reads the weight twice per step: copy the base once, not every step
        key = (self.active, rows._version, base._version, rows.data_ptr(), base.data_ptr(), base.dtype)
        if self._frozen is None or self._frozen[0] != key:
            self._frozen = (key, torch.cat([base, rows.to(base.dtype)]).detach())
        return self._frozen[1]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)

    def unload(self) -> nn.Embedding:
        """A plain nn.Embedding of what the active adapter sees (the base module itself when it has no rows)."""
        if self.active is None:
            return self.base
        merged = nn.Embedding(self.num_embeddings, self.embedding_dim, device=self.base.weight.device,
                              dtype=self.base.weight.dtype)
        with torch.no_grad():
            merged.weight.copy_(self.weight)
        merged.weight.requires_grad_(False)
        return merged


def add_rows(model: nn.Module, module_name: str, name: str, rows: torch.Tensor) -> AddedRows:
    """Give adapter `name` the appended `rows` on the nn.Embedding at `module_name` (wrapped on first use)."""
    module = model.get_submodule(module_name)
    if not isinstance(module, AddedRows):
        if not isinstance(module, nn.Embedding):
            raise ValueError(f"{module_name} is a {type(module).__name__}, not an nn.Embedding to add rows to")
        module = AddedRows(module)
        parent, _, child = module_name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, module)
    module.add_adapter(name, rows)
    return module


def rows_modules(model: nn.Module, name: str | None = None) -> dict[str, AddedRows]:
    """{module name: AddedRows}, only those holding rows of adapter `name` when it is given."""
    return {n: m for n, m in model.named_modules()
            if isinstance(m, AddedRows) and (name is None or name in m.lora_rows)}
