"""Error rates per language, and their aggregation per dialect.

Units and sources:
- Tibetan ("bo"): CER over characters (code points) and syllable error rate (SER, syllables split at
  tsheg / shad / space, the marks themselves not scored) from `tibetan_wer.cer` / `tibetan_wer.ser`;
  WER over botok words, segmented and scored exactly as `tibetan_wer.wer` does (BoTok-SWER), when
  botok's dictionary is available locally (see `botok_tokenizer`), else `wer: None` plus a reason.
- Japanese: CER only. Japanese has no spaces between words, so a WER needs a morphological segmenter
  this project does not ship; `wer` is None with a note rather than a character rate in disguise.
- Every other language: CER over characters and WER over whitespace words, after whisper's
  normalizers; the same Levenshtein engine (`tibetan_wer.score_segments`, rapidfuzz when installed).

Averaging: *_micro is total edits / total reference units (an empty reference adds its insertions
and no units); *_macro is the mean of per-utterance rates over utterances with a non-empty reference.
The headline `cer` / `ser` / `wer` keys follow the research notes this project reproduces: CER is
micro (as HF evaluate's `cer`, which the notes used), Tibetan SER and WER are macro (as the notes'
`tibetan_wer` WER); non-Tibetan WER is micro (as jiwer). `HEADLINE` records the choice; both variants
are always reported too.
"""
import os
import socket
import unicodedata
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence
from urllib.parse import urlparse

import numpy as np
import tibetan_wer

from whisper_ft.text import language_code, normalize_for_scoring

OFFLINE_ENV = ("WHISPER_FT_OFFLINE", "HF_HUB_OFFLINE")
BOTOK_DICT_ENV = "WHISPER_FT_BOTOK_DICT"
HEADLINE = {"bo": {"cer": "micro", "ser": "macro", "wer": "macro"},
            "other": {"cer": "micro", "ser": "micro", "wer": "micro"}}
UNITS = (("cer", "char_errors", "ref_chars"), ("ser", "syl_errors", "ref_syllables"),
         ("wer", "word_errors", "ref_words"))


# ---------------------------------------------------------------------------
# botok: where its dictionary lives, and never downloading it by surprise
# ---------------------------------------------------------------------------

def is_offline(offline: Optional[bool] = None) -> bool:
    """Explicit argument first, else WHISPER_FT_OFFLINE / HF_HUB_OFFLINE set to 1/true/yes/on."""
    if offline is not None:
        return bool(offline)
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on") for k in OFFLINE_ENV)


def botok_pack_path(botok_dict=None) -> Path:
    """The dialect pack botok would read: `botok_dict` (a pack folder holding dictionary/ and
    adjustments/, or a folder holding `general/`), else $WHISPER_FT_BOTOK_DICT, else botok's own
    default ~/Documents/pybo/dialect_packs/general (where botok downloads it on first use)."""
    import botok.config as bc

    path = botok_dict or os.environ.get(BOTOK_DICT_ENV)
    if not path:
        return Path(bc.DEFAULT_BASE_PATH) / bc.DEFAULT_DIALECT_PACK
    path = Path(path).expanduser()
    if not (path / "dictionary").is_dir() and (path / bc.DEFAULT_DIALECT_PACK / "dictionary").is_dir():
        path = path / bc.DEFAULT_DIALECT_PACK
    return path


def _download_host_reachable(timeout: float = 3.0) -> Optional[str]:
    """None when the host botok downloads from answers a TCP connect, else the reason it does not.

    botok itself retries 50 times with 50 s timeouts (about 40 minutes) before giving up, so this
    quick probe stands in front of it."""
    import botok.config as bc

    host = urlparse(bc.get_dialect_pack_url("general", version="probe")).hostname  # no request made
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return None
    except OSError as e:
        return f"{host} unreachable ({type(e).__name__}: {e})"


_TOKENIZERS: Dict[str, object] = {}


