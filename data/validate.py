"""Check every row before training: skip and count the bad ones by reason, never lose a good one.

Audio checks are kept cheap: a file path is checked from its header (soundfile.info: readable, empty,
longer than 30 s) unless audio_check="full", which decodes it once more to find silent / non-finite
clips. Anything the header cannot see is caught again, skip-and-count, by SpeechDataset at load time.
In-memory arrays are always fully checked (they are already decoded).
"""
import os
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import soundfile as sf
import whisper

from whisper_ft.audio import MAX_SECONDS, AudioError, check_waveform, read_audio, sndfile_reason
from whisper_ft.text import N_TEXT_CTX, normalize_text

# reason key -> what the log says; the keys are also AudioError.kind for audio reasons
REASONS = {
    "unreadable": "audio unreadable",
    "empty": "audio empty",
    "silent": "audio silent",
    "too_long": f"audio longer than {MAX_SECONDS:.0f} s",
    "non_finite": "audio has NaN/inf",
    "download_failed": "audio download failed",
    "empty_text": "text empty",
    "text_too_long": f"text longer than the decoder's {N_TEXT_CTX} tokens (with prefix)",
    "unknown_dialect": "unknown dialect label",
}
PREFIX_LEN = 4  # <|startoftranscript|><|lang|><|transcribe|><|notimestamps|>
N_NAMED = 3  # bad rows named per reason in the summary


class DataError(ValueError):
    """strict=True and some rows were bad; the message is the report's summary."""


@dataclass
class ValidationReport:
    source: str
    total: int = 0  # rows seen (after grade / max_rows filters)
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> rows
    named: dict = field(default_factory=dict)  # reason -> first few "id (detail)"
    notes: Counter = field(default_factory=Counter)  # not errors: resampled, downmixed, filtered_grade, ...
    labels: Counter = field(default_factory=Counter)  # every row's dialect label, kept or not
    accepted: list | None = None  # the labels accepted (None: any)

    def bad(self, reason: str, name: str, detail: str = "") -> None:
        self.skipped[reason] += 1
        first = self.named.setdefault(reason, [])
        if len(first) < N_NAMED:
            first.append(f"{name} ({detail})" if detail else name)

    @property
    def n_bad(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        """One short paragraph for the log."""
        head = f"{self.source}: kept {self.kept} of {self.total} rows"
        if not self.n_bad:
            head += ", none skipped"
        else:
            parts = [f"{n} {REASONS.get(r, r)} (e.g. {', '.join(self.named.get(r, []))})"
                     for r, n in self.skipped.most_common()]
            head += f"; skipped {self.n_bad}: " + "; ".join(parts)
        if self.notes:
            head += ". Notes: " + ", ".join(f"{n} {k}" for k, n in sorted(self.notes.items()))
        return head + "."

    def dialect_hint(self) -> str:
        """What to pass when rows were skipped for their dialect label ('' when none was): the --dialects value
        that accepts every label the data has."""
        seen = sorted(label for label in self.labels if label)
        if not self.skipped.get("unknown_dialect") or not seen:
            return ""
        return (f"rows with dialect labels outside {self.accepted} were skipped: to use the data's own labels pass "
                f"--dialects {','.join(seen)} (or --dialects any), or rename them with --dialect-map RAW=LABEL")

    def raise_if_bad(self) -> None:
        if self.n_bad:
            raise DataError(f"strict: {self.summary()} Fix or remove these rows, or run without strict "
                            f"to skip them.")


def validate_examples(examples, report: ValidationReport, *, audio_check: str = "header",
                      allowed_dialects=None, known_bad=(), check_text_length: bool = True) -> list:
    """Return the good examples (order kept) and fill `report`.

    allowed_dialects: labels accepted (None: any non-empty label). known_bad: (example, reason, detail)
    already found by the loader (e.g. failed downloads), counted here so the report is complete.
    """
    if audio_check not in ("header", "full"):
        raise ValueError(f"audio_check {audio_check!r}: expected 'header' or 'full'")
    # token counts do not depend on the language; None: the caller checks the length with its own tokenizer
    tok = whisper.tokenizer.get_tokenizer(multilingual=True) if check_text_length else None
    allowed = None if allowed_dialects is None else set(allowed_dialects)
    report.accepted = None if allowed is None else sorted(allowed)
    for ex, reason, detail in known_bad:
        report.total += 1
        report.bad(reason, ex.id, detail)
    good = []
    for ex in examples:
        report.total += 1
        report.labels[ex.dialect] += 1
        reason, detail = _check(ex, tok, allowed, audio_check, report)
        if reason is None:
            good.append(ex)
        else:
            report.bad(reason, ex.id, detail)
    report.kept = len(good)
    return good


def _check(ex, tok, allowed, audio_check, report):
    if not ex.dialect or (allowed is not None and ex.dialect not in allowed):
        hint = (f"expected one of {sorted(allowed)}; map it with --dialect-map RAW=LABEL, or accept it with "
                f"--dialects (a list, or any)") if allowed else "no label"
        return "unknown_dialect", f"{ex.dialect!r}: {hint}"
    text = normalize_text(ex.text or "", ex.language)
    if not text:
        return "empty_text", "blank after normalisation"
    n_tok = PREFIX_LEN + len(tok.encode(text)) if tok is not None else 0
    if n_tok > N_TEXT_CTX:
        return "text_too_long", f"{n_tok} tokens"
    try:
        _check_audio(ex, audio_check, report)
    except AudioError as e:
        return e.kind, e.reason
    return None, ""


def _check_audio(ex, audio_check, report):
    if isinstance(ex.audio, np.ndarray):
        check_waveform(ex.audio, ex.id)
        if ex.duration is None:
            ex.duration = ex.audio.size / 16000
        return
    if ex.duration is not None and ex.duration > MAX_SECONDS:  # metadata says so: no need to open the file
        raise AudioError(ex.audio, f"{ex.duration:.1f} s per metadata", "too_long")
    if not os.path.isfile(ex.audio):
        raise AudioError(ex.audio, f"file not found: {ex.audio}")
    try:
        info = sf.info(ex.audio)
    except Exception as e:
        raise AudioError(ex.audio, f"{ex.audio}: {sndfile_reason(e, ex.audio)}") from None
    if info.frames == 0:
        raise AudioError(ex.audio, "0 samples", "empty")
    seconds = info.frames / info.samplerate
    if seconds > MAX_SECONDS:
        raise AudioError(ex.audio, f"{seconds:.1f} s", "too_long")
    if info.samplerate != 16000:
        report.notes[f"resampled from {info.samplerate} Hz"] += 1
    if info.channels > 1:
        report.notes["downmixed to mono"] += 1
    ex.duration = seconds
    if audio_check == "full":
        check_waveform(read_audio(ex.audio), ex.audio)  # its reasons are already short
    else:
        report.notes["silence/NaN checks deferred to loading"] += 1
