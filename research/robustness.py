"""N-best Perturbation-based Rescoring Robustness (NPRR): how stable a system's own ranking of its N-best
list is when the list is perturbed in controlled ways, and how good the list is (oracle error rates).

Background: Yu et al. 2024 ("Investigating Training Strategies and Model Robustness of Low-Rank
Adaptation for Language Modeling in Speech Recognition", arXiv 2401.10447) perturb the N-best lists a
LoRA-tuned rescoring LM ranks (homophone replacements, in the 1-best only or in all N) and report the
relative degradation of rescoring. Here Whisper's decoder is the LM that ranks hypotheses, and the
perturbations are defined on text units, since no Tibetan homophone lexicon is at hand.

Definitions (one utterance; the lead's README copies this block):

- N-best list. Beam search (`decoding.decode`, beam_size B, nbest K) returns up to K hypotheses, best
  first by whisper's ranking. Hypotheses whose (stripped) text repeats an earlier one are dropped, so
  the list H = [h_1..h_n], n <= K, holds distinct texts in decode order.
- Units. Tibetan ("bo"): syllables, the maximal runs of characters that are not whitespace, tsheg
  (U+0F0B, U+0F0C), shad marks (U+0F0D-U+0F12) or U+0F14. Japanese and Chinese ("ja", "zh", "yue"):
  single non-space characters. Every other language: whitespace-separated words. A text is read as
  d_0 u_1 d_1 ... u_m d_m (delimiters d_j, possibly empty, around units u_j); perturbations edit
  units only (drop also removes one delimiter, below) and rejoin the rest unchanged.
- Scores. Every hypothesis, original or perturbed, is a text t, re-tokenised as `tokenizer.encode(t)`
  (the convention of the training targets, `text.target_tokens`; the spelling of a special token,
  which decode's text keeps for tokens such as <|notimestamps|>, is encoded as that token) and scored
  by teacher forcing with `decoding.score_hypotheses` (the plain model distribution, no suppression,
  so a perturbed text that holds a symbol decode() would suppress still gets a finite score),
  end-of-text included, against the same audio features. The score is length-normalised: s(t) = log p(tokens(t), eot | prefix, audio) /
  (len(tokens(t)) + 1), the per-token mean as `Hypothesis.avg_logprob`. Why: whisper ranks its N-best by
  length-normalised log-probability, so this asks about the ranking the system actually uses; a summed
  log-prob would reward a dropped syllable for the shortening alone. (`length_norm=False` gives the sum.)
  Originals are re-tokenised too, so originals and perturbed texts are scored the same way; the
  "original ranking" is the ranking of H by s, and the "original best" b = argmax_i s(h_i) (first on
  ties), which may differ from decode's first hypothesis.
- Perturbations, each with its own seeded generator (`random.Random(f"{seed}/{utterance id}/{kind}")`,
  so results do not depend on batch composition or order). Each builds a perturbed list P whose entries
  know their source hypothesis:
  - swap: every h_i is replaced by h_i with one pair of adjacent units (u_j, u_j+1), u_j != u_j+1,
    exchanged, the pair drawn uniformly; a hypothesis with no such pair stays unchanged.
  - drop: every h_i is replaced by h_i without one unit, drawn uniformly, together with the delimiter
    after it (before it, for the last unit); a hypothesis of fewer than 2 units stays unchanged.
  - inject: P = H plus, for every h_i, a near-duplicate: h_i with one character (code point) deleted,
    drawn uniformly among the characters of units of >= 2 characters, or, when every unit is a single
    character, one unit character doubled in place; an empty text gets no near-duplicate.
  - reorder: P = H in a seeded random order other than the identity (n >= 2). Texts do not change, so
    no score may change: a sanity property of the batched rescoring (`score_drift` should be ~0).
- Per perturbation, with s' the scores of P (entries rescored as a list of their own):
  - counterpart c(i): the changed entry of P that comes from h_i, else its unchanged entry.
  - 1-best robustness `top1`: the original best is still on top of P: the entry of P that *is* h_b
    (unchanged, as in inject and reorder) or, when P no longer holds it, its counterpart, has the
    maximum score in P (ties with the maximum count as kept). Undefined (None) when P has < 2 entries.
    `rank_of_best`: that entry's 0-based rank in P (0 = kept).
  - N-best robustness `kendall_tau` (tau-b, ties handled) and `spearman` (Pearson correlation of average
    ranks) between s(h_i) and s'(c(i)) over i = 1..n: 1 = the perturbed list is ranked as the original,
    -1 = reversed. Undefined when n < 2 or either score vector is constant.
  - `prefer_original`: the fraction of hypotheses whose counterpart changed that score above it
    (s(h_i) > s'(c(i))): how often the model prefers the unperturbed text.
  - `score_drift`: max |s'(p) - s(h_source(p))| over entries p whose text is unchanged (0 up to float
    rounding; large values mean the rescoring depends on the list around a hypothesis).
  - `pick_*`: the error counts of the top entry of P against the reference: rescoring the perturbed
    list and taking its best, as the paper's rescoring error rate after perturbation.
- Error rates (`metrics.score_corpus`, the project's normalisation and units): 1-best = decode's first
  hypothesis; oracle CER = the hypothesis of H with the fewest character errors (first on ties); oracle
  WER chosen independently by word errors (None where WER is undefined, e.g. Japanese or Tibetan
  without a botok dictionary); rescored = the original best b. Corpus rates follow
  `metrics.aggregate` (Tibetan: CER micro, WER macro, as the results tables).
- Summary per dialect (`summarize`): rates as above; per perturbation the mean of `top1`,
  `kendall_tau`, `spearman`, `prefer_original` over the utterances where each is defined (`n_top1`,
  `n_tau` count them), the mean `rank_of_best`, the max `score_drift`, `pick_cer` (micro) and
  `nprr_cer` = (pick_cer - cer_rescored) / cer_rescored, the relative CER degradation of rescoring
  under that perturbation (None when cer_rescored is 0). "_micro" pools all utterances; "_macro" is
  the unweighted mean of the dialects' values (the max for score_drift).
"""
import math
import random
import re
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from scoring import metrics
from whisper_ft.decoding import Hypothesis, _prefix, audio_features_for, decode, score_hypotheses

