"""Decode a test set under several systems and score it per dialect: the code train.py and evaluate.py share.

A *system* is a name plus a function `activate(dialect)` that puts the model in that system's state
before a batch of that dialect is decoded (the base: no adapter; an adapter: that one; `routed`: the
adapter of the batch's own dialect). Batches are built per dialect, so routing is exact, and each batch
is loaded once and decoded under every system. A `Routed` system picks its state per utterance instead
(`routed-auto`: by each clip's predicted dialect).
"""
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable

import torch

from scoring import metrics
from whisper_ft.decoding import decode
from whisper_ft.dialect_id import predict_dialect
from whisper_ft.text import normalize_text, prefix_tokens

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
    looping hypotheses of an untrained model from costing 224 steps each on a CPU. Counted in whisper's own BPE
    (`tokenizer.encoding`) even for a tokenizer with added tokens: a system without their rows spells the text so.
    """
    longest = max((len(prefix_tokens(tokenizer)) + len(tokenizer.encoding.encode(normalize_text(e.text, e.language)))
                   for e in dataset.examples), default=MAX_TOKENS)
    return min(MAX_TOKENS, 2 * longest + 10)


@torch.no_grad()
def evaluate_systems(model, dataset, collator, tokenizer, systems: dict, *, language: str, batch_size: int = 16,
                     beam_size: int = 1, max_tokens: int | None = None, device="cpu", n_examples: int = 3,
                     timings: dict | None = None, precision: str = "fp32"):
    """Return ({system: {dialect: metrics, "_macro": ..., "_micro": ..., "_examples": example_pairs(...)}},
    per-utterance records); n_examples: clips per dialect in "_examples".

    A system is `activate(dialect)` or a `Routed`. `timings`, when given, gets each system's decoding seconds
    added (a Routed system's choosing included). `precision`: decode()'s ("bf16": encoder under bf16 autocast).
    Puts `model` in eval mode (no dropout while decoding); a caller
    that trains afterwards calls .train()."""
    model.eval()
    max_tokens = max_tokens or token_limit(dataset, tokenizer)
    records = []
    for dialect, batch in eval_batches(dataset, collator, batch_size):
        mel = batch.mel.to(device)
        for system, activate in systems.items():
            start = time.perf_counter()
            for rows, fields in _parts(activate, dialect, batch, mel):
                hyps = decode(model, mel if len(rows) == len(batch) else mel[rows], tokenizer, beam_size=beam_size,
                              max_tokens=max_tokens, precision=precision)
                for i, best in zip(rows, (h[0] for h in hyps)):
                    records.append({"system": system, "dialect": dialect, "id": batch.ids[i], "ref": batch.texts[i],
                                    "hyp": best.text, "looped": best.looped, **fields.get(i, {})})
            if timings is not None:
                timings[system] = timings.get(system, 0.0) + time.perf_counter() - start
    results = {}
    for system in systems:
        rows = [r for r in records if r["system"] == system]
        # scored as one corpus so the word segmenter (botok for Tibetan) is set up once per system
        scored = metrics.score_corpus([r["ref"] for r in rows], [r["hyp"] for r in rows], language)
        for r, u in zip(rows, scored["utterances"]):
            r.update({k: v for k, v in u.items() if k not in r})
        results[system] = summarize(rows)
        results[system]["_examples"] = example_pairs(rows, n_examples)
    return results, records


def example_pairs(records, n: int) -> dict:
    """{dialect: markdown table of clip id, reference and hypothesis} for the first n clips of each dialect.

    First in the test set's order, which a run never changes: every evaluation shows the same utterances, so
    a reader of TensorBoard sees how their transcripts change as the model trains."""
    tables = {}
    for r in records:
        lines = tables.setdefault(r["dialect"], ["| clip | reference | hypothesis |", "|---|---|---|"])
        if len(lines) < n + 2:
            lines.append(f"| {_cell(r['id'])} | {_cell(r['ref'])} | {_cell(r['hyp'])} |")
    return {dialect: "\n".join(lines) for dialect, lines in tables.items()}


def _cell(text) -> str:
    """Text as one markdown table cell (a looping hypothesis may hold anything)."""
    return str(text).replace("|", "\\|").replace("\n", " ")


@dataclass
class Routed:
    """A system that picks its state per utterance: `choose(batch, mel)` returns, per clip, (state name, fields
    for its record); `states[name]()` puts the model in that state. Clips that chose the same state decode
    together: the whole batch when they all agree, so a choice that is always the clip's dialect decodes
    exactly as `routed` does."""
    choose: Callable
    states: dict


def _parts(activate, dialect, batch, mel):
    """Yield (rows, {row: record fields}), the model put in the state those rows of the batch decode in."""
    if not isinstance(activate, Routed):
        activate(dialect)
        yield list(range(len(batch))), {}
        return
    choices = activate.choose(batch, mel)
    for state in dict.fromkeys(c for c, _ in choices):  # in order of first appearance
        activate.states[state]()
        rows = [i for i, (c, _) in enumerate(choices) if c == state]
        yield rows, {i: choices[i][1] for i in rows}


@torch.no_grad()
def identify(model, head, dataset, collator, batch_size: int = 16, device="cpu") -> list[dict]:
    """Each clip's dialect as `head` predicts it: [{id, dialect (the true one), predicted, prob}].
    `model` is the base the head was trained on, with no adapter active."""
    model.eval()
    head.eval()
    out = []
    for dialect, batch in eval_batches(dataset, collator, batch_size):
        probs = predict_dialect(model, head, batch.mel.to(device), batch.n_frames)
        for i, p in enumerate(probs):
            k = int(p.argmax())
            out.append({"id": batch.ids[i], "dialect": dialect, "predicted": head.labels[k], "prob": float(p[k])})
    return out


def summarize(records, by: str = "dialect") -> dict:
    """`metrics.aggregate` of scored records, plus `looped`: hypotheses stopped as hallucination loops."""
    records = list(records)
    out = metrics.aggregate(records, by=by)
    for key, m in out.items():
        rows = records if key in ("_micro", "_macro") else [r for r in records if r[by] == key]
        m["looped"] = sum(bool(r.get("looped")) for r in rows)
    return out
