"""Set-up shared by train.py and evaluate.py: device, precision, the base model (fp32 or int8), the language."""
from contextlib import nullcontext

import torch

from lora.int8 import quantize_frozen_linears, storage_bytes
from lora.inject import set_active_adapter
from lora.rows import add_rows
from training.memory import keep_freed_memory
from whisper_ft.models import fingerprint, load_model
from whisper_ft.text import resolve_language
from whisper_ft.vocab import grow_embedding, initial_rows, set_added_tokens


def resolve_amp(amp: str, device: str) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None for fp32, whether a GradScaler is needed).

    fp16 on the CPU is never chosen for you (it is slow there), but given explicitly it runs: torch autocasts
    float16 on the CPU and GradScaler("cpu") scales the loss, so a GPU recipe can be dry-run on a CPU."""
    cuda = device.startswith("cuda")
    if amp == "auto":
        amp = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "fp32"
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": None}[amp]
    return dtype, dtype is torch.float16  # bf16 has fp32's range: no loss scaling needed


def select_dialects(dialect: str, sampling: str | None, available: list[str]) -> tuple[list[str], str]:
    """--dialect value -> (dialects to draw from, sampling mode)."""
    if dialect == "balanced":
        include, mode = list(available), "balanced"
    elif dialect == "all":
        include, mode = list(available), "natural"
    else:
        include = [d.strip() for d in dialect.split(",") if d.strip()]
        missing = [d for d in include if d not in available]
        if missing:
            raise SystemExit(f"error: --dialect {dialect}: no training rows for {missing}; "
                             f"the data has {available} (or use balanced / all)")
        mode = "natural" if len(include) == 1 else "balanced"
    return include, sampling or mode


def choose_device(device: str) -> str:
    """"auto" -> cuda when available, else cpu. On the CPU, freed host memory is kept for reuse from here on."""
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    if device == "cpu":
        keep_freed_memory()  # activations live in host memory: reuse it instead of faulting in new pages
    return device


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (avx512_bf16 or AMX); elsewhere torch emulates it, slower than fp32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:  # not Linux: unknown, assume yes rather than warn wrongly
        return True
    return "avx512_bf16" in flags or "amx_bf16" in flags


def precision_note(precision: str, device: str) -> str | None:
    """A line for --precision bf16 on a CPU that would only emulate it (decoding then runs slower, not faster)."""
    if precision == "bf16" and device == "cpu" and not cpu_has_bf16():
        return ("note: this CPU has no bf16 instructions (avx512_bf16 or amx_bf16): --precision bf16 is emulated "
                "here and slower than fp32")
    return None


def autocast_for(amp: str, device: str):
    """(autocast context, autocast dtype or None, whether a GradScaler is needed) for --amp on `device`."""
    dtype, use_scaler = resolve_amp(amp, device)
    ctx = torch.autocast(device_type=device.split(":")[0], dtype=dtype) if dtype else nullcontext()
    return ctx, dtype, use_scaler


def load_base(spec: str, device: str, *, base_8bit: bool = False):
    """(model, fingerprint): the base model, its Linear weights held in int8 with --base-8bit.

    The fingerprint is of the fp32 weights, before any quantisation: adapters trained on the int8 base stay
    portable to the fp32 one (and the other way round).
    """
    model = load_model(spec, device)
    fp = fingerprint(model)
    if base_8bit:
        fp32_mb = storage_bytes(model) / 2**20
        n_int8 = len(quantize_frozen_linears(model))
        print(f"base in int8: {n_int8} Linear layers, weights {fp32_mb:.0f} MB -> {storage_bytes(model) / 2**20:.0f} MB")
    return model, fp


def language_of(code: str, fallback: str | None = None) -> str:
    """--language (with --language-fallback) as a Whisper language code, or one line saying what to pass."""
    try:
        return resolve_language(code, fallback=fallback)
    except ValueError as e:
        raise SystemExit(f"error: --language: {e}") from None


def add_tokens(model, tokens, tokenizer, adapter: str | None = None) -> None:
    """Rows for `tokens` (--add-tokens) on the decoder's tied embedding, initialised from the base tokens that spell
    them (`tokenizer`: the base one): trainable rows of `adapter` beside the frozen base under LoRA, else a
    bigger embedding that trains with every other weight."""
    if adapter is None:
        grow_embedding(model, tokens, tokenizer)
        return
    emb = model.decoder.token_embedding
    add_rows(model, "decoder.token_embedding", adapter, initial_rows(emb.weight, tokens, tokenizer))
    set_active_adapter(model, adapter)  # the adapter was activated before it had rows
    set_added_tokens(model, tokens)