PERTURBATIONS = ("swap", "drop", "inject", "reorder")
CHAR_LANGUAGES = {"ja", "zh", "yue"}
_TIBETAN_DELIM = "\\s\u0f0b-\u0f12\u0f14"
_UNIT = {"bo": re.compile(f"[^{_TIBETAN_DELIM}]+"), "char": re.compile(r"\S"), "word": re.compile(r"\S+")}


# --- units and perturbations of one text ------------------------------------------------------------

def split_units(text: str, language: str) -> Tuple[List[str], List[str]]:
    """(delimiters, units) with text == d_0 + u_1 + d_1 + ... + u_m + d_m, len(delimiters) == m + 1."""
    lang = metrics.language_code(language)
    pattern = _UNIT["bo" if lang == "bo" else "char" if lang in CHAR_LANGUAGES else "word"]
    delims, units, end = [], [], 0
    for m in pattern.finditer(text):
        delims.append(text[end:m.start()])
        units.append(m.group())
        end = m.end()
    delims.append(text[end:])
    return delims, units


def join_units(delims: Sequence[str], units: Sequence[str]) -> str:
    if len(delims) != len(units) + 1:
        raise ValueError(f"need one more delimiter than units, got {len(delims)} and {len(units)}")
    return "".join(d + u for d, u in zip(delims, units)) + delims[-1]


def swap_units(text: str, rng: random.Random, language: str) -> str:
    """Exchange one uniformly drawn pair of adjacent, different units; unchanged if there is none."""
    delims, units = split_units(text, language)
    pairs = [j for j in range(len(units) - 1) if units[j] != units[j + 1]]
    if not pairs:
        return text
    j = rng.choice(pairs)
    units[j], units[j + 1] = units[j + 1], units[j]
    return join_units(delims, units)


def drop_unit(text: str, rng: random.Random, language: str) -> str:
    """Remove one uniformly drawn unit and the delimiter after it (before it, for the last unit);
    unchanged for fewer than 2 units (dropping the only unit would leave no hypothesis)."""
    delims, units = split_units(text, language)
    if len(units) < 2:
        return text
    j = rng.randrange(len(units))
    del units[j]
    del delims[j + 1 if j < len(units) else j]  # delimiter after unit j is delims[j + 1]
    return join_units(delims, units)


