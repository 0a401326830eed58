"""Tokens added to Whisper's vocabulary (--add-tokens): which ones, their first embedding rows, and what they save.

Whisper's byte-level BPE spends several tokens on one Tibetan syllable (OpenPecha counts ~1,551 tokens for 30 s
of Tibetan speech), while the decoder holds 448 positions. Whole-syllable tokens shorten the targets; the
tokenizer that spells them is `text.ExtendedTokenizer`, and a model carries its list as `model.added_tokens`,
so `text.tokenizer_for(model, ...)` gives every caller the same vocabulary. The rows are appended to the tied
token embedding (which is also the output projection): a plain bigger nn.Embedding for full fine-tuning;
under LoRA they are trainable rows beside the frozen base (`lora/rows.py`).
"""
import os
import re
from collections import Counter

import torch
from torch import nn

from whisper_ft.text import N_TEXT_CTX, normalize_text, prefix_tokens, text_units

_TIBETAN_LETTER = re.compile("[\u0f40-\u0fbc]")  # consonants, vowel signs, subjoined letters


def parse_add_tokens(value: str) -> tuple[str, int | str]:
    """--add-tokens value -> ("auto", N) or ("file", PATH); ValueError saying what to pass."""
    if value.startswith("auto:"):
        n = value.removeprefix("auto:")
        if not n.isdigit() or int(n) < 1:
            raise ValueError(f"--add-tokens {value}: expected auto:N with N a positive integer, e.g. auto:500")
        return "auto", int(n)
    if not os.path.isfile(value):
        raise ValueError(f"--add-tokens {value}: no such file; give auto:N (the N most frequent syllables of the "
                         f"training text) or a file of tokens, one per line")
    return "file", value


def read_token_file(path) -> list[str]:
    """Tokens one per line (a leading space is kept: it is part of the token); blank lines skipped."""
    with open(path, encoding="utf-8") as f:
        tokens = [line.rstrip("\r\n") for line in f]
    tokens = [t for t in tokens if t.strip()]
    dup = sorted({t for t in tokens if tokens.count(t) > 1})
    if dup or not tokens:
        raise ValueError(f"--add-tokens {path}: " + (f"token {dup[0]!r} listed twice" if dup else "no tokens"))
    return tokens


def frequent_syllables(texts, n: int, tokenizer) -> list[str]:
    """The n most frequent Tibetan syllables (`text.text_units` with a Tibetan letter, leading space kept) of
    `texts` that the base tokenizer spells in more than one token; ties by the text, so the choice is stable."""
    counts = Counter(u for t in texts for u in text_units(t) if _TIBETAN_LETTER.search(u))
    worth = [(c, u) for u, c in counts.items() if len(tokenizer.encode(u)) > 1]
    return [u for _, u in sorted(worth, key=lambda cu: (-cu[0], cu[1]))[:n]]


def choose_tokens(value: str, texts, tokenizer) -> list[str]:
    """The tokens --add-tokens asks for: auto:N from `texts` (normalised training targets), or a file's."""
    kind, arg = parse_add_tokens(value)
    return frequent_syllables(texts, arg, tokenizer) if kind == "auto" else read_token_file(arg)


@torch.no_grad()
def initial_rows(weight: torch.Tensor, tokens, tokenizer) -> torch.Tensor:
    """One embedding row per token: the mean of the rows of the base tokens that spell it, so the untrained
    model scores a new token like the pieces it replaces (weight: the base [n_vocab, d] embedding)."""
    rows = [weight[tokenizer.encoding.encode(t)].float().mean(0) for t in tokens]
    return torch.stack(rows).to(weight.dtype)


def grow_embedding(model, tokens, tokenizer) -> None:
    """Full fine-tuning: the decoder's token embedding (and tied output projection) becomes one bigger
    nn.Embedding with a row per added token; model.dims.n_vocab and model.added_tokens follow."""
    old = model.decoder.token_embedding
    new = nn.Embedding(old.num_embeddings + len(tokens), old.embedding_dim, device=old.weight.device,
                       dtype=old.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(torch.cat([old.weight, initial_rows(old.weight, tokens, tokenizer)]))
    new.weight.requires_grad_(old.weight.requires_grad)
    model.decoder.token_embedding = new
    set_added_tokens(model, tokens)


def set_added_tokens(model, tokens) -> None:
    """Record `tokens` as the model's added vocabulary (replacing any earlier list) and size dims.n_vocab to it."""
    base = model.dims.n_vocab - len(getattr(model, "added_tokens", ()))
    model.dims.n_vocab = base + len(tokens)
    model.added_tokens = tuple(tokens)


def forget_rowless_tokens(model) -> None:
    """After an adapter is merged: an embedding left without the added rows (the adapter had none) drops the list."""
    if model.decoder.token_embedding.num_embeddings == model.dims.n_vocab - len(getattr(model, "added_tokens", ())):
        set_added_tokens(model, ())


def added_tokens_metadata(model) -> dict:
    """What an adapter file records of the model's added tokens ({} without any): decoding needs the strings."""
    tokens = getattr(model, "added_tokens", ())
    return {"added_tokens": list(tokens)} if tokens else {}


def adapter_tokens(user_metadata: dict) -> tuple:
    return tuple(user_metadata.get("added_tokens") or ())


def decoder_length(text: str, language: str, tokenizer) -> int:
    """Decoder positions a target text takes: the prefix and its tokens (at most N_TEXT_CTX fit)."""
    return len(prefix_tokens(tokenizer)) + len(tokenizer.encode(normalize_text(text, language)))


def token_report(examples, tokenizers: dict) -> dict:
    """{name: {"rows", "tokens", "audio_s", "tokens_per_s", "over_ctx"}} of `examples` (their target text, `duration`)
    under each tokenizer: text tokens per second of audio, and rows whose decoder input (prefix + text) needs
    more than the decoder's 448 positions. Examples without a duration count for tokens, not seconds."""
    out = {}
    for name, tok in tokenizers.items():
        n_prefix = len(prefix_tokens(tok))
        lengths = [decoder_length(e.text, e.language, tok) - n_prefix for e in examples]
        timed = [n for n, e in zip(lengths, examples) if e.duration]
        audio_s = sum(e.duration for e in examples if e.duration)
        out[name] = {"rows": len(lengths), "tokens": sum(lengths), "audio_s": round(audio_s, 1),
                     "tokens_per_s": round(sum(timed) / audio_s, 2) if audio_s else None,
                     "over_ctx": sum(n_prefix + n > N_TEXT_CTX for n in lengths)}
    return out


def format_token_report(report: dict) -> str:
    rows = next(iter(report.values()))["rows"] if report else 0
    return f"{rows} train rows, tokens per second of audio: " + ", ".join(
        f"{name} {r['tokens_per_s']} ({r['tokens']} tokens, {r['over_ctx']} rows over {N_TEXT_CTX} positions)"
        for name, r in report.items())
