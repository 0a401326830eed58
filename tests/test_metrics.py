"""Metric values checked by hand; botok WER with a tiny local dictionary; WER n/a when offline."""
import socket

import pytest
import tibetan_wer

from scoring import metrics
from scoring.metrics import aggregate, score_corpus, score_utterance
from whisper_ft.text import language_code, normalize_for_scoring

# ང་བོད་པ་ཡིན། ("I am Tibetan"): 12 code points ང ་ བ ོ ད ་ པ ་ ཡ ི ན །, 4 syllables ང|བོད|པ|ཡིན
REF1, HYP1 = "ང་བོད་པ་ཡིན།", "ང་བོད་བ་ཡིན།"  # one letter substituted: 1 char, 1 syllable error
# བཀྲ་ཤིས་བདེ་ལེགས།: 17 code points (བ ཀ ྲ ་ ཤ ི ས ་ བ ད ེ ་ ལ ེ ག ས །), 4 syllables
REF2, HYP2 = "བཀྲ་ཤིས་བདེ་ལེགས།", "བཀྲ་ཤིས་"  # hyp normalises to བཀྲ་ཤིས (7): 10 deletions, 2 syllables


def test_tibetan_normalisation_keeps_the_script():
    assert normalize_for_scoring(" བོད་ སྐད༌ ", "bo") == "བོད་སྐད"  # space at tsheg, tsek bstar, ends
    assert normalize_for_scoring("ཀ་་ཁ  ག", "bo") == "ཀ་ཁ ག"  # doubled tsheg, whitespace run
    # NFC: U+0F73 (vowel sign II) is canonically U+0F71 U+0F72
    assert normalize_for_scoring("ཀ\u0f73", "bo") == normalize_for_scoring("ཀ\u0f71\u0f72", "bo")
    assert normalize_for_scoring(REF2, "Tibetan") == REF2  # vowels and subjoined letters survive
    # what BasicTextNormalizer would do: vowel signs and subjoined letters are Unicode marks
    from whisper.normalizers import BasicTextNormalizer
    assert BasicTextNormalizer()(REF2) != REF2


def test_tibetan_cer_ser_by_hand():
    u1 = score_utterance(REF1, HYP1, "bo", offline=True)
    assert (u1["errors"], u1["ref_chars"], u1["syl_errors"], u1["ref_syllables"]) == (1, 12, 1, 4)
    assert u1["cer"] == pytest.approx(1 / 12) and u1["ser"] == pytest.approx(1 / 4)
    u2 = score_utterance(REF2, HYP2, "bo", offline=True)
    assert (u2["errors"], u2["ref_chars"], u2["syl_errors"], u2["ref_syllables"]) == (10, 17, 2, 4)
    c = score_corpus([REF1, REF2], [HYP1, HYP2], "bo", offline=True)
    assert c["n"] == 2
    assert c["cer_micro"] == pytest.approx(11 / 29)  # 0.3793: (1 + 10) / (12 + 17)
    assert c["cer_macro"] == pytest.approx((1 / 12 + 10 / 17) / 2)  # 0.3358
    assert c["ser_micro"] == pytest.approx(3 / 8) and c["ser_macro"] == pytest.approx(0.375)
    assert c["cer"] == c["cer_micro"] and c["ser"] == c["ser_macro"]  # HEADLINE for Tibetan


def test_tibetan_rates_are_tibetan_wer_rates():
    refs, hyps = [REF1, REF2, "ཀ་ཁ"], [HYP1, HYP2, "ཀ་ཁ་ག་ང"]
    c = score_corpus(refs, hyps, "bo", offline=True)
    norm_r = [normalize_for_scoring(t, "bo") for t in refs]
    norm_h = [normalize_for_scoring(t, "bo") for t in hyps]
    cer = tibetan_wer.cer(norm_h, norm_r)  # (predictions, references)
    ser = tibetan_wer.ser(norm_h, norm_r)
    assert c["cer_micro"] == pytest.approx(cer["micro_cer"]) and c["cer_macro"] == pytest.approx(cer["macro_cer"])
    assert c["ser_micro"] == pytest.approx(ser["micro_ser"]) and c["ser_macro"] == pytest.approx(ser["macro_ser"])


def test_empty_reference_counts_insertions_in_micro_only():
    c = score_corpus([REF1, ""], [REF1, "ཀ"], "bo", offline=True)
    assert c["utterances"][1]["cer"] is None
    assert c["cer_micro"] == pytest.approx(1 / 12)  # the inserted letter over 12 reference chars
    assert c["cer_macro"] == 0.0  # the empty reference has no rate