def near_duplicate(text: str, rng: random.Random, language: str) -> str:
    """One small edit: delete one character of a unit of >= 2 characters (drawn uniformly over those
    characters), or, when every unit is a single character, double one unit character in place."""
    delims, units = split_units(text, language)
    long_chars = [(j, k) for j, u in enumerate(units) if len(u) >= 2 for k in range(len(u))]
    if long_chars:
        j, k = rng.choice(long_chars)
        units[j] = units[j][:k] + units[j][k + 1:]
    elif units:
        j = rng.randrange(len(units))
        units[j] = units[j] * 2  # single-character unit
    else:
        return text
    return join_units(delims, units)


@dataclass
class Perturbed:
    texts: List[str]  # the perturbed list P
    source: List[int]  # source[p]: index in the original list of the hypothesis entry p comes from


def perturb_list(texts: Sequence[str], kind: str, rng: random.Random, language: str) -> Perturbed:
    """The perturbed list P for one of PERTURBATIONS (see the module docstring)."""
    texts = list(texts)
    n = len(texts)
    if kind == "swap":
        return Perturbed([swap_units(t, rng, language) for t in texts], list(range(n)))
    if kind == "drop":
        return Perturbed([drop_unit(t, rng, language) for t in texts], list(range(n)))
    if kind == "inject":
        out, source = list(texts), list(range(n))
        for i, t in enumerate(texts):
            dup = near_duplicate(t, rng, language)
            if dup != t:
                out.append(dup)
                source.append(i)
        return Perturbed(out, source)
    if kind == "reorder":
        order = list(range(n))
        while n >= 2 and order == list(range(n)):
            rng.shuffle(order)
        return Perturbed([texts[i] for i in order], order)
    raise ValueError(f"unknown perturbation {kind!r}: choose from {', '.join(PERTURBATIONS)}")


# --- rank statistics and per-list metrics --------------------------------------------------------------

def kendall_tau(x: Sequence[float], y: Sequence[float]) -> Optional[float]:
    """Kendall's tau-b (ties in either vector handled); None when undefined (n < 2 or a constant vector)."""
    n = len(x)
    if n != len(y):
        raise ValueError(f"vectors of different lengths: {n} and {len(y)}")
    conc = disc = tx = ty = 0
    for i in range(n):
        for j in range(i + 1, n):
            dx, dy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
            if dx == 0 and dy == 0:
                continue
            if dx == 0:
                tx += 1
            elif dy == 0:
                ty += 1
            elif dx == dy:
                conc += 1
            else:
                disc += 1
    denom = math.sqrt((conc + disc + tx) * (conc + disc + ty))
    return None if denom == 0 else (conc - disc) / denom


def _avg_ranks(x: Sequence[float]) -> np.ndarray:
    x = np.asarray(x, dtype=float)
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and x[order[j + 1]] == x[order[i]]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> Optional[float]:
    """Spearman's rho (Pearson correlation of average ranks); None when undefined."""
    if len(x) != len(y):
        raise ValueError(f"vectors of different lengths: {len(x)} and {len(y)}")
    if len(x) < 2:
        return None
    rx, ry = _avg_ranks(x), _avg_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = math.sqrt(float((rx ** 2).sum() * (ry ** 2).sum()))
    return None if denom == 0 else float((rx * ry).sum() / denom)


