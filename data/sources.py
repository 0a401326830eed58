"""Where examples come from: one `--data` spec string, shared by train.py and evaluate.py.

  demo                          the offline synthetic multi-dialect corpus (data/synthetic.py)
  openpecha[:PATH]              openpecha/stt-training-data + ganga4364/stt_tibetan_dialects_data from the
                                Hub, or local parquet file(s)/directory of the same schema; audio from `url`
                                is downloaded once into a cache
  hf:NAME[:CONFIG][@SPLIT]      any HF audio dataset (Common Voice, FLEURS, ReazonSpeech, ...)
  hf:/path[@SPLIT]              a datasets.save_to_disk directory or a parquet directory
  path.jsonl|.csv|.tsv          a manifest: audio (relative to the manifest), text, [dialect, language,
                                duration, id]
  directory                     the tibetan_voice layout (TSV with `path, sentence` + an audio folder), or a
                                directory holding {train,test}.jsonl manifests
Every source goes through data.validate: bad rows are skipped and counted, strict=True raises instead.
"""
import csv
import hashlib
import http.client
import json
import logging
import os
import re
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data.validate import DataError, ValidationReport, validate_examples
from whisper_ft.audio import AudioError, to_16k_mono

log = logging.getLogger(__name__)

DIALECTS = ("utsang", "amdo", "kham")

# OpenPecha `dept` codes -> dialect. The two dialect departments come from
# ganga4364/stt_tibetan_dialects_data. Every department of openpecha/stt-training-data is Central Tibetan:
# its audio (audiobooks, teachings, podcasts, films, news, history programmes, natural and children's
# speech, per OpenPecha's stt-documentation catalogs) was gathered from standard Lhasa / exile-standard
# (Ü-Tsang) speakers, so they are labelled utsang. That is an assumption about the collection, not a
# per-speaker label: override with dialect_map ({"STT_MV": "kham"} / "STT_MV=kham,...") if you know better.
DEPT_TO_DIALECT = {
    "STT_AM": "amdo", "AM_AB": "amdo",  # Amdo speech / Amdo audiobooks
    "KH": "kham", "KH_AB": "kham",  # Kham speech / Kham audiobooks
    "STT_AB": "utsang",  # audiobooks
    "STT_TT": "utsang",  # Tibetan teachings
    "STT_NS": "utsang",  # natural speech
    "STT_CS": "utsang",  # children's speech
    "STT_MV": "utsang",  # films
    "STT_PC": "utsang",  # podcasts
    "STT_HS": "utsang",  # history programmes
    "STT_NW": "utsang",  # news
}
OPENPECHA_REPOS = ("openpecha/stt-training-data", "ganga4364/stt_tibetan_dialects_data")
TEXT_COLUMNS = ("sentence", "text", "transcription", "uni", "transcript", "normalized_text")
DIALECT_COLUMNS = ("dialect", "accent", "locale")
AUDIO_COLUMNS = ("audio", "path", "file", "audio_path", "audio_filepath", "file_name")
SPLIT_ALIASES = {"validation": "test", "eval": "test", "dev": "test", "valid": "test"}  # demo/manifest dirs
HUB_TIMEOUT_S = 5.0
OFFLINE_HINT = ("offline? use local parquet files of the same schema (--data openpecha:/path/to/parquet_dir), "
                "a manifest (--data path/to/train.jsonl), or set HF_HUB_OFFLINE=1 if the dataset is already "
                "in your Hugging Face cache")


@dataclass
class Example:
    id: str
    audio: "str | np.ndarray"  # a file path, or an in-memory 16 kHz mono float32 array
    text: str
    dialect: str
    language: str
    duration: float | None = None  # seconds, when known


class SourceError(ValueError):
    """The --data spec cannot be loaded; the message says why and what to use instead."""


