"""Decode test sets with several systems and write the per-dialect CER/WER table the research is written in.

    python evaluate.py --model offline:base --adapter amdo=runs/amdo/adapter.safetensors --data demo --out eval/
    python evaluate.py --model tiny --checkpoint runs/full/model.pt --data bo=openpecha --data en=ctrl.jsonl \
        --language bo --language en --out eval/

Systems in one run: `base`; each `--checkpoint` (a fully fine-tuned model, or a run directory holding model.pt);
each `--adapter NAME=PATH` on the base; and `routed`, where each utterance is decoded with the adapter named
after its own dialect (or the one `--route DIALECT=NAME` picks; the base where there is none), so dialects
without an adapter keep the base's accuracy by construction. With `--dialect-id PATH` (a train.py --task
dialect-id head), the head's accuracy, per-dialect recall and confusion matrix are added (results.json
`_dialect_id`, results.md), and `routed-auto`: each utterance decoded with the adapter of its *predicted*
dialect, or with `--route-fallback` (base, mix: the uniform composition of the adapter files, or an --adapter
name) where no adapter is for that dialect or its probability is under `--route-threshold`.

With one `--data` source the rows are its dialects; with several, each row is `SOURCE/dialect`, where SOURCE
is the name given as `--data NAME=SPEC` (default: the spec's file or directory name), and the table adds a
macro-average row per source. Clips whose audio is missing or unreadable are skipped, counted per source and
reported (printed, in results.md and in results.json's `_meta.skipped`); they never stop the run.
Writes OUT/results.json, results.md, results.csv, results_cer.png and utterances.jsonl.
"""
import argparse
import json
import os
import re
import sys
from collections import Counter
from pathlib import Path

import torch

from data.collate import Collator, SpeechDataset
from data.sources import SourceError, add_data_args, data_options, limit_per_dialect, load_examples
from data.validate import DataError
from lora.adapters import set_active_adapter
from research import robustness
from scoring.evaluation import Routed, eval_batches, evaluate_systems, identify, summarize, token_limit
from scoring.metrics import classification_summary, term_recall
from scoring.systems import (RESERVED, add_decoding_args, add_routing_args, added_vocabulary, check_dialect_id,
                             checkpoint_spec, fit_mix, label_routes, load_head, load_systems, parse_adapters,
                             parse_audio_ctx, parse_routes, system_name, trained_audio_ctx)
from scoring.tables import format_dialect_id, format_table, format_terms, write_chart, write_results
from training.setup import choose_device, language_of, load_base, precision_note
from whisper_ft.dialect_id import choose_route, predict_dialect
from whisper_ft.encoder import enable_dynamic_audio_ctx
from whisper_ft.models import ModelSpecError, fingerprint, load_model
from whisper_ft.text import tokenizer_for

