"""Round trips of export.py: each export decoded by the runtime users load it with, against our own decoding.

    .venv/bin/pip install -r requirements-export.txt
    .venv/bin/python bench/bench_export.py --adapter amdo=runs/amdo --out docs/export_roundtrip.md

Our decoding of base + adapter (greedy, 30 s windows, whisper's suppression, no loop guard) is the reference.
Each row exports the same model with export.py and decodes the same log-mel features (so the runtime, not the
audio front end, is compared) with: plain `whisper.decode` on the openai .pt; transformers' `generate` on the HF
directory; faster-whisper's CTranslate2 model on the ct2 directory (float32 and int8). A last row runs
faster-whisper's own `transcribe` on the waveforms (its own front end), as a user would. Every row gets the same
token budget. Prints and writes a table: identical texts, macro CER, decode time.
"""
import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import export  # noqa: E402
from data.collate import Collator, SpeechDataset  # noqa: E402
from data.sources import limit_per_dialect, load_examples  # noqa: E402
from scoring.evaluation import eval_batches, summarize  # noqa: E402
from scoring.metrics import score_corpus  # noqa: E402
from scoring.systems import load_systems, parse_adapters  # noqa: E402
from training.setup import choose_device, load_base  # noqa: E402
from whisper_ft.decoding import decode, suppress_tokens  # noqa: E402
from whisper_ft.text import normalize_text, prefix_tokens, tokenizer_for  # noqa: E402


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def ours(model, batches, tok, max_tokens):
    out = []
    for _, b in batches:
        out += [h[0].text for h in decode(model, b.mel, tok, max_tokens=max_tokens, loop_guard=False)]
    return out


def openai_rows(path, batches, tok, language, max_tokens):
    import whisper

    model = whisper.load_model(path, device="cpu")
    opts = whisper.DecodingOptions(language=language, without_timestamps=True, fp16=False, sample_len=max_tokens)
    return [r.text for _, b in batches for r in whisper.decode(model, b.mel, opts)]


def hf_rows(path, batches, tok, language, max_tokens):
    from transformers import WhisperForConditionalGeneration
    from transformers.utils import logging

    logging.set_verbosity_error()
    model = WhisperForConditionalGeneration.from_pretrained(path).eval()
    # whisper's suppression set (the generation_config holds the non-speech tokens only, as HF's own exports)
    kw = dict(language=language, task="transcribe", return_timestamps=False, do_sample=False, num_beams=1,
              max_new_tokens=max_tokens, suppress_tokens=suppress_tokens(tok))
    out = []
    with torch.no_grad():
        for _, b in batches:
            seqs = model.generate(input_features=b.mel, **kw)
            out += [tok.decode([t for t in row if t < tok.eot]).strip() for row in seqs.tolist()]
    return out


def ct2_rows(path, compute_type, batches, tok, max_tokens, threads):
    import ctranslate2
    from faster_whisper import WhisperModel

    fw = WhisperModel(path, device="cpu", compute_type=compute_type, cpu_threads=threads)
    prompt = prefix_tokens(tok)
    out = []
    for _, b in batches:
        features = ctranslate2.StorageView.from_array(np.ascontiguousarray(b.mel.numpy()))
        # CTranslate2's max_length does not count as ours does: generate to the end, keep the same token budget
        res = fw.model.generate(features, [prompt] * len(b), beam_size=1, max_length=448,
                                suppress_blank=True, suppress_tokens=[-1])
        out += [tok.decode([t for t in r.sequences_ids[0] if t < tok.eot][:max_tokens]).strip() for r in res]
    return out


