"""Result tables: the per-dialect CER/WER table (markdown), term recall, results.json / .md / .csv, the chart.

Every file is written from the same results dict that train.py and evaluate.py return.
"""
import csv
import json
import os


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


def format_dialect_id(summary: dict) -> str:
    """Dialect identification: accuracy, then per true dialect its recall and the confusion matrix's row."""
    columns = list(next(iter(summary["confusion"].values()), {}))
    lines = [f"Dialect ID: accuracy {_fmt(summary['accuracy'])} on {summary['n']} clips, mean recall "
             f"{_fmt(summary['macro_recall'])}" + (f"; {summary['note']}" if summary.get("note") else ""), "",
             "| Dialect | n | recall | " + " | ".join(f"→ {c}" for c in columns) + " |", "|" + "---|" * (len(columns) + 3)]
    for d, row in summary["confusion"].items():
        lines.append(f"| {d} | {sum(row.values())} | {_fmt(summary['recall'][d])} | "
                     + " | ".join(str(row[c]) for c in columns) + " |")
    return "\n".join(lines)


def write_results(out_dir, results: dict, records=None, meta: dict | None = None) -> None:
    """results.json / results.md / results.csv (+ utterances.jsonl) under out_dir, all from the same dict."""
    os.makedirs(out_dir, exist_ok=True)
    clean = {s: {k: v for k, v in r.items() if k != "_examples"} for s, r in results.items()}
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump({**clean, "_meta": meta or {}}, f, indent=2, ensure_ascii=False)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        if any(not s.startswith("_") for s in results):
            f.write(format_table(results) + "\n")
        if "_dialect_id" in results:
            f.write("\n" + format_dialect_id(results["_dialect_id"]) + "\n")
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
            for d in (_rows(r) + ["_macro", "_micro"]) if not s.startswith("_") else ():
                m = r.get(d, {})
                w.writerow([s, d, m.get("cer"), m.get("wer"), m.get("ser"), m.get("n"), m.get("looped")])
    if records is not None:
        with open(os.path.join(out_dir, "utterances.jsonl"), "w") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")



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
