"""Long-form transcription against the same clips decoded one by one: CER both ways, segment boundary errors, RTF.

    python bench/bench_longform.py --model /tmp/study_demo/mixed/model.pt \
        --adapter amdo=/tmp/study_demo/mixed_then_lora_amdo/adapter.safetensors --out /tmp/longform

Builds the seeded >= 3 min recording of demo test clips joined with 0.5-1.5 s pauses (tests/longform.py), runs
transcribe.py on it (the command is printed), decodes each clip alone with the same model, adapter and encoder
context, and prints and writes OUT/bench.json. Both CERs score the clips' transcripts joined in order against the
references joined the same way, so they differ only by what the cutting changed.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import soundfile as sf
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
from longform import boundary_errors, demo_clips, make_longform  # noqa: E402

from data.collate import batch_frames  # noqa: E402
from scoring.metrics import score_utterance  # noqa: E402
from scoring.systems import load_systems, parse_adapters, parse_audio_ctx, trained_audio_ctx  # noqa: E402
from training.setup import load_base  # noqa: E402
from whisper_ft.audio import SAMPLE_RATE, log_mel, n_frames_of, read_audio  # noqa: E402
from whisper_ft.decoding import decode  # noqa: E402
from whisper_ft.text import tokenizer_for  # noqa: E402


def clip_by_clip(args, clips) -> tuple:
    """(hypotheses, seconds): each clip decoded alone, greedy, as evaluate.py decodes with the adapter."""
    adapters, mixes = parse_adapters(args.adapter)
    model, fp = load_base(args.model, "cpu")
    load_systems(model, fp, adapters, mixes)
    model.eval()
    ctx = parse_audio_ctx(args.audio_ctx or trained_audio_ctx(adapters))
    tokenizer = tokenizer_for(model, "bo")
    started, hyps = time.time(), []
    for c in clips:
        wav = read_audio(c["audio"])
        mel = log_mel(wav)[:, :batch_frames(ctx, [n_frames_of(wav.size)])]
        hyps.append(decode(model, mel[None], tokenizer, max_tokens=224)[0][0].text)
    return hyps, time.time() - started


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--adapter", action="append", default=[])
    p.add_argument("--audio-ctx", default=None)
    p.add_argument("--seconds", type=float, default=180.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--reuse", action="store_true", help="score the transcribe.py run already in OUT/run")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    wav, placed = make_longform(demo_clips(), args.seconds, args.seed)
    audio = os.path.join(args.out, "longform.wav")
    sf.write(audio, wav, SAMPLE_RATE, subtype="PCM_16")
    cmd = [sys.executable, os.path.join(ROOT, "transcribe.py"), audio, "--model", args.model,
           *[a for spec in args.adapter for a in ("--adapter", spec)],
           *(["--audio-ctx", args.audio_ctx] if args.audio_ctx else []), "--out", os.path.join(args.out, "run")]
    print("$ " + " ".join(cmd), flush=True)
    if not args.reuse:
        subprocess.run(cmd, check=True)
    record = json.loads(open(os.path.join(args.out, "run", "transcripts.jsonl"), encoding="utf-8").readline())
    summary = json.load(open(os.path.join(args.out, "run", "summary.json"), encoding="utf-8"))
    clip_hyps, clip_seconds = clip_by_clip(args, placed)
    ref = " ".join(c["text"] for c in placed)
    starts, ends = boundary_errors(placed, record["segments"])
    errors = starts + ends
    result = {"audio_seconds": round(wav.size / SAMPLE_RATE, 1), "clips": len(placed),
              "segments": len(record["segments"]),
              "cer_longform": score_utterance(ref, record["text"], "bo")["cer"],
              "cer_clip_by_clip": score_utterance(ref, " ".join(clip_hyps), "bo")["cer"],
              "boundary_error_max_s": round(max(errors), 3), "boundary_error_mean_s": round(sum(errors) / len(errors), 3),
              "rtf_longform": summary["real_time_factor"], "rtf_clip_by_clip": round(clip_seconds / sum(
                  c["end"] - c["start"] for c in placed), 4),
              **{k: summary[k] for k in ("windows", "looped_windows", "looped_after_fallback", "no_speech_windows")},
              "torch_threads": torch.get_num_threads(), "load_average": os.getloadavg(), "command": cmd}
    json.dump(result, open(os.path.join(args.out, "bench.json"), "w"), ensure_ascii=False, indent=1)
    print(json.dumps({k: v for k, v in result.items() if k != "command"}))


if __name__ == "__main__":
    main()
