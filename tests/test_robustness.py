"""NPRR robustness: perturbations do what they claim, metrics on hand-made lists with known values, oracle
error rates by hand, reorder invariance of the rescoring, and `measure` end to end on a tiny model."""
import json
import random

import pytest
import torch

from conftest import make_tiny_model
from data.collate import Batch
from whisper_ft.decoding import audio_features_for, score_hypotheses
from research.robustness import (PERTURBATIONS, drop_unit, join_units, kendall_tau, measure, near_duplicate,
                                   perturb_list, rescore, robustness_metrics, score_records, spearman,
                                   split_units, summarize, swap_units)

BO = "བོད་ཡིག་སྐད་ལྷ་ཀ"  # five different syllables
TEXTS = {"bo": BO, "en": "the quick brown fox jumps", "ja": "日本語の音声"}


# --- units ------------------------------------------------------------------------------------------------

def test_split_units_per_language():
    assert split_units("ཀ་ཁ། ག་", "bo") == (["", "་", "། ", "་"], ["ཀ", "ཁ", "ག"])
    assert split_units(" a  bc ", "en") == ([" ", "  ", " "], ["a", "bc"])
    assert split_units("日本 語", "ja") == (["", "", " ", ""], ["日", "本", "語"])
    for lang, text in TEXTS.items():
        assert join_units(*split_units(text, lang)) == text


# --- perturbations ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("lang", sorted(TEXTS))
def test_swap_exchanges_exactly_two_adjacent_units(lang):
    delims, units = split_units(TEXTS[lang], lang)
    seen = set()
    for seed in range(20):
        out = swap_units(TEXTS[lang], random.Random(seed), lang)
        d2, u2 = split_units(out, lang)
        assert d2 == delims
        diff = [j for j in range(len(units)) if u2[j] != units[j]]
        assert len(diff) == 2 and diff[1] == diff[0] + 1
        j = diff[0]
        assert (u2[j], u2[j + 1]) == (units[j + 1], units[j])
        assert out == swap_units(TEXTS[lang], random.Random(seed), lang)  # deterministic by seed
        seen.add(j)
    assert len(seen) > 1  # the pair is drawn, not fixed


def test_swap_skips_equal_neighbours_and_leaves_unswappable_text():
    assert swap_units("ཀ་ཀ་ཁ", random.Random(0), "bo") == "ཀ་ཁ་ཀ"  # the only differing pair
    assert swap_units("ཀ་ཀ", random.Random(0), "bo") == "ཀ་ཀ"
    assert swap_units("ཀ", random.Random(0), "bo") == "ཀ"


@pytest.mark.parametrize("lang", sorted(TEXTS))
def test_drop_removes_exactly_one_unit(lang):
    delims, units = split_units(TEXTS[lang], lang)
    dropped = set()
    for seed in range(20):
        out = drop_unit(TEXTS[lang], random.Random(seed), lang)
        d2, u2 = split_units(out, lang)
        assert len(u2) == len(units) - 1 and len(d2) == len(delims) - 1
        js = [j for j in range(len(units)) if units[:j] + units[j + 1:] == u2]
        assert js
        dropped.add(js[0])
        assert out == drop_unit(TEXTS[lang], random.Random(seed), lang)
    assert len(dropped) > 1


def test_drop_keeps_delimiters_around_the_rest():
    # the last unit takes the delimiter before it; others the one after; end delimiters stay
    assert {drop_unit("ཀ་ཁ་ག་", random.Random(s), "bo") for s in range(30)} == {"ཁ་ག་", "ཀ་ག་", "ཀ་ཁ་"}
    assert drop_unit("ཀ", random.Random(0), "bo") == "ཀ"


def test_near_duplicate_is_one_character_edit():
    for seed in range(10):
        out = near_duplicate(BO, random.Random(seed), "bo")
        assert len(out) == len(BO) - 1  # one code point of a multi-character syllable deleted
        assert any(BO[:k] + BO[k + 1:] == out for k in range(len(BO)))
        assert out.count("་") == BO.count("་")  # never a delimiter
    ja = near_duplicate("日本", random.Random(0), "ja")  # single-character units: one is doubled
    assert ja in ("日日本", "日本本")
    assert near_duplicate("", random.Random(0), "bo") == ""


def test_perturb_list_inject_and_reorder():
    texts = ["ཀ་ཁ", "ག", "བོད་ཡིག"]
    inj = perturb_list(texts, "inject", random.Random(3), "bo")
    assert inj.texts[:3] == texts and inj.source == [0, 1, 2, 0, 1, 2]
    assert all(t != texts[s] for t, s in zip(inj.texts[3:], inj.source[3:]))
    assert perturb_list([""], "inject", random.Random(0), "bo").texts == [""]
    for seed in range(10):
        re_ = perturb_list(texts, "reorder", random.Random(seed), "bo")
        assert sorted(re_.source) == [0, 1, 2] and re_.source != [0, 1, 2]
        assert re_.texts == [texts[i] for i in re_.source]
        assert re_ == perturb_list(texts, "reorder", random.Random(seed), "bo")
    sw = perturb_list(texts, "swap", random.Random(0), "bo")
    assert sw.texts == ["ཁ་ཀ", "ག", "ཡིག་བོད"] and sw.source == [0, 1, 2]
    with pytest.raises(ValueError, match="unknown perturbation"):
        perturb_list(texts, "shuffle", random.Random(0), "bo")


