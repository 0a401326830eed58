"""The dialect study's report: the research's tables beside ours, forgetting, ranks, resources, findings, plots.

Every number is a cell: read from a results.json (file, system, dialect, metric, all named in report.json),
taken from the research notes (the recipe's "research" section), or the difference of two other cells.
The findings are worked out from those cells: each says whether the research's claim held here, and by how much.
"""
import json
import os
import shutil
import statistics
import time

REPORT_DIR = "report"


class _Results:
    """results.json files of a study directory, copied under report/runs/ as they are read."""

    def __init__(self, out: str, report_dir: str):
        self.out, self.report_dir, self.cache = out, report_dir, {}

    def load(self, run: str) -> dict:
        if run not in self.cache:
            src = os.path.join(self.out, run)
            dst = os.path.join(self.report_dir, "runs", run)
            os.makedirs(dst, exist_ok=True)
            for name in ("results.json", "results.md", "config.json", "study_step.json"):
                if os.path.isfile(os.path.join(src, name)):
                    shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
            with open(os.path.join(src, "results.json"), encoding="utf-8") as f:
                self.cache[run] = json.load(f)
        return self.cache[run]

    def cell(self, run: str, system: str, dialect: str, metric: str = "cer") -> dict:
        value = self.load(run).get(system, {}).get(dialect, {}).get(metric)
        return {"value": value, "file": f"runs/{run}/results.json", "system": system, "dialect": dialect,
                "metric": metric}

    def meta(self, run: str, key: str) -> dict:
        return {"value": self.load(run)["_meta"].get(key), "file": f"runs/{run}/results.json", "meta": key}


def minus(a: dict, b: dict) -> dict:
    value = None if a["value"] is None or b["value"] is None else a["value"] - b["value"]
    return {"value": value, "minus": [a, b]}


def mean(cells: list[dict]) -> dict:
    values = [c["value"] for c in cells]
    return {"value": None if None in values or not values else statistics.fmean(values), "mean": cells}


def _fmt(cell, signed=False) -> str:
    if isinstance(cell, str):
        return cell
    v = cell["value"]
    if v is None:
        return "n/a"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return f"{v:+.3f}" if signed or "minus" in cell else f"{v:.3f}"


# --- building ---------------------------------------------------------------------------------------

def _systems(study):
    """{system name: (run dir, system key in its results.json)}"""
    systems = {"base": ("eval_base", "base")}
    systems.update({arm: (arm, "trained") for arm in study["arms"]})
    if study.get("routed"):
        systems["routed"] = ("eval_routed", "routed")
    return systems


