"""Decode a test set under several systems and score it per dialect: the code train.py and evaluate.py share.

A *system* is a name plus a function `activate(dialect)` that puts the model in that system's state
before a batch of that dialect is decoded (the base: no adapter; an adapter: that one; `routed`: the
adapter of the batch's own dialect). Batches are built per dialect, so routing is exact, and each batch
is loaded once and decoded under every system.
"""
import csv
import json
import os
import unicodedata
from collections import defaultdict

import torch

from whisper_ft import metrics
from whisper_ft.decoding import decode
from whisper_ft.text import target_tokens

MAX_TOKENS = 224  # whisper's own sample_len for a 30 s window


def eval_batches(dataset, collator, batch_size: int):
    """Yield (dialect, Batch) over `dataset`, batches never mixing dialects; unreadable clips are dropped."""
    by_dialect = defaultdict(list)
    for i, ex in enumerate(dataset.examples):
        by_dialect[ex.dialect].append(i)
    for dialect in sorted(by_dialect):
        idx = by_dialect[dialect]
        for start in range(0, len(idx), batch_size):
            batch = collator([dataset[i] for i in idx[start:start + batch_size]])
            if batch is not None:
                yield dialect, batch


def token_limit(dataset, tokenizer) -> int:
    """A decoding limit from the test set as a whole (2x its longest reference + 10, at most 224).

    Set per test set, never per utterance, so no reference length leaks into a hypothesis; it only stops
    looping hypotheses of an untrained model from costing 224 steps each on a CPU.
    """
    from whisper_ft.text import normalize_text

    longest = max((len(target_tokens(tokenizer, normalize_text(e.text, e.language))[1])
                   for e in dataset.examples), default=MAX_TOKENS)
    return min(MAX_TOKENS, 2 * longest + 10)


@torch.no_grad()
def evaluate_systems(model, dataset, collator, tokenizer, systems: dict, *, language: str, batch_size: int = 16,
                     beam_size: int = 1, max_tokens: int | None = None, device="cpu", n_examples: int = 3):
    """Return ({system: {dialect: metrics, "_macro": ..., "_micro": ...}}, per-utterance records).

    Puts `model` in eval mode (no dropout while decoding); a caller that trains afterwards calls .train()."""
    model.eval()
    max_tokens = max_tokens or token_limit(dataset, tokenizer)
    records = []
    for dialect, batch in eval_batches(dataset, collator, batch_size):
        mel = batch.mel.to(device)
        for system, activate in systems.items():
            activate(dialect)
            hyps = decode(model, mel, tokenizer, beam_size=beam_size, max_tokens=max_tokens)
            for i, best in enumerate(h[0] for h in hyps):
                records.append({"system": system, "dialect": dialect, "id": batch.ids[i], "ref": batch.texts[i],
                                "hyp": best.text, "looped": best.looped})
    results = {}
    for system in systems:
        rows = [r for r in records if r["system"] == system]
        # scored as one corpus so the word segmenter (botok for Tibetan) is set up once per system
        scored = metrics.score_corpus([r["ref"] for r in rows], [r["hyp"] for r in rows], language)
        for r, u in zip(rows, scored["utterances"]):
            r.update({k: v for k, v in u.items() if k not in r})
        results[system] = summarize(rows)
        results[system]["_examples"] = "\n\n".join(f"ref: {r['ref']}  \nhyp: {r['hyp']}" for r in rows[:n_examples])
    return results, records


def summarize(records, by: str = "dialect") -> dict:
    """`metrics.aggregate` of scored records, plus `looped`: hypotheses stopped as hallucination loops."""
    records = list(records)
    out = metrics.aggregate(records, by=by)
    for key, m in out.items():
        rows = records if key in ("_micro", "_macro") else [r for r in records if r[by] == key]
        m["looped"] = sum(bool(r.get("looped")) for r in rows)
    return out


# --- tables ----------------------------------------------------------------------------------------

