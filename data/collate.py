"""Examples -> batches: a Dataset that turns one Example into a log-mel, and a Collator that pads.

SpecAugment is deliberately absent: the training loop applies it on the device, using batch.n_frames
so masks fall on real frames only.
"""
import logging
import math
from collections import Counter
from dataclasses import dataclass, fields

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from whisper_ft.audio import N_FRAMES, AudioError, check_waveform, log_mel, n_frames_of, read_audio
from whisper_ft.encoder import audio_ctx_value
from whisper_ft.text import IGNORE_INDEX, N_TEXT_CTX, normalize_text, target_tokens

log = logging.getLogger(__name__)

AUTO_MULTIPLE = 100  # "auto" context rounds frames up to this: 100 frames = 1 s = 50 encoder positions
@dataclass
class Batch:
    mel: torch.Tensor  # [B, n_mels, T] float32 log-mel, T = the batch's encoder input frames
    n_frames: torch.Tensor  # [B] long: real (non-padding) frames of each clip, <= T
    decoder_input: torch.Tensor  # [B, L] long: prefix + text tokens, padded with <|endoftext|>
    targets: torch.Tensor  # [B, L] long: next tokens; -100 on prefix positions and padding
    dialects: list[str]
    texts: list[str]  # the normalised target texts
    ids: list[str]
    dropped: int = 0  # clips of this batch that failed to load and were left out
    dialect_ids: torch.Tensor | None = None  # [B] long: index of each clip's dialect in the Collator's labels

    def to(self, device, non_blocking: bool = True) -> "Batch":
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "Batch":  # DataLoader(pin_memory=True) calls this on custom batch types
        return self._map(lambda t: t.pin_memory())

    def _map(self, fn) -> "Batch":
        return Batch(**{f.name: (fn(v) if torch.is_tensor(v) else v)
                        for f in fields(self) for v in [getattr(self, f.name)]})

    def __len__(self) -> int:
        return len(self.ids)


class SpeechDataset(Dataset):
    """examples[i] -> {"mel", "n_frames", "example"}, or None if the clip turns out unusable.

    Returning None (counted in `self.failures`, logged once per clip) instead of raising means a bad clip
    discovered late, e.g. silent audio that passed the cheap header-only validation, never stops a run.
    wave_augment(wav, rng) gets an rng seeded from (seed, epoch, index): the same epoch replays exactly.
    With DataLoader workers the counts live in the workers; the main process sees `Batch.dropped`.
    """

    def __init__(self, examples, *, n_mels: int = 80, wave_augment=None, seed: int = 0):
        self.examples = list(examples)
        self.n_mels, self.wave_augment, self.seed = n_mels, wave_augment, int(seed)
        self.epoch = 0
        self.failures: Counter = Counter()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.examples)

    def load_waveform(self, index: int) -> np.ndarray:
        ex = self.examples[index]
        if isinstance(ex.audio, np.ndarray):
            wav = np.asarray(ex.audio, dtype=np.float32)
        else:
            wav = read_audio(ex.audio)
        check_waveform(wav, ex.audio if isinstance(ex.audio, str) else ex.id)
        return wav

    def __getitem__(self, index: int):
        ex = self.examples[index]
        try:
            wav = self.load_waveform(index)
        except AudioError as e:
            self.failures[e.kind] += 1
            log.warning("skipping clip %s: %s", ex.id, e)
            return None
        if self.wave_augment is not None:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            wav = np.asarray(self.wave_augment(wav, rng), dtype=np.float32)
        return {"mel": log_mel(wav, self.n_mels), "n_frames": n_frames_of(wav.size), "example": ex}


def batch_frames(audio_ctx, n_frames: list[int]) -> int:
    """Mel frames a batch is cropped/padded to: 3000 for "full"; for "auto" its longest clip rounded up to
    AUTO_MULTIPLE, for "auto+N" the same after adding N frames; an int as given."""
    if audio_ctx == "full":
        return N_FRAMES
    if isinstance(audio_ctx, str) and audio_ctx.startswith("auto"):
        margin = int(audio_ctx[len("auto+"):] or 0)
        longest = max(max(n_frames), 1) + margin
        return min(N_FRAMES, math.ceil(longest / AUTO_MULTIPLE) * AUTO_MULTIPLE)
    return audio_ctx


