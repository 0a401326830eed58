"""Decode test sets with several systems and write the per-dialect CER/WER table the research is written in.

    python evaluate.py --model offline:base --adapter amdo=runs/amdo/adapter.safetensors --data demo --out eval/
    python evaluate.py --model tiny --checkpoint runs/full/model.pt --data openpecha --data ctrl.jsonl \
        --language bo --language en --out eval/

Systems in one run: `base`; each `--checkpoint` (a fully fine-tuned model, or a run directory holding model.pt);
each `--adapter NAME=PATH` on the base; and `routed`, where each utterance is decoded with the adapter named
after its own dialect (the base where there is none), so dialects without an adapter keep the base's accuracy.
Writes OUT/results.json, results.md, results.csv, results_cer.png and utterances.jsonl.
"""
import argparse
import os
import sys

import torch
import whisper

from data.collate import Collator, SpeechDataset
from data.sources import load_examples
from lora.adapters import AdapterMismatchError, load_adapter, set_active_adapter
from whisper_ft.encoder import enable_dynamic_audio_ctx
from whisper_ft.evaluation import evaluate_systems, format_table, term_recall, write_chart, write_results
from whisper_ft.models import ModelSpecError, fingerprint, load_model
from whisper_ft.text import resolve_language


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="offline:base", help="base model spec (see whisper_ft/models.py)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH", help="LoRA adapter file; repeatable")
    p.add_argument("--checkpoint", action="append", default=[], metavar="PATH",
                   help="fully fine-tuned model (.pt, model spec, or a train.py run directory); repeatable")
    p.add_argument("--data", action="append", default=None, help="test source; repeatable (default: demo)")
    p.add_argument("--language", action="append", default=None, help="one per --data, or one for all (default bo)")
    p.add_argument("--split", default="test")
    p.add_argument("--dialect", default=None, help="only these dialects (comma-separated)")
    p.add_argument("--max-samples", type=int, default=None, help="clips per dialect (default: all)")
    p.add_argument("--no-routed", action="store_true", help="do not add the routed system")
    p.add_argument("--terms", help="file of domain terms, one per line: reports the recall of each per system")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--beam-size", type=int, default=1)
    p.add_argument("--audio-ctx", default="full", help="full (30 s windows) or auto (crop to the batch)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", required=True, help="output directory")
    return p.parse_args(argv)


def parse_adapters(values) -> dict:
    adapters = {}
    for v in values:
        name, sep, path = v.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"error: --adapter {v!r}: expected NAME=PATH, e.g. amdo=runs/amdo/adapter.safetensors")
        if not os.path.isfile(path):
            raise SystemExit(f"error: --adapter {name}={path}: no such file")
        if name in adapters or name in ("base", "routed"):
            raise SystemExit(f"error: --adapter {name}: duplicate or reserved name")
        adapters[name] = path
    return adapters


def checkpoint_spec(path: str) -> str:
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "model.pt")):
        return os.path.join(path, "model.pt")
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "adapter.safetensors")):
        raise SystemExit(f"error: --checkpoint {path} is a LoRA run: pass --adapter NAME={path}/adapter.safetensors")
    return path


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    sources = args.data or ["demo"]
    languages = args.language or ["bo"]
    if len(languages) not in (1, len(sources)):
        raise SystemExit(f"error: {len(languages)} --language values for {len(sources)} --data sources: give one, or one each")
    languages = [resolve_language(lang) for lang in (languages * len(sources) if len(languages) == 1 else languages)]
    adapters = parse_adapters(args.adapter)
    dialects = set(args.dialect.split(",")) if args.dialect else None

    model = load_model(args.model, device)
    base_fp = fingerprint(model)
    for name, path in adapters.items():
        try:
            load_adapter(model, path, name, base_fingerprint=base_fp)
        except AdapterMismatchError as e:
            raise SystemExit(f"error: --adapter {name}={path}: {e}") from None
    model.to(device)
    if args.audio_ctx != "full":
        enable_dynamic_audio_ctx(model)
    print(f"model {args.model} ({base_fp}) on {device}; adapters {sorted(adapters) or 'none'}")

    results, records = {}, []
    for source, language in zip(sources, languages):
        examples, report = load_examples(source, args.split, language=language)
        print(report.summary())
        if dialects:
            examples = [e for e in examples if e.dialect in dialects]
        examples = _limit_per_dialect(examples, args.max_samples)
        if not examples:
            raise SystemExit(f"error: --data {source}: no {args.split} examples left (check --dialect / --split)")
        found = sorted({e.dialect for e in examples})
        unknown = [a for a in adapters if a not in found]
        if unknown and not args.no_routed:
            print(f"note: adapters {unknown} match no dialect of {source} ({found}); routing uses the base there")
        tokenizer = whisper.tokenizer.get_tokenizer(model.is_multilingual, num_languages=model.num_languages,
                                                    language=language, task="transcribe")
        dataset = SpeechDataset(examples, n_mels=model.dims.n_mels)
        collator = Collator(tokenizer, n_mels=model.dims.n_mels,
                            audio_ctx=args.audio_ctx if args.audio_ctx in ("full", "auto") else int(args.audio_ctx))
        systems = {"base": lambda d: set_active_adapter(model, None)}
        for name in adapters:
            systems[name] = lambda d, n=name: set_active_adapter(model, n)
        if adapters and not args.no_routed:
            systems["routed"] = lambda d: set_active_adapter(model, d if d in adapters else None)
        kw = dict(language=language, batch_size=args.batch_size, beam_size=args.beam_size, device=device)
        part, recs = evaluate_systems(model, dataset, collator, tokenizer, systems, **kw)
        set_active_adapter(model, None)
        for path in args.checkpoint:
            other = load_model(checkpoint_spec(path), device)
            if args.audio_ctx != "full":
                enable_dynamic_audio_ctx(other)
            name = _system_name(path)
            more, more_recs = evaluate_systems(other, dataset, collator, tokenizer, {name: lambda d: None}, **kw)
            part.update(more)
            recs += more_recs
            del other
        _merge(results, part, source if len(sources) > 1 else None)
        records += [dict(r, data=source) for r in recs]
        if dataset.failures:
            print(f"{source}: skipped unreadable clips {dict(dataset.failures)}")

    if args.terms:
        terms = [t.strip() for t in open(args.terms, encoding="utf-8") if t.strip()]
        for system, recall in term_recall(records, terms).items():
            results[system]["_terms"] = recall
    meta = {"model": args.model, "fingerprint": base_fp, "adapters": adapters, "checkpoints": args.checkpoint,
            "data": sources, "languages": languages, "argv": sys.argv[1:] if argv is None else list(argv)}
    write_results(args.out, results, records, meta)
    write_chart(args.out, results)
    print(format_table(results))
    print(f"wrote {args.out}/results.json, results.md, results.csv, results_cer.png, utterances.jsonl")
    return results


def _merge(results, part, prefix):
    for system, per_dialect in part.items():
        target = results.setdefault(system, {})
        for key, value in per_dialect.items():
            target[f"{prefix}/{key}" if prefix and not key.startswith("_") else key] = value


def _system_name(path):
    name = os.path.basename(os.path.normpath(path))
    return os.path.basename(os.path.dirname(os.path.abspath(path))) if name == "model.pt" else name.removesuffix(".pt")


def _limit_per_dialect(examples, n):
    if not n:
        return examples
    seen, kept = {}, []
    for e in examples:
        seen[e.dialect] = seen.get(e.dialect, 0) + 1
        if seen[e.dialect] <= n:
            kept.append(e)
    return kept


if __name__ == "__main__":
    try:
        main()
    except (ModelSpecError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
