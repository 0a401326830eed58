"""Dialect identification: the head and its file, the routing rule, train.py --task dialect-id, and evaluate.py's
routed-auto (a classifier that is always right routes exactly like the labels; a wrong one routes by itself)."""
import json

import numpy as np
import pytest
import soundfile as sf
import torch

import evaluate
import train
from conftest import make_corpus, make_tiny_model
from test_evaluate import _adapter, _model
from whisper_ft.dialect_id import (DialectHead, choose_route, encoder_states, load_dialect_id, predict_dialect,
                                   save_dialect_id)
from whisper_ft.encoder import encode
from whisper_ft.models import export_openai, fingerprint

LABELS = ["amdo", "kham", "utsang"]


def _head(n_state=64, n_layers=1, certain=None, seed=0):
    """A head on the tiny dims; with `certain`, its output weights are zero and its bias 50 on that label (always
    predicted) or, for a name that is no label, zero (every label 1/3)."""
    torch.manual_seed(seed)
    head = DialectHead(LABELS, n_state=n_state, n_layers=n_layers, n_hidden=16)
    if certain is not None:
        with torch.no_grad():
            head.mlp[-1].weight.zero_()
            head.mlp[-1].bias.zero_()
            if certain in LABELS:
                head.mlp[-1].bias[LABELS.index(certain)] = 50.0
    return head.eval()


def test_probabilities_are_one_row_per_clip_summing_to_one_at_the_clips_own_context():
    model, head = make_tiny_model(), _head(n_layers=2)
    mel = torch.randn(3, 80, 3000)
    n_frames = torch.tensor([300, 200, 151])
    probs = predict_dialect(model, head, mel, n_frames)
    assert probs.shape == (3, 3)
    assert torch.allclose(probs.sum(-1), torch.ones(3))
    # the encoder runs on the longest clip's frames, not the 30 s window: cropping first changes nothing
    assert torch.allclose(probs, predict_dialect(model, head, mel[..., :300], n_frames), atol=1e-6)
    states, positions = encoder_states(model, mel[..., :300], n_frames)
    assert states.shape == (3, 3, 150, 64) and positions.tolist() == [150, 100, 76]
    with torch.no_grad():  # the last state is the encoder's own residual stream (before ln_post)
        assert torch.equal(model.encoder.ln_post(states[-1]), encode(model, mel[..., :300]))
    assert encoder_states(model, mel[..., :300], n_frames, n_layers=1)[0].shape[0] == 2  # only the first block ran


def test_the_file_round_trips_and_refuses_another_base(tmp_path):
    model, head = make_tiny_model(), _head(seed=1)
    path = tmp_path / "lid.safetensors"
    save_dialect_id(head, path, base_fingerprint=fingerprint(model), metadata={"steps": 7})
    loaded = load_dialect_id(path, base_fingerprint=fingerprint(model))
    assert loaded.labels == LABELS and loaded.config() == head.config() and loaded.metadata == {"steps": 7}
    mel = torch.randn(2, 80, 200)
    assert torch.equal(predict_dialect(model, loaded, mel), predict_dialect(model, head, mel))
    with pytest.raises(ValueError, match="trained on base .* but this model is"):
        load_dialect_id(path, base_fingerprint=fingerprint(make_tiny_model(seed=3)))
    with pytest.raises(ValueError, match="no such file"):
        load_dialect_id(tmp_path / "none.safetensors", base_fingerprint="x")
    _adapter(_model(), "amdo", tmp_path / "adapter.safetensors", seed=1)
    with pytest.raises(ValueError, match="a LoRA adapter"):
        load_dialect_id(tmp_path / "adapter.safetensors", base_fingerprint=fingerprint(_model()))


def test_choose_route_takes_the_adapter_of_the_predicted_dialect_or_the_fallback():
    probs = torch.tensor([0.125, 0.75, 0.125])  # exact in float32, so "at the threshold" is exact too
    assert choose_route(probs, LABELS, ["amdo", "kham"]) == ("kham", "kham", 0.75)
    assert choose_route(probs, LABELS, ["amdo", "kham"], threshold=0.8, fallback="base")[0] == "base"
    assert choose_route(probs, LABELS, ["amdo", "kham"], threshold=0.75, fallback="base")[0] == "kham"  # at P: routed
    assert choose_route(probs, LABELS, ["amdo"], fallback="mix") == ("mix", "kham", 0.75)
    assert choose_route(probs, LABELS, {"kham": "kham_r8"})[0] == "kham_r8"  # --route kham=kham_r8
    with pytest.raises(ValueError, match="3 labels"):
        choose_route([0.5, 0.5], LABELS, ["amdo"])


