"""A long recording for transcribe.py's tests and measurements: demo test clips joined with pauses, seeded.

    python tests/longform.py OUT.wav [--seconds 180] [--seed 0] [--dialect amdo]

writes OUT.wav and OUT.json (each clip's id, text, dialect and its start/end in the recording, in seconds).
"""
import argparse
import json
import os
import sys

import numpy as np
import soundfile as sf

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from whisper_ft.audio import SAMPLE_RATE, read_audio  # noqa: E402


def make_longform(clips: list, seconds: float = 180.0, seed: int = 0, pause=(0.5, 1.5)) -> tuple:
    """(waveform [n] float32 16 kHz, [{id, text, dialect, audio, start, end}]): clips in a seeded order (all of them
    before any repeats), each followed by a pause drawn uniformly from `pause` seconds, until the audio is >= `seconds`.

    clips: [{"id", "text", "dialect", "audio" (a file path)}]; a few seconds of silence start the recording so the
    first boundary is not at 0."""
    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(len(clips)) for _ in range(int(seconds // len(clips)) + 1)])
    parts, placed = [np.zeros(int(rng.uniform(*pause) * SAMPLE_RATE), np.float32)], []
    t = parts[0].size
    for i in order:
        if t >= seconds * SAMPLE_RATE:
            break
        c = clips[i]
        wav = read_audio(c["audio"])
        placed.append({"id": c["id"], "text": c["text"], "dialect": c.get("dialect"), "audio": c["audio"],
                       "start": t / SAMPLE_RATE, "end": (t + wav.size) / SAMPLE_RATE})
        gap = np.zeros(int(rng.uniform(*pause) * SAMPLE_RATE), np.float32)
        parts += [wav, gap]
        t += wav.size + gap.size
    return np.concatenate(parts), placed


def boundary_errors(placed: list, segments: list) -> tuple:
    """([|start error|], [|end error|]) in seconds: each clip against the segment that overlaps it most (a clip
    no segment overlaps counts as an error of its own length, so a dropped clip is not missed)."""
    starts, ends = [], []
    for c in placed:
        overlap = [min(c["end"], s["end"]) - max(c["start"], s["start"]) for s in segments]
        best = max(range(len(segments)), key=overlap.__getitem__, default=None)
        if best is None or overlap[best] <= 0:
            starts.append(c["end"] - c["start"])
            ends.append(c["end"] - c["start"])
            continue
        starts.append(abs(segments[best]["start"] - c["start"]))
        ends.append(abs(segments[best]["end"] - c["end"]))
    return starts, ends


def demo_clips(dialect: str | None = None) -> list:
    """The demo corpus's test clips (built on first use into ~/.cache/whisper_ft), optionally of one dialect."""
    from data.synthetic import build_demo

    root = build_demo()
    rows = [json.loads(line) for line in open(root / "test.jsonl", encoding="utf-8")]
    return [{**r, "audio": str(root / r["audio"])} for r in rows if dialect in (None, r["dialect"])]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out")
    p.add_argument("--seconds", type=float, default=180.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dialect", default=None, help="only this dialect's clips (default: all three)")
    args = p.parse_args(argv)
    wav, placed = make_longform(demo_clips(args.dialect), args.seconds, args.seed)
    sf.write(args.out, wav, SAMPLE_RATE, subtype="PCM_16")
    with open(os.path.splitext(args.out)[0] + ".json", "w", encoding="utf-8") as f:
        json.dump(placed, f, ensure_ascii=False, indent=1)
    print(f"{args.out}: {wav.size / SAMPLE_RATE:.1f} s, {len(placed)} clips")


if __name__ == "__main__":
    main()