def test_japanese_cer_by_hand_and_wer_not_applicable():
    # 今日は、いい天気です。 -> 今日はいい天気です (9); hyp -> 今日はいい天気でした (10)
    # す->し substitution + inserted た = 2 edits / 9
    u = score_utterance("今日は、いい天気です。", "今日は いい天気でした", "ja")
    assert (u["errors"], u["ref_chars"]) == (2, 9)
    assert u["cer"] == pytest.approx(2 / 9)
    assert u["wer"] is None and u["wer_note"].startswith("n/a:")
    assert score_utterance("ＡＢＣ１２３、ｶﾀｶﾅ", "ABC123カタカナ", "ja")["cer"] == 0.0  # NFKC
    c = score_corpus(["今日は、いい天気です。"], ["今日は いい天気でした"], "ja")
    assert c["wer"] is None and c["wer_note"].startswith("n/a:") and c["ser"] is None


def test_english_wer_cer_by_hand():
    u = score_utterance("The cat sat on the mat.", "the cat sit on mat", "en")
    assert (u["word_errors"], u["ref_words"]) == (2, 6)  # sat->sit, "the" deleted
    assert u["wer"] == pytest.approx(2 / 6)
    # characters of "the cat sat on the mat" (22) vs "the cat sit on mat" (18): a->i, "the " deleted
    assert (u["errors"], u["ref_chars"]) == (5, 22)
    assert score_utterance("It's fine", "it is fine", "en")["wer"] == 0.0  # EnglishTextNormalizer


def test_unknown_language_is_named():
    with pytest.raises(ValueError, match="klingon"):
        score_utterance("a", "a", "klingon")
    assert language_code("bo-amdo") == "bo"


def _rec(dialect, ce, rc, se, rs, we=None, rw=None):
    rate = lambda e, n: None if e is None else e / n  # noqa: E731
    return {"dialect": dialect, "language": "bo", "char_errors": ce, "ref_chars": rc, "cer": rate(ce, rc),
            "syl_errors": se, "ref_syllables": rs, "ser": rate(se, rs), "word_errors": we, "ref_words": rw,
            "wer": rate(we, rw), "wer_note": None if we is not None else "n/a: test"}


def test_aggregate_micro_and_macro_by_dialect():
    table = [_rec("utsang", 1, 10, 1, 4, 1, 2), _rec("utsang", 3, 30, 2, 8, 2, 4),
             _rec("amdo", 10, 20, 2, 5, 3, 3)]
    out = aggregate(table)
    u, a = out["utsang"], out["amdo"]
    assert u["n"] == 2 and a["n"] == 1
    assert u["cer_micro"] == pytest.approx(4 / 40)  # 0.100
    assert u["cer_macro"] == pytest.approx((0.1 + 0.1) / 2)  # 0.100
    assert u["ser_micro"] == pytest.approx(3 / 12)  # 0.250
    assert u["ser_macro"] == pytest.approx((0.25 + 0.25) / 2)
    assert u["wer_micro"] == pytest.approx(3 / 6) and u["wer_macro"] == pytest.approx(0.5)
    assert a["cer"] == pytest.approx(0.5) and a["wer"] == pytest.approx(1.0)
    pooled = out["_micro"]
    assert pooled["n"] == 3
    assert pooled["cer_micro"] == pytest.approx(14 / 60)  # 0.2333 pooled edits / pooled chars
    assert pooled["cer_macro"] == pytest.approx((0.1 + 0.1 + 0.5) / 3)  # 0.2333 as well, by chance
    assert pooled["ser_micro"] == pytest.approx(5 / 17)  # 0.2941
    assert pooled["ser_macro"] == pytest.approx((0.25 + 0.25 + 0.4) / 3)  # 0.3
    balanced = out["_macro"]
    assert balanced["groups"] == 2
    assert balanced["cer"] == pytest.approx((0.1 + 0.5) / 2)  # 0.3: each dialect weighs the same
    assert balanced["ser"] == pytest.approx((0.25 + 0.4) / 2)  # 0.325 (headline SER is macro)
    assert balanced["wer"] == pytest.approx((0.5 + 1.0) / 2)


def test_aggregate_reports_wer_na_when_a_dialect_has_none():
    out = aggregate([_rec("utsang", 1, 10, 1, 4, 1, 2), _rec("kham", 1, 10, 1, 4)])
    assert out["kham"]["wer"] is None and out["kham"]["wer_note"] == "n/a: test"
    assert out["_macro"]["wer"] is None and out["_macro"]["wer_note"] == "n/a: test"
    with pytest.raises(ValueError, match="dialect"):
        aggregate([{"language": "bo"}])


def test_aggregate_of_score_corpus_utterances_equals_score_corpus():
    c = score_corpus([REF1, REF2], [HYP1, HYP2], "bo", offline=True)
    recs = [dict(r, dialect="utsang") for r in c["utterances"]]
    got = aggregate(recs)["utsang"]
    for key in ("cer", "cer_micro", "cer_macro", "ser", "ser_micro", "ser_macro"):
        assert got[key] == pytest.approx(c[key])


