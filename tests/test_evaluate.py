"""evaluate.py on tiny dims: routing uses the right adapter, the table files agree, bad input is named, not fatal."""
import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

import evaluate
from conftest import make_corpus, make_tiny_model
from lora.adapters import save_adapter
from lora.inject import add_lora, lora_modules
from scoring.metrics import term_recall
from scoring.metrics import score_utterance
from whisper_ft.models import export_openai, fingerprint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--audio-ctx", "auto", "--batch-size", "4"]


def _model(seed=0):
    """A tiny model whose output depends on its weights: with conftest's N(0, 1) token embeddings the tied
    output layer just repeats the last prompt token (<|notimestamps|>) whatever the adapter or the seed."""
    model = make_tiny_model(seed)
    with torch.no_grad():
        model.decoder.token_embedding.weight.mul_(0.1)
    return model


def _adapter(model, name, path, seed):
    """An adapter whose B is nonzero (so it changes the output), saved against the bare base's fingerprint."""
    fp = fingerprint(model)
    add_lora(model, name, targets="qv", r=4, alpha=8)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model, name).values():
            m.lora_B[name].copy_(torch.randn(m.lora_B[name].shape, generator=g) * 0.5)
    save_adapter(model, path, name, base_fingerprint=fp)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval")
    export_openai(_model(), d / "tiny.pt")
    export_openai(_model(seed=1), d / "full.pt")  # a "fine-tuned" checkpoint: other weights
    export_openai(_model(), d / "ft_run" / "model.pt")  # a train.py run dir, same weights as the base
    _adapter(_model(), "amdo", d / "amdo.safetensors", seed=1)
    _adapter(_model(), "kham", d / "kham.safetensors", seed=2)
    _adapter(_model(seed=3), "amdo", d / "other_base.safetensors", seed=1)
    make_corpus(d / "corpus", n_per_dialect=1, n_test=2)
    return d


@pytest.fixture(scope="module")
def full_run(setup):
    """One run with every kind of system and --terms; several tests read its files."""
    out = setup / "out"
    terms = setup / "terms.txt"
    terms.write_text("བོད\nཀ\nནམ་མཁའ\n", encoding="utf-8")  # the last occurs in no reference
    results = evaluate.main(["--model", str(setup / "tiny.pt"), "--data", str(setup / "corpus"),
                             "--adapter", f"amdo={setup / 'amdo.safetensors'}",
                             "--adapter", f"kham={setup / 'kham.safetensors'}",
                             "--checkpoint", str(setup / "full.pt"), "--checkpoint", str(setup / "ft_run"),
                             "--terms", str(terms), "--out", str(out), *FAST])
    return out, results


def _utterances(out):
    return [json.loads(line) for line in (out / "utterances.jsonl").read_text().splitlines()]


def _hyps(utts, system):
    return {u["id"]: u["hyp"] for u in utts if u["system"] == system}


def test_routing_decodes_each_dialect_with_its_own_adapter(full_run):
    out, _ = full_run
    utts = _utterances(out)
    assert {u["system"] for u in utts} == {"base", "amdo", "kham", "routed", "full", "ft_run"}
    dialect = {u["id"]: u["dialect"] for u in utts}
    routed, base = _hyps(utts, "routed"), _hyps(utts, "base")
    assert len(routed) == 6
    for clip, hyp in routed.items():
        own = {"amdo": "amdo", "kham": "kham", "utsang": "base"}[dialect[clip]]
        assert hyp == _hyps(utts, own)[clip], (clip, dialect[clip])
    # the adapters do change the output, so the equalities above could have failed
    for d, adapter in (("amdo", "amdo"), ("kham", "kham")):
        clips = [c for c in routed if dialect[c] == d]
        assert any(_hyps(utts, adapter)[c] != base[c] for c in clips), d
    assert _hyps(utts, "amdo") != _hyps(utts, "kham")
    results = json.loads((out / "results.json").read_text())
    for d, own in (("amdo", "amdo"), ("kham", "kham"), ("utsang", "base")):
        assert results["routed"][d]["cer"] == results[own][d]["cer"]
        assert results["routed"][d]["n"] == 2
    assert results["_meta"]["routes"] == {"amdo": "amdo", "kham": "kham", "utsang": None}


