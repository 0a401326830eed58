"""Recipes end to end on tiny dims: configs/openpecha_tiny.json dry-run on a local parquet of the OpenPecha schema
(audio fetched from file:// URLs), and a dataset whose dialect labels are its own, through train.py and evaluate.py."""
import json
import os
import re

import pyarrow.parquet as pq
import pytest

import evaluate
import train
from conftest import make_corpus, make_tiny_model
from data.openpecha_fixture import main as fixture_main
from data.openpecha_fixture import write_openpecha_fixture
from training.checkpoint import load_checkpoint
from whisper_ft.models import export_openai

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "openpecha_tiny.json")
OWN_LABELS = ("lhasa", "shigatse", "golok")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("recipe")
    export_openai(make_tiny_model(), d / "tiny.pt")
    return d / "tiny.pt"


def test_the_openpecha_config_is_the_research_setting():
    args = train.parse_args(["--config", CONFIG])  # every key is a train.py flag, every value usable
    assert (args.model, args.data, args.mode, args.dialect) == ("tiny", "openpecha", "full", "balanced")
    assert (args.samples, args.fixed_subset, args.epochs, args.amp) == (15000, True, 3, "fp16")


def test_openpecha_fixture_has_the_schema(tmp_path):
    corpus = make_corpus(tmp_path / "corpus", n_per_dialect=3, n_test=1)
    counts = write_openpecha_fixture(tmp_path / "op", corpus, per_dept=2)
    assert counts == {"train": {"STT_AM": 2, "KH": 2, "NS": 2}, "test": {"STT_AM": 1, "KH": 1, "NS": 1}}
    rows = pq.read_table(tmp_path / "op" / "train.parquet").to_pylist()
    assert set(rows[0]) == {"file_name", "uni", "wylie", "url", "dept", "grade", "char_len", "audio_len"}
    assert [r["dept"] for r in rows[:3]] == ["STT_AM", "KH", "NS"]  # interleaved: --max-rows takes every dept
    manifest = {json.loads(line)["text"]: json.loads(line) for line in open(corpus / "train.jsonl", encoding="utf-8")}
    for r in rows:  # each row is a clip of the corpus: its text, its file, its length in seconds
        clip = manifest[r["uni"]]
        assert r["url"] == (corpus / clip["audio"]).resolve().as_uri()
        assert r["audio_len"] == pytest.approx(clip["duration"], abs=1e-3) and r["char_len"] == len(r["uni"])
    again = tmp_path / "again"
    write_openpecha_fixture(again, corpus, per_dept=2)  # seeded: the same rows
    assert pq.read_table(again / "train.parquet").to_pylist() == rows
    with pytest.raises(SystemExit, match="--per-dept 0: must be a positive integer"):
        fixture_main(["--out", str(tmp_path / "x"), "--corpus", str(corpus), "--per-dept", "0"])
    with pytest.raises(SystemExit, match="--corpus .*train.jsonl and test.jsonl"):
        fixture_main(["--out", str(tmp_path / "x"), "--corpus", str(tmp_path)])


