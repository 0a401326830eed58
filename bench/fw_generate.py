"""faster-whisper (CTranslate2) on the clips of bench_decode.py: its peer rows, one clip at a time and batched.

Runs in bench/.venv-peers, as a subprocess of bench_decode.py, which exports the same weights with
`export.py --to ct2` (float32 and int8) and passes clips and mel in one .npz file:

    bench/.venv-peers/bin/python bench/fw_generate.py CT2_DIR IN.npz OUT.json --compute-type float32|int8
        --mode transcribe|batched [--threads 2] [--prompt ID ...]

transcribe: `WhisperModel.transcribe` per clip, as users call it (its own log-mel front end), greedy,
temperature 0, no timestamps, no previous-text conditioning, no VAD: the search of the other rows.
batched:    `WhisperModel.model.generate` (CTranslate2) on all clips' 30 s log-mel at once, the forced
            prefix `--prompt` and whisper's default suppression: as batched as CTranslate2 allows.
OUT.json: {"wall": s, "cpu": s, "tokens" | "texts": per clip}; only the decode is timed, after a warm-up.
"""
import argparse
import json
import time

import numpy as np


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("inp")
    ap.add_argument("out")
    ap.add_argument("--compute-type", required=True, choices=["float32", "int8"])
    ap.add_argument("--mode", required=True, choices=["transcribe", "batched"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, nargs="+", required=True, help="the forced prefix token ids")
    args = ap.parse_args(argv)

    import ctranslate2
    from faster_whisper import WhisperModel

    blob = np.load(args.inp)
    clips, mel = [blob[f"clip{i}"] for i in range(int(blob["n"]))], blob["mel"]
    fw = WhisperModel(args.model, device="cpu", compute_type=args.compute_type, cpu_threads=args.threads)

    def transcribe():
        texts = []
        for c in clips:
            segs, _ = fw.transcribe(c, language="en", task="transcribe", beam_size=1, temperature=0,
                                    condition_on_previous_text=False, without_timestamps=True, vad_filter=False)
            texts.append("".join(s.text for s in segs).strip())
        return {"texts": texts}

    def batched(features=mel):
        storage = ctranslate2.StorageView.from_array(np.ascontiguousarray(features))
        # max_length counts otherwise than whisper's sample_len: generate to the end (448), cut at 224 after
        res = fw.model.generate(storage, [args.prompt] * len(features), beam_size=1, max_length=448,
                                suppress_blank=True, suppress_tokens=[-1])
        return {"tokens": [[t for t in r.sequences_ids[0]][:224] for r in res]}

    if args.mode == "transcribe":
        segs, _ = fw.transcribe(clips[0][:16000], language="en", beam_size=1, without_timestamps=True, vad_filter=False)
        list(segs)  # a generator: the warm-up decodes only when consumed
        run = transcribe
    else:
        batched(mel[:1])
        run = batched
    w0, c0 = time.perf_counter(), time.process_time()
    result = run()
    result.update(wall=time.perf_counter() - w0, cpu=time.process_time() - c0)
    with open(args.out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