_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="offline:base", help="base model spec (see whisper_ft/models.py)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                   help="LoRA adapter file (or a train.py run directory holding adapter.safetensors); repeatable")
    p.add_argument("--mix-rank", type=int, default=None,
                   help="truncate each composition (--adapter NAME=A@w+B@w) to this rank by SVD (default: exact)")
    p.add_argument("--fit-data", default=None, metavar="SOURCE",
                   help="labelled clips of the dialect a composition given without weights is for: its weights are "
                        "fitted on them (lowest CER); without it such a composition is uniform")
    p.add_argument("--fit-samples", type=int, default=20, help="clips of --fit-data to fit on (of --dialect, if given)")
    p.add_argument("--fit-split", default="train", help="split of --fit-data to fit on (keep it apart from the test clips)")
    p.add_argument("--route", action="append", default=[], metavar="DIALECT=NAME",
                   help="routed system: decode DIALECT with adapter NAME (default: the adapter named after the dialect)")
    p.add_argument("--checkpoint", action="append", default=[], metavar="PATH",
                   help="fully fine-tuned model (.pt, model spec, or a train.py run directory); repeatable")
    p.add_argument("--data", action="append", default=None, metavar="[NAME=]SOURCE",
                   help="test source, optionally named; repeatable (default: demo)")
    p.add_argument("--language", action="append", default=None, help="one per --data, or one for all (default bo)")
    p.add_argument("--language-fallback", default=None,
                   help="Whisper language token to reuse for a language Whisper lacks (e.g. bo for Dzongkha)")
    p.add_argument("--split", default="test")
    add_data_args(p)
    p.add_argument("--dialect", default=None, help="only these dialects (comma-separated)")
    p.add_argument("--max-samples", type=int, default=None, help="clips per dialect (default: all)")
    p.add_argument("--no-routed", action="store_true", help="do not add the routed system")
    add_routing_args(p, "clip", "scores it and, with adapters, adds routed-auto (each clip routed by its predicted dialect)")
    p.add_argument("--systems", default=None, metavar="NAME,...",
                   help="decode only these systems (e.g. routed), skipping the others (default: all)")
    p.add_argument("--terms", help="file of domain terms, one per line: reports the recall of each per system")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--beam-size", type=int, default=1)
    p.add_argument("--nbest", type=int, default=5, help="N-best list size for --robustness (beam = max(N, --beam-size))")
    p.add_argument("--robustness", action="store_true",
                   help="N-best perturbation rescoring robustness (NPRR) per system and dialect; see the README")
    add_decoding_args(p)
    p.add_argument("--base-8bit", action="store_true",
                   help="hold the base's Linear weights in int8 (as train.py --base-8bit), adapters on top; "
                        "--checkpoint models stay fp32")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", required=True, help="output directory")
    return p.parse_args(argv)


# --- command-line values, all checked before any model is loaded -----------------------------------

