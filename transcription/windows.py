"""Cut a long recording into windows of <= 30 s where the speech pauses: the windows' times are the segments'.

Why not whisper's timestamp seeking: it needs the decoder to write timestamp tokens, and the adapters here are
trained without them (`<|notimestamps|>`), so on a fine-tuned model the timestamps, and every cut made from them,
are unreliable. Cutting on the audio itself gives the times directly and windows that batch.

How: the energy of 20 ms frames; a frame is speech when it is loud relative to the recording (its 95th-percentile
frame, less 40 dB, but never below the quiet floor by less than a third of the way up to it); a pause is a run of
quiet frames of at least `min_pause` seconds, and each span between pauses, padded a little into the pauses
around it, is one window. A span of speech longer than 30 s is cut at its quietest frame in the last few
seconds before the limit, so no window ever exceeds 30 s.
"""
import numpy as np

from whisper_ft.audio import N_SAMPLES, SAMPLE_RATE

FRAME = SAMPLE_RATE // 50  # 20 ms
MIN_PAUSE = 0.3  # seconds of quiet that end a window (pauses inside a spoken sentence are shorter)
MIN_SPEECH = 0.1  # seconds of loud frames a window needs (shorter: a click, dropped)
PAD = 0.2  # seconds of the pause kept on each side of the speech (never past the pause's middle)
SEARCH = 5.0  # seconds before the 30 s limit searched for the quietest cut in unbroken speech
FLOOR_DB = -80.0  # quieter than this is silence whatever the recording


def frame_db(wav: np.ndarray) -> np.ndarray:
    """Energy in dB (full scale 0) of each 20 ms frame [n_frames]; a partial last frame counts."""
    n = -(-wav.size // FRAME)
    frames = np.zeros(n * FRAME, np.float32)
    frames[: wav.size] = wav
    power = (frames.reshape(n, FRAME).astype(np.float64) ** 2).mean(axis=1)
    return 10 * np.log10(power + 1e-20)


def speech_threshold(db: np.ndarray) -> float:
    loud = float(np.percentile(db, 95))
    floor = max(float(np.percentile(db, 5)), FLOOR_DB)
    return max(loud - 40.0, floor + (loud - floor) / 3, FLOOR_DB)


def speech_windows(wav: np.ndarray, *, min_pause: float = MIN_PAUSE, max_samples: int = N_SAMPLES) -> list:
    """[(start, end)] sample ranges of the speech in `wav` (16 kHz), in order, each <= max_samples long."""
    if wav.size == 0:
        return []
    db = frame_db(wav)
    loud = db > speech_threshold(db)
    spans = _spans_between_pauses(loud, round(min_pause * SAMPLE_RATE / FRAME))
    spans = [(a, b) for a, b in spans if loud[a:b].sum() * FRAME >= MIN_SPEECH * SAMPLE_RATE]
    windows = []
    for i, (a, b) in enumerate(spans):
        # pad into the pause on either side, at most to its middle, so windows never overlap
        prev_end = spans[i - 1][1] if i else 0
        next_start = spans[i + 1][0] if i + 1 < len(spans) else len(loud)
        pad = round(PAD * SAMPLE_RATE / FRAME)
        a = max(a - pad, (prev_end + a + 1) // 2 if i else 0)
        b = min(b + pad, (b + next_start) // 2 if i + 1 < len(spans) else len(loud))
        windows += _split_long(db, a, b, max_samples // FRAME)
    return [(a * FRAME, min(b * FRAME, wav.size)) for a, b in windows]


def _spans_between_pauses(loud: np.ndarray, min_pause_frames: int) -> list:
    """[(first loud frame, last loud frame + 1)] of the runs of speech separated by >= min_pause quiet frames."""
    idx = np.flatnonzero(loud)
    if idx.size == 0:
        return []
    gaps = np.flatnonzero(np.diff(idx) > min_pause_frames)
    starts = np.concatenate([[idx[0]], idx[gaps + 1]])
    ends = np.concatenate([idx[gaps] + 1, [idx[-1] + 1]])
    return list(zip(starts.tolist(), ends.tolist()))


def _split_long(db: np.ndarray, a: int, b: int, max_frames: int) -> list:
    """[(a, b)] frame ranges covering a..b, each <= max_frames, cut at the quietest frame near each limit."""
    out, search = [], round(SEARCH * SAMPLE_RATE / FRAME)
    while b - a > max_frames:
        lo, hi = a + max_frames - search, a + max_frames
        cut = lo + int(np.argmin(db[lo:hi]))
        out.append((a, cut))
        a = cut
    out.append((a, b))
    return out
