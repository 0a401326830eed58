"""Read audio with soundfile, bring it to 16 kHz mono float32, and compute Whisper's log-mel.

Why not whisper.load_audio / torchaudio.load: the first shells out to ffmpeg, the second needs
torchcodec; neither is guaranteed to exist. soundfile (libsndfile) reads wav/flac/ogg/mp3 in-process.
"""
import io
import os

import numpy as np
import soundfile as sf
import torch
import whisper

SAMPLE_RATE = 16000
HOP_LENGTH = 160
N_SAMPLES = 30 * SAMPLE_RATE  # one Whisper window: 30 s
N_FRAMES = N_SAMPLES // HOP_LENGTH  # 3000 mel frames per window
MAX_SECONDS = N_SAMPLES / SAMPLE_RATE


class AudioError(ValueError):
    """A clip that cannot be used; the message names the clip and the reason.

    kind is a stable key for counting: unreadable, empty, non_finite, silent, too_long.
    """

    def __init__(self, path, reason: str, kind: str = "unreadable"):
        self.path, self.reason, self.kind = path, reason, kind
        super().__init__(f"{path}: {reason}")


def to_16k_mono(wav: np.ndarray, sr: int) -> np.ndarray:
    """Downmix (frames, channels) by averaging, resample to 16 kHz, return contiguous float32 [n]."""
    wav = np.asarray(wav, dtype=np.float32)
    if wav.ndim == 2:
        wav = wav.mean(axis=1)
    elif wav.ndim != 1:
        raise ValueError(f"audio must be [samples] or [samples, channels], got shape {wav.shape}")
    if sr != SAMPLE_RATE:
        import torchaudio.functional as AF  # imported here: only resampling needs torchaudio

        wav = AF.resample(torch.from_numpy(np.ascontiguousarray(wav)), int(sr), SAMPLE_RATE).numpy()
    return np.ascontiguousarray(wav, dtype=np.float32)


def read_audio(path) -> np.ndarray:
    """Read a file path (or raw encoded bytes) to float32 mono 16 kHz; AudioError if unreadable."""
    name = "<bytes>" if isinstance(path, (bytes, bytearray)) else os.fspath(path)
    if not isinstance(path, (bytes, bytearray)) and not os.path.isfile(name):
        raise AudioError(name, "unreadable audio: file not found")
    try:
        src = io.BytesIO(path) if isinstance(path, (bytes, bytearray)) else name
        wav, sr = sf.read(src, dtype="float32", always_2d=False)
    except Exception as e:  # libsndfile raises several types (LibsndfileError, RuntimeError, OSError)
        raise AudioError(name, f"unreadable audio: {sndfile_reason(e, name)}") from None
    return to_16k_mono(wav, sr)


def sndfile_reason(e: Exception, name: str) -> str:
    """libsndfile's message without the path it repeats ("Error opening '/x.wav': Format not recognised.")."""
    return str(e).replace(f"Error opening {name!r}: ", "").strip() or type(e).__name__


def check_waveform(wav: np.ndarray, name="<array>", max_samples: int | None = N_SAMPLES) -> None:
    """Raise AudioError(reason) for a clip Whisper cannot learn from: empty, non-finite, silent, > 30 s.
    max_samples=None accepts any length (long recordings are cut into windows by their reader)."""
    if wav.size == 0:
        raise AudioError(name, "empty audio (0 samples)", "empty")
    if not np.all(np.isfinite(wav)):
        raise AudioError(name, "non-finite samples (NaN or inf)", "non_finite")
    if float(np.max(np.abs(wav))) < 1e-4:  # about -80 dBFS: digital silence or a dead microphone
        raise AudioError(name, "silent audio (peak below 1e-4)", "silent")
    if max_samples is not None and wav.size > max_samples:
        raise AudioError(name, f"longer than 30 s ({wav.size / SAMPLE_RATE:.1f} s): Whisper sees one 30 s window",
                         "too_long")


def n_frames_of(num_samples: int) -> int:
    """Real (non-padding) mel frames of a clip, as whisper.transcribe counts content_frames, capped at one window."""
    return min(int(num_samples) // HOP_LENGTH, N_FRAMES)


def log_mel(wav, n_mels: int = 80, n_frames: int = N_FRAMES) -> torch.Tensor:
    """[n_mels, n_frames] log-mel exactly as whisper.transcribe builds its first window.

    transcribe pads 30 s of zeros before the STFT (so the last real frames see zeros, not reflection)
    and normalises against the max of that padded spectrogram, then pad_or_trim's to 3000 frames.
    """
    audio = torch.as_tensor(np.ascontiguousarray(wav, dtype=np.float32))
    mel = whisper.log_mel_spectrogram(audio, n_mels, padding=N_SAMPLES)
    return whisper.pad_or_trim(mel, n_frames)