def test_table_files_agree(full_run):
    out, returned = full_run
    for name in ("results.json", "results.md", "results.csv", "results_cer.png", "utterances.jsonl"):
        assert (out / name).stat().st_size > 0, name
    results = json.loads((out / "results.json").read_text())
    systems = [s for s in results if s != "_meta"]
    assert systems == ["base", "amdo", "kham", "routed", "full", "ft_run"]
    assert not any("_examples" in results[s] for s in systems)
    dialects = ["amdo", "kham", "utsang"]
    for s in systems:
        assert sorted(k for k in results[s] if not k.startswith("_")) == dialects
        for metric in ("cer", "ser"):
            mean = np.mean([results[s][d][metric] for d in dialects])
            assert results[s]["_macro"][metric] == pytest.approx(mean)
        assert results[s]["_micro"]["n"] == 6
    # the csv holds the json's numbers exactly
    rows = list(csv.DictReader(open(out / "results.csv", encoding="utf-8")))
    assert len(rows) == len(systems) * (len(dialects) + 2)
    for r in rows:
        assert float(r["cer"]) == pytest.approx(results[r["system"]][r["dialect"]]["cer"], abs=1e-12)
        assert int(r["n"]) == results[r["system"]][r["dialect"]]["n"]
    # the markdown: 3 decimals of the same numbers, deltas against base
    md = (out / "results.md").read_text().splitlines()
    head = [c.strip() for c in md[0].strip("|").split("|")]
    assert head[:3] == ["Dialect", "base CER", "base WER"] and "routed ΔCER" in head and "base ΔCER" not in head
    table = {cells[0]: dict(zip(head, cells)) for line in md[2:] if line.startswith("| ")
             for cells in [[c.strip() for c in line.strip("|").split("|")]] if cells[0] in dialects + ["macro avg"]}
    assert set(table) == set(dialects) | {"macro avg"}
    for row, key in [(d, d) for d in dialects] + [("macro avg", "_macro")]:
        for s in systems:
            cer = results[s][key]["cer"]
            assert float(table[row][f"{s} CER"]) == pytest.approx(cer, abs=5e-4)
            if s != "base":
                delta = cer - results["base"][key]["cer"]
                assert float(table[row][f"{s} ΔCER"]) == pytest.approx(delta, abs=1e-3)
    # what main returns is what it wrote (less the decoding examples)
    assert json.loads(json.dumps({s: returned[s]["_macro"] for s in systems})) == \
        {s: results[s]["_macro"] for s in systems}


def test_checkpoints_are_systems_of_their_own(full_run):
    out, _ = full_run
    utts = _utterances(out)
    # the run directory's model.pt holds the base weights: it must decode exactly as the base does
    assert _hyps(utts, "ft_run") == _hyps(utts, "base")
    assert _hyps(utts, "full") != _hyps(utts, "base")
    meta = json.loads((out / "results.json").read_text())["_meta"]
    assert meta["checkpoints"]["ft_run"].endswith("model.pt")


def test_terms_recall_in_results(full_run):
    out, _ = full_run
    results = json.loads((out / "results.json").read_text())
    expected = term_recall(_utterances(out), ["བོད", "ཀ", "ནམ་མཁའ"])
    for s in ("base", "amdo", "routed", "full"):
        assert results[s]["_terms"] == expected[s]
        assert results[s]["_terms"]["ནམ་མཁའ"] == {"recall": None, "n": 0}
    assert "Term recall" in (out / "results.md").read_text()


def test_term_recall_by_hand():
    records = [
        {"system": "a", "ref": "the CPF board", "hyp": "the cpf board"},  # case folded: a hit
        {"system": "a", "ref": "CPF and IRAS", "hyp": "see pea eff and IRAS"},  # CPF missed, IRAS hit
        {"system": "a", "ref": "nothing here", "hyp": "CPF"},  # no reference term: not counted
        {"system": "b", "ref": "CPF and IRAS", "hyp": "CPF and IRAS"},
    ]
    r = term_recall(records, ["CPF", "IRAS", "CorpPass"])
    assert r["a"]["CPF"] == {"recall": 0.5, "n": 2}
    assert r["a"]["IRAS"] == {"recall": 1.0, "n": 1}
    assert r["a"]["CorpPass"] == {"recall": None, "n": 0}
    assert r["a"]["_all"] == {"recall": 2 / 3, "n": 3}
    assert r["b"]["_all"] == {"recall": 1.0, "n": 2}
    tib = term_recall([{"system": "s", "ref": "བོད་སྐད་", "hyp": "བོད་ཡིག"}], ["བོད", "སྐད"])["s"]
    assert (tib["བོད"]["recall"], tib["སྐད"]["recall"]) == (1.0, 0.0)