# --- metrics on hand-made score vectors ---------------------------------------------------------------------

S = [3.0, 2.0, 1.0, 0.0, -1.0]


def test_identical_ranking():
    m = robustness_metrics(S, [v - 5 for v in S])
    assert (m["top1"], m["rank_of_best"], m["kendall_tau"], m["spearman"]) == (1.0, 0, 1.0, 1.0)
    assert m["prefer_original"] == 1.0  # every perturbed score is lower


def test_reversed_ranking():
    m = robustness_metrics(S, S[::-1])
    assert (m["top1"], m["rank_of_best"], m["kendall_tau"], m["spearman"]) == (0.0, 4, -1.0, -1.0)


def test_known_swaps():
    top = robustness_metrics(S, [2.0, 3.0, 1.0, 0.0, -1.0])  # the best two exchange places
    assert top["top1"] == 0.0 and top["rank_of_best"] == 1
    assert top["kendall_tau"] == pytest.approx(0.8)  # 1 discordant pair of 10
    assert top["spearman"] == pytest.approx(0.9)  # 1 - 6 * 2 / (5 * 24)
    bottom = robustness_metrics(S, [3.0, 2.0, 1.0, -1.0, 0.0])  # the worst two exchange: best stays
    assert bottom["top1"] == 1.0 and bottom["kendall_tau"] == pytest.approx(0.8)


def test_ties():
    assert kendall_tau([1, 2, 3], [1, 1, 2]) == pytest.approx(2 / 6 ** 0.5)  # tau-b
    assert spearman([1, 2, 3], [1, 1, 2]) == pytest.approx(0.8660254)
    assert kendall_tau([1, 2], [5, 5]) is None and spearman([1], [1]) is None
    tied = robustness_metrics([0.0, -1.0], [-2.0, -2.0])
    assert tied["top1"] == 1.0 and tied["kendall_tau"] is None  # a tie with the maximum is kept


def test_inject_keeps_the_original_best_itself():
    # originals [0, -1] stay unchanged in the list; near-duplicates score -0.5 (of h0) and 0.5 (of h1)
    m = robustness_metrics([0.0, -1.0], [0.0, -1.0, -0.5, 0.5], source=[0, 1, 0, 1],
                           changed=[False, False, True, True])
    assert m["top1"] == 0.0 and m["rank_of_best"] == 1 and m["top"] == 3
    assert m["kendall_tau"] == -1.0  # the near-duplicates rank opposite to their originals
    assert m["prefer_original"] == 0.5 and m["score_drift"] == 0.0
    ok = robustness_metrics([0.0, -1.0], [0.0, -1.0, -0.5, -2.0], [0, 1, 0, 1], [False, False, True, True])
    assert ok["top1"] == 1.0 and ok["kendall_tau"] == 1.0 and ok["prefer_original"] == 1.0


def test_reorder_maps_back_through_source():
    m = robustness_metrics(S, [S[2], S[0], S[4], S[1], S[3]], source=[2, 0, 4, 1, 3], changed=[False] * 5)
    assert (m["top1"], m["kendall_tau"], m["score_drift"], m["top"]) == (1.0, 1.0, 0.0, 1)
    assert robustness_metrics([1.0], [0.5])["top1"] is None  # nothing to stay on top of
    with pytest.raises(ValueError, match="no entry"):
        robustness_metrics([1.0, 2.0], [1.0], source=[0])


# --- oracle error rates on hand-made lists --------------------------------------------------------------------

def hand_record(ref, texts, dialect="a", language="en", best=0):
    return {"id": ref, "dialect": dialect, "language": language, "ref": ref, "texts": texts, "best": best,
            "perturbations": {}}


def test_oracle_cer_and_wer_by_hand():
    recs = [hand_record("the cat sat", ["the bat sat", "a cat sat", "the cat sat"]),
            hand_record("abc def", ["xyz", "abd def"], best=1)]
    score_records(recs, "en", offline=True)
    assert [r["oracle_cer_index"] for r in recs] == [2, 1]
    assert [e["char_errors"] for e in recs[1]["hyp_errors"]] == [7, 1]
    s = summarize(recs)["a"]
    assert s["cer_1best"] == pytest.approx((1 + 7) / (11 + 7))
    assert s["cer_oracle"] == pytest.approx((0 + 1) / (11 + 7))
    assert s["cer_rescored"] == pytest.approx((1 + 1) / 18)  # best = 0 and 1
    assert s["wer_1best"] == pytest.approx((1 + 2) / (3 + 2))
    assert s["wer_oracle"] == pytest.approx((0 + 1) / 5)