def load_examples(spec: str, split: str = "train", *, language: str = "bo", strict: bool = False,
                  cache_dir=None, dialect_map=None, text_column: str | None = None,
                  dialect_column: str | None = None, min_grade: int | None = None, max_rows: int | None = None,
                  audio_check: str = "header", dialects=None,
                  check_text_length: bool = True) -> tuple[list[Example], ValidationReport]:
    """Load and validate the examples of `spec` (see the module docstring) for `split`.

    dialect_map: dict, JSON string, JSON file, or "RAW=dialect,..." applied to raw labels (OpenPecha
      `dept`, a dataset's accent column, ...), on top of DEPT_TO_DIALECT.
    dialects: accepted labels; default DIALECTS for Tibetan (plus dialect_map's targets), any label otherwise;
      "any" accepts every label for Tibetan too.
    min_grade: OpenPecha review grade, rows below it are dropped (not counted as bad).
    max_rows: cap rows per source before any audio is fetched (quick experiments).
    audio_check: "header" (soundfile.info only; silent/NaN clips are skipped later by SpeechDataset)
      or "full" (decode every file once now).
    check_text_length: drop rows whose text needs more than the decoder's positions with Whisper's tokenizer;
      False when the caller extends the tokenizer first (train.py --add-tokens) and checks the length itself.
    """
    mapping = {**DEPT_TO_DIALECT, **parse_dialect_map(dialect_map)}
    if dialects is None and language == "bo":
        dialects = sorted(set(DIALECTS) | set(parse_dialect_map(dialect_map).values()))
    elif dialects == "any":
        dialects = None
    opts = dict(language=language, mapping=mapping, text_column=text_column, dialect_column=dialect_column,
                max_rows=max_rows)
    report = ValidationReport(source=f"{spec} [{split}]")
    known_bad = []
    if spec == "demo":
        from data import synthetic  # lazy: only the demo needs it

        rows = _manifest_in_dir(Path(synthetic.build_demo()), split, **opts)
    elif spec == "openpecha" or spec.startswith("openpecha:"):
        rows, known_bad = _load_openpecha(spec.partition(":")[2] or None, split, cache_dir=cache_dir,
                                          min_grade=min_grade, report=report, **opts)
    elif spec.startswith("hf:"):
        rows = _load_hf(spec[3:], split, **opts)
    elif Path(spec).suffix.lower() in (".jsonl", ".csv", ".tsv"):
        rows = load_manifest(spec, **opts)
    elif Path(spec).is_dir():
        rows = _load_directory(Path(spec), split, **opts)
    else:
        raise SourceError(f"--data {spec!r}: not a known source; use demo, openpecha[:PATH], "
                          f"hf:NAME[:CONFIG][@SPLIT], hf:/local/dir, a .jsonl/.csv/.tsv manifest, or a directory")
    good = validate_examples(rows, report, audio_check=audio_check, allowed_dialects=dialects, known_bad=known_bad,
                             check_text_length=check_text_length)
    log.info(report.summary())
    if strict:
        report.raise_if_bad()
    return good, report


def limit_per_dialect(examples, n: int | None) -> list:
    """The first n examples of each dialect, in their order (all of them when n is falsy)."""
    if not n:
        return list(examples)
    seen, kept = {}, []
    for e in examples:
        seen[e.dialect] = seen.get(e.dialect, 0) + 1
        if seen[e.dialect] <= n:
            kept.append(e)
    return kept


def parse_dialect_map(value) -> dict:
    """{} / dict / JSON text / path to a JSON file / "RAW=dialect,RAW2=dialect" -> dict."""
    if not value:
        return {}
    if isinstance(value, dict):
        return {str(k): str(v) for k, v in value.items()}
    text = str(value).strip()
    if os.path.isfile(text):
        text = Path(text).read_text(encoding="utf-8")
    if text.startswith("{"):
        return {str(k): str(v) for k, v in json.loads(text).items()}
    out = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        raw, eq, dialect = item.partition("=")
        if not eq or not raw.strip() or not dialect.strip():
            raise ValueError(f"dialect map entry {item!r}: expected RAW=dialect, e.g. STT_MV=kham")
        out[raw.strip()] = dialect.strip()
    return out


# ---- manifests ------------------------------------------------------------------------------------

def load_manifest(path, *, language="bo", mapping=None, text_column=None, dialect_column=None, max_rows=None,
                  default_dialect=None, audio_dirs=()) -> list[Example]:
    """Rows of a .jsonl / .csv / .tsv manifest -> Examples (unvalidated). Audio paths are relative to the
    manifest (or to one of audio_dirs); `path`/`sentence` columns (Common Voice / tibetan_voice TSVs) work too."""
    path = Path(path)
    if not path.is_file():
        raise SourceError(f"manifest {path} does not exist")
    rows = read_manifest_rows(path)
    if max_rows is not None:
        rows = rows[:max_rows]
    if not rows:
        return []
    audio_key = _pick_column(rows[0], None, AUDIO_COLUMNS, "audio", path)
    text_key = _pick_column(rows[0], text_column, TEXT_COLUMNS, "text", path)
    dialect_key = _pick_column(rows[0], dialect_column, DIALECT_COLUMNS, "dialect", path, required=False)
    out = []
    for i, r in enumerate(rows):
        rel = str(r[audio_key])
        audio = _resolve_audio(path.parent, rel, audio_dirs)
        raw_dialect = str(r.get(dialect_key) or "").strip() if dialect_key else ""
        lang = str(r.get("language") or language)
        dialect = _dialect(raw_dialect, mapping, lang, default_dialect)
        dur = r.get("duration")
        out.append(Example(id=str(r.get("id") or f"{path.stem}:{i}"), audio=str(audio), text=str(r[text_key] or ""),
                           dialect=dialect, language=lang, duration=float(dur) if dur not in (None, "") else None))
    return out