def botok_tokenizer(botok_dict=None, offline: Optional[bool] = None):
    """(botok WordTokenizer, None) when its dictionary is usable, else (None, "n/a: <reason>").

    A local pack is used as is (botok builds `<name>_trie.pickled` beside it on first use and reuses
    it). A missing pack is downloaded to botok's default place only when not offline and the download
    host answers; offline (argument or environment), nothing touches the network.
    """
    pack = botok_pack_path(botok_dict)
    key = str(pack)
    if key in _TOKENIZERS:
        return _TOKENIZERS[key], None
    if not (pack / "dictionary").is_dir():
        where = f"botok dictionary not found at {pack}"
        hint = f"pass botok_dict= or set ${BOTOK_DICT_ENV} to a botok dialect pack folder"
        if botok_dict or os.environ.get(BOTOK_DICT_ENV):
            return None, f"n/a: {where} ({hint})"
        if is_offline(offline):
            return None, f"n/a: {where} and offline mode is on ({hint})"
        unreachable = _download_host_reachable()
        if unreachable:
            return None, f"n/a: {where} and cannot download it: {unreachable} ({hint})"
    try:
        import botok

        config = botok.Config.from_path(pack) if (pack / "dictionary").is_dir() else botok.Config()
        tok = botok.WordTokenizer(config=config)
    except Exception as e:  # botok raises IOError, requests errors, csv errors...
        return None, f"n/a: botok could not load its dictionary from {pack} ({type(e).__name__}: {e})"
    _TOKENIZERS[key] = tok
    return tok, None


# ---------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------

def _rate(errors: int, ref_len: int) -> Optional[float]:
    return errors / ref_len if ref_len > 0 else None


def _per_sentence(result: dict):
    return [(s["edits"], s["reference_length"]) for s in result["per_sentence"]]


def _utterance_records(refs: List[str], hyps: List[str], lang: str, botok_dict=None,
                       offline=None, word_tokenizer=None) -> List[dict]:
    """One record per pair: normalised texts, edit counts and rates per unit."""
    refs = [normalize_for_scoring(r, lang) for r in refs]
    hyps = [normalize_for_scoring(h, lang) for h in hyps]
    n = len(refs)
    words, note, fallbacks = [None] * n, None, 0
    if lang == "bo":
        # argument order as tibetan_wer: (predictions, references)
        chars = _per_sentence(tibetan_wer.cer(hyps, refs, detail="rates"))
        syls = _per_sentence(tibetan_wer.ser(hyps, refs, detail="rates"))
        tok = word_tokenizer
        if tok is None:
            tok, note = botok_tokenizer(botok_dict, offline)
        if tok is not None:
            # what tibetan_wer.wer does (segment_all with botok, then score_segments), with our
            # tokenizer instead of its module-global default one that would download the dictionary
            before = sum(tibetan_wer.fallback_counts().values())
            segs = tibetan_wer.segment_all(refs + hyps, method="botok", tokenizer=tok, on_error="fallback")
            fallbacks = sum(tibetan_wer.fallback_counts().values()) - before
            words = _per_sentence(tibetan_wer.score_segments(segs[n:], segs[:n], unit="wer",
                                                             detail="rates"))
    else:
        syls = [None] * n
        chars = _per_sentence(tibetan_wer.score_segments([list(h) for h in hyps], [list(r) for r in refs],
                                                         unit="cer", detail="rates"))
        if lang == "ja":
            note = "n/a: Japanese has no word boundaries and no segmenter is configured; use CER"
        else:
            words = _per_sentence(tibetan_wer.score_segments([h.split() for h in hyps],
                                                             [r.split() for r in refs], detail="rates"))
    records = []
    for i in range(n):
        rec = {"language": lang, "ref": refs[i], "hyp": hyps[i]}
        for (metric, err_key, len_key), counts in zip(UNITS, (chars[i], syls[i], words[i])):
            if counts is None:
                rec.update({err_key: None, len_key: None, metric: None})
            else:
                rec.update({err_key: counts[0], len_key: counts[1], metric: _rate(*counts)})
        rec["errors"] = rec["char_errors"]
        rec["wer_note"] = note
        if fallbacks:
            rec["wer_note"] = (f"botok fell back to a syllable split on {fallbacks} of {2 * n} strings "
                               f"scored with this one")
        records.append(rec)
    return records


