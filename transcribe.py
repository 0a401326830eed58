"""Transcribe recordings of any length, any sample rate and channel count, to text and subtitles.

    python transcribe.py talk.flac recordings/ list.jsonl --model offline:base --adapter amdo=runs/A --out tr/

Inputs: audio files, directories (searched recursively for audio files) and manifests (.jsonl/.csv/.tsv with an
`audio` column). Each recording is cut into windows of <= 30 s where the speech pauses (transcription/windows.py)
and its windows are decoded in batches, with the loop guard, no-speech skipping and one beam-search retry of a
looped window (transcription/longform.py). The system (the base, or one --adapter) is chosen per recording before
its windows are decoded (`choose_system`): the one --system names, or with --dialect-id the adapter of the dialect
a dialect-ID head (train.py --task dialect-id) hears in the recording's first 30 s of speech (--route DIALECT=NAME
maps a label to another adapter; --route-fallback takes a recording whose dialect has no adapter or whose
probability is under --route-threshold). The encoder context is the one the adapters were trained with, unless
--audio-ctx says otherwise.

Writes to --out: NAME.txt (a segment per line), NAME.srt, NAME.vtt per recording; transcripts.jsonl, one line per
recording (audio, duration, text, segments with start/end seconds, dialect, dialect_prob, system, window counts);
summary.json (files, failures with reasons, audio hours, real-time factor, looped windows).
Exit status: 0 all transcribed; 1 a wrong argument (one line, before any decoding); 3 some recordings could not be
read (each named with its reason; the others are transcribed).
"""
import argparse
import json
import os
import sys
import time

import torch
from tqdm import tqdm

from lora.adapters import set_active_adapter
from scoring.systems import (add_decoding_args, add_routing_args, check_dialect_id, label_routes, load_head, load_systems,
                             parse_adapters, parse_audio_ctx, parse_routes, trained_audio_ctx)
from training.setup import choose_device, language_of, load_base, precision_note
from transcription.inputs import InputError, duration, expand, output_names
from transcription.longform import transcribe_waveform
from transcription.windows import speech_windows
from transcription.writers import FORMATS, append_jsonl, write_recording
from whisper_ft.audio import N_SAMPLES, SAMPLE_RATE, AudioError, check_waveform, log_mel, n_frames_of, read_audio
from whisper_ft.dialect_id import choose_route, predict_dialect
from whisper_ft.models import ModelSpecError
from whisper_ft.text import tokenizer_for