def test_oracle_tibetan_and_japanese():
    bo = [hand_record("ཀ་ཁ་ག", ["ཀ་ཁ་ཀ", "ཀ་ཁ་ག"], language="bo")]
    score_records(bo, "bo", offline=True)
    s = summarize(bo)["a"]
    assert s["cer_oracle"] == 0.0 and s["cer_1best"] == pytest.approx(1 / 5)  # 5 code points
    ja = [hand_record("日本語", ["日本", "本語", "日本語"], language="ja")]
    score_records(ja, "ja", offline=True)
    s = summarize(ja)["a"]
    assert s["cer_oracle"] == 0.0 and s["cer_1best"] == pytest.approx(1 / 3) and s["wer_oracle"] is None


# --- the model side -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model():
    return make_tiny_model(0)


def rand_mel(n, frames=200, seed=0):
    return torch.randn(n, 80, frames, generator=torch.Generator().manual_seed(seed))


def test_rescore_is_score_hypotheses_and_reorder_changes_nothing(model, tokenizer):
    texts = ["བོད་ཡིག", "ཀ་ཁ་ག", "ལྷ", "སྐད་ཀ་ཁ་ང"]
    xa = audio_features_for(model, rand_mel(2))
    lists = [texts, texts[::-1][:3]]
    sums = rescore(model, xa, tokenizer, lists, length_norm=False)
    assert sums == score_hypotheses(model, xa, tokenizer, [[tokenizer.encode(t) for t in l] for l in lists])
    special = rescore(model, xa[:1], tokenizer, [["<|notimestamps|>ཀ"]], length_norm=False)
    seq = [tokenizer.no_timestamps] + tokenizer.encode("ཀ")
    assert special == score_hypotheses(model, xa[:1], tokenizer, [[seq]])
    means = rescore(model, xa, tokenizer, lists)
    assert means[0][1] == pytest.approx(sums[0][1] / (len(tokenizer.encode(texts[1])) + 1))
    for seed in range(3):
        perm = [perturb_list(l, "reorder", random.Random(seed), "bo") for l in lists]
        again = rescore(model, xa, tokenizer, [p.texts for p in perm])
        for b, p in enumerate(perm):
            assert p.source != list(range(len(lists[b])))
            for j, i in enumerate(p.source):
                assert again[b][j] == pytest.approx(means[b][i], abs=1e-5)
            m = robustness_metrics(means[b], again[b], p.source, [False] * len(p.texts))
            assert m["top1"] == 1.0 and m["kendall_tau"] == pytest.approx(1.0) and m["score_drift"] < 1e-5


def make_batch(ids, dialect, seed):
    mel = rand_mel(len(ids), seed=seed)
    n = len(ids)
    return Batch(mel=mel, n_frames=torch.full((n,), 200), decoder_input=torch.zeros(n, 1, dtype=torch.long),
                 targets=torch.zeros(n, 1, dtype=torch.long), dialects=[dialect] * n,
                 texts=["བོད་ཡིག་སྐད"] * n, ids=ids)


def test_measure_end_to_end(model, tokenizer):
    batches = [("amdo", make_batch(["a1", "a2"], "amdo", 1)), ("kham", make_batch(["k1"], "kham", 2))]
    kw = dict(language="bo", nbest=3, beam_size=3, max_tokens=6, seed=0, offline=True)
    recs = measure(model, batches, tokenizer, **kw)
    assert [r["id"] for r in recs] == ["a1", "a2", "k1"]
    assert [r["dialect"] for r in recs] == ["amdo", "amdo", "kham"]
    for r in recs:
        n = len(r["texts"])
        assert 1 <= n <= 3 and len(set(r["texts"])) == n
        assert len(r["scores"]) == n == len(r["hyp_errors"]) == len(r["decode_logprob"])
        assert r["best"] == max(range(n), key=lambda i: r["scores"][i])
        assert set(r["perturbations"]) == set(PERTURBATIONS)
        for kind, p in r["perturbations"].items():
            assert len(p["texts"]) == len(p["scores"]) == len(p["source"])
            assert p["pick_ref_chars"] == r["hyp_errors"][0]["ref_chars"] > 0
            if kind in ("swap", "drop", "reorder"):
                assert len(p["texts"]) == n
        re_ = r["perturbations"]["reorder"]
        assert re_["score_drift"] < 1e-5
        if n >= 2:
            assert re_["top1"] == 1.0 and re_["kendall_tau"] == pytest.approx(1.0)
    json.dumps(recs)  # results.json-ready
    assert measure(model, batches, tokenizer, **kw) == recs  # deterministic by seed

    summary = summarize(recs)
    assert set(summary) == {"amdo", "kham", "_micro", "_macro"}
    assert summary["amdo"]["n"] == 2 and summary["_macro"]["groups"] == 2 and summary["_macro"]["n"] == 3
    for g in ("amdo", "kham", "_micro", "_macro"):
        s = summary[g]
        assert 0 <= s["cer_oracle"] <= s["cer_1best"] + 1e-12
        assert set(PERTURBATIONS) <= set(s)
        assert s["reorder"]["score_drift"] < 1e-5
    json.dumps(summary)
    with pytest.raises(ValueError, match="unknown perturbation"):
        measure(model, batches, tokenizer, language="bo", perturbations=("nope",))