def _summarize(records: Sequence[dict]) -> dict:
    """Micro and macro rates over records; headline keys by the records' language (see HEADLINE)."""
    langs = {r["language"] for r in records}
    headline = HEADLINE["bo"] if langs == {"bo"} else HEADLINE["other"]
    out = {"n": len(records), "language": langs.pop() if len(langs) == 1 else sorted(langs)}
    for metric, err_key, len_key in UNITS:
        if not records or any(r[err_key] is None for r in records):
            out.update({metric: None, f"{metric}_micro": None, f"{metric}_macro": None,
                        err_key: None, len_key: None})
            continue
        errors = sum(r[err_key] for r in records)
        ref_len = sum(r[len_key] for r in records)
        per_utt = [r[metric] for r in records if r[metric] is not None]
        micro = _rate(errors, ref_len)
        macro = float(np.mean(per_utt)) if per_utt else None
        out.update({f"{metric}_micro": micro, f"{metric}_macro": macro, err_key: errors, len_key: ref_len})
        out[metric] = micro if headline[metric] == "micro" else macro
    notes = [r["wer_note"] for r in records if r.get("wer_note")]
    out["wer_note"] = notes[0] if notes else None
    out["averaging"] = headline
    return out


def score_utterance(ref: str, hyp: str, language: str, *, botok_dict=None, offline=None,
                    word_tokenizer=None) -> dict:
    """Edit counts and rates for one pair: errors (= char_errors), ref_chars, cer, syl_errors,
    ref_syllables, ser (Tibetan only), word_errors, ref_words, wer (None + wer_note when undefined),
    and the normalised ref / hyp. Rates are None for an empty reference."""
    return _utterance_records([ref], [hyp], language_code(language), botok_dict, offline, word_tokenizer)[0]


def score_corpus(refs: Sequence[str], hyps: Sequence[str], language: str, *, botok_dict=None,
                 offline: Optional[bool] = None, word_tokenizer=None) -> dict:
    """Corpus rates: cer / ser / wer (headline, see HEADLINE), each also as *_micro and *_macro,
    the summed edit counts, n, wer_note (why wer is None, or a caveat) and `utterances` (the
    per-utterance records, for `aggregate`).

    botok_dict: local botok dialect pack (see `botok_pack_path`); offline: never download (default:
    from the environment); word_tokenizer: an already-built botok-like tokenizer (`.tokenize`).
    """
    refs, hyps = list(refs), list(hyps)
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
    records = _utterance_records(refs, hyps, language_code(language), botok_dict, offline, word_tokenizer)
    out = _summarize(records)
    out["utterances"] = records
    return out


def aggregate(per_utt_records: Iterable[dict], by: str = "dialect") -> dict:
    """{group: metrics} for each value of record[by], plus "_micro" (all utterances pooled as one
    group) and "_macro" (unweighted mean of the groups' rates, so every dialect counts the same)."""
    records = list(per_utt_records)
    groups: Dict[object, List[dict]] = {}
    for i, r in enumerate(records):
        if by not in r:
            raise ValueError(f"record {i} has no {by!r} key: add it to score_utterance's result")
        groups.setdefault(r[by], []).append(r)
    out = {g: _summarize(rs) for g, rs in groups.items()}
    per_group = list(out.values())
    macro = {"n": len(records), "groups": len(per_group)}
    for metric, _, _ in UNITS:
        for key in (metric, f"{metric}_micro", f"{metric}_macro"):
            vals = [m[key] for m in per_group]
            macro[key] = float(np.mean(vals)) if vals and all(v is not None for v in vals) else None
    notes = [m["wer_note"] for m in per_group if m.get("wer_note")]
    macro["wer_note"] = notes[0] if notes else None
    out["_micro"] = _summarize(records)
    out["_macro"] = macro
    return out


# ---------------------------------------------------------------------------
# Domain terms
# ---------------------------------------------------------------------------

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


def classification_summary(true: Sequence[str], predicted: Sequence[str], labels: Sequence[str]) -> dict:
    """Accuracy, recall per true class (and their mean) and the confusion matrix {true: {predicted: n}} of a
    classifier over `labels`; a true class outside `labels` gets its row too (its recall is 0 by definition)."""
    if len(true) != len(predicted):
        raise ValueError(f"{len(true)} true labels for {len(predicted)} predictions")
    classes = sorted(set(true))
    columns = list(labels) + sorted(set(predicted) - set(labels))
    confusion = {t: {p: 0 for p in columns} for t in classes}
    for t, p in zip(true, predicted):
        confusion[t][p] += 1
    recall = {t: confusion[t].get(t, 0) / sum(row.values()) for t, row in confusion.items()}
    n = len(true)
    return {"accuracy": sum(t == p for t, p in zip(true, predicted)) / n if n else None, "n": n,
            "recall": recall, "macro_recall": sum(recall.values()) / len(recall) if recall else None,
            "labels": list(labels), "confusion": confusion}