def _tone_corpus(root, n_train=6, n_test=2):
    """Each dialect a sound of its own (a low tone, noise, a high tone; the text says nothing about it): a head
    can learn them apart."""
    root.mkdir()
    (root / "wav").mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        with open(root / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for d, dialect in enumerate(LABELS):
                for i in range(n):
                    t = np.arange(int(16000 * (0.6 + 0.1 * i))) / 16000
                    wav = 0.2 * (rng.standard_normal(t.size) / 3 if dialect == "kham" else
                                 np.sin(2 * np.pi * (300 if dialect == "amdo" else 3000) * t)) + 0.01 * rng.standard_normal(t.size)
                    sf.write(root / f"wav/{split}-{dialect}-{i}.wav", wav.astype(np.float32), 16000)
                    f.write(json.dumps({"id": f"{split}-{dialect}-{i}", "audio": f"wav/{split}-{dialect}-{i}.wav",
                                        "text": "ཀ་ཁ", "dialect": dialect, "language": "bo"}, ensure_ascii=False) + "\n")
    return root


def _hearing_model():
    """The tiny model with its convolutions scaled up: at init the positional embedding drowns their output, and
    a head can then hardly hear the audio; Whisper's trained convolutions carry it."""
    model = make_tiny_model()
    with torch.no_grad():
        model.encoder.conv1.weight.mul_(10)
        model.encoder.conv2.weight.mul_(3)
    return model


def test_train_task_dialect_id_learns_and_writes_the_head_and_its_results(tmp_path):
    export_openai(_hearing_model(), tmp_path / "tiny.pt")
    out = tmp_path / "run"
    results = train.main(["--task", "dialect-id", "--model", str(tmp_path / "tiny.pt"), "--out", str(out),
                          "--data", str(_tone_corpus(tmp_path / "tones")), "--max-steps", "20", "--batch-size", "9",
                          "--grad-accum", "1", "--lr", "1e-2", "--schedule", "constant", "--warmup-steps", "1",
                          "--head-hidden", "32", "--audio-ctx", "auto", "--eval-every", "10", "--eval-batch-size", "6"])
    assert results["_dialect_id_base"]["accuracy"] < 1.0  # the untrained head, scored at step 0
    assert results["_dialect_id"]["accuracy"] == 1.0, results["_dialect_id"]
    assert results["_dialect_id"]["confusion"]["kham"] == {"amdo": 0, "kham": 2, "utsang": 0}
    saved = json.loads((out / "results.json").read_text())
    assert saved["_dialect_id"]["recall"] == {d: 1.0 for d in LABELS} and saved["_meta"]["steps"] == 20
    assert "| kham | 2 | 1.000 |" in (out / "results.md").read_text()
    fp = fingerprint(_hearing_model())
    head = load_dialect_id(out / "dialect_id.safetensors", base_fingerprint=fp)
    assert head.labels == LABELS and head.metadata["steps"] == 20
    assert load_dialect_id(out / "dialect_id_best.safetensors", base_fingerprint=fp).labels == LABELS
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(out / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    losses = [e.value for e in acc.Scalars("train/loss")]
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses
    assert {"eval_trained/accuracy", "eval_trained/amdo/recall"} <= set(acc.Tags()["scalars"])


@pytest.mark.parametrize("flags,message", [
    (["--lora-r", "8"], "--lora-r does not apply to --task dialect-id"),
    (["--mode", "full"], "--mode full does not apply"),
    (["--dialect", "amdo"], "needs two or more dialects"),
])
def test_train_flags_the_task_cannot_use_are_one_line(tmp_path, flags, message):
    export_openai(make_tiny_model(), tmp_path / "tiny.pt")
    make_corpus(tmp_path / "corpus", n_per_dialect=1, n_test=1)
    with pytest.raises(SystemExit) as e:
        train.main(["--task", "dialect-id", "--model", str(tmp_path / "tiny.pt"), "--data", str(tmp_path / "corpus"),
                    "--out", str(tmp_path / "o"), *flags])
    assert str(e.value.code).startswith("error:") and message in str(e.value.code), e.value.code
    with pytest.raises(SystemExit, match="--head-layers / --head-hidden are for --task dialect-id"):
        train.parse_args(["--head-layers", "2"])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("lid")
    export_openai(_model(), d / "tiny.pt")
    _adapter(_model(), "amdo", d / "amdo.safetensors", seed=1)
    _adapter(_model(), "kham", d / "kham.safetensors", seed=2)
    fp = fingerprint(_model())
    for name in ("amdo", "kham", "unsure"):
        save_dialect_id(_head(certain=name), d / f"always_{name}.safetensors", base_fingerprint=fp)
    save_dialect_id(_head(), d / "other_base.safetensors", base_fingerprint="0123456789abcdef")
    make_corpus(d / "corpus", n_per_dialect=1, n_test=2)
    return d


def _evaluate(setup, out, head, *extra):
    return evaluate.main(["--model", str(setup / "tiny.pt"), "--data", str(setup / "corpus"), "--out", str(out),
                          "--adapter", f"amdo={setup / 'amdo.safetensors'}", "--adapter", f"kham={setup / 'kham.safetensors'}",
                          "--dialect-id", str(setup / f"always_{head}.safetensors"), "--audio-ctx", "auto",
                          "--batch-size", "4", *extra])


def _utterances(out, system):
    rows = [json.loads(line) for line in (out / "utterances.jsonl").read_text().splitlines()]
    return {r["id"]: r for r in rows if r["system"] == system}


def test_a_classifier_that_is_always_right_routes_exactly_like_the_labels(setup, tmp_path):
    out = tmp_path / "right"
    results = _evaluate(setup, out, "amdo", "--dialect", "amdo")  # amdo clips only: "always amdo" is always right
    assert results["routed-auto"]["_macro"]["cer"] == results["routed"]["_macro"]["cer"]
    auto, routed = _utterances(out, "routed-auto"), _utterances(out, "routed")
    assert {i: u["hyp"] for i, u in auto.items()} == {i: u["hyp"] for i, u in routed.items()}
    assert {(u["predicted"], u["route"]) for u in auto.values()} == {("amdo", "amdo")}
    saved = json.loads((out / "results.json").read_text())
    assert saved["_dialect_id"]["accuracy"] == 1.0 and saved["_dialect_id"]["recall"] == {"amdo": 1.0}
    assert saved["_meta"]["decode_s"]["routed-auto"] > 0
    assert "Dialect ID: accuracy 1.000 on 2 clips" in (out / "results.md").read_text()


def test_a_wrong_classifier_routes_by_its_prediction_not_the_label(setup, tmp_path):
    out = tmp_path / "wrong"
    results = _evaluate(setup, out, "kham", "--dialect", "amdo")
    auto, kham = _utterances(out, "routed-auto"), _utterances(out, "kham")
    assert {i: u["hyp"] for i, u in auto.items()} == {i: u["hyp"] for i, u in kham.items()}
    assert {i: u["hyp"] for i, u in auto.items()} != {i: u["hyp"] for i, u in _utterances(out, "amdo").items()}
    assert results["_dialect_id"]["accuracy"] == 0.0
    assert results["_dialect_id"]["confusion"]["amdo"]["kham"] == 2


@pytest.mark.parametrize("fallback,same_as", [("base", "base"), ("mix", "m"), ("kham", "kham")])
def test_unsure_clips_and_dialects_without_an_adapter_go_to_the_chosen_fallback(setup, tmp_path, fallback, same_as):
    """The "unsure" head gives each label 1/3: under --route-threshold 0.5 every clip falls back."""
    out = tmp_path / fallback
    _evaluate(setup, out, "unsure", "--route-threshold", "0.5", "--route-fallback", fallback, "--adapter", "m=amdo+kham")
    auto = _utterances(out, "routed-auto")
    assert {u["route"] for u in auto.values()} == {fallback}
    assert {i: u["hyp"] for i, u in auto.items()} == {i: u["hyp"] for i, u in _utterances(out, same_as).items()}


@pytest.mark.parametrize("extra,message", [
    (["--dialect-id", "/no/such/lid.safetensors"], "--dialect-id /no/such/lid.safetensors: no such file"),
    (["--dialect-id", "{d}/other_base.safetensors"], "was trained on base 0123456789abcdef"),
    (["--dialect-id", "{d}/amdo.safetensors"], "a LoRA adapter"),
    (["--dialect-id", "{d}/always_amdo.safetensors", "--route-fallback", "amod"], "--route-fallback amod: expected base, mix"),
    (["--dialect-id", "{d}/always_amdo.safetensors", "--route-threshold", "1.5"], "--route-threshold 1.5"),
    (["--route-threshold", "0.5"], "--route-threshold is for routed-auto: add --dialect-id"),
])
def test_bad_dialect_id_input_is_one_clear_line(setup, tmp_path, extra, message):
    args = ["--model", str(setup / "tiny.pt"), "--data", str(setup / "corpus"), "--out", str(tmp_path / "o"),
            "--adapter", f"amdo={setup / 'amdo.safetensors'}", *[e.format(d=setup) for e in extra]]
    with pytest.raises(SystemExit) as e:
        evaluate.main(args)
    text = str(e.value.code)
    assert text.startswith("error:") and message in text and "\n" not in text, text
    assert not (tmp_path / "o").exists()