def read_manifest_rows(path: Path) -> list:
    """The rows of a .jsonl (one JSON object per line) / .csv / .tsv file, as dicts; OSError or ValueError
    (json's) for a file that cannot be read."""
    if path.suffix.lower() == ".jsonl":
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ","))


def _resolve_audio(base: Path, rel: str, audio_dirs) -> Path:
    p = Path(rel)
    if p.is_absolute():
        return p
    for d in (base, *audio_dirs):
        if (d / p).exists():
            return d / p
    return base / p  # missing: validation reports it as unreadable, naming the path


def _dialect(raw: str, mapping, language: str, default=None) -> str:
    if raw:
        return (mapping or {}).get(raw, raw)
    if default is not None:
        return default
    return "" if language == "bo" else language  # Tibetan needs a real label; other languages: one group


def _pick_column(row: dict, chosen, candidates, what, where, required=True):
    if chosen is not None:
        if chosen not in row:
            raise SourceError(f"{where}: no column {chosen!r} for {what}; columns are {sorted(row)}")
        return chosen
    for c in candidates:
        if c in row:
            return c
    if required:
        raise SourceError(f"{where}: no {what} column (looked for {', '.join(candidates)}); columns are "
                          f"{sorted(row)}; name it with --{what}-column")
    return None


def _manifest_in_dir(d: Path, split: str, **opts) -> list[Example]:
    name = SPLIT_ALIASES.get(split, split)
    path = d / f"{name}.jsonl"
    if not path.is_file():
        raise SourceError(f"{d}: no {name}.jsonl manifest for split {split!r}; found "
                          f"{sorted(p.name for p in d.glob('*.jsonl'))}")
    return load_manifest(path, **opts)


def _load_directory(d: Path, split: str, **opts) -> list[Example]:
    """A directory of {split}.jsonl manifests, or the tibetan_voice layout (TSV + audio folder)."""
    if list(d.glob("*.jsonl")):
        return _manifest_in_dir(d, split, **opts)
    tsvs = sorted(d.glob("*.tsv"))
    name = SPLIT_ALIASES.get(split, split)
    chosen = [t for t in tsvs if t.stem in (split, name)] or (tsvs if len(tsvs) == 1 else [])
    if not chosen:
        raise SourceError(f"{d}: expected {split}.tsv (or a single .tsv) with columns path, sentence; "
                          f"found {[t.name for t in tsvs]}")
    audio_dirs = [p for p in sorted(d.iterdir()) if p.is_dir()]
    # tibetan_voice is read Lhasa (Central) Tibetan: rows without a dialect column are utsang
    return load_manifest(chosen[0], audio_dirs=audio_dirs, default_dialect="utsang", **opts)


# ---- OpenPecha ------------------------------------------------------------------------------------

