"""Whisper's audio encoder on a shorter-than-30-s window ("dynamic encoder context").

Why whisper's own `AudioEncoder.forward` asserts the full [n_mels, 3000] shape: its sinusoidal
positional embedding is one fixed [n_audio_ctx, n_state] buffer added by broadcasting, so any other
length would either fail to broadcast or (with a length-1 edge case) broadcast silently wrong; and the
released models were only ever trained on 30 s windows, zero-padded (log-mel of silence) after the
speech. Nothing in the convolutions or the attention blocks depends on the length, though: slicing
the embedding to the first T//2 positions gives the same computation on the frames that exist and
just skips the padding. The cost of the encoder drops roughly linearly (attention quadratically), so
a 5 s clip encoded at T=500 costs about 1/6 of the 30 s window. The trade-off: the decoder never saw
such short contexts in pre-training, so text can change (bench/bench_decode.py measures by how much);
fine-tuning with `enable_dynamic_audio_ctx` lets the model adapt to it.
"""
import types

import torch
import torch.nn.functional as F

AUDIO_CTX_HELP = ("full (30 s windows), auto (crop to the batch's longest clip), auto+N (the same plus N frames of "
                  "the window's padding; auto+1800 kept the base model's 30 s text on 16/16 bench clips: "
                  "bench/README.md), or an even frame count <= 3000")


def audio_ctx_value(value):
    """--audio-ctx's value -> "full", "auto", "auto+N" (N even frames) or an even int <= 3000; ValueError otherwise.

    auto+N keeps N frames (10 ms each) of the window's zero padding after the batch's longest clip: the
    released models never saw a window shorter than 30 s, and how much padding follows the speech changes
    what they write (bench/bench_decode.py measures it); N = 1800 keeps 18 s of it."""
    text = str(value)
    if text in ("full", "auto"):
        return text
    margin = text[len("auto+"):] if text.startswith("auto+") else None
    number = margin if margin is not None else text
    if not number.isdigit() or int(number) % 2 or not 0 < int(number) <= 3000:
        raise ValueError(f"--audio-ctx {text!r}: expected full, auto, auto+N or an even number of frames <= 3000 "
                         f"(N: even frames of padding, 10 ms each)")
    return f"auto+{int(number)}" if margin is not None else int(number)


def check_mel(model, mel: torch.Tensor) -> None:
    """Raise ValueError naming the problem unless mel is [B, n_mels, T] with an even T <= 2*n_audio_ctx."""
    if not isinstance(mel, torch.Tensor) or mel.ndim != 3:
        shape = tuple(mel.shape) if isinstance(mel, torch.Tensor) else type(mel).__name__
        raise ValueError(f"mel must be a tensor [batch, n_mels, frames], got {shape}")
    # read from the encoder itself, so a patched encoder needs no back-reference to its model
    n_mels = model.encoder.conv1.in_channels
    max_t = 2 * model.encoder.positional_embedding.shape[0]
    _, m, t = mel.shape
    if m != n_mels:
        raise ValueError(f"mel has {m} mel bins but the model expects n_mels={n_mels}")
    if t % 2 or not 0 < t <= max_t:
        raise ValueError(f"mel has {t} frames; need an even number in 2..{max_t} "
                         f"(pad to an even length, crop to {max_t})")


def encode(model, mel: torch.Tensor) -> torch.Tensor:
    """Audio features [B, T//2, n_audio_state] for mel [B, n_mels, T], any even T <= 3000.

    The same operations, in the same order, as `whisper.model.AudioEncoder.forward`, except that the
    positional embedding is sliced to the frames present; for T=3000 the result is bitwise equal.
    """
    x = embed_audio(model, mel)
    for block in model.encoder.blocks:
        x = block(x)
    return model.encoder.ln_post(x)


def embed_audio(model, mel: torch.Tensor) -> torch.Tensor:
    """The encoder's input to its first block, [B, T//2, n_audio_state]: convolutions and positions."""
    check_mel(model, mel)
    enc = model.encoder
    x = F.gelu(enc.conv1(mel))
    x = F.gelu(enc.conv2(x))
    # contiguous: whisper's permuted view makes every residual add keep the [B, C, T] layout, and then
    # every LayerNorm, forward and backward, copies its input to contiguous first
    x = x.permute(0, 2, 1).contiguous()
    return (x + enc.positional_embedding[: x.shape[1]]).to(x.dtype)


def _dynamic_forward(self, x: torch.Tensor) -> torch.Tensor:
    # bound to the encoder instance (`self` is the AudioEncoder); encode() only touches `.encoder`
    return encode(types.SimpleNamespace(encoder=self), x)


class DynamicAudioCtx:
    """Handle returned by `enable_dynamic_audio_ctx`; `.remove()` or leaving a `with` block undoes it."""

    def __init__(self, model):
        self.model = model

    def remove(self) -> None:
        disable_dynamic_audio_ctx(self.model)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def enable_dynamic_audio_ctx(model) -> DynamicAudioCtx:
    """Let `model(mel, tokens)`, `model.embed_audio(mel)` and `model.encoder(mel)` take shorter mels.

    Patches `forward` on this encoder instance only (other models and the class stay untouched; module
    hooks and wrapped submodules such as LoRA layers keep working because `encode` calls the same
    submodules). Idempotent; undo with the returned handle's `.remove()` or `disable_dynamic_audio_ctx`.
    """
    enc = model.encoder
    if not is_dynamic_audio_ctx(model):
        enc.forward = types.MethodType(_dynamic_forward, enc)
    return DynamicAudioCtx(model)


def disable_dynamic_audio_ctx(model) -> None:
    """Restore whisper's own (full-window-only) encoder forward; no-op when not enabled."""
    enc = model.encoder
    if is_dynamic_audio_ctx(model):
        del enc.forward  # the instance attribute; the class method shows through again


def is_dynamic_audio_ctx(model) -> bool:
    return "forward" in vars(model.encoder)