def test_several_sources_scored_under_their_own_names(setup, tmp_path):
    ja = tmp_path / "ja"
    ja.mkdir()
    t = np.arange(12000) / 16000
    with open(ja / "ctrl.jsonl", "w", encoding="utf-8") as f:
        for i, text in enumerate(["今日は、いい天気です。", "ＡＢＣ１２３カタカナ"]):
            sf.write(ja / f"{i}.wav", (0.1 * np.sin(2 * np.pi * (300 + 50 * i) * t)).astype(np.float32), 16000)
            f.write(json.dumps({"id": f"ja{i}", "audio": f"{i}.wav", "text": text}, ensure_ascii=False) + "\n")
    out = tmp_path / "out"
    results = evaluate.main(["--model", str(setup / "tiny.pt"), "--data", str(setup / "corpus"),
                             "--data", f"jactl={ja / 'ctrl.jsonl'}", "--language", "bo", "--language", "ja",
                             "--dialect", "amdo,kham,ja", "--out", str(out), *FAST])
    assert list(results) == ["base"]  # no adapters: no routed system
    rows = sorted(k for k in results["base"] if not k.startswith("_"))
    assert rows == ["corpus/amdo", "corpus/kham", "jactl/ja"]
    saved = json.loads((out / "results.json").read_text())
    assert saved["_meta"]["data"] == {"corpus": str(setup / "corpus"), "jactl": str(ja / "ctrl.jsonl")}
    base = saved["base"]
    assert base["_macro"]["cer"] == pytest.approx(np.mean([base[r]["cer"] for r in rows]))
    assert base["_sources"]["corpus"]["_macro"]["cer"] == pytest.approx(
        np.mean([base["corpus/amdo"]["cer"], base["corpus/kham"]["cer"]]))
    assert base["_sources"]["jactl"]["_micro"]["cer"] == base["jactl/ja"]["cer"]
    assert base["jactl/ja"]["wer"] is None and "Japanese" in base["jactl/ja"]["wer_note"]
    # Japanese scored end to end as score_utterance scores it (NFKC, no spaces, CER only)
    for u in _utterances(out):
        if u["data"] == "jactl":
            assert u["cer"] == score_utterance(u["ref"], u["hyp"], "ja")["cer"]
    md = (out / "results.md").read_text()
    assert "| corpus/amdo |" in md and "| corpus macro avg |" in md and "| jactl macro avg |" in md


def test_bad_clips_are_skipped_counted_and_reported(setup, tmp_path, capsys):
    corpus = tmp_path / "corpus"
    shutil.copytree(setup / "corpus", corpus)
    (corpus / "wav" / "garbage.wav").write_bytes(b"RIFF not really a wave file" * 10)
    sf.write(corpus / "wav" / "silent.wav", np.zeros(8000, np.float32), 16000)  # passes the header check
    for wav in (corpus / "wav").glob("test-kham-*.wav"):  # a dialect none of whose clips loads
        sf.write(wav, np.zeros(8000, np.float32), 16000)
    with open(corpus / "test.jsonl", "a", encoding="utf-8") as f:
        for i, rel in enumerate(["wav/missing.wav", "wav/garbage.wav", "wav/silent.wav"]):
            f.write(json.dumps({"id": f"bad{i}", "audio": rel, "text": "ཀ་ཁ", "dialect": "amdo"},
                               ensure_ascii=False) + "\n")
    out = tmp_path / "out"
    results = evaluate.main(["--model", str(setup / "tiny.pt"), "--data", str(corpus), "--out", str(out), *FAST])
    assert "routed" not in results
    base = results["base"]
    assert base["_micro"]["n"] == 4 and base["amdo"]["n"] == 2 and base["utsang"]["n"] == 2
    # the dialect that lost every clip keeps its row, and the macro average says it left it out
    assert base["kham"]["n"] == 0 and base["kham"]["cer"] is None
    assert base["_macro"]["missing"] == ["kham"]
    assert base["_macro"]["cer"] == pytest.approx((base["amdo"]["cer"] + base["utsang"]["cer"]) / 2)
    skipped = json.loads((out / "results.json").read_text())["_meta"]["skipped"]["corpus"]
    assert skipped["rows"] == {"unreadable": 2} and skipped["at_load"] == {"silent": 3}
    assert skipped["total"] == 5
    md = (out / "results.md").read_text()
    assert "Skipped clips in corpus: 5" in md and "| kham | n/a |" in md and "| macro avg* |" in md
    printed = capsys.readouterr().out
    assert "skipped 5 clips" in printed and "bad0" in printed  # the missing file is named