def _load_openpecha(local, split, *, cache_dir, min_grade, report, language, mapping, text_column,
                    dialect_column, max_rows):
    """OpenPecha rows (no audio column: `url` points at the clip) -> Examples with cached local audio."""
    if local:
        tables = [_read_parquet_rows(Path(local), split)]
    else:
        tables = [_hub_rows(repo, None, split) for repo in OPENPECHA_REPOS]
    rows = []
    for table in tables:
        if min_grade is not None:
            kept = [r for r in table if r.get("grade") is not None and int(r["grade"]) >= min_grade]
            report.notes[f"filtered below grade {min_grade}"] += len(table) - len(kept)
            table = kept
        rows.extend(table[:max_rows] if max_rows is not None else table)
    cache = Path(cache_dir) if cache_dir else default_cache_dir() / "openpecha_audio"
    lens = [float(r["audio_len"]) for r in rows if r.get("audio_len") not in (None, "")]
    # audio_len is seconds; if most clips claim > 30 s the column must be in milliseconds
    scale = 1e-3 if lens and np.median(lens) > 30 else 1.0
    if scale != 1.0:
        log.warning("openpecha audio_len looks like milliseconds (median %.0f); dividing by 1000", np.median(lens))
    examples = []
    for r in rows:
        dur = r.get("audio_len")
        dur = float(dur) * scale if dur not in (None, "") else None
        examples.append(Example(id=str(r.get("file_name") or r["url"]), audio=str(r["url"]),
                                text=str(r.get(text_column or "uni") or ""),
                                dialect=mapping.get(str(r.get(dialect_column or "dept") or ""),
                                                    str(r.get(dialect_column or "dept") or "")),
                                language=language, duration=dur))
    # fetch only what validation will keep on metadata alone (long clips are not downloaded at all)
    fetch = [e for e in examples if not (e.duration is not None and e.duration > 30.0)]
    failed = fetch_all(fetch, cache)
    known_bad = [(e, "download_failed", err) for e, err in failed]
    bad_ids = {id(e) for e, _ in failed}
    return [e for e in examples if id(e) not in bad_ids], known_bad


def default_cache_dir() -> Path:
    return Path(os.environ.get("WHISPER_FT_CACHE", Path.home() / ".cache" / "whisper_ft"))


