"""Which examples an epoch sees, in what order, on which rank: balanced / weighted by dialect, resumable.

Everything is a pure function of (seed, epoch, config): `epoch_indices(epoch)` is the *global* order, and
each rank takes positions rank, rank + world_size, ... of its unconsumed tail. Because the resume point
`start` counts global samples, a run saved on 4 GPUs resumes exactly on 1 or 8.
"""
import math
from collections import Counter
from typing import Sequence

import numpy as np
from torch.utils.data import Sampler

MODES = ("balanced", "proportional", "temperature", "natural")


class DialectSampler(Sampler[int]):
    """Sample example indices by dialect label.

    mode:
      natural       every included example once per epoch, shuffled (num_samples: subset or repeat).
      balanced      num_samples // n_dialects from each dialect (default num_samples: all included
                    examples), up-sampling small dialects (each example repeats floor or ceil times)
                    and down-sampling large ones.
      proportional  dialect d gets a share n_d / sum(n) of num_samples (temperature with T = 1).
      temperature   dialect d gets a share n_d^(1/T) / sum(n^(1/T)); T > 1 flattens towards balanced.
    Shares are exact quotas (largest remainder), not coin flips, so an epoch's counts are known.
    include: dialects to train on (one, several, or None for all present).
    fixed_subset: when down-sampling, keep the same examples every epoch (data-size studies) instead of
      drawing a fresh subset each epoch (default: use all data over epochs).
    lengths, group_size: optional length grouping: each consecutive run of `group_size` positions of the
      global order is sorted longest-first, so a batch holds clips of similar length (less padding with
      audio_ctx="auto"), ranks take similar lengths at each step, and resume stays exact.
    """

    def __init__(self, dialects: Sequence[str], *, mode: str = "balanced", include: Sequence[str] | None = None,
                 num_samples: int | None = None, temperature: float = 1.0, seed: int = 0, rank: int = 0,
                 world_size: int = 1, fixed_subset: bool = False, lengths: Sequence[float] | None = None,
                 group_size: int = 0):
        if mode not in MODES:
            raise ValueError(f"sampler mode {mode!r}: expected one of {', '.join(MODES)}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if lengths is not None and len(lengths) != len(dialects):
            raise ValueError(f"lengths has {len(lengths)} entries for {len(dialects)} examples")
        present = Counter(dialects)
        if isinstance(include, str):
            include = [include]
        names = sorted(present) if include is None else list(dict.fromkeys(include))
        missing = [d for d in names if present[d] == 0]
        if missing:
            raise ValueError(f"dialect(s) {missing} have no examples; present: {dict(sorted(present.items()))}")
        self.dialect_names = names
        self.groups = {d: np.array([i for i, x in enumerate(dialects) if x == d], dtype=np.int64) for d in names}
        pool = sum(len(g) for g in self.groups.values())
        self.mode, self.temperature, self.seed = mode, float(temperature), int(seed)
        self.num_samples = pool if num_samples is None else int(num_samples)
        if self.num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        self.fixed_subset = bool(fixed_subset)
        self.lengths = None if lengths is None else np.asarray(lengths, dtype=np.float64)
        self.group_size = int(group_size) if lengths is not None else 0
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start = 0, 0
        self._cache: tuple[int, list[int]] | None = None

    # ---- the global order ---------------------------------------------------------------------------

    def quotas(self) -> dict[str, int]:
        """Samples per dialect in one epoch (mode 'natural' reports the expected split of an exact pool)."""
        n = {d: len(g) for d, g in self.groups.items()}
        if self.mode == "balanced":
            return {d: self.num_samples // len(n) for d in n}
        if self.mode == "natural":
            weights = dict(n)
        else:
            t = 1.0 if self.mode == "proportional" else self.temperature
            weights = {d: c ** (1.0 / t) for d, c in n.items()}
        return _largest_remainder(weights, self.num_samples)

    def probabilities(self) -> dict[str, float]:
        """The target share of each dialect (what empirical frequencies converge to)."""
        q = self.quotas()
        total = sum(q.values()) or 1
        return {d: c / total for d, c in q.items()}

    def epoch_indices(self, epoch: int) -> list[int]:
        """The full global order of `epoch`, identical on every rank and every run with this config."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        rng = np.random.default_rng([self.seed, int(epoch)])
        if self.mode == "natural":
            pool = np.concatenate([self.groups[d] for d in self.dialect_names])
            picks = [_draw(pool, self.num_samples, rng, self._subset_rng(-1))]
        else:
            picks = [_draw(self.groups[d], k, rng, self._subset_rng(j))
                     for j, (d, k) in enumerate(self.quotas().items())]
        order = np.concatenate(picks) if picks else np.zeros(0, np.int64)
        order = order[rng.permutation(len(order))]
        if self.lengths is not None and self.group_size > 1:
            for s in range(0, len(order), self.group_size):
                chunk = order[s:s + self.group_size]
                order[s:s + self.group_size] = chunk[np.argsort(-self.lengths[chunk], kind="stable")]
        out = order.tolist()
        self._cache = (epoch, out)
        return out

    def _subset_rng(self, key: int) -> np.random.Generator | None:
        """Epoch-independent stream choosing which examples a fixed subset keeps (None: fresh each epoch)."""
        return np.random.default_rng([self.seed, 0x5EED, key + 1]) if self.fixed_subset else None

    # ---- this rank's share --------------------------------------------------------------------------

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch; `start` = global samples of it already consumed (all ranks together)."""
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        self.epoch, self.start = int(epoch), int(start)

    def _rank_share(self) -> list[int]:
        tail = self.epoch_indices(self.epoch)[self.start:]
        if not tail:
            return []
        # Pad with the tail's first items so every rank gets the same count (DDP needs equal steps).
        pad = -len(tail) % self.world_size
        tail = tail + (tail * (pad // len(tail) + 1))[:pad]
        return tail[self.rank::self.world_size]

    def __iter__(self):
        return iter(self._rank_share())

    def __len__(self) -> int:
        remaining = max(0, self.num_samples_per_epoch() - self.start)
        return math.ceil(remaining / self.world_size)

    def num_samples_per_epoch(self) -> int:
        """Length of epoch_indices (global, all ranks)."""
        return sum(self.quotas().values()) if self.mode != "natural" else self.num_samples

    # ---- checkpointing ------------------------------------------------------------------------------

    def config(self) -> dict:
        """What determines the order (rank/world_size do not: they only split it)."""
        return {"mode": self.mode, "include": self.dialect_names, "num_samples": self.num_samples,
                "temperature": self.temperature, "fixed_subset": self.fixed_subset,
                "group_size": self.group_size, "group_counts": {d: len(g) for d, g in self.groups.items()}}

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "start": self.start, "seed": self.seed, "config": self.config()}

    def load_state_dict(self, state: dict) -> None:
        """Resume at (epoch, start); refuses a checkpoint made with a different data/sampler config."""
        mine = self.config()
        diff = {k: (v, mine.get(k)) for k, v in state["config"].items() if mine.get(k) != v}
        if diff or state["seed"] != self.seed:
            raise ValueError(f"sampler state does not match this run (saved vs now: {diff}, seed "
                             f"{state['seed']} vs {self.seed}); resume with the same data and sampler options")
        self.set_epoch(state["epoch"], state["start"])


def _draw(idx: np.ndarray, k: int, rng: np.random.Generator, subset_rng: np.random.Generator | None) -> np.ndarray:
    """k items from idx: whole shuffled copies, then a partial copy without replacement (exact repeats).

    With subset_rng (fixed subsets) the partial copy's members come from an epoch-independent stream.
    """
    n = len(idx)
    if k <= 0 or n == 0:
        return np.zeros(0, np.int64)
    full, rest = divmod(k, n)
    parts = [idx[rng.permutation(n)] for _ in range(full)]
    if rest:
        chooser = subset_rng if subset_rng is not None else rng
        parts.append(idx[chooser.permutation(n)[:rest]])
    return np.concatenate(parts)


def _largest_remainder(weights: dict[str, float], total: int) -> dict[str, int]:
    """Integer counts summing to `total`, proportional to weights (Hamilton's method, ties by name)."""
    s = sum(weights.values())
    raw = {d: total * w / s for d, w in weights.items()}
    counts = {d: int(math.floor(r)) for d, r in raw.items()}
    left = total - sum(counts.values())
    for d in sorted(raw, key=lambda d: (-(raw[d] - counts[d]), d))[:left]:
        counts[d] += 1
    return counts