def parse_data(values) -> list[tuple[str, str]]:
    """[(name, spec)]: `NAME=SPEC` names a source; otherwise its name is the spec's file/directory stem."""
    out = []
    for v in values:
        name, sep, spec = v.partition("=")
        if not (sep and spec and _NAME.fullmatch(name)) or os.path.exists(v):
            name, spec = _source_name(v), v
        out.append((name, spec))
    names = [n for n, _ in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise SystemExit(f"error: several --data sources are named {dup[0]!r}: name them, e.g. --data bo=... --data en=...")
    return out


def _source_name(spec: str) -> str:
    if spec.startswith("hf:"):
        return re.split(r"[:@]", spec[3:].rstrip("/"))[0].rstrip("/").rsplit("/", 1)[-1] or spec
    if spec.startswith("openpecha"):
        return "openpecha"
    return Path(spec.rstrip("/")).stem or spec


def _read_terms(path) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            terms = [t.strip() for t in f if t.strip()]
    except OSError as e:
        raise SystemExit(f"error: --terms {path}: {e.strerror or e}") from None
    if not terms:
        raise SystemExit(f"error: --terms {path}: no terms (expected one per line)")
    return terms


# --- the run ---------------------------------------------------------------------------------------

def main(argv=None) -> dict:
    args = parse_args(argv)
    try:
        return run(args, sys.argv[1:] if argv is None else list(argv))
    except (ModelSpecError, SourceError, DataError) as e:
        raise SystemExit(f"error: {e}") from None


def run(args, argv) -> dict:
    """Check every argument, load the test sets, decode them under every system, score, write the tables."""
    plan = check_args(args)  # before anything slow: a wrong flag costs seconds
    device = choose_device(args.device)
    if note := precision_note(args.precision, device):
        print(note)
    data, skipped = load_data(plan, args)
    model, base_fp = load_base(args.model, device, base_8bit=args.base_8bit)
    model.to(device)
    head = load_head(plan["dialect_id"], base_fp, device)
    systems, checkpoints, route, mixes = choose_systems(model, base_fp, plan, data, args, device, head)
    decode_s = {}
    records, robust, failures = decode_all(model, systems, checkpoints, data, args, plan["audio_ctx"], device, decode_s)
    results = tabulate(records, robust, data, [*systems, *checkpoints], plan["terms"])
    if head is not None:
        results["_dialect_id"] = score_dialect_id(model, head, records, data, args, plan, device)
    for name, s in skipped.items():
        s["at_load"] = failures.get(name, {})
    meta = {"model": args.model, "fingerprint": base_fp, "base_8bit": args.base_8bit, "adapters": plan["adapters"],
            "mixes": mixes, "audio_ctx": plan["audio_ctx"], "precision": args.precision,
            "routes": route if "routed" in systems else {}, "checkpoints": checkpoints, "data": dict(plan["sources"]),
            "languages": dict(zip([n for n, _ in plan["sources"]], plan["languages"])),
            "skipped": summarize_skipped(skipped), "argv": argv,
            "decode_s": {k: round(v, 2) for k, v in decode_s.items()}}
    write_all(args.out, results, records, robust, meta)
    return results


def check_args(args) -> dict:
    """Every command-line value parsed and checked, before any data or model is loaded."""
    sources = parse_data(args.data or ["demo"])
    languages = args.language or ["bo"]
    if len(languages) not in (1, len(sources)):
        raise SystemExit(f"error: {len(languages)} --language values for {len(sources)} --data sources: give one, or one each")
    languages = [language_of(lang, args.language_fallback)
                 for lang in (languages * len(sources) if len(languages) == 1 else languages)]
    adapters, mixes = parse_adapters(args.adapter)
    if added_vocabulary(adapters) and args.robustness:  # also: different added tokens are one line here, early
        raise SystemExit("error: --robustness with adapters that added tokens (--add-tokens) is not supported yet: "
                         "the base would rescore text in tokens it has no rows for; drop --robustness")
    checkpoints = {}
    for path in args.checkpoint:
        name = system_name(path)
        if name in checkpoints or name in adapters or name in mixes or name in RESERVED:
            raise SystemExit(f"error: --checkpoint {path}: system name {name!r} is already taken; rename the file")
        checkpoints[name] = checkpoint_spec(path)
    return {"sources": sources, "languages": languages, "adapters": adapters, "mixes": mixes,
            "dialect_id": check_dialect_id(args.dialect_id, args.route_threshold, args.route_fallback,
                                           {**adapters, **mixes}),
            "routes": parse_routes(args.route, {**adapters, **mixes}), "checkpoints": checkpoints,
            "audio_ctx": parse_audio_ctx(args.audio_ctx or trained_audio_ctx(adapters)), "terms": _read_terms(args.terms) if args.terms else None,
            "dialects": set(args.dialect.split(",")) if args.dialect else None}


def load_data(plan: dict, args) -> tuple[list, dict]:
    """[(source name, language, examples)] and the rows skipped per source: every source loaded and validated up
    front, so bad rows are counted and a wrong --data fails in seconds."""
    data, skipped, dialects = [], {}, plan["dialects"]
    for (name, spec), language in zip(plan["sources"], plan["languages"]):
        examples, report = load_examples(spec, args.split, language=language, **data_options(args))
        print(report.summary())
        hint = report.dialect_hint()
        present = sorted({e.dialect for e in examples})
        if dialects:
            examples = [e for e in examples if e.dialect in dialects]
        examples = limit_per_dialect(examples, args.max_samples)
        if not examples:
            raise SystemExit(f"error: --data {spec}: no usable {args.split} examples"
                             + (f" of dialects {sorted(dialects)} (it has {present})" if dialects and present else "")
                             + (f"; {hint}" if hint else " (check --dialect / --split, and the skipped rows above)"))
        if hint:
            print(f"note: {hint}")
        data.append((name, language, examples))
        skipped[name] = {"rows": dict(report.skipped), "examples": report.named, "at_load": {}}
    return data, skipped


def choose_systems(model, base_fp, plan: dict, data: list, args, device, head=None):
    """({system: activate(dialect)} on the base model, {checkpoint system: spec}, {dialect: adapter or None}).

    The adapters are loaded into the base model here; `activate` switches to a system's adapter (none for
    the base) before a batch of that dialect is decoded, so `routed` is exact per utterance."""
    routes, checkpoints = plan["routes"], dict(plan["checkpoints"])
    fit = (lambda m, name, terms: fit_on(m, name, terms, args, plan, device)) if args.fit_data else None
    mixes = load_systems(model, base_fp, plan["adapters"], plan["mixes"], mix_rank=args.mix_rank, fit=fit)
    adapters = [*plan["adapters"], *mixes]
    if plan["audio_ctx"] != "full":
        enable_dynamic_audio_ctx(model)
    print(f"model {args.model} ({base_fp}) on {device}; adapters {sorted(adapters) or 'none'}")
    found = sorted({e.dialect for _, _, examples in data for e in examples})
    route = {d: routes.get(d, d if d in adapters else None) for d in found}
    for d in sorted(set(routes) - set(found)):
        print(f"note: --route {d}={routes[d]}: no clip of dialect {d!r} in the data ({found})")
    systems = {"base": lambda d: set_active_adapter(model, None)}
    systems.update({name: lambda d, n=name: set_active_adapter(model, n) for name in adapters})
    if adapters and not args.no_routed:
        unused = sorted(set(adapters) - set(route.values()))
        if unused:
            print(f"note: routing uses no dialect for adapters {unused} (dialects: {found}); use --route DIALECT=NAME")
        print("routed: " + ", ".join(f"{d} -> {a or 'base'}" for d, a in route.items()))
        systems["routed"] = lambda d: set_active_adapter(model, route.get(d))
    if head is not None and adapters:
        systems["routed-auto"] = routed_auto(model, head, adapters, list(plan["adapters"]), routes, plan["dialect_id"])
    if args.systems:  # checked here, where every system's name is known
        wanted = [s for s in args.systems.split(",") if s]
        unknown = sorted(set(wanted) - set(systems) - set(checkpoints))
        if unknown:
            raise SystemExit(f"error: --systems {','.join(unknown)}: no such system; this run has "
                             f"{', '.join([*systems, *checkpoints])}")
        systems = {k: v for k, v in systems.items() if k in wanted}
        checkpoints = {k: v for k, v in checkpoints.items() if k in wanted}
    return systems, checkpoints, route, mixes


def routed_auto(model, head, adapters: list, files: list, routes: dict, spec: dict) -> Routed:
    """routed-auto: each clip's dialect predicted by `head` on the base's encoder, then the clip decoded with that
    dialect's adapter (--route DIALECT=NAME, else the adapter named after it) or with the fallback."""
    route, fallback = label_routes(model, head, routes, adapters, files, spec, "routed-auto")
    states = {"base": lambda: set_active_adapter(model, None)}
    states.update({a: (lambda a=a: set_active_adapter(model, a)) for a in {*adapters, fallback} - {"base"}})
    threshold = spec["threshold"]

    def choose(batch, mel):
        set_active_adapter(model, None)  # the head reads the encoder of the base it was trained on
        picks = [choose_route(p, head.labels, route, threshold=threshold, fallback=fallback)
                 for p in predict_dialect(model, head, mel, batch.n_frames)]
        return [(system, {"predicted": label, "prob": round(prob, 4), "route": system}) for system, label, prob in picks]
    return Routed(choose, states)


def score_dialect_id(model, head, records, data, args, plan, device) -> dict:
    """The head's accuracy, recall per dialect and confusion matrix on the test clips: from routed-auto's
    predictions where it was decoded, else from a pass of the head alone."""
    rows = [r for r in records if r["system"] == "routed-auto"]
    if not rows:
        set_active_adapter(model, None)
        for name, language, examples in data:
            collator = Collator(tokenizer_for(model, language), n_mels=model.dims.n_mels, audio_ctx=plan["audio_ctx"])
            rows += identify(model, head, SpeechDataset(examples, n_mels=model.dims.n_mels), collator,
                             batch_size=args.batch_size, device=device)
    summary = classification_summary([r["dialect"] for r in rows], [r["predicted"] for r in rows], head.labels)
    unknown = sorted(set(summary["recall"]) - set(head.labels))
    if unknown:
        summary["note"] = f"the head has no label for {', '.join(unknown)} (recall 0 by definition)"
    routes_used = Counter(r["route"] for r in rows if "route" in r)
    return {**summary, **plan["dialect_id"], "routes_used": dict(routes_used)}


def fit_on(model, name, terms, args, plan, device) -> dict:
    """Fit the weights of composition `name` on --fit-samples clips of --fit-data (see scoring/systems.fit_mix)."""
    language = plan["languages"][0]
    examples, _ = load_examples(args.fit_data, args.fit_split, language=language, **data_options(args))
    examples = [e for e in examples if not plan["dialects"] or e.dialect in plan["dialects"]][:args.fit_samples]
    if not examples:
        raise SystemExit(f"error: --fit-data {args.fit_data}: no usable {args.fit_split} examples"
                         + (f" of {sorted(plan['dialects'])}" if plan["dialects"] else "") + f" to fit {name} on")
    tokenizer = tokenizer_for(model, language)
    collator = Collator(tokenizer, n_mels=model.dims.n_mels, audio_ctx=plan["audio_ctx"])
    weights, tried = fit_mix(model, terms, SpeechDataset(examples, n_mels=model.dims.n_mels), collator, tokenizer,
                             language=language, device=device, batch_size=args.batch_size)
    print(f"fitted {name} on {len(examples)} clips of {args.fit_data}: {len(tried)} weightings tried, best CER "
          f"{min(c for _, c in tried):.3f}")
    return weights


def models_to_decode(model, systems: dict, checkpoints: dict, audio_ctx, device):
    """(model, {system: activate}) pairs: the base with its adapters, then each checkpoint, loaded in its turn."""
    if systems:
        yield model, systems
    for system, spec in checkpoints.items():
        other = load_model(spec, device)
        if audio_ctx != "full":
            enable_dynamic_audio_ctx(other)
        print(f"checkpoint {system}: {spec} ({fingerprint(other)})")
        yield other, {system: lambda d: None}


def decode_all(model, systems, checkpoints, data, args, audio_ctx, device, decode_s=None):
    """The one decode loop: every system on every test set. Returns the per-utterance records, the NPRR records
    (with --robustness) and, per source, the clips that failed to load (by reason); `decode_s`, when given,
    gets each system's decoding seconds."""
    records, robust, failures = [], [], {}
    for m, group in models_to_decode(model, systems, checkpoints, audio_ctx, device):
        for name, language, examples in data:
            # per model, since a checkpoint may have other n_mels
            tokenizer = tokenizer_for(m, language)
            dataset = SpeechDataset(examples, n_mels=m.dims.n_mels)
            collator = Collator(tokenizer, n_mels=m.dims.n_mels, audio_ctx=audio_ctx)
            _, recs = evaluate_systems(m, dataset, collator, tokenizer, group, language=language,
                                       batch_size=args.batch_size, beam_size=args.beam_size, device=device,
                                       timings=decode_s, precision=args.precision)
            records += [dict(r, data=name) for r in recs]
            failures.setdefault(name, dict(dataset.failures))
            if args.robustness:
                robust += [dict(r, data=name) for r in nprr_records(m, dataset, collator, tokenizer, language, group,
                                                                    args, device)]
            set_active_adapter(m, None)
    return records, robust, failures


def nprr_records(model, dataset, collator, tokenizer, language, systems, args, device) -> list[dict]:
    """NPRR records (research/robustness.py) of every system: each batch decoded in that system's state."""
    max_tokens = token_limit(dataset, tokenizer)
    out = []
    for system, activate in systems.items():
        if isinstance(activate, Routed):
            print(f"note: --robustness leaves out {system} (it routes per utterance)")
            continue

        def activated():
            for dialect, batch in eval_batches(dataset, collator, args.batch_size):
                activate(dialect)
                yield dialect, batch.to(device)
        with torch.no_grad():
            recs = robustness.measure(model, activated(), tokenizer, language=language, nbest=args.nbest,
                                      beam_size=max(args.nbest, args.beam_size), max_tokens=max_tokens)
        out += [dict(r, system=system) for r in recs]
    return out


def tabulate(records, robust, data, systems, terms) -> dict:
    """{system: {row: metrics, "_macro", "_micro", ...}}: a row per (source, dialect); with one source, per dialect."""
    multi = len(data) > 1
    row = lambda r: dict(r, dialect=f"{r['data']}/{r['dialect']}" if multi else r["dialect"])  # noqa: E731
    expected = sorted({f"{n}/{e.dialect}" if multi else e.dialect for n, _, examples in data for e in examples})
    results = {}
    for system in systems:
        rows = [row(r) for r in records if r["system"] == system]
        results[system] = summarize(rows)
        # a dialect whose every clip failed to load still gets its row (n 0, rates n/a), and the macro
        # average says which rows it could not include instead of quietly averaging fewer dialects
        missing = [k for k in expected if k not in results[system]]
        for k in missing:
            results[system][k] = {"n": 0, "cer": None, "wer": None, "ser": None, "looped": 0,
                                  "note": "every clip failed to load"}
        results[system]["_macro"]["missing"] = missing
        if multi:
            results[system]["_sources"] = {name: {k: v for k, v in summarize([r for r in rows if r["data"] == name]).items()
                                                  if k in ("_macro", "_micro")} for name, _, _ in data}
        nprr = [row(r) for r in robust if r["system"] == system]
        if nprr:
            results[system]["_robustness"] = robustness.summarize(nprr)
    for system, recall in (term_recall(records, terms).items() if terms else ()):
        results[system]["_terms"] = recall
    return results


def summarize_skipped(skipped: dict) -> dict:
    """Totals and a one-line summary per source of the clips skipped (bad rows, and clips that failed to load)."""
    for name, s in skipped.items():
        s["total"] = sum(s["rows"].values()) + sum(s["at_load"].values())
        s["summary"] = ", ".join(f"{n} {reason}" for reason, n in (Counter(s["rows"]) + Counter(s["at_load"])).most_common())
        if s["total"]:
            named = "; ".join(x for xs in s["examples"].values() for x in xs)
            print(f"{name}: skipped {s['total']} clips ({s['summary']})" + (f", e.g. {named}" if named else ""))
    return skipped


def write_all(out, results, records, robust, meta) -> None:
    write_results(out, results, records, meta)
    write_chart(out, results)
    print(format_table(results))
    if "_dialect_id" in results:
        print("\n" + format_dialect_id(results["_dialect_id"]))
    if meta.get("decode_s"):
        print("decoding time: " + ", ".join(f"{k} {v:.1f} s" for k, v in meta["decode_s"].items()))
    terms = format_terms(results)
    if terms:
        print("\n" + terms)
    if robust:
        with open(os.path.join(out, "robustness.jsonl"), "w") as f:
            for r in robust:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        table = robustness.format_robustness(results)
        print("\n" + table)
        with open(os.path.join(out, "results.md"), "a") as f:
            f.write("\n" + table + "\n")
    print(f"wrote {out}/results.json, results.md, results.csv, results_cer.png, utterances.jsonl")


if __name__ == "__main__":
    main()