def cache_path(url: str, cache: Path) -> Path:
    """Stable per-URL file name: a hash (no collisions between datasets) + the URL's own name (readable)."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", os.path.basename(urllib.parse.urlparse(url).path))[-80:] or "audio"
    return cache / f"{hashlib.sha1(url.encode()).hexdigest()[:12]}-{name}"


def fetch_all(examples, cache: Path, *, workers: int = 8, **kw) -> list:
    """Replace each example's URL with its cached file, downloading what is missing in parallel (each file retried,
    then counted and skipped). A progress bar (files, megabytes, failures) shows on a terminal, and one summary
    line ends every fetch. Returns [(example, error message)] for clips that could not be fetched."""
    from tqdm import tqdm

    cache.mkdir(parents=True, exist_ok=True)
    todo = [e for e in examples if not cache_path(e.audio, cache).exists()]
    failed, fetched_bytes = [], 0

    def one(e):
        try:
            return e, download(e.audio, cache_path(e.audio, cache), **kw).stat().st_size, None
        except DownloadError as err:
            return e, 0, str(err)

    if todo:
        print(f"downloading {len(todo)} of {len(examples)} clips into {cache}", flush=True)
        t0 = time.time()
        with ThreadPoolExecutor(max_workers=min(workers, len(todo))) as pool, \
                tqdm(total=len(todo), unit="file", disable=None, dynamic_ncols=True) as bar:
            for e, size, err in pool.map(one, todo):
                fetched_bytes += size
                if err is not None:
                    failed.append((e, err))
                bar.update(1)
                bar.set_postfix(MB=f"{fetched_bytes / 2**20:.1f}", failed=len(failed))
        print(f"fetched {len(todo) - len(failed)} clips ({fetched_bytes / 2**20:.1f} MB) in {time.time() - t0:.0f} s"
              + (f"; {len(failed)} failed after retries and are skipped, e.g. {failed[0][1]}" if failed else ""),
              flush=True)
    for e in examples:
        e.audio = str(cache_path(e.audio, cache)) if cache_path(e.audio, cache).exists() else e.audio
    return failed


class DownloadError(OSError):
    pass


def download(url: str, dest: Path, *, retries: int = 3, timeout: float = 20.0, backoff: float = 0.5) -> Path:
    """Fetch url to dest once: resume a previous `.part` with an HTTP Range request, check the length the
    server announced, rename atomically when complete. A cached dest is never fetched again."""
    dest = Path(dest)
    if dest.exists():
        return dest
    part = dest.with_name(dest.name + ".part")
    last = None
    for attempt in range(retries + 1):
        have = part.stat().st_size if part.exists() else 0
        req = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
        try:
            with _OPENER.open(req, timeout=timeout) as r:
                resumed = have > 0 and r.status == 206
                expected = _expected_size(r, have if resumed else 0)
                with open(part, "ab" if resumed else "wb") as f:  # server ignored Range: start over
                    shutil.copyfileobj(r, f, 1 << 16)
            if expected is not None and part.stat().st_size != expected:
                raise http.client.IncompleteRead(b"", expected - part.stat().st_size)
            os.replace(part, dest)
            return dest
        except urllib.error.HTTPError as e:
            last = f"HTTP {e.code}"
            if e.code == 416:  # our .part is not a prefix the server agrees with: restart from zero
                part.unlink(missing_ok=True)
            elif 400 <= e.code < 500 and e.code not in (408, 429):
                break  # will not get better by retrying
        except (urllib.error.URLError, http.client.HTTPException, OSError) as e:  # drops, timeouts, resets
            last = f"{type(e).__name__}: {e}"
        if attempt < retries:
            time.sleep(backoff * 2 ** attempt)
    raise DownloadError(f"{url}: download failed after {attempt + 1} tries ({last})")


def _expected_size(r, offset: int) -> int | None:
    total = re.search(r"/(\d+)$", r.headers.get("Content-Range", ""))
    if total:
        return int(total.group(1))
    n = r.headers.get("Content-Length")
    return offset + int(n) if n is not None else None


_OPENER = urllib.request.build_opener()  # honours *_proxy / no_proxy from the environment


# ---- Hugging Face datasets ------------------------------------------------------------------------

def _load_hf(rest: str, split: str, *, language, mapping, text_column, dialect_column, max_rows):
    """hf:NAME[:CONFIG][@SPLIT] or hf:/local/dir[@SPLIT] -> Examples (audio decoded with soundfile)."""
    target, at, forced = rest.rpartition("@") if "@" in rest else (rest, "", "")
    split = forced or split
    if os.path.exists(target) or target.startswith(("/", ".", "~")):
        rows = _read_local_hf(Path(os.path.expanduser(target)), split)
        where = target
    else:
        name, _, config = target.partition(":")
        rows = _hub_rows(name, config or None, split)
        where = f"hf:{target}"
    if max_rows is not None:
        rows = rows[:max_rows]
    if not rows:
        return []
    audio_key = _pick_column(rows[0], None, ("audio",) + AUDIO_COLUMNS, "audio", where)
    text_key = _pick_column(rows[0], text_column, TEXT_COLUMNS, "text", where)
    dialect_key = _pick_column(rows[0], dialect_column, DIALECT_COLUMNS + ("dept",), "dialect", where, required=False)
    out = []
    for i, r in enumerate(rows):
        raw = str(r.get(dialect_key) or "").strip() if dialect_key else ""
        ident = str(r.get("id") or r.get("file_name") or f"{where}:{split}:{i}")
        try:
            audio, dur = _hf_audio(r[audio_key], ident)
        except AudioError as e:
            audio, dur = f"<unreadable {ident}: {e.reason}>", None  # validation counts it as unreadable
        out.append(Example(id=ident, audio=audio, text=str(r.get(text_key) or ""),
                           dialect=_dialect(raw, mapping, language), language=language, duration=dur))
    return out


def _hf_audio(value, ident):
    """An Audio(decode=False) cell -> a local path (cheap) or a decoded 16 kHz array (from bytes)."""
    import io

    import soundfile as sf

    if isinstance(value, str):
        return value, None
    if isinstance(value, dict):
        path, data = value.get("path"), value.get("bytes")
        if path and os.path.isfile(path):
            return path, None
        if data:
            try:
                wav, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=False)
            except Exception as e:
                raise AudioError(ident, f"unreadable audio bytes ({type(e).__name__}: {e})") from None
            wav = to_16k_mono(wav, sr)
            return wav, wav.size / 16000
    raise AudioError(ident, f"no audio bytes or readable path in {type(value).__name__} cell")


def _read_local_hf(path: Path, split: str) -> list[dict]:
    if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
        import datasets

        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise SourceError(f"{path}: no split {split!r}; has {list(ds)}")
            ds = ds[split]
        return list(_undecoded(ds))
    return _read_parquet_rows(path, split)


def _read_parquet_rows(path: Path, split: str) -> list[dict]:
    """Rows of a parquet file, or of the files in a directory belonging to `split` (all if none are named
    by split). pyarrow directly: no datasets cache, audio struct cells stay {bytes, path} dicts."""
    import pyarrow.parquet as pq

    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(path.rglob("*.parquet"))
        names = {split, SPLIT_ALIASES.get(split, split)} | ({"validation", "dev", "eval"} if split == "test" else set())
        named = [f for f in files if any(re.search(rf"(^|[/_.-]){n}([/_.-]|$)", str(f.relative_to(path)))
                                         for n in names)]
        any_split = [f for f in files if re.search(r"(^|[/_.-])(train|test|validation|dev|eval)([/_.-]|$)",
                                                   str(f.relative_to(path)))]
        files = named if any_split else files
    else:
        raise SourceError(f"{path}: no such parquet file or directory")
    if not files:
        raise SourceError(f"{path}: no parquet files for split {split!r}")
    rows = []
    for f in files:
        rows.extend(pq.read_table(f).to_pylist())
    return rows


def _undecoded(ds):
    """Iterate a datasets.Dataset with every Audio column left encoded (no torchcodec needed)."""
    import datasets

    for name, feat in ds.features.items():
        if isinstance(feat, datasets.Audio):
            ds = ds.cast_column(name, datasets.Audio(decode=False))
    return ds


def _hub_rows(name: str, config, split: str) -> list[dict]:
    """A Hub dataset's split as rows; fails within seconds when the Hub is unreachable."""
    try:
        import datasets
        from huggingface_hub import constants
    except ImportError as e:
        raise SourceError(f"hf:{name}: the datasets package is not usable ({e}); {OFFLINE_HINT}") from None
    if not constants.HF_HUB_OFFLINE:
        probe_hub(name)
    try:
        ds = datasets.load_dataset(name, config, split=split)  # never trust_remote_code
    except (ConnectionError, TimeoutError, OSError) as e:
        raise SourceError(f"hf:{name}: cannot load from the Hub ({type(e).__name__}: {e}); {OFFLINE_HINT}") from None
    except ValueError as e:  # unknown split / config
        raise SourceError(f"hf:{name}: {e}") from None
    return list(_undecoded(ds))


