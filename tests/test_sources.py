"""Sources + validation: every bad-row reason counted, strict mode, manifests, OpenPecha parquet with
audio served by a loopback HTTP server (cache, no re-download, resume), local HF parquet, offline fail-fast."""
import io
import json
import sys
import threading
import types
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from data.collate import SpeechDataset
from data.sources import (DEPT_TO_DIALECT, SourceError, cache_path, download, load_examples, parse_dialect_map,
                          probe_hub)
from data.validate import DataError

SR = 16000
GOOD_TEXT = "བཀྲ་ཤིས་བདེ་ལེགས།"


def tone(seconds, sr=SR, f=440.0):
    return (0.3 * np.sin(2 * np.pi * f * np.arange(int(seconds * sr)) / sr)).astype(np.float32)


def wav_bytes(wav, sr=SR):
    buf = io.BytesIO()
    sf.write(buf, wav, sr, format="WAV")
    return buf.getvalue()


@pytest.fixture
def bad_corpus(tmp_path):
    """A manifest with 3 good rows, one good-but-stereo-44.1k row, and one row per bad reason."""
    d = tmp_path / "corpus"
    (d / "clips").mkdir(parents=True)
    for name in ("u", "a", "k"):
        sf.write(d / "clips" / f"{name}.wav", tone(1.0), SR)
    t = np.arange(int(0.8 * 44100)) / 44100
    sf.write(d / "clips" / "stereo.wav", np.stack([np.sin(2 * np.pi * 300 * t)] * 2, 1) * 0.2, 44100)
    sf.write(d / "clips" / "silent.wav", np.zeros(SR, np.float32), SR)
    sf.write(d / "clips" / "empty.wav", np.zeros(0, np.float32), SR)
    sf.write(d / "clips" / "long.wav", tone(31.0, 8000), 8000, subtype="PCM_16")  # 31 s, small at 8 kHz
    nan = tone(1.0)
    nan[100:200] = np.nan
    sf.write(d / "clips" / "nan.wav", nan, SR, subtype="FLOAT")
    (d / "clips" / "garbage.wav").write_bytes(b"RIFF not really")
    rows = [
        ("good_u", "u.wav", GOOD_TEXT, "utsang"), ("good_a", "a.wav", GOOD_TEXT, "amdo"),
        ("good_k", "k.wav", "ཐུགས་རྗེ་ཆེ།", "kham"), ("stereo44k", "stereo.wav", GOOD_TEXT, "utsang"),
        ("silent", "silent.wav", GOOD_TEXT, "utsang"), ("empty", "empty.wav", GOOD_TEXT, "utsang"),
        ("long", "long.wav", GOOD_TEXT, "utsang"), ("nan", "nan.wav", GOOD_TEXT, "utsang"),
        ("garbage", "garbage.wav", GOOD_TEXT, "utsang"), ("missing", "nope.wav", GOOD_TEXT, "utsang"),
        ("notext", "u.wav", " ་ ", "utsang"), ("longtext", "u.wav", "བཀྲ་ཤིས་" * 120, "utsang"),
        ("baddialect", "u.wav", GOOD_TEXT, "lhasa_x"),
    ]
    with open(d / "train.jsonl", "w", encoding="utf-8") as f:
        for id_, audio, text, dialect in rows:
            f.write(json.dumps({"id": id_, "audio": f"clips/{audio}", "text": text, "dialect": dialect}) + "\n")
    return d


def test_every_bad_reason_counted_and_good_rows_kept(bad_corpus):
    good, report = load_examples(str(bad_corpus / "train.jsonl"), audio_check="full")
    assert [e.id for e in good] == ["good_u", "good_a", "good_k", "stereo44k"]
    assert dict(report.skipped) == {"silent": 1, "empty": 1, "too_long": 1, "non_finite": 1, "unreadable": 2,
                                    "empty_text": 1, "text_too_long": 1, "unknown_dialect": 1}
    assert report.total == 13 and report.kept == 4
    assert report.notes["resampled from 44100 Hz"] == 1 and report.notes["downmixed to mono"] == 1
    s = report.summary()
    assert "kept 4 of 13" in s and "audio silent (e.g. silent" in s and "'lhasa_x'" in s and "nope.wav" in s
    stereo = SpeechDataset(good)[3]
    assert stereo is not None and stereo["n_frames"] == 80  # 0.8 s, resampled to 16 kHz and downmixed
    assert good[3].duration == pytest.approx(0.8)
    with pytest.raises(DataError, match="strict: .*kept 4 of 13.*run without strict"):
        load_examples(str(bad_corpus / "train.jsonl"), strict=True, audio_check="full")