@pytest.mark.parametrize("extra,message", [
    (["--adapter", "amdo"], "expected NAME=PATH"),
    (["--adapter", "amdo=/no/such/adapter.safetensors"], "no such file"),
    (["--adapter", "am.do={a}"], "is not allowed"),
    (["--adapter", "base={a}"], "reserved"),
    (["--adapter", "amdo={o}"], "was trained on base"),
    (["--adapter", "amdo={g}"], "cannot read adapter"),
    (["--adapter", "amdo={a}", "--route", "kham=khm"], "unknown adapter name 'khm'"),
    (["--checkpoint", "/no/such/model.pt"], "no such file"),
    (["--checkpoint", "{gp}"], "garbage.pt: "),  # models.py words the reason
    (["--data", "/no/such/manifest.jsonl"], "does not exist"),
    (["--audio-ctx", "123"], "--audio-ctx"),
    (["--audio-ctx", "auto+15"], "expected full, auto, auto+N"),
    (["--terms", "/no/such/terms.txt"], "--terms"),
    (["--adapter", "amdo={a}", "--systems", "routd"], "--systems routd: no such system"),
])
def test_bad_input_is_one_clear_line(setup, tmp_path, extra, message):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    (tmp_path / "garbage.pt").write_bytes(b"\x00" * 64)
    extra = [e.format(a=setup / "amdo.safetensors", o=setup / "other_base.safetensors", g=garbage,
                      gp=tmp_path / "garbage.pt") for e in extra]
    args = ["--model", str(setup / "tiny.pt"), "--data", str(setup / "corpus"), "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as e:
        evaluate.main(args + extra)
    text = str(e.value.code)
    assert text.startswith("error:") and message in text and "\n" not in text, text
    assert not (tmp_path / "o").exists()  # nothing decoded or written


def test_systems_decodes_only_the_named_ones(setup, full_run, tmp_path):
    out = tmp_path / "routed_only"
    results = evaluate.main(["--model", str(setup / "tiny.pt"), "--data", str(setup / "corpus"),
                             "--adapter", f"amdo={setup / 'amdo.safetensors'}",
                             "--adapter", f"kham={setup / 'kham.safetensors'}",
                             "--systems", "routed", "--out", str(out), *FAST])
    assert list(results) == ["routed"]
    assert {u["system"] for u in _utterances(out)} == {"routed"}
    assert _hyps(_utterances(out), "routed") == _hyps(_utterances(full_run[0]), "routed")


def test_help_runs_as_a_script():
    r = subprocess.run([sys.executable, "evaluate.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "--adapter NAME=PATH" in r.stdout and "--route DIALECT=NAME" in r.stdout


def test_robustness_is_reported_per_system_and_dialect(setup, tmp_path):
    out = tmp_path / "nprr"
    results = evaluate.main(["--model", str(setup / "tiny.pt"), "--data", str(setup / "corpus"),
                             "--adapter", f"amdo={setup / 'amdo.safetensors'}", "--no-routed",
                             "--robustness", "--nbest", "3", "--out", str(out), *FAST])
    for system in ("base", "amdo"):
        summary = results[system]["_robustness"]
        assert set(summary) >= {"amdo", "kham", "utsang", "_macro"}
        for dialect in ("amdo", "kham", "utsang"):
            m = summary[dialect]
            assert m["n"] == 2 and 1 <= m["mean_list_size"] <= 3
            assert m["cer_oracle"] <= m["cer_1best"] + 1e-12  # the oracle picks from a list holding the 1-best
            assert m["reorder"]["score_drift"] < 1e-4  # reordering a list changes no score
    saved = json.loads((out / "results.json").read_text())
    assert saved["amdo"]["_robustness"]["_macro"]["n"] == 6
    lines = (out / "robustness.jsonl").read_text().splitlines()
    assert len(lines) == 2 * 6 and {json.loads(x)["system"] for x in lines} == {"base", "amdo"}
    assert "N-best robustness (NPRR)" in (out / "results.md").read_text()


def test_compositions_are_systems(setup, tmp_path):
    a, k = f"amdo={setup / 'amdo.safetensors'}", f"kham={setup / 'kham.safetensors'}"
    res = evaluate.main(["--model", str(setup / "tiny.pt"), "--adapter", a, "--adapter", k,
                         "--adapter", "same=amdo@1.0", "--adapter", "uniform=amdo@0.5+kham@0.5", "--adapter", "fitted=amdo+kham",
                         "--fit-data", str(setup / "corpus"), "--fit-samples", "3", "--fit-split", "train",
                         "--no-routed", "--data", str(setup / "corpus"), "--out", str(tmp_path), *FAST])
    assert {"same", "uniform", "fitted"} <= set(res)
    hyps = {}
    for line in open(tmp_path / "utterances.jsonl", encoding="utf-8"):
        r = json.loads(line)
        hyps.setdefault(r["system"], []).append(r["hyp"])
    assert hyps["same"] == hyps["amdo"]  # one adapter at weight 1 decodes as itself
    meta = json.loads((tmp_path / "results.json").read_text())["_meta"]["mixes"]
    assert meta["uniform"]["weights"] == {"amdo": 0.5, "kham": 0.5}
    assert sum(meta["fitted"]["weights"].values()) == pytest.approx(1.0) and min(meta["fitted"]["weights"].values()) >= 0


def test_adapters_are_decoded_with_the_encoder_context_they_were_trained_with(setup, tmp_path):
    model = _model()
    fp = fingerprint(model)
    add_lora(model, "amdo", targets="qv", r=4, alpha=8)
    save_adapter(model, tmp_path / "auto.safetensors", "amdo", base_fingerprint=fp,
                 metadata={"config": {"audio_ctx": "auto"}})  # as train.py --audio-ctx auto records it
    args = ["--model", str(setup / "tiny.pt"), "--adapter", f"amdo={tmp_path / 'auto.safetensors'}", "--no-routed",
            "--data", str(setup / "corpus"), "--max-samples", "1", "--batch-size", "4"]
    evaluate.main(args + ["--out", str(tmp_path / "a")])
    assert json.loads((tmp_path / "a" / "results.json").read_text())["_meta"]["audio_ctx"] == "auto"
    evaluate.main(args + ["--audio-ctx", "full", "--out", str(tmp_path / "b")])  # the flag still wins
    assert json.loads((tmp_path / "b" / "results.json").read_text())["_meta"]["audio_ctx"] == "full"
    evaluate.main(args + ["--audio-ctx", "auto+400", "--precision", "bf16", "--out", str(tmp_path / "m")])
    meta = json.loads((tmp_path / "m" / "results.json").read_text())["_meta"]
    assert (meta["audio_ctx"], meta["precision"]) == ("auto+400", "bf16")
    with pytest.raises(SystemExit, match="different --audio-ctx"):
        evaluate.main(args + ["--adapter", f"kham={setup / 'kham.safetensors'}", "--out", str(tmp_path / "c")])


def test_any_label_set_and_row_caps_from_the_command_line(setup, tmp_path):
    corpus = make_corpus(tmp_path / "c", n_per_dialect=1, dialects=("golok", "amdo"), n_test=3)
    base = ["--model", str(setup / "tiny.pt"), "--data", str(corpus), *FAST]
    with pytest.raises(SystemExit, match="no usable test examples of dialects"):  # golok is not a known label ...
        evaluate.main(base + ["--dialect", "golok", "--out", str(tmp_path / "a")])
    res = evaluate.main(base + ["--dialects", "any", "--max-rows", "4", "--out", str(tmp_path / "b")])  # ... unless accepted
    assert res["base"]["golok"]["n"] == 3 and res["base"]["amdo"]["n"] == 1  # 4 rows of 6: the file's first 4
    res = evaluate.main(base + ["--dialect-map", "golok=amdo", "--out", str(tmp_path / "c2")])
    assert res["base"]["amdo"]["n"] == 6 and "golok" not in res["base"]


def test_bf16_on_a_cpu_without_bf16_instructions_is_named(monkeypatch):
    from training import setup as training_setup

    monkeypatch.setattr(training_setup, "cpu_has_bf16", lambda: False)
    assert "slower than fp32" in training_setup.precision_note("bf16", "cpu")
    assert training_setup.precision_note("fp32", "cpu") is None and training_setup.precision_note("bf16", "cuda") is None
    monkeypatch.setattr(training_setup, "cpu_has_bf16", lambda: True)
    assert training_setup.precision_note("bf16", "cpu") is None
