"""The offline demo corpus: deterministic, follows the manifest contract, dialects differ, held-out
sentences, cached. Tiny corpora (3 dialects x 4 train + 2 test clips) keep this file to seconds."""
import json
import unicodedata

import numpy as np
import pytest
import soundfile as sf

from data import espeak, synthetic
from data.lexicon import DIALECTS, GLOSS, all_sentences, check_lexicon, pronounce, sentence_text

SMALL = dict(n_train=4, n_test=2, seed=3)
ROW_FIELDS = {"id", "audio", "text", "dialect", "language", "duration"}


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """The same small corpus built twice, into two different directories."""
    root = tmp_path_factory.mktemp("demo")
    return synthetic.build_demo(root / "a", **SMALL), synthetic.build_demo(root / "b", **SMALL)


def test_two_builds_are_byte_identical(corpora):
    a, b = corpora
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file() and p.name != "corpus.json")
    assert len([f for f in files if f.suffix == ".wav"]) == 3 * (4 + 2)
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file() and p.name != "corpus.json")
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f


def test_manifests_follow_the_contract(corpora):
    corpus = corpora[0]
    stamp = json.loads((corpus / "corpus.json").read_text())
    assert stamp["version"] == synthetic.VERSION and stamp["params"]["seed"] == 3
    total = 0.0
    for split, n in (("train", 4), ("test", 2)):
        rows = read_jsonl(corpus / f"{split}.jsonl")
        assert [r["dialect"] for r in rows].count("utsang") == n
        assert sorted({r["dialect"] for r in rows}) == sorted(DIALECTS) and len(rows) == 3 * n
        assert stamp["counts"][split] == {d: n for d in DIALECTS}
        for r in rows:
            assert set(r) == ROW_FIELDS and r["language"] == "bo"
            assert all("\u0f00" <= c <= "\u0fff" for c in r["text"]), r["text"]  # Tibetan script only
            info = sf.info(corpus / r["audio"])  # path relative to the manifest's directory
            assert (info.samplerate, info.channels, info.subtype, info.format) == (16000, 1, "PCM_16", "WAV")
            assert abs(info.frames / 16000 - r["duration"]) < 1e-3
            assert 1.0 <= r["duration"] <= 6.0
            audio, _ = sf.read(corpus / r["audio"], dtype="int16")
            assert np.abs(audio).max() > 3000  # speech, not silence
            total += r["duration"]
    assert stamp["total_seconds"] == pytest.approx(total, abs=0.01)
    assert len({r["id"] for s in ("train", "test") for r in read_jsonl(corpus / f"{s}.jsonl")}) == 18


def test_train_and_test_sentences_are_disjoint(corpora):
    rows = {s: read_jsonl(corpora[0] / f"{s}.jsonl") for s in ("train", "test")}
    assert not {r["text"] for r in rows["train"]} & {r["text"] for r in rows["test"]}
    # At the default size, across dialects: held-out combinations of words that training has seen.
    clips = synthetic.plan_corpus(300, 60, 0, DIALECTS)
    train = {c.words for c in clips if c.split == "train"}
    for d in DIALECTS:
        test = [c.words for c in clips if c.split == "test" and c.dialect == d]
        vocab = {w for c in clips if c.split == "train" and c.dialect == d for w in c.words}
        assert len(set(test)) == 60 and not set(test) & train
        assert all(w in vocab for s in test for w in s)


def test_each_dialect_pronounces_the_same_sentence_differently():
    words = ("ངས", "ཇ", "འཐུང", "གི་ཡོད")  # "I am drinking tea"
    ipa = {d: synthetic.sentence_ipa(words, d) for d in DIALECTS}
    assert len(set(ipa.values())) == 3, ipa
    assert unicodedata.normalize("NFC", ipa["amdo"]) == unicodedata.normalize("NFC", "ŋe ʈ͡ʂa ŋtʰõŋ ki.jol")
    assert "˥" in ipa["utsang"] and "˥" not in ipa["amdo"]
    # Systematic, not incidental: most words, and nearly all sentences, differ between every pair.
    sentences = all_sentences()
    for d1, d2 in (("utsang", "amdo"), ("utsang", "kham"), ("amdo", "kham")):
        same_words = sum(pronounce(w, d1) == pronounce(w, d2) for w in GLOSS)
        same_sentences = sum(synthetic.sentence_ipa(s, d1) == synthetic.sentence_ipa(s, d2) for s in sentences)
        assert same_words < 0.3 * len(GLOSS) and same_sentences < 0.02 * len(sentences), (d1, d2)
    # The audio differs too, with the speaker held fixed.
    clips = [synthetic.Clip("x", "test", d, words, "hi+m3", 160, 50, 50) for d in DIALECTS]
    with espeak.SynthPool(1) as pool:
        audio = [synthetic._render(c, pool, synthetic._Resampler())[0].astype(float) for c in clips]
    for i in range(3):
        for j in range(i + 1, 3):
            n = min(len(audio[i]), len(audio[j]))
            diff = np.abs(audio[i][:n] - audio[j][:n]).mean() / np.abs(audio[i][:n]).mean()
            assert diff > 0.5, (DIALECTS[i], DIALECTS[j], diff)


def test_lexicon_is_small_pronounceable_and_speakable():
    n_words = check_lexicon()
    assert 60 <= n_words <= 150
    sentences = all_sentences()
    assert len(set(sentences)) == len(sentences) > 1000 and all(2 <= len(s) <= 6 for s in sentences)
    for w in {w for s in sentences for w in s}:
        for d in DIALECTS:
            assert synthetic.espeak_word(w, d)
    assert sentence_text(("ང", "ཇ")) == unicodedata.normalize("NFC", "ང་ཇ")


def test_cache_returns_without_rebuilding(corpora, tmp_path, monkeypatch):
    corpus = corpora[0]
    mtime = (corpus / "corpus.json").stat().st_mtime_ns
    assert synthetic.build_demo(corpus, **SMALL) == corpus
    assert (corpus / "corpus.json").stat().st_mtime_ns == mtime
    with pytest.raises(FileExistsError):  # same directory, other parameters: refuse, don't overwrite
        synthetic.build_demo(corpus, n_train=5, n_test=2, seed=3)
    # Default location: $WHISPER_FT_CACHE/demo-<hash of version and parameters>.
    monkeypatch.setenv("WHISPER_FT_CACHE", str(tmp_path))
    built = synthetic.build_demo(n_train=1, n_test=1, dialects=("kham",))
    assert built.parent == tmp_path and built.name.startswith("demo-")
    mtime = (built / "corpus.json").stat().st_mtime_ns
    assert synthetic.build_demo(n_train=1, n_test=1, dialects=("kham",)) == built
    assert (built / "corpus.json").stat().st_mtime_ns == mtime
    assert synthetic.build_demo(n_train=1, n_test=1, dialects=("amdo",)) != built


def test_interrupted_build_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    def fail(tmp, clips, workers):
        tmp.mkdir()
        (tmp / "train.jsonl").write_text("half\n")
        raise KeyboardInterrupt

    monkeypatch.setattr(synthetic, "_write_clips", fail)
    with pytest.raises(KeyboardInterrupt):
        synthetic.build_demo(tmp_path / "demo", n_train=1, n_test=1)
    assert list(tmp_path.iterdir()) == []


def test_cli_reports_size_and_duration(corpora, capsys):
    synthetic.main(["--out", str(corpora[0]), "--n-train", "4", "--n-test", "2", "--seed", "3"])
    out = capsys.readouterr().out
    assert "18 clips" in out and "min of audio" in out and "MB" in out