def test_header_check_defers_silence_and_nan_to_the_dataset(bad_corpus):
    good, report = load_examples(str(bad_corpus / "train.jsonl"))  # audio_check="header" (cheap)
    assert [e.id for e in good] == ["good_u", "good_a", "good_k", "stereo44k", "silent", "nan"]
    assert "silent" not in report.skipped and report.skipped["too_long"] == 1
    ds = SpeechDataset(good)
    assert [ds[i] is None for i in range(len(ds))] == [False] * 4 + [True, True]
    assert ds.failures == {"silent": 1, "non_finite": 1}


def test_csv_manifest_tibetan_voice_layout_and_dialect_map(tmp_path):
    (tmp_path / "wavs").mkdir()
    sf.write(tmp_path / "wavs" / "x.wav", tone(0.5), SR)
    (tmp_path / "train.tsv").write_text(f"path\tsentence\nx.wav\t{GOOD_TEXT}\n", encoding="utf-8")
    good, report = load_examples(str(tmp_path))  # tibetan_voice: TSV + audio folder, no dialect column
    assert [(e.audio.endswith("wavs/x.wav"), e.dialect, e.text) for e in good] == [(True, "utsang", GOOD_TEXT)]
    (tmp_path / "m.csv").write_text(f"audio,text,dialect\nwavs/x.wav,{GOOD_TEXT},STT_XX\n", encoding="utf-8")
    assert load_examples(str(tmp_path / "m.csv"))[1].skipped == {"unknown_dialect": 1}
    good, _ = load_examples(str(tmp_path / "m.csv"), dialect_map="STT_XX=kham")
    assert good[0].dialect == "kham"
    assert parse_dialect_map('{"A": "amdo"}') == {"A": "amdo"}
    with pytest.raises(ValueError, match="RAW=dialect"):
        parse_dialect_map("STT_MV")
    with pytest.raises(SourceError, match="not a known source"):
        load_examples("nonsense-spec")


def test_demo_spec_loads_build_demo_manifests(bad_corpus, monkeypatch):
    (bad_corpus / "test.jsonl").write_text(json.dumps(
        {"id": "t0", "audio": "clips/k.wav", "text": GOOD_TEXT, "dialect": "kham", "language": "bo",
         "duration": 1.0}) + "\n", encoding="utf-8")
    fake = types.ModuleType("data.synthetic")
    fake.build_demo = lambda *a, **k: str(bad_corpus)
    monkeypatch.setitem(sys.modules, "data.synthetic", fake)
    import data

    monkeypatch.setattr(data, "synthetic", fake, raising=False)
    good, report = load_examples("demo", "validation")  # validation/eval -> test.jsonl
    assert [e.id for e in good] == ["t0"] and report.kept == 1


# ---- OpenPecha schema, audio over loopback HTTP -----------------------------------------------------

