"""SpecAugment on Whisper log-mel batches, from scratch: time warp, frequency masks, time masks.

Park et al. 2019 (arXiv 1904.08779) and the adaptive time masks of Park et al. 2020 (arXiv 1912.05533).
Whisper's features are 80 mels at a 10 ms hop, the setting the paper's LB/LD policies were tuned for.

Everything works on a padded batch `mel [B, M, T]` with the real length of each utterance in
`n_frames [B]`: warps and masks only touch frames `t < n_frames[b]`, and padding comes back bitwise
unchanged. All random numbers for a batch are drawn in one call from the `torch.Generator` the caller
passes in, so the same (seed, step) gives the same masks after a resume (see `make_generator`); they
are drawn on the generator's device and then moved, so CPU and GPU batches get the same masks.

    python -m training.specaugment --policy LD --seed 2 --out mel.png   # a generated chirp (docs/specaugment_LD.png)
    python -m training.specaugment --wav clip.wav --policy adaptive --out mel.png
"""

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch


@dataclass(frozen=True)
class SpecAugmentConfig:
    freq_masks: int = 0  # mF: frequency masks per utterance
    freq_width: int = 0  # F: each frequency mask is f ~ U{0..F} mels wide
    time_masks: int = 0  # mT: time masks per utterance; with adaptive_masks, the cap on the count
    time_width: int = 0  # T: each time mask is t ~ U{0..min(T, p*len)} frames wide
    time_ratio: float = 1.0  # p: a time mask is at most p * (real length) frames wide
    time_warp: int = 0  # W: warp displacement w ~ U{-W..W} frames (0 = no warp)
    # Adaptive masking (Park et al. 2020): with adaptive_masks > 0 an utterance of len frames gets
    # min(time_masks, floor(adaptive_masks * len)) time masks; with adaptive_width > 0 its width bound
    # is floor(adaptive_width * len) instead of time_width (still capped by p * len).
    adaptive_masks: float = 0.0
    adaptive_width: float = 0.0
    # What masked cells become. "mean": the utterance's mean over its real cells (a neutral value on
    # Whisper's (log10 + 4) / 4 scale, where 0 would be arbitrary); "min": its floor (like silence);
    # a number: that constant.
    mask_value: Union[str, float] = "mean"

    def __post_init__(self):
        for name in ("freq_masks", "freq_width", "time_masks", "time_width", "time_warp"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value < 0:
                raise ValueError(f"SpecAugment {name} must be a non-negative integer, got {value!r}")
        if not 0.0 < self.time_ratio <= 1.0:
            raise ValueError(f"SpecAugment time_ratio (p) must be in (0, 1], got {self.time_ratio!r}")
        for name in ("adaptive_masks", "adaptive_width"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"SpecAugment {name} must be in [0, 1], got {getattr(self, name)!r}")
        if not (self.mask_value in ("mean", "min") or isinstance(self.mask_value, (int, float))):
            raise ValueError(f"SpecAugment mask_value must be 'mean', 'min' or a number, got {self.mask_value!r}")

    @property
    def enabled(self) -> bool:
        has_freq = self.freq_masks > 0 and self.freq_width > 0
        has_time = self.time_masks > 0 and (self.time_width > 0 or self.adaptive_width > 0)
        return has_freq or has_time or self.time_warp > 0


# Park et al. 2019 Table 1 (LibriSpeech basic / double). The adaptive policy is the LibriSpeech one of
# Park et al. 2020 (pM = pS = 0.04, two frequency masks, no time warp); the cap of 20 time masks is our
# choice (lingvo-style upper bound): it is reached at 500 frames (5 s), so a 30 s Whisper window gets
# 20 masks of up to 120 frames and about a third of the real frames masked, like a 5 s one.
POLICIES = {
    "none": SpecAugmentConfig(),
    "LB": SpecAugmentConfig(freq_masks=1, freq_width=27, time_masks=1, time_width=100, time_ratio=1.0, time_warp=80),
    "LD": SpecAugmentConfig(freq_masks=2, freq_width=27, time_masks=2, time_width=100, time_ratio=1.0, time_warp=80),
    "adaptive": SpecAugmentConfig(freq_masks=2, freq_width=27, time_masks=20, time_ratio=1.0,
                                  adaptive_masks=0.04, adaptive_width=0.04),
}


def from_policy(name: str, **overrides) -> "SpecAugment":
    """SpecAugment for a named policy (case-insensitive), with any config field overridden."""
    by_lower = {key.lower(): key for key in POLICIES}
    if name.lower() not in by_lower:
        raise ValueError(f"unknown SpecAugment policy {name!r}; valid: {', '.join(POLICIES)}")
    return SpecAugment(dataclasses.replace(POLICIES[by_lower[name.lower()]], **overrides))


def make_generator(seed: int, *keys: int, device="cpu") -> torch.Generator:
    """A generator determined by (seed, *keys), e.g. (seed, step, micro_step): rebuilt after a resume
    it reproduces the same masks, and neighbouring steps get well-separated streams (SeedSequence
    mixes the integers instead of seed + step, which would collide across runs)."""
    state = np.random.SeedSequence([int(seed), *map(int, keys)]).generate_state(2, dtype=np.uint32)
    return torch.Generator(device=device).manual_seed(int(state[0]) << 31 ^ int(state[1]))


def _randint(u: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Uniform integers in [low, high] (inclusive, elementwise) from uniforms u in [0, 1)."""
    span = (high - low + 1).clamp(min=1).to(u.dtype)
    return (low + torch.floor(u * span).long()).minimum(high.clamp(min=low))


class SpecAugment:
    def __init__(self, config: SpecAugmentConfig):
        self.config = config

    def __repr__(self):
        return f"SpecAugment({self.config})"

    @property
    def enabled(self) -> bool:
        return self.config.enabled

    # -- how many uniforms one utterance uses: [warp 2 | freq 2*mF | time 2*mT], always the same count,
    # so the random stream of a batch depends only on B and the config, never on the data.
    def _n_uniforms(self) -> int:
        c = self.config
        return 2 * (c.time_warp > 0) + 2 * c.freq_masks + 2 * c.time_masks

    def _draw(self, batch: int, generator: Optional[torch.Generator], device) -> torch.Tensor:
        gen_device = generator.device if generator is not None else "cpu"
        u = torch.rand(batch, self._n_uniforms(), generator=generator, dtype=torch.float64, device=gen_device)
        return u.to(device)

    def time_limits(self, n_frames: torch.Tensor):
        """(mask count [B], max mask width [B]) for utterances of these real lengths."""
        c, n = self.config, n_frames.long()
        count = torch.full_like(n, c.time_masks)
        if c.adaptive_masks > 0:
            count = count.minimum(torch.floor(n.double() * c.adaptive_masks).long())
        width = torch.floor(n.double() * c.adaptive_width).long() if c.adaptive_width > 0 else torch.full_like(n, c.time_width)
        width = width.minimum(torch.floor(n.double() * c.time_ratio).long())
        return count, width

    def _masks(self, u_freq, u_time, n_frames, n_mels: int, n_time: int):
        """Boolean masks freq [B, M] and time [B, T]: each mask is an interval built by comparing an
        arange against its start and end, and the intervals of one utterance are OR-ed together."""
        c, device = self.config, n_frames.device
        batch = n_frames.shape[0]
        freq = torch.zeros(batch, n_mels, dtype=torch.bool, device=device)
        if c.freq_masks > 0:
            zero = torch.zeros(batch, c.freq_masks, dtype=torch.long, device=device)
            width = _randint(u_freq[:, 0::2], zero, zero + min(c.freq_width, n_mels))
            start = _randint(u_freq[:, 1::2], zero, n_mels - width)
            bins = torch.arange(n_mels, device=device)[None, None, :]
            freq = ((bins >= start[..., None]) & (bins < (start + width)[..., None])).any(dim=1)
        time = torch.zeros(batch, n_time, dtype=torch.bool, device=device)
        if c.time_masks > 0:
            count, max_width = self.time_limits(n_frames)
            zero = torch.zeros(batch, c.time_masks, dtype=torch.long, device=device)
            width = _randint(u_time[:, 0::2], zero, zero + max_width[:, None])
            # masks beyond this utterance's (adaptive) count get width 0, i.e. vanish
            width = width * (torch.arange(c.time_masks, device=device)[None, :] < count[:, None])
            start = _randint(u_time[:, 1::2], zero, n_frames[:, None] - width)
            frames = torch.arange(n_time, device=device)[None, None, :]
            time = ((frames >= start[..., None]) & (frames < (start + width)[..., None])).any(dim=1)
        return freq, time

    def _split(self, u):
        c = self.config
        n_warp = 2 * (c.time_warp > 0)
        return u[:, :n_warp], u[:, n_warp:n_warp + 2 * c.freq_masks], u[:, n_warp + 2 * c.freq_masks:]

    def sample_masks(self, n_frames, n_mels: int, n_time: int, generator=None, device="cpu"):
        """The (freq [B, M], time [B, T]) masks that __call__ applies for the same generator state."""
        n_frames = torch.as_tensor(n_frames, device=device).long().clamp(0, n_time)
        _, u_freq, u_time = self._split(self._draw(n_frames.shape[0], generator, device))
        return self._masks(u_freq, u_time, n_frames, n_mels, n_time)

    def _warp(self, mel, n_frames, u_warp):
        """Piecewise-linear time warp (Park et al. 2019 sec. 2): the frame at w0 moves to w0 + w while
        frames 0 and len-1 stay, each side stretched linearly; frames are linearly interpolated.
        The bound shrinks to (len-3)//2 for short utterances so both sides keep at least one frame."""
        batch, n_mels, n_time = mel.shape
        n = n_frames
        bound = torch.clamp(torch.minimum(n.new_tensor(self.config.time_warp), (n - 3) // 2), min=0)
        w0 = _randint(u_warp[:, 0], bound + 1, n - 2 - bound)
        w = _randint(u_warp[:, 1], -bound, bound)
        active = (n >= 3) & (w != 0)
        w0, dest, last = w0.double(), (w0 + w).double(), (n - 1).double().clamp(min=1)
        t = torch.arange(n_time, device=mel.device, dtype=torch.float64)[None, :]
        left = t * (w0 / dest.clamp(min=1))[:, None]
        right = w0[:, None] + (t - dest[:, None]) * ((last - w0) / (last - dest).clamp(min=1))[:, None]
        src = torch.where(t < dest[:, None], left, right)
        src = torch.where(active[:, None], src, t).clamp(min=0)
        src = torch.minimum(src, last[:, None])
        i0 = src.floor().long().clamp(max=n_time - 1)
        i1 = (i0 + 1).minimum((n - 1).clamp(min=0)[:, None])
        frac = (src - i0).to(torch.float32)[:, None, :]
        x = mel.float()
        x0 = x.gather(2, i0[:, None, :].expand(batch, n_mels, n_time))
        x1 = x.gather(2, i1[:, None, :].expand(batch, n_mels, n_time))
        warped = (x0 + (x1 - x0) * frac).to(mel.dtype)
        real = (t < n[:, None]) & active[:, None]
        return torch.where(real[:, None, :], warped, mel)

    def _fill_value(self, mel, real):
        value = self.config.mask_value
        if value == "mean":
            count = (real.sum(dim=(1, 2)) * mel.shape[1]).clamp(min=1)
            fill = torch.where(real, mel.float(), 0.0).sum(dim=(1, 2)) / count
        elif value == "min":
            fill = torch.where(real.expand_as(mel), mel.float(), torch.inf).amin(dim=(1, 2))
            fill = torch.where(torch.isfinite(fill), fill, 0.0)
        else:
            fill = torch.full((mel.shape[0],), float(value), device=mel.device)
        return fill.to(mel.dtype)[:, None, None]

    def __call__(self, mel: torch.Tensor, n_frames=None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Augment mel [B, M, T] (or one [M, T]) whose utterance b has n_frames[b] real frames
        (default: all T). Returns a new tensor; with nothing enabled, returns `mel` itself."""
        if not self.enabled:
            return mel
        single = mel.dim() == 2
        if single:
            mel = mel[None]
        if mel.dim() != 3:
            raise ValueError(f"SpecAugment expects mel [B, n_mels, T] or [n_mels, T], got shape {tuple(mel.shape)}")
        batch, n_mels, n_time = mel.shape
        if n_frames is None:
            n_frames = torch.full((batch,), n_time)
        n_frames = torch.as_tensor(n_frames, device=mel.device).long().reshape(-1).clamp(0, n_time)
        if n_frames.shape[0] != batch:
            raise ValueError(f"n_frames has {n_frames.shape[0]} lengths for a batch of {batch}")

        u_warp, u_freq, u_time = self._split(self._draw(batch, generator, mel.device))
        out = self._warp(mel, n_frames, u_warp) if self.config.time_warp > 0 else mel
        real = (torch.arange(n_time, device=mel.device)[None, :] < n_frames[:, None])[:, None, :]
        freq, time = self._masks(u_freq, u_time, n_frames, n_mels, n_time)
        masked = (freq[:, :, None] | time[:, None, :]) & real
        out = torch.where(masked, self._fill_value(out, real), out)
        return out[0] if single else out

    def expected_masked_fraction(self, n_frames, n_mels: int) -> torch.Tensor:
        """Exact expectation, per utterance, of the fraction of its real (mel, frame) cells masked.

        One mask of width w ~ U{0..K} starting at s ~ U{0..N-w} covers position i with probability
        q(i) = 1/(K+1) * sum_w #{s : s <= i < s+w} / (N-w+1); k independent masks leave i uncovered
        with probability (1-q(i))^k. Frequency and time masks are independent, and a cell is kept only
        if neither covers it, so the masked fraction is 1 - (1 - E_freq)(1 - E_time). Time warp moves
        frames before masking and does not change the count."""
        c = self.config
        n = torch.as_tensor(n_frames).long().reshape(-1).cpu()
        e_freq = _expected_cover(n_mels, min(c.freq_width, n_mels), c.freq_masks)
        count, width = self.time_limits(n)
        e_time = torch.tensor([_expected_cover(int(L), int(K), int(k)) for L, K, k in zip(n, width, count)],
                              dtype=torch.float64)
        return 1.0 - (1.0 - e_freq) * (1.0 - e_time)


def _expected_cover(length: int, max_width: int, n_masks: int) -> float:
    """Expected fraction of `length` positions covered by n_masks intervals (see above)."""
    if length <= 0 or max_width <= 0 or n_masks <= 0:
        return 0.0
    i = np.arange(length)[:, None]
    w = np.arange(max_width + 1)[None, :]
    lo, hi = np.maximum(0, i - w + 1), np.minimum(i, length - w)
    starts_covering = np.clip(hi - lo + 1, 0, None) * (w > 0)
    q = (starts_covering / (length - w + 1)).sum(axis=1) / (max_width + 1)
    return float((1.0 - (1.0 - q) ** n_masks).mean())


# -- command-line flags for train.py ---------------------------------------------------------------

_FIELD_FLAGS = {  # flag -> (config field, type)
    "--freq-masks": ("freq_masks", int), "--freq-width": ("freq_width", int),
    "--time-masks": ("time_masks", int), "--time-width": ("time_width", int),
    "--time-ratio": ("time_ratio", float), "--time-warp": ("time_warp", int),
    "--adaptive-masks": ("adaptive_masks", float), "--adaptive-width": ("adaptive_width", float),
}


def _policy_name(text: str) -> str:
    by_lower = {key.lower(): key for key in POLICIES}
    if text.lower() not in by_lower:
        raise argparse.ArgumentTypeError(f"unknown SpecAugment policy {text!r}; valid: {', '.join(POLICIES)}")
    return by_lower[text.lower()]


def _mask_value(text: str):
    if text in ("mean", "min"):
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--specaugment-value must be mean, min or a number, got {text!r}") from None


def add_specaugment_args(parser) -> None:
    # a parser gets its own group; a group passed in (train.py's "augmentation") is used as it is,
    # since argparse deprecates nesting groups
    group = parser.add_argument_group("SpecAugment (training only)") if isinstance(parser, argparse.ArgumentParser) else parser
    group.add_argument("--specaugment", type=_policy_name, default="none", metavar="|".join(POLICIES),
                       help="named policy (Park et al. 2019 LB/LD, 2020 adaptive); the flags below override it")
    for flag, (field, kind) in _FIELD_FLAGS.items():
        group.add_argument(flag, dest=f"specaugment_{field}", type=kind, default=None,
                           help=f"override the policy's {field}")
    group.add_argument("--specaugment-value", dest="specaugment_mask_value", type=_mask_value, default=None,
                       help="masked cells become: mean (per utterance, default), min, or a number")


def specaugment_from_args(args: argparse.Namespace) -> SpecAugment:
    overrides = {field: getattr(args, f"specaugment_{field}") for field, _ in _FIELD_FLAGS.values()}
    overrides["mask_value"] = args.specaugment_mask_value
    return from_policy(args.specaugment, **{k: v for k, v in overrides.items() if v is not None})


# -- python -m training.specaugment: a PNG of a log-mel before and after ----------------------------

def _demo_audio(sr=16000, seconds=6.0) -> np.ndarray:
    """A rising chirp over a steady 300 Hz tone with a harmonic, so warps and masks are easy to see."""
    t = np.arange(int(sr * seconds)) / sr
    f0, f1 = 200.0, 5000.0
    chirp = np.sin(2 * np.pi * (f0 * t + (f1 - f0) * t ** 2 / (2 * seconds)))
    tone = np.sin(2 * np.pi * 300 * t) + 0.5 * np.sin(2 * np.pi * 900 * t)
    return (0.3 * chirp + 0.2 * tone).astype(np.float32)


def _read_audio(path: str, sr=16000) -> np.ndarray:
    import soundfile
    import torchaudio.functional as AF
    wav, file_sr = soundfile.read(path, dtype="float32", always_2d=True)
    wav = torch.from_numpy(wav.mean(axis=1))
    if file_sr != sr:
        wav = AF.resample(wav, file_sr, sr)
    return wav.numpy()


def main(argv=None):
    parser = argparse.ArgumentParser(description="Plot a log-mel before and after SpecAugment.")
    parser.add_argument("--wav", help="audio file (any soundfile format); default: a generated chirp")
    parser.add_argument("--policy", type=_policy_name, default="LD", help="|".join(POLICIES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pad-seconds", type=float, default=2.0, help="padding shown after the clip (left untouched)")
    parser.add_argument("--out", default="specaugment.png")
    args = parser.parse_args(argv)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import whisper

    audio = _read_audio(args.wav) if args.wav else _demo_audio()
    n_real = len(audio) // whisper.audio.HOP_LENGTH
    mel = whisper.log_mel_spectrogram(audio, padding=int(args.pad_seconds * whisper.audio.SAMPLE_RATE))
    augment = from_policy(args.policy)
    out = augment(mel[None], torch.tensor([n_real]), make_generator(args.seed, 0))[0]

    fig, axes = plt.subplots(2, 1, figsize=(10, 5.5), sharex=True, constrained_layout=True)
    for ax, image, title in ((axes[0], mel, "log-mel (Whisper scale)"), (axes[1], out, f"SpecAugment {args.policy}")):
        shown = ax.imshow(image.numpy(), origin="lower", aspect="auto", cmap="magma", vmin=-1.5, vmax=1.5,
                          interpolation="nearest")
        ax.axvline(n_real - 0.5, color="cyan", linestyle="--", linewidth=1)
        ax.set_title(f"{title}; dashed line: end of real frames ({n_real}), padding after it")
        ax.set_ylabel("mel bin")
    axes[1].set_xlabel("frame (10 ms)")
    fig.colorbar(shown, ax=axes, shrink=0.8)
    fig.savefig(args.out, dpi=80)
    freq, time = augment.sample_masks([n_real], mel.shape[0], mel.shape[1], make_generator(args.seed, 0))
    covered = (freq[0][:, None] | time[0][None, :])[:, :n_real].float().mean().item()
    print(f"wrote {args.out}: {n_real} real frames of {mel.shape[-1]}; masks cover {covered:.1%} of the real cells "
          f"(expected {augment.expected_masked_fraction([n_real], mel.shape[0]).item():.1%} on average)")


if __name__ == "__main__":
    main()