EXIT_SOME_FAILED = 3


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="AUDIO_OR_DIR_OR_MANIFEST")
    p.add_argument("--model", default="offline:base", help="base model spec (see whisper_ft/models.py)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                   help="LoRA adapter file (or a train.py run directory holding adapter.safetensors); repeatable")
    p.add_argument("--system", default=None, metavar="NAME",
                   help="the --adapter to decode with, or base (default: the only adapter given, else base)")
    add_routing_args(p, "recording", "each recording is decoded with the --adapter of the dialect it predicts")
    p.add_argument("--route", action="append", default=[], metavar="auto|DIALECT=NAME",
                   help="with --dialect-id: decode a predicted DIALECT with adapter NAME (default: the adapter named "
                        "after it); auto: route by --dialect-id alone")
    p.add_argument("--language", default="bo")
    p.add_argument("--language-fallback", default=None,
                   help="Whisper language token to reuse for a language Whisper lacks (e.g. bo for Dzongkha)")
    add_decoding_args(p)
    p.add_argument("--format", default=",".join(FORMATS), help="comma-separated: " + ",".join(FORMATS))
    p.add_argument("--batch-size", type=int, default=16, help="windows decoded together")
    p.add_argument("--beam-size", type=int, default=1, help="1: greedy; looped windows are retried with beam 5")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", required=True, help="output directory")
    return p.parse_args(argv)


def check_args(args) -> dict:
    """Every command-line value parsed and checked, before the model is loaded."""
    formats = [f for f in args.format.split(",") if f]
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown or not formats:
        raise SystemExit(f"error: --format {args.format}: choose from {','.join(FORMATS)} (comma-separated)")
    if args.batch_size < 1 or args.beam_size < 1:
        raise SystemExit("error: --batch-size and --beam-size must be >= 1")
    adapters, mixes = parse_adapters(args.adapter)
    names = [*adapters, *mixes]
    dialect_id = check_dialect_id(args.dialect_id, args.route_threshold, args.route_fallback, {**adapters, **mixes})
    routes = parse_routes([r for r in args.route if r != "auto"], {**adapters, **mixes})
    if dialect_id is None and args.route:
        raise SystemExit(f"error: --route {args.route[0]} routes by the dialect a head hears: add --dialect-id PATH")
    if dialect_id is not None and (args.system is not None or not names):
        raise SystemExit("error: --dialect-id chooses the adapter per recording: " + (
            "drop --system" if names else "give the adapters to choose from, --adapter NAME=PATH ..."))
    if dialect_id is None and args.system is None and len(names) > 1:
        raise SystemExit(f"error: several --adapter given ({', '.join(names)}): pick the one to decode with, "
                         "--system NAME (or --system base)")
    system = args.system or (names[0] if names else "base")
    if system not in ("base", *names):
        raise SystemExit(f"error: --system {system}: not an --adapter name; choose from {', '.join(['base', *names])}")
    try:
        recordings = expand(args.inputs)
    except InputError as e:
        raise SystemExit(f"error: {e}") from None
    return {"formats": formats, "adapters": adapters, "mixes": mixes, "system": "auto" if dialect_id else system,
            "dialect_id": dialect_id, "routes": routes, "recordings": recordings,
            "language": language_of(args.language, args.language_fallback),
            "audio_ctx": parse_audio_ctx(args.audio_ctx or trained_audio_ctx(adapters))}


def choose_system(wav, plan: dict, model) -> tuple:
    """(system, dialect, dialect probability) for one recording, chosen before its windows are decoded.

    Without --dialect-id: the system --system names (dialect and probability None). With it: the head reads the
    base's encoder (no adapter) over the recording's first 30 s of speech, its windows' probabilities are averaged
    by length, and whisper_ft.dialect_id.choose_route picks the adapter (or the fallback)."""
    head = plan.get("head")
    if head is None:
        return plan["system"], None, None
    spans, total = [], 0
    for a, b in speech_windows(wav):
        spans.append((a, b))
        total += b - a
        if total >= N_SAMPLES:
            break
    if not spans:
        return plan["fallback"], None, None
    mel = torch.stack([log_mel(wav[a:b], model.dims.n_mels) for a, b in spans])
    n_frames = torch.tensor([n_frames_of(b - a) for a, b in spans])
    set_active_adapter(model, None)
    with torch.no_grad():
        probs = predict_dialect(model, head, mel, n_frames)
    mean = (probs * n_frames[:, None].to(probs)).sum(0) / n_frames.sum()
    system, label, prob = choose_route(mean, head.labels, plan["route"], threshold=plan["dialect_id"]["threshold"],
                                       fallback=plan["fallback"])
    return system, label, round(prob, 4)


def prepare_routing(model, base_fp, plan: dict, device) -> None:
    """With --dialect-id: the head loaded (one line if it is not one, or for another base), each label's adapter
    (--route, else the adapter of its name) and the fallback system (mix: composed once) put into `plan`."""
    head = plan["head"] = load_head(plan["dialect_id"], base_fp, device)
    if head is None:
        return
    plan["route"], plan["fallback"] = label_routes(model, head, plan["routes"], [*plan["adapters"], *plan["mixes"]],
                                                   list(plan["adapters"]), plan["dialect_id"], "routing")


def main(argv=None) -> dict:
    args = parse_args(argv)
    try:
        summary = run(args, sys.argv[1:] if argv is None else list(argv))
    except ModelSpecError as e:
        raise SystemExit(f"error: {e}") from None
    if summary["failed"]:
        raise SystemExit(EXIT_SOME_FAILED)
    return summary


def run(args, argv) -> dict:
    """Check the arguments, load the model and adapters, transcribe every recording, write the summary."""
    plan = check_args(args)
    device = choose_device(args.device)
    if note := precision_note(args.precision, device):
        print(note)
    model, base_fp = load_base(args.model, device)
    model.to(device)
    load_systems(model, base_fp, plan["adapters"], plan["mixes"])
    prepare_routing(model, base_fp, plan, device)
    tokenizer = tokenizer_for(model, plan["language"])
    print(f"model {args.model} ({base_fp}) on {device}; system {plan['system']}; audio ctx {plan['audio_ctx']}; "
          f"{len(plan['recordings'])} recordings")
    os.makedirs(args.out, exist_ok=True)
    summary = transcribe_all(model, tokenizer, plan, args)
    summary.update({"model": args.model, "fingerprint": base_fp, "adapters": plan["adapters"],
                    "system": plan["system"], "audio_ctx": plan["audio_ctx"], "precision": args.precision,
                    "argv": argv})
    with open(os.path.join(args.out, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, ensure_ascii=False, indent=1)
    print(summary_line(summary))
    return summary


def transcribe_all(model, tokenizer, plan: dict, args) -> dict:
    """Each recording read, its system chosen, its windows decoded and its files written; unreadable, empty or
    silent recordings are named with their reason and skipped."""
    paths = plan["recordings"]
    seconds = {p: duration(p) for p in paths}
    jsonl = os.path.join(args.out, "transcripts.jsonl")
    if "jsonl" in plan["formats"]:
        open(jsonl, "w").close()  # this run's recordings only
    failed, counts, audio_s = [], dict.fromkeys(("windows", "looped_windows", "looped_after_fallback",
                                                 "no_speech_windows"), 0), 0.0
    started = time.time()
    bar = tqdm(total=sum(s for s in seconds.values() if s), unit="s", desc="audio", file=sys.stderr,
               bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} s [{elapsed}<{remaining}]")
    for path, name in zip(paths, output_names(paths)):
        try:
            wav = read_audio(path)
            check_waveform(wav, path, max_samples=None)
        except AudioError as e:
            failed.append({"audio": path, "reason": e.reason})
            bar.write(f"failed {path}: {e.reason}")
            Progress(bar, seconds[path] or 0.0).finish()
            continue
        system, dialect, prob = choose_system(wav, plan, model)
        set_active_adapter(model, None if system == "base" else system)
        progress = Progress(bar, seconds[path] or 0.0)
        tr = transcribe_waveform(model, wav, tokenizer, audio_ctx=plan["audio_ctx"], batch_size=args.batch_size,
                                 beam_size=args.beam_size, on_batch=progress.advance, precision=args.precision)
        progress.finish()  # the pauses between windows count too
        record = {"audio": path, "duration": round(wav.size / SAMPLE_RATE, 3), "dialect": dialect,
                  "dialect_prob": prob, "system": system, **tr.to_json()}
        write_recording(args.out, name, tr.segments, plan["formats"])
        if "jsonl" in plan["formats"]:
            append_jsonl(jsonl, record)
        audio_s += wav.size / SAMPLE_RATE
        counts = {k: v + record[k] for k, v in counts.items()}
    bar.close()
    elapsed = time.time() - started
    return {"files": len(paths), "transcribed": len(paths) - len(failed), "failed": failed,
            "audio_seconds": round(audio_s, 2), "seconds": round(elapsed, 2),
            "real_time_factor": round(elapsed / audio_s, 4) if audio_s else None, **counts}


class Progress:
    """Moves the bar over one recording's seconds as its windows are decoded, never past its length (which
    came from the file's header, and can differ from the resampled audio by a sample)."""

    def __init__(self, bar, seconds: float):
        self.bar, self.left = bar, seconds

    def advance(self, seconds: float) -> None:
        step = min(seconds, self.left)
        self.left -= step
        self.bar.update(step)

    def finish(self) -> None:
        self.advance(self.left)


def summary_line(s: dict) -> str:
    rtf = f"real-time factor {s['real_time_factor']:.3f}" if s["real_time_factor"] is not None else "no audio"
    line = (f"transcribed {s['transcribed']} of {s['files']} files, {s['audio_seconds'] / 3600:.3f} h of audio in "
            f"{s['seconds']:.1f} s ({rtf}); windows {s['windows']}, looped {s['looped_windows']} "
            f"({s['looped_after_fallback']} still after the beam fallback), skipped as no speech "
            f"{s['no_speech_windows']}")
    if s["failed"]:
        line += f"; FAILED {len(s['failed'])}: " + ", ".join(f"{f['audio']} ({f['reason']})" for f in s["failed"])
    return line


if __name__ == "__main__":
    main()
