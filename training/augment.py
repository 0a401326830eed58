"""Waveform augmentation for training: speed perturbation, pitch shift, additive noise, gain.

Runs in data workers on one clip at a time: float32 mono 16 kHz numpy in, same out, CPU only, and
every random choice comes from the `np.random.Generator` the caller passes, so a worker seeded from
(seed, epoch, index) reproduces its clips. Each operation has its own probability; all are off by default.

Order: speed -> pitch -> noise -> gain, then the clip is scaled down (never clipped) if its peak
exceeds 1, which keeps the SNR that was asked for.
"""

import argparse
import math
import os
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import soundfile
import torch
import torchaudio.functional as AF

SAMPLE_RATE = 16000


def _resample(wav: torch.Tensor, orig: int, new: int) -> torch.Tensor:
    # torchaudio divides both rates by their gcd and builds a kernel of size ~ new/gcd; rates rounded
    # to multiples of 100 Hz keep that at most 160 taps wide (fast) for any ratio.
    return AF.resample(wav, orig, new) if orig != new else wav


def _rate_multiple_of_100(rate: float) -> int:
    return max(100, int(round(rate / 100.0)) * 100)


def speed_perturb(wav: np.ndarray, factor: float, sr: int = SAMPLE_RATE) -> np.ndarray:
    """Play the clip `factor` times faster (Kaldi/sox "speed"): duration / factor, pitch * factor,
    still at `sr`. Done by resampling as if the clip had been recorded at sr * factor."""
    if factor == 1.0 or len(wav) == 0:
        return wav
    src = _rate_multiple_of_100(sr * factor)  # 0.9, 1.1 -> 14400, 17600 exactly
    return _resample(torch.from_numpy(wav), src, sr).numpy()


def time_stretch(wav: np.ndarray, length: int, n_fft: int = 512, hop: int = 128) -> np.ndarray:
    """Phase-vocoder stretch of `wav` to exactly `length` samples, keeping its pitch."""
    if len(wav) == length or len(wav) < n_fft:
        out = np.zeros(length, dtype=np.float32)
        out[:min(length, len(wav))] = wav[:length]
        return out
    window = torch.hann_window(n_fft)
    spec = torch.stft(torch.from_numpy(wav), n_fft, hop, window=window, return_complex=True)
    phase_advance = torch.linspace(0, math.pi * hop, spec.shape[0])[:, None]
    stretched = AF.phase_vocoder(spec, len(wav) / length, phase_advance)
    return torch.istft(stretched, n_fft, hop, window=window, length=length).numpy()


def pitch_shift(wav: np.ndarray, semitones: float, sr: int = SAMPLE_RATE) -> np.ndarray:
    """Shift pitch by `semitones` keeping the duration: speed-perturb by 2^(s/12) (pitch and tempo
    move together), then phase-vocoder the result back to the original length. We do not use
    torchaudio.functional.pitch_shift: it resamples between int(sr / rate) and sr, rates whose gcd is
    usually 1, which took 24 s for 10 s of audio here; this takes milliseconds. The ratio is rounded to
    a 100 Hz rate step (at most 0.3 % off)."""
    if semitones == 0.0 or len(wav) == 0:
        return wav
    faster = speed_perturb(wav, 2.0 ** (semitones / 12.0), sr)
    return time_stretch(faster, len(wav))


def white_noise(n: int, rng: np.random.Generator) -> np.ndarray:
    return rng.standard_normal(n)


def pink_noise(n: int, rng: np.random.Generator) -> np.ndarray:
    """1/f power noise: white noise with its spectrum scaled by 1/sqrt(f) (DC removed)."""
    spectrum = np.fft.rfft(rng.standard_normal(n))
    f = np.arange(len(spectrum), dtype=np.float64)
    spectrum[1:] /= np.sqrt(f[1:])
    spectrum[0] = 0.0
    return np.fft.irfft(spectrum, n)