@pytest.fixture
def no_network(monkeypatch):
    """Fail the test if anything tries the network (botok's downloader or a socket connect)."""
    import botok.config

    def refuse(*a, **k):
        raise AssertionError("network was used")

    monkeypatch.setattr(botok.config.requests, "get", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def no_default_dictionary(monkeypatch, tmp_path):
    import botok.config

    monkeypatch.setattr(botok.config, "DEFAULT_BASE_PATH", tmp_path / "no-pybo")
    monkeypatch.delenv(metrics.BOTOK_DICT_ENV, raising=False)
    for var in metrics.OFFLINE_ENV:
        monkeypatch.delenv(var, raising=False)


def test_wer_na_with_reason_when_offline(no_network, no_default_dictionary, monkeypatch):
    c = score_corpus([REF1], [HYP1], "bo", offline=True)
    assert c["wer"] is None and c["wer_micro"] is None
    assert c["wer_note"].startswith("n/a:") and "offline" in c["wer_note"]
    assert c["cer"] == pytest.approx(1 / 12)  # the other metrics are unaffected
    monkeypatch.setenv("WHISPER_FT_OFFLINE", "1")  # the environment switch, without the argument
    assert "offline" in score_corpus([REF1], [HYP1], "bo")["wer_note"]
    monkeypatch.delenv("WHISPER_FT_OFFLINE")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert "offline" in score_corpus([REF1], [HYP1], "bo")["wer_note"]


def test_wer_na_quickly_when_the_download_host_is_unreachable(no_default_dictionary, monkeypatch):
    import botok.config

    def unreachable(*a, **k):
        raise OSError("simulated: no route to host")

    def botok_download(*a, **k):
        raise AssertionError("botok's own downloader must not run when the probe failed")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    monkeypatch.setattr(botok.config.requests, "get", botok_download)
    c = score_corpus([REF1], [HYP1], "bo", offline=False)
    assert c["wer"] is None and "cannot download" in c["wer_note"] and "simulated" in c["wer_note"]


def test_wer_na_names_a_missing_local_dictionary(no_network, tmp_path):
    c = score_corpus([REF1], [HYP1], "bo", botok_dict=tmp_path / "nowhere")
    assert c["wer"] is None and str(tmp_path / "nowhere") in c["wer_note"]


def make_pack(root):
    """A minimal botok dialect pack: three dictionary words, no adjustments."""
    pack = root / "general"
    (pack / "dictionary" / "words").mkdir(parents=True)
    (pack / "adjustments").mkdir()
    words = ["བཀྲ་ཤིས", "བདེ་ལེགས", "བོད་པ"]
    (pack / "dictionary" / "words" / "test.tsv").write_text(
        "".join(f"{w}\tNOUN\t\t\t10\n" for w in words), encoding="utf-8")
    return pack


def test_botok_wer_with_a_local_dictionary_matches_tibetan_wer(no_network, tmp_path, monkeypatch):
    pack = make_pack(tmp_path)
    refs, hyps = [REF1, REF2], [HYP1, HYP2]
    c = score_corpus(refs, hyps, "bo", botok_dict=pack)
    assert c["wer"] is not None and c["wer_note"] is None
    # the dictionary's words: བཀྲ་ཤིས་|བདེ་ལེགས་|'' (botok emits the shad as an empty token, kept as
    # tibetan_wer keeps it) against the one word བཀྲ་ཤིས་: 2 deletions / 3 words
    assert (c["utterances"][1]["word_errors"], c["utterances"][1]["ref_words"]) == (2, 3)
    # the same numbers as tibetan_wer.wer itself when its module-level botok uses the same pack
    import botok
    from tibetan_wer import segmentation

    monkeypatch.setattr(segmentation, "_botok_tokenizer",
                        botok.WordTokenizer(config=botok.Config.from_path(pack)))
    norm = lambda ts: [normalize_for_scoring(t, "bo") for t in ts]  # noqa: E731
    ref = tibetan_wer.wer(norm(hyps), norm(refs))  # (predictions, references)
    assert c["wer_macro"] == pytest.approx(ref["macro_wer"]) and c["wer"] == c["wer_macro"]
    assert c["wer_micro"] == pytest.approx(ref["micro_wer"])
    # a folder holding general/ works too, and so does the environment variable
    assert score_corpus(refs, hyps, "bo", botok_dict=tmp_path)["wer"] == c["wer"]
    metrics._TOKENIZERS.clear()
    monkeypatch.setenv(metrics.BOTOK_DICT_ENV, str(pack))
    assert score_corpus(refs, hyps, "bo", offline=True)["wer"] == c["wer"]


def test_a_given_word_tokenizer_is_used_as_is():
    class Spaces:  # botok-like: tokens as dicts with text_cleaned
        def tokenize(self, text):
            return [{"text_cleaned": w} for w in text.split("་")]

    u = score_utterance(REF1, HYP1, "bo", word_tokenizer=Spaces())
    assert (u["word_errors"], u["ref_words"]) == (1, 4)  # ང|བོད|པ|ཡིན། vs ང|བོད|བ|ཡིན།
