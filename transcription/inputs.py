"""What to transcribe: the paths a user gives (audio files, directories of them, manifests) -> recordings.

A path that does not exist is a typo: one line before any work. A file inside a directory or a manifest that
turns out unreadable is not: it is reported by name with the others still transcribed (transcribe.py).
"""
import os
from pathlib import Path

import soundfile as sf

from data.sources import read_manifest_rows

MANIFESTS = (".jsonl", ".csv", ".tsv")
# what libsndfile reads (soundfile.available_formats), as file name endings; other files in a directory are ignored
AUDIO = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".aifc", ".au", ".snd", ".caf", ".w64",
         ".rf64", ".voc", ".sd2", ".htk", ".mat", ".pvf", ".xi", ".paf", ".svx", ".nist", ".sph", ".ircam", ".mpc")


class InputError(ValueError):
    """A path given on the command line that names nothing usable; the message says which and why."""


def expand(paths) -> list:
    """[audio file path] in the order given: directories searched recursively (sorted), manifests read for
    their `audio` column (relative to the manifest). Duplicates are kept once."""
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in AUDIO)
            if not found:
                raise InputError(f"{p}: no audio files in this directory (looked for {', '.join(AUDIO[:5])}, ...)")
            out += found
        elif p.is_file() and p.suffix.lower() in MANIFESTS:
            out += manifest_audio(p)
        elif p.is_file():
            out.append(p)
        else:
            raise InputError(f"{p}: no such file or directory")
    return list(dict.fromkeys(str(p) for p in out))


def manifest_audio(path: Path) -> list:
    """The `audio` entries of a .jsonl / .csv / .tsv manifest, resolved against its directory."""
    try:
        rows = read_manifest_rows(path)
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: cannot read this manifest ({e})") from None
    missing = [i for i, r in enumerate(rows) if not isinstance(r, dict) or not r.get("audio")]
    if not rows or missing:
        raise InputError(f"{path}: every row needs an `audio` column (row {missing[0] + 1 if missing else 1} has none)")
    return [path.parent / r["audio"] for r in rows]


def duration(path: str) -> float | None:
    """Seconds of audio from the file's header (no decoding), or None when libsndfile cannot open it."""
    try:
        return float(sf.info(path).duration)
    except Exception:  # libsndfile raises several types; the reader names the reason later
        return None


def output_names(paths: list) -> list:
    """A file name stem per recording for its txt/srt/vtt files: its own stem, made unique with -2, -3, ..."""
    names, seen = [], {}
    for p in paths:
        stem = os.path.splitext(os.path.basename(p))[0] or "audio"
        seen[stem] = seen.get(stem, 0) + 1
        names.append(stem if seen[stem] == 1 else f"{stem}-{seen[stem]}")
    return names
