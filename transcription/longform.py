"""One recording of any length -> timed segments: its windows (windows.py) decoded in batches, with whisper's
hallucination controls that matter on fine-tuned models.

- No-speech skipping, as whisper.transcribe: a window whose P(<|nospeech|>) exceeds 0.6 *and* whose text has an
  average log-probability below -1 is dropped (either alone is too eager: a fine-tuned model was never taught the
  no-speech token, and a confident short text is kept).
- A looped window (the loop guard of whisper_ft.decoding stopped it) is decoded again once with beam search, the
  fallback that costs least; whisper's temperature ladder would sample, which makes transcripts irreproducible.
  Windows still looped after it are kept (their text up to where the guard stopped) and counted.
No previous-text conditioning: the adapters are trained without a prompt, and it carries a loop into the next
window.
"""
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from data.collate import batch_frames
from whisper_ft.audio import SAMPLE_RATE, log_mel, n_frames_of
from whisper_ft.decoding import audio_features_for, decode, no_speech_probs

from .windows import speech_windows

NO_SPEECH_THRESHOLD = 0.6  # whisper.transcribe's defaults
LOGPROB_THRESHOLD = -1.0
FALLBACK_BEAM = 5
MAX_TOKENS = 224  # whisper's sample_len for a 30 s window


@dataclass
class Segment:
    start: float  # seconds from the start of the recording
    end: float
    text: str
    avg_logprob: float
    no_speech_prob: float
    looped: bool  # still looped after the fallback


@dataclass
class Transcript:
    segments: list = field(default_factory=list)  # [Segment] with text, in time order
    windows: int = 0
    looped_windows: int = 0  # looped at the first decode
    looped_after_fallback: int = 0
    no_speech_windows: int = 0  # skipped as no speech

    @property
    def text(self) -> str:
        return " ".join(s.text for s in self.segments)

    def to_json(self) -> dict:
        return {"text": self.text, "segments": [asdict(s) for s in self.segments],
                **{k: getattr(self, k) for k in ("windows", "looped_windows", "looped_after_fallback",
                                                 "no_speech_windows")}}


@torch.no_grad()
def transcribe_waveform(model, wav: np.ndarray, tokenizer, *, audio_ctx="full", batch_size: int = 16,
                        beam_size: int = 1, on_batch=None, precision: str = "fp32") -> Transcript:
    """Transcript of `wav` (16 kHz mono float32, any length). Windows are batched longest first (least padding);
    `on_batch(seconds)` is called after each batch with the audio seconds it covered (for a progress bar)."""
    model.eval()
    windows = sorted(speech_windows(wav), key=lambda w: w[0] - w[1])
    out = Transcript(windows=len(windows))
    found = []
    for i in range(0, len(windows), batch_size):
        batch = windows[i:i + batch_size]
        found += _decode_batch(model, [wav[a:b] for a, b in batch], batch, tokenizer, audio_ctx, beam_size, out,
                               precision)
        if on_batch is not None:
            on_batch(sum(b - a for a, b in batch) / SAMPLE_RATE)
    out.segments = sorted(found, key=lambda s: s.start)
    return out


def _decode_batch(model, clips, spans, tokenizer, audio_ctx, beam_size, out: Transcript, precision="fp32") -> list:
    """[Segment] of one batch of windows; `out`'s counters are updated."""
    n_frames = [n_frames_of(c.size) for c in clips]
    T = batch_frames(audio_ctx, n_frames)
    mel = torch.stack([log_mel(c, model.dims.n_mels)[:, :T] for c in clips])
    xa = audio_features_for(model, mel, precision)
    p_none = no_speech_probs(model, xa, tokenizer)
    hyps = [h[0] for h in decode(model, None, tokenizer, audio_features=xa, beam_size=beam_size,
                                 max_tokens=MAX_TOKENS, precision=precision)]
    looped = [i for i, h in enumerate(hyps) if h.looped]
    out.looped_windows += len(looped)
    if looped:
        again = decode(model, None, tokenizer, audio_features=xa[looped], beam_size=max(FALLBACK_BEAM, beam_size),
                       max_tokens=MAX_TOKENS, precision=precision)
        for i, h in zip(looped, again):
            hyps[i] = h[0]
        out.looped_after_fallback += sum(hyps[i].looped for i in looped)
    segments = []
    for (a, b), h, p in zip(spans, hyps, p_none):
        if p > NO_SPEECH_THRESHOLD and h.avg_logprob < LOGPROB_THRESHOLD:
            out.no_speech_windows += 1
            continue
        # a loop stopped mid-character leaves half a UTF-8 sequence, decoded as U+FFFD
        text = h.text.rstrip("\ufffd").strip()
        if text:
            segments.append(Segment(start=round(a / SAMPLE_RATE, 3), end=round(b / SAMPLE_RATE, 3), text=text,
                                    avg_logprob=round(h.avg_logprob, 4), no_speech_prob=round(p, 4),
                                    looped=h.looped))
    return segments
