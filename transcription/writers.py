"""A transcript out to files: plain text, subtitles (SubRip .srt, WebVTT .vtt), and one JSON line per recording."""
import json
import os

FORMATS = ("txt", "jsonl", "srt", "vtt")


def timestamp(seconds: float, sep: str) -> str:
    """HH:MM:SS,mmm (srt, sep ",") or HH:MM:SS.mmm (vtt, sep ".")."""
    ms = max(0, round(seconds * 1000))
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def srt(segments) -> str:
    """SubRip: numbered cues from 1, `start --> end`, the text, a blank line."""
    return "".join(f"{i}\n{timestamp(s.start, ',')} --> {timestamp(s.end, ',')}\n{_one_line(s.text)}\n\n"
                   for i, s in enumerate(segments, 1))


def vtt(segments) -> str:
    """WebVTT: the header, then cues `start --> end` and their text."""
    return "WEBVTT\n\n" + "".join(f"{timestamp(s.start, '.')} --> {timestamp(s.end, '.')}\n{_one_line(s.text)}\n\n"
                                  for s in segments)


def txt(segments) -> str:
    """One segment per line."""
    return "".join(_one_line(s.text) + "\n" for s in segments)


def _one_line(text: str) -> str:
    # a blank line ends a cue in both subtitle formats, and "-->" would start a new one
    return " ".join(text.split()).replace("-->", "->")


def write_recording(out_dir, name: str, segments, formats) -> None:
    """OUT/NAME.txt / .srt / .vtt for each of those in `formats` (jsonl is one file for all: write_jsonl)."""
    for fmt, render in (("txt", txt), ("srt", srt), ("vtt", vtt)):
        if fmt in formats:
            _write(os.path.join(out_dir, f"{name}.{fmt}"), render(segments))


def append_jsonl(path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")


def _write(path, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)  # never a half-written subtitle file under the real name