def robustness_metrics(original_scores: Sequence[float], perturbed_scores: Sequence[float],
                       source: Optional[Sequence[int]] = None, changed: Optional[Sequence[bool]] = None) -> dict:
    """top1, rank_of_best, kendall_tau, spearman, prefer_original, score_drift (see the module docstring)
    for one list. source[p]: original index of entry p (default: aligned, p == i); changed[p]: whether
    entry p's text differs from its source's (default: all changed, except for a pure permutation)."""
    s = [float(v) for v in original_scores]
    sp = [float(v) for v in perturbed_scores]
    n, m = len(s), len(sp)
    source = list(range(m)) if source is None else list(source)
    if len(source) != m or any(not 0 <= i < n for i in source):
        raise ValueError(f"source must give an original index in [0, {n}) for each of the {m} perturbed entries")
    if changed is None:
        changed = [True] * m
    changed = list(changed)
    if len(changed) != m:
        raise ValueError(f"changed has {len(changed)} entries for {m} perturbed ones")
    if n == 0:
        return {"top1": None, "rank_of_best": None, "kendall_tau": None, "spearman": None,
                "prefer_original": None, "score_drift": None, "n_changed": 0, "best": None, "top": None}
    best = int(np.argmax(s))
    entries = {i: [p for p in range(m) if source[p] == i] for i in range(n)}
    missing = [i for i, ps in entries.items() if not ps]
    if missing:
        raise ValueError(f"original hypotheses {missing} have no entry in the perturbed list")
    counterpart = [next((p for p in ps if changed[p]), ps[0]) for ps in entries.values()]
    keep = next((p for p in entries[best] if not changed[p]), counterpart[best])
    top = int(np.argmax(sp))
    rank_of_best = sum(v > sp[keep] for v in sp)  # entries strictly above: ties count as kept
    c_scores = [sp[p] for p in counterpart]
    pairs = [(s[i], sp[counterpart[i]]) for i in range(n) if changed[counterpart[i]]]
    drift = [abs(sp[p] - s[source[p]]) for p in range(m) if not changed[p]]
    return {"top1": None if m < 2 else float(rank_of_best == 0),
            "rank_of_best": None if m < 2 else int(rank_of_best),
            "kendall_tau": kendall_tau(s, c_scores), "spearman": spearman(s, c_scores),
            "prefer_original": float(np.mean([a > b for a, b in pairs])) if pairs else None,
            "score_drift": max(drift) if drift else None,
            "n_changed": int(sum(changed)), "best": best, "top": top}


# --- model side -------------------------------------------------------------------------------------------

def nbest_lists(model, mel: Optional[torch.Tensor], tokenizer, *, beam_size: int = 5, nbest: int = 5,
                max_tokens: int = 224, audio_features: Optional[torch.Tensor] = None) -> List[List[Hypothesis]]:
    """Beam-search N-best lists (decode order), hypotheses with a repeated text left out."""
    lists = decode(model, mel, tokenizer, beam_size=beam_size, nbest=nbest, max_tokens=max_tokens,
                   audio_features=audio_features)
    out = []
    for hyps in lists:
        seen, kept = set(), []
        for h in hyps:
            if h.text not in seen:
                seen.add(h.text)
                kept.append(h)
        out.append(kept)
    return out


def rescore(model, audio_features: torch.Tensor, tokenizer, texts: Sequence[Sequence[str]], *,
            length_norm: bool = True) -> List[List[float]]:
    """Score texts[b] (a list of strings) against clip b of audio_features: tokenizer.encode(text) (a
    special token's spelling, e.g. "<|notimestamps|>", encoded as that token),
    teacher-forced log-prob with end-of-text under the plain model, / (tokens + 1) when length_norm.
    Texts longer than the decoder context are cut to fit (prefix + tokens + eot <= n_text_ctx)."""
    room = model.dims.n_text_ctx - len(_prefix(tokenizer, False)) - 1
    # allowed_special="all": a decoded text spells the special tokens decode() does not suppress (e.g.
    # "<|notimestamps|>"); mapping the spelling back to the token re-tokenises such a text as decoded
    seqs = [[tokenizer.encode(t, allowed_special="all")[:room] for t in clip] for clip in texts]
    sums = score_hypotheses(model, audio_features, tokenizer, seqs)
    if not length_norm:
        return sums
    return [[v / (len(t) + 1) for v, t in zip(vs, ts)] for vs, ts in zip(sums, seqs)]