def build(study: dict, out: str, steps: dict, command: list[str], study_wall_s: float, code: str = "unknown") -> dict:
    """The report's content; `code` is the checkout's version the report was built with (study.code_version)."""
    report_dir = os.path.join(out, REPORT_DIR)
    if os.path.isdir(report_dir):
        shutil.rmtree(report_dir)  # rebuilt from the run directories, never edited in place
    res = _Results(out, report_dir)
    systems = _systems(study)
    dialects, target = study["dialects"], study["target"]
    others = [d for d in dialects if d != target]

    def cer(system, dialect, metric="cer"):
        run, key = systems[system]
        return res.cell(run, key, dialect, metric)

    def init_of(arm):  # the system an arm started from
        return study["arms"][arm]["from"] or "base"

    tables = []
    wer_known = any(cer("base", d, "wer")["value"] is not None for d in dialects)
    for i, t in enumerate((study.get("research") or {}).get("tables", [])):
        a, b = t["columns"]
        if a not in systems or b not in systems:
            continue
        header = ["dialect", f"paper {a}", f"paper {b}", f"ours {a}", f"ours {b}", "ours change"]
        rows = []
        for d in dialects:
            paper = [{"value": t["cer"][s].get(d), "research": f"table {i + 1}, CER"} for s in (a, b)]
            rows.append([d, *paper, cer(a, d), cer(b, d), minus(cer(b, d), cer(a, d))])
        rows.append(["macro", mean(rows_col(rows, 1)), mean(rows_col(rows, 2)), cer(a, "_macro"), cer(b, "_macro"),
                     minus(cer(b, "_macro"), cer(a, "_macro"))])
        tables.append({"title": f"{t['title']} (CER)", "header": header, "rows": rows})
        if wer_known:
            rows = [[d, *[{"value": t["wer"][s].get(d), "research": f"table {i + 1}, WER"} for s in (a, b)],
                     cer(a, d, "wer"), cer(b, d, "wer"), minus(cer(b, d, "wer"), cer(a, d, "wer"))] for d in dialects]
            tables.append({"title": f"{t['title']} (WER)", "header": header, "rows": rows})

    routed = study.get("routed")
    if routed:
        adapters = routed["adapters"]
        header = ["dialect", "base", routed["base"], *adapters.values(), "routed", f"routed - {routed['base']}"]
        rows = [[d, cer("base", d), cer(routed["base"], d), *[cer(a, d) for a in adapters.values()], cer("routed", d),
                 minus(cer("routed", d), cer(routed["base"], d))] for d in dialects]
        tables.append({"title": "Routed per-dialect adapters on the mixed model (CER; each adapter scored on every "
                                "dialect, routed = each clip decoded with its own dialect's adapter)",
                       "header": header, "rows": rows})

    single_dialect = [a for a, arm in study["arms"].items() if arm["flags"]["dialect"] in dialects]
    header = ["arm", "from", "trained on", "change on it", *[f"change {d}" for d in dialects], "mean change, others"]
    rows = []
    for arm in single_dialect:
        d0, init = study["arms"][arm]["flags"]["dialect"], init_of(arm)
        deltas = {d: minus(cer(arm, d), cer(init, d)) for d in dialects}
        rows.append([arm, init, d0, deltas[d0], *deltas.values(), mean([deltas[d] for d in dialects if d != d0])])
    if routed:
        deltas = [minus(cer("routed", d), cer(routed["base"], d)) for d in dialects]
        rows.append(["routed", routed["base"], "each its own", "", *deltas, ""])
    tables.append({"title": "Forgetting: change in CER against the model each arm started from (negative = better)",
                   "header": header, "rows": rows})

    from_base = [a for a in single_dialect if study["arms"][a]["from"] is None
                 and study["arms"][a]["flags"]["dialect"] == target]
    header = ["arm", "mode", "r", "SpecAugment", "trainable params", f"CER {target}", "CER others (mean)",
              "train s", "peak MB"]
    rows = [["base", "-", "-", "-", "", cer("base", target), mean([cer("base", d) for d in others]), "", ""]]
    for a in from_base:
        f = study["arms"][a]["flags"]
        rows.append([a, f["mode"], str(f.get("lora_r", "-")) if f["mode"] == "lora" else "-",
                     str(f.get("specaugment", "none")), res.meta(a, "trainable_params"), cer(a, target),
                     mean([cer(a, d) for d in others]), res.meta(a, "train_s"), res.meta(a, "peak_memory_mb")])
    tables.append({"title": f"LoRA rank, full fine-tuning and SpecAugment, all trained on {target} from the base "
                            "(research 001)", "header": header, "rows": rows})

    header = ["arm", "from", "mode", "dialect", "steps", "trainable params", "wall s (process)", "peak MB",
              "run directory"]
    rows = []
    for a, arm in study["arms"].items():
        f = arm["flags"]
        rows.append([a, init_of(a), f["mode"], f["dialect"], res.meta(a, "steps"), res.meta(a, "trainable_params"),
                     {"value": steps[a]["wall_s"], "file": f"runs/{a}/study_step.json", "key": "wall_s"},
                     res.meta(a, "peak_memory_mb"), f"runs/{a}/"])
    tables.append({"title": "Arms: what each trained and what it cost (peak MB: "
                            f"{res.load(next(iter(study['arms'])))['_meta'].get('peak_memory_kind', 'n/a')})",
                   "header": header, "rows": rows})

    wer_note = res.load("eval_base").get("base", {}).get("_macro", {}).get("wer_note") or \
        next((r.get("wer_note") for r in res.load("eval_base").get("base", {}).values()
              if isinstance(r, dict) and r.get("wer_note")), None)
    return {"command": " ".join(command), "scale": study["scale"], "scale_config": study["scale_config"],
            "target": target, "dialects": dialects, "date": time.strftime("%Y-%m-%d %H:%M"),
            "study_wall_s": round(study_wall_s, 1), "steps_wall_s": round(sum(s["wall_s"] for s in steps.values()), 1),
            "code": code,
            "step_code": {name: s.get("code", "unknown") for name, s in steps.items()}, "research_source": (study.get("research") or {}).get("source"),
            "wer_note": wer_note, "tables": tables,
            "findings": findings(study, cer, init_of), "report_dir": report_dir}