def test_openpecha_config_dry_run_on_a_local_fixture(tiny, tmp_path, monkeypatch, capsys):
    corpus = make_corpus(tmp_path / "corpus", n_per_dialect=10, n_test=2)
    write_openpecha_fixture(tmp_path / "op", corpus, per_dept=10)
    monkeypatch.setenv("WHISPER_FT_CACHE", str(tmp_path / "cache"))  # downloads land here, not in ~/.cache
    out = tmp_path / "run"
    # the config as a GPU user runs it, with only what a CPU cannot afford made small (fp16 stays: it runs here)
    results = train.main(["--config", CONFIG, "--data", f"openpecha:{tmp_path / 'op'}", "--max-rows", "30",
                          "--dialect-map", "STT_AM=amdo,KH=kham,NS=utsang", "--model", str(tiny), "--out", str(out),
                          "--max-steps", "2", "--batch-size", "2", "--grad-accum", "1", "--num-workers", "0",
                          "--eval-samples", "1", "--eval-batch-size", "4", "--device", "cpu"])
    printed = capsys.readouterr().out
    assert "downloading 30 of 30 clips" in printed and "fetched 30 clips" in printed  # train split
    assert "downloading 6 of 6 clips" in printed and "fetched 6 clips" in printed  # test split
    assert re.search(r"openpecha:\S+ \[train\]: kept 30 of 30 rows, none skipped", printed)
    assert "30 train rows, dialects ['amdo', 'kham', 'utsang'] sampled balanced, 15000 samples/epoch" in printed
    assert "precision torch.float16" in printed and "mode full" in printed
    assert "step 1/2 loss" in printed and "step 2/2 loss" in printed  # the progress lines (a bar on a terminal)
    assert len(list((tmp_path / "cache" / "openpecha_audio").iterdir())) == 36
    for name in ("config.json", "model.pt", "results.json", "results.md", "results.csv", "tb",
                 "checkpoints/ckpt-00000002.pt"):
        assert (out / name).exists(), name
    config = json.loads((out / "config.json").read_text())
    assert (config["samples"], config["fixed_subset"], config["epochs"], config["amp"]) == (15000, True, 3, "fp16")
    assert "about" not in config
    sampler = load_checkpoint(out / "checkpoints" / "ckpt-00000002.pt")["sampler"]["config"]
    assert sampler["fixed_subset"] is True and sampler["num_samples"] == 15000  # --fixed-subset reaches the sampler
    for system in ("base", "trained"):
        assert sorted(k for k in results[system] if not k.startswith("_")) == ["amdo", "kham", "utsang"]
    table = (out / "results.md").read_text()
    assert all(f"| {d} |" in table for d in ("amdo", "kham", "utsang"))
    meta = json.loads((out / "results.json").read_text())["_meta"]
    assert meta["steps"] == 2 and meta["bad_steps"] == 0


def test_a_dataset_with_its_own_dialect_labels(tiny, tmp_path, capsys):
    corpus = make_corpus(tmp_path / "corpus", n_per_dialect=2, n_test=1, dialects=OWN_LABELS)
    common = ["--model", str(tiny), "--data", str(corpus), "--max-steps", "1", "--batch-size", "2",
              "--grad-accum", "1", "--audio-ctx", "auto", "--eval-batch-size", "4"]
    with pytest.raises(SystemExit, match=r"error: --data .*: no usable training rows; .*"
                                         r"pass --dialects golok,lhasa,shigatse \(or --dialects any\)"):
        train.main([*common, "--out", str(tmp_path / "refused")])  # Tibetan accepts utsang, amdo, kham by default
    run = tmp_path / "run"
    results = train.main([*common, "--out", str(run), "--dialects", "lhasa,shigatse,golok"])
    for system in ("base", "trained"):
        assert sorted(k for k in results[system] if not k.startswith("_")) == sorted(OWN_LABELS)
        assert all(results[system][d]["n"] == 1 for d in OWN_LABELS)
    table = (run / "results.md").read_text()
    assert all(f"| {d} |" in table for d in OWN_LABELS)

    eval_args = ["--model", str(tiny), "--adapter", f"lhasa={run}", "--data", str(corpus), "--batch-size", "4"]
    with pytest.raises(SystemExit, match=r"no usable test examples; .*pass --dialects golok,lhasa,shigatse"):
        evaluate.main([*eval_args, "--out", str(tmp_path / "eval_refused")])
    results = evaluate.main([*eval_args, "--dialects", "any", "--out", str(tmp_path / "eval")])
    assert set(results) == {"base", "lhasa", "routed"}
    saved = json.loads((tmp_path / "eval" / "results.json").read_text())
    for system in ("base", "lhasa", "routed"):
        assert sorted(k for k in saved[system] if not k.startswith("_")) == sorted(OWN_LABELS)
    assert saved["_meta"]["routes"] == {"golok": None, "lhasa": "lhasa", "shigatse": None}
    assert all(f"| {d} |" in (tmp_path / "eval" / "results.md").read_text() for d in OWN_LABELS)