def _rows(result: dict) -> list[str]:
    return sorted(k for k in result if not k.startswith("_"))


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def format_table(results: dict, base: str | None = "base") -> str:
    """Rows = dialects (+ macro average), columns = systems' CER and WER, with CER deltas against `base`."""
    systems = [s for s in results if not s.startswith("_")]
    base = base if base in systems else None
    dialects = sorted({d for s in systems for d in _rows(results[s])})
    head = ["Dialect"]
    for s in systems:
        head += [f"{s} CER", f"{s} WER"] + ([f"{s} ΔCER"] if base and s != base else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    sources = sorted({src for s in systems for src in results[s].get("_sources", {})})
    missing = sorted({d for s in systems for d in results[s].get("_macro", {}).get("missing") or []})
    for d in dialects + [f"_sources/{src}" for src in sources] + ["_macro"]:
        cells = ["macro avg" + ("*" if missing else "") if d == "_macro"
                 else f"{d.split('/', 1)[1]} macro avg" if d.startswith("_sources/") else d]
        for s in systems:
            m = _cell(results[s], d)
            cells += [_fmt(m.get("cer")), _fmt(m.get("wer"))]
            if base and s != base:
                b = _cell(results[base], d)
                delta = None if m.get("cer") is None or b.get("cer") is None else m["cer"] - b["cer"]
                cells.append("n/a" if delta is None else f"{delta:+.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    notes = {results[s][d].get("wer_note") for s in systems for d in _rows(results[s]) if results[s][d].get("wer_note")}
    if missing:
        lines.append(f"\n* mean of the rows with scored clips; no clip of {', '.join(missing)} could be loaded")
    return "\n".join(lines + [f"\nWER {n}" for n in sorted(notes)])


def _cell(result: dict, key: str) -> dict:
    if key.startswith("_sources/"):
        return result.get("_sources", {}).get(key.split("/", 1)[1], {}).get("_macro", {})
    return result.get(key, {})


def format_terms(results: dict) -> str:
    """Rows = terms (+ all terms pooled), columns = systems' recall (hits / references containing the term)."""
    systems = [s for s in results if not s.startswith("_") and "_terms" in results[s]]
    if not systems:
        return ""
    terms = list(results[systems[0]]["_terms"])
    lines = ["| Term | n | " + " | ".join(f"{s} recall" for s in systems) + " |", "|" + "---|" * (len(systems) + 2)]
    for t in terms:
        label = "all terms" if t == "_all" else t
        n = results[systems[0]]["_terms"][t]["n"]
        lines.append(f"| {label} | {n} | " + " | ".join(_fmt(results[s]["_terms"][t]["recall"]) for s in systems) + " |")
    return "\n".join(lines)


def write_results(out_dir, results: dict, records=None, meta: dict | None = None) -> None:
    """results.json / results.md / results.csv (+ utterances.jsonl) under out_dir, all from the same dict."""
    os.makedirs(out_dir, exist_ok=True)
    clean = {s: {k: v for k, v in r.items() if k != "_examples"} for s, r in results.items()}
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump({**clean, "_meta": meta or {}}, f, indent=2, ensure_ascii=False)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(format_table(results) + "\n")
        terms = format_terms(results)
        if terms:
            f.write("\nTerm recall\n\n" + terms + "\n")
        for source, skipped in sorted(((meta or {}).get("skipped") or {}).items()):
            if skipped.get("total"):
                f.write(f"\nSkipped clips in {source}: {skipped['total']} ({skipped['summary']})\n")
    with open(os.path.join(out_dir, "results.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["system", "dialect", "cer", "wer", "ser", "n", "looped"])
        for s, r in clean.items():
            for d in _rows(r) + ["_macro", "_micro"]:
                m = r.get(d, {})
                w.writerow([s, d, m.get("cer"), m.get("wer"), m.get("ser"), m.get("n"), m.get("looped")])
    if records is not None:
        with open(os.path.join(out_dir, "utterances.jsonl"), "w") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")


def _fold(text: str) -> str:
    return unicodedata.normalize("NFC", text or "").casefold()


def term_recall(records, terms) -> dict:
    """{system: {term: {"recall", "n"}, "_all": ...}}: of the references containing a term, how many hypotheses do.

    A term is found by substring match after NFC and case folding (so "CPF" matches "cpf"); n counts the
    references that contain it, and recall is None for a term no reference contains.
    """
    out = {}
    for system in sorted({r["system"] for r in records}):
        rows = [r for r in records if r["system"] == system]
        per, hits_all, n_all = {}, 0, 0
        for term in terms:
            t = _fold(term)
            having = [r for r in rows if t in _fold(r["ref"])]
            hits = sum(t in _fold(r["hyp"]) for r in having)
            per[term] = {"recall": hits / len(having) if having else None, "n": len(having)}
            hits_all, n_all = hits_all + hits, n_all + len(having)
        per["_all"] = {"recall": hits_all / n_all if n_all else None, "n": n_all}
        out[system] = per
    return out


def write_chart(out_dir, results: dict, metric: str = "cer") -> str:
    """results_cer.png: one group of bars per dialect, one bar per system."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = [s for s in results if not s.startswith("_")]
    dialects = sorted({d for s in systems for d in _rows(results[s])})
    width = 0.8 / max(1, len(systems))
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(dialects) + 1), 3.6))
    for i, s in enumerate(systems):
        values = [results[s].get(d, {}).get(metric) or 0 for d in dialects]
        ax.bar([x + i * width for x in range(len(dialects))], values, width, label=s)
    ax.set_xticks([x + width * (len(systems) - 1) / 2 for x in range(len(dialects))], dialects)
    ax.set_ylabel(metric.upper())
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(out_dir, f"results_{metric}.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