def rows_col(rows, j):
    return [r[j] for r in rows]


def findings(study, cer, init_of) -> list[dict]:
    """The research's qualitative claims, each worked out from cells (skipped when its arms are not in the study)."""
    dialects, target = study["dialects"], study["target"]
    others = [d for d in dialects if d != target]
    arms = study["arms"]
    lora_target = next((a for a, arm in arms.items() if arm["from"] and arm["flags"]["mode"] == "lora"
                        and arm["flags"]["dialect"] == target), None)
    out = []

    def claim(text, needs, test):
        if all(n in arms or n in ("base", "routed") for n in needs) and None not in needs:
            cells, held = test()
            if any(c["value"] is None for c in cells):
                out.append({"claim": text, "held": None, "cells": cells, "evidence": "a number is missing"})
            else:
                out.append({"claim": text, "held": bool(held(*[c["value"] for c in cells])), "cells": cells,
                            "evidence": ", ".join(_fmt(c) for c in cells)})

    def other_mean(system):
        return mean([cer(system, d) for d in others])

    def delta_others(arm):
        return mean([minus(cer(arm, d), cer(init_of(arm), d)) for d in others])

    for arm in [a for a in ("single", "mixed_then_full", lora_target) if a]:
        claim(f"{arm}: the target dialect ({target}) improves (CER change against {init_of(arm) if arm in arms else '?'})",
              [arm], lambda arm=arm: ([minus(cer(arm, target), cer(init_of(arm), target))], lambda d: d < 0))
    claim(f"mixed vs single: single is better on {target}, mixed on the others (CER {target}: mixed, single; "
          "others mean: mixed, single)", ["mixed", "single"],
          lambda: ([cer("mixed", target), cer("single", target), other_mean("mixed"), other_mean("single")],
                   lambda mt, st, mo, so: st < mt and mo < so))
    claim("full single-dialect fine-tuning of the mixed model degrades the other dialects (mean CER change, others)",
          ["mixed_then_full"], lambda: ([delta_others("mixed_then_full")], lambda d: d > 0))
    claim("LoRA degrades the other dialects less than full fine-tuning (mean CER change, others: LoRA, full)",
          [lora_target, "mixed_then_full"],
          lambda: ([delta_others(lora_target), delta_others("mixed_then_full")], lambda lo, fu: lo < fu))
    claim("balanced fine-tuning of the single model recovers the other dialects (others mean CER: single, then "
          "balanced)", ["single", "single_then_balanced"],
          lambda: ([other_mean("single"), other_mean("single_then_balanced")], lambda s, b: b < s))
    if study.get("routed"):
        base = study["routed"]["base"]
        claim(f"routing per-dialect adapters loses nothing: routed CER <= {base} CER on every dialect "
              f"(changes: {', '.join(dialects)})", [base, "routed"],
              lambda: ([minus(cer("routed", d), cer(base, d)) for d in dialects],
                       lambda *ds: all(x <= 0 for x in ds)))
    sweep = sorted([a for a, arm in arms.items() if arm["from"] is None and arm["flags"]["mode"] == "lora"
                    and arm["flags"]["dialect"] == target and arm["flags"].get("specaugment", "none") == "none"],
                   key=lambda a: arms[a]["flags"].get("lora_r", 0))
    if sweep and "single" in arms:
        claim(f"full fine-tuning beats every LoRA rank on {target} (CER: full, then {', '.join(sweep)})",
              ["single", *sweep], lambda: ([cer("single", target), *[cer(a, target) for a in sweep]],
                                           lambda full, *lo: all(full < x for x in lo)))
    if len(sweep) > 1:
        claim(f"a higher LoRA rank gives a lower CER on {target} ({', '.join(sweep)})", sweep,
              lambda: ([cer(a, target) for a in sweep], lambda *xs: all(b <= a for a, b in zip(xs, xs[1:]))))
    augmented = [a for a, arm in arms.items() if arm["flags"].get("specaugment", "none") != "none"]
    for a in augmented:
        twin = next((b for b in sweep if {k: v for k, v in arms[b]["flags"].items() if k != "specaugment"}
                     == {k: v for k, v in arms[a]["flags"].items() if k != "specaugment"}), None)
        if twin:
            claim(f"SpecAugment lowers CER on {target} (CER without: {twin}, with: {a})", [twin, a],
                  lambda a=a, twin=twin: ([cer(twin, target), cer(a, target)], lambda off, on: on < off))
    return out