def faster_whisper_transcribe(path, examples, language, threads):
    from faster_whisper import WhisperModel

    from whisper_ft.audio import read_audio

    fw = WhisperModel(path, device="cpu", compute_type="float32", cpu_threads=threads)
    out = []
    for e in examples:
        segs, _ = fw.transcribe(read_audio(e.audio), language=language, beam_size=1, temperature=0,
                                condition_on_previous_text=False, without_timestamps=True, vad_filter=False)
        out.append("".join(s.text for s in segs).strip())
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="offline:base")
    ap.add_argument("--adapter", required=True, metavar="NAME=PATH")
    ap.add_argument("--data", default="demo")
    ap.add_argument("--language", default="bo")
    ap.add_argument("--max-samples", type=int, default=None, help="clips per dialect (default: all)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=None,
                    help="token budget of every row (default: the longest reference + 8, so no correct text is cut "
                         "and a looping one stops there)")
    ap.add_argument("--out", default=None, help="also write the table to this markdown file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    choose_device("cpu")
    examples, _ = load_examples(args.data, "test", language=args.language)
    examples = limit_per_dialect(examples, args.max_samples)
    model, fp = load_base(args.model, "cpu")
    adapters, mixes = parse_adapters([args.adapter])
    load_systems(model, fp, adapters, mixes)
    name = args.adapter.partition("=")[0]
    from lora.adapters import set_active_adapter
    set_active_adapter(model, name)
    model.eval()
    tok = tokenizer_for(model, args.language)
    dataset = SpeechDataset(examples, n_mels=model.dims.n_mels)
    batches = list(eval_batches(dataset, Collator(tok, n_mels=model.dims.n_mels, audio_ctx="full"), args.batch_size))
    refs = [t for _, b in batches for t in b.texts]
    dialects = [d for d, b in batches for _ in b.texts]
    longest = max(len(tok.encode(normalize_text(e.text, e.language))) for e in examples)
    max_tokens = args.max_tokens or longest + 8
    rows = {}
    rows["ours (base + adapter, LoRA layers)"] = timed(lambda: ours(model, batches, tok, max_tokens))
    with tempfile.TemporaryDirectory() as tmp:
        def ex(to, out, *extra):
            export.main(["--model", args.model, "--adapter", args.adapter, "--to", to, "--out", out, *extra])
            return out
        pt, hf = ex("openai", os.path.join(tmp, "m.pt")), ex("hf", os.path.join(tmp, "hf"))
        c32, c8 = ex("ct2", os.path.join(tmp, "ct2"), "--quantization", "float32"), ex("ct2", os.path.join(tmp, "ct2i8"), "--quantization", "int8")
        rows["openai .pt, whisper.decode"] = timed(lambda: openai_rows(pt, batches, tok, args.language, max_tokens))
        rows["hf, transformers generate"] = timed(lambda: hf_rows(hf, batches, tok, args.language, max_tokens))
        rows["ct2 float32, faster-whisper model"] = timed(lambda: ct2_rows(c32, "float32", batches, tok, max_tokens, args.threads))
        rows["ct2 int8, faster-whisper model"] = timed(lambda: ct2_rows(c8, "int8", batches, tok, max_tokens, args.threads))
        ordered = sorted(examples, key=lambda e: e.dialect)  # eval_batches' order (every demo clip loads)
        rows["ct2 float32, faster-whisper transcribe (own front end)"] = timed(
            lambda: faster_whisper_transcribe(c32, ordered, args.language, args.threads))
    reference = rows["ours (base + adapter, LoRA layers)"][1]
    lines = [f"Round trips of export.py: {args.model} + {args.adapter}, {len(refs)} clips of {args.data} "
             f"(greedy, 30 s windows, {max_tokens} tokens at most, {args.threads} threads), "
             f"{time.strftime('%Y-%m-%d %H:%M')}", "",
             "| runtime | same text as ours | macro CER | decode s |", "|---|---|---|---|"]
    for label, (secs, hyps) in rows.items():
        same = sum(a.strip() == b.strip() for a, b in zip(hyps, reference))
        scored = score_corpus(refs, hyps, args.language)["utterances"]
        macro = summarize([dict(u, dialect=d) for u, d in zip(scored, dialects)])["_macro"]["cer"]
        lines.append(f"| {label} | {same}/{len(refs)} | {macro:.3f} | {secs:.1f} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
