"""Dialect identification on Whisper's encoder: a small trained head, its file, and the routing rule.

After Voxlect (arXiv 2508.01691): a learned weighted sum of the encoder's layer outputs -> conv1d -> mean and
standard deviation over the clip's own positions (statistics pooling, as x-vectors: on the demo the std told
Utsang from Kham better than the mean alone) -> MLP. The encoder stays frozen (only the head trains), runs at the clip's own
context (never the 30 s padding) and only through the first `n_layers` blocks the head was built for, so
identifying a clip costs a fraction of one encoder pass.

    head = load_dialect_id("runs/lid/dialect_id.safetensors", base_fingerprint=fingerprint(model))
    probs = predict_dialect(model, head, mel, n_frames)      # [B, len(head.labels)], rows sum to 1
    system, label, p = choose_route(probs[0], head.labels, ["amdo", "kham"], threshold=0.5, fallback="base")

The head reads the encoder of the base it was trained on: call `predict_dialect` with no adapter active.
"""
import json
import math
import os
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from whisper_ft.encoder import embed_audio

FORMAT = "whisper_ft.dialect_id"
FORMAT_VERSION = "1"


class DialectHead(nn.Module):
    """Encoder states [n_layers + 1, B, T, n_state] (the input to the first block, then each block's output)
    -> logits [B, len(labels)]."""

    def __init__(self, labels, n_state: int, n_layers: int, n_hidden: int = 256, kernel_size: int = 5,
                 dropout: float = 0.1):
        super().__init__()
        labels = [str(x) for x in labels]
        if len(labels) < 2 or len(set(labels)) != len(labels):
            raise ValueError(f"a dialect-ID head needs two or more distinct labels, got {labels}")
        if n_layers < 0 or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"n_layers {n_layers} must be >= 0 and kernel_size {kernel_size} odd")
        self.labels = labels
        self.n_state, self.n_layers, self.n_hidden = n_state, n_layers, n_hidden
        self.kernel_size, self.dropout = kernel_size, dropout
        self.layer_weights = nn.Parameter(torch.zeros(n_layers + 1))  # softmax: equal weights to start
        self.conv = nn.Conv1d(n_state, n_hidden, kernel_size, padding=kernel_size // 2)
        self.mlp = nn.Sequential(nn.Linear(2 * n_hidden, n_hidden), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(n_hidden, len(labels)))
        self.metadata: dict = {}  # what the file recorded beyond the weights (training, accuracy)

    def config(self) -> dict:
        """What rebuilds this head (saved in its file)."""
        return dict(labels=self.labels, n_state=self.n_state, n_layers=self.n_layers, n_hidden=self.n_hidden,
                    kernel_size=self.kernel_size, dropout=self.dropout)

    def forward(self, states: torch.Tensor, n_positions: torch.Tensor) -> torch.Tensor:
        if states.shape[0] != self.n_layers + 1 or states.shape[-1] != self.n_state:
            raise ValueError(f"states {tuple(states.shape)}: this head reads [{self.n_layers + 1}, B, T, {self.n_state}]")
        # each layer normalised first: the residual stream grows with depth, and the weights should pick layers,
        # not undo their scales
        w = self.layer_weights.softmax(0)
        x = (w[:, None, None, None] * F.layer_norm(states, states.shape[-1:])).sum(0)  # [B, T, C]
        x = F.gelu(self.conv(x.transpose(1, 2)))  # [B, H, T]
        mask = (torch.arange(x.shape[-1], device=x.device) < n_positions.to(x.device)[:, None]).to(x.dtype)[:, None]
        n = mask.sum(-1).clamp(min=1)  # the clip's positions only
        mean = (x * mask).sum(-1) / n
        std = ((((x - mean[..., None]) ** 2) * mask).sum(-1) / n + 1e-5).sqrt()
        return self.mlp(torch.cat([mean, std], -1))


class DialectClassifier(nn.Module):
    """The frozen base and a head as one module, what train.py --task dialect-id trains:
    forward(mel, n_frames) -> logits [B, len(head.labels)]."""

    def __init__(self, whisper, head: DialectHead):
        super().__init__()
        self.whisper, self.head = whisper.requires_grad_(False), head

    def forward(self, mel: torch.Tensor, n_frames: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # the encoder is frozen: no activations kept for backward
            states, positions = encoder_states(self.whisper, mel, n_frames, self.head.n_layers)
        return self.head(states, positions)


def encoder_states(model, mel: torch.Tensor, n_frames: torch.Tensor | None = None, n_layers: int | None = None):
    """(states [n_layers + 1, B, T', n_state], positions [B]) of the base encoder for mel [B, n_mels, T].

    The mel is cropped to its longest clip (`n_frames`, real frames per clip; default all T), so the encoder
    runs at the clip's own context, and only the first `n_layers` blocks run (default: all of them).
    """
    if n_frames is None:
        n_frames = torch.full((mel.shape[0],), mel.shape[-1], dtype=torch.long)
    n_frames = n_frames.to("cpu").clamp(1, mel.shape[-1])
    blocks = model.encoder.blocks
    n_layers = len(blocks) if n_layers is None else n_layers
    if not 0 <= n_layers <= len(blocks):
        raise ValueError(f"n_layers {n_layers}: the encoder has {len(blocks)} blocks")
    frames = min(mel.shape[-1], 2 * math.ceil(int(n_frames.max()) / 2))
    x = embed_audio(model, mel[..., :frames])
    states = [x]
    for block in blocks[:n_layers]:
        x = block(x)
        states.append(x)
    return torch.stack(states), (n_frames + 1) // 2  # conv2 has stride 2: one position per two frames


@torch.no_grad()
def predict_dialect(model, head: DialectHead, mel: torch.Tensor, n_frames: torch.Tensor | None = None) -> torch.Tensor:
    """Probabilities [B, len(head.labels)] of each clip's dialect (rows sum to 1). mel: [B, n_mels, T] log-mel;
    n_frames: real frames per clip (default: all T). `model` is the base the head was trained on, no adapter."""
    if mel.ndim == 2:
        mel = mel.unsqueeze(0)
    param = next(model.parameters())
    states, positions = encoder_states(model, mel.to(param.device, param.dtype), n_frames, head.n_layers)
    dtype = head.layer_weights.dtype
    return head(states.to(head.layer_weights.device, dtype), positions).float().softmax(-1)


def save_dialect_id(head: DialectHead, path, *, base_fingerprint: str, metadata: dict | None = None) -> None:
    """One safetensors file: the head's weights, and as metadata its labels, config and the base's fingerprint."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "base_fingerprint": str(base_fingerprint),
            "labels": json.dumps(head.labels, ensure_ascii=False), "config": json.dumps(head.config()),
            "user_metadata": json.dumps(metadata or {}, sort_keys=True, ensure_ascii=False)}
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    save_file(tensors, tmp, metadata=meta)
    os.replace(tmp, path)  # never a half-written file under the real name


def load_dialect_id(path, *, base_fingerprint: str, device="cpu") -> DialectHead:
    """The head saved in `path`, in eval mode; ValueError saying why for a missing or foreign file, or one
    trained on another base (its encoder states would mean nothing to the head)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file (train one with train.py --task dialect-id)")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own types for truncated or foreign files
        raise ValueError(f"{path}: not a safetensors file ({type(e).__name__}); it is corrupt or of another kind") from None
    if meta.get("format") != FORMAT:
        kind = "a LoRA adapter" if "targets" in meta else "not a dialect-ID file"
        raise ValueError(f"{path}: {kind}; pass the dialect_id.safetensors of a train.py --task dialect-id run")
    if meta.get("base_fingerprint") != str(base_fingerprint):
        raise ValueError(f"{path} was trained on base {meta.get('base_fingerprint')} but this model is "
                         f"{base_fingerprint}; load the base it was trained on, or train the head on this one")
    try:
        head = DialectHead(**json.loads(meta["config"]))
        head.load_state_dict(tensors)
        head.metadata = json.loads(meta.get("user_metadata") or "{}")
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"{path}: dialect-ID file with bad contents ({str(e).splitlines()[0][:200]})") from None
    return head.to(device).eval()


def choose_route(probs_row, labels, adapters, *, threshold: float = 0.0, fallback: str = "base"):
    """(system, label, prob): the most probable label, its probability, and the system to decode the clip with.

    `adapters`: the adapter names (a dialect goes to the adapter of its name) or {dialect: adapter name}. The
    clip goes to its predicted dialect's adapter, or to `fallback` (a system name, e.g. "base") where no adapter
    is for that dialect or the probability is under `threshold`.
    """
    probs_row = torch.as_tensor(probs_row, dtype=torch.float32).flatten()
    if probs_row.numel() != len(labels):
        raise ValueError(f"{probs_row.numel()} probabilities for {len(labels)} labels")
    i = int(probs_row.argmax())
    label, prob = labels[i], float(probs_row[i])
    route = adapters if isinstance(adapters, Mapping) else {a: a for a in adapters}
    target = route.get(label)
    return (fallback if target is None or prob < threshold else target), label, prob