# --- writing ----------------------------------------------------------------------------------------

def write(report: dict, out: str) -> str:
    report_dir = report["report_dir"]
    os.makedirs(report_dir, exist_ok=True)
    plots = _plots(report, report_dir)
    with open(os.path.join(report_dir, "report.json"), "w", encoding="utf-8") as f:
        json.dump({**report, "plots": plots}, f, indent=1, ensure_ascii=False)
    with open(os.path.join(report_dir, "report.md"), "w", encoding="utf-8") as f:
        f.write(to_markdown(report, plots))
    return report_dir


def to_markdown(report: dict, plots: list[str]) -> str:
    lines = [f"# Dialect study, scale `{report['scale']}`", "",
             f"Command: `{report['command']}`  ", f"Date: {report['date']}. Wall time: {report['steps_wall_s']:.0f} s for all steps when they ran; "
             f"{report['study_wall_s']:.0f} s for this command (steps it reused count 0).  ",
             f"Model `{report['scale_config'].get('model')}`, data `{report['scale_config'].get('data')}`, "
             f"target dialect `{report['target']}`.  ",
             f"Code: {report['code']} for this report; the steps ran at "
             + "; ".join(f"{code} ({', '.join(k for k, v in report['step_code'].items() if v == code)})"
                         for code in dict.fromkeys(report["step_code"].values())) + ".  ",
             "Every number below is in `report.json` with the file, system, dialect and metric it comes from "
             "(`runs/<arm>/` holds each run's config.json and results.json); \"paper\" columns are "
             f"{report['research_source'] or 'the research notes'}.", ""]
    if report.get("wer_note"):
        lines += [f"WER: {report['wer_note']}", ""]
    lines += ["## Findings", ""]
    for fd in report["findings"]:
        verdict = {True: "held", False: "did not hold", None: "not measured"}[fd["held"]]
        lines.append(f"- **{verdict}**: {fd['claim']}: {fd['evidence']}")
    for t in report["tables"]:
        lines += ["", f"## {t['title']}", "", "| " + " | ".join(t["header"]) + " |",
                  "|" + "---|" * len(t["header"])]
        lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in t["rows"]]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def _plots(report: dict, report_dir: str) -> list[str]:
    """forgetting.png and cer_by_system.png, drawn from the cells of the tables above, nothing new."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dialects, written = report["dialects"], []
    forgetting = next((t for t in report["tables"] if t["title"].startswith("Forgetting")), None)
    if forgetting and forgetting["rows"]:
        cols = {d: forgetting["header"].index(f"change {d}") for d in dialects}
        values = {(row[0], d): row[cols[d]]["value"] for row in forgetting["rows"] for d in dialects}
        _bars(plt, os.path.join(report_dir, "forgetting.png"), [r[0] for r in forgetting["rows"]], dialects, values,
              "CER change (negative = better)", "Change in CER against the model each arm started from")
        written.append("forgetting.png")
    cer = {}
    for t in report["tables"]:
        for c in (c for row in t["rows"] for c in row):
            if isinstance(c, dict) and c.get("metric") == "cer" and c.get("dialect") in dialects:
                system = c["file"].split("/")[1] if c["system"] == "trained" else c["system"]
                cer[(system, c["dialect"])] = c["value"]
    if cer:
        systems = sorted({s for s, _ in cer}, key=lambda s: (s != "base", s))
        _bars(plt, os.path.join(report_dir, "cer_by_system.png"), systems, dialects, cer, "CER",
              "CER per dialect and system")
        written.append("cer_by_system.png")
    return written


def _bars(plt, path, groups, series, values, ylabel, title):
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(groups) + 2), 3.8))
    width = 0.8 / len(series)
    for k, s in enumerate(series):
        ys = [values.get((g, s)) or 0.0 for g in groups]  # a missing number is drawn as 0 and is n/a in the tables
        ax.bar([i + (k - (len(series) - 1) / 2) * width for i in range(len(groups))], ys, width, label=s)
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_xticks(range(len(groups)), groups, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