class Collator:
    """List of SpeechDataset items -> Batch (None items are dropped; an all-None batch gives None).

    audio_ctx: "full" pads to 3000 frames (what Whisper was trained on); "auto" crops to the longest clip
    rounded up to a multiple of 100 frames (faster on short clips; the encoder then sees T/2 positions);
    "auto+N" keeps N frames of padding after that clip; an int crops/pads every batch to that many frames
    (even, <= 3000).
    Every example is prefixed with the tokenizer's language and task; texts are normalised per their
    own Example.language. With `labels` (a dialect list), batches carry each clip's index in it (-100: none).
    """

    def __init__(self, tokenizer, *, n_mels: int = 80, audio_ctx="full", task: str = "transcribe", labels=None):
        if audio_ctx_value(audio_ctx) != audio_ctx:  # "1500" (a string) would crop by string comparison later
            raise ValueError(f"audio_ctx {audio_ctx!r}: expected 'full', 'auto', 'auto+N' or an even int in "
                             f"(0, {N_FRAMES}]")
        self.tokenizer, self.n_mels, self.audio_ctx, self.task = tokenizer, n_mels, audio_ctx, task
        self.labels = {d: i for i, d in enumerate(labels)} if labels is not None else None

    def frames_for(self, n_frames: list[int]) -> int:
        return batch_frames(self.audio_ctx, n_frames)

    def __call__(self, items) -> Batch | None:
        kept = [it for it in items if it is not None]
        if not kept:
            return None
        T = self.frames_for([it["n_frames"] for it in kept])
        mel = torch.stack([it["mel"][:, :T] for it in kept])
        if mel.shape[1] != self.n_mels:
            raise ValueError(f"dataset made {mel.shape[1]} mel bins but the collator expects {self.n_mels}")
        n_frames = torch.tensor([min(it["n_frames"], T) for it in kept], dtype=torch.long)

        texts, seqs = [], []
        for it in kept:
            ex = it["example"]
            text = normalize_text(ex.text, ex.language)
            dec, tgt = target_tokens(self.tokenizer, text, self.task)
            if len(dec) > N_TEXT_CTX:  # validation removes these; reaching here means it was bypassed
                raise ValueError(f"example {ex.id}: {len(dec)} decoder tokens > {N_TEXT_CTX}; "
                                 f"load data through data.sources.load_examples so it is validated")
            texts.append(text)
            seqs.append((dec, tgt))
        L = max(len(d) for d, _ in seqs)
        decoder_input = torch.full((len(kept), L), self.tokenizer.eot, dtype=torch.long)
        targets = torch.full((len(kept), L), IGNORE_INDEX, dtype=torch.long)
        for b, (dec, tgt) in enumerate(seqs):
            decoder_input[b, :len(dec)] = torch.tensor(dec)
            targets[b, :len(tgt)] = torch.tensor(tgt)
        exs = [it["example"] for it in kept]
        dialect_ids = None if self.labels is None else \
            torch.tensor([self.labels.get(e.dialect, IGNORE_INDEX) for e in exs], dtype=torch.long)
        return Batch(mel=mel, n_frames=n_frames, decoder_input=decoder_input, targets=targets,
                     dialects=[e.dialect for e in exs], texts=texts, ids=[e.id for e in exs],
                     dropped=len(items) - len(kept), dialect_ids=dialect_ids)


def make_loader(dataset, sampler, collator, batch_size: int, num_workers: int = 0, *, drop_last: bool = False,
                pin_memory: bool | None = None, prefetch_factor: int | None = None) -> DataLoader:
    """DataLoader over `sampler`'s indices. Workers are not persistent, so each epoch's workers get a fresh
    copy of the dataset carrying the epoch set by dataset.set_epoch (augmentation seeds depend on it).
    Batches may be None when every clip of a batch failed to load: skip them."""
    kw = {"prefetch_factor": prefetch_factor} if num_workers > 0 and prefetch_factor else {}
    # A private generator: each new DataLoader iterator draws a base seed from it, and drawing it from the
    # global RNG instead would shift dropout after a mid-epoch resume (which creates an extra iterator).
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collator,
                      num_workers=num_workers, drop_last=drop_last, generator=torch.Generator().manual_seed(0),
                      pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory, **kw)