class AudioServer:
    """Serves in-memory files, honours Range, counts hits, can cut the first response of a path short."""

    def __init__(self):
        self.files, self.hits, self.cut_once = {}, [], set()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                rng = self.headers.get("Range")
                server.hits.append((self.path, rng))
                data = server.files.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                start = int(rng.split("=")[1].split("-")[0]) if rng else 0
                self.send_response(206 if rng else 200)
                if rng:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.path in server.cut_once:  # a dropped connection half-way through the body
                    server.cut_once.discard(self.path)
                    body = body[:len(body) // 2]
                self.wfile.write(body)

            def log_message(self, *a):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture
def server():
    s = AudioServer()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


def openpecha_parquet(path, server):
    rows = []
    for i, (dept, grade) in enumerate([("STT_AB", 3), ("STT_AM", 3), ("KH_AB", 2), ("STT_NS", 0), ("KH", 3)]):
        server.files[f"/clips/{dept}_{i}.wav"] = wav_bytes(tone(0.6 + 0.1 * i))
        rows.append({"file_name": f"{dept}_{i}", "uni": GOOD_TEXT, "wylie": "bkra shis bde legs/",
                     "url": f"{server.url}/clips/{dept}_{i}.wav", "dept": dept, "grade": grade,
                     "char_len": len(GOOD_TEXT), "audio_len": 0.6 + 0.1 * i})
    rows.append({**rows[0], "file_name": "gone", "url": f"{server.url}/clips/gone.wav"})  # 404
    rows.append({**rows[0], "file_name": "too_long", "url": f"{server.url}/clips/long.wav", "audio_len": 42.0})
    pq.write_table(pa.Table.from_pylist(rows), path)


def test_openpecha_parquet_downloads_once_into_cache(tmp_path, server, capsys):
    openpecha_parquet(tmp_path / "op.parquet", server)
    cache = tmp_path / "cache"
    good, report = load_examples(f"openpecha:{tmp_path / 'op.parquet'}", cache_dir=cache, min_grade=2)
    out = capsys.readouterr().out  # a long fetch says what it does and how it ended
    assert "downloading 5 of 5 clips" in out and "fetched 4 clips" in out and "1 failed after retries" in out
    assert [(e.id, e.dialect) for e in good] == [("STT_AB_0", "utsang"), ("STT_AM_1", "amdo"),
                                                 ("KH_AB_2", "kham"), ("KH_4", "kham")]
    assert report.skipped == {"download_failed": 1, "too_long": 1} and report.notes["filtered below grade 2"] == 1
    assert "clips/gone.wav" in report.summary()
    for e in good:
        assert e.audio.startswith(str(cache)) and open(e.audio, "rb").read() == server.files[
            "/clips/" + e.id + ".wav"]
    assert not list(cache.glob("*.part"))
    assert "/clips/long.wav" not in {p for p, _ in server.hits}  # metadata said > 30 s: never fetched
    fetched = len([h for h in server.hits if h[0] != "/clips/gone.wav"])
    assert fetched == 4
    hits_before = len(server.hits)
    good2, _ = load_examples(f"openpecha:{tmp_path / 'op.parquet'}", cache_dir=cache, min_grade=2)
    assert [e.audio for e in good2] == [e.audio for e in good]
    assert [h for h in server.hits[hits_before:] if h[0] != "/clips/gone.wav"] == []  # nothing re-downloaded
    assert DEPT_TO_DIALECT["STT_AM"] == "amdo" and DEPT_TO_DIALECT["KH_AB"] == "kham"
    few, rep = load_examples(f"openpecha:{tmp_path / 'op.parquet'}", cache_dir=cache, max_rows=2)
    assert [e.id for e in few] == ["STT_AB_0", "STT_AM_1"] and rep.total == 2
    with pytest.raises(DataError, match="download failed"):
        load_examples(f"openpecha:{tmp_path / 'op.parquet'}", cache_dir=cache, strict=True)


def test_interrupted_download_resumes_with_range(tmp_path, server):
    data = wav_bytes(tone(2.0))
    server.files["/x.wav"] = data
    server.cut_once.add("/x.wav")
    dest = cache_path(f"{server.url}/x.wav", tmp_path)
    download(f"{server.url}/x.wav", dest, backoff=0.01)
    assert dest.read_bytes() == data
    assert server.hits == [("/x.wav", None), ("/x.wav", f"bytes={len(data) // 2}-")]
    # a .part left by a killed process is resumed, not restarted
    server.files["/y.wav"] = data
    dest = cache_path(f"{server.url}/y.wav", tmp_path)
    dest.with_name(dest.name + ".part").write_bytes(data[:1000])
    download(f"{server.url}/y.wav", dest)
    assert dest.read_bytes() == data and server.hits[-1] == ("/y.wav", "bytes=1000-")
    assert not dest.with_name(dest.name + ".part").exists()


# ---- any HF-style dataset from a local parquet directory ---------------------------------------------

def test_hf_local_parquet_with_audio_struct_column(tmp_path):
    d = tmp_path / "reazon"
    (d / "data").mkdir(parents=True)
    for split, n in (("train", 3), ("test", 1)):
        rows = [{"audio": {"bytes": wav_bytes(tone(0.5 + i / 10, 24000), 24000), "path": f"{split}{i}.wav"},
                 "transcription": "ﾃｽﾄ です", "accent": "kansai" if i else "kanto"} for i in range(n)]
        pq.write_table(pa.Table.from_pylist(rows), d / "data" / f"{split}-00000-of-00001.parquet")
    good, report = load_examples(f"hf:{d}", "train", language="ja")
    assert len(good) == 3 and report.kept == 3 and [e.dialect for e in good] == ["kanto", "kansai", "kansai"]
    assert isinstance(good[0].audio, np.ndarray) and good[0].audio.dtype == np.float32
    assert good[1].audio.size == int(0.6 * SR) and good[1].duration == pytest.approx(0.6)
    test, _ = load_examples(f"hf:{d}@test", "train", language="ja")  # @SPLIT wins
    assert len(test) == 1
    ds = SpeechDataset(good)
    assert ds[2]["n_frames"] == 70


def test_hf_load_from_disk_directory(tmp_path):
    datasets = pytest.importorskip("datasets", exc_type=ImportError)
    path = tmp_path / "clip.wav"
    sf.write(path, tone(0.5), SR)
    ds = datasets.Dataset.from_dict({"audio": [str(path)], "sentence": ["hello  world"]})
    ds = ds.cast_column("audio", datasets.Audio(decode=False))
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "saved"))
    good, report = load_examples(f"hf:{tmp_path / 'saved'}", language="en")
    assert report.kept == 1 and good[0].dialect == "en" and good[0].text == "hello  world"


def test_offline_hub_fails_fast_with_advice():
    with pytest.raises(SourceError, match="unreachable.*openpecha:/path/to/parquet_dir"):
        probe_hub("openpecha/stt-training-data", endpoint="http://127.0.0.1:9", timeout=2)