def add_noise(wav: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    """wav + noise scaled so that 10 log10(P_wav / P_noise) = snr_db (powers = mean squares over
    the clip). A silent clip has no defined SNR and comes back unchanged."""
    p_wav = float(np.mean(np.square(wav, dtype=np.float64)))
    p_noise = float(np.mean(np.square(noise, dtype=np.float64)))
    if p_wav == 0.0 or p_noise == 0.0:
        return wav
    scale = math.sqrt(p_wav / (p_noise * 10.0 ** (snr_db / 10.0)))
    return (wav + scale * noise).astype(np.float32)


def apply_gain(wav: np.ndarray, gain_db: float) -> np.ndarray:
    return (wav * np.float32(10.0 ** (gain_db / 20.0))).astype(np.float32)


def limit_peak(wav: np.ndarray) -> np.ndarray:
    """Scale the whole clip down to peak 1 if it exceeds [-1, 1]; scaling (not clipping) adds no distortion."""
    peak = float(np.max(np.abs(wav))) if len(wav) else 0.0
    return (wav / peak).astype(np.float32) if peak > 1.0 else wav.astype(np.float32, copy=False)


def _noise_files(folder: str):
    extensions = {"." + fmt.lower() for fmt in soundfile.available_formats()}
    files = sorted(os.path.join(root, name) for root, _, names in os.walk(folder) for name in names
                   if os.path.splitext(name)[1].lower() in extensions)
    if not files:
        raise ValueError(f"--noise-dir {folder!r} holds no audio files soundfile can read")
    return files


def read_noise(path: str, n: int, rng: np.random.Generator, sr: int = SAMPLE_RATE) -> np.ndarray:
    """n samples of the noise file at `sr`: a random crop when it is long enough, else looped from a
    random offset. Only the needed frames are read from long files."""
    info = soundfile.info(path)
    need = int(math.ceil(n * info.samplerate / sr)) + 64  # resampling margin
    start = int(rng.integers(0, info.frames - need + 1)) if info.frames > need else 0
    data, file_sr = soundfile.read(path, start=start, frames=need if info.frames > need else -1,
                                   dtype="float32", always_2d=True)
    noise = _resample(torch.from_numpy(data.mean(axis=1)), file_sr, sr).numpy()
    if len(noise) == 0:
        raise ValueError(f"noise file {path!r} is empty")
    if len(noise) < n:
        noise = np.roll(np.tile(noise, n // len(noise) + 1), -int(rng.integers(0, len(noise))))
    return noise[:n]


@dataclass(frozen=True)
class WaveAugmentConfig:
    speed_factors: Tuple[float, ...] = ()  # one chosen uniformly, e.g. (0.9, 1.0, 1.1); () = off
    pitch_semitones: float = 0.0  # shift ~ U[-s, s] semitones; 0 = off
    noise_snr: Tuple[float, ...] = ()  # (lo, hi) dB, SNR ~ U[lo, hi]; () = off
    noise_dir: Optional[str] = None  # noise files; without it, generated white or pink noise
    gain_db: float = 0.0  # gain ~ U[-g, g] dB; 0 = off
    speed_p: float = 1.0  # probability each enabled operation is applied to a clip
    pitch_p: float = 1.0
    noise_p: float = 1.0
    gain_p: float = 1.0
    sample_rate: int = SAMPLE_RATE

    def __post_init__(self):
        if any(f <= 0 for f in self.speed_factors):
            raise ValueError(f"speed factors must be positive, got {self.speed_factors}")
        if self.noise_snr and (len(self.noise_snr) != 2 or self.noise_snr[0] > self.noise_snr[1]):
            raise ValueError(f"noise SNR must be (lo, hi) dB with lo <= hi, got {self.noise_snr}")
        if self.pitch_semitones < 0 or self.gain_db < 0:
            raise ValueError("pitch semitones and gain dB are ranges +/- x: give x >= 0")
        for name in ("speed_p", "pitch_p", "noise_p", "gain_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {getattr(self, name)}")
        if self.noise_dir is not None and not self.noise_snr:
            raise ValueError("--noise-dir needs --noise-snr LO,HI to say how loud the noise is")
        if self.noise_dir is not None and not os.path.isdir(self.noise_dir):
            raise ValueError(f"--noise-dir {self.noise_dir!r} is not a folder")

    @property
    def enabled(self) -> bool:
        return bool(self.speed_factors or self.pitch_semitones or self.noise_snr or self.gain_db)


@dataclass
class AugmentChoice:
    """What was drawn for one clip (None = not applied): for logging and for tests."""
    speed: Optional[float] = None
    semitones: Optional[float] = None
    snr_db: Optional[float] = None
    noise: Optional[str] = None  # "white", "pink" or a file path
    gain_db: Optional[float] = None


class WaveAugment:
    def __init__(self, config: WaveAugmentConfig = WaveAugmentConfig()):
        self.config = config
        self.noise_files = _noise_files(config.noise_dir) if config.noise_dir else []

    def __repr__(self):
        return f"WaveAugment({self.config})"

    @property
    def enabled(self) -> bool:
        return self.config.enabled

    def sample(self, rng: np.random.Generator) -> AugmentChoice:
        """Draw the operations and their parameters for one clip, in a fixed order."""
        c, choice = self.config, AugmentChoice()
        if c.speed_factors and rng.random() < c.speed_p:
            choice.speed = float(c.speed_factors[rng.integers(len(c.speed_factors))])
        if c.pitch_semitones and rng.random() < c.pitch_p:
            choice.semitones = float(rng.uniform(-c.pitch_semitones, c.pitch_semitones))
        if c.noise_snr and rng.random() < c.noise_p:
            choice.snr_db = float(rng.uniform(*c.noise_snr))
            sources = self.noise_files or ["white", "pink"]
            choice.noise = sources[rng.integers(len(sources))]
        if c.gain_db and rng.random() < c.gain_p:
            choice.gain_db = float(rng.uniform(-c.gain_db, c.gain_db))
        return choice

    def apply(self, wav: np.ndarray, choice: AugmentChoice, rng: np.random.Generator) -> np.ndarray:
        sr = self.config.sample_rate
        if choice.speed is not None:
            wav = speed_perturb(wav, choice.speed, sr)
        if choice.semitones is not None:
            wav = pitch_shift(wav, choice.semitones, sr)
        if choice.snr_db is not None:
            if choice.noise == "white":
                noise = white_noise(len(wav), rng)
            elif choice.noise == "pink":
                noise = pink_noise(len(wav), rng)
            else:
                noise = read_noise(choice.noise, len(wav), rng, sr)
            wav = add_noise(wav, noise, choice.snr_db)
        if choice.gain_db is not None:
            wav = apply_gain(wav, choice.gain_db)
        return limit_peak(wav)

    def __call__(self, wav: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Augment one float32 mono clip at the configured rate; returns `wav` itself when off."""
        if not self.enabled:
            return wav
        wav = np.asarray(wav)
        if wav.ndim != 1:
            raise ValueError(f"WaveAugment expects a mono 1-D waveform, got shape {wav.shape}")
        return self.apply(wav.astype(np.float32, copy=False), self.sample(rng), rng)


# -- command-line flags for train.py ---------------------------------------------------------------

def _floats(text: str) -> Tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _snr_range(text: str) -> Tuple[float, ...]:
    values = _floats(text)
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or values[0] > values[1]:
        raise argparse.ArgumentTypeError(f"--noise-snr wants LO,HI dB with LO <= HI (or one value), got {text!r}")
    return values


def _probability(text: str) -> float:
    try:
        p = float(text)
    except ValueError:
        p = -1.0
    if not 0.0 <= p <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a probability in [0, 1], got {text!r}")
    return p


def add_augment_args(parser) -> None:
    # a parser gets its own group; a group passed in (train.py's "augmentation") is used as it is,
    # since argparse deprecates nesting groups
    group = parser.add_argument_group("waveform augmentation (training only; all off by default)") if isinstance(parser, argparse.ArgumentParser) else parser
    group.add_argument("--speed-perturb", type=_floats, default=(), metavar="0.9,1.0,1.1",
                       help="speed factors, one drawn per clip (duration / factor, pitch * factor)")
    group.add_argument("--pitch-shift", type=float, default=0.0, metavar="SEMITONES",
                       help="pitch shift drawn from U[-s, s] semitones, duration kept")
    group.add_argument("--noise-snr", type=_snr_range, default=(), metavar="LO,HI",
                       help="additive noise at an SNR drawn from U[LO, HI] dB")
    group.add_argument("--noise-dir", default=None, help="noise files (random crop/loop); default: white/pink noise")
    group.add_argument("--gain-db", type=float, default=0.0, help="gain drawn from U[-g, g] dB")
    group.add_argument("--aug-p", type=_probability, default=0.5,
                       help="probability each enabled operation is applied (default 0.5)")
    for name in ("speed", "pitch", "noise", "gain"):
        group.add_argument(f"--{name}-p", type=_probability, default=None, help=f"override --aug-p for {name}")


def augment_from_args(args: argparse.Namespace) -> WaveAugment:
    def p(name):
        value = getattr(args, f"{name}_p")
        return args.aug_p if value is None else value
    return WaveAugment(WaveAugmentConfig(
        speed_factors=tuple(args.speed_perturb), pitch_semitones=args.pitch_shift, noise_snr=tuple(args.noise_snr),
        noise_dir=args.noise_dir, gain_db=args.gain_db,
        speed_p=p("speed"), pitch_p=p("pitch"), noise_p=p("noise"), gain_p=p("gain")))