@torch.no_grad()
def measure(model, batches: Iterable, tokenizer, *, language: str, nbest: int = 5, beam_size: int = 5,
            perturbations: Sequence[str] = PERTURBATIONS, seed: int = 0, max_tokens: int = 224,
            length_norm: bool = True, botok_dict=None, offline: Optional[bool] = None) -> List[dict]:
    """One record per utterance of `batches` ((dialect, Batch) pairs, as evaluation.eval_batches), for the
    system the model is in now. Records are JSON-ready: id, dialect, ref, texts (the N-best list H),
    decode_logprob (beam search's sum_logprob), scores (s), best, the 1-best / oracle / rescored error
    counts, and perturbations[kind] = robustness_metrics(...) + the perturbed list, its scores, and the
    pick's error counts."""
    for kind in perturbations:
        if kind not in PERTURBATIONS:
            raise ValueError(f"unknown perturbation {kind!r}: choose from {', '.join(PERTURBATIONS)}")
    lang = metrics.language_code(language)
    records = []
    for _dialect, batch in batches:
        xa = audio_features_for(model, batch.mel)
        lists = nbest_lists(model, None, tokenizer, beam_size=beam_size, nbest=nbest, max_tokens=max_tokens,
                            audio_features=xa)
        texts = [[h.text for h in hyps] for hyps in lists]
        scores = rescore(model, xa, tokenizer, texts, length_norm=length_norm)
        recs = []
        for i, hyps in enumerate(lists):
            recs.append({"id": batch.ids[i], "dialect": batch.dialects[i], "language": lang,
                         "ref": batch.texts[i], "texts": texts[i], "decode_logprob": [h.sum_logprob for h in hyps],
                         "scores": scores[i], "best": int(np.argmax(scores[i])) if hyps else None,
                         "perturbations": {}})
        for kind in perturbations:
            plists = [perturb_list(t, kind, random.Random(f"{seed}/{r['id']}/{kind}"), language)
                      for t, r in zip(texts, recs)]
            pscores = rescore(model, xa, tokenizer, [p.texts for p in plists], length_norm=length_norm)
            for r, t, p, ps in zip(recs, texts, plists, pscores):
                changed = [pt != t[j] for pt, j in zip(p.texts, p.source)]
                out = robustness_metrics(r["scores"], ps, p.source, changed)
                out.update({"texts": p.texts, "source": p.source, "scores": ps})
                r["perturbations"][kind] = out
        records.extend(recs)
    score_records(records, language, botok_dict=botok_dict, offline=offline)
    return records


_ERROR_KEYS = ("char_errors", "ref_chars", "word_errors", "ref_words", "syl_errors", "ref_syllables")


def score_records(records: List[dict], language: str, *, botok_dict=None, offline: Optional[bool] = None) -> None:
    """Add error counts, in place, to records holding ref, texts and perturbations[kind] (with texts and
    top): hyp_errors (one per N-best hypothesis), oracle_cer_index, oracle_wer_index, wer_note and each
    perturbation's pick_* counts. One score_corpus call, so botok is set up once."""
    refs, hyps, slots = [], [], []
    for r in records:
        for j, t in enumerate(r["texts"]):
            refs.append(r["ref"]), hyps.append(t), slots.append((r, "hyp", j))
        for kind, p in r.get("perturbations", {}).items():
            if p["top"] is not None:
                refs.append(r["ref"]), hyps.append(p["texts"][p["top"]]), slots.append((r, kind, None))
    utts = metrics.score_corpus(refs, hyps, language, botok_dict=botok_dict, offline=offline)["utterances"] \
        if refs else []
    per_hyp: Dict[int, List[dict]] = {}
    for (r, what, j), u in zip(slots, utts):
        counts = {k: u[k] for k in _ERROR_KEYS}
        counts["wer_note"] = u["wer_note"]
        if what == "hyp":
            per_hyp.setdefault(id(r), []).append(counts)
        else:
            r["perturbations"][what].update({f"pick_{k}": counts[k] for k in _ERROR_KEYS})
    for r in records:
        h = per_hyp.get(id(r), [])
        r["hyp_errors"] = h
        if not h:  # no hypothesis at all: nothing to score
            continue
        oc = min(range(len(h)), key=lambda j: h[j]["char_errors"])
        ow = None if h[0]["word_errors"] is None else min(range(len(h)), key=lambda j: h[j]["word_errors"])
        r.update({"oracle_cer_index": oc, "oracle_wer_index": ow, "wer_note": h[0]["wer_note"]})


def _rate_records(records: Sequence[dict], index_key: Optional[str]) -> List[dict]:
    """metrics-style per-utterance records of one hypothesis per utterance (index_key picks it; None: 0)."""
    out = []
    for r in records:
        if not r.get("hyp_errors"):
            continue
        j = 0 if index_key is None else r[index_key]
        if j is None:
            j = 0
        e = r["hyp_errors"][j]
        rec = {"dialect": r["dialect"], "language": r["language"]}
        for metric, err_key, len_key in metrics.UNITS:
            rec.update({err_key: e[err_key], len_key: e[len_key],
                        metric: None if e[err_key] is None or not e[len_key] else e[err_key] / e[len_key]})
        rec["wer_note"] = e["wer_note"]
        out.append(rec)
    return out