def probe_hub(name: str, *, endpoint: str | None = None, timeout: float = HUB_TIMEOUT_S) -> None:
    """One short metadata request before datasets starts its (slow, retrying) download machinery."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    t0 = time.monotonic()
    try:
        HfApi(endpoint=endpoint).dataset_info(name, timeout=timeout)
    except RepositoryNotFoundError:
        raise SourceError(f"hf:{name}: no such dataset on the Hub (or it is gated: log in with `hf auth login`)") from None
    except Exception as e:  # requests/httpx connection errors differ between hub versions
        status = getattr(getattr(e, "response", None), "status_code", None)  # not str(e): it holds addresses
        if status in (401, 403):
            raise SourceError(f"hf:{name}: access denied ({e}); accept its terms on the Hub and log in") from None
        raise SourceError(f"hf:{name}: Hugging Face Hub unreachable after {time.monotonic() - t0:.1f} s "
                          f"({type(e).__name__}); {OFFLINE_HINT}") from None


def add_data_args(group) -> None:
    """The flags that choose rows of a source, shared by train.py and evaluate.py (see load_examples)."""
    group.add_argument("--max-rows", type=int, default=None, help="rows per source at most, before any audio is fetched")
    group.add_argument("--min-grade", type=int, default=None, help="OpenPecha: drop rows reviewed below this grade")
    group.add_argument("--dialect-map", default=None, metavar="RAW=LABEL,...|FILE.json",
                       help="map raw labels (OpenPecha dept, a dataset's accent column) to dialect labels")
    group.add_argument("--text-column", default=None, help="the column holding the transcript (default: guessed)")
    group.add_argument("--dialect-column", default=None, help="the column holding the dialect label (default: guessed)")
    group.add_argument("--dialects", default=None, metavar="A,B,...|any",
                       help="accepted dialect labels (default: utsang, amdo, kham and --dialect-map's labels for "
                            "Tibetan, any label otherwise); 'any' accepts every label the data has")


def data_options(args) -> dict:
    """load_examples keyword arguments from add_data_args' flags."""
    if args.max_rows is not None and args.max_rows < 1:
        raise SystemExit(f"error: --max-rows {args.max_rows}: must be a positive integer")
    dialects = args.dialects
    return dict(max_rows=args.max_rows, min_grade=args.min_grade, dialect_map=args.dialect_map,
                text_column=args.text_column, dialect_column=args.dialect_column,
                dialects=dialects if dialects in (None, "any") else [d.strip() for d in dialects.split(",") if d.strip()])


__all__ = ["Example", "DIALECTS", "DEPT_TO_DIALECT", "load_examples", "load_manifest", "parse_dialect_map",
           "SourceError", "DataError", "download", "fetch_all", "cache_path", "probe_hub"]
