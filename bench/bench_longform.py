"""Long-form transcription against the same clips decoded one by one: CER both ways, segment boundary errors, RTF.

    python bench/bench_longform.py --model /tmp/study_demo/mixed/model.pt \
        --adapter amdo=/tmp/study_demo/mixed_then_lora_amdo/adapter.safetensors --out /tmp/longform

Builds the seeded >= 3 min recording of demo test clips joined with 0.5-1.5 s pauses (tests/longform.py), runs
transcribe.py on it (the command is printed), decodes the clips by themselves with the same model, adapter and encoder
context (as evaluate.py does, and again with transcribe.py's beam retry of a looped clip), and prints and writes
OUT/bench.json. The CERs score the clips' transcripts joined in order against the
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
from lora.adapters import set_active_adapter  # noqa: E402
from scoring.metrics import score_utterance  # noqa: E402
from scoring.systems import load_systems, parse_adapters, parse_audio_ctx, trained_audio_ctx  # noqa: E402
from training.setup import load_base  # noqa: E402
from whisper_ft.audio import SAMPLE_RATE, log_mel, n_frames_of, read_audio  # noqa: E402
from whisper_ft.decoding import decode  # noqa: E402
from transcription.longform import FALLBACK_BEAM, MAX_TOKENS  # noqa: E402
from whisper_ft.text import tokenizer_for  # noqa: E402


def clip_by_clip(args, clips) -> tuple:
    """(hypotheses as evaluate.py decodes them, the same with a looped clip decoded again by beam search as
    transcribe.py does, clips that looped, seconds): the clips decoded greedily in batches of --clip-batch, each
    batch's mel cropped to its longest clip as evaluate.py's collator does (--clip-batch 1: each clip alone)."""
    adapters, mixes = parse_adapters(args.adapter)
    model, fp = load_base(args.model, "cpu")
    load_systems(model, fp, adapters, mixes)
    set_active_adapter(model, next(iter([*adapters, *mixes]), None))  # loading leaves every adapter off
    model.eval()
    ctx = parse_audio_ctx(args.audio_ctx or trained_audio_ctx(adapters))
    tokenizer = tokenizer_for(model, "bo")
    started, plain, retried, looped = time.time(), [], [], 0
    for i in range(0, len(clips), args.clip_batch):
        wavs = [read_audio(c["audio"]) for c in clips[i:i + args.clip_batch]]
        T = batch_frames(ctx, [n_frames_of(w.size) for w in wavs])
        mel = torch.stack([log_mel(w)[:, :T] for w in wavs])
        for j, hyp in enumerate(h[0] for h in decode(model, mel, tokenizer, max_tokens=MAX_TOKENS)):
            plain.append(hyp.text)
            if hyp.looped:  # the retry transcribe.py makes, so the comparison isolates the cutting
                looped += 1
                hyp = decode(model, mel[j:j + 1], tokenizer, beam_size=FALLBACK_BEAM, max_tokens=MAX_TOKENS)[0][0]
            retried.append(hyp.text.rstrip("\ufffd"))
    return plain, retried, looped, time.time() - started


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--adapter", action="append", default=[])
    p.add_argument("--audio-ctx", default=None)
    p.add_argument("--seconds", type=float, default=180.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--clip-batch", type=int, default=16, help="clips per batch (evaluate.py's default 16)")
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
    clip_hyps, clip_retried, clip_looped, clip_seconds = clip_by_clip(args, placed)
    ref = " ".join(c["text"] for c in placed)
    starts, ends = boundary_errors(placed, record["segments"])
    errors = starts + ends
    result = {"audio_seconds": round(wav.size / SAMPLE_RATE, 1), "clips": len(placed),
              "segments": len(record["segments"]),
              "cer_longform": score_utterance(ref, record["text"], "bo")["cer"],
              "cer_clip_by_clip": score_utterance(ref, " ".join(clip_hyps), "bo")["cer"],
              "cer_clip_by_clip_with_retry": score_utterance(ref, " ".join(clip_retried), "bo")["cer"],
              "clips_looped": clip_looped,
              "boundary_error_max_s": round(max(errors), 3), "boundary_error_mean_s": round(sum(errors) / len(errors), 3),
              "rtf_longform": summary["real_time_factor"], "rtf_clip_by_clip": round(clip_seconds / sum(
                  c["end"] - c["start"] for c in placed), 4),
              **{k: summary[k] for k in ("windows", "looped_windows", "looped_after_fallback", "no_speech_windows")},
              "clip_batch": args.clip_batch, "torch_threads": torch.get_num_threads(), "load_average": os.getloadavg(), "command": cmd}
    json.dump(result, open(os.path.join(args.out, "bench.json"), "w"), ensure_ascii=False, indent=1)
    print(json.dumps({k: v for k, v in result.items() if k != "command"}))


if __name__ == "__main__":
    main()