def _mean(values) -> Optional[float]:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def _group_summary(records: Sequence[dict]) -> dict:
    def rates(index_key, metric):
        recs = _rate_records(records, index_key)
        return metrics.aggregate(recs, by="dialect")["_micro"][metric] if recs else None

    out = {"n": len(records), "mean_list_size": _mean([len(r["texts"]) for r in records]),
           "cer_1best": rates(None, "cer"), "cer_oracle": rates("oracle_cer_index", "cer"),
           "cer_rescored": rates("best", "cer"), "wer_1best": rates(None, "wer"),
           "wer_oracle": rates("oracle_wer_index", "wer")}
    kinds = sorted({k for r in records for k in r.get("perturbations", {})}, key=PERTURBATIONS.index)
    for kind in kinds:
        ps = [r["perturbations"][kind] for r in records if kind in r.get("perturbations", {})]
        errs = [p["pick_char_errors"] for p in ps if p.get("pick_char_errors") is not None]
        lens = [p["pick_ref_chars"] for p in ps if p.get("pick_char_errors") is not None]
        pick_cer = sum(errs) / sum(lens) if sum(lens) else None
        base = out["cer_rescored"]
        drifts = [p["score_drift"] for p in ps if p["score_drift"] is not None]
        out[kind] = {"top1": _mean(p["top1"] for p in ps), "n_top1": sum(p["top1"] is not None for p in ps),
                     "rank_of_best": _mean(p["rank_of_best"] for p in ps),
                     "kendall_tau": _mean(p["kendall_tau"] for p in ps),
                     "spearman": _mean(p["spearman"] for p in ps),
                     "n_tau": sum(p["kendall_tau"] is not None for p in ps),
                     "prefer_original": _mean(p["prefer_original"] for p in ps),
                     "score_drift": max(drifts) if drifts else None, "pick_cer": pick_cer,
                     "nprr_cer": (pick_cer - base) / base if pick_cer is not None and base else None}
    return out


def summarize(records: Sequence[dict], by: str = "dialect") -> dict:
    """{group: summary} per value of record[by], "_micro" (all utterances pooled) and "_macro" (the
    unweighted mean over groups of every numeric value; max for score_drift). See the module docstring."""
    records = list(records)
    groups: Dict[object, List[dict]] = {}
    for r in records:
        groups.setdefault(r[by], []).append(r)
    out = {g: _group_summary(rs) for g, rs in sorted(groups.items(), key=lambda kv: str(kv[0]))}
    per_group = list(out.values())

    def macro(dicts):
        keys = dicts[0].keys() if dicts else []
        res = {}
        for k in keys:
            vals = [d.get(k) for d in dicts]
            if any(isinstance(v, dict) for v in vals):
                res[k] = macro([v for v in vals if isinstance(v, dict)])
            elif k == "score_drift":
                res[k] = max((v for v in vals if v is not None), default=None)
            else:
                res[k] = _mean(vals)
        return res

    out["_micro"] = _group_summary(records) if records else {}
    out["_macro"] = {**macro(per_group), "n": len(records), "groups": len(per_group)}
    return out


def format_robustness(results) -> str:
    """Per system and dialect: list size, 1-best / oracle CER, and 1-best robustness and Kendall tau per kind."""
    kinds = [k for k in PERTURBATIONS if k != "reorder"]
    head = ["System", "Dialect", "N", "1-best CER", "oracle CER"] + [f"{k} top1" for k in kinds] + \
        [f"{k} tau" for k in kinds]
    lines = ["N-best robustness (NPRR)", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    for system, res in results.items():
        summary = res.get("_robustness") if isinstance(res, dict) else None
        for dialect, m in (summary or {}).items():
            if dialect == "_micro":
                continue
            cells = [system, "macro avg" if dialect == "_macro" else dialect, fmt(m.get("mean_list_size")),
                     fmt(m.get("cer_1best")), fmt(m.get("cer_oracle"))]
            cells += [fmt((m.get(k) or {}).get("top1")) for k in kinds]
            cells += [fmt((m.get(k) or {}).get("kendall_tau")) for k in kinds]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
